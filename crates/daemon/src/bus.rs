//! The bus between the processes of the daemon's apps, and their shared state.
//!
//! Every process with a channel is a member while its channel is open. A member's `send` goes to
//! `agent`, `workers`, `worker:<id>`, `app:<name>` or `all` ([`Target`]) and is answered exactly
//! once: with how many got it, or, for a request, with the recipient's answer, or with why not
//! (unknown target, nobody running, no answer in time, the recipient left, its queue is full).
//! State calls go to the store of the member's app ([`StateBackend`]): the daemon's memory, the
//! daemon's memory saved in its home, or a Redis server; stores are opened on first use and kept.
//!
//! Nothing here goes through the supervisor: the channel readers call in directly, so a worker
//! busy with the state costs the supervisor nothing. A worker cannot flood the master: each has
//! at most [`MAX_CALLS_IN_FLIGHT`] state calls running (its reader waits for a free slot, which
//! stops reading its channel); once [`MAX_BACKLOG`] bytes wait for a member that does not read
//! its channel, its answers wait their turn (holding their slots), its reader stops, and
//! messages and publications to it are refused.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use corral_proto::channel::{
    DEFAULT_REQUEST_TIMEOUT_MS, MAX_CHANNEL_FRAME_LEN, MAX_STATE_BATCH, MasterMessage,
    STATE_BATCH_HEADER_LEN, StateCall, Target, append_master_message, finish_state_batch,
    start_state_batch,
};
use corral_proto::resp;
use corral_proto::{ErrorKind, Response, StateBackend};
use corral_state::{Batch, CORRAL_ERROR, Op, Outcome, Published, StateError, Store, StoreEvent};
use serde_json::{Value, json};
use tokio::sync::{OnceCell, Semaphore, oneshot};

use crate::balance::{Codec, Conduit};

/// State calls one member may have running at once (their answers, up to 512 KiB each, are
/// what a worker that does not read its channel can make the master hold).
pub const MAX_CALLS_IN_FLIGHT: usize = 256;
const _: () = assert!(corral_proto::channel::MAX_STATE_BATCH <= MAX_CALLS_IN_FLIGHT);
/// Bytes waiting for a member beyond which messages and publications to it are refused.
pub const MAX_BACKLOG: usize = 8 * 1024 * 1024;
/// The longest a request may wait for its answer.
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// How often dropped publications are reported, at most.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The members, their pending requests and subscriptions, and the stores.
#[derive(Debug)]
pub struct Bus {
    inner: Mutex<Inner>,
    stores: Mutex<HashMap<StateBackend, Arc<OnceCell<Store>>>>,
    /// Where the `saved` store keeps its snapshot.
    saved_path: std::path::PathBuf,
    this: Weak<Bus>,
}

#[derive(Debug, Default)]
struct Inner {
    members: HashMap<u32, Member>,
    joined: u64,
    pending: HashMap<u64, Pending>,
    next_request: u64,
    /// Members subscribed, per store and pattern.
    subscribed: HashMap<(StateBackend, String), usize>,
    dropped: usize,
    dropped_logged: Option<Instant>,
}

