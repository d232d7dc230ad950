//! The library a program links to cooperate with corral. Every function also works when the
//! program runs on its own, outside corral, so the same binary runs either way.
//!
//! It owns the worker's side of the contract in `corral-proto` and `docs/protocol.md`: the
//! environment corral sets, the connections it hands over or the listening sockets it passes, and
//! the channel to the master, with the calls made over it: the shared state ([`state`]) and the
//! bus between workers ([`bus`]). It knows nothing of HTTP, nor of where corral keeps the shared
//! state. The blocking API needs no runtime; the `tokio` feature adds [`tokio::incoming`],
//! [`tokio::shutdown`], [`tokio::state`] and [`tokio::bus`] for async programs.
//!
//! ```no_run
//! use std::io::Write;
//! // The connections corral gives this worker, in any `--lb` mode, or, run alone, those of
//! // 127.0.0.1:8080.
//! let incoming = corral_worker::incoming("127.0.0.1:8080")?;
//! corral_worker::install_panic_hook();
//! corral_worker::ready()?;
//! for connection in incoming.iter() {
//!     let mut connection = connection?;
//!     connection.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi")?;
//! }
//! // The loop ends when corral asks this worker to shut down.
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! The shared state (a key/value store and pub/sub, the same for every worker) and the bus:
//!
//! ```no_run
//! use std::time::Duration;
//! use serde_json::json;
//! let state = corral_worker::state();
//! let visits = state.incr("visits", 1)?;
//! state.set_with_ttl("session:42", "alice", Duration::from_secs(600))?;
//! let news = state.subscribe("news.*")?;
//! state.publish("news.sport", "goal")?;
//! let published = news.next();
//!
//! let bus = corral_worker::bus();
//! bus.send("workers", json!({"reload": "config"}))?;
//! let lease = bus.request("agent", json!({"lease": "job-7"}), Duration::from_secs(2))?;
//! // Another worker asks this one.
//! if let Some(request) = bus.next_request(Some(Duration::from_secs(1))) {
//!     let answer = json!({"seen": request.data});
//!     request.reply(Ok(answer))?;
//! }
//! # Ok::<(), corral_worker::CallError>(())
//! ```
//!
//! # How it works
//! In `rr` and `least-conn` modes the master accepts, and sends each connection's descriptor on
//! the channel (`CORRAL_CHANNEL_FD`); the library queues them as they arrive and acknowledges each
//! when the program takes it, and gives back those that arrive after a shutdown notice. In
//! `shared` mode the listening sockets are at descriptors 3.. (`LISTEN_FDS`, `LISTEN_PID`) and the
//! program accepts on them; in `proxy` mode it listens on `127.0.0.1:$PORT`. [`listeners`] and the
//! channel take each descriptor once, on first use. The channel is read by a thread of its own,
//! or by a task of the tokio runtime the program runs in.
//!
//! Shared-state operations and bus messages are calls the master answers: each carries a number
//! (from one counter), and its answer the same number, in whatever order answers come. Calls
//! made together ([`State::call_many`], or many async calls in flight) are written without
//! waiting for one another, so a worker pipelines as many as it likes over its one channel.
//! Messages and requests for this worker, and messages published on its subscriptions, are
//! queued by the reader until the program takes them.

#![warn(missing_docs)]

mod bus;
mod channel;
mod incoming;
mod state;
#[cfg(feature = "tokio")]
pub mod tokio;

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::sync::{Mutex, OnceLock, PoisonError};

pub use bus::{Bus, Message, Request, bus};
pub use channel::calls::{CallError, DEFAULT_CALL_TIMEOUT};
pub use incoming::{Connection, Incoming, Stream, incoming};
pub use state::{Published, State, Subscription, state};

/// The operations of the shared state, for [`State::call_many`].
pub use corral_proto::channel::StateCall;

use corral_proto::channel::WorkerMessage;
use corral_proto::env;

/// Whether this program was started by corral.
pub fn is_worker() -> bool {
    std::env::var_os(env::CORRAL_WORKER_ID).is_some()
}

/// This worker's instance id (the `id` column of `corral ls`), when started by corral.
pub fn worker_id() -> Option<u32> {
    std::env::var(env::CORRAL_WORKER_ID).ok()?.parse().ok()
}

/// The name of the app this program runs as, when started by corral.
pub fn app() -> Option<String> {
    std::env::var(env::CORRAL_APP).ok()
}

/// The index of this instance within its app (`0..instances`), when started by corral.
pub fn instance() -> Option<u32> {
    std::env::var(env::CORRAL_INSTANCE).ok()?.parse().ok()
}

