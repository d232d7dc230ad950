//! corral's shared store: string keys and values with optional time-to-live, atomic counters and
//! compare-and-set, and pattern pub/sub, for the workers of an app (through the daemon).
//!
//! It owns the data and the connection to Redis. It does not own who may use which key, how
//! workers reach it, or reference counting of subscriptions per worker: that is the daemon's.
//!
//! # Two backends, one API
//! - **Embedded** ([`Store::embedded`]): a hash map in the daemon's memory, guarded by a mutex
//!   that is never held across an `.await`. With a snapshot path, the store is loaded from that
//!   JSON file at start and written back to it atomically (temporary file, fsync, rename) at most
//!   about once a second while there are changes, and on [`Store::flush`]. A failed write (disk
//!   full) keeps everything in memory, is reported once as [`StoreEvent::SaveFailed`] and is
//!   retried every second. Expiry is exact: every access checks the deadline, and a sweep every
//!   second removes expired keys so they do not pile up. The snapshot stores absolute expiry
//!   times (Unix milliseconds), so a key's TTL keeps running while the daemon is down.
//! - **Redis** ([`Store::redis`]): `redis://host:port/db` or `redis://:password@host:port/db`.
//!   Commands go over one multiplexed, auto-reconnecting connection; pattern subscriptions use a
//!   second connection driven by a task; workers' [`Batch`]es of RESP commands pass through a
//!   third, unread, in [`Store::forward`]. Keys and channels are used exactly as given, with no
//!   prefix: **the database number in the URL is the namespace**, so give each app (or each
//!   corral installation) its own db, or its own Redis. Pub/sub in Redis is not scoped by
//!   database, so channel names are shared by everything on that Redis server.
//!
//! # Limits
//! Keys, channel names and patterns are 1 to [`MAX_KEY_LEN`] bytes; values and messages are at
//! most [`MAX_VALUE_LEN`] bytes; TTLs are 1 ms to [`MAX_TTL`] (rounded up to whole milliseconds).
//! Patterns are Redis globs (`*`, `?`, `[abc]`, `[a-z]`, `[^a]`, `\` escape) matched byte by
//! byte; a malformed one (unclosed `[`, trailing `\`) is refused by both backends.
//!
//! # Events
//! Both constructors return a bounded [`mpsc::Receiver`] of [`StoreEvent`]s: published messages
//! for this daemon's pattern subscriptions, and connection and save problems. A full channel
//! holds back delivery (nothing is dropped), so the daemon must drain it from a task of its own,
//! never from the code that awaits store calls. It ends when every clone of the [`Store`] is
//! gone.
//!
//! # When Redis goes away
//! While Redis is unreachable, every call returns [`StateError::Unavailable`] within about
//! [`COMMAND_TIMEOUT`], never hangs. The command connection reconnects on the next call. The
//! pub/sub task notices the loss (closed connection, or an unanswered PING every 5 s), reports
//! [`StoreEvent::Disconnected`] once, retries with exponential backoff from 100 ms to 5 s,
//! subscribes every pattern again and reports [`StoreEvent::Connected`]. Messages published
//! while the connection was down are lost, as with any Redis pub/sub.

#![warn(missing_docs)]

mod batch;
mod embedded;
mod error;
mod glob;
mod link;
mod redis_backend;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

pub use batch::{Batch, CORRAL_ERROR};
pub use error::StateError;

/// Longest key, channel name or pattern, in bytes.
pub const MAX_KEY_LEN: usize = 1024;

/// Longest value or published message, in bytes.
pub const MAX_VALUE_LEN: usize = 512 * 1024;

/// Longest time-to-live accepted by [`Store::set`] and [`Store::cas`] (100 years).
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// How long a Redis command may take before it fails with [`StateError::Unavailable`].
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Capacity of the event channel returned by the constructors.
pub const EVENT_CAPACITY: usize = 4096;

/// A message delivered to one of this daemon's pattern subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The subscribed pattern it matched (a message matching two patterns arrives twice).
    pub pattern: String,
    /// The channel it was published on.
    pub channel: String,
    /// The message.
    pub message: String,
}