impl Inner {
    /// One member fewer subscribed to `key`; true when it was the last, and the store's
    /// subscription must go.
    fn release(&mut self, key: &(StateBackend, String)) -> bool {
        let Some(count) = self.subscribed.get_mut(key) else {
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        self.subscribed.remove(key);
        true
    }
}

#[derive(Debug)]
struct Member {
    /// Instance id.
    id: u32,
    app: String,
    agent: bool,
    conduit: Arc<Conduit>,
    backend: StateBackend,
    patterns: HashSet<String>,
    /// Order of joining: the newest process of an instance id is the one a message goes to.
    serial: u64,
    calls: Arc<Semaphore>,
}

/// A request waiting for its answer.
#[derive(Debug)]
struct Pending {
    /// The process that must answer.
    recipient: u32,
    /// How the recipient is named in errors.
    label: String,
    origin: Origin,
}

#[derive(Debug)]
enum Origin {
    /// A member's `send` number `id`.
    Member { pid: u32, id: u64 },
    /// `corral send --reply`.
    Cli(oneshot::Sender<Response>),
    /// Answer `index` of a request to several processes.
    Part {
        gather: Arc<Mutex<Gather>>,
        index: usize,
    },
}

/// The answers to a request sent to several processes, given together once each has answered,
/// failed or timed out: `[{"from": "worker:<id>", "data": ...} or {..., "error": ...}]`.
#[derive(Debug)]
struct Gather {
    /// Who asked; taken when the last answer is in.
    origin: Option<Origin>,
    answers: Vec<Value>,
    missing: usize,
}

/// Who a process is, for the bus.
#[derive(Debug, Clone)]
pub struct Joining {
    /// Its process.
    pub pid: u32,
    /// Its instance id.
    pub id: u32,
    /// Its app.
    pub app: String,
    /// It is the app's agent.
    pub agent: bool,
    /// Its app's store.
    pub backend: StateBackend,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Writes `message` to a member in its channel's language: a frame, or for Node a JSON line
/// wrapped as `{"corral": message}`.
fn deliver(conduit: &Arc<Conduit>, message: &MasterMessage) {
    match conduit.codec() {
        Codec::Corral => conduit.send(message),
        Codec::Node => {
            let wrapped = json!({ "corral": message });
            conduit.send_line(|_| crate::node::line(&wrapped));
        }
    }
}

/// Writes `messages` to a member in one go.
fn deliver_all(conduit: &Arc<Conduit>, messages: &[MasterMessage]) {
    match conduit.codec() {
        Codec::Corral => {
            let mut frames = Vec::with_capacity(messages.len() * 48);
            for message in messages {
                append_master_message(&mut frames, message);
            }
            conduit.send_now(&frames);
        }
        Codec::Node => {
            let lines = messages
                .iter()
                .map(|message| crate::node::line(&json!({ "corral": message })))
                .collect();
            conduit.send_lines(lines);
        }
    }
}

fn state_answer(id: u64, result: Result<Value, String>) -> MasterMessage {
    match result {
        Ok(ok) => MasterMessage::State {
            id,
            ok: Some(ok),
            error: None,
        },
        Err(error) => MasterMessage::State {
            id,
            ok: None,
            error: Some(error),
        },
    }
}

fn reply(id: u64, result: Result<Value, String>) -> MasterMessage {
    match result {
        Ok(data) => MasterMessage::Reply {
            id,
            data,
            error: None,
        },
        Err(error) => MasterMessage::Reply {
            id,
            data: Value::Null,
            error: Some(error),
        },
    }
}

impl Bus {
    /// An empty bus; the `saved` store keeps its snapshot at `saved_path`.
    pub fn new(saved_path: std::path::PathBuf) -> Arc<Bus> {
        Arc::new_cyclic(|this| Bus {
            inner: Mutex::default(),
            stores: Mutex::default(),
            saved_path,
            this: this.clone(),
        })
    }

    fn arc(&self) -> Arc<Bus> {
        self.this
            .upgrade()
            .expect("the bus is alive while it is used")
    }

    /// A process's channel opened.
    pub fn join(&self, joining: Joining, conduit: Arc<Conduit>) {
        let mut inner = lock(&self.inner);
        inner.joined += 1;
        let serial = inner.joined;
        inner.members.insert(
            joining.pid,
            Member {
                id: joining.id,
                app: joining.app,
                agent: joining.agent,
                conduit,
                backend: joining.backend,
                patterns: HashSet::new(),
                serial,
                calls: Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT)),
            },
        );
    }

    /// A process's channel closed: its subscriptions end, the requests it was to answer fail,
    /// the answers it was waiting for are dropped.
    pub fn leave(&self, pid: u32) {
        let mut inner = lock(&self.inner);
        let Some(member) = inner.members.remove(&pid) else {
            return;
        };
        let mut unsubscribe = Vec::new();
        for pattern in member.patterns {
            let key = (member.backend.clone(), pattern);
            if inner.release(&key) {
                unsubscribe.push(key);
            }
        }
        let orphaned: Vec<u64> = inner
            .pending
            .iter()
            .filter(|(_, p)| {
                p.recipient == pid || matches!(p.origin, Origin::Member { pid: o, .. } if o == pid)
            })
            .map(|(&n, _)| n)
            .collect();
        for n in orphaned {
            let pending = inner.pending.remove(&n).expect("listed above");
            if pending.recipient == pid {
                let why = format!("{} exited before answering", pending.label);
                answer(&inner, pending.origin, Err(why));
            }
        }
        drop(inner);
        for (backend, pattern) in unsubscribe {
            let bus = self.arc();
            tokio::spawn(async move {
                if let Ok(store) = bus.store(&backend).await
                    && let Err(e) = store.unsubscribe(&pattern).await
                {
                    crate::log!("state store {backend}: unsubscribing from '{pattern}': {e}");
                }
            });
        }
    }

