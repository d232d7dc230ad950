//! The shared state, blocking: a key/value store and pub/sub shared by every worker corral runs,
//! kept by the master (in memory, or in Redis). See [`state`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::channel::StateCall;
use serde_json::Value;

use crate::CallError;
use crate::channel::calls::{self, DEFAULT_CALL_TIMEOUT, decode};
use crate::channel::feeds::Feed;
use crate::channel::{self, Channel};

/// A message published on a channel that matches a subscription's pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The subscription's pattern.
    pub pattern: String,
    /// The channel it was published on.
    pub channel: String,
    /// The message.
    pub message: String,
}

/// The shared state, for blocking code: see [`state`].
#[derive(Debug, Clone, Copy)]
pub struct State {
    channel: Option<&'static Channel>,
    timeout: Duration,
}

/// The shared state: a key/value store and pub/sub, the same for every worker of every app
/// corral runs. Values and messages are strings (JSON-encode them for structure); keys,
/// channels and patterns are at most 1 KiB, values and messages 512 KiB.
///
/// The handle is cheap to get and to copy. Outside corral every call fails with
/// [`CallError::NotUnderCorral`]. The calls block the calling thread until corral answers (at
/// most [`DEFAULT_CALL_TIMEOUT`], or see [`State::with_timeout`]): in async code use
/// [`crate::tokio::state`] instead. A call takes a round trip to the master; to make many at
/// once, use [`State::call_many`]. Gets, sets, dels and incrs go to the master as Redis commands
/// in one frame per batch, which a Redis store takes as they are (see `docs/protocol.md`, "State
/// batches"): from one worker they run at about 0.8 to 0.9 times the speed of a Redis client
/// of its own, and at about 2 million gets a second on the embedded store.
///
/// ```no_run
/// let state = corral_worker::state();
/// state.set("greeting", "hello")?;
/// assert_eq!(state.get("greeting")?.as_deref(), Some("hello"));
/// let visits = state.incr("visits", 1)?;
/// # Ok::<(), corral_worker::CallError>(())
/// ```
pub fn state() -> State {
    let channel = channel::get();
    if let Some(channel) = channel {
        channel.listen_on_thread();
    }
    State::on(channel)
}

impl State {
    pub(crate) fn on(channel: Option<&'static Channel>) -> State {
        State {
            channel,
            timeout: DEFAULT_CALL_TIMEOUT,
        }
    }

    /// The same handle, whose calls give up with [`CallError::Timeout`] after `timeout` instead
    /// of [`DEFAULT_CALL_TIMEOUT`] (`Duration::MAX`: never; corral answers every call, or the
    /// channel closes).
    #[must_use]
    pub fn with_timeout(self, timeout: Duration) -> State {
        State { timeout, ..self }
    }

    /// The value of `key`, or `None` when it is not set.
    pub fn get(&self, key: &str) -> Result<Option<String>, CallError> {
        decode::optional_string(self.call(StateCall::Get {
            key: key.to_string(),
        }))
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &str, value: &str) -> Result<(), CallError> {
        decode::done("set", self.call(set(key, value, None)))
    }

    /// Sets `key` to `value` for `ttl` (rounded up to a millisecond).
    pub fn set_with_ttl(&self, key: &str, value: &str, ttl: Duration) -> Result<(), CallError> {
        decode::done("set", self.call(set(key, value, Some(ttl))))
    }

    /// Removes `key`; whether it was set.
    pub fn del(&self, key: &str) -> Result<bool, CallError> {
        decode::boolean(
            "del",
            self.call(StateCall::Del {
                key: key.to_string(),
            }),
        )
    }

    /// Adds `by` (possibly negative) to the integer in `key`, a missing key counting as 0; the
    /// new value.
    pub fn incr(&self, key: &str, by: i64) -> Result<i64, CallError> {
        decode::integer(self.call(StateCall::Incr {
            key: key.to_string(),
            by,
        }))
    }

