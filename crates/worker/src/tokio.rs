//! The same as the blocking API, for tokio programs (feature `tokio`): [`incoming`] gives
//! [`Stream`]s, ready for hyper, axum or any tokio server, [`shutdown`] completes when the
//! worker should stop taking work, and [`state`] and [`bus`] make their calls without blocking
//! (any number may be in flight at once: that pipelines them).
//!
//! ```no_run
//! # async fn serve(_: corral_worker::tokio::Stream) {}
//! # async fn run() -> std::io::Result<()> {
//! let mut incoming = corral_worker::tokio::incoming("127.0.0.1:8080")?;
//! corral_worker::ready()?;
//! let shutdown = corral_worker::tokio::shutdown();
//! tokio::pin!(shutdown);
//! loop {
//!     tokio::select! {
//!         next = incoming.accept() => match next {
//!             Some(Ok(stream)) => { tokio::spawn(serve(stream)); }
//!             Some(Err(e)) => eprintln!("accept: {e}"),
//!             None => break,
//!         },
//!         () = &mut shutdown => break,
//!     }
//! }
//! // Finish the open connections, then return.
//! # Ok(())
//! # }
//! ```

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ::tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use ::tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use corral_proto::channel::StateCall;
use serde_json::Value;

use crate::channel::calls::{self, Answers, DEFAULT_CALL_TIMEOUT, decode};
use crate::channel::feeds::Feed;
use crate::channel::{self, Channel, CloseReport};
use crate::incoming::Source;
use crate::{CallError, Listener, Message, Published, Request};

/// This worker's incoming connections, as [`crate::incoming`] finds them. Call it within a
/// tokio runtime.
pub fn incoming(fallback: &str) -> io::Result<Incoming> {
    let source = match Source::find(fallback)? {
        Source::Channel(channel) => Inner::Channel(channel),
        Source::Listeners(listeners) => {
            let mut watched = Vec::new();
            for listener in listeners {
                watched.push(match listener {
                    Listener::Tcp(tcp) => {
                        tcp.set_nonblocking(true)?;
                        Watched::Tcp(TcpListener::from_std(tcp)?)
                    }
                    Listener::Unix(unix) => {
                        unix.set_nonblocking(true)?;
                        Watched::Unix(UnixListener::from_std(unix)?)
                    }
                });
            }
            Inner::Listeners(watched)
        }
    };
    let shutdown = match (&source, channel::get()) {
        (Inner::Listeners(_), Some(channel)) => {
            Some(Box::pin(channel.shutdown_notice()) as Pin<Box<dyn Future<Output = ()> + Send>>)
        }
        _ => None,
    };
    Ok(Incoming { source, shutdown })
}

/// The connections of this worker: see [`incoming`].
pub struct Incoming {
    source: Inner,
    /// Accepting on listeners: completes when a shutdown begins.
    shutdown: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
enum Inner {
    Channel(&'static Channel),
    Listeners(Vec<Watched>),
}

#[derive(Debug)]
enum Watched {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Incoming {
    /// The next connection; `None` once a shutdown began (the master's notice, or [`shutdown`]
    /// saw a signal): connections the master still hands over then go to other workers.
    pub async fn accept(&mut self) -> Option<io::Result<Stream>> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }

    /// The polling form of [`Incoming::accept`].
    pub fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Stream>>> {
        match &self.source {
            Inner::Channel(channel) => channel.poll_next(cx).map(|next| {
                next.map(|handed| {
                    let handed = handed?;
                    let (id, listener) = (handed.id, handed.listener);
                    let io = match crate::incoming::Stream::from_fd(handed.fd)? {
                        crate::incoming::Stream::Tcp(s) => Io::Tcp(TcpStream::from_std(s)?),
                        crate::incoming::Stream::Unix(s) => Io::Unix(UnixStream::from_std(s)?),
                    };
                    Ok(Stream {
                        io,
                        listener,
                        _report: CloseReport::for_connection(id),
                    })
                })
            }),
            Inner::Listeners(listeners) => {
                if let Some(shutdown) = &mut self.shutdown
                    && shutdown.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(None);
                }
                for (n, listener) in listeners.iter().enumerate() {
                    let accepted = match listener {
                        Watched::Tcp(l) => l.poll_accept(cx).map_ok(|(s, _)| Io::Tcp(s)),
                        Watched::Unix(l) => l.poll_accept(cx).map_ok(|(s, _)| Io::Unix(s)),
                    };
                    if let Poll::Ready(result) = accepted {
                        return Poll::Ready(Some(result.map(|io| Stream {
                            io,
                            listener: n as u32,
                            _report: None,
                        })));
                    }
                }
                Poll::Pending
            }
        }
    }

