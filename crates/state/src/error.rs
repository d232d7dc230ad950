//! The one error type of the store.

use std::path::PathBuf;

/// What went wrong in a store operation. Every message says what is wrong, where, and what to do.
///
/// The variants a worker can cause with a bad request ([`KeyTooLong`](Self::KeyTooLong),
/// [`ValueTooLarge`](Self::ValueTooLarge), [`EmptyKey`](Self::EmptyKey),
/// [`BadPattern`](Self::BadPattern), [`BadTtl`](Self::BadTtl), [`NotInteger`](Self::NotInteger),
/// [`NotUtf8`](Self::NotUtf8), [`Overflow`](Self::Overflow)) are the same for both backends;
/// [`is_caller_error`](Self::is_caller_error) tells them apart from outages and configuration
/// problems.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A key, channel name or pattern is longer than [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
    #[error(
        "key, channel or pattern of {len} bytes is over the limit of {max} bytes; use a shorter name"
    )]
    KeyTooLong {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A value or published message is longer than [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN).
    #[error(
        "value or message of {len} bytes is over the limit of {max} bytes; store large data elsewhere and keep a reference in the store"
    )]
    ValueTooLarge {
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// A key, channel name or pattern is the empty string.
    #[error("the key, channel or pattern is empty; give a name of at least one byte")]
    EmptyKey,
    /// A glob pattern is malformed (an unclosed `[` or a trailing `\`).
    #[error(
        "bad pattern {pattern:?}: {reason}; patterns use * ? [abc] [a-z] [^a] and \\ to escape"
    )]
    BadPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A time-to-live that is zero or too long.
    #[error("bad TTL of {ttl_ms} ms: {reason}")]
    BadTtl {
        /// The TTL in whole milliseconds.
        ttl_ms: u128,
        /// What is wrong with it and what to do.
        reason: &'static str,
    },
    /// `incr` on a value that is not a decimal 64-bit integer.
    #[error("{}", corral_proto::channel::refusal::not_integer(key))]
    NotInteger {
        /// The key.
        key: String,
    },
    /// `incr` would leave the signed 64-bit range.
    #[error("{}", corral_proto::channel::refusal::overflow(key))]
    Overflow {
        /// The key.
        key: String,
    },
    /// A value in Redis is not UTF-8 (written by another Redis client); corral values are strings.
    #[error("{}", corral_proto::channel::refusal::not_utf8(key))]
    NotUtf8 {
        /// The key.
        key: String,
    },
    /// A call a worker wrote in a batch that corral does not take (not one of the calls a
    /// batch may hold, a key or value that is not UTF-8, a number that is not one).
    #[error("call refused: {reason}")]
    Refused {
        /// What is wrong and what is taken.
        reason: String,
    },
    /// The Redis URL is malformed or uses something corral does not support.
    #[error(
        "bad Redis URL {url}: {reason}; expected redis://host:port/db or redis://:password@host:port/db"
    )]
    BadUrl {
        /// The URL, with any password replaced by `***`.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Redis cannot be reached now (or did not answer in time).
    #[error("Redis at {url} is unreachable: {reason}; corral reconnects by itself, try again")]
    Unavailable {
        /// The URL, without password.
        url: String,
        /// The underlying error.
        reason: String,
    },
    /// Redis answered a command with an error that is not about connectivity (for example a key
    /// that another Redis client filled with a list).
    #[error("Redis at {url} refused the command: {reason}")]
    Redis {
        /// The URL, without password.
        url: String,
        /// Redis's error.
        reason: String,
    },
    /// The embedded store's snapshot could not be loaded at start.
    #[error(
        "cannot load the state snapshot {path}: {reason}; move the file aside (corral then starts with an empty store) or restore a good copy"
    )]
    Snapshot {
        /// The snapshot file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The embedded store's snapshot could not be written; the data is still in memory.
    #[error(
        "cannot write the state snapshot {path}: {source}; the data is kept in memory and corral retries every second; check free space and permissions in that directory"
    )]
    Io {
        /// The snapshot file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// [`Store::embedded`](crate::Store::embedded) was called outside a tokio runtime.
    #[error(
        "the embedded store needs a tokio runtime for its expiry and snapshot task; create it from inside the runtime"
    )]
    NoRuntime,
}

impl StateError {
    /// True when the request itself was at fault (a bad key, value, pattern, TTL or a
    /// non-integer for `incr`): retrying the same request cannot succeed. False for outages,
    /// configuration and disk problems.
    pub fn is_caller_error(&self) -> bool {
        matches!(
            self,
            Self::KeyTooLong { .. }
                | Self::ValueTooLarge { .. }
                | Self::EmptyKey
                | Self::BadPattern { .. }
                | Self::BadTtl { .. }
                | Self::NotInteger { .. }
                | Self::Overflow { .. }
                | Self::NotUtf8 { .. }
                | Self::Refused { .. }
        )
    }
}