/// Something the daemon should know: a message to fan out, or a change worth logging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// A message for one of the patterns given to [`Store::subscribe`].
    Published(Published),
    /// The Redis pub/sub connection is up: at start, and again after each outage.
    Connected {
        /// The Redis URL, without password.
        url: String,
    },
    /// The Redis pub/sub connection was lost; corral retries with backoff and reports
    /// [`StoreEvent::Connected`] when it is back. Reported once per outage.
    Disconnected {
        /// The Redis URL, without password.
        url: String,
        /// Why it was lost.
        reason: String,
    },
    /// The embedded store's snapshot could not be written (disk full, directory gone). The data
    /// is kept in memory and the write is retried every second. Reported once per distinct
    /// failure; a later success followed by a new failure is reported again.
    SaveFailed {
        /// The snapshot file.
        path: PathBuf,
        /// The error.
        reason: String,
    },
}

/// One operation of a [`Store::pipeline`]: the key/value calls and `publish`, each as its
/// method of the same name on [`Store`] describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// [`Store::get`].
    Get {
        /// The key.
        key: String,
    },
    /// [`Store::set`].
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Time to live.
        ttl: Option<Duration>,
    },
    /// [`Store::del`].
    Del {
        /// The key.
        key: String,
    },
    /// [`Store::incr`].
    Incr {
        /// The key.
        key: String,
        /// The increment.
        by: i64,
    },
    /// [`Store::cas`].
    Cas {
        /// The key.
        key: String,
        /// The value it must have now (`None`: it must not exist).
        expected: Option<String>,
        /// The value it gets (`None`: it is deleted).
        new: Option<String>,
        /// Time to live of the new value.
        ttl: Option<Duration>,
    },
    /// [`Store::publish`].
    Publish {
        /// The channel.
        channel: String,
        /// The message.
        message: String,
    },
}

/// What one [`Op`] of a pipeline gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `Get`: the value, `None` when the key is not set.
    Value(Option<String>),
    /// `Set`: done.
    Done,
    /// `Del`: whether the key existed; `Cas`: whether it swapped.
    Yes(bool),
    /// `Incr`: the new value.
    Number(i64),
    /// `Publish`: how many subscriptions got the message.
    Count(u64),
}

/// An [`Op`] that passed the limits, its TTL in whole milliseconds.
#[derive(Debug)]
pub(crate) struct Checked {
    pub(crate) op: Op,
    pub(crate) ttl_ms: Option<u64>,
}

impl Op {
    /// The op within the limits, or why not.
    fn check(self) -> Result<Checked, StateError> {
        let ttl = match &self {
            Op::Get { key } | Op::Del { key } | Op::Incr { key, .. } => {
                check_key(key)?;
                None
            }
            Op::Set { key, value, ttl } => {
                check_key(key)?;
                check_value(value)?;
                *ttl
            }
            Op::Cas {
                key,
                expected,
                new,
                ttl,
            } => {
                check_key(key)?;
                for value in [expected, new].into_iter().flatten() {
                    check_value(value)?;
                }
                *ttl
            }
            Op::Publish { channel, message } => {
                check_key(channel)?;
                check_value(message)?;
                None
            }
        };
        Ok(Checked {
            ttl_ms: check_ttl(ttl)?,
            op: self,
        })
    }
}

/// The store: cheap to clone (every clone is the same store), usable from any task.
#[derive(Clone)]
pub struct Store {
    backend: Arc<Backend>,
}

enum Backend {
    Embedded(embedded::Embedded),
    Redis(redis_backend::Remote),
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.describe())
            .finish()
    }
}

impl Store {
    /// An in-memory store. With `snapshot = Some(path)` it is loaded from that JSON file at start
    /// (when the file exists; keys whose expiry has passed are dropped) and saved to it
    /// atomically (temporary file + rename), at most about once a second while there are
    /// changes, and on [`flush`](Self::flush).
    ///
    /// Must be called inside a tokio runtime (it spawns the expiry and snapshot task). Reads the
    /// snapshot synchronously, which is fine at daemon start.
    pub fn embedded(
        snapshot: Option<PathBuf>,
    ) -> Result<(Store, mpsc::Receiver<StoreEvent>), StateError> {
        let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
        let backend = embedded::Embedded::open(snapshot, tx)?;
        Ok((
            Store {
                backend: Arc::new(Backend::Embedded(backend)),
            },
            rx,
        ))
    }