    /// The store of `backend`, opened on first use. An error says why it cannot be reached.
    pub async fn store(&self, backend: &StateBackend) -> Result<Store, String> {
        let cell = lock(&self.stores)
            .entry(backend.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        cell.get_or_try_init(|| self.open(backend))
            .await
            .cloned()
            .map_err(|e| e.to_string())
    }

    async fn open(&self, backend: &StateBackend) -> Result<Store, StateError> {
        let (store, events) = match backend {
            StateBackend::Memory => Store::embedded(None)?,
            StateBackend::Saved => Store::embedded(Some(self.saved_path.clone()))?,
            StateBackend::Redis(url) => Store::redis(url).await?,
        };
        crate::log!("state store opened: {}", store.describe());
        tokio::spawn(pump_events(self.this.clone(), backend.clone(), events));
        Ok(store)
    }

    /// Saves what the stores keep on disk; at shutdown.
    pub async fn flush(&self) {
        let cells: Vec<_> = lock(&self.stores).values().cloned().collect();
        for cell in cells {
            if let Some(store) = cell.get()
                && let Err(e) = store.flush().await
            {
                crate::log!("state store {}: {e}", store.describe());
            }
        }
    }

    /// A member's `send`.
    pub fn send(
        &self,
        pid: u32,
        id: u64,
        to: &str,
        data: &Value,
        request: bool,
        timeout_ms: Option<u64>,
    ) {
        let mut inner = lock(&self.inner);
        let Some(sender) = inner.members.get(&pid) else {
            return;
        };
        let conduit = sender.conduit.clone();
        let from = format!("worker:{}", sender.id);
        let result = route(&inner, pid, to).and_then(|recipients| {
            if request {
                let origin = Origin::Member { pid, id };
                self.ask_all(&mut inner, &recipients, data, &from, timeout_ms, origin);
                return Ok(None);
            }
            let message = MasterMessage::Message {
                data: data.clone(),
                from: Some(from.clone()),
                request: None,
            };
            let mut delivered = 0;
            for (recipient, _) in &recipients {
                let target = &inner.members[recipient].conduit;
                if target.backlog() <= MAX_BACKLOG {
                    deliver(target, &message);
                    delivered += 1;
                }
            }
            if delivered == 0 {
                return Err(format!(
                    "none of the {} recipient(s) of '{to}' is reading its channel; try again \
                     later",
                    recipients.len()
                ));
            }
            Ok(Some(json!({ "delivered": delivered })))
        });
        drop(inner);
        match result {
            Ok(None) => {}
            Ok(Some(answer)) => deliver(&conduit, &reply(id, Ok(answer))),
            Err(why) => deliver(&conduit, &reply(id, Err(why))),
        }
    }

    /// `corral send --reply`: a request to the processes `pids`, answered on `respond`: with the
    /// answer of the one, or the answers of several together.
    pub fn request_from_cli(
        &self,
        pids: &[u32],
        data: &Value,
        timeout_ms: Option<u64>,
        respond: oneshot::Sender<Response>,
    ) {
        let mut inner = lock(&self.inner);
        let mut recipients: Vec<(u32, u32, String)> = pids
            .iter()
            .filter_map(|pid| {
                let member = inner.members.get(pid)?;
                Some((member.id, *pid, format!("worker:{}", member.id)))
            })
            .collect();
        recipients.sort_unstable();
        let recipients: Vec<(u32, String)> = recipients
            .into_iter()
            .map(|(_, pid, label)| (pid, label))
            .collect();
        if recipients.is_empty() {
            let _ = respond.send(Response::error(
                ErrorKind::UnknownTarget,
                "no process of that target has an open channel (none is running)",
            ));
            return;
        }
        let origin = Origin::Cli(respond);
        self.ask_all(&mut inner, &recipients, data, "cli", timeout_ms, origin);
    }

    /// Sends request `data` to every one of `recipients`: the answer of one goes to `origin`,
    /// those of several go together.
    fn ask_all(
        &self,
        inner: &mut Inner,
        recipients: &[(u32, String)],
        data: &Value,
        from: &str,
        timeout_ms: Option<u64>,
        origin: Origin,
    ) {
        if let [recipient] = recipients {
            self.ask(inner, recipient, data, from, timeout_ms, origin);
            return;
        }
        let gather = Arc::new(Mutex::new(Gather {
            origin: Some(origin),
            answers: recipients
                .iter()
                .map(|(_, label)| json!({ "from": label }))
                .collect(),
            missing: recipients.len(),
        }));
        for (index, recipient) in recipients.iter().enumerate() {
            let part = Origin::Part {
                gather: gather.clone(),
                index,
            };
            self.ask(inner, recipient, data, from, timeout_ms, part);
        }
    }

    /// Sends request `data` to `recipient`; its answer (or why there is none) goes to `origin`.
    fn ask(
        &self,
        inner: &mut Inner,
        (recipient, label): &(u32, String),
        data: &Value,
        from: &str,
        timeout_ms: Option<u64>,
        origin: Origin,
    ) {
        let target = inner.members[recipient].conduit.clone();
        if target.backlog() > MAX_BACKLOG {
            let why = format!("{label} is not reading its channel; try again later");
            answer(inner, origin, Err(why));
            return;
        }
        inner.next_request += 1;
        let n = inner.next_request;
        inner.pending.insert(
            n,
            Pending {
                recipient: *recipient,
                label: label.clone(),
                origin,
            },
        );
        deliver(
            &target,
            &MasterMessage::Message {
                data: data.clone(),
                from: Some(from.to_string()),
                request: Some(n),
            },
        );
        self.expire_after(n, timeout_ms);
    }

    fn expire_after(&self, n: u64, timeout_ms: Option<u64>) {
        let timeout = Duration::from_millis(timeout_ms.unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS))
            .min(MAX_REQUEST_TIMEOUT);
        let bus = self.this.clone();
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            let Some(bus) = bus.upgrade() else { return };
            let mut inner = lock(&bus.inner);
            if let Some(pending) = inner.pending.remove(&n) {
                let why = format!(
                    "{} did not answer within {} ms",
                    pending.label,
                    timeout.as_millis()
                );
                answer(&inner, pending.origin, Err(why));
            }
        });
    }

    /// A member's answer to request `request`.
    pub fn reply(&self, pid: u32, request: u64, data: Value, error: Option<String>) {
        let mut inner = lock(&self.inner);
        let known = inner
            .pending
            .get(&request)
            .is_some_and(|p| p.recipient == pid);
        if !known {
            // Late (timed out), or the sender left: nobody waits for it any more.
            return;
        }
        let pending = inner.pending.remove(&request).expect("looked up above");
        answer(&inner, pending.origin, error.map_or(Ok(data), Err));
    }

    /// A member's state calls, as read from its channel together: run on a task of their own,
    /// the key/value calls among them as one pipeline, answered together in one write. Waits
    /// while the member has [`MAX_CALLS_IN_FLIGHT`] running (back-pressure on its channel).
    pub async fn state(&self, pid: u32, calls: Vec<(u64, StateCall)>) {
        let Some((slots, conduit, backend)) = lock(&self.inner)
            .members
            .get(&pid)
            .map(|m| (m.calls.clone(), m.conduit.clone(), m.backend.clone()))
        else {
            return;
        };
        let wanted = u32::try_from(calls.len().min(MAX_CALLS_IN_FLIGHT)).unwrap_or(1);
        let Ok(permit) = slots.acquire_many_owned(wanted).await else {
            return;
        };
        let bus = self.arc();
        tokio::spawn(async move {
            let answers = bus.call_many(pid, &backend, calls).await;
            // A worker that does not read its answers gets no more than MAX_BACKLOG waiting;
            // the calls holding their slots meanwhile stop its reader (back-pressure).
            let turn = conduit.turn_with_room(MAX_BACKLOG).await;
            deliver_all(&conduit, &answers);
            drop((turn, permit));
        });
    }

    /// A member's state batch ([`corral_proto::channel::STATE_BATCH`]): its calls, numbered
    /// from `first`, checked now and started on the store at once (so batches keep their order
    /// on Redis), their replies written to the member in batch frames once in. Waits while the
    /// member has [`MAX_CALLS_IN_FLIGHT`] calls running. Bytes that are not RESP commands are a
    /// fault of the worker's: the problem is returned.
    pub async fn batch(&self, pid: u32, first: u64, resp: Vec<u8>) -> Result<(), String> {
        let batch = Batch::read(resp)
            .map_err(|e| format!("it sent a state batch that is not RESP commands ({e})"))?;
        if batch.is_empty() {
            return Ok(());
        }
        if batch.len() > MAX_STATE_BATCH {
            return Err(format!(
                "it sent a state batch of {} calls; the limit is {MAX_STATE_BATCH}",
                batch.len()
            ));
        }
        let Some((slots, conduit, backend)) = lock(&self.inner)
            .members
            .get(&pid)
            .map(|m| (m.calls.clone(), m.conduit.clone(), m.backend.clone()))
        else {
            return Ok(());
        };
        let wanted = u32::try_from(batch.len()).expect("at most MAX_STATE_BATCH");
        let Ok(permit) = slots.acquire_many_owned(wanted).await else {
            return Ok(());
        };
        let count = batch.len();
        let forwarded = match self.store(&backend).await {
            Ok(store) => Ok(store.forward(batch)),
            Err(why) => {
                let mut replies = Vec::new();
                for _ in 0..count {
                    resp::error(&mut replies, &format!("{CORRAL_ERROR} {why}"));
                }
                Err(replies)
            }
        };
        tokio::spawn(async move {
            let replies = match forwarded {
                Ok(forwarded) => forwarded.await,
                Err(refused) => refused,
            };
            let frames = batch_frames(first, &replies);
            let turn = conduit.turn_with_room(MAX_BACKLOG).await;
            conduit.send_now(&frames);
            drop((turn, permit));
        });
        Ok(())
    }

    /// `corral state`: a call on `backend`'s store.
    pub async fn cli_state(&self, backend: &StateBackend, call: StateCall) -> Response {
        if matches!(
            call,
            StateCall::Subscribe { .. } | StateCall::Unsubscribe { .. }
        ) {
            return Response::error(
                ErrorKind::InvalidSpec,
                "subscriptions belong to workers: from the command line, `corral state publish` \
                 and the key/value calls work",
            );
        }
        let mut answers = self.call_many(0, backend, vec![(0, call)]).await;
        match answers.pop() {
            Some(MasterMessage::State {
                ok: Some(value), ..
            }) => Response::Value { value },
            Some(MasterMessage::State {
                error: Some(message),
                ..
            }) => Response::error(ErrorKind::Io, message),
            _ => Response::error(ErrorKind::Io, "the store gave no answer"),
        }
    }

    /// Does `calls` in order, each answered by a `state` message with its number: runs of
    /// key/value calls as one pipeline each, the others (keys, subscriptions) one by one.
    async fn call_many(
        &self,
        pid: u32,
        backend: &StateBackend,
        calls: Vec<(u64, StateCall)>,
    ) -> Vec<MasterMessage> {
        let store = match self.store(backend).await {
            Ok(store) => store,
            Err(why) => {
                return calls
                    .into_iter()
                    .map(|(id, _)| state_answer(id, Err(why.clone())))
                    .collect();
            }
        };
        let mut answers = Vec::with_capacity(calls.len());
        let mut run: Vec<(u64, Op)> = Vec::new();
        for (id, call) in calls {
            match pipelined(call) {
                Ok(op) => run.push((id, op)),
                Err(call) => {
                    pipeline(&store, std::mem::take(&mut run), &mut answers).await;
                    let result = self.call_alone(pid, backend, &store, call).await;
                    answers.push(state_answer(id, result));
                }
            }
        }
        pipeline(&store, run, &mut answers).await;
        answers
    }

    /// A call that is not pipelined.
    async fn call_alone(
        &self,
        pid: u32,
        backend: &StateBackend,
        store: &Store,
        call: StateCall,
    ) -> Result<Value, String> {
        match call {
            StateCall::Keys { pattern } => store
                .keys(&pattern)
                .await
                .map(|v| json!(v))
                .map_err(|e| e.to_string()),
            StateCall::Subscribe { pattern } => self.subscribe(pid, backend, store, pattern).await,
            StateCall::Unsubscribe { pattern } => {
                self.unsubscribe(pid, backend, store, pattern).await
            }
            call => Err(format!("{call:?} is pipelined, not called alone")),
        }
    }

    async fn subscribe(
        &self,
        pid: u32,
        backend: &StateBackend,
        store: &Store,
        pattern: String,
    ) -> Result<Value, String> {
        let first = {
            let mut inner = lock(&self.inner);
            let Some(member) = inner.members.get_mut(&pid) else {
                return Err("the subscriber left".into());
            };
            if !member.patterns.insert(pattern.clone()) {
                return Ok(json!(true));
            }
            let count = inner
                .subscribed
                .entry((backend.clone(), pattern.clone()))
                .or_default();
            *count += 1;
            *count == 1
        };
        if first && let Err(e) = store.subscribe(&pattern).await {
            let mut inner = lock(&self.inner);
            if let Some(member) = inner.members.get_mut(&pid) {
                member.patterns.remove(&pattern);
            }
            inner.release(&(backend.clone(), pattern));
            return Err(e.to_string());
        }
        Ok(json!(true))
    }

    async fn unsubscribe(
        &self,
        pid: u32,
        backend: &StateBackend,
        store: &Store,
        pattern: String,
    ) -> Result<Value, String> {
        let last = {
            let mut inner = lock(&self.inner);
            let Some(member) = inner.members.get_mut(&pid) else {
                return Ok(json!(true));
            };
            if !member.patterns.remove(&pattern) {
                return Ok(json!(true));
            }
            inner.release(&(backend.clone(), pattern.clone()))
        };
        if last {
            store
                .unsubscribe(&pattern)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(json!(true))
    }

    /// A publication from `backend`'s store, to the members subscribed to its pattern.
    fn fan_out(&self, backend: &StateBackend, published: &Published) {
        let mut inner = lock(&self.inner);
        let message = MasterMessage::Published {
            pattern: published.pattern.clone(),
            channel: published.channel.clone(),
            message: published.message.clone(),
        };
        let mut dropped = 0;
        for member in inner.members.values() {
            if member.backend != *backend || !member.patterns.contains(&published.pattern) {
                continue;
            }
            if member.conduit.backlog() > MAX_BACKLOG {
                dropped += 1;
            } else {
                deliver(&member.conduit, &message);
            }
        }
        if dropped > 0 {
            inner.dropped += dropped;
            let due = inner
                .dropped_logged
                .is_none_or(|at| at.elapsed() >= DROP_LOG_INTERVAL);
            if due {
                crate::log!(
                    "{} publication(s) not delivered to subscribers that do not read their \
                     channel (more than {MAX_BACKLOG} bytes waiting)",
                    inner.dropped
                );
                inner.dropped = 0;
                inner.dropped_logged = Some(Instant::now());
            }
        }
    }
}

