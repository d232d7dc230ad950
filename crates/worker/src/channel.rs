//! The worker's end of its channel to the master: frames out under a lock, and a reader thread
//! (started on first need) that queues the connections the master hands over, notes when it
//! asks this worker to shut down, queues bus messages and requests, hands the answers to calls
//! ([`calls`]) to their waiters and published messages to their subscriptions ([`feeds`]).
//! Works with any runtime, or none: waiting is a condition variable for blocking callers and a
//! waker for async ones.

pub(crate) mod calls;
pub(crate) mod feeds;

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use corral_proto::channel::{MAX_CHANNEL_FRAME_LEN, MasterMessage, WorkerMessage};
use corral_proto::env;

use crate::bus::Message;
use crate::state::Published;
use calls::{CallError, Kind, Pending};
use feeds::Feed;

/// A connection the master handed over, not yet taken by the program.
#[derive(Debug)]
pub(crate) struct Handed {
    pub id: u64,
    pub listener: u32,
    pub fd: OwnedFd,
}

#[derive(Debug, Default)]
struct Inbox {
    connections: VecDeque<Handed>,
    /// The master asked this worker to stop, or the program began its own shutdown: connections
    /// still coming are refused, so the master gives them to another worker.
    shutdown: bool,
    /// The master's end closed (it is gone): no more connections will come.
    closed: bool,
    /// The one async consumer waiting for a connection (the latest poll's waker).
    connection_waker: Option<Waker>,
    /// Messages from the master (`corral send`, the bus), oldest first, at most
    /// [`MAX_MESSAGES`].
    messages: VecDeque<Message>,
    message_waker: Option<Waker>,
    /// Requests on the bus, not yet taken by the program, at most [`MAX_MESSAGES`].
    requests: VecDeque<Asked>,
    request_waker: Option<Waker>,
}

/// A request on the bus as it came: the program answers it with [`Channel::reply`].
#[derive(Debug)]
pub(crate) struct Asked {
    pub number: u64,
    pub from: String,
    pub data: serde_json::Value,
}

#[derive(Debug)]
pub(crate) struct Channel {
    /// The worker's end, written by every thread (see [`Channel::write_all`]).
    stream: UnixStream,
    /// What is being written.
    out: Mutex<Out>,
    /// The reader's copy of the end, until reading starts.
    reader: Mutex<Option<UnixStream>>,
    /// What was read and not yet made into messages, for whoever reads: the reader, and a
    /// writer waiting for room while the reader is a task it may keep from running.
    frames: Mutex<Frames>,
    /// The reader is a task of a runtime, which a writer waiting for room on that runtime's
    /// thread would keep from running: such a writer reads meanwhile.
    reads_on_runtime: AtomicBool,
    started: Once,
    inbox: Mutex<Inbox>,
    changed: Condvar,
    /// Report closed connections (least-conn mode counts them).
    pub report_closes: bool,
    /// Write key/value calls in state batch frames (the master takes them).
    pub batches: bool,
    /// Whether a shutdown began, for any number of async waiters.
    #[cfg(feature = "tokio")]
    shutdown_signal: ::tokio::sync::watch::Sender<bool>,
    /// The number of the next call (bus sends and state calls alike).
    next_id: AtomicU64,
    /// The calls waiting for an answer.
    pending: Mutex<Pending>,
    /// The open subscriptions, by pattern: the master knows each pattern once, however many
    /// subscriptions of this process share it.
    feeds: Mutex<HashMap<String, Vec<Arc<Feed>>>>,
    /// Held while a subscribe or unsubscribe is decided and written, so that the master sees them
    /// in the order the subscriptions were opened and dropped.
    subscribing: Mutex<()>,
}

static CHANNEL: OnceLock<Option<Channel>> = OnceLock::new();

/// Messages kept for the program before the oldest are dropped (it is not reading them).
const MAX_MESSAGES: usize = 4096;

