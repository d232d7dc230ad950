//! Calls the master answers: bus sends ([`WorkerMessage::Send`], answered by a `reply`) and
//! shared-state operations ([`WorkerMessage::State`], answered by a `state`).
//!
//! Every call gets a number from one counter and waits in [`Pending`] under it, with the
//! [`Batch`] it belongs to (a single call is a batch of one). The reader hands each answer to its
//! batch by number, in whatever order answers come, and ignores numbers it does not know (calls
//! given up on). The batch's caller wakes once, when the last answer is in. When the channel
//! closes, every waiting call gets [`CallError::ChannelClosed`] and later calls fail at once; a
//! caller that gives up (a timeout, a dropped future) takes its numbers out: nothing is left
//! behind.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::task::Waker;
#[cfg(feature = "tokio")]
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use corral_proto::channel::refusal;
use corral_proto::channel::{
    MAX_CHANNEL_FRAME_LEN, MAX_STATE_BATCH, STATE_BATCH_HEADER_LEN, StateCall, WorkerMessage,
    finish_state_batch, start_state_batch,
};
use corral_proto::resp::{self, Reply};
use serde_json::Value;

use super::Channel;

/// Why a call to corral (the shared state, the bus) has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallError {
    /// The program was not started by corral: there is no channel to the master.
    NotUnderCorral,
    /// The channel to the master closed (corral stopped, or the master died), before or while
    /// the call waited.
    ChannelClosed,
    /// The master, or the worker a request went to, answered with this error.
    Failed(String),
    /// No answer came in time.
    Timeout,
    /// The call was not sent: its frame would be over the channel's limit.
    TooLarge {
        /// The frame's length, in bytes.
        len: usize,
        /// The limit, [`MAX_CHANNEL_FRAME_LEN`].
        max: usize,
    },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotUnderCorral => f.write_str(
                "this program was not started by corral: the shared state and the bus need \
                 corral (run the program with `corral start`)",
            ),
            CallError::ChannelClosed => f.write_str(
                "the channel to corral is closed (the master went away): whether the call was \
                 done is unknown; this worker should finish its work and exit",
            ),
            CallError::Failed(error) => f.write_str(error),
            CallError::Timeout => f.write_str(
                "no answer came in time: corral or the recipient is busy or stuck; try again, \
                 or allow more time",
            ),
            CallError::TooLarge { len, max } => write!(
                f,
                "the call takes {len} bytes, over the channel's limit of {max}: keep keys, \
                 channels and patterns under 1 KiB and values and messages under 512 KiB"
            ),
        }
    }
}

impl std::error::Error for CallError {}

/// How long a call waits for its answer unless told otherwise (as corral.js does). Corral
/// answers every call, a store it cannot reach within about 2 seconds: this only guards against
/// a master that stopped answering without closing the channel.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer: the master's `ok` (or a reply's `data`), or why there is none.
pub(crate) type Answer = Result<Value, CallError>;

/// Which answer a call waits for: a `reply` (bus) or a `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Send,
    State,
}

/// The calls waiting for an answer: those written as messages by number, those written in
/// state batch frames by frame.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    /// The channel closed: no call will be answered.
    closed: bool,
    calls: HashMap<u64, Waiting, BuildHasherDefault<Numbers>>,
    /// By the number of the frame's first call.
    frames: BTreeMap<u64, Frame>,
}

/// The calls of one state batch frame, numbered on from its key in [`Pending::frames`].
#[derive(Debug)]
struct Frame {
    batch: Arc<Batch>,
    /// The index in `batch` of the frame's first call.
    index: usize,
    /// How the reply of each call reads.
    shapes: Arc<[Shape]>,
    /// Calls not answered yet (replies come in order, so they are the last ones).
    left: usize,
}

/// Hashes call numbers, which are ours and consecutive: a multiplication spreads them, and no
/// one can choose them to collide.
#[derive(Debug, Default)]
struct Numbers(u64);

impl Hasher for Numbers {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 << 8 | u64::from(byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Debug)]
struct Waiting {
    kind: Kind,
    batch: Arc<Batch>,
    index: usize,
}

/// What the reply to a call written in a state batch is, and how it reads as the JSON answer the
/// same call written as a `state` message gets.
#[derive(Debug)]
enum Shape {
    /// `get`: a bulk string, or nil (`null`).
    Value { key: String },
    /// `set`: `+OK` (`true`).
    Done,
    /// `del`: an integer, how many keys went (`true` when one did).
    Yes,
    /// `incr`: an integer, the new value.
    Number { key: String },
}

