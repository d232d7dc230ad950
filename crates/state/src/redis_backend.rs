//! The Redis backend.
//!
//! Commands go through a [`ConnectionManager`]: one multiplexed connection shared by every call,
//! replaced in the background when it breaks. It is set to make a single connection attempt per
//! call (no retry loop inside a call), and every call is bounded by [`COMMAND_TIMEOUT`], so a
//! call during an outage fails fast with [`StateError::Unavailable`] and the first call after
//! Redis is back reconnects.
//!
//! Workers' batches of RESP commands go through a third connection, the [`crate::link::Link`],
//! as they came: the master reads neither the commands (beyond checking them, in
//! [`crate::Batch`]) nor Redis's replies.
//!
//! Pattern subscriptions live on a second connection owned by the [`Subscriber`] task, which
//! alone knows the set of patterns. Callers talk to it over a channel. While the connection is
//! up it forwards messages; when it breaks it reports `Disconnected`, reconnects with
//! exponential backoff (100 ms doubling to 5 s), subscribes every pattern again and reports
//! `Connected`. Events wait in a small outbox until the event channel has room, so the task
//! keeps answering subscribe calls even while the daemon is slow to drain events.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSub, PubSubSink};
use redis::{Client, ErrorKind, RedisError, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout};

use crate::{COMMAND_TIMEOUT, Checked, Op, Outcome, Published, StateError, StoreEvent};

/// First wait before reconnecting the pub/sub connection.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often an idle pub/sub connection is checked with PING.
const PING_EVERY: Duration = Duration::from_secs(5);
/// Messages read ahead from Redis while the event channel is full.
const OUTBOX_MAX: usize = 256;
/// Keys asked for per SCAN round trip.
const SCAN_COUNT: usize = 1000;

/// Compare-and-set. KEYS[1] the key; ARGV: has-expected flag, expected, has-new flag, new,
/// TTL in ms or "" for none. A key holding another type makes GET fail with WRONGTYPE.
const CAS_SCRIPT: &str = r"
local cur = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if cur ~= ARGV[2] then return 0 end
elseif cur then
  return 0
end
if ARGV[3] == '1' then
  if ARGV[5] ~= '' then
    redis.call('SET', KEYS[1], ARGV[4], 'PX', ARGV[5])
  else
    redis.call('SET', KEYS[1], ARGV[4])
  end
else
  redis.call('DEL', KEYS[1])
end
return 1
";