/// The channel, when corral gave this process one (taken once, on first use).
pub(crate) fn get() -> Option<&'static Channel> {
    CHANNEL
        .get_or_init(|| {
            let raw: i32 = std::env::var(env::CORRAL_CHANNEL_FD).ok()?.parse().ok()?;
            let fd = corral_sys::fd::take_inherited_fd(raw).ok()?;
            let report_closes = std::env::var(env::CORRAL_LB).as_deref() == Ok("least-conn");
            let mut channel = Channel::new(UnixStream::from(fd), report_closes);
            // A master older than state batches (protocol 1) gets `state` messages only.
            let protocol = std::env::var(env::CORRAL_CHANNEL_PROTOCOL).ok();
            channel.batches = protocol.and_then(|p| p.parse::<u32>().ok()).unwrap_or(1) >= 2;
            Some(channel)
        })
        .as_ref()
}

/// Whether the master hands this worker its connections over the channel.
pub(crate) fn hands_over_connections() -> bool {
    matches!(
        std::env::var(env::CORRAL_LB).as_deref(),
        Ok("rr" | "least-conn")
    ) && get().is_some()
}

impl Channel {
    /// The channel on `socket`, the worker's end; not read until [`Channel::listen`].
    pub fn new(socket: UnixStream, report_closes: bool) -> Channel {
        let reader = socket.try_clone().ok();
        Channel {
            stream: socket,
            out: Mutex::default(),
            reader: Mutex::new(reader),
            frames: Mutex::default(),
            reads_on_runtime: AtomicBool::new(false),
            started: Once::new(),
            inbox: Mutex::default(),
            changed: Condvar::new(),
            report_closes,
            batches: true,
            #[cfg(feature = "tokio")]
            shutdown_signal: ::tokio::sync::watch::Sender::new(false),
            next_id: AtomicU64::new(1),
            pending: Mutex::default(),
            feeds: Mutex::default(),
            subscribing: Mutex::new(()),
        }
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one message to the master.
    pub fn send(&self, message: &WorkerMessage) -> io::Result<()> {
        let frame = corral_proto::frame::encode(message).map_err(io::Error::other)?;
        self.write_all(&frame)
    }

    /// Writes frames, whole, in as few writes as the socket takes, after those of every write
    /// begun before; frames never interleave.
    ///
    /// This blocks, even for async callers (as it always did for `accepted` and `refused`),
    /// while the socket's buffer is full, that is while the master is not reading this worker's
    /// channel: it stops when more than 8 MiB of answers wait for a worker that does not read
    /// them. Meanwhile the channel is read on, here if need be (when its reader is a task of
    /// the runtime whose thread this may be), so that a worker writing many calls at once and
    /// the master answering them cannot wait on each other.
    pub fn write_all(&self, frame: &[u8]) -> io::Result<()> {
        let mine = {
            let mut out = self.out();
            let taken = if out.bytes.is_empty() {
                write_some(&self.stream, frame)?
            } else {
                0
            };
            out.bytes.extend_from_slice(&frame[taken..]);
            out.written += taken as u64;
            out.queued += frame.len() as u64;
            out.queued
        };
        loop {
            {
                let mut out = self.out();
                let n = write_some(&self.stream, &out.bytes)?;
                out.bytes.drain(..n);
                out.written += n as u64;
                if out.written >= mine {
                    return Ok(());
                }
            }
            // Not from within reading (a message handled that writes): that read goes on.
            let read_too =
                self.reads_on_runtime.load(Ordering::Acquire) && !READING.with(Cell::get);
            if corral_sys::fd::wait_room_or_readable(self.stream.as_fd(), read_too)? {
                self.read_while_writing();
            }
        }
    }

    fn out(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn frames(&self) -> MutexGuard<'_, Frames> {
        self.frames.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads what came, for a writer waiting for room, unless the reader is at it.
    fn read_while_writing(&self) {
        let mut frames = match self.frames.try_lock() {
            Ok(frames) => frames,
            Err(std::sync::TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return,
        };
        let mut chunk = vec![0u8; 64 * 1024];
        if let Ok(false) = self.receive(&mut frames, self.stream.as_fd(), &mut chunk) {
            drop(frames);
            self.close();
        }
    }

    /// One read of the channel into `frames`, its messages handled: false at its end, or when
    /// the stream is not the master's.
    fn receive(
        &self,
        frames: &mut Frames,
        fd: std::os::fd::BorrowedFd<'_>,
        chunk: &mut [u8],
    ) -> io::Result<bool> {
        let mut received = Vec::new();
        let n = corral_sys::fd::recv_with_fds(fd, chunk, &mut received)?;
        READING.with(|reading| reading.set(true));
        let fed = n > 0 && frames.feed(self, &chunk[..n], received);
        READING.with(|reading| reading.set(false));
        Ok(fed)
    }

    /// Starts reading the channel, once: on a thread of its own, or, called within a tokio
    /// runtime with the `tokio` feature, as a task of that runtime (no thread hop per connection).
    pub fn listen(&'static self) {
        self.start_reading(true);
    }

    /// Starts reading the channel, once, on a thread of its own even within a runtime: for
    /// blocking callers, who could otherwise block the very runtime thread that would read their
    /// answer. (When reading already started as a task, it stays one.)
    pub fn listen_on_thread(&'static self) {
        self.start_reading(false);
    }

    fn start_reading(&'static self, on_runtime: bool) {
        #[cfg(not(feature = "tokio"))]
        let _ = on_runtime;
        self.started.call_once(|| {
            let reader = self
                .reader
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let Some(reader) = reader else {
                self.close();
                return;
            };
            #[cfg(feature = "tokio")]
            let reader = match ::tokio::runtime::Handle::try_current() {
                Ok(runtime) if on_runtime => match watch(reader) {
                    Ok(watched) => {
                        self.reads_on_runtime.store(true, Ordering::Release);
                        runtime.spawn(self.read_async(watched));
                        return;
                    }
                    Err(reader) => reader,
                },
                _ => reader,
            };
            let spawned = std::thread::Builder::new()
                .name("corral-channel".into())
                .spawn(move || self.read(&reader));
            if spawned.is_err() {
                self.close();
            }
        });
    }

    fn read(&self, reader: &UnixStream) {
        let mut chunk = vec![0u8; 16 * 1024];
        // Nobody else reads (writers wait for room only), so the frames stay taken.
        let mut frames = self.frames();
        while let Ok(true) = self.receive(&mut frames, reader.as_fd(), &mut chunk) {}
        drop(frames);
        self.close();
    }

    #[cfg(feature = "tokio")]
    async fn read_async(&'static self, reader: ::tokio::io::unix::AsyncFd<OwnedFd>) {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let Ok(mut ready) = reader.readable().await else {
                break;
            };
            let received = ready.try_io(|fd| {
                let mut frames = self.frames();
                self.receive(&mut frames, fd.as_fd(), &mut chunk)
            });
            match received {
                Ok(Ok(true)) => {}
                // A writer waiting for room read what there was.
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(Ok(false) | Err(_)) => break,
                Err(_would_block) => {}
            }
        }
        self.close();
    }

    fn handle(&self, message: MasterMessage, fds: &mut VecDeque<OwnedFd>) {
        match message {
            MasterMessage::Connection { id, listener } => {
                let Some(fd) = fds.pop_front() else {
                    return;
                };
                let mut inbox = self.inbox();
                if inbox.shutdown {
                    drop(inbox);
                    drop(fd);
                    let _ = self.send(&WorkerMessage::Refused { id });
                    return;
                }
                inbox.connections.push_back(Handed { id, listener, fd });
                wake(&mut inbox.connection_waker);
                drop(inbox);
                self.changed.notify_all();
            }
            MasterMessage::Shutdown => self.shut_down(),
            MasterMessage::Message {
                data,
                from,
                request: None,
            } => {
                let mut inbox = self.inbox();
                if inbox.messages.len() == MAX_MESSAGES {
                    inbox.messages.pop_front();
                }
                inbox.messages.push_back(Message { data, from });
                wake(&mut inbox.message_waker);
                drop(inbox);
                self.changed.notify_all();
            }
            MasterMessage::Message {
                data,
                from,
                request: Some(number),
            } => {
                let mut inbox = self.inbox();
                let dropped = if inbox.requests.len() == MAX_MESSAGES {
                    inbox.requests.pop_front()
                } else {
                    None
                };
                inbox.requests.push_back(Asked {
                    number,
                    from: from.unwrap_or_else(|| "unknown".to_string()),
                    data,
                });
                wake(&mut inbox.request_waker);
                drop(inbox);
                self.changed.notify_all();
                if let Some(dropped) = dropped {
                    let _ = self.reply(
                        dropped.number,
                        Err(format!(
                            "worker {} has {MAX_MESSAGES} requests waiting: it does not take \
                             them (corral_worker::bus().next_request) or not fast enough",
                            crate::worker_id().map_or_else(|| "?".to_string(), |id| id.to_string())
                        )),
                    );
                }
            }
            MasterMessage::Reply { id, data, error } => self.answer(
                Kind::Send,
                id,
                match error {
                    Some(error) => Err(CallError::Failed(error)),
                    None => Ok(data),
                },
            ),
            MasterMessage::State { id, ok, error } => self.answer(
                Kind::State,
                id,
                match error {
                    Some(error) => Err(CallError::Failed(error)),
                    // `"ok": null` (a `get` of a missing key) reads as no `ok` at all.
                    None => Ok(ok.unwrap_or(serde_json::Value::Null)),
                },
            ),
            MasterMessage::Published {
                pattern,
                channel,
                message,
            } => self.deliver(Published {
                pattern,
                channel,
                message,
            }),
        }
    }

    fn close(&self) {
        let mut inbox = self.inbox();
        inbox.closed = true;
        wake(&mut inbox.connection_waker);
        wake(&mut inbox.message_waker);
        wake(&mut inbox.request_waker);
        drop(inbox);
        self.changed.notify_all();
        self.fail_pending();
        self.close_feeds();
    }

    /// Takes no more connections: those queued and those still coming go back to the master.
    pub fn shut_down(&self) {
        let mut inbox = self.inbox();
        if inbox.shutdown {
            return;
        }
        inbox.shutdown = true;
        let refused: Vec<Handed> = inbox.connections.drain(..).collect();
        wake(&mut inbox.connection_waker);
        #[cfg(feature = "tokio")]
        self.shutdown_signal.send_replace(true);
        drop(inbox);
        self.changed.notify_all();
        for handed in refused {
            let _ = self.send(&WorkerMessage::Refused { id: handed.id });
        }
    }

    /// Whether a shutdown began.
    pub fn is_shutting_down(&self) -> bool {
        self.inbox().shutdown
    }

    /// The next connection, acknowledged; `None` once no more will come (shutdown, or the
    /// master is gone). Waits at most `timeout` when given (then `Some(Err(TimedOut))`).
    pub fn next_blocking(&self, timeout: Option<Duration>) -> Option<io::Result<Handed>> {
        let mut inbox = self.inbox();
        loop {
            if inbox.shutdown || inbox.closed {
                return None;
            }
            if let Some(handed) = inbox.connections.pop_front() {
                drop(inbox);
                return Some(self.accept(handed));
            }
            inbox = match timeout {
                None => self
                    .changed
                    .wait(inbox)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(timeout) => {
                    let (inbox, waited) = self
                        .changed
                        .wait_timeout(inbox, timeout)
                        .unwrap_or_else(PoisonError::into_inner);
                    if waited.timed_out() && inbox.connections.is_empty() {
                        return Some(Err(io::ErrorKind::TimedOut.into()));
                    }
                    inbox
                }
            };
        }
    }

    /// The next message from the master, waiting at most `timeout` (for ever with `None`);
    /// `None` when the time ran out or the master is gone.
    pub fn message_blocking(&self, timeout: Option<Duration>) -> Option<Message> {
        self.wait_inbox(timeout, |inbox| inbox.messages.pop_front())
    }

    /// As [`Channel::message_blocking`], for async callers (the one consumer).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub fn poll_message(&self, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let mut inbox = self.inbox();
        if let Some(message) = inbox.messages.pop_front() {
            return Poll::Ready(Some(message));
        }
        if inbox.closed {
            return Poll::Ready(None);
        }
        inbox.message_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next request on the bus, waiting at most `timeout` (for ever with `None`); `None`
    /// when the time ran out or the master is gone.
    pub fn request_blocking(&self, timeout: Option<Duration>) -> Option<Asked> {
        self.wait_inbox(timeout, |inbox| inbox.requests.pop_front())
    }

    /// As [`Channel::request_blocking`], for async callers (the one consumer).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub fn poll_request(&self, cx: &mut Context<'_>) -> Poll<Option<Asked>> {
        let mut inbox = self.inbox();
        if let Some(asked) = inbox.requests.pop_front() {
            return Poll::Ready(Some(asked));
        }
        if inbox.closed {
            return Poll::Ready(None);
        }
        inbox.request_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Answers request `number` of the bus.
    pub fn reply(&self, number: u64, answer: Result<serde_json::Value, String>) -> io::Result<()> {
        let (data, error) = match answer {
            Ok(data) => (data, None),
            Err(error) => (serde_json::Value::Null, Some(error)),
        };
        self.send(&WorkerMessage::Reply {
            request: number,
            data,
            error,
        })
    }

    /// What `take` finds in the inbox, waiting for it at most `timeout` (for ever with `None`);
    /// `None` when the time ran out or the master is gone and nothing is left.
    fn wait_inbox<T>(
        &self,
        timeout: Option<Duration>,
        mut take: impl FnMut(&mut Inbox) -> Option<T>,
    ) -> Option<T> {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut inbox = self.inbox();
        loop {
            if let Some(found) = take(&mut inbox) {
                return Some(found);
            }
            if inbox.closed {
                return None;
            }
            inbox = match deadline {
                None => self
                    .changed
                    .wait(inbox)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    self.changed
                        .wait_timeout(inbox, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }

    /// As [`Channel::next_blocking`], for async callers.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Handed>>> {
        let mut inbox = self.inbox();
        if inbox.shutdown || inbox.closed {
            return Poll::Ready(None);
        }
        if let Some(handed) = inbox.connections.pop_front() {
            drop(inbox);
            return Poll::Ready(Some(self.accept(handed)));
        }
        inbox.connection_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Completes once a shutdown began.
    #[cfg(feature = "tokio")]
    pub fn shutdown_notice(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut begun = self.shutdown_signal.subscribe();
        async move {
            let _ = begun.wait_for(|begun| *begun).await;
        }
    }

    fn accept(&self, handed: Handed) -> io::Result<Handed> {
        self.send(&WorkerMessage::Accepted { id: handed.id })?;
        Ok(handed)
    }
}

thread_local! {
    /// This thread is handling what it read from the channel.
    static READING: Cell<bool> = const { Cell::new(false) };
}

/// Bytes written to the channel: those not yet taken by the socket, and counts since the start
/// (a writer waits until `written` passes the end of its own bytes).
#[derive(Debug, Default)]
struct Out {
    bytes: Vec<u8>,
    queued: u64,
    written: u64,
}

/// Writes what the socket takes of `bytes` without waiting: how much.
fn write_some(mut stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    let mut at = 0;
    while at < bytes.len() {
        match stream.write(&bytes[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(at)
}

/// Bytes and descriptors read from the channel, not yet made into messages.
#[derive(Debug, Default)]
struct Frames {
    pending: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Frames {
    /// Takes what one read brought and handles every complete message; false when the stream
    /// is not the master's (then reading stops).
    fn feed(&mut self, channel: &Channel, bytes: &[u8], fds: Vec<OwnedFd>) -> bool {
        self.fds.extend(fds);
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        while self.pending.len() - at >= 4 {
            let len =
                u32::from_be_bytes(self.pending[at..at + 4].try_into().expect("4 bytes")) as usize;
            if len > MAX_CHANNEL_FRAME_LEN {
                return false;
            }
            if self.pending.len() - at - 4 < len {
                break;
            }
            // Messages of later versions are skipped.
            let body = &self.pending[at + 4..at + 4 + len];
            if let Some((first, resp)) = corral_proto::channel::read_state_batch(body) {
                if !channel.answer_batch(first, resp) {
                    return false;
                }
            } else if let Ok(message) = corral_proto::channel::decode_master_message(body) {
                channel.handle(message, &mut self.fds);
            }
            at += 4 + len;
        }
        self.pending.drain(..at);
        true
    }
}

/// The reader end, non-blocking, registered with the current runtime; or back, blocking.
#[cfg(feature = "tokio")]
fn watch(reader: UnixStream) -> Result<::tokio::io::unix::AsyncFd<OwnedFd>, UnixStream> {
    if reader.set_nonblocking(true).is_err() {
        return Err(reader);
    }
    corral_sys::fd::watch(OwnedFd::from(reader)).map_err(|(fd, _)| {
        let reader = UnixStream::from(fd);
        let _ = reader.set_nonblocking(false);
        reader
    })
}

fn wake(waker: &mut Option<Waker>) {
    if let Some(waker) = waker.take() {
        waker.wake();
    }
}

/// Tells the master that connection `id` closed, when it counts them; on drop.
#[derive(Debug)]
pub(crate) struct CloseReport(pub u64);

impl CloseReport {
    /// A report for connection `id`, when the master wants them.
    pub fn for_connection(id: u64) -> Option<CloseReport> {
        get().filter(|c| c.report_closes).map(|_| CloseReport(id))
    }
}

impl Drop for CloseReport {
    fn drop(&mut self) {
        if let Some(channel) = get() {
            let _ = channel.send(&WorkerMessage::Closed { id: self.0 });
        }
    }
}

/// A channel on a socket pair whose master end a test holds, and the master's side of the
/// framing: a real channel, with the test speaking for the master.
#[cfg(test)]
pub(crate) mod testing {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use std::cell::RefCell;
    use std::collections::{HashMap, VecDeque};

    use corral_proto::channel::{
        MAX_CHANNEL_FRAME_LEN, MAX_STATE_BATCH, StateCall, WorkerMessage, finish_state_batch,
        read_state_batch, start_state_batch,
    };
    use corral_proto::resp;

    use super::Channel;

    /// A channel whose master end the test holds, read by its thread.
    pub(crate) fn channel() -> (&'static Channel, UnixStream) {
        let (channel, master) = unread_channel();
        channel.listen_on_thread();
        (channel, master)
    }

    /// A channel whose master end the test holds, not read yet: the test starts reading.
    pub(crate) fn unread_channel() -> (&'static Channel, UnixStream) {
        unread_channel_of(Channel::new)
    }

    /// A channel to a master of channel protocol 1 (no state batches), read by its thread.
    pub(crate) fn channel_to_protocol_1() -> (&'static Channel, UnixStream) {
        let (channel, master) = unread_channel_of(|socket, report_closes| Channel {
            batches: false,
            ..Channel::new(socket, report_closes)
        });
        channel.listen_on_thread();
        (channel, master)
    }

    fn unread_channel_of(
        make: impl FnOnce(UnixStream, bool) -> Channel,
    ) -> (&'static Channel, UnixStream) {
        let (master, worker) = UnixStream::pair().unwrap();
        let channel: &'static Channel = Box::leak(Box::new(make(worker, false)));
        // A test that goes wrong fails instead of hanging.
        master
            .set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        (channel, master)
    }

    /// One frame with `body`.
    pub(crate) fn frame(body: &str) -> Vec<u8> {
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(body.as_bytes());
        bytes
    }

    /// Sends the master's message `json`.
    pub(crate) fn write_frame(mut master: &UnixStream, json: &serde_json::Value) {
        master.write_all(&frame(&json.to_string())).unwrap();
    }

    /// Reads the worker's next message.
    pub(crate) fn read_message(master: &UnixStream) -> WorkerMessage {
        serde_json::from_slice(&read_body(master)).unwrap()
    }

    fn read_body(mut master: &UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        master.read_exact(&mut len).unwrap();
        let len = u32::from_be_bytes(len) as usize;
        assert!(len <= MAX_CHANNEL_FRAME_LEN, "a frame of {len} bytes");
        let mut body = vec![0u8; len];
        master.read_exact(&mut body).unwrap();
        body
    }

    thread_local! {
        /// State calls read from a batch frame and not yet given to the test.
        static UNREAD: RefCell<VecDeque<(u64, StateCall)>> = RefCell::default();
        /// The calls that came in a state batch, by number, until answered.
        static BATCHED: RefCell<HashMap<u64, StateCall>> = RefCell::default();
    }

    /// The number and the call of the worker's next state call, whether it came as a `state`
    /// message or in a state batch frame.
    pub(crate) fn read_call(master: &UnixStream) -> (u64, StateCall) {
        if let Some(call) = UNREAD.with(|unread| unread.borrow_mut().pop_front()) {
            return call;
        }
        let body = read_body(master);
        let Some((first, mut commands)) = read_state_batch(&body) else {
            return match serde_json::from_slice(&body).unwrap() {
                WorkerMessage::State { id, call } => (id, call),
                other => panic!("expected a state call, got {other:?}"),
            };
        };
        let mut id = first;
        while !commands.is_empty() {
            let (command, len) = resp::read_command(commands).unwrap().unwrap();
            let call = StateCall::from_command(command.args()).expect("a call a batch holds");
            BATCHED.with(|batched| batched.borrow_mut().insert(id, call.clone()));
            UNREAD.with(|unread| unread.borrow_mut().push_back((id, call)));
            commands = &commands[len..];
            id += 1;
        }
        assert!(
            id - first <= MAX_STATE_BATCH as u64,
            "{} calls in a frame",
            id - first
        );
        read_call(master)
    }

    /// Answers call `id` with `ok` as the master does: in a state batch frame (a RESP reply
    /// standing for `ok`) when the call came in one, else in a `state` message.
    pub(crate) fn answer(master: &UnixStream, id: u64, ok: &serde_json::Value) {
        use serde_json::Value;
        let Some(call) = BATCHED.with(|batched| batched.borrow_mut().remove(&id)) else {
            write_frame(
                master,
                &serde_json::json!({"type": "state", "id": id, "ok": ok}),
            );
            return;
        };
        let mut reply = Vec::new();
        match (ok, call) {
            (Value::String(text), _) => resp::bulk(&mut reply, Some(text.as_bytes())),
            (Value::Null, _) => resp::bulk(&mut reply, None),
            (Value::Bool(_), StateCall::Set { .. }) => resp::ok(&mut reply),
            (Value::Bool(yes), _) => resp::integer(&mut reply, i64::from(*yes)),
            (Value::Number(n), _) => resp::integer(&mut reply, n.as_i64().unwrap()),
            (other, _) => panic!("no RESP reply stands for {other}"),
        }
        write_batch(master, id, &reply);
    }

    /// Answers call `id` with the error `error`, as [`answer`] does.
    pub(crate) fn refuse(master: &UnixStream, id: u64, error: &str) {
        if BATCHED
            .with(|batched| batched.borrow_mut().remove(&id))
            .is_none()
        {
            write_frame(
                master,
                &serde_json::json!({"type": "state", "id": id, "error": error}),
            );
            return;
        }
        let mut reply = Vec::new();
        resp::error(&mut reply, &format!("CORRAL {error}"));
        write_batch(master, id, &reply);
    }

    /// Answers call `id`, which came in a state batch, with `reply` as Redis would give it.
    pub(crate) fn reply_as_redis(master: &UnixStream, id: u64, reply: &[u8]) {
        assert!(
            BATCHED
                .with(|batched| batched.borrow_mut().remove(&id))
                .is_some()
        );
        write_batch(master, id, reply);
    }

    fn write_batch(mut master: &UnixStream, first: u64, replies: &[u8]) {
        let mut frame = Vec::new();
        let start = start_state_batch(&mut frame, first);
        frame.extend_from_slice(replies);
        finish_state_batch(&mut frame, start);
        master.write_all(&frame).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    use super::*;

    pub(crate) use super::testing::{channel, frame, read_message};

    /// Hands over one end of a new socket pair as connection `id`; returns the other end.
    fn hand_over(master: &UnixStream, id: u64) -> UnixStream {
        let (client, server) = UnixStream::pair().unwrap();
        let message = frame(&format!(
            r#"{{"type":"connection","id":{id},"listener":0}}"#
        ));
        let sent =
            corral_sys::fd::send_with_fds(master.as_fd(), &message, &[server.as_fd()]).unwrap();
        assert_eq!(sent, message.len());
        client
    }

    #[test]
    fn a_handed_connection_is_acknowledged_when_taken_and_works() {
        let (channel, mut master) = channel();
        let mut client = hand_over(&master, 7);
        // Messages of a later version are skipped, not fatal.
        master
            .write_all(&frame(r#"{"type":"from_the_future"}"#))
            .unwrap();
        let mut second = hand_over(&master, 8);

        let taken = channel.next_blocking(Some(Duration::from_secs(10)));
        let handed = taken.unwrap().unwrap();
        assert_eq!((handed.id, handed.listener), (7, 0));
        assert_eq!(read_message(&master), WorkerMessage::Accepted { id: 7 });
        let mut server = UnixStream::from(handed.fd);
        client.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");

        let handed = channel.next_blocking(Some(Duration::from_secs(10)));
        let mut server = UnixStream::from(handed.unwrap().unwrap().fd);
        assert_eq!(read_message(&master), WorkerMessage::Accepted { id: 8 });
        second.write_all(b"pong").unwrap();
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"pong");
    }

    #[test]
    fn after_a_shutdown_connections_go_back_to_the_master() {
        let (channel, mut master) = channel();
        let _queued = hand_over(&master, 1);
        // Wait until the reader queued it, so that the shutdown finds it there.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while channel.inbox().connections.is_empty() {
            assert!(std::time::Instant::now() < deadline, "never queued");
            std::thread::yield_now();
        }
        master.write_all(&frame(r#"{"type":"shutdown"}"#)).unwrap();
        assert_eq!(read_message(&master), WorkerMessage::Refused { id: 1 });
        assert!(channel.is_shutting_down());
        let _late = hand_over(&master, 2);
        assert_eq!(read_message(&master), WorkerMessage::Refused { id: 2 });
        assert!(
            channel
                .next_blocking(Some(Duration::from_secs(1)))
                .is_none()
        );
    }

    #[test]
    fn messages_from_the_master_wait_for_the_program() {
        let (channel, mut master) = channel();
        master
            .write_all(&frame(r#"{"type":"message","data":{"cmd":"refresh"}}"#))
            .unwrap();
        master
            .write_all(&frame(r#"{"type":"message","data":2}"#))
            .unwrap();
        let first = channel.message_blocking(Some(Duration::from_secs(10)));
        assert_eq!(
            first,
            Some(Message {
                data: serde_json::json!({"cmd": "refresh"}),
                from: None
            })
        );
        let second = channel.message_blocking(Some(Duration::from_secs(10)));
        assert_eq!(second.map(|m| m.data), Some(serde_json::json!(2)));
        assert_eq!(
            channel.message_blocking(Some(Duration::from_millis(1))),
            None
        );
    }

    #[test]
    fn the_master_going_away_ends_the_connections() {
        let (channel, master) = channel();
        drop(master);
        assert!(channel.next_blocking(None).is_none());
    }
}