impl Shape {
    fn read(&self, reply: Reply<'_>) -> Answer {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        match (self, reply) {
            (_, Reply::Error(error)) => Err(CallError::Failed(self.refused(&text(error)))),
            (Shape::Value { key }, Reply::Bulk(Some(value))) => match std::str::from_utf8(value) {
                Ok(value) => Ok(Value::String(value.to_string())),
                Err(_) => Err(CallError::Failed(refusal::not_utf8(key))),
            },
            (Shape::Value { .. }, Reply::Bulk(None)) => Ok(Value::Null),
            (Shape::Done, Reply::Simple(_)) => Ok(Value::Bool(true)),
            (Shape::Yes, Reply::Integer(n)) => Ok(Value::Bool(n > 0)),
            (Shape::Number { .. }, Reply::Integer(n)) => Ok(Value::from(n)),
            (_, reply) => Err(CallError::Failed(format!(
                "corral answered a state call with the reply {reply:?}, which this version of \
                 corral-worker does not understand: use a corral-worker of the same version as \
                 corral"
            ))),
        }
    }

    /// The message of an error reply: corral's own as it is; Redis's said as corral says it.
    fn refused(&self, error: &str) -> String {
        if let Some(own) = error
            .strip_prefix(refusal::CORRAL_ERROR)
            .and_then(|rest| rest.strip_prefix(' '))
        {
            return own.to_string();
        }
        match self {
            Shape::Number { key } if error.starts_with("ERR value is not an integer") => {
                refusal::not_integer(key)
            }
            Shape::Number { key } if error.contains("overflow") => refusal::overflow(key),
            _ => format!("Redis refused the command: {error}"),
        }
    }
}

/// A call as a command of a state batch, written at the end of `out`, and how its reply reads;
/// the call back when it is not one a batch may hold.
fn write_command(out: &mut Vec<u8>, call: StateCall) -> Result<Shape, StateCall> {
    if !call.write_command(out) {
        return Err(call);
    }
    Ok(match call {
        StateCall::Get { key } => Shape::Value { key },
        StateCall::Incr { key, .. } => Shape::Number { key },
        StateCall::Del { .. } => Shape::Yes,
        _ => Shape::Done,
    })
}

/// The calls of a batch that were written, by index: as messages, or in state batch frames (the
/// index of each frame's first call, and how each of its replies reads).
#[derive(Debug, Default)]
struct Sent {
    all: Vec<usize>,
    messages: Vec<usize>,
    frames: Vec<(usize, Vec<Shape>)>,
}

impl Sent {
    fn message(&mut self, index: usize) {
        self.all.push(index);
        self.messages.push(index);
    }

    /// Call `index`, in a state batch frame: the first of a new frame, or the next of the last.
    fn batched(&mut self, index: usize, shape: Shape, new_frame: bool) {
        self.all.push(index);
        match self.frames.last_mut() {
            Some((_, shapes)) if !new_frame => shapes.push(shape),
            _ => self.frames.push((index, vec![shape])),
        }
    }
}

/// Frames of state calls being written into one buffer: state batch frames, and `state`
/// messages (for the calls a batch does not hold) between them.
#[derive(Debug)]
struct Frames {
    bytes: Vec<u8>,
    /// The batch frame being written: where it starts, and how many calls it holds.
    open: Option<(usize, usize)>,
}

/// What became of a call given to [`Frames::command`].
enum Written {
    /// It is in a batch frame, the first of it when `new_frame`.
    Batched { shape: Shape, new_frame: bool },
    /// A batch does not hold it: here it is back.
    NotBatched(StateCall),
    /// It is over the frame limit even alone.
    TooLarge(CallError),
}

impl Frames {
    fn with_capacity(capacity: usize) -> Frames {
        Frames {
            bytes: Vec::with_capacity(capacity),
            open: None,
        }
    }

