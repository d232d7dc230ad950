//! The channel between the master and each worker: a Unix stream socket whose worker end is the
//! descriptor named by [`crate::env::CORRAL_CHANNEL_FD`]. Frames are those of [`crate::frame`]
//! (4-byte big-endian length, then JSON), at most [`MAX_CHANNEL_FRAME_LEN`] bytes, both ways.
//!
//! In `rr` and `least-conn` modes the master hands connections over it: a
//! [`MasterMessage::Connection`] frame is sent in one `sendmsg` with exactly one descriptor
//! attached (`SCM_RIGHTS`), so the descriptors a worker receives come in the order of the
//! `connection` frames they belong to.

use serde::{Deserialize, Serialize};

/// Version of the channel protocol, given to workers in [`crate::env::CORRAL_CHANNEL_PROTOCOL`].
pub const CHANNEL_PROTOCOL_VERSION: u32 = 1;

/// The largest frame on a worker channel: 1 MiB.
pub const MAX_CHANNEL_FRAME_LEN: usize = 1024 * 1024;

/// What a worker tells the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMessage {
    /// The worker is ready for work.
    Ready,
    /// The worker is about to exit (a panic, an uncaught exception, a memory limit): the master
    /// starts its replacement at once and lets it finish its open work.
    GoingDown {
        /// Why, for the log.
        #[serde(default)]
        reason: String,
    },
    /// Any JSON for the master (logged today).
    Message {
        /// The payload.
        data: serde_json::Value,
    },
    /// The worker took connection `id`: the master forgets its own copy. Sent before the worker
    /// reads anything from the connection.
    Accepted {
        /// The `id` of the [`MasterMessage::Connection`].
        id: u64,
    },
    /// The worker will not serve connection `id` (it is shutting down, say) and has not read
    /// from it: the master gives it to another worker.
    Refused {
        /// The `id` of the [`MasterMessage::Connection`].
        id: u64,
    },
    /// The worker closed connection `id` (optional; `least-conn` counts open connections with
    /// it).
    Closed {
        /// The `id` of the [`MasterMessage::Connection`].
        id: u64,
    },
}

/// What the master tells a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMessage {
    /// A client connection, accepted by the master on the app's listener number `listener` (the
    /// order of its `--listen` addresses); its descriptor, non-blocking, is attached to this frame.
    /// The worker answers [`WorkerMessage::Accepted`] or [`WorkerMessage::Refused`].
    Connection {
        /// Unique among this worker's connections.
        id: u64,
        /// Index of the listening address.
        listener: u32,
    },
    /// The master is about to stop this worker (a reload, `stop`, `scale`): take no more work,
    /// finish the open work, exit. The stop signal follows.
    Shutdown,
    /// A message for the program (`corral send`).
    Message {
        /// Any JSON.
        data: serde_json::Value,
    },
}
