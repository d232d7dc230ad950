//! The master's accept loops, for the modes in which it takes the connections itself (`rr`,
//! `least-conn`, `proxy`): one task per listening socket, handing each accepted descriptor to a
//! callback. The descriptors are non-blocking and close-on-exec, and never registered with the
//! runtime here: in `rr` mode they only pass through the master on their way to a worker.
//!
//! Running out of descriptors (EMFILE, ENFILE) or memory does not make the loop spin: it logs
//! once, pauses, and tries again, while the kernel keeps the clients waiting in the backlog; it
//! logs again when accepting works again.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::net::SocketFlags;
use tokio::io::unix::AsyncFd;
use tokio::task::AbortHandle;

use crate::listeners::Listener;

/// Pause after an accept error, so the loop never spins.
const PAUSE: Duration = Duration::from_millis(100);
/// Connections accepted in a row before the loop lets other tasks run.
const BATCH: usize = 64;

/// Starts one accept loop per listener; `on_connection` gets each connection and the index of
/// its listener. The handles stop the loops.
pub fn serve<F>(app: &str, listeners: &[Listener], on_connection: F) -> Vec<AbortHandle>
where
    F: Fn(OwnedFd, u32) + Clone + Send + 'static,
{
    let mut handles = Vec::new();
    for (index, listener) in listeners.iter().enumerate() {
        let watched = listener.fd.try_clone().and_then(|fd| {
            rustix::io::ioctl_fionbio(&fd, true)?;
            corral_sys::fd::watch(fd).map_err(|(_, e)| e)
        });
        match watched {
            Ok(fd) => {
                let (app, on_connection) = (app.to_string(), on_connection.clone());
                let index = index as u32;
                let open = listener.open.clone();
                let task = tokio::spawn(accept_loop(fd, app, index, open, on_connection));
                handles.push(task.abort_handle());
            }
            Err(e) => crate::log!("app '{app}': cannot accept on {}: {e}", listener.resolved),
        }
    }
    handles
}

async fn accept_loop<F>(
    listener: AsyncFd<OwnedFd>,
    app: String,
    index: u32,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    on_connection: F,
) where
    F: Fn(OwnedFd, u32),
{
    let mut failures: u64 = 0;
    loop {
        let mut ready = match listener.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                crate::log!("app '{app}': cannot wait for connections: {e}; no longer accepting");
                return;
            }
        };
        for _ in 0..BATCH {
            let accepted = ready.try_io(|fd| {
                rustix::net::accept_with(fd.as_fd(), SocketFlags::NONBLOCK | SocketFlags::CLOEXEC)
                    .map_err(io::Error::from)
            });
            match accepted {
                Ok(Ok(connection)) => {
                    if failures > 0 {
                        crate::log!(
                            "app '{app}': accepting connections again, after {failures} failed attempt(s)"
                        );
                        failures = 0;
                    }
                    if open.load(std::sync::atomic::Ordering::Relaxed) {
                        on_connection(connection, index);
                    } else {
                        refuse(connection);
                    }
                }
                Ok(Err(e)) if transient(&e) => {}
                Ok(Err(e)) => {
                    if failures == 0 {
                        crate::log!(
                            "app '{app}': accepting a connection failed ({e}); pausing accepts \
                             (waiting clients stay in the backlog), trying again every {}ms",
                            PAUSE.as_millis()
                        );
                    }
                    failures += 1;
                    drop(ready);
                    tokio::time::sleep(PAUSE).await;
                    break;
                }
                // Nothing more to accept: wait for readiness again.
                Err(_) => break,
            }
        }
        tokio::task::yield_now().await;
    }
}

/// Ends a connection at once with a reset, as a closed port would refuse it: the app is
/// stopped, and a client should learn it now, not after waiting for a worker.
fn refuse(connection: OwnedFd) {
    let _ = rustix::net::sockopt::set_socket_linger(&connection, Some(Duration::ZERO));
    drop(connection);
}

/// Errors about one connection (the client gave up before it was accepted), not the socket.
fn transient(e: &io::Error) -> bool {
    use rustix::io::Errno;
    matches!(
        Errno::from_io_error(e),
        Some(Errno::CONNABORTED | Errno::INTR | Errno::PROTO)
    )
}