    /// Writes call `id` into the batch frame being written; into a new one when there is none,
    /// it is full, or the call would take it over the frame limit.
    fn command(&mut self, id: u64, call: StateCall) -> Written {
        if self.open.is_some_and(|(_, held)| held == MAX_STATE_BATCH) {
            self.close();
        }
        let at = self.bytes.len();
        let new_frame = self.open.is_none();
        let (start, held) = *self
            .open
            .get_or_insert_with(|| (start_state_batch(&mut self.bytes, id), 0));
        let command_at = self.bytes.len();
        let shape = match write_command(&mut self.bytes, call) {
            Ok(shape) => shape,
            Err(call) => {
                self.bytes.truncate(at);
                if new_frame {
                    self.open = None;
                }
                return Written::NotBatched(call);
            }
        };
        if self.bytes.len() - start - 4 <= MAX_CHANNEL_FRAME_LEN {
            self.open = Some((start, held + 1));
            return Written::Batched { shape, new_frame };
        }
        // Over the limit: the call goes alone in a frame of its own, if it fits in one at all.
        let command = self.bytes.split_off(command_at);
        self.bytes.truncate(at);
        if new_frame {
            self.open = None;
        } else {
            self.close();
        }
        let len = STATE_BATCH_HEADER_LEN - 4 + command.len();
        if len > MAX_CHANNEL_FRAME_LEN {
            let max = MAX_CHANNEL_FRAME_LEN;
            return Written::TooLarge(CallError::TooLarge { len, max });
        }
        self.open = Some((start_state_batch(&mut self.bytes, id), 1));
        self.bytes.extend_from_slice(&command);
        Written::Batched {
            shape,
            new_frame: true,
        }
    }

    /// Writes call `id` as a `state` message, after the batch frame being written.
    fn message(&mut self, id: u64, call: StateCall) -> Result<(), CallError> {
        self.close();
        append_frame(&mut self.bytes, &WorkerMessage::State { id, call })
    }

    /// Ends the batch frame being written.
    fn close(&mut self) {
        if let Some((start, _)) = self.open.take() {
            finish_state_batch(&mut self.bytes, start);
        }
    }

    /// All the frames, written.
    fn finish(mut self) -> Vec<u8> {
        self.close();
        self.bytes
    }
}

/// Calls written together, answered one by one, waited for together.
#[derive(Debug)]
pub(crate) struct Batch {
    /// The number of the first call; the others follow.
    first: u64,
    state: Mutex<BatchState>,
    done: Condvar,
}

#[derive(Debug)]
struct BatchState {
    answers: Vec<Option<Answer>>,
    missing: usize,
    /// The async caller, woken by the last answer.
    waker: Option<Waker>,
}