/// `replies`, the replies to calls numbered from `first`, as state batch frames: one, or as many
/// as it takes to keep each within [`MAX_CHANNEL_FRAME_LEN`]. A reply too large for a frame of
/// its own (a value another Redis client wrote) is replaced by an error reply saying so.
fn batch_frames(first: u64, replies: &[u8]) -> Vec<u8> {
    let room = MAX_CHANNEL_FRAME_LEN - (STATE_BATCH_HEADER_LEN - 4);
    let mut frames = Vec::with_capacity(replies.len() + STATE_BATCH_HEADER_LEN);
    if replies.len() <= room {
        let start = start_state_batch(&mut frames, first);
        frames.extend_from_slice(replies);
        finish_state_batch(&mut frames, start);
        return frames;
    }
    // The frame being written: where it starts, and the bytes of replies in it.
    let mut open: Option<(usize, usize)> = None;
    let (mut number, mut at) = (first, 0);
    let mut refusal = Vec::new();
    // Replies are whole (made here, or cut by the link): each is read.
    while let Ok(Some(len)) = resp::reply_len(&replies[at..]) {
        let mut reply = &replies[at..at + len];
        if len > room {
            refusal.clear();
            let message = format!(
                "{CORRAL_ERROR} the reply is {len} bytes, over the channel's frame limit of \
                 {MAX_CHANNEL_FRAME_LEN}: a value that large was written by another Redis \
                 client; corral values are at most 524288 bytes"
            );
            resp::error(&mut refusal, &message);
            reply = &refusal;
        }
        match open {
            Some((start, filled)) if filled + reply.len() > room => {
                finish_state_batch(&mut frames, start);
                open = None;
            }
            _ => {}
        }
        let (start, filled) = open.unwrap_or_else(|| (start_state_batch(&mut frames, number), 0));
        frames.extend_from_slice(reply);
        open = Some((start, filled + reply.len()));
        number += 1;
        at += len;
    }
    if let Some((start, _)) = open {
        finish_state_batch(&mut frames, start);
    }
    frames
}

