//! The bus, blocking: messages and requests between the workers and agents corral runs. See
//! [`bus`].

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::CallError;
use crate::channel::calls::{self, DEFAULT_CALL_TIMEOUT, decode};
use crate::channel::{self, Asked, Channel};

/// How much longer than a request's own timeout the library waits for corral's answer: corral
/// times the request out itself and says why, which beats a bare [`CallError::Timeout`].
pub(crate) const REQUEST_GRACE: Duration = Duration::from_secs(1);

/// A message for this program: from `corral send`, or from another worker on the bus.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Any JSON.
    pub data: Value,
    /// Who sent it: `worker:<id>` (an agent is a worker too) or `cli`; `None` from a corral
    /// that does not say.
    pub from: Option<String>,
}

/// The bus, for blocking code: see [`bus`].
#[derive(Debug, Clone, Copy)]
pub struct Bus {
    channel: Option<&'static Channel>,
}

/// The bus: JSON messages between the workers and agents corral runs, sent to a target:
/// `agent` (the app's agent), `workers` (the app's other workers), `worker:<id>`, `app:<name>`
/// or `all`. A message can be a request: the recipient's answer, or for a target that reaches
/// several processes an array of `{"from": "worker:<id>", "data": ...}` (or `"error"`), one
/// per process, once each has answered or timed out.
///
/// Plain messages to this worker come through [`crate::next_message`] (or
/// [`crate::message`]); requests through [`Bus::next_request`]. The calls block the calling
/// thread: in async code use [`crate::tokio::bus`] instead. Outside corral, sending fails with
/// [`CallError::NotUnderCorral`] and nothing comes.
///
/// ```no_run
/// use std::time::Duration;
/// use serde_json::json;
/// let bus = corral_worker::bus();
/// let delivered = bus.send("workers", json!({"flush": "cache"}))?;
/// let answer = bus.request("agent", json!({"lease": "job-7"}), Duration::from_secs(2))?;
/// # Ok::<(), corral_worker::CallError>(())
/// ```
pub fn bus() -> Bus {
    let channel = channel::get();
    if let Some(channel) = channel {
        channel.listen_on_thread();
    }
    Bus::on(channel)
}

impl Bus {
    pub(crate) fn on(channel: Option<&'static Channel>) -> Bus {
        Bus { channel }
    }

    /// Sends `data` to `to` (a target: `agent`, `workers`, `worker:<id>`, `app:<name>`, `all`);
    /// how many got it. Waits for corral's answer at most [`DEFAULT_CALL_TIMEOUT`].
    pub fn send(&self, to: &str, data: Value) -> Result<u64, CallError> {
        let channel = self.channel.ok_or(CallError::NotUnderCorral)?;
        let batch = channel.call_send(to, data, None);
        let deadline = Instant::now().checked_add(DEFAULT_CALL_TIMEOUT);
        decode::delivered(calls::single(channel.wait(&batch, deadline)))
    }

    /// Sends request `data` to `to` and waits at most `timeout` for its answer (corral allows
    /// 10 minutes at most); to several processes (`workers`, `app:<name>`, `all`), the array of
    /// their answers. An answer given as an error,
    /// no recipient, or no answer in time is [`CallError::Failed`] with corral's reason;
    /// [`CallError::Timeout`] when not even that came a second later.
    pub fn request(&self, to: &str, data: Value, timeout: Duration) -> Result<Value, CallError> {
        let channel = self.channel.ok_or(CallError::NotUnderCorral)?;
        let batch = channel.call_send(to, data, Some(timeout));
        let deadline = Instant::now().checked_add(timeout.saturating_add(REQUEST_GRACE));
        calls::single(channel.wait(&batch, deadline))
    }

    /// The next request for this worker, waiting at most `timeout` (for ever with `None`);
    /// `None` when none came in time, when the channel to corral closed, or outside corral.
    /// Answer it with [`Request::reply`].
    ///
    /// Requests wait for the program in order; when 4096 wait, the oldest is answered with an
    /// error.
    pub fn next_request(&self, timeout: Option<Duration>) -> Option<Request> {
        let channel = self.channel?;
        channel
            .request_blocking(timeout)
            .map(|asked| Request::new(channel, asked))
    }
}

/// A request on the bus, to be answered with [`Request::reply`]. Dropped unanswered, it answers
/// the sender with an error.
#[derive(Debug)]
pub struct Request {
    /// Who sent it: `worker:<id>` (an agent is a worker too), or `cli` for
    /// `corral send --reply`; `unknown` from a corral that does not say.
    pub from: String,
    /// What it asks (any JSON).
    pub data: Value,
    number: u64,
    channel: &'static Channel,
    answered: bool,
}

impl Request {
    pub(crate) fn new(channel: &'static Channel, asked: Asked) -> Request {
        Request {
            from: asked.from,
            data: asked.data,
            number: asked.number,
            channel,
            answered: false,
        }
    }