impl Batch {
    fn new(first: u64, len: usize) -> Batch {
        Batch {
            first,
            state: Mutex::new(BatchState {
                answers: (0..len).map(|_| None).collect(),
                missing: len,
                waker: None,
            }),
            done: Condvar::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, BatchState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn len(&self) -> usize {
        self.state().answers.len()
    }

    /// Gives call `index` its answer (the first one given counts).
    fn fill(&self, index: usize, answer: Answer) {
        self.fill_run(index, std::iter::once(answer));
    }

    /// Gives calls `index`, `index + 1`, ... their answers (the first one given counts).
    fn fill_run(&self, index: usize, answers: impl Iterator<Item = Answer>) {
        let mut guard = self.state();
        let state = &mut *guard;
        let mut filled = 0;
        for (slot, answer) in state.answers[index..].iter_mut().zip(answers) {
            if slot.is_none() {
                *slot = Some(answer);
                filled += 1;
            }
        }
        state.missing -= filled;
        if filled > 0 && state.missing == 0 {
            let waker = state.waker.take();
            drop(guard);
            self.done.notify_all();
            if let Some(waker) = waker {
                waker.wake();
            }
        }
    }

    /// Waits until every answer is in, or `deadline`; whether they all are.
    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        let mut state = self.state();
        while state.missing > 0 {
            state = match deadline {
                None => self
                    .done
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                        return false;
                    };
                    self.done
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
        true
    }

    /// The answers, in call order; a call without one timed out.
    fn take(&self) -> Vec<Answer> {
        let mut state = self.state();
        state.missing = 0;
        state
            .answers
            .iter_mut()
            .map(|answer| answer.take().unwrap_or(Err(CallError::Timeout)))
            .collect()
    }

    /// The answers once they are all in.
    #[cfg(feature = "tokio")]
    fn poll(&self, cx: &mut Context<'_>) -> Poll<Vec<Answer>> {
        let mut state = self.state();
        if state.missing > 0 {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        drop(state);
        Poll::Ready(self.take())
    }
}

impl Channel {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `count` fresh call numbers, the first of which is returned.
    fn numbers(&self, count: usize) -> u64 {
        self.next_id.fetch_add(count as u64, Ordering::Relaxed)
    }

    /// Whether the channel closed (no call will be answered).
    pub(crate) fn is_closed(&self) -> bool {
        self.pending().closed
    }

    /// Writes shared-state calls, all in one write, and registers them; the batch to wait on.
    /// The key/value calls go in state batch frames (RESP), the others as `state` messages.
    pub(crate) fn call_state(&self, calls: Vec<StateCall>) -> Arc<Batch> {
        let first = self.numbers(calls.len());
        let batch = Arc::new(Batch::new(first, calls.len()));
        let mut frames = Frames::with_capacity(calls.len() * 40);
        let mut sent = Sent::default();
        for (index, call) in calls.into_iter().enumerate() {
            let id = first + index as u64;
            let command = if self.batches {
                frames.command(id, call)
            } else {
                Written::NotBatched(call)
            };
            let written = match command {
                Written::Batched { shape, new_frame } => {
                    sent.batched(index, shape, new_frame);
                    continue;
                }
                Written::NotBatched(call) => frames.message(id, call),
                Written::TooLarge(error) => Err(error),
            };
            match written {
                Ok(()) => sent.message(index),
                Err(error) => batch.fill(index, Err(error)),
            }
        }
        self.register_and_write(Kind::State, batch, &frames.finish(), sent)
    }

    /// Writes a message on the bus (a request when `request` gives its timeout) and registers
    /// it; the batch (of one) to wait on.
    pub(crate) fn call_send(&self, to: &str, data: Value, request: Option<Duration>) -> Arc<Batch> {
        let id = self.numbers(1);
        let message = WorkerMessage::Send {
            id,
            to: to.to_string(),
            data,
            request: request.is_some(),
            timeout_ms: request.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        };
        self.start(Kind::Send, id, &[message])
    }

    /// Writes a shared-state call whose answer nobody waits for (it is ignored as unknown).
    pub(crate) fn call_unanswered(&self, call: StateCall) {
        let id = self.numbers(1);
        let mut bytes = Vec::new();
        if append_frame(&mut bytes, &WorkerMessage::State { id, call }).is_ok() {
            let _ = self.write_all(&bytes);
        }
    }

    /// Encodes `messages` (numbered from `first`) into one buffer, registers those that could be
    /// encoded, and writes them in one go. Calls that could not be sent are answered at once.
    fn start(&self, kind: Kind, first: u64, messages: &[WorkerMessage]) -> Arc<Batch> {
        let batch = Arc::new(Batch::new(first, messages.len()));
        let mut bytes = Vec::with_capacity(messages.len() * 80);
        let mut sent = Sent::default();
        for (index, message) in messages.iter().enumerate() {
            match append_frame(&mut bytes, message) {
                Ok(()) => sent.message(index),
                Err(error) => batch.fill(index, Err(error)),
            }
        }
        self.register_and_write(kind, batch, &bytes, sent)
    }

    /// Registers the calls of `batch` in `sent`, then writes `bytes`, their frames.
    fn register_and_write(
        &self,
        kind: Kind,
        batch: Arc<Batch>,
        bytes: &[u8],
        sent: Sent,
    ) -> Arc<Batch> {
        if sent.all.is_empty() {
            return batch;
        }
        {
            // Registered before the write: the answer may come before the write returns.
            let mut pending = self.pending();
            if pending.closed {
                drop(pending);
                for index in sent.all {
                    batch.fill(index, Err(CallError::ChannelClosed));
                }
                return batch;
            }
            for &index in &sent.messages {
                let waiting = Waiting {
                    kind,
                    batch: batch.clone(),
                    index,
                };
                pending.calls.insert(batch.first + index as u64, waiting);
            }
            for (index, shapes) in sent.frames {
                let frame = Frame {
                    batch: batch.clone(),
                    index,
                    left: shapes.len(),
                    shapes: shapes.into(),
                };
                pending.frames.insert(batch.first + index as u64, frame);
            }
        }
        if self.write_all(bytes).is_err() {
            // The master is gone (its reader will close the channel), or the stream is broken.
            self.forget(&batch);
            for index in sent.all {
                batch.fill(index, Err(CallError::ChannelClosed));
            }
        }
        batch
    }

    /// Hands an answer to the call it is for; unknown numbers (calls given up on) and answers of
    /// the wrong kind are ignored.
    pub(super) fn answer(&self, kind: Kind, id: u64, answer: Answer) {
        let waiting = match self.pending().calls.entry(id) {
            Entry::Occupied(entry) if entry.get().kind == kind => entry.remove(),
            _ => return,
        };
        waiting.batch.fill(waiting.index, answer);
    }

    /// Hands the replies of a state batch frame (`resp`, for the calls numbered from `first`)
    /// to their calls; replies to calls not waiting (given up on) are skipped. False when
    /// `resp` is not replies (then the stream is not the master's).
    pub(super) fn answer_batch(&self, first: u64, resp: &[u8]) -> bool {
        let mut replies = Vec::new();
        let mut at = 0;
        while at < resp.len() {
            match resp::read_reply(&resp[at..]) {
                Ok(Some((reply, len))) => {
                    replies.push(reply);
                    at += len;
                }
                _ => return false,
            }
        }
        let mut replies = &replies[..];
        let mut id = first;
        while !replies.is_empty() {
            // The frame of call `id`, and how many of the replies are its.
            let found = {
                let mut pending = self.pending();
                let frame = pending.frames.range_mut(..=id).next_back();
                match frame {
                    Some((&start, frame)) if id - start < frame.shapes.len() as u64 => {
                        let offset = (id - start) as usize;
                        let count = replies.len().min(frame.shapes.len() - offset);
                        let found = (frame.batch.clone(), frame.index, frame.shapes.clone());
                        frame.left = frame.left.saturating_sub(count);
                        if frame.left == 0 {
                            pending.frames.remove(&start);
                        }
                        Some((found, offset, count))
                    }
                    _ => None,
                }
            };
            let Some(((batch, index, shapes), offset, count)) = found else {
                (replies, id) = (&replies[1..], id + 1);
                continue;
            };
            let answers = replies[..count]
                .iter()
                .zip(&shapes[offset..])
                .map(|(reply, shape)| shape.read(*reply));
            batch.fill_run(index + offset, answers);
            (replies, id) = (&replies[count..], id + count as u64);
        }
        true
    }

    /// Takes the batch's calls still waiting out of [`Pending`]: their answers, should they
    /// come, will be ignored.
    fn forget(&self, batch: &Batch) {
        let len = batch.len() as u64;
        let mut pending = self.pending();
        for id in batch.first..batch.first + len {
            pending.calls.remove(&id);
        }
        let frames: Vec<u64> = pending
            .frames
            .range(batch.first..batch.first + len)
            .map(|(&start, _)| start)
            .collect();
        for start in frames {
            pending.frames.remove(&start);
        }
    }

    /// The channel closed: every waiting call, and every later one, gets
    /// [`CallError::ChannelClosed`].
    pub(super) fn fail_pending(&self) {
        let (waiting, frames): (Vec<Waiting>, Vec<Frame>) = {
            let mut pending = self.pending();
            pending.closed = true;
            let frames = std::mem::take(&mut pending.frames).into_values().collect();
            (pending.calls.drain().map(|(_, w)| w).collect(), frames)
        };
        for waiting in waiting {
            waiting
                .batch
                .fill(waiting.index, Err(CallError::ChannelClosed));
        }
        for frame in frames {
            let closed = std::iter::repeat_with(|| Err(CallError::ChannelClosed));
            frame
                .batch
                .fill_run(frame.index, closed.take(frame.shapes.len()));
        }
    }

    /// The batch's answers, waiting for them until `deadline` at most (for ever with `None`);
    /// calls without an answer by then get [`CallError::Timeout`].
    pub(crate) fn wait(&self, batch: &Batch, deadline: Option<Instant>) -> Vec<Answer> {
        if !batch.wait_until(deadline) {
            self.forget(batch);
        }
        batch.take()
    }

    /// The number of calls waiting for an answer.
    #[cfg(test)]
    pub(crate) fn pending_len(&self) -> usize {
        let pending = self.pending();
        pending.calls.len() + pending.frames.values().map(|f| f.left).sum::<usize>()
    }
}

/// The answers of a batch, for async callers. Dropped before they are in, it takes the calls out
/// of [`Pending`].
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub(crate) struct Answers {
    channel: &'static Channel,
    batch: Option<Arc<Batch>>,
}

#[cfg(feature = "tokio")]
impl Answers {
    pub(crate) fn new(channel: &'static Channel, batch: Arc<Batch>) -> Answers {
        Answers {
            channel,
            batch: Some(batch),
        }
    }

    /// The answers, waiting at most `timeout`; calls without one by then get
    /// [`CallError::Timeout`].
    pub(crate) async fn within(mut self, timeout: Duration) -> Vec<Answer> {
        if ::tokio::time::Instant::now().checked_add(timeout).is_none() {
            return self.await;
        }
        match ::tokio::time::timeout(timeout, &mut self).await {
            Ok(answers) => answers,
            Err(_elapsed) => match self.batch.take() {
                Some(batch) => {
                    self.channel.forget(&batch);
                    batch.take()
                }
                None => Vec::new(),
            },
        }
    }
}

#[cfg(feature = "tokio")]
impl Future for Answers {
    type Output = Vec<Answer>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Vec<Answer>> {
        let Some(batch) = &self.batch else {
            return Poll::Ready(Vec::new());
        };
        let answers = std::task::ready!(batch.poll(cx));
        self.batch = None;
        Poll::Ready(answers)
    }
}

#[cfg(feature = "tokio")]
impl Drop for Answers {
    fn drop(&mut self) {
        if let Some(batch) = self.batch.take() {
            self.channel.forget(&batch);
        }
    }
}

/// Appends `message` to `bytes` as one frame, unless it is over the channel's limit.
fn append_frame(bytes: &mut Vec<u8>, message: &WorkerMessage) -> Result<(), CallError> {
    let start = bytes.len();
    bytes.extend_from_slice(&[0; 4]);
    let encoded = serde_json::to_writer(&mut *bytes, message);
    let len = bytes.len() - start - 4;
    if let Err(error) = encoded {
        // Not reached: JSON values and strings always serialize.
        bytes.truncate(start);
        return Err(CallError::Failed(format!(
            "the call could not be encoded: {error}"
        )));
    }
    if len > MAX_CHANNEL_FRAME_LEN {
        bytes.truncate(start);
        return Err(CallError::TooLarge {
            len,
            max: MAX_CHANNEL_FRAME_LEN,
        });
    }
    bytes[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// The typed results of the answers, checked against what each operation answers.
pub(crate) mod decode {
    use serde_json::Value;

    use super::{Answer, CallError};

    fn unexpected(op: &str, value: &Value) -> CallError {
        CallError::Failed(format!(
            "corral answered `{op}` with {value}, which this version of corral-worker does not \
             understand: use a corral-worker of the same version as corral"
        ))
    }

    /// `get`: a string, or nothing.
    pub(crate) fn optional_string(answer: Answer) -> Result<Option<String>, CallError> {
        match answer? {
            Value::String(value) => Ok(Some(value)),
            Value::Null => Ok(None),
            other => Err(unexpected("get", &other)),
        }
    }

    /// `set`, `subscribe`, `unsubscribe`: done.
    pub(crate) fn done(op: &str, answer: Answer) -> Result<(), CallError> {
        match answer? {
            Value::Bool(true) | Value::Null => Ok(()),
            other => Err(unexpected(op, &other)),
        }
    }

    /// `del`, `cas`: whether it happened.
    pub(crate) fn boolean(op: &str, answer: Answer) -> Result<bool, CallError> {
        match answer? {
            Value::Bool(happened) => Ok(happened),
            other => Err(unexpected(op, &other)),
        }
    }

    /// `incr`: the new value.
    pub(crate) fn integer(answer: Answer) -> Result<i64, CallError> {
        let value = answer?;
        value.as_i64().ok_or_else(|| unexpected("incr", &value))
    }

    /// `publish`: how many subscriptions got it.
    pub(crate) fn count(answer: Answer) -> Result<u64, CallError> {
        let value = answer?;
        value.as_u64().ok_or_else(|| unexpected("publish", &value))
    }

    /// `keys`: the keys.
    pub(crate) fn strings(answer: Answer) -> Result<Vec<String>, CallError> {
        let value = answer?;
        serde_json::from_value(value.clone()).map_err(|_| unexpected("keys", &value))
    }

    /// A message on the bus: how many got it.
    pub(crate) fn delivered(answer: Answer) -> Result<u64, CallError> {
        let value = answer?;
        value
            .get("delivered")
            .and_then(Value::as_u64)
            .ok_or_else(|| unexpected("send", &value))
    }
}

/// The one answer of a batch of one.
pub(crate) fn single(mut answers: Vec<Answer>) -> Answer {
    answers.pop().unwrap_or(Err(CallError::ChannelClosed))
}
