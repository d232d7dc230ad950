//! Key/value calls written in RESP ([`corral_proto::resp`]), as workers send them to the master
//! in a batch frame, and their replies in RESP.
//!
//! A batch holds the commands `GET key`, `SET key value`, `SET key value PX ms`, `DEL key` and
//! `INCRBY key n`, with keys and values as UTF-8 text within the store's limits. Each command is
//! checked when the batch is read; those refused are answered by an error reply of their own,
//! the others run. On Redis they are written as the worker wrote them, and Redis's replies go
//! back as Redis wrote them: the master reads neither. On the embedded store they are run one by
//! one and their replies are written as Redis would write them.
//!
//! Replies made by corral (a refused command, Redis out of reach) are error replies whose text
//! starts with `CORRAL `; other error replies are Redis's own.

use std::ops::Range;
use std::time::Duration;

use corral_proto::resp::{self, Malformed};

use crate::{StateError, check_key, check_ttl, check_value};

pub use corral_proto::channel::refusal::CORRAL_ERROR;

/// A batch of RESP commands as read from a worker, each checked.
#[derive(Debug)]
pub struct Batch {
    bytes: Vec<u8>,
    commands: Vec<(Range<usize>, Result<(), StateError>)>,
    refused: usize,
}

/// A command of a batch, its parts borrowed.
enum Call<'a> {
    Get(&'a str),
    Set(&'a str, &'a str, Option<u64>),
    Del(&'a str),
    Incr(&'a str, i64),
}

impl Batch {
    /// Reads `bytes`, whole RESP commands one after the other. Commands that are not among
    /// those a batch may hold, or outside the limits, are kept to be refused one by one; bytes
    /// that are not RESP commands at all refuse the whole batch.
    pub fn read(bytes: Vec<u8>) -> Result<Batch, Malformed> {
        let mut commands = Vec::new();
        let mut refused = 0;
        let mut at = 0;
        while at < bytes.len() {
            let Some((command, len)) = resp::read_command(&bytes[at..]).map_err(|e| Malformed {
                at: at + e.at,
                what: e.what,
            })?
            else {
                return Err(Malformed {
                    at: bytes.len(),
                    what: "the rest of the command (the batch ends inside it)",
                });
            };
            let checked = call(command.args()).map(|_| ());
            refused += usize::from(checked.is_err());
            commands.push((at..at + len, checked));
            at += len;
        }
        Ok(Batch {
            bytes,
            commands,
            refused,
        })
    }

    /// How many commands it holds.
    #[must_use]
    pub fn len(&self) -> usize {
        self.commands.len()
    }

    /// Whether it holds none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Its commands as they were written, those refused left out, and how many.
    pub(crate) fn take_forwarded(&mut self) -> (Vec<u8>, usize) {
        if self.refused == 0 {
            return (std::mem::take(&mut self.bytes), self.commands.len());
        }
        let mut kept = Vec::with_capacity(self.bytes.len());
        for (range, checked) in &self.commands {
            if checked.is_ok() {
                kept.extend_from_slice(&self.bytes[range.clone()]);
            }
        }
        (kept, self.commands.len() - self.refused)
    }

    /// The replies of the whole batch, given those of the commands forwarded: refusals in
    /// their places; every command answered by `failed` when forwarding failed.
    pub(crate) fn merge(&self, url: &str, forwarded: Result<Vec<u8>, StateError>) -> Vec<u8> {
        let forwarded = match forwarded {
            Ok(replies) if self.refused == 0 => return replies,
            Ok(replies) => replies,
            Err(e) => {
                let mut out = Vec::new();
                for _ in &self.commands {
                    refusal(&mut out, &e);
                }
                return out;
            }
        };
        let mut out = Vec::with_capacity(forwarded.len() + self.refused * 64);
        let mut at = 0;
        for (_, checked) in &self.commands {
            match checked {
                Err(e) => refusal(&mut out, e),
                Ok(()) => match resp::reply_len(&forwarded[at..]) {
                    Ok(Some(len)) => {
                        out.extend_from_slice(&forwarded[at..at + len]);
                        at += len;
                    }
                    _ => refusal(
                        &mut out,
                        &StateError::Unavailable {
                            url: url.to_string(),
                            reason: "it gave fewer replies than it was sent commands".into(),
                        },
                    ),
                },
            }
        }
        out
    }

    /// Runs the batch on the embedded store: its replies.
    pub(crate) fn run_embedded(&self, store: &crate::embedded::Embedded) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.commands.len() * 16);
        for (range, checked) in &self.commands {
            if let Err(e) = checked {
                refusal(&mut out, e);
                continue;
            }
            let parsed = resp::read_command(&self.bytes[range.clone()])
                .ok()
                .flatten()
                .and_then(|(command, _)| call(command.args()).ok());
            match parsed {
                Some(Call::Get(key)) => {
                    resp::bulk(&mut out, store.get(key).as_deref().map(str::as_bytes));
                }
                Some(Call::Set(key, value, ttl_ms)) => {
                    store.set(key, value, ttl_ms);
                    resp::ok(&mut out);
                }
                Some(Call::Del(key)) => resp::integer(&mut out, i64::from(store.del(key))),
                Some(Call::Incr(key, by)) => match store.incr(key, by) {
                    Ok(n) => resp::integer(&mut out, n),
                    Err(e) => refusal(&mut out, &e),
                },
                None => unreachable!("a command checked when the batch was read reads again"),
            }
        }
        out
    }
}

