//! The channel between the master and each worker: a Unix stream socket whose worker end is the
//! descriptor named by [`crate::env::CORRAL_CHANNEL_FD`]. Frames are those of [`crate::frame`]
//! (4-byte big-endian length, then JSON), at most [`MAX_CHANNEL_FRAME_LEN`] bytes, both ways.
//!
//! In `rr` and `least-conn` modes the master hands connections over it: a
//! [`MasterMessage::Connection`] frame is sent in one `sendmsg` with exactly one descriptor
//! attached (`SCM_RIGHTS`), so the descriptors a worker receives come in the order of the
//! `connection` frames they belong to.

use serde::{Deserialize, Serialize};

/// Version of the channel protocol, given to workers in [`crate::env::CORRAL_CHANNEL_PROTOCOL`].
/// 2 added state batches ([`STATE_BATCH`]): a worker sends them only to a master of 2 or more.
pub const CHANNEL_PROTOCOL_VERSION: u32 = 2;

/// The largest frame on a worker channel: 1 MiB.
pub const MAX_CHANNEL_FRAME_LEN: usize = 1024 * 1024;

/// What a worker tells the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMessage {
    /// The worker is ready for work.
    Ready,
    /// The worker is about to exit (a panic, an uncaught exception, a memory limit): the master
    /// starts its replacement at once and lets it finish its open work.
    GoingDown {
        /// Why, for the log.
        #[serde(default)]
        reason: String,
    },
    /// Any JSON for the master (logged today).
    Message {
        /// The payload.
        data: serde_json::Value,
    },
    /// The worker took connection `id`: the master forgets its own copy. Sent before the worker
    /// reads anything from the connection.
    Accepted {
        /// The `id` of the [`MasterMessage::Connection`].
        id: u64,
    },
    /// The worker will not serve connection `id` (it is shutting down, say) and has not read
    /// from it: the master gives it to another worker.
    Refused {
        /// The `id` of the [`MasterMessage::Connection`].
        id: u64,
    },
    /// The worker closed connection `id` (optional; `least-conn` counts open connections with
    /// it).
    Closed {
        /// The `id` of the [`MasterMessage::Connection`].
        id: u64,
    },
    /// A message on the bus, answered by exactly one [`MasterMessage::Reply`] with the same `id`:
    /// with `request`, the recipient's answer (or why there is none); without, how many got it.
    Send {
        /// The sender's number for this message, unique among its unanswered ones.
        id: u64,
        /// [`Target`] syntax: `agent`, `workers`, `worker:<id>`, `app:<name>` or `all`.
        to: String,
        /// Any JSON.
        data: serde_json::Value,
        /// Wait for the recipient's [`WorkerMessage::Reply`]; a target that reaches several
        /// processes is answered with all their answers together (see `docs/protocol.md`).
        #[serde(default)]
        request: bool,
        /// With `request`: how long to wait, in milliseconds ([`DEFAULT_REQUEST_TIMEOUT_MS`]).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// The answer to a [`MasterMessage::Message`] that carried `request`.
    Reply {
        /// The `request` number of that message.
        request: u64,
        /// The answer.
        #[serde(default)]
        data: serde_json::Value,
        /// Or why there is none.
        #[serde(default)]
        error: Option<String>,
    },
    /// A shared-state operation, answered by a [`MasterMessage::State`] with the same `id`.
    State {
        /// The worker's number for this call, unique among its unanswered ones.
        id: u64,
        /// What to do.
        call: StateCall,
    },
}