    /// Sets `key` to `new` (removes it with `None`) only if its value is `expected` (`None`:
    /// only if it is not set); whether it did.
    pub fn cas(
        &self,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<bool, CallError> {
        decode::boolean("cas", self.call(cas(key, expected, new)))
    }

    /// The keys matching a glob `pattern` (`*`, `?`, `[a-z]`), sorted.
    pub fn keys(&self, pattern: &str) -> Result<Vec<String>, CallError> {
        decode::strings(self.call(StateCall::Keys {
            pattern: pattern.to_string(),
        }))
    }

    /// Publishes `message` on `channel`; how many subscriptions got it.
    pub fn publish(&self, channel: &str, message: &str) -> Result<u64, CallError> {
        decode::count(self.call(StateCall::Publish {
            channel: channel.to_string(),
            message: message.to_string(),
        }))
    }

    /// Subscribes to the channels matching a glob `pattern` (a plain name matches itself): the
    /// messages published on them from the moment this returns. Dropping the subscription
    /// unsubscribes.
    pub fn subscribe(&self, pattern: &str) -> Result<Subscription, CallError> {
        let channel = self.channel.ok_or(CallError::NotUnderCorral)?;
        let (feed, call) = channel.open_feed(pattern)?;
        let subscription = Subscription {
            pattern: pattern.to_string(),
            feed,
            channel,
        };
        if let Some(call) = call {
            let answer = calls::single(channel.wait(&call, self.deadline()));
            // On failure the subscription, dropped, takes its feed out.
            decode::done("subscribe", answer)?;
        }
        Ok(subscription)
    }

    /// One call, as [`corral_proto::channel::StateCall`] describes it; its answer as JSON.
    pub fn call(&self, call: StateCall) -> Result<Value, CallError> {
        calls::single(self.call_many(vec![call]))
    }

    /// Many calls at once: all are written to corral in one go, then their answers are awaited
    /// together, so the calls cost about one round trip in all (this is how a worker makes
    /// thousands of calls a second). The answers come in the order of `calls`, each as
    /// [`corral_proto::channel::StateCall`] describes it; corral may do the calls in any order.
    /// The timeout is for the whole batch: calls still unanswered then get
    /// [`CallError::Timeout`].
    pub fn call_many(&self, calls: Vec<StateCall>) -> Vec<Result<Value, CallError>> {
        let Some(channel) = self.channel else {
            return calls
                .iter()
                .map(|_| Err(CallError::NotUnderCorral))
                .collect();
        };
        let batch = channel.call_state(calls);
        channel.wait(&batch, self.deadline())
    }

    fn deadline(&self) -> Option<Instant> {
        Instant::now().checked_add(self.timeout)
    }
}

/// The `set` call.
pub(crate) fn set(key: &str, value: &str, ttl: Option<Duration>) -> StateCall {
    StateCall::Set {
        key: key.to_string(),
        value: value.to_string(),
        ttl_ms: ttl.map(|ttl| {
            let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            // Under a millisecond is not no time to live at all.
            if ms == 0 && !ttl.is_zero() { 1 } else { ms }
        }),
    }
}

/// The `cas` call.
pub(crate) fn cas(key: &str, expected: Option<&str>, new: Option<&str>) -> StateCall {
    StateCall::Cas {
        key: key.to_string(),
        expected: expected.map(str::to_string),
        new: new.map(str::to_string),
        ttl_ms: None,
    }
}

/// The messages published on the channels matching a pattern, for blocking code: see
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

    /// The next message, waiting as long as it takes; `None` once the channel to corral closed
    /// (and the messages that came before were taken).
    ///
    /// Messages wait for the program in order; when more than 4096 wait, the oldest are dropped.
    pub fn next(&self) -> Option<Published> {
        self.feed.next_blocking(None)
    }

    /// The next message, waiting at most `timeout`; `None` when none came in time or the
    /// channel to corral closed.
    pub fn next_timeout(&self, timeout: Duration) -> Option<Published> {
        self.feed.next_blocking(Instant::now().checked_add(timeout))
    }

    /// The messages, one after the other, until the channel to corral closes.
    pub fn iter(&self) -> impl Iterator<Item = Published> + '_ {
        std::iter::from_fn(|| self.next())
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.channel.close_feed(&self.pattern, &self.feed);
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use serde_json::json;

    use super::*;
    use crate::channel::testing::{
        answer, channel, channel_to_protocol_1, read_call, read_message, refuse, reply_as_redis,
        write_frame,
    };
    use corral_proto::channel::WorkerMessage;
    use corral_proto::channel::refusal;

    const LONG: Duration = Duration::from_secs(20);

    #[test]
    fn outside_corral_calls_say_corral_is_needed() {
        let state = State::on(None);
        assert_eq!(state.get("a"), Err(CallError::NotUnderCorral));
        assert!(state.subscribe("a").is_err());
        assert_eq!(
            state.call_many(vec![
                StateCall::Keys {
                    pattern: "*".into()
                };
                2
            ]),
            vec![
                Err(CallError::NotUnderCorral),
                Err(CallError::NotUnderCorral)
            ]
        );
        assert!(
            CallError::NotUnderCorral
                .to_string()
                .contains("need corral"),
        );
    }