    /// The address of the first TCP socket connections arrive on, when the worker accepts them
    /// itself (not in `rr` or `least-conn` mode, where the master does).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.source {
            Inner::Channel(_) => None,
            Inner::Listeners(listeners) => listeners.iter().find_map(|l| match l {
                Watched::Tcp(tcp) => tcp.local_addr().ok(),
                Watched::Unix(_) => None,
            }),
        }
    }
}

/// Completes when this worker should stop taking work: the master's `shutdown` notice (a
/// reload, `stop`, `scale`), SIGTERM or SIGINT. From then on [`Incoming::accept`] returns `None`
/// and connections still handed over go back to the master for another worker.
pub async fn shutdown() {
    use ::tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let notice = async {
        match channel::get() {
            Some(channel) => {
                channel.listen();
                channel.shutdown_notice().await;
            }
            None => std::future::pending().await,
        }
    };
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            ::tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                () = notice => {}
            }
        }
        _ => notice.await,
    }
    if let Some(channel) = channel::get() {
        channel.shut_down();
    }
}

/// The next message the master sent this worker (`corral send <app> <json>`, or another worker
/// on the bus); `None` when the master is gone. Outside corral it never completes. One task at a
/// time waits for messages (this or [`next_message`]).
pub async fn message() -> Option<serde_json::Value> {
    next_message().await.map(|message| message.data)
}

/// As [`message`], with the sender: `worker:<id>` for a message on the bus, `cli` for
/// `corral send`. Requests (which expect an answer) come through [`Bus::next_request`] instead.
pub async fn next_message() -> Option<Message> {
    match channel::get() {
        Some(channel) => {
            channel.listen();
            std::future::poll_fn(|cx| channel.poll_message(cx)).await
        }
        None => std::future::pending().await,
    }
}

/// The shared state, for async code: the same calls as [`crate::state`], as `async fn`s. Call it
/// within a tokio runtime (the channel is then read by a task of that runtime). Any number of
/// calls may be in flight at once, from any number of tasks: each waits for its own answer.
///
/// ```no_run
/// # async fn run() -> Result<(), corral_worker::CallError> {
/// let state = corral_worker::tokio::state();
/// let (a, b) = tokio::join!(state.incr("hits", 1), state.get("motd"));
/// let mut news = state.subscribe("news.*").await?;
/// while let Some(published) = news.next().await {
///     println!("{}: {}", published.channel, published.message);
/// }
/// # Ok(())
/// # }
/// ```
pub fn state() -> State {
    State::on(listening())
}

/// The bus, for async code: the same calls as [`crate::bus`], as `async fn`s. Call it within a
/// tokio runtime.
pub fn bus() -> Bus {
    Bus::on(listening())
}

/// The channel, read from now on, when there is one.
fn listening() -> Option<&'static Channel> {
    let channel = channel::get()?;
    channel.listen();
    Some(channel)
}

/// The shared state, for async code: see [`state`] and, for what each call does,
/// [`crate::State`].
#[derive(Debug, Clone, Copy)]
pub struct State {
    channel: Option<&'static Channel>,
    timeout: Duration,
}