/// An operation on the shared state (key/value and pub/sub). Values and messages are UTF-8
/// strings (JSON encoded by the caller when it wants structure); keys, channels and patterns at
/// most 1 KiB, values and messages at most 512 KiB.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum StateCall {
    /// The value of `key`: a string, or `null` when it is not set. Answer: the value.
    Get {
        /// The key.
        key: String,
    },
    /// Sets `key`, for `ttl_ms` milliseconds when given. Answer: `true`.
    Set {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Time to live.
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    /// Removes `key`. Answer: whether it was set.
    Del {
        /// The key.
        key: String,
    },
    /// Adds `by` to the integer in `key` (a missing key counts as 0). Answer: the new value.
    Incr {
        /// The key.
        key: String,
        /// The increment (may be negative).
        #[serde(default = "one")]
        by: i64,
    },
    /// Sets `key` to `new` (removes it when `null`) only if its value is `expected` (`null`:
    /// only if it is not set). Answer: whether it swapped.
    Cas {
        /// The key.
        key: String,
        /// The value it must have now.
        expected: Option<String>,
        /// The value it gets.
        new: Option<String>,
        /// Time to live of the new value.
        #[serde(default)]
        ttl_ms: Option<u64>,
    },
    /// The keys matching a glob pattern (`*`, `?`, `[a-z]`), sorted. Answer: an array.
    Keys {
        /// The pattern.
        pattern: String,
    },
    /// Publishes `message` on `channel`. Answer: how many subscriptions got it.
    Publish {
        /// The channel.
        channel: String,
        /// The message.
        message: String,
    },
    /// From now on, messages on channels matching `pattern` come as
    /// [`MasterMessage::Published`]. Answer: `true`.
    Subscribe {
        /// A glob pattern (`news.*`); a plain channel name matches itself.
        pattern: String,
    },
    /// Undoes a [`StateCall::Subscribe`]. Answer: `true`.
    Unsubscribe {
        /// The pattern as subscribed.
        pattern: String,
    },
}

fn one() -> i64 {
    1
}

/// How long a request on the bus waits for its answer unless it says otherwise.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5_000;

/// Where a bus message goes, from the sender's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The agent of the sender's app.
    Agent,
    /// Every worker of the sender's app but the sender.
    Workers,
    /// One instance (worker or agent) by id.
    Worker(u32),
    /// Every instance of an app (its agent included) but the sender.
    App(String),
    /// Every instance of every app but the sender.
    All,
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(text: &str) -> Result<Target, String> {
        let bad = || {
            format!(
                "'{text}' is not a bus target: say agent, workers, worker:<id>, app:<name> or all"
            )
        };
        match text {
            "agent" => Ok(Target::Agent),
            "workers" => Ok(Target::Workers),
            "all" => Ok(Target::All),
            _ => match text.split_once(':') {
                Some(("worker", id)) => id.parse().map(Target::Worker).map_err(|_| bad()),
                Some(("app", name)) if !name.is_empty() => Ok(Target::App(name.to_string())),
                _ => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Agent => f.write_str("agent"),
            Target::Workers => f.write_str("workers"),
            Target::Worker(id) => write!(f, "worker:{id}"),
            Target::App(name) => write!(f, "app:{name}"),
            Target::All => f.write_str("all"),
        }
    }
}