/// The store operation of a key/value call or a publication; the call itself when it is
/// another kind.
fn pipelined(call: StateCall) -> Result<Op, StateCall> {
    let ttl = |ms: Option<u64>| ms.map(Duration::from_millis);
    Ok(match call {
        StateCall::Get { key } => Op::Get { key },
        StateCall::Set { key, value, ttl_ms } => Op::Set {
            key,
            value,
            ttl: ttl(ttl_ms),
        },
        StateCall::Del { key } => Op::Del { key },
        StateCall::Incr { key, by } => Op::Incr { key, by },
        StateCall::Cas {
            key,
            expected,
            new,
            ttl_ms,
        } => Op::Cas {
            key,
            expected,
            new,
            ttl: ttl(ttl_ms),
        },
        StateCall::Publish { channel, message } => Op::Publish { channel, message },
        call => return Err(call),
    })
}

/// Runs `run` as one pipeline on `store`, its answers appended to `answers`.
async fn pipeline(store: &Store, run: Vec<(u64, Op)>, answers: &mut Vec<MasterMessage>) {
    if run.is_empty() {
        return;
    }
    let (ids, ops): (Vec<u64>, Vec<Op>) = run.into_iter().unzip();
    let results = store.pipeline(ops).await;
    for (id, result) in ids.into_iter().zip(results) {
        let result = result
            .map_err(|e| e.to_string())
            .map(|outcome| match outcome {
                Outcome::Value(value) => json!(value),
                Outcome::Done => json!(true),
                Outcome::Yes(yes) => json!(yes),
                Outcome::Number(n) => json!(n),
                Outcome::Count(n) => json!(n),
            });
        answers.push(state_answer(id, result));
    }
}