    /// Answers the request: with a value, or with an error the sender gets as
    /// [`CallError::Failed`]. Fails only when the channel to corral is gone.
    pub fn reply(mut self, answer: Result<Value, String>) -> Result<(), CallError> {
        self.answered = true;
        self.channel
            .reply(self.number, answer)
            .map_err(|_| CallError::ChannelClosed)
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.channel.reply(
                self.number,
                Err("the worker dropped the request without answering".to_string()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use corral_proto::channel::WorkerMessage;
    use serde_json::json;

    use super::*;
    use crate::channel::testing::{channel, read_message, write_frame};

    const LONG: Duration = Duration::from_secs(20);

    fn read_send(master: &std::os::unix::net::UnixStream) -> WorkerMessage {
        let message = read_message(master);
        assert!(matches!(message, WorkerMessage::Send { .. }), "{message:?}");
        message
    }

    #[test]
    fn outside_corral_the_bus_says_corral_is_needed() {
        let bus = Bus::on(None);
        assert_eq!(bus.send("all", json!(1)), Err(CallError::NotUnderCorral));
        assert_eq!(
            bus.request("agent", json!(1), LONG),
            Err(CallError::NotUnderCorral)
        );
        assert!(bus.next_request(None).is_none());
    }

    #[test]
    fn a_message_says_how_many_got_it() {
        let (channel, master) = channel();
        let bus = Bus::on(Some(channel));
        let sender = thread::spawn(move || bus.send("workers", json!({"flush": true})));
        let WorkerMessage::Send {
            id,
            to,
            data,
            request,
            timeout_ms,
        } = read_send(&master)
        else {
            unreachable!()
        };
        assert_eq!(
            (to.as_str(), data, request, timeout_ms),
            ("workers", json!({"flush": true}), false, None)
        );
        write_frame(
            &master,
            &json!({"type": "reply", "id": id, "data": {"delivered": 3}}),
        );
        assert_eq!(sender.join().unwrap(), Ok(3));

        let sender = thread::spawn(move || bus.send("app:nope", json!(1)));
        let WorkerMessage::Send { id, .. } = read_send(&master) else {
            unreachable!()
        };
        write_frame(
            &master,
            &json!({"type": "reply", "id": id, "error": "no app is named nope"}),
        );
        assert_eq!(
            sender.join().unwrap(),
            Err(CallError::Failed("no app is named nope".into()))
        );
    }

    #[test]
    fn a_request_gets_the_recipients_answer_or_times_out() {
        let (channel, master) = channel();
        let bus = Bus::on(Some(channel));
        let asker =
            thread::spawn(move || bus.request("worker:4", json!("ping"), Duration::from_secs(3)));
        let WorkerMessage::Send {
            id,
            request,
            timeout_ms,
            ..
        } = read_send(&master)
        else {
            unreachable!()
        };
        assert_eq!((request, timeout_ms), (true, Some(3000)));
        // A state answer with the same number is not this call's answer.
        write_frame(&master, &json!({"type": "state", "id": id, "ok": "wrong"}));
        write_frame(&master, &json!({"type": "reply", "id": id, "data": "pong"}));
        assert_eq!(asker.join().unwrap(), Ok(json!("pong")));

        // No answer: the library gives up a little after the request's own timeout.
        let started = Instant::now();
        assert_eq!(
            bus.request("worker:4", json!("ping"), Duration::from_millis(10)),
            Err(CallError::Timeout)
        );
        assert!(started.elapsed() >= REQUEST_GRACE);
        assert_eq!(channel.pending_len(), 0);
    }

    #[test]
    fn requests_are_answered_by_reply_or_by_being_dropped() {
        let (channel, master) = channel();
        let bus = Bus::on(Some(channel));
        write_frame(
            &master,
            &json!({"type": "message", "data": {"q": 1}, "from": "worker:2", "request": 5}),
        );
        write_frame(
            &master,
            &json!({"type": "message", "data": {"q": 2}, "from": "worker:3", "request": 6}),
        );
        write_frame(
            &master,
            &json!({"type": "message", "data": "later", "from": "worker:3", "request": 7}),
        );
        let first = bus.next_request(Some(LONG)).unwrap();
        assert_eq!(
            (first.from.as_str(), &first.data),
            ("worker:2", &json!({"q": 1}))
        );
        first.reply(Ok(json!({"a": 1}))).unwrap();
        assert_eq!(
            read_message(&master),
            WorkerMessage::Reply {
                request: 5,
                data: json!({"a": 1}),
                error: None
            }
        );
        bus.next_request(Some(LONG))
            .unwrap()
            .reply(Err("no such job".into()))
            .unwrap();
        assert_eq!(
            read_message(&master),
            WorkerMessage::Reply {
                request: 6,
                data: Value::Null,
                error: Some("no such job".into())
            }
        );
        drop(bus.next_request(Some(LONG)).unwrap());
        assert_eq!(
            read_message(&master),
            WorkerMessage::Reply {
                request: 7,
                data: Value::Null,
                error: Some("the worker dropped the request without answering".into())
            }
        );
        assert!(bus.next_request(Some(Duration::from_millis(1))).is_none());
    }

    #[test]
    fn plain_messages_and_requests_keep_apart() {
        let (channel, master) = channel();
        let bus = Bus::on(Some(channel));
        write_frame(
            &master,
            &json!({"type": "message", "data": "asked", "from": "worker:1", "request": 1}),
        );
        write_frame(
            &master,
            &json!({"type": "message", "data": "told", "from": "cli"}),
        );
        let message = channel.message_blocking(Some(LONG)).unwrap();
        assert_eq!(
            message,
            Message {
                data: json!("told"),
                from: Some("cli".into())
            }
        );
        let request = bus.next_request(Some(LONG)).unwrap();
        assert_eq!(request.data, json!("asked"));
        request.reply(Ok(Value::Null)).unwrap();
        assert!(
            channel
                .message_blocking(Some(Duration::from_millis(1)))
                .is_none()
        );
    }
}