impl State {
    pub(crate) fn on(channel: Option<&'static Channel>) -> State {
        State {
            channel,
            timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// The same handle, whose calls give up with [`CallError::Timeout`] after `timeout` instead
    /// of [`DEFAULT_CALL_TIMEOUT`] (`Duration::MAX`: never).
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> State {
        State { timeout, ..self }
    }

    /// The value of `key`, or `None` when it is not set.
    pub async fn get(&self, key: &str) -> Result<Option<String>, CallError> {
        let call = StateCall::Get {
            key: key.to_string(),
        };
        decode::optional_string(self.call(call).await)
    }

    /// Sets `key` to `value`.
    pub async fn set(&self, key: &str, value: &str) -> Result<(), CallError> {
        decode::done("set", self.call(crate::state::set(key, value, None)).await)
    }

    /// Sets `key` to `value` for `ttl` (rounded up to a millisecond).
    pub async fn set_with_ttl(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<(), CallError> {
        let call = crate::state::set(key, value, Some(ttl));
        decode::done("set", self.call(call).await)
    }

    /// Removes `key`; whether it was set.
    pub async fn del(&self, key: &str) -> Result<bool, CallError> {
        let call = StateCall::Del {
            key: key.to_string(),
        };
        decode::boolean("del", self.call(call).await)
    }

    /// Adds `by` to the integer in `key` (a missing key counts as 0); the new value.
    pub async fn incr(&self, key: &str, by: i64) -> Result<i64, CallError> {
        let call = StateCall::Incr {
            key: key.to_string(),
            by,
        };
        decode::integer(self.call(call).await)
    }

    /// Sets `key` to `new` (removes it with `None`) only if its value is `expected` (`None`:
    /// only if it is not set); whether it did.
    pub async fn cas(
        &self,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<bool, CallError> {
        let call = crate::state::cas(key, expected, new);
        decode::boolean("cas", self.call(call).await)
    }

    /// The keys matching a glob `pattern`, sorted.
    pub async fn keys(&self, pattern: &str) -> Result<Vec<String>, CallError> {
        let call = StateCall::Keys {
            pattern: pattern.to_string(),
        };
        decode::strings(self.call(call).await)
    }

    /// Publishes `message` on `channel`; how many subscriptions got it.
    pub async fn publish(&self, channel: &str, message: &str) -> Result<u64, CallError> {
        let call = StateCall::Publish {
            channel: channel.to_string(),
            message: message.to_string(),
        };
        decode::count(self.call(call).await)
    }

    /// Subscribes to the channels matching a glob `pattern`: the messages published on them
    /// from the moment this completes. Dropping the subscription unsubscribes.
    pub async fn subscribe(&self, pattern: &str) -> Result<Subscription, CallError> {
        let channel = self.channel.ok_or(CallError::NotUnderCorral)?;
        let (feed, call) = channel.open_feed(pattern)?;
        // Made first: if this future is dropped, or the call fails, dropping it takes the feed
        // back out.
        let subscription = Subscription {
            pattern: pattern.to_string(),
            feed,
            channel,
        };
        if let Some(call) = call {
            let answer = calls::single(Answers::new(channel, call).within(self.timeout).await);
            decode::done("subscribe", answer)?;
        }
        Ok(subscription)
    }

    /// One call, as [`corral_proto::channel::StateCall`] describes it; its answer as JSON.
    pub async fn call(&self, call: StateCall) -> Result<Value, CallError> {
        calls::single(self.call_many(vec![call]).await)
    }

    /// Many calls, written in one go, then awaited together: see [`crate::State::call_many`].
    /// Dropping the future gives up on the answers still to come.
    pub async fn call_many(&self, calls: Vec<StateCall>) -> Vec<Result<Value, CallError>> {
        let Some(channel) = self.channel else {
            return calls
                .iter()
                .map(|_| Err(CallError::NotUnderCorral))
                .collect();
        };
        let batch = channel.call_state(calls);
        Answers::new(channel, batch).within(self.timeout).await
    }
}

/// The messages published on the channels matching a pattern, for async code: see
/// [`State::subscribe`]. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    pattern: String,
    feed: Arc<Feed>,
    channel: &'static Channel,
}

impl Subscription {
    /// The pattern subscribed to.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The next message; `None` once the channel to corral closed (and the messages that came
    /// before were taken). When more than 4096 wait, the oldest are dropped.
    pub async fn next(&mut self) -> Option<Published> {
        std::future::poll_fn(|cx| self.feed.poll_next(cx)).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.channel.close_feed(&self.pattern, &self.feed);
    }
}

/// The bus, for async code: see [`bus`] and, for what each call does, [`crate::Bus`].
#[derive(Debug, Clone, Copy)]
pub struct Bus {
    channel: Option<&'static Channel>,
}

impl Bus {
    pub(crate) fn on(channel: Option<&'static Channel>) -> Bus {
        Bus { channel }
    }

    /// Sends `data` to `to` (`agent`, `workers`, `worker:<id>`, `app:<name>`, `all`); how many
    /// got it. Waits for corral's answer at most [`DEFAULT_CALL_TIMEOUT`].
    pub async fn send(&self, to: &str, data: Value) -> Result<u64, CallError> {
        let channel = self.channel.ok_or(CallError::NotUnderCorral)?;
        let batch = channel.call_send(to, data, None);
        let answers = Answers::new(channel, batch).within(DEFAULT_CALL_TIMEOUT);
        decode::delivered(calls::single(answers.await))
    }

    /// Sends request `data` to `to` and waits at most `timeout` for its answer (or answers): see
    /// [`crate::Bus::request`].
    pub async fn request(
        &self,
        to: &str,
        data: Value,
        timeout: Duration,
    ) -> Result<Value, CallError> {
        let channel = self.channel.ok_or(CallError::NotUnderCorral)?;
        let batch = channel.call_send(to, data, Some(timeout));
        let waited = timeout.saturating_add(crate::bus::REQUEST_GRACE);
        calls::single(Answers::new(channel, batch).within(waited).await)
    }

    /// The next request for this worker; `None` when the channel to corral closed. Outside
    /// corral it never completes. One task at a time waits for requests.
    pub async fn next_request(&self) -> Option<Request> {
        match self.channel {
            Some(channel) => std::future::poll_fn(|cx| channel.poll_request(cx))
                .await
                .map(|asked| Request::new(channel, asked)),
            None => std::future::pending().await,
        }
    }
}

/// One client connection. In `least-conn` mode, dropping it tells the master it closed.
#[derive(Debug)]
pub struct Stream {
    io: Io,
    listener: u32,
    _report: Option<CloseReport>,
}

#[derive(Debug)]
enum Io {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// The TCP socket, when it is one (for `peer_addr`, `set_nodelay`, ...).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match &self.io {
            Io::Tcp(s) => Some(s),
            Io::Unix(_) => None,
        }
    }

    /// Index of the listening address it came in on (the order of the app's `--listen`).
    pub fn listener(&self) -> u32 {
        self.listener
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Io::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_flush(cx),
            Io::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Io::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Tcp(s) => s.is_write_vectored(),
            Io::Unix(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::thread;

    use corral_proto::channel::WorkerMessage;
    use serde_json::json;

    use super::*;
    use crate::channel::testing::{answer, read_call, read_message, unread_channel, write_frame};

    /// A channel read by a task of the test's runtime, as in an async program.
    fn channel() -> (&'static Channel, UnixStream) {
        let (channel, master) = unread_channel();
        channel.listen();
        (channel, master)
    }

    #[tokio::test]
    async fn a_worker_writing_more_calls_than_the_socket_holds_reads_on_meanwhile() {
        // The runtime's one thread runs the reader task and the call, whose writing waits for
        // room: the master (a thread) first writes 8 MiB of messages, reading nothing; it gets
        // them out only if the worker reads while it waits to write its calls. (Like the real
        // master, which stops reading a worker that leaves answers unread.)
        let (channel, master) = channel();
        master
            .set_write_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        let state = State::on(Some(channel));
        let calls = 20_000;
        let master = thread::spawn(move || {
            let message = json!({"type": "message", "data": "x".repeat(1000)});
            for _ in 0..8 * 1024 {
                write_frame(&master, &message);
            }
            for _ in 0..calls {
                let (id, _) = read_call(&master);
                answer(&master, id, &json!(null));
            }
        });
        let gets = (0..calls)
            .map(|i| StateCall::Get {
                key: format!("key:{i:020}"),
            })
            .collect();
        let answers = state.call_many(gets).await;
        assert_eq!(answers.len(), calls);
        assert!(
            answers.iter().all(|a| *a == Ok(Value::Null)),
            "{:?}",
            answers[0]
        );
        master.join().unwrap();
        assert_eq!(channel.pending_len(), 0);
    }

    #[tokio::test]
    async fn many_calls_in_flight_each_get_their_answer() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        // The master (a thread: the runtime's one thread runs the calls and the reader) waits
        // for all 64 calls before it answers any, then answers them last to first.
        let master = thread::spawn(move || {
            let mut calls: Vec<(u64, StateCall)> = (0..64).map(|_| read_call(&master)).collect();
            calls.reverse();
            for (id, call) in calls {
                let StateCall::Incr { key, by } = call else {
                    panic!("{call:?}")
                };
                let n: i64 = key.trim_start_matches('k').parse().unwrap();
                answer(&master, id, &json!(n * 1000 + by));
            }
            master
        });
        let mut tasks = ::tokio::task::JoinSet::new();
        for n in 0..64i64 {
            tasks.spawn(async move { (n, state.incr(&format!("k{n}"), 1).await) });
        }
        while let Some(done) = tasks.join_next().await {
            let (n, answer) = done.unwrap();
            assert_eq!(answer, Ok(n * 1000 + 1));
        }
        let _master = master.join().unwrap();
        assert_eq!(channel.pending_len(), 0);
    }

    #[tokio::test]
    async fn a_dropped_call_leaves_nothing_behind_and_the_channel_closing_ends_the_rest() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let given_up = ::tokio::time::timeout(Duration::from_millis(20), state.get("slow")).await;
        assert!(given_up.is_err());
        assert_eq!(channel.pending_len(), 0);
        let impatient = state.with_timeout(Duration::from_millis(20));
        assert_eq!(impatient.get("slower").await, Err(CallError::Timeout));
        assert_eq!(channel.pending_len(), 0);

        let waiting = ::tokio::spawn(async move {
            state
                .call_many(vec![StateCall::Get { key: "a".into() }; 3])
                .await
        });
        let master = thread::spawn(move || {
            read_call(&master);
            read_call(&master);
            for _ in 0..3 {
                read_call(&master);
            }
            // Gone without answering.
        });
        let answers = waiting.await.unwrap();
        assert_eq!(answers, vec![Err(CallError::ChannelClosed); 3]);
        master.join().unwrap();
        assert_eq!(state.incr("a", 1).await, Err(CallError::ChannelClosed));
        assert_eq!(channel.pending_len(), 0);
    }

    #[tokio::test]
    async fn an_async_subscription_gets_its_messages_and_unsubscribes_when_dropped() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let master = thread::spawn(move || {
            let (id, call) = read_call(&master);
            assert_eq!(
                call,
                StateCall::Subscribe {
                    pattern: "jobs".into()
                }
            );
            write_frame(&master, &json!({"type": "state", "id": id, "ok": true}));
            write_frame(
                &master,
                &json!({"type": "published", "pattern": "jobs", "channel": "jobs",
                        "message": "7"}),
            );
            read_call(&master).1
        });
        let mut subscription = state.subscribe("jobs").await.unwrap();
        let published = subscription.next().await.unwrap();
        assert_eq!(
            (published.channel.as_str(), published.message.as_str()),
            ("jobs", "7")
        );
        drop(subscription);
        let unsubscribe = ::tokio::task::spawn_blocking(move || master.join().unwrap())
            .await
            .unwrap();
        assert_eq!(
            unsubscribe,
            StateCall::Unsubscribe {
                pattern: "jobs".into()
            }
        );
    }