/// Gives an answer to whoever waits for it.
fn answer(inner: &Inner, origin: Origin, result: Result<Value, String>) {
    match origin {
        Origin::Part { gather, index } => {
            let done = {
                let mut gather = lock(&gather);
                let slot = &mut gather.answers[index];
                match result {
                    Ok(data) => slot["data"] = data,
                    Err(error) => slot["error"] = Value::String(error),
                }
                gather.missing -= 1;
                if gather.missing == 0 {
                    let answers = std::mem::take(&mut gather.answers);
                    gather.origin.take().map(|origin| (origin, answers))
                } else {
                    None
                }
            };
            if let Some((origin, answers)) = done {
                answer(inner, origin, Ok(Value::Array(answers)));
            }
        }
        Origin::Member { pid, id } => {
            if let Some(member) = inner.members.get(&pid) {
                deliver(&member.conduit, &reply(id, result));
            }
        }
        Origin::Cli(respond) => {
            let _ = respond.send(match result {
                Ok(value) => Response::Value { value },
                Err(message) => Response::error(ErrorKind::UnknownTarget, message),
            });
        }
    }
}

/// The processes `to` names from the point of view of member `pid`, with a label each: the
/// newest process of each instance id.
fn route(inner: &Inner, pid: u32, to: &str) -> Result<Vec<(u32, String)>, String> {
    let target: Target = to.parse()?;
    let sender = &inner.members[&pid];
    let chosen: Box<dyn Fn(&Member) -> bool> = match &target {
        Target::Agent => Box::new(|m: &Member| m.app == sender.app && m.agent),
        Target::Workers => Box::new(|m: &Member| m.app == sender.app && !m.agent),
        Target::Worker(id) => Box::new(move |m: &Member| m.id == *id),
        Target::App(name) => Box::new(move |m: &Member| m.app == *name),
        Target::All => Box::new(|_: &Member| true),
    };
    let mut newest: HashMap<u32, (u32, u64)> = HashMap::new();
    for (&p, member) in &inner.members {
        let myself = p == pid && !matches!(target, Target::Worker(_));
        if myself || !chosen(member) {
            continue;
        }
        let entry = newest.entry(member.id).or_insert((p, member.serial));
        if member.serial > entry.1 {
            *entry = (p, member.serial);
        }
    }
    if newest.is_empty() {
        return Err(match &target {
            Target::Agent => format!(
                "app '{}' has no agent running (an app gets one with --agent)",
                sender.app
            ),
            Target::Workers => format!("no other worker of app '{}' is running", sender.app),
            Target::Worker(id) => {
                format!("no running process has id {id} (`corral ls` lists the ids)")
            }
            Target::App(name) => format!("no process of app '{name}' is running"),
            Target::All => "no other process is running".to_string(),
        });
    }
    let mut recipients: Vec<(u32, u32)> = newest.into_iter().map(|(id, (p, _))| (id, p)).collect();
    recipients.sort_unstable();
    Ok(recipients
        .into_iter()
        .map(|(id, p)| (p, format!("worker:{id}")))
        .collect())
}