    #[test]
    fn answers_go_to_their_calls_in_whatever_order_they_come() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let callers: Vec<_> = ["a", "b", "c"]
            .into_iter()
            .map(|key| thread::spawn(move || (key, state.get(key))))
            .collect();
        let mut calls: Vec<(u64, StateCall)> = (0..3).map(|_| read_call(&master)).collect();
        // Answered last to first, each with its own key as the value.
        calls.reverse();
        write_frame(
            &master,
            &json!({"type": "state", "id": 999_999, "ok": "nobody's"}),
        );
        for (id, call) in &calls {
            let StateCall::Get { key } = call else {
                panic!("{call:?}")
            };
            answer(&master, *id, &json!(format!("value of {key}")));
        }
        for caller in callers {
            let (key, got) = caller.join().unwrap();
            assert_eq!(got, Ok(Some(format!("value of {key}"))));
        }
        assert_eq!(channel.pending_len(), 0);
    }

    #[test]
    fn typed_calls_read_their_answers() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let master = thread::spawn(move || {
            let script = [
                (json!(null), None),
                (json!(true), None),
                (json!(true), None),
                (json!(false), None),
                (json!(42), None),
                (json!(true), None),
                (json!(["a", "b"]), None),
                (json!(3), None),
                (Value::Null, Some("the store is unreachable")),
                (json!("not a number"), None),
            ];
            let mut seen = Vec::new();
            for (ok, error) in script {
                let (id, call) = read_call(&master);
                seen.push(call);
                match error {
                    Some(error) => refuse(&master, id, error),
                    None => answer(&master, id, &ok),
                }
            }
            seen
        });
        assert_eq!(state.get("missing"), Ok(None));
        assert_eq!(state.set("k", "v"), Ok(()));
        assert_eq!(
            state.set_with_ttl("k", "v", Duration::from_micros(10)),
            Ok(())
        );
        assert_eq!(state.del("k"), Ok(false));
        assert_eq!(state.incr("n", -2), Ok(42));
        assert_eq!(state.cas("k", None, Some("new")), Ok(true));
        assert_eq!(state.keys("*"), Ok(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(state.publish("news", "hi"), Ok(3));
        assert_eq!(
            state.get("k"),
            Err(CallError::Failed("the store is unreachable".into()))
        );
        let Err(CallError::Failed(text)) = state.incr("n", 1) else {
            panic!("a string for incr is not understood")
        };
        assert!(text.contains("same version"), "{text}");

        let seen = master.join().unwrap();
        assert_eq!(
            seen[2],
            StateCall::Set {
                key: "k".into(),
                value: "v".into(),
                ttl_ms: Some(1)
            }
        );
        assert_eq!(
            seen[4],
            StateCall::Incr {
                key: "n".into(),
                by: -2
            }
        );
        assert_eq!(
            seen[5],
            StateCall::Cas {
                key: "k".into(),
                expected: None,
                new: Some("new".into()),
                ttl_ms: None
            }
        );
    }

    #[test]
    fn call_many_writes_every_call_before_it_waits() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let calls: Vec<StateCall> = (0..500)
            .map(|i| StateCall::Get {
                key: format!("bench:{i}"),
            })
            .collect();
        let caller = thread::spawn(move || state.call_many(calls));
        // The master reads all 500 before it answers any: a library that waited for an answer
        // between writes would leave this read waiting (and failing at its timeout).
        let mut ids: Vec<(u64, String)> = (0..500)
            .map(|_| match read_call(&master) {
                (id, StateCall::Get { key }) => (id, key),
                (_, other) => panic!("{other:?}"),
            })
            .collect();
        ids.reverse();
        for (id, key) in &ids {
            answer(&master, *id, &json!(key));
        }
        let answers = caller.join().unwrap();
        assert_eq!(answers.len(), 500);
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer, Ok(json!(format!("bench:{i}"))));
        }
        assert_eq!(channel.pending_len(), 0);
    }

    #[test]
    fn batches_split_around_other_calls_and_the_frame_limit_and_answers_find_their_calls() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let big = |key: &str| StateCall::Set {
            key: key.into(),
            value: "x".repeat(600 * 1024),
            ttl_ms: None,
        };
        let calls = vec![
            StateCall::Get { key: "a".into() },
            StateCall::Keys {
                pattern: "*".into(),
            },
            big("big1"),
            // Over the frame limit with big1: in a frame of its own.
            big("big2"),
            StateCall::Set {
                key: "huge".into(),
                value: "x".repeat(2 * 1024 * 1024),
                ttl_ms: None,
            },
            StateCall::Incr {
                key: "c".into(),
                by: 2,
            },
        ];
        let caller = thread::spawn(move || state.call_many(calls));
        let mut read: Vec<(u64, StateCall)> = (0..5).map(|_| read_call(&master)).collect();
        let keys: Vec<String> = read
            .iter()
            .map(|(_, call)| match call {
                StateCall::Get { key }
                | StateCall::Set { key, .. }
                | StateCall::Incr { key, .. } => key.clone(),
                StateCall::Keys { pattern } => pattern.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(keys, ["a", "*", "big1", "big2", "c"]);
        read.reverse();
        for (id, call) in read {
            let ok = match call {
                StateCall::Get { .. } => json!("A"),
                StateCall::Keys { .. } => json!(["a"]),
                StateCall::Set { .. } => json!(true),
                _ => json!(7),
            };
            answer(&master, id, &ok);
        }
        let answers = caller.join().unwrap();
        assert_eq!(answers[0], Ok(json!("A")));
        assert_eq!(answers[1], Ok(json!(["a"])));
        assert_eq!(
            (&answers[2], &answers[3]),
            (&Ok(json!(true)), &Ok(json!(true)))
        );
        assert!(
            matches!(answers[4], Err(CallError::TooLarge { .. })),
            "{:?}",
            answers[4]
        );
        assert_eq!(answers[5], Ok(json!(7)));
        assert_eq!(channel.pending_len(), 0);
    }

    #[test]
    fn redis_errors_in_state_batches_read_as_corral_says_them() {
        fn failed<T>(text: String) -> Result<T, CallError> {
            Err(CallError::Failed(text))
        }
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let master = thread::spawn(move || {
            for reply in [
                &b"-ERR value is not an integer or out of range\r\n"[..],
                b"-ERR increment or decrement would overflow\r\n",
                b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
                b"$2\r\n\xff\xfe\r\n",
                b"-CORRAL Redis at redis://127.0.0.1:1/0 is unreachable: gone\r\n",
            ] {
                let (id, _) = read_call(&master);
                reply_as_redis(&master, id, reply);
            }
        });
        assert_eq!(state.incr("n", 1), failed(refusal::not_integer("n")));
        assert_eq!(state.incr("n", 1), failed(refusal::overflow("n")));
        assert_eq!(
            state.incr("list", 1),
            failed(
                "Redis refused the command: WRONGTYPE Operation against a key holding the wrong \
                 kind of value"
                    .into()
            )
        );
        assert_eq!(state.get("bin"), failed(refusal::not_utf8("bin")));
        assert_eq!(
            state.get("k"),
            failed("Redis at redis://127.0.0.1:1/0 is unreachable: gone".into())
        );
        master.join().unwrap();
    }

    #[test]
    fn a_master_of_protocol_1_gets_state_messages_only() {
        let (channel, master) = channel_to_protocol_1();
        let state = State::on(Some(channel));
        let calls = vec![
            StateCall::Get { key: "a".into() },
            StateCall::Incr {
                key: "n".into(),
                by: 1,
            },
        ];
        let caller = thread::spawn(move || state.call_many(calls));
        for ok in [json!("A"), json!(1)] {
            let WorkerMessage::State { id, .. } = read_message(&master) else {
                panic!("not a state message");
            };
            write_frame(&master, &json!({"type": "state", "id": id, "ok": ok}));
        }
        assert_eq!(caller.join().unwrap(), [Ok(json!("A")), Ok(json!(1))]);
    }

    #[test]
    fn an_oversized_call_is_refused_and_the_others_go() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let huge = "x".repeat(2 * 1024 * 1024);
        let calls = vec![
            StateCall::Get { key: "a".into() },
            StateCall::Set {
                key: "big".into(),
                value: huge,
                ttl_ms: None,
            },
        ];
        let caller = thread::spawn(move || state.call_many(calls));
        let (id, call) = read_call(&master);
        assert_eq!(call, StateCall::Get { key: "a".into() });
        answer(&master, id, &json!("A"));
        let answers = caller.join().unwrap();
        assert_eq!(answers[0], Ok(json!("A")));
        assert!(
            matches!(answers[1], Err(CallError::TooLarge { .. })),
            "{:?}",
            answers[1]
        );
    }

    #[test]
    fn every_waiter_hears_that_the_channel_closed() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let callers: Vec<_> = (0..4)
            .map(|i| thread::spawn(move || state.incr(&format!("k{i}"), 1)))
            .collect();
        for _ in 0..4 {
            read_call(&master);
        }
        let many =
            thread::spawn(move || state.call_many(vec![StateCall::Del { key: "x".into() }; 3]));
        for _ in 0..3 {
            read_call(&master);
        }
        drop(master);
        for caller in callers {
            assert_eq!(caller.join().unwrap(), Err(CallError::ChannelClosed));
        }
        assert!(
            many.join()
                .unwrap()
                .into_iter()
                .all(|answer| answer == Err(CallError::ChannelClosed))
        );
        assert_eq!(channel.pending_len(), 0);
        // Later calls fail at once.
        assert_eq!(state.get("k"), Err(CallError::ChannelClosed));
        assert!(matches!(
            state.subscribe("news"),
            Err(CallError::ChannelClosed)
        ));
    }

    #[test]
    fn a_call_given_up_on_leaves_nothing_behind() {
        let (channel, master) = channel();
        let state = State::on(Some(channel)).with_timeout(Duration::from_millis(50));
        assert_eq!(state.get("slow"), Err(CallError::Timeout));
        assert_eq!(channel.pending_len(), 0);
        // The late answer is ignored; the next call gets its own.
        let (late, _) = read_call(&master);
        answer(&master, late, &json!("late"));
        let caller = thread::spawn(move || state.with_timeout(LONG).get("next"));
        let (id, _) = read_call(&master);
        answer(&master, id, &json!("mine"));
        assert_eq!(caller.join().unwrap(), Ok(Some("mine".into())));
    }

    #[test]
    fn subscriptions_share_a_pattern_and_the_last_one_dropped_unsubscribes() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let first = thread::spawn(move || state.subscribe("news.*"));
        let (id, call) = read_call(&master);
        assert_eq!(
            call,
            StateCall::Subscribe {
                pattern: "news.*".into()
            }
        );
        answer(&master, id, &json!(true));
        let first = first.join().unwrap().unwrap();
        assert_eq!(first.pattern(), "news.*");
        // A second subscription of the same pattern sends nothing: the master knows it.
        let second = state.subscribe("news.*").unwrap();
        assert_eq!(channel.feed_counts(), [("news.*".to_string(), 2)]);

        write_frame(
            &master,
            &json!({"type": "published", "pattern": "news.*", "channel": "news.sport",
                    "message": "goal"}),
        );
        let expected = Published {
            pattern: "news.*".into(),
            channel: "news.sport".into(),
            message: "goal".into(),
        };
        assert_eq!(first.next_timeout(LONG), Some(expected.clone()));
        assert_eq!(second.next_timeout(LONG), Some(expected));
        assert_eq!(first.next_timeout(Duration::from_millis(1)), None);

        drop(first);
        drop(second);
        assert_eq!(
            read_call(&master).1,
            StateCall::Unsubscribe {
                pattern: "news.*".into()
            }
        );
        assert!(channel.feed_counts().is_empty());
        assert_eq!(channel.pending_len(), 0);
    }

    #[test]
    fn a_refused_subscription_is_taken_back() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let caller = thread::spawn(move || state.subscribe("bad").map(|_| ()));
        let (id, _) = read_call(&master);
        write_frame(
            &master,
            &json!({"type": "state", "id": id, "error": "the pattern is too long"}),
        );
        assert_eq!(
            caller.join().unwrap(),
            Err(CallError::Failed("the pattern is too long".into()))
        );
        assert!(channel.feed_counts().is_empty());
    }

    #[test]
    fn a_subscription_ends_when_the_channel_closes() {
        let (channel, master) = channel();
        let state = State::on(Some(channel));
        let caller = thread::spawn(move || state.subscribe("a"));
        let (id, _) = read_call(&master);
        answer(&master, id, &json!(true));
        let subscription = caller.join().unwrap().unwrap();
        write_frame(
            &master,
            &json!({"type": "published", "pattern": "a", "channel": "a", "message": "last"}),
        );
        drop(master);
        let got: Vec<String> = subscription.iter().map(|p| p.message).collect();
        assert_eq!(got, ["last"]);
    }
}
