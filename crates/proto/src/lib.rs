//! corral's wire contract, and nothing else: no I/O policy, no supervision logic.
//!
//! It owns:
//! - the **control protocol** spoken on `$CORRAL_HOME/corral.sock` between the CLI (or any other
//!   client) and the daemon: [`frame`] (length-prefixed JSON with a size limit), the handshake
//!   ([`Hello`], [`Welcome`]) and the messages ([`Request`], [`Response`]);
//! - the **app description** a client hands the daemon ([`AppSpec`]) and what the daemon reports
//!   back ([`InstanceInfo`], [`AppInfo`]);
//! - the **environment contract** with supervised programs ([`env`]);
//! - the table of **signal names** both sides accept ([`signal`]).
//!
//! `docs/protocol.md` in the repository describes the same contract in prose, precisely enough to
//! write another client from it.
//!
//! # How it works
//! A client connects, sends one [`Hello`] frame and reads one [`Welcome`] (or a
//! [`Response::Error`] when the protocol versions differ). Then it sends [`Request`] frames and
//! reads one [`Response`] per request, except `logs --follow`, which is answered by a stream of
//! [`Response::LogLines`] frames that ends when either side closes.

#![warn(missing_docs)]

pub mod channel;
pub mod checks;
pub mod env;
pub mod event;
pub mod frame;
pub mod message;
pub mod resp;
pub mod signal;

pub use checks::{HealthCheck, Probe, ReadyWhen};
pub use event::LifecycleEvent;
pub use frame::{FrameError, MAX_FRAME_LEN};
pub use message::*;

/// Version of the control protocol. Bumped on every incompatible change to [`message`].
pub const PROTOCOL_VERSION: u32 = 2;

/// Version of the corral package that built this crate.
pub const PACKAGE_VERSION: &str = env!("CARGO_PKG_VERSION");
