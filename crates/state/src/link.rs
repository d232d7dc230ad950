//! A connection to Redis that carries workers' key/value commands as they wrote them (RESP), and
//! gives back Redis's replies as they came, without decoding either.
//!
//! # How it works
//!
//! One task owns the connection. [`Link::forward`] puts a job (the commands, how many there are,
//! and where to answer) on an unbounded channel before it returns, so batches reach Redis in the
//! order they were forwarded, whatever order their futures are polled in.
//!
//! The task connects when a job comes and no connection is up: TCP (`TCP_NODELAY`) or a Unix
//! socket, then `AUTH` and `SELECT` when the URL asks for them, all within
//! [`COMMAND_TIMEOUT`]. Connected, it runs one poll loop that does whatever can be done: take
//! every queued job, write their bytes (vectored, so nothing is copied), read replies in 64 KiB
//! chunks into one buffer, and cut them with [`resp::reply_len`], each job in turn getting its
//! next `count` replies in one `Vec`. Writing and reading advance in the same loop, so a batch
//! whose replies come back before it is all written never waits on itself.
//!
//! The connection is dropped on EOF, an I/O error, bytes from Redis that are not RESP, or no
//! reply byte for [`COMMAND_TIMEOUT`] while a job waits; every job taken and not answered then
//! fails with [`StateError::Unavailable`] saying which, and the next job connects again. A failed
//! connection attempt starts a backoff (50 ms doubling to 1 s, reset by a connection that
//! succeeds) during which jobs fail at once with that attempt's error, so callers get fast
//! answers and a dead Redis is not hammered with connections.
//!
//! The caller vouches for the commands (whole RESP commands, exactly `count` of them, none that
//! blocks or changes the connection's mode): a wrong count would hand replies to the wrong job.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use corral_proto::resp::{self, Reply};
use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep, sleep, timeout};

use crate::{COMMAND_TIMEOUT, StateError};

/// The least room a read is given in the buffer.
const READ_CHUNK: usize = 64 * 1024;
/// The read buffer's size; it grows only for a reply larger than the room left.
const BUFFER_SIZE: usize = 2 * READ_CHUNK;
/// Above this the buffer goes back to [`BUFFER_SIZE`] once emptied, after a large reply.
const BUFFER_KEEP: usize = 8 * READ_CHUNK;
/// Jobs' byte buffers given to one vectored write (Linux takes up to 1024).
const MAX_SLICES: usize = 128;
/// First wait after a failed connection attempt.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest wait after failed connection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

const CLOSED: &str = "the connection was closed";

/// Where a job's replies, or why there are none, go.
type Answer = oneshot::Sender<Result<Vec<u8>, StateError>>;

/// Commands forwarded together.
#[derive(Debug)]
struct Job {
    commands: Vec<u8>,
    count: usize,
    answer: Answer,
}

/// The pass-through connection of one Redis store.
#[derive(Debug)]
pub(crate) struct Link {
    url: Arc<str>,
    jobs: mpsc::UnboundedSender<Job>,
}

impl Link {
    /// A link to the Redis of `client`; `url` (without password) is for messages. Connects on
    /// first use. Call it inside a tokio runtime: it spawns the connection's task (outside one,
    /// every call fails saying the task is not running).
    pub(crate) fn new(client: &redis::Client, url: String) -> Link {
        let url: Arc<str> = url.into();
        let (jobs, queue) = mpsc::unbounded_channel();
        let task = Task {
            target: Target::of(client.get_connection_info()),
            url: Arc::clone(&url),
            queue,
            backoff: BACKOFF_MIN,
            refusal: None,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(task.run());
        }
        Link { url, jobs }
    }