/// Reads a store's events until it closes: publications to their subscribers, the rest to the
/// log.
async fn pump_events(
    bus: Weak<Bus>,
    backend: StateBackend,
    mut events: tokio::sync::mpsc::Receiver<StoreEvent>,
) {
    while let Some(event) = events.recv().await {
        let Some(bus) = bus.upgrade() else { return };
        match event {
            StoreEvent::Published(published) => bus.fan_out(&backend, &published),
            StoreEvent::Connected { url } => crate::log!("state store {url}: connected"),
            StoreEvent::Disconnected { url, reason } => crate::log!(
                "state store {url}: connection lost ({reason}); reconnecting, subscriptions \
                 resume when it is back"
            ),
            StoreEvent::SaveFailed { path, reason } => crate::log!(
                "state store: cannot save {} ({reason}); the state is kept in memory and \
                 saving is retried",
                path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use corral_proto::channel::read_state_batch;

    use super::*;

    /// The frames of `bytes`: the number each starts with and its RESP.
    fn frames(mut bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            assert!(len <= MAX_CHANNEL_FRAME_LEN);
            let (first, resp) = read_state_batch(&bytes[4..4 + len]).unwrap();
            out.push((first, resp.to_vec()));
            bytes = &bytes[4 + len..];
        }
        out
    }

    #[test]
    fn replies_go_in_one_frame_or_whole_in_several_within_the_limit() {
        let mut small = Vec::new();
        resp::ok(&mut small);
        resp::integer(&mut small, 7);
        assert_eq!(frames(&batch_frames(40, &small)), [(40, small.clone())]);

        // Five values of 300 KiB: three fit a frame, the other two the next.
        let value = vec![b'v'; 300 * 1024];
        let mut big = Vec::new();
        for _ in 0..5 {
            resp::bulk(&mut big, Some(&value));
        }
        let split = frames(&batch_frames(7, &big));
        assert_eq!(split.len(), 2);
        assert_eq!((split[0].0, split[1].0), (7, 10));
        assert_eq!([split[0].1.clone(), split[1].1.clone()].concat(), big);

        // A value over the frame limit, between two small ones: refused in its place.
        let mut with_huge = Vec::new();
        resp::integer(&mut with_huge, 1);
        resp::bulk(&mut with_huge, Some(&vec![b'v'; 2 * 1024 * 1024]));
        resp::integer(&mut with_huge, 3);
        let split = frames(&batch_frames(0, &with_huge));
        let all: Vec<u8> = split.iter().flat_map(|(_, resp)| resp.clone()).collect();
        let text = String::from_utf8_lossy(&all);
        assert!(
            text.starts_with(":1\r\n-CORRAL the reply is 2097164 bytes"),
            "{text}"
        );
        assert!(text.ends_with("at most 524288 bytes\r\n:3\r\n"), "{text}");
        assert_eq!(split[0].0, 0);
    }
}
