//! Proxy mode (`--lb proxy`), for programs that only know `PORT`: each worker listens on its own
//! loopback port, and the master accepts on the app's addresses and relays the bytes of each
//! connection to the next ready worker, round robin. It costs two descriptors per connection
//! (the seed's first model); shared mode and, later, round robin through the channel avoid that.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::listeners::Listener;

/// How long a connection waits for a ready worker before it is closed.
const WAIT_FOR_WORKER: Duration = Duration::from_secs(5);
/// How long connecting to a worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between two refused connects for one client, at most: workers may be slow to listen.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How often a new worker's port is tried until it accepts.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// The ready workers of one app, as the supervisor last saw them.
#[derive(Debug, Default)]
pub struct Router {
    backends: Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
    changed: Notify,
    /// Connections being relayed, per worker: a retired worker is signaled once its count is 0.
    open: Mutex<std::collections::HashMap<SocketAddr, usize>>,
}

impl Router {
    /// Replaces the list of ready workers.
    pub fn set(&self, backends: Vec<SocketAddr>) {
        let mut current = self.backends.lock().unwrap_or_else(PoisonError::into_inner);
        if *current != backends {
            *current = backends;
            drop(current);
            self.changed.notify_waiters();
        }
    }

    /// How many connections are being relayed to `backend` now.
    pub fn open_to(&self, backend: SocketAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.get(&backend).copied().unwrap_or(0)
    }

    fn opened(&self, backend: SocketAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        *open.entry(backend).or_insert(0) += 1;
    }

    fn closed(&self, backend: SocketAddr) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&backend) {
            *count -= 1;
            if *count == 0 {
                open.remove(&backend);
            }
        }
    }

    /// The next worker, round robin.
    pub fn pick(&self) -> Option<SocketAddr> {
        let backends = self.backends.lock().unwrap_or_else(PoisonError::into_inner);
        if backends.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(backends[n % backends.len()])
    }
}

/// Starts one accept loop per listener; the handles stop them.
pub fn serve(app: &str, listeners: &[Listener], router: &Arc<Router>) -> Vec<AbortHandle> {
    let unix: Arc<Vec<bool>> = Arc::new(
        listeners
            .iter()
            .map(|l| corral_sys::fd::is_unix_socket(l.fd.as_fd()).unwrap_or(false))
            .collect(),
    );
    let router = router.clone();
    crate::accept::serve(app, listeners, move |fd, index| {
        let router = router.clone();
        if unix[index as usize] {
            let client = std::os::unix::net::UnixStream::from(fd);
            if let Ok(client) = tokio::net::UnixStream::from_std(client) {
                tokio::spawn(relay(client, router));
            }
        } else if let Ok(client) = TcpStream::from_std(std::net::TcpStream::from(fd)) {
            let _ = client.set_nodelay(true);
            tokio::spawn(relay(client, router));
        }
    })
}

/// Relays one client connection to a ready worker, trying another when one refuses.
async fn relay<S: AsyncRead + AsyncWrite + Unpin>(mut client: S, router: Arc<Router>) {
    let deadline = tokio::time::Instant::now() + WAIT_FOR_WORKER;
    let mut tries: u32 = 0;
    loop {
        let Some(backend) = router.pick() else {
            // No worker is ready (all starting, or restarting): wait for one, for a while.
            let changed = router.changed.notified();
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return;
            }
            continue;
        };
        if let Ok(Ok(mut worker)) =
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await
        {
            let _ = worker.set_nodelay(true);
            router.opened(backend);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut worker).await;
            router.closed(backend);
            return;
        }
        // That worker is gone or not listening yet: the next one, pausing a little more after
        // each refusal, until the deadline (the client's request waits unread meanwhile).
        tries += 1;
        let pause = (RETRY_PAUSE / 10 * tries).min(RETRY_PAUSE);
        if tokio::time::Instant::now() + pause >= deadline {
            return;
        }
        tokio::time::sleep(pause).await;
    }
}

/// Tells the supervisor that process `pid` is ready once its `port` accepts a connection; gives
/// up after `limit` (the supervisor's listen timeout then ends the process).
pub async fn probe(
    port: u16,
    pid: u32,
    limit: Duration,
    events: tokio::sync::mpsc::UnboundedSender<crate::inbox::Event>,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            let message = corral_proto::channel::WorkerMessage::Ready;
            let _ = events.send(crate::inbox::Event::Worker { pid, message });
            return;
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// A retired worker's drain: once no connection is relayed to its `port` any more (or after
/// `limit`), `done` is sent, so that it gets its stop signal with nothing in flight.
pub async fn drained(
    router: Arc<Router>,
    port: u16,
    limit: Duration,
    done: crate::inbox::Event,
    events: tokio::sync::mpsc::UnboundedSender<crate::inbox::Event>,
) {
    let backend = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = tokio::time::Instant::now() + limit;
    while router.open_to(backend) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
    let _ = events.send(done);
}

/// A free loopback port for a worker, chosen by the kernel.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_round_robin_over_the_current_workers() {
        let router = Router::default();
        assert_eq!(router.pick(), None);
        let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2".parse().unwrap();
        router.set(vec![a, b]);
        let picks: Vec<_> = (0..4).map(|_| router.pick().unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&p| p == a).count(), 2);
        assert_eq!(picks.iter().filter(|&&p| p == b).count(), 2);
        router.set(vec![b]);
        assert_eq!(router.pick(), Some(b));
    }
}