/// A request to the subscriber task.
#[derive(Debug)]
enum Control {
    Subscribe {
        pattern: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Unsubscribe {
        pattern: String,
        reply: oneshot::Sender<()>,
    },
}

/// The Redis backend of a `Store`.
pub(crate) struct Remote {
    url: String,
    conn: ConnectionManager,
    control: mpsc::Sender<Control>,
    cas: redis::Script,
    /// Workers' RESP commands, passed through.
    link: crate::link::Link,
}

impl Remote {
    pub(crate) async fn connect(
        raw: &str,
        events: mpsc::Sender<StoreEvent>,
    ) -> Result<Remote, StateError> {
        let url = parse_url(raw)?;
        let client = Client::open(raw).map_err(|e| StateError::BadUrl {
            url: redact(raw),
            reason: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let at_start = |e: RedisError| start_error(&url, &e);
        let conn = timeout(
            COMMAND_TIMEOUT,
            ConnectionManager::new_with_config(client.clone(), config),
        )
        .await
        .map_err(|_| no_answer(&url))?
        .map_err(at_start)?;
        let pubsub = timeout(COMMAND_TIMEOUT, client.get_async_pubsub())
            .await
            .map_err(|_| no_answer(&url))?
            .map_err(at_start)?;
        let link = crate::link::Link::new(&client, url.clone());
        let (control, control_rx) = mpsc::channel(64);
        let subscriber = Subscriber {
            client,
            commands: conn.clone(),
            url: url.clone(),
            events,
            events_open: true,
            outbox: VecDeque::new(),
            control: control_rx,
            desired: BTreeSet::new(),
            last_error: String::new(),
        };
        tokio::spawn(subscriber.run(pubsub));
        Ok(Remote {
            url,
            conn,
            control,
            cas: redis::Script::new(CAS_SCRIPT),
            link,
        })
    }

    /// Writes `commands` (`count` whole RESP commands, checked) to Redis after those forwarded
    /// before; their `count` replies as Redis wrote them.
    pub(crate) fn forward(
        &self,
        commands: Vec<u8>,
        count: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StateError>> + Send + 'static {
        self.link.forward(commands, count)
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Runs one command with the time limit. A refused connection means nothing was sent (the
    /// manager's cached connection attempt had failed), so it is tried once more: that second
    /// try waits for the fresh attempt the first failure started, which succeeds when Redis is
    /// back.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, StateError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_with(call, false).await
    }

    /// [`run`](Self::run) for a command that may be done twice with the same effect and answer
    /// (GET, SET, SCAN): it is also tried once more when the connection turns out to be dropped,
    /// as it is on the first call after Redis restarted while this store was idle. Other
    /// commands fail then, since Redis may have done them before the connection broke.
    async fn run_idempotent<T, F, Fut>(&self, call: F) -> Result<T, StateError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        self.run_with(call, true).await
    }

    async fn run_with<T, F, Fut>(&self, call: F, idempotent: bool) -> Result<T, StateError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let attempt = async {
            match call(self.conn.clone()).await {
                Err(e) if e.is_connection_refusal() => call(self.conn.clone()).await,
                Err(e) if idempotent && e.is_connection_dropped() => call(self.conn.clone()).await,
                other => other,
            }
        };
        match timeout(COMMAND_TIMEOUT, attempt).await {
            Err(_) => Err(no_answer(&self.url)),
            Ok(Err(e)) => Err(self.error(&e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Sorts a Redis error into "Redis is unreachable" or "Redis refused it".
    fn error(&self, e: &RedisError) -> StateError {
        if is_outage(e) {
            StateError::Unavailable {
                url: self.url.clone(),
                reason: e.to_string(),
            }
        } else {
            StateError::Redis {
                url: self.url.clone(),
                reason: e.to_string(),
            }
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        let value: Option<Vec<u8>> = self
            .run_idempotent(
                |mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await },
            )
            .await?;
        value
            .map(|v| {
                String::from_utf8(v).map_err(|_| StateError::NotUtf8 {
                    key: key.to_owned(),
                })
            })
            .transpose()
    }

    pub(crate) async fn set(
        &self,
        key: &str,
        value: &str,
        ttl_ms: Option<u64>,
    ) -> Result<(), StateError> {
        self.run_idempotent(|mut c| async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg(value);
            if let Some(ms) = ttl_ms {
                cmd.arg("PX").arg(ms);
            }
            cmd.query_async::<()>(&mut c).await
        })
        .await
    }

    pub(crate) async fn del(&self, key: &str) -> Result<bool, StateError> {
        let n: i64 = self
            .run(|mut c| async move { redis::cmd("DEL").arg(key).query_async(&mut c).await })
            .await?;
        Ok(n > 0)
    }

    pub(crate) async fn incr(&self, key: &str, by: i64) -> Result<i64, StateError> {
        let result = self
            .run(|mut c| async move {
                redis::cmd("INCRBY")
                    .arg(key)
                    .arg(by)
                    .query_async(&mut c)
                    .await
            })
            .await;
        result.map_err(|e| incr_error(key, e))
    }

    pub(crate) async fn cas(
        &self,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
        ttl_ms: Option<u64>,
    ) -> Result<bool, StateError> {
        let ttl = ttl_ms.map(|ms| ms.to_string()).unwrap_or_default();
        let swapped: i64 = self
            .run(|mut c| {
                let mut invocation = self.cas.key(key);
                invocation
                    .arg(if expected.is_some() { "1" } else { "0" })
                    .arg(expected.unwrap_or(""))
                    .arg(if new.is_some() { "1" } else { "0" })
                    .arg(new.unwrap_or(""))
                    .arg(ttl.as_str());
                async move { invocation.invoke_async(&mut c).await }
            })
            .await?;
        Ok(swapped == 1)
    }

    pub(crate) async fn keys(&self, pattern: &str) -> Result<Vec<String>, StateError> {
        // SCAN may return a key more than once; the set removes duplicates and sorts.
        let mut keys = BTreeSet::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<Vec<u8>>) = self
                .run_idempotent(|mut c| async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async(&mut c)
                        .await
                })
                .await?;
            keys.extend(batch.into_iter().filter_map(|k| String::from_utf8(k).ok()));
            if next == 0 {
                return Ok(keys.into_iter().collect());
            }
            cursor = next;
        }
    }

    pub(crate) async fn publish(&self, channel: &str, message: &str) -> Result<u64, StateError> {
        let n: u64 = self
            .run(|mut c| async move {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(message)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(n)
    }

    /// The ops that passed the limits as one pipeline; each result in its place.
    pub(crate) async fn pipeline(
        &self,
        ops: Vec<Result<Checked, StateError>>,
    ) -> Vec<Result<Outcome, StateError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        if ops.iter().flatten().any(|c| matches!(c.op, Op::Cas { .. })) {
            // EVALSHA needs the script in Redis's cache, which a restart empties.
            pipe.load_script(&self.cas).ignore();
        }
        for checked in ops.iter().flatten() {
            self.add(&mut pipe, checked);
        }
        let sent = ops.iter().flatten().count();
        let mut replies = if sent == 0 {
            Ok(Vec::new())
        } else {
            let idempotent = ops
                .iter()
                .flatten()
                .all(|c| matches!(c.op, Op::Get { .. } | Op::Set { .. }));
            let call = |mut c: ConnectionManager| {
                let pipe = &pipe;
                async move { pipe.query_async::<Vec<Value>>(&mut c).await }
            };
            self.run_with(call, idempotent).await
        };
        if let Ok(values) = &replies
            && values.len() != sent
        {
            replies = Err(StateError::Redis {
                url: self.url.clone(),
                reason: format!("{} replies came for {sent} commands", values.len()),
            });
        }
        let mut values = match replies {
            Ok(values) => Ok(values.into_iter()),
            Err(e) => Err(e),
        };
        ops.into_iter()
            .map(|op| {
                let op = op?;
                match &mut values {
                    Ok(values) => self.outcome(op, values.next().unwrap_or(Value::Nil)),
                    Err(e) => Err(again(e)),
                }
            })
            .collect()
    }

    /// Adds the command of one op to `pipe`.
    fn add(&self, pipe: &mut redis::Pipeline, checked: &Checked) {
        match &checked.op {
            Op::Get { key } => {
                pipe.cmd("GET").arg(key);
            }
            Op::Set { key, value, .. } => {
                pipe.cmd("SET").arg(key).arg(value);
                if let Some(ms) = checked.ttl_ms {
                    pipe.arg("PX").arg(ms);
                }
            }
            Op::Del { key } => {
                pipe.cmd("DEL").arg(key);
            }
            Op::Incr { key, by } => {
                pipe.cmd("INCRBY").arg(key).arg(*by);
            }
            Op::Cas {
                key, expected, new, ..
            } => {
                let ttl = checked.ttl_ms.map(|ms| ms.to_string()).unwrap_or_default();
                let mut invocation = self.cas.key(key);
                invocation
                    .arg(if expected.is_some() { "1" } else { "0" })
                    .arg(expected.as_deref().unwrap_or(""))
                    .arg(if new.is_some() { "1" } else { "0" })
                    .arg(new.as_deref().unwrap_or(""))
                    .arg(ttl.as_str());
                pipe.invoke_script(&invocation);
            }
            Op::Publish { channel, message } => {
                pipe.cmd("PUBLISH").arg(channel).arg(message);
            }
        }
    }

    /// What Redis's reply to one op of a pipeline means.
    fn outcome(&self, checked: Checked, value: Value) -> Result<Outcome, StateError> {
        let refused = |e: RedisError| self.error(&e);
        let value = match value {
            Value::ServerError(e) => Err(refused(e.into())),
            value => Ok(value),
        };
        let number = |value: Result<Value, StateError>| -> Result<i64, StateError> {
            redis::from_redis_value::<i64>(value?).map_err(|e| StateError::Redis {
                url: self.url.clone(),
                reason: format!("an unexpected reply: {e}"),
            })
        };
        match checked.op {
            Op::Get { key } => match value? {
                Value::Nil => Ok(Outcome::Value(None)),
                Value::BulkString(bytes) => String::from_utf8(bytes)
                    .map(|v| Outcome::Value(Some(v)))
                    .map_err(|_| StateError::NotUtf8 { key }),
                other => Err(StateError::Redis {
                    url: self.url.clone(),
                    reason: format!("an unexpected reply to GET: {other:?}"),
                }),
            },
            Op::Set { .. } => value.map(|_| Outcome::Done),
            Op::Del { .. } => Ok(Outcome::Yes(number(value)? > 0)),
            Op::Incr { key, .. } => number(value)
                .map(Outcome::Number)
                .map_err(|e| incr_error(&key, e)),
            Op::Cas { .. } => Ok(Outcome::Yes(number(value)? == 1)),
            Op::Publish { .. } => Ok(Outcome::Count(number(value)?.unsigned_abs())),
        }
    }

    pub(crate) async fn subscribe(&self, pattern: &str) -> Result<(), StateError> {
        let (reply, answer) = oneshot::channel();
        let request = Control::Subscribe {
            pattern: pattern.to_owned(),
            reply,
        };
        let asked = async {
            self.control.send(request).await.ok()?;
            answer.await.ok()
        };
        match timeout(COMMAND_TIMEOUT, asked).await {
            Ok(Some(Ok(()))) => Ok(()),
            Ok(Some(Err(reason))) => Err(StateError::Unavailable {
                url: self.url.clone(),
                reason,
            }),
            Ok(None) => Err(StateError::Unavailable {
                url: self.url.clone(),
                reason: "the pub/sub task has stopped".to_owned(),
            }),
            Err(_) => Err(no_answer(&self.url)),
        }
    }

    pub(crate) async fn unsubscribe(&self, pattern: &str) {
        let (reply, answer) = oneshot::channel();
        let request = Control::Unsubscribe {
            pattern: pattern.to_owned(),
            reply,
        };
        let asked = async {
            if self.control.send(request).await.is_ok() {
                let _ = answer.await;
            }
        };
        // The task answers at once in every state; the limit is only a backstop.
        let _ = timeout(COMMAND_TIMEOUT, asked).await;
    }
}

/// INCRBY's refusals in corral's words.
fn incr_error(key: &str, e: StateError) -> StateError {
    match e {
        StateError::Redis { reason, .. } if reason.contains("not an integer") => {
            StateError::NotInteger {
                key: key.to_owned(),
            }
        }
        StateError::Redis { reason, .. } if reason.contains("overflow") => StateError::Overflow {
            key: key.to_owned(),
        },
        other => other,
    }
}

/// The same error again, for every op of a pipeline that failed as a whole (which `run` reports
/// as `Unavailable` or `Redis`).
fn again(e: &StateError) -> StateError {
    match e {
        StateError::Redis { url, reason } => StateError::Redis {
            url: url.clone(),
            reason: reason.clone(),
        },
        StateError::Unavailable { url, reason } => StateError::Unavailable {
            url: url.clone(),
            reason: reason.clone(),
        },
        other => StateError::Unavailable {
            url: String::new(),
            reason: other.to_string(),
        },
    }
}

/// True for errors that mean "Redis cannot serve now", as opposed to "Redis refused this".
fn is_outage(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::BusyLoading
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::MasterDown
            )
        )
}

fn no_answer(url: &str) -> StateError {
    StateError::Unavailable {
        url: url.to_owned(),
        reason: format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
    }
}

/// An error while connecting at start: unreachable, or reachable but refusing us (password,
/// database number).
fn start_error(url: &str, e: &RedisError) -> StateError {
    if is_outage(e) {
        StateError::Unavailable {
            url: url.to_owned(),
            reason: e.to_string(),
        }
    } else {
        StateError::Redis {
            url: url.to_owned(),
            reason: format!("{e} (while connecting; check the password and the db number)"),
        }
    }
}

/// Validates a Redis URL and returns its printable form `redis://host:port/db`.
fn parse_url(raw: &str) -> Result<String, StateError> {
    let bad = |reason: &str| StateError::BadUrl {
        url: redact(raw),
        reason: reason.to_owned(),
    };
    if !raw.contains("://") {
        return Err(bad("it has no scheme; write it as redis://host:port/db"));
    }
    let url = url::Url::parse(raw).map_err(|e| bad(&e.to_string()))?;
    match url.scheme() {
        "redis" => {}
        "rediss" => {
            return Err(bad(
                "TLS (rediss://) is not supported; use redis:// on a trusted network",
            ));
        }
        "unix" | "redis+unix" => {
            return Err(bad("Unix sockets are not supported"));
        }
        _ => return Err(bad("the scheme must be redis://")),
    }
    let host = match url.host_str() {
        Some(h) if !h.is_empty() => h,
        _ => return Err(bad("the host is missing")),
    };
    let port = url.port().unwrap_or(6379);
    let db = match url.path().trim_start_matches('/') {
        "" => 0,
        db => db.parse::<u32>().map_err(|_| {
            bad(&format!(
                "the path must be the database number, like /0, not /{db}"
            ))
        })?,
    };
    if url.query().is_some() {
        return Err(bad("query parameters (?...) are not supported"));
    }
    if url.fragment().is_some() {
        return Err(bad("a fragment (#...) is not supported"));
    }
    Ok(format!("redis://{host}:{port}/{db}"))
}

/// The URL with any user-info part (which may hold a password) replaced by `***`.
fn redact(raw: &str) -> String {
    let Some(scheme_end) = raw.find("://") else {
        return raw.to_owned();
    };
    let rest = &raw[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &raw[..scheme_end + 3], &rest[at..]),
        None => raw.to_owned(),
    }
}