    #[tokio::test]
    async fn async_requests_both_ways() {
        let (channel, master) = channel();
        let bus = Bus::on(Some(channel));
        let master = thread::spawn(move || {
            let WorkerMessage::Send { id, to, .. } = read_message(&master) else {
                panic!("expected a send")
            };
            assert_eq!(to, "agent");
            write_frame(
                &master,
                &json!({"type": "reply", "id": id, "data": "leased"}),
            );
            write_frame(
                &master,
                &json!({"type": "message", "data": "status?", "from": "worker:9",
                        "request": 3}),
            );
            read_message(&master)
        });
        let answer = bus
            .request("agent", json!({"lease": 1}), Duration::from_secs(20))
            .await;
        assert_eq!(answer, Ok(json!("leased")));
        let request = bus.next_request().await.unwrap();
        assert_eq!(request.from, "worker:9");
        request.reply(Ok(json!("fine"))).unwrap();
        let reply = ::tokio::task::spawn_blocking(move || master.join().unwrap())
            .await
            .unwrap();
        assert_eq!(
            reply,
            WorkerMessage::Reply {
                request: 3,
                data: json!("fine"),
                error: None
            }
        );
    }

    #[tokio::test]
    async fn outside_corral_async_calls_say_corral_is_needed() {
        let state = State::on(None);
        assert_eq!(state.get("a").await, Err(CallError::NotUnderCorral));
        assert!(state.subscribe("a").await.is_err());
        let bus = Bus::on(None);
        assert_eq!(
            bus.send("all", json!(1)).await,
            Err(CallError::NotUnderCorral)
        );
    }
}