/// The error reply of a command corral refused or could not run.
fn refusal(out: &mut Vec<u8>, e: &StateError) {
    resp::error(out, &format!("{CORRAL_ERROR} {e}"));
}

/// The command `args` as a call within the limits, or why not.
fn call<'a>(args: &[&'a [u8]]) -> Result<Call<'a>, StateError> {
    let text = |arg: &'a [u8]| {
        std::str::from_utf8(arg).map_err(|_| StateError::Refused {
            reason: "keys and values are UTF-8 text".into(),
        })
    };
    let key = |arg: &'a [u8]| {
        let key = text(arg)?;
        check_key(key)?;
        Ok::<_, StateError>(key)
    };
    let value = |arg: &'a [u8]| {
        let value = text(arg)?;
        check_value(value)?;
        Ok::<_, StateError>(value)
    };
    let number = |arg: &'a [u8]| {
        decimal(arg).ok_or_else(|| StateError::Refused {
            reason: format!(
                "{:?} is not a decimal 64-bit integer written plainly (no sign but -, no leading \
                 zero)",
                String::from_utf8_lossy(arg)
            ),
        })
    };
    Ok(match args {
        [b"GET", k] => Call::Get(key(k)?),
        [b"SET", k, v] => Call::Set(key(k)?, value(v)?, None),
        [b"SET", k, v, b"PX", ms] => {
            let ms = u64::try_from(number(ms)?).unwrap_or(0);
            let ttl = check_ttl(Some(Duration::from_millis(ms)))?;
            Call::Set(key(k)?, value(v)?, ttl)
        }
        [b"DEL", k] => Call::Del(key(k)?),
        [b"INCRBY", k, by] => Call::Incr(key(k)?, number(by)?),
        _ => {
            let shown: Vec<String> = args
                .iter()
                .take(3)
                .map(|arg| String::from_utf8_lossy(&arg[..arg.len().min(40)]).into_owned())
                .collect();
            return Err(StateError::Refused {
                reason: format!(
                    "{shown:?} is not a call a batch may hold: GET k, SET k v, SET k v PX ms, \
                     DEL k and INCRBY k n are"
                ),
            });
        }
    })
}

/// `arg` as a 64-bit integer when it is written as Redis writes one (and so reads it the same):
/// digits, a `-` before them but not before 0, no leading zero.
fn decimal(arg: &[u8]) -> Option<i64> {
    let digits = arg.strip_prefix(b"-").unwrap_or(arg);
    let plain = match digits {
        [b'0'] => digits.len() == arg.len(),
        [] | [b'0', ..] => false,
        _ => digits.iter().all(u8::is_ascii_digit),
    };
    if !plain {
        return None;
    }
    std::str::from_utf8(arg).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_taken_only_as_redis_writes_them() {
        for (arg, n) in [("0", Some(0)), ("42", Some(42)), ("-7", Some(-7))] {
            assert_eq!(decimal(arg.as_bytes()), n, "{arg}");
        }
        for arg in [
            "",
            "-",
            "-0",
            "+5",
            "007",
            "1e3",
            " 1",
            "99999999999999999999",
        ] {
            assert_eq!(decimal(arg.as_bytes()), None, "{arg}");
        }
    }
}