/// What became of a reconnection attempt.
enum Reconnect {
    Up(PubSub),
    Failed(String),
    StoreGone,
}

/// Owns the pub/sub connection and the set of subscribed patterns.
struct Subscriber {
    client: Client,
    /// The command connection, which the task keeps fresh (see [`Subscriber::poke`]).
    commands: ConnectionManager,
    url: String,
    events: mpsc::Sender<StoreEvent>,
    /// False once the daemon dropped the receiver; events are then discarded.
    events_open: bool,
    /// Events waiting for room in the channel, oldest first.
    outbox: VecDeque<StoreEvent>,
    control: mpsc::Receiver<Control>,
    /// The patterns callers subscribed and did not unsubscribe.
    desired: BTreeSet<String>,
    /// Why the connection is down, for callers who subscribe meanwhile.
    last_error: String,
}

impl Subscriber {
    /// Runs until every `Store` clone is gone.
    async fn run(mut self, first: PubSub) {
        let mut next = Some(first);
        let mut backoff = BACKOFF_MIN;
        loop {
            if let Some(pubsub) = next.take() {
                backoff = BACKOFF_MIN;
                self.push(StoreEvent::Connected {
                    url: self.url.clone(),
                });
                let Some(reason) = self.serve(pubsub).await else {
                    return;
                };
                // Redis is probably gone for the commands too: find out now rather than on the
                // next caller's command.
                self.poke();
                self.push(StoreEvent::Disconnected {
                    url: self.url.clone(),
                    reason: reason.clone(),
                });
                self.last_error = reason;
            }
            if !self.wait(backoff).await {
                return;
            }
            match self.reconnect().await {
                Reconnect::Up(pubsub) => {
                    // Redis is back: have the command connection reconnect now too.
                    self.poke();
                    next = Some(pubsub);
                }
                Reconnect::Failed(reason) => {
                    self.last_error = reason;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Reconnect::StoreGone => return,
            }
        }
    }

    /// Sends a PING on the command connection, in the background. The connection manager only
    /// notices a dead connection when a command fails on it, and a command that fails because
    /// the connection died cannot be retried safely (it may have run). So the task does the
    /// noticing: when the pub/sub connection breaks or comes back, and every [`PING_EVERY`]
    /// (which also keeps the connection from being closed by a server-side idle timeout).
    fn poke(&self) {
        let mut conn = self.commands.clone();
        tokio::spawn(async move {
            let _ = timeout(
                COMMAND_TIMEOUT,
                redis::cmd("PING").query_async::<()>(&mut conn),
            )
            .await;
        });
    }

    fn push(&mut self, event: StoreEvent) {
        if self.events_open {
            self.outbox.push_back(event);
        }
    }

    /// Forgets `pattern` and any of its messages not yet handed to the channel.
    fn forget(&mut self, pattern: &str) -> bool {
        self.outbox
            .retain(|e| !matches!(e, StoreEvent::Published(p) if p.pattern == pattern));
        self.desired.remove(pattern)
    }

    /// Answers a request while there is no connection: subscribing fails, unsubscribing
    /// succeeds (the pattern is simply not subscribed again).
    fn answer_while_down(&mut self, request: Control) {
        match request {
            Control::Subscribe { reply, .. } => {
                let _ = reply.send(Err(format!(
                    "the pub/sub connection is down ({}), reconnecting",
                    self.last_error
                )));
            }
            Control::Unsubscribe { pattern, reply } => {
                self.forget(&pattern);
                let _ = reply.send(());
            }
        }
    }

    /// Waits `backoff` while answering requests; false when the store is gone.
    async fn wait(&mut self, backoff: Duration) -> bool {
        let until = Instant::now() + backoff;
        // A clone, so the permit in `select!`'s output does not borrow `self`.
        let events = self.events.clone();
        loop {
            tokio::select! {
                biased;
                permit = events.reserve(), if !self.outbox.is_empty() => {
                    let permit = permit.map_err(|_| ());
                    deliver_split(&mut self.outbox, &mut self.events_open, permit);
                }
                request = self.control.recv() => match request {
                    None => return false,
                    Some(request) => self.answer_while_down(request),
                },
                () = sleep_until(until) => return true,
            }
        }
    }

    /// One attempt to connect and subscribe every pattern again, answering requests meanwhile.
    async fn reconnect(&mut self) -> Reconnect {
        let client = self.client.clone();
        let patterns: Vec<String> = self.desired.iter().cloned().collect();
        let attempt = async move {
            let mut pubsub = timeout(COMMAND_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "no answer to connect within 2 s".to_owned())?
                .map_err(|e| e.to_string())?;
            // One pattern per command: the client library pairs each confirmation with one
            // request.
            for pattern in &patterns {
                timeout(COMMAND_TIMEOUT, pubsub.psubscribe(pattern))
                    .await
                    .map_err(|_| "no answer to PSUBSCRIBE within 2 s".to_owned())?
                    .map_err(|e| e.to_string())?;
            }
            Ok::<_, String>((pubsub, patterns))
        };
        tokio::pin!(attempt);
        let events = self.events.clone();
        let result = loop {
            tokio::select! {
                biased;
                permit = events.reserve(), if !self.outbox.is_empty() => {
                    let permit = permit.map_err(|_| ());
                    deliver_split(&mut self.outbox, &mut self.events_open, permit);
                }
                request = self.control.recv() => match request {
                    None => return Reconnect::StoreGone,
                    Some(request) => self.answer_while_down(request),
                },
                result = &mut attempt => break result,
            }
        };
        let (mut pubsub, subscribed) = match result {
            Ok(up) => up,
            Err(reason) => return Reconnect::Failed(reason),
        };
        // Patterns unsubscribed while we were connecting.
        for pattern in subscribed.iter().filter(|p| !self.desired.contains(*p)) {
            match timeout(COMMAND_TIMEOUT, pubsub.punsubscribe(pattern)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Reconnect::Failed(e.to_string()),
                Err(_) => return Reconnect::Failed("no answer to PUNSUBSCRIBE".to_owned()),
            }
        }
        Reconnect::Up(pubsub)
    }

    /// Forwards messages and answers requests until the connection breaks (`Some(reason)`) or
    /// the store is gone (`None`).
    async fn serve(&mut self, pubsub: PubSub) -> Option<String> {
        let (mut sink, mut stream) = pubsub.split();
        let mut ping_at = Instant::now() + PING_EVERY;
        let events = self.events.clone();
        loop {
            tokio::select! {
                biased;
                permit = events.reserve(), if !self.outbox.is_empty() => {
                    let permit = permit.map_err(|_| ());
                    deliver_split(&mut self.outbox, &mut self.events_open, permit);
                }
                request = self.control.recv() => {
                    let request = request?;
                    if let Err(reason) = self.answer_while_up(&mut sink, request).await {
                        return Some(reason);
                    }
                }
                message = stream.next(), if self.outbox.len() < OUTBOX_MAX => match message {
                    None => return Some("the connection was closed".to_owned()),
                    Some(message) => self.accept(&message),
                },
                () = sleep_until(ping_at) => {
                    ping_at = Instant::now() + PING_EVERY;
                    self.poke();
                    match timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(e.to_string()),
                        Err(_) => return Some("no answer to PING within 2 s".to_owned()),
                    }
                }
            }
        }
    }

