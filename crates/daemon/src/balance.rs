//! Round robin through the channel (`--lb rr`, `--lb least-conn`): the master accepts each
//! connection and hands its descriptor to a ready worker in a `connection` frame on the worker's
//! channel. The master keeps its own copy until the worker says `accepted`; a connection that a
//! worker refuses, or that was sent to a worker whose channel closed before it said `accepted`
//! (it died), goes to another worker. A client never sees the difference.
//!
//! A [`Conduit`] is the master's end of one worker's channel, for writing (the reader is
//! [`crate::channel::read`]); a [`Balancer`] is an app's set of ready workers, which the
//! supervisor updates after every event.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    /// The balancer it came from, which takes it back when a worker does not take it.
    pub origin: Weak<Balancer>,
}

/// The language a channel speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// corral's frames (`docs/protocol.md`).
    Corral,
    /// Node.js's JSON lines and cluster protocol ([`crate::node`]).
    Node,
}

/// The master's end of one worker's channel.
#[derive(Debug)]
pub struct Conduit {
    pid: u32,
    codec: Codec,
    stream: UnixStream,
    state: Mutex<ConduitState>,
    /// Told when the worker took some of what waited for it, or its channel closed.
    room: Notify,
    /// Taken by whoever waits for room to write a large answer, one at a time, so that the
    /// writers woken together do not all write at once.
    turn: tokio::sync::Mutex<()>,
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
    /// Connection ids and, for Node, message sequence numbers.
    next: u64,
    /// Node: lines waiting for the handle in flight to be acknowledged.
    queue: VecDeque<Outgoing>,
    /// Node: the handles sent and not yet acknowledged, oldest first (answers come in order).
    in_flight: VecDeque<InFlight>,
    /// Node: a handle line went out in pieces: no other handle until every one is answered.
    wait_for_answers: bool,
}

/// A Node line waiting its turn.
#[derive(Debug)]
enum Outgoing {
    Line(Vec<u8>),
    /// A `newconn` line, sent with the descriptor of given connection `id`.
    Connection {
        line: Vec<u8>,
        id: u64,
    },
    /// A line sent with another descriptor (a shared listening socket).
    Handle {
        line: Vec<u8>,
        fd: OwnedFd,
    },
}

/// Node: lines waiting one behind the other are joined into one write up to this size.
const COALESCE_LINES_UP_TO: usize = 64 * 1024;

/// Node handles sent ahead of their answers, per worker.
const MAX_HANDLES_IN_FLIGHT: usize = 16;

/// What a Node handle in flight carries.
#[derive(Debug, Clone, Copy)]
enum InFlight {
    Connection(u64),
    Other,
}

impl Conduit {
    /// The conduit of process `pid`, writing on `stream` in `codec`.
    pub fn new(pid: u32, codec: Codec, stream: UnixStream) -> Arc<Conduit> {
        Arc::new(Conduit {
            pid,
            codec,
            stream,
            state: Mutex::default(),
            room: Notify::new(),
            turn: tokio::sync::Mutex::new(()),
        })
    }

    /// The worker's process.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The language of its channel.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The channel, for its reader.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    fn state(&self) -> MutexGuard<'_, ConduitState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes and lines written to the worker that its socket has not taken yet: how far behind
    /// in reading its channel it is.
    pub fn backlog(&self) -> usize {
        let state = self.state();
        let queued: usize = state
            .queue
            .iter()
            .map(|next| match next {
                Outgoing::Line(line)
                | Outgoing::Connection { line, .. }
                | Outgoing::Handle { line, .. } => line.len(),
            })
            .sum();
        state.unsent.len() + queued
    }