/// What the master tells a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MasterMessage {
    /// A client connection, accepted by the master on the app's listener number `listener` (the
    /// order of its `--listen` addresses); its descriptor, non-blocking, is attached to this frame.
    /// The worker answers [`WorkerMessage::Accepted`] or [`WorkerMessage::Refused`].
    Connection {
        /// Unique among this worker's connections.
        id: u64,
        /// Index of the listening address.
        listener: u32,
    },
    /// The master is about to stop this worker (a reload, `stop`, `scale`): take no more work,
    /// finish the open work, exit. The stop signal follows.
    Shutdown,
    /// A message for the program: from `corral send`, or from another worker on the bus.
    Message {
        /// Any JSON.
        data: serde_json::Value,
        /// Who sent it: `worker:<id>` (an agent is a worker too) or `cli`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// Present when the sender waits for an answer: send a [`WorkerMessage::Reply`] with
        /// this number.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<u64>,
    },
    /// The answer to the worker's [`WorkerMessage::Send`] number `id`.
    Reply {
        /// The `id` of the send.
        id: u64,
        /// With `request`: the recipient's answer; without: `{"delivered": n}`.
        #[serde(default)]
        data: serde_json::Value,
        /// Why it failed: an unknown target, no recipient, no answer in time, a full queue.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The answer to the worker's [`WorkerMessage::State`] number `id`.
    State {
        /// The `id` of the call.
        id: u64,
        /// The result (see [`StateCall`]), when it worked.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ok: Option<serde_json::Value>,
        /// What went wrong (the store is unreachable, a value is too large, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A message published on a channel matching one of the worker's subscriptions.
    Published {
        /// The subscription's pattern.
        pattern: String,
        /// The channel it was published on.
        channel: String,
        /// The message.
        message: String,
    },
}

/// The first byte of a state batch frame: key/value calls in RESP rather than JSON, so that the
/// master can hand them to Redis as they are ([`crate::resp`]). The body is this byte, the
/// number of the first call (8 bytes, big-endian), then RESP commands, the calls numbered on
/// from the first, at most [`MAX_STATE_BATCH`] of them. The master answers with frames of the same shape holding one reply per call,
/// in order; it may split them over several frames, each numbered by its first reply's call.
/// A JSON body starts with `{`, never with this byte.
pub const STATE_BATCH: u8 = b'R';

/// Appends `message` to `out` as a frame of the worker channel. An answer (a `state` or a
/// `reply`) over [`MAX_CHANNEL_FRAME_LEN`] is appended as an error answer saying so instead, so
/// that the call is answered and the worker's channel stays whole; any other message over it is
/// not appended, and false is returned.
pub fn append_master_message(out: &mut Vec<u8>, message: &MasterMessage) -> bool {
    let start = out.len();
    let len = match crate::frame::append(out, message) {
        Ok(()) if out.len() - start - 4 <= MAX_CHANNEL_FRAME_LEN => return true,
        Ok(()) => out.len() - start - 4,
        Err(crate::FrameError::TooLarge { len, .. }) => usize::try_from(len).unwrap_or(usize::MAX),
        Err(_) => return false,
    };
    out.truncate(start);
    let error = Some(format!(
        "the answer takes {len} bytes, over the channel's limit of {MAX_CHANNEL_FRAME_LEN}: ask \
         for less at once (a narrower pattern, fewer recipients, a smaller answer)"
    ));
    let instead = match message {
        MasterMessage::State { id, .. } => MasterMessage::State {
            id: *id,
            ok: None,
            error,
        },
        MasterMessage::Reply { id, .. } => MasterMessage::Reply {
            id: *id,
            data: serde_json::Value::Null,
            error,
        },
        _ => return false,
    };
    crate::frame::append(out, &instead).is_ok()
}

/// What corral says when a state call cannot be done, where both the store and the worker
/// library say it (the worker library for Redis's error replies to a state batch, which the
/// master passes on unread).
pub mod refusal {
    /// The first word of the error replies to a state batch that corral makes (a refused
    /// command, a store out of reach) rather than Redis.
    pub const CORRAL_ERROR: &str = "CORRAL";

    /// `incr` on a value that is not a decimal 64-bit integer.
    #[must_use]
    pub fn not_integer(key: &str) -> String {
        format!(
            "the value of key {key:?} is not an integer, so it cannot be incremented; set it to \
             a decimal integer first or use another key"
        )
    }

    /// `incr` past the signed 64-bit range.
    #[must_use]
    pub fn overflow(key: &str) -> String {
        format!(
            "incrementing key {key:?} would overflow a signed 64-bit integer; the value is \
             unchanged"
        )
    }

    /// A value in Redis that is not UTF-8.
    #[must_use]
    pub fn not_utf8(key: &str) -> String {
        format!(
            "the value of key {key:?} is not UTF-8 text (another Redis client wrote it); corral \
             values are strings, so overwrite or delete it"
        )
    }
}

/// The most calls a state batch frame may hold (a worker with more writes several frames).
pub const MAX_STATE_BATCH: usize = 256;

/// Bytes of a state batch frame before its RESP, the length prefix included.
pub const STATE_BATCH_HEADER_LEN: usize = 4 + 1 + 8;

/// Starts a state batch frame at the end of `out` for calls numbered from `first`; append the
/// RESP, then call [`finish_state_batch`] with the position returned.
pub fn start_state_batch(out: &mut Vec<u8>, first: u64) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(STATE_BATCH);
    out.extend_from_slice(&first.to_be_bytes());
    start
}