    /// Carries out a request on the live connection; `Err(reason)` when the connection broke.
    async fn answer_while_up(
        &mut self,
        sink: &mut PubSubSink,
        request: Control,
    ) -> Result<(), String> {
        match request {
            Control::Subscribe { pattern, reply } => {
                if self.desired.contains(&pattern) {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                if reply.is_closed() {
                    // The caller gave up (timed out); do not subscribe behind its back.
                    return Ok(());
                }
                match timeout(COMMAND_TIMEOUT, sink.psubscribe(&pattern)).await {
                    Ok(Ok(())) => {
                        if reply.send(Ok(())).is_ok() {
                            self.desired.insert(pattern);
                        } else {
                            // The caller gave up meanwhile and was told it failed: undo.
                            let undone =
                                timeout(COMMAND_TIMEOUT, sink.punsubscribe(&pattern)).await;
                            if !matches!(undone, Ok(Ok(()))) {
                                return Err("no answer to PUNSUBSCRIBE".to_owned());
                            }
                        }
                        Ok(())
                    }
                    Ok(Err(e)) => {
                        let reason = e.to_string();
                        let _ = reply.send(Err(reason.clone()));
                        if is_outage(&e) { Err(reason) } else { Ok(()) }
                    }
                    Err(_) => {
                        let reason = "no answer to PSUBSCRIBE within 2 s".to_owned();
                        let _ = reply.send(Err(reason.clone()));
                        Err(reason)
                    }
                }
            }
            Control::Unsubscribe { pattern, reply } => {
                let was = self.forget(&pattern);
                // Messages for it are filtered from now on, so the caller can go on at once.
                let _ = reply.send(());
                if was {
                    match timeout(COMMAND_TIMEOUT, sink.punsubscribe(&pattern)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) if !is_outage(&e) => {}
                        Ok(Err(e)) => return Err(e.to_string()),
                        Err(_) => return Err("no answer to PUNSUBSCRIBE within 2 s".to_owned()),
                    }
                }
                Ok(())
            }
        }
    }