    /// Returns once at most `limit` bytes wait for the worker (or its channel closed).
    pub async fn room_for(&self, limit: usize) {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.is_closed() || self.backlog() <= limit {
                return;
            }
            room.await;
        }
    }

    /// [`room_for`](Self::room_for), for writers that take turns: held, the turn keeps the
    /// others waiting.
    pub async fn turn_with_room(&self, limit: usize) -> tokio::sync::MutexGuard<'_, ()> {
        let turn = self.turn.lock().await;
        self.room_for(limit).await;
        turn
    }

    /// Whether the channel is closed.
    pub fn is_closed(&self) -> bool {
        self.state().closed
    }

    /// Connections given and not closed, as far as the master knows.
    fn load(&self) -> usize {
        let state = self.state();
        state.given.len() + state.open
    }

    /// Connections handed over and not yet acknowledged: how far behind in taking them the
    /// worker is.
    fn unacknowledged(&self) -> usize {
        self.state().given.len()
    }

    /// Sends a corral message (no descriptors); queued behind anything unsent.
    pub fn send(self: &Arc<Self>, message: &MasterMessage) {
        let mut frame = Vec::new();
        if corral_proto::channel::append_master_message(&mut frame, message) {
            self.send_now(&frame);
        } else {
            crate::log!(
                "a message for pid {} was not sent: over the channel's frame limit of {} bytes",
                self.pid(),
                corral_proto::channel::MAX_CHANNEL_FRAME_LEN
            );
        }
    }

    /// Writes `bytes` behind whatever is unsent, not behind a Node handle in flight (for the
    /// answers to the worker's own handles, and corral frames).
    pub fn send_now(self: &Arc<Self>, bytes: &[u8]) {
        let mut state = self.state();
        if state.closed {
            return;
        }
        if !state.unsent.is_empty() {
            state.unsent.extend_from_slice(bytes);
            return;
        }
        match self.try_write(&mut state, bytes, None) {
            Ok(()) => {}
            // The socket is full: all of it waits for the flusher (nothing is dropped).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                state.unsent.extend_from_slice(bytes);
                self.ensure_flusher(&mut state);
            }
            // The worker's end is gone; its reader sees that too and calls `close`.
            Err(_) => state.closed = true,
        }
    }

    /// Node: sends a line in its turn (behind a handle in flight); `line` gets the sequence
    /// number to use.
    pub fn send_line(self: &Arc<Self>, line: impl FnOnce(u64) -> Vec<u8>) {
        let mut state = self.state();
        if state.closed {
            return;
        }
        state.next += 1;
        let bytes = line(state.next);
        state.queue.push_back(Outgoing::Line(bytes));
        self.pump(&mut state);
    }

    /// Node: sends lines that need no sequence number, in their turn, written together.
    pub fn send_lines(self: &Arc<Self>, lines: Vec<Vec<u8>>) {
        let mut state = self.state();
        if state.closed {
            return;
        }
        state.queue.extend(lines.into_iter().map(Outgoing::Line));
        self.pump(&mut state);
    }

    /// Node: sends a line with descriptor `fd` attached, in its turn.
    pub fn send_handle(self: &Arc<Self>, line: impl FnOnce(u64) -> Vec<u8>, fd: OwnedFd) {
        let mut state = self.state();
        if state.closed {
            return;
        }
        state.next += 1;
        let line = line(state.next);
        state.queue.push_back(Outgoing::Handle { line, fd });
        self.pump(&mut state);
    }

    /// Hands `connection` to the worker, or gives it back when the worker cannot take it now (its
    /// channel is closed or full). `key` is the Node server it is for.
    fn give(self: &Arc<Self>, connection: Connection, key: Option<&str>) -> Result<(), Connection> {
        let mut state = self.state();
        if state.closed {
            return Err(connection);
        }
        state.next += 1;
        let id = state.next;
        if self.codec == Codec::Node {
            // Queued behind the handle in flight, as Node's own primary does.
            let line = crate::node::newconn(key.unwrap_or_default(), id);
            state.given.insert(id, connection);
            state.queue.push_back(Outgoing::Connection { line, id });
            self.pump(&mut state);
            return Ok(());
        }
        if !state.unsent.is_empty() {
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

    /// Node: writes queued lines until the socket is full, too many handles wait for their
    /// answer, or none is left.
    ///
    /// Handles are pipelined, unlike Node's own primary, which waits for each `NODE_HANDLE_ACK`:
    /// a line that carries a descriptor is written whole by one `sendmsg`, and a Unix stream
    /// socket's `recvmsg` ends right after the bytes that carried descriptors, so each of Node's
    /// reads brings at most one descriptor, with the line it belongs to. If such a line goes out
    /// in pieces, handles wait until every one sent is answered, as Node does.
    fn pump(self: &Arc<Self>, state: &mut ConduitState) {
        while state.unsent.is_empty() && !state.closed {
            let Some(next) = state.queue.front() else {
                return;
            };
            let handle = !matches!(next, Outgoing::Line(_));
            if handle && (state.wait_for_answers || state.in_flight.len() >= MAX_HANDLES_IN_FLIGHT)
            {
                return;
            }
            let mut next = state.queue.pop_front().expect("looked at above");
            self.room.notify_waiters();
            if let Outgoing::Line(line) = &mut next {
                // Lines waiting together go in one write.
                while line.len() < COALESCE_LINES_UP_TO
                    && let Some(Outgoing::Line(more)) = state.queue.front()
                {
                    line.extend_from_slice(more);
                    state.queue.pop_front();
                }
            }
            let written = match &next {
                Outgoing::Line(line) => self.send_bytes(line, None).map(|n| (n, line)),
                Outgoing::Handle { line, fd } => {
                    self.send_bytes(line, Some(fd.as_fd())).map(|n| (n, line))
                }
                Outgoing::Connection { line, id } => {
                    let Some(connection) = state.given.get(id) else {
                        // Gone back to the balancer meanwhile.
                        continue;
                    };
                    self.send_bytes(line, Some(connection.fd.as_fd()))
                        .map(|n| (n, line))
                }
            };
            match written {
                Ok((n, line)) => {
                    if n < line.len() {
                        state.unsent.extend_from_slice(&line[n..]);
                        state.wait_for_answers |= handle;
                        self.ensure_flusher(state);
                    }
                    match next {
                        Outgoing::Connection { id, .. } => {
                            state.in_flight.push_back(InFlight::Connection(id));
                        }
                        Outgoing::Handle { .. } => state.in_flight.push_back(InFlight::Other),
                        Outgoing::Line(_) => {}
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    state.queue.push_front(next);
                    self.ensure_flusher(state);
                    return;
                }
                Err(_) => {
                    state.closed = true;
                    return;
                }
            }
        }
    }

    /// One `sendmsg` of `bytes`, with `fd` on the first byte: how many bytes went.
    fn send_bytes(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<usize> {
        let fds = fd.as_slice();
        self.stream.try_io(Interest::WRITABLE, || {
            corral_sys::fd::send_with_fds(self.stream.as_fd(), bytes, fds)
        })
    }

    /// Writes `bytes` (with `fd` on the first byte), keeping what the socket did not take.
    fn try_write(
        self: &Arc<Self>,
        state: &mut ConduitState,
        bytes: &[u8],
        fd: Option<&OwnedFd>,
    ) -> io::Result<()> {
        let n = self.send_bytes(bytes, fd.map(AsFd::as_fd))?;
        if n < bytes.len() {
            state.unsent.extend_from_slice(&bytes[n..]);
            self.ensure_flusher(state);
        }
        Ok(())
    }

    fn ensure_flusher(self: &Arc<Self>, state: &mut ConduitState) {
        if !state.flushing {
            state.flushing = true;
            tokio::spawn(self.clone().flush());
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
        match self.try_write(state, frame, connection.map(|c| &c.fd)) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(_) => {
                // The worker's end is gone; its reader sees that too and calls `close`.
                state.closed = true;
                false
            }
        }
    }

    /// Writes the unsent bytes, then the queued lines, as the socket takes them.
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
                    self.room.notify_waiters();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(_) => {
                    state.closed = true;
                    break;
                }
            }
            if state.unsent.is_empty() {
                state.flushing = false;
                self.pump(&mut state);
                if !state.flushing {
                    return;
                }
                // `pump` met a full socket and counts on this task: keep going.
            }
        }
        self.state().flushing = false;
    }

    /// Node: the worker answered the handle in flight: `received` or not. A connection that did
    /// not arrive goes to another worker.
    pub fn handle_answered(self: &Arc<Self>, received: bool) {
        let mut state = self.state();
        let answered = state.in_flight.pop_front();
        if state.in_flight.is_empty() {
            state.wait_for_answers = false;
        }
        let lost = match answered {
            Some(InFlight::Connection(id)) if !received => state.given.remove(&id),
            _ => None,
        };
        self.pump(&mut state);
        drop(state);
        if let Some(connection) = lost {
            self.give_back(vec![connection]);
        }
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
            state.queue.clear();
            state.in_flight.clear();
            state.given.drain().map(|(_, c)| c).collect()
        };
        self.room.notify_waiters();
        if !unaccepted.is_empty() {
            self.give_back(unaccepted);
        }
    }

    /// Connections this worker did not take go back to where they came from.
    fn give_back(&self, connections: Vec<Connection>) {
        for connection in connections {
            if let Some(balancer) = connection.origin.upgrade() {
                balancer.dispatch(connection, Some(self.pid));
            }
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
    /// For a Node server: its key, named in every `newconn`.
    key: Option<String>,
    changed: Notify,
    dropped: Mutex<DropLog>,
}

#[derive(Debug, Default)]
struct DropLog {
    count: u64,
    logged: Option<Instant>,
}

impl Balancer {
    /// The balancer of app `app`: round robin, or to the least loaded worker; `key` names the
    /// Node server it serves.
    pub fn new(app: &str, least_conn: bool, key: Option<String>) -> Arc<Balancer> {
        Arc::new(Balancer {
            app: app.to_string(),
            least_conn,
            workers: Mutex::default(),
            next: AtomicUsize::new(0),
            key,
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

    /// Accepts on `listeners` and hands every connection out; the handles stop the loops.
    pub fn serve(
        self: &Arc<Self>,
        app: &str,
        listeners: &[crate::listeners::Listener],
    ) -> Vec<tokio::task::AbortHandle> {
        let balancer = self.clone();
        crate::accept::serve(app, listeners, move |fd, listener| {
            let origin = Arc::downgrade(&balancer);
            balancer.dispatch(
                Connection {
                    fd,
                    listener,
                    origin,
                },
                None,
            );
        })
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
        } else if self.key.is_some() {
            // Node workers: round robin among those that have taken every connection given so
            // far, as Node's own primary gives only to a worker that acknowledged its last one. A
            // worker that stalls (a long request, garbage collection) is passed over instead of
            // having connections pile up behind it while the others wait.
            (0..count)
                .map(|k| (start + k) % count)
                .min_by_key(|&n| workers[n].unacknowledged())
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
            match worker.give(connection, self.key.as_deref()) {
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

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdStream;

    use corral_proto::channel::WorkerMessage;
    use tokio::sync::mpsc;

    use super::*;

    /// A worker's end of its channel, read and written by the test (blocking, on its thread).
    struct FakeWorker {
        end: StdStream,
    }

    impl FakeWorker {
        /// The next `connection` frame and its descriptor.
        fn take(&mut self) -> (u64, OwnedFd) {
            let mut head = [0u8; 4];
            let mut fds = Vec::new();
            let n = corral_sys::fd::recv_with_fds(self.end.as_fd(), &mut head, &mut fds).unwrap();
            assert_eq!(n, 4, "a frame starts with its length");
            let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
            self.end.read_exact(&mut body).unwrap();
            let message: MasterMessage = serde_json::from_slice(&body).unwrap();
            let MasterMessage::Connection { id, .. } = message else {
                panic!("expected a connection, got {message:?}");
            };
            (id, fds.pop().expect("a descriptor with the frame"))
        }

        fn say(&mut self, message: &WorkerMessage) {
            self.end
                .write_all(&corral_proto::frame::encode(message).unwrap())
                .unwrap();
        }
    }

    /// A worker's channel, as the master has it once the worker is ready: registered, and seen
    /// writable by the runtime (a conduit writes only when the runtime knows it can).
    async fn worker(pid: u32, balancer: &Arc<Balancer>) -> (Arc<Conduit>, FakeWorker) {
        let (master, end) = StdStream::pair().unwrap();
        let stream = crate::channel::open(OwnedFd::from(master)).unwrap();
        stream.writable().await.unwrap();
        // A test waiting for a frame that went elsewhere fails instead of hanging.
        end.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = balancer;
        let conduit = Conduit::new(pid, Codec::Corral, stream);
        let (events, _) = mpsc::unbounded_channel();
        let bus = crate::bus::Bus::new(std::env::temp_dir().join("corral-balance-test-state.json"));
        tokio::spawn(crate::channel::read(conduit.clone(), events, bus));
        (conduit, FakeWorker { end })
    }

    /// A connection whose client end the test keeps, to check which worker got it.
    fn connection(balancer: &Arc<Balancer>) -> (Connection, StdStream) {
        let (client, server) = StdStream::pair().unwrap();
        let connection = Connection {
            fd: OwnedFd::from(server),
            listener: 0,
            origin: Arc::downgrade(balancer),
        };
        (connection, client)
    }

    /// Runs `f` on a thread of its own while the runtime serves the conduits.
    async fn off_runtime<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        tokio::task::spawn_blocking(f).await.unwrap()
    }

    /// Proves that `fd` is the server end of `client`.
    fn same_connection(fd: OwnedFd, client: &mut StdStream) {
        let mut server = StdStream::from(fd);
        server.write_all(b"x").unwrap();
        let mut got = [0u8; 1];
        client.read_exact(&mut got).unwrap();
    }

    #[tokio::test]
    async fn round_robin_then_a_refused_connection_goes_to_the_other_worker() {
        let balancer = Balancer::new("test", false, None);
        let (a, mut wa) = worker(1, &balancer).await;
        let (b, mut wb) = worker(2, &balancer).await;
        balancer.set(vec![a, b]);
        let (first, mut c1) = connection(&balancer);
        let (second, mut c2) = connection(&balancer);
        balancer.dispatch(first, None);
        balancer.dispatch(second, None);
        let (wa, wb) = off_runtime(move || {
            let (id, fd) = wa.take();
            same_connection(fd, &mut c1);
            wa.say(&WorkerMessage::Accepted { id });
            let (id, _) = wb.take();
            // B gives it back: A gets it.
            wb.say(&WorkerMessage::Refused { id });
            let (id, fd) = wa.take();
            same_connection(fd, &mut c2);
            wa.say(&WorkerMessage::Accepted { id });
            (wa, wb)
        })
        .await;
        drop((wa, wb));
    }

    #[tokio::test]
    async fn a_worker_that_dies_before_accepting_leaves_its_connection_to_another() {
        let balancer = Balancer::new("test", false, None);
        let (a, mut wa) = worker(1, &balancer).await;
        let (b, mut wb) = worker(2, &balancer).await;
        balancer.set(vec![a, b]);
        let (first, mut c1) = connection(&balancer);
        balancer.dispatch(first, None);
        let wb = off_runtime(move || {
            let (_, fd) = wa.take();
            // A dies with the connection unanswered: its end of the channel closes.
            drop((fd, wa));
            let (id, fd) = wb.take();
            same_connection(fd, &mut c1);
            wb.say(&WorkerMessage::Accepted { id });
            wb
        })
        .await;
        drop(wb);
    }

    #[tokio::test]
    async fn least_conn_picks_the_worker_with_fewer_open_connections() {
        let balancer = Balancer::new("test", true, None);
        let (a, mut wa) = worker(1, &balancer).await;
        let (b, mut wb) = worker(2, &balancer).await;
        balancer.set(vec![a.clone(), b.clone()]);
        // A holds one connection open; B closed its own.
        let (first, _c1) = connection(&balancer);
        balancer.dispatch(first, None);
        let (second, _c2) = connection(&balancer);
        balancer.dispatch(second, None);
        let (wa, wb) = off_runtime(move || {
            let (id, _fd) = wa.take();
            wa.say(&WorkerMessage::Accepted { id });
            let (id, _) = wb.take();
            wb.say(&WorkerMessage::Accepted { id });
            wb.say(&WorkerMessage::Closed { id });
            (wa, wb)
        })
        .await;
        // Wait (bounded) until the master has read those answers.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while (a.load(), b.load()) != (1, 0) {
            assert!(tokio::time::Instant::now() < deadline, "answers never read");
            tokio::task::yield_now().await;
        }
        let (next, _c3) = connection(&balancer);
        balancer.dispatch(next, None);
        let (mut wa, mut wb) = (wa, wb);
        off_runtime(move || {
            let (id, _) = wb.take();
            wb.say(&WorkerMessage::Accepted { id });
            drop(wa.end.set_nonblocking(true));
            let mut probe = [0u8; 1];
            assert!(
                wa.end.read(&mut probe).is_err(),
                "the busier worker got nothing"
            );
        })
        .await;
    }
}