/// Writes the length of the state batch frame started at `start`, now that its RESP is in.
/// Keeping it within [`MAX_CHANNEL_FRAME_LEN`] is the caller's business.
pub fn finish_state_batch(out: &mut [u8], start: usize) {
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// The number of the first call and the RESP of a frame body that is a state batch; `None` for
/// any other body.
#[must_use]
pub fn read_state_batch(body: &[u8]) -> Option<(u64, &[u8])> {
    match body {
        [STATE_BATCH, first @ ..] if first.len() >= 8 => {
            let (number, resp) = first.split_at(8);
            Some((u64::from_be_bytes(number.try_into().ok()?), resp))
        }
        _ => None,
    }
}

impl StateCall {
    /// Writes the call as a command of a state batch at the end of `out`: `GET k`, `SET k v`,
    /// `SET k v PX ms`, `DEL k` or `INCRBY k n`. False, with nothing written, for the calls a
    /// batch does not hold (the others go as `state` messages).
    pub fn write_command(&self, out: &mut Vec<u8>) -> bool {
        match self {
            StateCall::Get { key } => crate::resp::command(out, &[b"GET", key.as_bytes()]),
            StateCall::Set { key, value, ttl_ms } => match ttl_ms {
                None => crate::resp::command(out, &[b"SET", key.as_bytes(), value.as_bytes()]),
                Some(ms) => {
                    let ms = ms.to_string();
                    let (key, value) = (key.as_bytes(), value.as_bytes());
                    crate::resp::command(out, &[b"SET", key, value, b"PX", ms.as_bytes()]);
                }
            },
            StateCall::Del { key } => crate::resp::command(out, &[b"DEL", key.as_bytes()]),
            StateCall::Incr { key, by } => {
                let by = by.to_string();
                crate::resp::command(out, &[b"INCRBY", key.as_bytes(), by.as_bytes()]);
            }
            _ => return false,
        }
        true
    }

    /// The call a command of a state batch stands for (see [`StateCall::write_command`]);
    /// `None` when it stands for none.
    #[must_use]
    pub fn from_command(args: &[&[u8]]) -> Option<StateCall> {
        let text = |arg: &[u8]| String::from_utf8(arg.to_vec()).ok();
        let number = |arg: &[u8]| std::str::from_utf8(arg).ok()?.parse::<i64>().ok();
        Some(match args {
            [b"GET", key] => StateCall::Get { key: text(key)? },
            [b"SET", key, value] => StateCall::Set {
                key: text(key)?,
                value: text(value)?,
                ttl_ms: None,
            },
            [b"SET", key, value, b"PX", ms] => StateCall::Set {
                key: text(key)?,
                value: text(value)?,
                ttl_ms: Some(u64::try_from(number(ms)?).ok()?),
            },
            [b"DEL", key] => StateCall::Del { key: text(key)? },
            [b"INCRBY", key, by] => StateCall::Incr {
                key: text(key)?,
                by: number(by)?,
            },
            _ => return None,
        })
    }
}

/// Decodes a worker's frame body. Shared-state calls, by far the most frequent frames, are read
/// straight into their fields; everything else, and anything malformed, the general way (which
/// gives the error).
pub fn decode_worker_message(body: &[u8]) -> Result<WorkerMessage, serde_json::Error> {
    if let Ok(StateCallFrame { id, call, .. }) = serde_json::from_slice(body) {
        return Ok(WorkerMessage::State { id, call });
    }
    serde_json::from_slice(body)
}

/// Decodes a master's frame body, the answers to shared-state calls first as
/// [`decode_worker_message`] does for the calls.
pub fn decode_master_message(body: &[u8]) -> Result<MasterMessage, serde_json::Error> {
    if let Ok(StateAnswerFrame { id, ok, error, .. }) = serde_json::from_slice(body) {
        return Ok(MasterMessage::State { id, ok, error });
    }
    serde_json::from_slice(body)
}

/// The `"type": "state"` of a frame, as a field of its own: any other type is an error.
struct StateTag;

impl<'de> Deserialize<'de> for StateTag {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<StateTag, D::Error> {
        let tag = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
        if tag == "state" {
            Ok(StateTag)
        } else {
            Err(serde::de::Error::custom("not a state frame"))
        }
    }
}

/// [`WorkerMessage::State`] as a plain struct: read without buffering the frame first, as the
/// tagged enum must.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateCallFrame {
    #[serde(rename = "type")]
    _tag: StateTag,
    id: u64,
    call: StateCall,
}