/// A listening socket inherited from corral.
#[derive(Debug)]
pub enum Listener {
    /// A TCP socket.
    Tcp(TcpListener),
    /// A Unix-domain socket.
    Unix(UnixListener),
}

impl Listener {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

static LISTENERS: OnceLock<Mutex<Option<Vec<Listener>>>> = OnceLock::new();

/// The listening sockets corral passed this process (systemd socket activation), in the order
/// of the app's `--listen` addresses. The first call takes them; later calls return an empty
/// list. Empty when not run by corral in shared mode.
pub fn listeners() -> io::Result<Vec<Listener>> {
    let cell = LISTENERS.get_or_init(|| Mutex::new(None));
    let mut taken = cell.lock().unwrap_or_else(PoisonError::into_inner);
    if taken.is_some() {
        return Ok(Vec::new());
    }
    *taken = Some(Vec::new());
    let for_us = std::env::var(env::LISTEN_PID)
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = match std::env::var(env::LISTEN_FDS)
        .ok()
        .and_then(|n| n.parse().ok())
    {
        Some(n) if for_us => n,
        _ => return Ok(Vec::new()),
    };
    let mut found = Vec::new();
    for raw in 3..3 + count {
        let fd = corral_sys::fd::take_inherited_fd(raw)?;
        found.push(
            if corral_sys::fd::is_unix_socket(std::os::fd::AsFd::as_fd(&fd))? {
                Listener::Unix(UnixListener::from(fd))
            } else {
                Listener::Tcp(TcpListener::from(fd))
            },
        );
    }
    Ok(found)
}

/// The first TCP socket corral passed this process, or, when there is none (the program runs
/// on its own), a new one bound to `fallback`.
pub fn tcp_listener_or_bind(fallback: &str) -> io::Result<TcpListener> {
    let inherited = listeners()?.into_iter().find_map(|l| match l {
        Listener::Tcp(tcp) => Some(tcp),
        Listener::Unix(_) => None,
    });
    match inherited {
        Some(listener) => Ok(listener),
        None => TcpListener::bind(fallback),
    }
}

fn send_message(message: &WorkerMessage) -> io::Result<()> {
    match channel::get() {
        Some(channel) => channel.send(message),
        None => Ok(()),
    }
}

/// Tells corral this worker is ready for work (with `--wait-ready`, the only thing that makes
/// it ready). Does nothing outside corral.
pub fn ready() -> io::Result<()> {
    send_message(&WorkerMessage::Ready)
}

/// Tells corral this worker is about to exit: corral starts its replacement at once and lets
/// this one finish its open work (SIGKILL after the app's kill timeout).
pub fn going_down(reason: &str) -> io::Result<()> {
    send_message(&WorkerMessage::GoingDown {
        reason: reason.to_string(),
    })
}

/// Sends any JSON value to the master (it appears in the daemon's log).
pub fn send(data: serde_json::Value) -> io::Result<()> {
    send_message(&WorkerMessage::Message { data })
}

/// The next message the master sent this worker (`corral send <app> <json>`, or another worker
/// on the bus), waiting at most `timeout` (for ever with `None`); `None` when none came in time,
/// when the master is gone, or outside corral. With the `tokio` feature, [`tokio::message`]
/// waits without blocking. [`next_message`] also says who sent it.
pub fn message(timeout: Option<std::time::Duration>) -> Option<serde_json::Value> {
    next_message(timeout).map(|message| message.data)
}

/// As [`message`], with the sender: `worker:<id>` for a message on the bus, `cli` for
/// `corral send`. Requests (which expect an answer) come through [`Bus::next_request`] instead.
pub fn next_message(timeout: Option<std::time::Duration>) -> Option<Message> {
    let channel = channel::get()?;
    channel.listen();
    channel.message_blocking(timeout)
}

/// Makes a panic send a going-down notice (with the panic message) before the usual panic
/// output, so corral starts the replacement while this process unwinds.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let _ = going_down(&format!("panic: {info}"));
        previous(info);
    }));
}

#[cfg(test)]
mod tests {
    // Tests run outside corral (unless someone runs `cargo test` under corral, which these
    // tests would then see; they check only what holds either way for this process).

    #[test]
    fn outside_corral_everything_is_a_harmless_no_op() {
        if super::is_worker() {
            return;
        }
        assert_eq!(super::worker_id(), None);
        assert!(super::ready().is_ok());
        assert!(super::going_down("test").is_ok());
        assert!(super::send(serde_json::json!({"a": 1})).is_ok());
        assert!(super::listeners().unwrap().is_empty());
    }

    #[test]
    fn without_inherited_sockets_it_binds_the_fallback() {
        let listener = super::tcp_listener_or_bind("127.0.0.1:0").unwrap();
        assert!(listener.local_addr().unwrap().port() > 0);
    }
}