    /// A store in Redis at `url` (`redis://host:port/db`, `redis://:password@host:port/db`; the
    /// port defaults to 6379 and the db to 0). Fails with [`StateError::BadUrl`] for a malformed
    /// URL and with [`StateError::Unavailable`] when Redis cannot be reached now; outages after
    /// that are survived (see the crate documentation).
    pub async fn redis(url: &str) -> Result<(Store, mpsc::Receiver<StoreEvent>), StateError> {
        let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
        let backend = redis_backend::Remote::connect(url, tx).await?;
        Ok((
            Store {
                backend: Arc::new(Backend::Redis(backend)),
            },
            rx,
        ))
    }

    /// One line for logs and status: `embedded, in memory`, `embedded, saved in <path>` or the
    /// Redis URL in the form `redis://host:port/db` (never with its password).
    pub fn describe(&self) -> String {
        match &*self.backend {
            Backend::Embedded(e) => e.describe(),
            Backend::Redis(r) => r.url().to_owned(),
        }
    }

    /// The value of `key`, or `None` when it does not exist (or has expired).
    pub async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        check_key(key)?;
        match &*self.backend {
            Backend::Embedded(e) => Ok(e.get(key)),
            Backend::Redis(r) => r.get(key).await,
        }
    }

    /// Sets `key` to `value`, expiring after `ttl` (or never, which also removes an earlier TTL).
    pub async fn set(
        &self,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
    ) -> Result<(), StateError> {
        check_key(key)?;
        check_value(value)?;
        let ttl = check_ttl(ttl)?;
        match &*self.backend {
            Backend::Embedded(e) => {
                e.set(key, value, ttl);
                Ok(())
            }
            Backend::Redis(r) => r.set(key, value, ttl).await,
        }
    }

    /// Deletes `key`; true when it existed.
    pub async fn del(&self, key: &str) -> Result<bool, StateError> {
        check_key(key)?;
        match &*self.backend {
            Backend::Embedded(e) => Ok(e.del(key)),
            Backend::Redis(r) => r.del(key).await,
        }
    }

    /// Adds `by` (which may be negative) to the integer in `key` and returns the new value. A
    /// missing key counts as 0; the key's TTL, if any, is kept. The value must be a decimal
    /// 64-bit integer as Redis writes it (no `+`, no leading zeros or spaces), else
    /// [`StateError::NotInteger`]; leaving the `i64` range is [`StateError::Overflow`].
    pub async fn incr(&self, key: &str, by: i64) -> Result<i64, StateError> {
        check_key(key)?;
        match &*self.backend {
            Backend::Embedded(e) => e.incr(key, by),
            Backend::Redis(r) => r.incr(key, by).await,
        }
    }

    /// Compare-and-set, atomically: when the current value of `key` equals `expected`
    /// (`None` = the key does not exist), sets it to `new` with `ttl` (`new = None` deletes it)
    /// and returns true; otherwise changes nothing and returns false.
    pub async fn cas(
        &self,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
        ttl: Option<Duration>,
    ) -> Result<bool, StateError> {
        check_key(key)?;
        if let Some(expected) = expected {
            check_value(expected)?;
        }
        if let Some(new) = new {
            check_value(new)?;
        }
        let ttl = check_ttl(ttl)?;
        match &*self.backend {
            Backend::Embedded(e) => Ok(e.cas(key, expected, new, ttl)),
            Backend::Redis(r) => r.cas(key, expected, new, ttl).await,
        }
    }

    /// The keys matching the glob `pattern`, sorted (byte order), never an expired one. Redis
    /// walks the keyspace with `SCAN MATCH` (not `KEYS`); keys there that are not UTF-8 are left
    /// out.
    pub async fn keys(&self, pattern: &str) -> Result<Vec<String>, StateError> {
        let glob = check_pattern(pattern)?;
        match &*self.backend {
            Backend::Embedded(e) => Ok(e.keys(&glob)),
            Backend::Redis(r) => r.keys(pattern).await,
        }
    }

    /// Publishes `message` on `channel`; returns how many subscribed patterns received it (with
    /// Redis: `PUBLISH`'s count, which includes other daemons' subscriptions on that server).
    /// The embedded backend returns once the messages are queued on the event channel, waiting
    /// for room when it is full.
    pub async fn publish(&self, channel: &str, message: &str) -> Result<u64, StateError> {
        check_key(channel)?;
        check_value(message)?;
        match &*self.backend {
            Backend::Embedded(e) => Ok(e.publish(channel, message).await),
            Backend::Redis(r) => r.publish(channel, message).await,
        }
    }

    /// Subscribes this daemon to the channels matching `pattern` (Redis `PSUBSCRIBE`
    /// semantics: a message matching two patterns arrives twice, once per pattern). Idempotent.
    /// Once it returns, messages published afterwards arrive as [`StoreEvent::Published`].
    pub async fn subscribe(&self, pattern: &str) -> Result<(), StateError> {
        let glob = check_pattern(pattern)?;
        match &*self.backend {
            Backend::Embedded(e) => {
                e.subscribe(pattern, glob);
                Ok(())
            }
            Backend::Redis(r) => r.subscribe(pattern).await,
        }
    }

    /// Ends the subscription to `pattern` (a no-op when there is none). Once it returns, no
    /// message for it is queued any more. With Redis it also succeeds while Redis is down: the
    /// pattern is not subscribed again after the reconnect.
    pub async fn unsubscribe(&self, pattern: &str) -> Result<(), StateError> {
        check_pattern(pattern)?;
        match &*self.backend {
            Backend::Embedded(e) => {
                e.unsubscribe(pattern);
                Ok(())
            }
            Backend::Redis(r) => {
                r.unsubscribe(pattern).await;
                Ok(())
            }
        }
    }

    /// Does `ops` in order and gives each its own result, as one round trip: with Redis, one
    /// pipeline (not a transaction: other clients' commands may come between two ops). An op
    /// over the limits gets its error and is not sent; an op Redis refuses gets Redis's error
    /// and the others go on; when Redis is unreachable, every op sent gets that error.
    pub async fn pipeline(&self, ops: Vec<Op>) -> Vec<Result<Outcome, StateError>> {
        let checked: Vec<Result<Checked, StateError>> = ops.into_iter().map(Op::check).collect();
        match &*self.backend {
            Backend::Embedded(e) => {
                let mut results = Vec::with_capacity(checked.len());
                for op in checked {
                    results.push(match op {
                        Ok(op) => e.run(op).await,
                        Err(e) => Err(e),
                    });
                }
                results
            }
            Backend::Redis(r) => r.pipeline(checked).await,
        }
    }

    /// Runs a [`Batch`] of RESP commands: its replies in RESP, one per command, in order. The
    /// work starts before this returns: on Redis the commands are queued, after those of every
    /// batch forwarded before, and written as they came, Redis's replies coming back as Redis
    /// wrote them; on the embedded store they are done. Refused commands, and every command
    /// when Redis is out of reach, get an error reply starting with [`CORRAL_ERROR`].
    pub fn forward(&self, mut batch: Batch) -> impl Future<Output = Vec<u8>> + Send + 'static {
        let (done, forwarded, url) = match &*self.backend {
            Backend::Embedded(e) => (Some(batch.run_embedded(e)), None, String::new()),
            Backend::Redis(r) => {
                let (commands, count) = batch.take_forwarded();
                let forwarded = (count > 0).then(|| r.forward(commands, count));
                (None, forwarded, r.url().to_string())
            }
        };
        async move {
            if let Some(replies) = done {
                return replies;
            }
            let forwarded = match forwarded {
                Some(forwarded) => forwarded.await,
                None => Ok(Vec::new()),
            };
            batch.merge(&url, forwarded)
        }
    }

    /// Embedded with a snapshot: writes the snapshot now if anything changed since the last
    /// write, and returns once it is on disk. Otherwise a no-op. Call it at shutdown.
    pub async fn flush(&self) -> Result<(), StateError> {
        match &*self.backend {
            Backend::Embedded(e) => e.flush().await,
            Backend::Redis(_) => Ok(()),
        }
    }
}

