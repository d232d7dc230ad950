//! Round robin through the channel (`--lb rr`, `--lb least-conn`): the master accepts each
//! connection and hands its descriptor to a ready worker in a `connection` frame on the worker's
//! channel. The master keeps its own copy until the worker says `accepted`; a connection that a
//! worker refuses, or that was sent to a worker whose channel closed before it said `accepted`
//! (it died), goes to another worker. A client never sees the difference.
//!
//! A [`Conduit`] is the master's end of one worker's channel, for writing (the reader is
//! [`crate::channel::read`]); a [`Balancer`] is an app's set of ready workers, which the
//! supervisor updates after every event.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use corral_proto::channel::MasterMessage;
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::Notify;

/// How long a connection waits for a worker to take it before the master closes it.
const WAIT_FOR_WORKER: Duration = Duration::from_secs(5);
/// Pause between two tries to hand over a connection that no worker could take at once.
const RETRY_PAUSE: Duration = Duration::from_millis(10);
/// Dropped connections are logged at most this often, with their count.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// A client connection on its way to a worker.
#[derive(Debug)]
pub struct Connection {
    /// The accepted socket.
    pub fd: OwnedFd,
    /// Index of the listener that accepted it.
    pub listener: u32,
}

/// The master's end of one worker's channel.
#[derive(Debug)]
pub struct Conduit {
    pid: u32,
    stream: UnixStream,
    state: Mutex<ConduitState>,
    balancer: Option<Weak<Balancer>>,
}

#[derive(Debug, Default)]
struct ConduitState {
    /// The channel is closed (the worker died or broke the protocol): nothing more goes to it.
    closed: bool,
    /// The rest of a frame the socket did not take at once; written before anything else.
    unsent: Vec<u8>,
    flushing: bool,
    /// Connections sent and not yet accepted: the master's copies.
    given: HashMap<u64, Connection>,
    /// Connections accepted and not reported closed.
    open: usize,
}

impl Conduit {
    /// The conduit of process `pid`, writing on `stream`; `balancer` takes back the connections
    /// it refuses or leaves unaccepted.
    pub fn new(pid: u32, stream: UnixStream, balancer: Option<&Arc<Balancer>>) -> Arc<Conduit> {
        Arc::new(Conduit {
            pid,
            stream,
            state: Mutex::default(),
            balancer: balancer.map(Arc::downgrade),
        })
    }

    /// The worker's process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The channel, for its reader.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn state(&self) -> MutexGuard<'_, ConduitState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Connections given and not closed, as far as the master knows.
    fn load(&self) -> usize {
        let state = self.state();
        state.given.len() + state.open
    }

    /// Sends `message` (no descriptors); queued behind anything unsent.
    pub fn send(self: &Arc<Self>, message: &MasterMessage) {
        let Ok(frame) = corral_proto::frame::encode(message) else {
            return;
        };
        let mut state = self.state();
        if state.closed {
            return;
        }
        if !state.unsent.is_empty() {
            state.unsent.extend_from_slice(&frame);
            return;
        }
        self.write(&mut state, &frame, None);
    }

    /// Hands `connection` to the worker, or gives it back when the worker cannot take it now (its
    /// channel is closed or full).
    fn give(self: &Arc<Self>, id: u64, connection: Connection) -> Result<(), Connection> {
        let mut state = self.state();
        if state.closed || !state.unsent.is_empty() {
            return Err(connection);
        }
        let message = MasterMessage::Connection {
            id,
            listener: connection.listener,
        };
        let Ok(frame) = corral_proto::frame::encode(&message) else {
            return Err(connection);
        };
        if self.write(&mut state, &frame, Some(&connection)) {
            state.given.insert(id, connection);
            Ok(())
        } else {
            Err(connection)
        }
    }