/// [`MasterMessage::State`] as a plain struct.
#[derive(Deserialize)]
struct StateAnswerFrame {
    #[serde(rename = "type")]
    _tag: StateTag,
    id: u64,
    #[serde(default)]
    ok: Option<serde_json::Value>,
    #[serde(default)]
    error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_over_the_channel_limit_becomes_an_error_answer() {
        let huge = "k".repeat(MAX_CHANNEL_FRAME_LEN);
        let mut out = Vec::new();
        let answer = MasterMessage::State {
            id: 9,
            ok: Some(serde_json::json!([huge])),
            error: None,
        };
        assert!(append_master_message(&mut out, &answer));
        let frame = decode_master_message(&out[4..]).unwrap();
        let MasterMessage::State {
            id: 9,
            ok: None,
            error: Some(error),
        } = frame
        else {
            panic!("{frame:?}");
        };
        assert!(error.contains("over the channel's limit"), "{error}");

        let published = MasterMessage::Published {
            pattern: "p".into(),
            channel: "c".into(),
            message: huge,
        };
        out.clear();
        assert!(!append_master_message(&mut out, &published));
        assert!(out.is_empty());
    }

    #[test]
    fn the_quick_decoders_read_what_the_general_ones_read() {
        let worker = [
            r#"{"type":"state","id":7,"call":{"op":"get","key":"k"}}"#,
            r#"{"call":{"key":"k","op":"incr"},"id":8,"type":"state"}"#,
            r#"{"type":"state","id":9,"call":{"op":"set","key":"k","value":"v","ttl_ms":5}}"#,
            r#"{"type":"ready"}"#,
            r#"{"type":"send","id":1,"to":"agent","data":{"state":1}}"#,
        ];
        for text in worker {
            let general: WorkerMessage = serde_json::from_str(text).unwrap();
            assert_eq!(
                decode_worker_message(text.as_bytes()).unwrap(),
                general,
                "{text}"
            );
        }
        let refused = [
            r#"{"type":"state","id":7,"call":{"op":"get","key":"k"},"extra":1}"#,
            r#"{"type":"state","id":7}"#,
            r#"{"type":"format_disk"}"#,
            r#"{"type":"state","id":-1,"call":{"op":"get","key":"k"}}"#,
        ];
        for text in refused {
            assert!(
                serde_json::from_str::<WorkerMessage>(text).is_err(),
                "{text}"
            );
            assert!(decode_worker_message(text.as_bytes()).is_err(), "{text}");
        }
        let master = [
            r#"{"type":"state","id":7,"ok":"v"}"#,
            r#"{"type":"state","id":7,"ok":null}"#,
            r#"{"type":"state","id":7,"error":"no"}"#,
            r#"{"ok":3,"id":7,"type":"state","later":"field"}"#,
            r#"{"type":"reply","id":7,"data":{"delivered":1}}"#,
            r#"{"type":"published","pattern":"a.*","channel":"a.b","message":"m"}"#,
        ];
        for text in master {
            let general: MasterMessage = serde_json::from_str(text).unwrap();
            assert_eq!(
                decode_master_message(text.as_bytes()).unwrap(),
                general,
                "{text}"
            );
        }
    }
}