// The daemon shares one store between tasks on any runtime.
const _: () = {
    const fn send_sync_clone<T: Send + Sync + Clone + fmt::Debug + 'static>() {}
    send_sync_clone::<Store>();
    send_sync_clone::<StoreEvent>();
};

/// Refuses empty and over-long keys, channel names and patterns.
fn check_key(key: &str) -> Result<(), StateError> {
    if key.is_empty() {
        return Err(StateError::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(StateError::KeyTooLong {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

/// Refuses over-long values and messages.
fn check_value(value: &str) -> Result<(), StateError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(StateError::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// Checks a pattern's length and syntax.
fn check_pattern(pattern: &str) -> Result<glob::Glob, StateError> {
    check_key(pattern)?;
    glob::Glob::new(pattern)
}

/// A TTL in whole milliseconds (rounded up), refusing zero and more than [`MAX_TTL`].
fn check_ttl(ttl: Option<Duration>) -> Result<Option<u64>, StateError> {
    let Some(ttl) = ttl else { return Ok(None) };
    if ttl.is_zero() {
        return Err(StateError::BadTtl {
            ttl_ms: 0,
            reason: "a TTL must be at least 1 ms; to remove a key use del",
        });
    }
    if ttl > MAX_TTL {
        return Err(StateError::BadTtl {
            ttl_ms: ttl.as_millis(),
            reason: "a TTL can be at most 100 years; to keep a key for ever give no TTL",
        });
    }
    let ms = ttl.as_nanos().div_ceil(1_000_000);
    Ok(Some(
        u64::try_from(ms).expect("MAX_TTL fits in u64 milliseconds"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if every call's future can be handed to `tokio::spawn`.
    #[allow(dead_code)]
    fn futures_are_send(s: &Store) {
        fn send<T: Send>(_: T) {}
        send(s.get("k"));
        send(s.set("k", "v", None));
        send(s.del("k"));
        send(s.incr("k", 1));
        send(s.cas("k", None, None, None));
        send(s.keys("*"));
        send(s.publish("c", "m"));
        send(s.subscribe("p"));
        send(s.unsubscribe("p"));
        send(s.flush());
        send(Store::redis("redis://127.0.0.1/0"));
    }

    #[test]
    fn limits_give_exact_errors() {
        assert!(matches!(check_key(""), Err(StateError::EmptyKey)));
        assert!(check_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        assert!(matches!(
            check_key(&"k".repeat(MAX_KEY_LEN + 1)),
            Err(StateError::KeyTooLong {
                len: 1025,
                max: 1024
            })
        ));
        assert!(check_value("").is_ok());
        assert!(check_value(&"v".repeat(MAX_VALUE_LEN)).is_ok());
        assert!(matches!(
            check_value(&"v".repeat(MAX_VALUE_LEN + 1)),
            Err(StateError::ValueTooLarge { len, max }) if len == MAX_VALUE_LEN + 1 && max == MAX_VALUE_LEN
        ));
    }

    #[test]
    fn ttls_round_up_to_milliseconds() {
        assert_eq!(check_ttl(None).unwrap(), None);
        assert_eq!(check_ttl(Some(Duration::from_micros(1))).unwrap(), Some(1));
        assert_eq!(
            check_ttl(Some(Duration::from_micros(1500))).unwrap(),
            Some(2)
        );
        assert_eq!(check_ttl(Some(Duration::from_secs(3))).unwrap(), Some(3000));
        assert!(matches!(
            check_ttl(Some(Duration::ZERO)),
            Err(StateError::BadTtl { ttl_ms: 0, .. })
        ));
        assert!(check_ttl(Some(MAX_TTL)).is_ok());
        assert!(matches!(
            check_ttl(Some(MAX_TTL + Duration::from_secs(1))),
            Err(StateError::BadTtl { .. })
        ));
    }

    #[test]
    fn error_messages_read_like_advice() {
        let e = StateError::KeyTooLong {
            len: 2000,
            max: MAX_KEY_LEN,
        };
        assert_eq!(
            e.to_string(),
            "key, channel or pattern of 2000 bytes is over the limit of 1024 bytes; use a shorter name"
        );
        let e = StateError::Unavailable {
            url: "redis://127.0.0.1:6380/0".into(),
            reason: "Connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "Redis at redis://127.0.0.1:6380/0 is unreachable: Connection refused; corral reconnects by itself, try again"
        );
        assert!(!e.is_caller_error());
        assert!(StateError::EmptyKey.is_caller_error());
    }
}