    /// Queues a message for a pattern we still want.
    fn accept(&mut self, message: &redis::Msg) {
        if !message.from_pattern() {
            return;
        }
        let Ok(pattern) = message.get_pattern::<Vec<u8>>() else {
            return;
        };
        let pattern = String::from_utf8_lossy(&pattern).into_owned();
        if !self.desired.contains(&pattern) {
            return;
        }
        let channel = message
            .get_channel::<Vec<u8>>()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        let body = String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
        self.push(StoreEvent::Published(Published {
            pattern,
            channel,
            message: body,
        }));
    }
}

/// Hands the oldest outbox event to the channel (`permit` is room in it, or an error when the
/// receiver is gone). Takes the fields, not `self`, because the permit borrows the sender.
fn deliver_split(
    outbox: &mut VecDeque<StoreEvent>,
    events_open: &mut bool,
    permit: Result<mpsc::Permit<'_, StoreEvent>, ()>,
) {
    if let Ok(permit) = permit {
        if let Some(event) = outbox.pop_front() {
            permit.send(event);
        }
    } else {
        *events_open = false;
        outbox.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_validated_and_printed_without_password() {
        assert_eq!(
            parse_url("redis://127.0.0.1:6380/0").unwrap(),
            "redis://127.0.0.1:6380/0"
        );
        assert_eq!(
            parse_url("redis://localhost").unwrap(),
            "redis://localhost:6379/0"
        );
        assert_eq!(parse_url("redis://h:1/").unwrap(), "redis://h:1/0");
        assert_eq!(
            parse_url("redis://:s3cret@db.example:6390/3").unwrap(),
            "redis://db.example:6390/3"
        );
        assert_eq!(
            parse_url("redis://user:pw@[::1]:7000/2").unwrap(),
            "redis://[::1]:7000/2"
        );
        for (raw, want) in [
            ("127.0.0.1:6379", "scheme"),
            ("http://h:1/0", "scheme must be redis://"),
            ("rediss://h:1/0", "TLS"),
            ("redis+unix:///tmp/r.sock", "Unix sockets"),
            ("redis://h:1/zero", "database number"),
            ("redis://h:1/0?protocol=resp3", "query"),
            ("redis://h:99999/0", "port"),
            ("redis:///0", "host"),
        ] {
            let err = parse_url(raw).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, StateError::BadUrl { .. }), "{raw}: {msg}");
            assert!(msg.contains(want), "{raw}: {msg}");
            assert!(msg.contains("expected redis://host:port/db"), "{msg}");
        }
    }

    #[test]
    fn bad_urls_never_show_the_password() {
        let err = parse_url("redis://:hunter2@h:1/nope")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("redis://***@h:1/nope"), "{err}");
        assert_eq!(redact("redis://u:p@h/0"), "redis://***@h/0");
        assert_eq!(redact("redis://h/0"), "redis://h/0");
        assert_eq!(redact("redis://h/a@b"), "redis://h/a@b");
    }
}