    /// Writes `frame` (with the descriptor of `connection` on its first byte); keeps what the
    /// socket did not take for a flusher task. False when nothing was written.
    fn write(
        self: &Arc<Self>,
        state: &mut ConduitState,
        frame: &[u8],
        connection: Option<&Connection>,
    ) -> bool {
        let fds: Vec<_> = connection.iter().map(|c| c.fd.as_fd()).collect();
        let written = self.stream.try_io(Interest::WRITABLE, || {
            corral_sys::fd::send_with_fds(self.stream.as_fd(), frame, &fds)
        });
        match written {
            Ok(n) => {
                if n < frame.len() {
                    state.unsent.extend_from_slice(&frame[n..]);
                    if !state.flushing {
                        state.flushing = true;
                        tokio::spawn(self.clone().flush());
                    }
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => {
                // The worker's end is gone; its reader sees that too and calls `close`.
                state.closed = true;
                false
            }
        }
    }

    /// Writes the unsent bytes as the socket takes them.
    async fn flush(self: Arc<Self>) {
        loop {
            if self.stream.writable().await.is_err() {
                break;
            }
            let mut state = self.state();
            if state.closed {
                break;
            }
            let written = self.stream.try_io(Interest::WRITABLE, || {
                rustix::net::send(
                    &self.stream,
                    &state.unsent,
                    rustix::net::SendFlags::NOSIGNAL,
                )
                .map_err(io::Error::from)
            });
            match written {
                Ok(n) => {
                    state.unsent.drain(..n);
                    if state.unsent.is_empty() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    state.closed = true;
                    break;
                }
            }
        }
        self.state().flushing = false;
    }

    /// The worker took connection `id`: the master's copy closes. False if it was not given.
    pub fn accepted(&self, id: u64) -> bool {
        let mut state = self.state();
        if state.given.remove(&id).is_none() {
            return false;
        }
        state.open += 1;
        true
    }

    /// The worker refused connection `id`: another worker gets it. False if it was not given.
    pub fn refused(&self, id: u64) -> bool {
        let Some(connection) = self.state().given.remove(&id) else {
            return false;
        };
        self.give_back(vec![connection]);
        true
    }

    /// The worker closed one of its connections.
    pub fn closed(&self) {
        let mut state = self.state();
        state.open = state.open.saturating_sub(1);
    }

    /// The channel closed: nothing more goes to this worker, and the connections it had not
    /// accepted go to the others.
    pub fn close(&self) {
        let unaccepted: Vec<Connection> = {
            let mut state = self.state();
            state.closed = true;
            state.unsent.clear();
            state.given.drain().map(|(_, c)| c).collect()
        };
        if !unaccepted.is_empty() {
            self.give_back(unaccepted);
        }
    }

    fn give_back(&self, connections: Vec<Connection>) {
        let Some(balancer) = self.balancer.as_ref().and_then(Weak::upgrade) else {
            return;
        };
        for connection in connections {
            balancer.dispatch(connection, Some(self.pid));
        }
    }
}

/// An app's ready workers, and the hand-over of its connections to them.
#[derive(Debug)]
pub struct Balancer {
    app: String,
    least_conn: bool,
    workers: Mutex<Vec<Arc<Conduit>>>,
    next: AtomicUsize,
    ids: AtomicU64,
    changed: Notify,
    dropped: Mutex<DropLog>,
}

#[derive(Debug, Default)]
struct DropLog {
    count: u64,
    logged: Option<Instant>,
}

impl Balancer {
    /// The balancer of app `app`: round robin, or to the least loaded worker.
    pub fn new(app: &str, least_conn: bool) -> Arc<Balancer> {
        Arc::new(Balancer {
            app: app.to_string(),
            least_conn,
            workers: Mutex::default(),
            next: AtomicUsize::new(0),
            ids: AtomicU64::new(0),
            changed: Notify::new(),
            dropped: Mutex::default(),
        })
    }

    fn workers(&self) -> MutexGuard<'_, Vec<Arc<Conduit>>> {
        self.workers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces the set of ready workers.
    pub fn set(&self, workers: Vec<Arc<Conduit>>) {
        let mut current = self.workers();
        let same = current.len() == workers.len()
            && current.iter().zip(&workers).all(|(a, b)| a.pid == b.pid);
        if !same {
            *current = workers;
            drop(current);
            self.changed.notify_waiters();
        }
    }

    /// Hands `connection` to a ready worker other than `except`, now or, when none can take it
    /// now, as soon as one can (for a while).
    pub fn dispatch(self: &Arc<Self>, connection: Connection, except: Option<u32>) {
        if let Err(connection) = self.try_dispatch(connection, except) {
            tokio::spawn(self.clone().dispatch_later(connection, except));
        }
    }

    fn try_dispatch(&self, connection: Connection, except: Option<u32>) -> Result<(), Connection> {
        let workers = self.workers();
        let count = workers.len();
        if count == 0 {
            return Err(connection);
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let first = if self.least_conn {
            // The least loaded; among equals, the next in round robin order.
            (0..count)
                .map(|k| (start + k) % count)
                .min_by_key(|&n| workers[n].load())
                .unwrap_or(start)
        } else {
            start
        };
        let others = (0..count)
            .map(|k| (start + k) % count)
            .filter(|&n| n != first);
        let mut connection = connection;
        for n in std::iter::once(first).chain(others) {
            let worker = &workers[n];
            if Some(worker.pid) == except {
                continue;
            }
            let id = self.ids.fetch_add(1, Ordering::Relaxed);
            match worker.give(id, connection) {
                Ok(()) => return Ok(()),
                Err(back) => connection = back,
            }
        }
        Err(connection)
    }

    async fn dispatch_later(self: Arc<Self>, connection: Connection, except: Option<u32>) {
        let deadline = tokio::time::Instant::now() + WAIT_FOR_WORKER;
        let mut connection = connection;
        loop {
            let changed = self.changed.notified();
            let pause = tokio::time::sleep(RETRY_PAUSE);
            tokio::select! {
                () = changed => {}
                () = pause => {}
                () = tokio::time::sleep_until(deadline) => {
                    self.dropped(connection);
                    return;
                }
            }
            match self.try_dispatch(connection, except) {
                Ok(()) => return,
                Err(back) => connection = back,
            }
        }
    }

    /// No worker took `connection` in time: it closes, and the log says so (at most once a
    /// second, with a count).
    fn dropped(&self, connection: Connection) {
        drop(connection);
        let mut log = self.dropped.lock().unwrap_or_else(PoisonError::into_inner);
        log.count += 1;
        if log
            .logged
            .is_none_or(|at| at.elapsed() >= DROP_LOG_INTERVAL)
        {
            crate::log!(
                "app '{}': closed {} connection(s) that no ready worker took within {}s; \
                 `corral ls` shows the workers' state",
                self.app,
                log.count,
                WAIT_FOR_WORKER.as_secs()
            );
            log.count = 0;
            log.logged = Some(Instant::now());
        }
    }
}