    /// Queues `commands`, exactly `count` whole RESP commands, to be written to Redis after
    /// every batch queued before them; resolves to their `count` replies, as Redis wrote them.
    pub(crate) fn forward(
        &self,
        commands: Vec<u8>,
        count: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StateError>> + Send + 'static {
        let (answer, answered) = oneshot::channel();
        // Queued here, not when the future is first polled: this is what keeps batches in order.
        // When the task is gone the job, and with it `answer`, is dropped, which `answered` sees.
        let _ = self.jobs.send(Job {
            commands,
            count,
            answer,
        });
        let url = Arc::clone(&self.url);
        async move {
            answered.await.unwrap_or_else(|_| {
                Err(unavailable(
                    &url,
                    "corral's connection task is not running (no tokio runtime, or shutting down)",
                ))
            })
        }
    }
}

fn unavailable(url: &str, reason: &str) -> StateError {
    StateError::Unavailable {
        url: url.to_owned(),
        reason: reason.to_owned(),
    }
}

fn fail(url: &str, answer: Answer, reason: &str) {
    let _ = answer.send(Err(unavailable(url, reason)));
}

fn no_answer() -> String {
    format!("no answer within {} s", COMMAND_TIMEOUT.as_secs())
}

fn not_resp(e: &resp::Malformed) -> String {
    format!("it sent bytes that are not RESP ({e})")
}

/// The task that owns the connection.
struct Task {
    target: Target,
    url: Arc<str>,
    queue: mpsc::UnboundedReceiver<Job>,
    /// The wait after the next failed connection attempt.
    backoff: Duration,
    /// Until when jobs fail at once, and with what: the last failed attempt's error.
    refusal: Option<(Instant, String)>,
}

impl Task {
    /// Serves jobs until every [`Link`] is dropped and the jobs queued are answered.
    async fn run(mut self) {
        while let Some(first) = self.queue.recv().await {
            if let Some((until, reason)) = self.refusal.take() {
                if Instant::now() < until {
                    self.refuse(first, &reason);
                    self.refusal = Some((until, reason));
                    continue;
                }
            }
            match self.target.connect().await {
                Ok(stream) => {
                    self.backoff = BACKOFF_MIN;
                    let mut conn = Conn::new(stream);
                    conn.take(first);
                    let queue = &mut self.queue;
                    if let Err(reason) = poll_fn(|cx| conn.poll_serve(cx, queue)).await {
                        conn.fail(&self.url, &reason);
                    }
                }
                Err(reason) => {
                    self.refuse(first, &reason);
                    self.refusal = Some((Instant::now() + self.backoff, reason));
                    self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Fails `first` and every job queued behind it with `reason`.
    fn refuse(&mut self, first: Job, reason: &str) {
        fail(&self.url, first.answer, reason);
        while let Ok(job) = self.queue.try_recv() {
            fail(&self.url, job.answer, reason);
        }
    }
}

/// Where Redis is and what to say first. Not `Debug`: it holds the password.
struct Target {
    /// Or why it cannot be reached by this link.
    address: Result<Address, String>,
    /// `AUTH` and `SELECT` as the URL asks, sent first on every connection.
    hello: Vec<u8>,
    /// The commands in `hello`, for messages.
    hello_names: Vec<&'static str>,
}

enum Address {
    Tcp(String, u16),
    Unix(PathBuf),
}

impl Target {
    fn of(info: &ConnectionInfo) -> Target {
        let address = match info.addr() {
            ConnectionAddr::Tcp(host, port) => Ok(Address::Tcp(host.clone(), *port)),
            ConnectionAddr::Unix(path) => Ok(Address::Unix(path.clone())),
            _ => Err("TLS is not supported; use redis:// on a trusted network".to_owned()),
        };
        let settings = info.redis_settings();
        let mut hello = Vec::new();
        let mut hello_names = Vec::new();
        if let Some(password) = settings.password() {
            let password = password.as_bytes();
            match settings.username() {
                Some(user) => resp::command(&mut hello, &[b"AUTH", user.as_bytes(), password]),
                None => resp::command(&mut hello, &[b"AUTH", password]),
            }
            hello_names.push("AUTH");
        }
        if settings.db() != 0 {
            resp::command(
                &mut hello,
                &[b"SELECT", settings.db().to_string().as_bytes()],
            );
            hello_names.push("SELECT");
        }
        Target {
            address,
            hello,
            hello_names,
        }
    }

    /// A connection ready for workers' commands, within [`COMMAND_TIMEOUT`]; or why not.
    async fn connect(&self) -> Result<Stream, String> {
        let address = self.address.as_ref().map_err(Clone::clone)?;
        let failed = |e: io::Error| format!("connecting failed: {e}");
        let attempt = async {
            match address {
                Address::Tcp(host, port) => {
                    let mut stream = TcpStream::connect((host.as_str(), *port))
                        .await
                        .map_err(failed)?;
                    stream.set_nodelay(true).map_err(failed)?;
                    self.say_hello(&mut stream).await?;
                    Ok(Stream::Tcp(stream))
                }
                Address::Unix(path) => {
                    let mut stream = UnixStream::connect(path).await.map_err(failed)?;
                    self.say_hello(&mut stream).await?;
                    Ok(Stream::Unix(stream))
                }
            }
        };
        timeout(COMMAND_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| Err(format!("{} while connecting", no_answer())))
    }

    /// Sends `AUTH` and `SELECT` (when asked for) and checks their replies.
    async fn say_hello<S>(&self, stream: &mut S) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.hello_names.is_empty() {
            return Ok(());
        }
        stream
            .write_all(&self.hello)
            .await
            .map_err(|e| format!("writing to it failed: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        let mut at = 0;
        for name in &self.hello_names {
            loop {
                match resp::read_reply(&buf[at..]) {
                    Ok(Some((Reply::Error(text), _))) => {
                        let text = String::from_utf8_lossy(text);
                        return Err(format!("it refused {name}: {text}"));
                    }
                    Ok(Some((_, len))) => {
                        at += len;
                        break;
                    }
                    Ok(None) => {}
                    Err(e) => return Err(not_resp(&e)),
                }
                match stream.read_buf(&mut buf).await {
                    Ok(0) => return Err(CLOSED.to_owned()),
                    Ok(_) => {}
                    Err(e) => return Err(format!("reading from it failed: {e}")),
                }
            }
        }
        if at < buf.len() {
            return Err("it sent a reply to no command".to_owned());
        }
        Ok(())
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
}

/// A job whose replies are not all in.
struct Waiting {
    /// Replies still to come.
    left: usize,
    /// Those already in.
    replies: Vec<u8>,
    answer: Answer,
}

/// One connection and the jobs on it.
struct Conn {
    stream: Stream,
    /// Jobs' commands not yet all written, oldest first; `written` bytes of the first are.
    unwritten: VecDeque<Vec<u8>>,
    written: usize,
    /// Jobs whose replies are not all in, oldest first (their commands may be unwritten still).
    waiting: VecDeque<Waiting>,
    /// The read buffer: `start..end` is read and not yet handed on. It is kept initialised
    /// (zeroed once) so that reading into it needs no `unsafe`.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// When a reply byte last came, or a job began waiting while none was.
    progress: Instant,
    /// Set to fire no later than `progress + COMMAND_TIMEOUT`: it is moved on only when it
    /// fires, not at every read.
    timer: Pin<Box<Sleep>>,
    /// False once every [`Link`] is dropped.
    open: bool,
}

/// What a read did.
enum Read {
    Nothing,
    Bytes,
    Eof,
}

impl Conn {
    fn new(stream: Stream) -> Conn {
        Conn {
            stream,
            unwritten: VecDeque::new(),
            written: 0,
            waiting: VecDeque::new(),
            buf: vec![0; BUFFER_SIZE],
            start: 0,
            end: 0,
            progress: Instant::now(),
            timer: Box::pin(sleep(COMMAND_TIMEOUT)),
            open: true,
        }
    }

    fn take(&mut self, job: Job) {
        if job.count == 0 {
            // Nothing to wait for; its bytes, if any, would only put replies out of step.
            let _ = job.answer.send(Ok(Vec::new()));
            return;
        }
        if self.waiting.is_empty() {
            self.progress = Instant::now();
        }
        if !job.commands.is_empty() {
            self.unwritten.push_back(job.commands);
        }
        self.waiting.push_back(Waiting {
            left: job.count,
            replies: Vec::new(),
            answer: job.answer,
        });
    }

    /// Fails every job taken and not answered.
    fn fail(&mut self, url: &str, reason: &str) {
        for job in self.waiting.drain(..) {
            fail(url, job.answer, reason);
        }
    }

    /// Does all that can be done now. Ready with `Ok` when done: every [`Link`] is dropped and
    /// nothing waits, or Redis closed the connection while nothing waited. Ready with `Err` when
    /// the connection failed, saying why.
    fn poll_serve(
        &mut self,
        cx: &mut Context<'_>,
        queue: &mut mpsc::UnboundedReceiver<Job>,
    ) -> Poll<Result<(), String>> {
        loop {
            let mut moved = false;
            while self.open {
                match queue.poll_recv(cx) {
                    Poll::Ready(Some(job)) => {
                        self.take(job);
                        moved = true;
                    }
                    Poll::Ready(None) => self.open = false,
                    Poll::Pending => break,
                }
            }
            moved |= self.poll_write(cx)?;
            match self.poll_read(cx)? {
                Read::Nothing => {}
                Read::Bytes => moved = true,
                Read::Eof if self.waiting.is_empty() => return Poll::Ready(Ok(())),
                Read::Eof => return Poll::Ready(Err(CLOSED.to_owned())),
            }
            if !self.open && self.waiting.is_empty() {
                return Poll::Ready(Ok(()));
            }
            // The timer fires no later than the deadline; when it fires before (progress came
            // since it was set), it is set again. Checked on every turn, not only when idle, so
            // that jobs streaming in cannot hide a Redis that stopped answering.
            if !self.waiting.is_empty() && self.timer.is_elapsed() {
                let deadline = self.progress + COMMAND_TIMEOUT;
                if Instant::now() >= deadline {
                    return Poll::Ready(Err(no_answer()));
                }
                self.timer.as_mut().reset(deadline);
            }
            if !moved {
                if !self.waiting.is_empty() && self.timer.as_mut().poll(cx).is_ready() {
                    continue;
                }
                return Poll::Pending;
            }
        }
    }

    /// Writes what the socket takes; true when it took something.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<bool, String> {
        let mut moved = false;
        while let Some(first) = self.unwritten.front() {
            let mut slices = [IoSlice::new(&[]); MAX_SLICES];
            slices[0] = IoSlice::new(&first[self.written..]);
            let mut used = 1;
            for (slot, bytes) in slices[1..].iter_mut().zip(self.unwritten.iter().skip(1)) {
                *slot = IoSlice::new(bytes);
                used += 1;
            }
            match self.stream.poll_write_vectored(cx, &slices[..used]) {
                Poll::Pending => break,
                Poll::Ready(Ok(0)) => return Err(CLOSED.to_owned()),
                Poll::Ready(Ok(n)) => {
                    self.advance(n);
                    moved = true;
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => return Err(format!("writing to it failed: {e}")),
            }
        }
        Ok(moved)
    }

    /// Drops the `n` bytes just written from the front of `unwritten`.
    fn advance(&mut self, mut n: usize) {
        while let Some(first) = self.unwritten.front() {
            let rest = first.len() - self.written;
            if n < rest {
                self.written += n;
                return;
            }
            n -= rest;
            self.written = 0;
            self.unwritten.pop_front();
        }
    }

    /// Reads once, and hands on the replies that are whole.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Result<Read, String> {
        self.make_room();
        let mut room = ReadBuf::new(&mut self.buf[self.end..]);
        match self.stream.poll_read(cx, &mut room) {
            Poll::Pending => Ok(Read::Nothing),
            Poll::Ready(Ok(())) => {
                let n = room.filled().len();
                if n == 0 {
                    return Ok(Read::Eof);
                }
                self.end += n;
                self.progress = Instant::now();
                self.hand_out()?;
                Ok(Read::Bytes)
            }
            // Nothing was read, but the loop should try again.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => Ok(Read::Bytes),
            Poll::Ready(Err(e)) => Err(format!("reading from it failed: {e}")),
        }
    }

    /// Leaves at least [`READ_CHUNK`] bytes of room after `end`.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
            if self.buf.len() > BUFFER_KEEP {
                self.buf.truncate(BUFFER_SIZE);
                self.buf.shrink_to_fit();
            }
        }
        if self.buf.len() - self.end >= READ_CHUNK {
            return;
        }
        // Only the start of an unfinished reply is left: move it to the front, and grow the
        // buffer when even that leaves too little room (a reply larger than the buffer).
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK {
            self.buf.resize(self.end + READ_CHUNK, 0);
        }
    }

    /// Gives each waiting job, oldest first, its whole replies; answers those that have all.
    fn hand_out(&mut self) -> Result<(), String> {
        while let Some(job) = self.waiting.front_mut() {
            let from = self.start;
            while job.left > 0 {
                match resp::reply_len(&self.buf[self.start..self.end]) {
                    Ok(Some(len)) => {
                        self.start += len;
                        job.left -= 1;
                    }
                    Ok(None) => break,
                    Err(e) => return Err(not_resp(&e)),
                }
            }
            // For a job answered by one read, this is the one allocation of its replies.
            job.replies.extend_from_slice(&self.buf[from..self.start]);
            if job.left > 0 {
                return Ok(());
            }
            if let Some(done) = self.waiting.pop_front() {
                let _ = done.answer.send(Ok(done.replies));
            }
        }
        if self.start < self.end {
            return Err("it sent a reply to no command".to_owned());
        }
        Ok(())
    }
}

// The server the Redis tests use too (not all of it).
#[cfg(test)]
#[allow(dead_code)]
#[path = "../tests/support/redis_server.rs"]
mod redis_server;

#[cfg(test)]
mod tests {
    //! Against a real `redis-server` started by each test on a free port in a temporary
    //! directory and killed (by pid) when done, also on panic. Without `redis-server` the tests
    //! print a note and pass, except under CI (`CI` set), where they fail.

    use std::io::Write as _;

    use super::*;

    /// Longest wait for anything the tests expect.
    const DEADLINE: Duration = Duration::from_secs(10);

    use super::redis_server::RedisServer;

    fn url(server: &RedisServer, password: &str, db: u32) -> String {
        format!("redis://:{password}@127.0.0.1:{}/{db}", server.port)
    }

    /// A link with the server's own password, to `db`.
    fn link(server: &RedisServer, db: u32) -> Link {
        link_with(server, server.password().unwrap_or_default(), db)
    }

    fn link_with(server: &RedisServer, password: &str, db: u32) -> Link {
        let client = redis::Client::open(url(server, password, db)).unwrap();
        Link::new(&client, format!("redis://127.0.0.1:{}/{db}", server.port))
    }

    /// A command through the redis crate, on a connection of its own, to `db`.
    fn query<T: redis::FromRedisValue>(
        server: &RedisServer,
        db: u32,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let password = server.password().unwrap_or_default();
        let client = redis::Client::open(url(server, password, db))?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(1))?;
        conn.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut cmd = redis::cmd(args[0]);
        cmd.arg(&args[1..]);
        cmd.query(&mut conn)
    }

    /// The commands, one after the other.
    fn commands(all: &[&[&[u8]]]) -> Vec<u8> {
        let mut out = Vec::new();
        for args in all {
            resp::command(&mut out, args);
        }
        out
    }

    fn bulk(value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        resp::bulk(&mut out, Some(value));
        out
    }

    fn ping() -> Vec<u8> {
        commands(&[&[b"PING"]])
    }

    /// Polls until a PING through `link` is answered; panics after [`DEADLINE`].
    async fn until_answered(link: &Link) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            match link.forward(ping(), 1).await {
                Ok(replies) => return assert_eq!(replies, b"+PONG\r\n"),
                Err(e) => assert!(Instant::now() < deadline, "still failing: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn batches_get_their_own_replies_in_order() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let link = Arc::new(link(&server, 0));

        // Queued one after the other, then awaited on tasks of their own spawned last first:
        // each still sees the counter as the batches before it left it.
        let queued: Vec<_> = (0..50)
            .map(|_| link.forward(commands(&[&[b"INCRBY", b"n", b"2"], &[b"GET", b"n"]]), 2))
            .collect();
        let mut tasks: Vec<_> = queued.into_iter().rev().map(tokio::spawn).collect();
        tasks.reverse();
        for (i, task) in tasks.into_iter().enumerate() {
            let n = (2 * (i + 1)).to_string();
            let mut want = format!(":{n}\r\n").into_bytes();
            want.extend(bulk(n.as_bytes()));
            assert_eq!(task.await.unwrap().unwrap(), want, "batch {i}");
        }

        // Several tasks at once, each on keys of its own, ten batches queued at a time.
        let tasks: Vec<_> = (0..8)
            .map(|t| {
                let link = Arc::clone(&link);
                tokio::spawn(async move {
                    let mut sum = 0;
                    for round in 0..20 {
                        let mut queued = Vec::new();
                        for i in round * 10..round * 10 + 10 {
                            let key = format!("k{t}-{i}");
                            let value = format!("value {t} {i}\r\n");
                            let batch = commands(&[
                                &[b"SET", key.as_bytes(), value.as_bytes()],
                                &[b"GET", key.as_bytes()],
                                &[
                                    b"INCRBY",
                                    format!("c{t}").as_bytes(),
                                    i.to_string().as_bytes(),
                                ],
                                &[b"INCRBY", key.as_bytes(), b"1"],
                                &[b"GET", format!("missing{t}-{i}").as_bytes()],
                                &[b"DEL", key.as_bytes()],
                            ]);
                            sum += i;
                            let mut want = b"+OK\r\n".to_vec();
                            want.extend(bulk(value.as_bytes()));
                            write!(want, ":{sum}\r\n").unwrap();
                            want.extend(b"-ERR value is not an integer or out of range\r\n");
                            want.extend(b"$-1\r\n:1\r\n");
                            queued.push((link.forward(batch, 6), want));
                        }
                        for (forwarded, want) in queued {
                            let got = forwarded.await.unwrap();
                            assert_eq!(
                                String::from_utf8_lossy(&got),
                                String::from_utf8_lossy(&want),
                                "task {t}"
                            );
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_batch_larger_than_the_socket_buffers_goes_through() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let link = link(&server, 0);
        let keys: Vec<String> = (0..2000).map(|i| format!("key{i}")).collect();
        let values: Vec<Vec<u8>> = (0..2000u32)
            .map(|i| (0..1024u32).map(|j| b'a' + ((i + j) % 26) as u8).collect())
            .collect();
        let mut batch = Vec::new();
        let mut want = Vec::new();
        for (key, value) in keys.iter().zip(&values) {
            resp::command(&mut batch, &[b"SET", key.as_bytes(), value]);
            want.extend(b"+OK\r\n");
        }
        for (key, value) in keys.iter().zip(&values) {
            resp::command(&mut batch, &[b"GET", key.as_bytes()]);
            want.extend(bulk(value));
        }
        // A small batch queued behind the big one is answered after it, with its own reply.
        let big = link.forward(batch, 4000);
        let small = link.forward(commands(&[&[b"GET", b"key1999"]]), 1);
        let got = big.await.unwrap();
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the replies differ");
        assert_eq!(small.await.unwrap(), bulk(&values[1999]));
    }

    #[tokio::test]
    async fn a_killed_redis_fails_calls_at_once_and_a_restarted_one_answers() {
        let Some(mut server) = RedisServer::start().await else {
            return;
        };
        let link = link(&server, 0);
        until_answered(&link).await;
        // A call that waits: BLPOP with no timeout, which only the kill ends.
        let waiting = link.forward(commands(&[&[b"BLPOP", b"list", b"0"]]), 1);
        let deadline = Instant::now() + DEADLINE;
        while !query::<String>(&server, 0, &["INFO", "clients"])
            .is_ok_and(|info| info.contains("blocked_clients:1"))
        {
            assert!(Instant::now() < deadline, "BLPOP never blocked");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }

        server.kill();
        let killed = Instant::now();
        let e = waiting.await.unwrap_err();
        assert!(matches!(e, StateError::Unavailable { .. }), "{e:?}");
        let message = e.to_string();
        assert!(
            message.contains("unreachable: the connection was closed"),
            "{message}"
        );
        // Later calls: the connection attempt is refused, then the backoff refuses at once.
        for _ in 0..3 {
            let e = link.forward(ping(), 1).await.unwrap_err();
            assert!(matches!(e, StateError::Unavailable { .. }), "{e:?}");
            let message = e.to_string();
            assert!(
                message.contains("unreachable: connecting failed"),
                "{message}"
            );
        }
        assert!(
            killed.elapsed() < Duration::from_secs(1),
            "{:?}",
            killed.elapsed()
        );

        server.restart().await;
        until_answered(&link).await;
    }

    #[tokio::test]
    async fn the_password_and_db_of_the_url_are_used() {
        let Some(server) = RedisServer::start_with(&["--requirepass", "secret"]).await else {
            return;
        };
        let link = link(&server, 3);
        let set = commands(&[&[b"SET", b"where", b"db 3"]]);
        assert_eq!(link.forward(set, 1).await.unwrap(), b"+OK\r\n");
        let in_db = |db| query::<Option<String>>(&server, db, &["GET", "where"]).unwrap();
        assert_eq!(in_db(3).as_deref(), Some("db 3"));
        assert_eq!(in_db(0), None);

        // With the user named, as Redis 6 ACLs take it.
        let client = redis::Client::open(format!(
            "redis://default:secret@127.0.0.1:{}/3",
            server.port
        ))
        .unwrap();
        let named = Link::new(&client, "redis://127.0.0.1/3".to_owned());
        let get = commands(&[&[b"GET", b"where"]]);
        assert_eq!(named.forward(get, 1).await.unwrap(), bulk(b"db 3"));

        let wrong = link_with(&server, "wrong", 3);
        let e = wrong.forward(ping(), 1).await.unwrap_err();
        assert!(matches!(e, StateError::Unavailable { .. }), "{e:?}");
        let message = e.to_string();
        assert!(message.contains("it refused AUTH: WRONGPASS"), "{message}");
    }

    #[tokio::test]
    async fn a_hung_redis_fails_waiting_calls_after_the_timeout() {
        let Some(server) = RedisServer::start().await else {
            return;
        };
        let link = link(&server, 0);
        until_answered(&link).await;

        server.signal("-STOP");
        let stopped = Instant::now();
        let first = link.forward(ping(), 1);
        let second = link.forward(commands(&[&[b"GET", b"k"]]), 1);
        for waiting in [first, second] {
            let e = waiting.await.unwrap_err();
            assert!(matches!(e, StateError::Unavailable { .. }), "{e:?}");
            let message = e.to_string();
            assert!(
                message.contains("unreachable: no answer within 2 s"),
                "{message}"
            );
        }
        let took = stopped.elapsed();
        assert!(
            took >= COMMAND_TIMEOUT && took < COMMAND_TIMEOUT + Duration::from_millis(1500),
            "{took:?}"
        );

        server.signal("-CONT");
        until_answered(&link).await;
    }
}
