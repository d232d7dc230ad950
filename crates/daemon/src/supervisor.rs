//! The supervisor: the one task that owns every app and instance. Everything that happens reaches
//! it as an [`Event`] (a client request, a reaped child, a timer), and it never awaits, so one
//! slow client or child cannot stall it. Restart decisions come from `corral-policy`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_policy::{Decision, ExitCause, RestartPolicy, RestartTracker};
use corral_proto::channel::{CHANNEL_PROTOCOL_VERSION, MasterMessage, WorkerMessage};
use corral_proto::signal::Signal;
use corral_proto::{
    AppInfo, AppSpec, ErrorKind, InstanceInfo, Request, Response, Status, Stream, Streams, env,
};
use corral_sys::ExitKind;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::balance::{Balancer, Codec, Conduit};
use crate::bus::{Bus, Joining};
use crate::dump;
use crate::home::Home;
use crate::listeners::{self, Listener};
use crate::logs::{LogSink, pump};
use crate::node;
use crate::proxy::{self, Router};
use crate::stats::{self, CpuSampler};

/// First argument that makes the `corral` binary an exec shim setting `LISTEN_PID`.
pub const ACTIVATE_SHIM: &str = "__activate";

/// Most instances one app may have.
pub const MAX_INSTANCES: u32 = 1024;
/// An app's env variable that, set to `off`, leaves the drain preload (`js/drain.js`) out of
/// its Node cluster workers.
const NODE_DRAIN_SWITCH: &str = "CORRAL_NODE_DRAIN";
/// The instance index of an app's agent (its log files say `agent` instead).
pub const AGENT_INDEX: u32 = u32::MAX;
const LINGER_POLL: Duration = Duration::from_millis(20);

/// What the supervisor reacts to.
#[derive(Debug)]
pub enum Event {
    /// A client's request and where its answer goes.
    Request {
        /// The request.
        request: Request,
        /// The answer.
        reply: oneshot::Sender<Response>,
    },
    /// A client wants the log files of a target.
    LogSources {
        /// `None` for all.
        target: Option<String>,
        /// Which streams.
        streams: Streams,
        /// The sinks, or an error response.
        reply: oneshot::Sender<Result<Vec<LogSource>, Response>>,
    },
    /// A child ended and was reaped.
    Reaped {
        /// Its pid.
        pid: u32,
        /// How it ended.
        exit: ExitKind,
    },
    /// The instance's process has been up for `min_uptime`.
    ReadyTimer {
        /// Instance id.
        id: u32,
        /// The process it was set for.
        pid: u32,
    },
    /// An instance's restart delay is over.
    RestartTimer {
        /// Instance id.
        id: u32,
        /// Its token when the timer was set; a newer token cancels it.
        token: u64,
    },
    /// An instance's process did not stop within `kill_timeout`.
    KillTimer {
        /// Instance id.
        id: u32,
        /// The process it was set for.
        pid: u32,
    },
    /// Time to look at process groups left behind by ended leaders.
    LingerTick,
    /// A worker said something on its channel.
    Worker {
        /// The worker's process.
        pid: u32,
        /// What it said.
        message: WorkerMessage,
    },
    /// A worker broke the channel protocol; the channel is closed already.
    ChannelFault {
        /// The worker's process.
        pid: u32,
        /// What was wrong.
        problem: String,
    },
    /// A Node worker's cluster message that needs the supervisor (`queryServer`, `listening`,
    /// `close`).
    Node {
        /// The worker's process.
        pid: u32,
        /// What it said.
        message: node::Cluster,
    },
    /// A Node cluster worker was asked to disconnect `kill_timeout` ago: now the stop signal.
    SignalTimer {
        /// Instance id.
        id: u32,
        /// The process it was set for.
        pid: u32,
    },
    /// A worker under `wait_ready` was given `listen_timeout` to say it is ready.
    ListenTimeout {
        /// Instance id.
        id: u32,
        /// The process it was set for.
        pid: u32,
    },
}

/// One log file a client may read.
#[derive(Debug, Clone)]
pub struct LogSource {
    /// App name.
    pub app: String,
    /// Instance index.
    pub instance: u32,
    /// Which stream.
    pub stream: Stream,
    /// The file.
    pub sink: Arc<LogSink>,
}

#[derive(Debug)]
struct App {
    spec: AppSpec,
    base_env: BTreeMap<String, String>,
    instances: Vec<Instance>,
    /// Bound once, kept across restarts and reloads, closed with the app.
    listeners: Vec<Listener>,
    /// In proxy mode: the ready workers the accept loops relay to.
    router: Option<Arc<Router>>,
    /// In rr and least-conn modes: the ready workers the accept loops hand connections to.
    balancer: Option<Arc<Balancer>>,
    /// In proxy, rr and least-conn modes: the accept loops, stopped with the app.
    accept_loops: Vec<AbortHandle>,
    /// Node cluster apps: the servers their workers asked for, by Node's key; kept, like the
    /// `--listen` sockets, until the app is deleted.
    node_servers: BTreeMap<String, NodeServer>,
}

/// A listening socket a Node app's workers asked for with `listen()`.
#[derive(Debug)]
struct NodeServer {
    listener: Listener,
    /// Round robin: the master accepts and hands connections over. `None` when the socket
    /// itself goes to the workers (`--lb shared`, UDP).
    balancer: Option<Arc<Balancer>>,
    /// In shared mode, Node's handle type for the socket.
    shared: Option<&'static str>,
    accept_loops: Vec<AbortHandle>,
    /// The first worker's `data` (TLS ticket keys), given to every worker.
    data: serde_json::Value,
    /// What the workers' `server.address()` reports (TCP).
    sockname: Option<serde_json::Value>,
    /// The processes serving it.
    members: BTreeSet<u32>,
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

impl App {
    fn policy(&self) -> RestartPolicy {
        let spec = &self.spec;
        RestartPolicy {
            autorestart: spec.autorestart,
            min_uptime: Duration::from_millis(spec.min_uptime_ms),
            max_restarts: spec.max_restarts,
            restart_delay: Duration::from_millis(spec.restart_delay_ms),
            exp_backoff: spec.exp_backoff_restart_delay_ms.map(Duration::from_millis),
        }
    }
}

#[derive(Debug)]
struct Instance {
    id: u32,
    index: u32,
    status: Status,
    process: Option<Proc>,
    /// Bumped whenever pending restart timers must be ignored.
    token: u64,
    tracker: RestartTracker,
    last_exit: Option<String>,
    out: Arc<LogSink>,
    err: Arc<LogSink>,
    want_running: bool,
    /// The app's agent (`--agent`), not one of its workers.
    agent: bool,
    /// A worker waiting for its app's agent to be ready before it starts.
    held: bool,
    /// An agent asked to stop, which waits for its app's workers to be down first.
    stop_after_workers: bool,
}

#[derive(Debug)]
struct Proc {
    pid: u32,
    started: Instant,
    stop_sent: bool,
    /// Why the daemon ended it, when it did so on its own account (not ready in time, broke its
    /// channel): said instead of the bare "killed by SIGKILL".
    reason: Option<String>,
    /// In proxy mode: the loopback port it was told to listen on (`PORT`).
    port: Option<u16>,
    /// The reader of its `NOTIFY_SOCKET`, stopped when the process is forgotten.
    notify: Option<AbortHandle>,
    /// The master's end of its channel, for writing; closed when the process is forgotten.
    conduit: Option<Arc<Conduit>>,
    /// A Node cluster worker: stopped by `disconnect` first.
    node_cluster: bool,
    /// Stopped by a message first (`shutdown_with_message`).
    stop_by_message: bool,
}

impl Proc {
    /// Asks the process of instance `id` to stop: a `shutdown` frame on its channel and `signal`
    /// to its group; or, gracefully for a Node cluster worker, Node's `disconnect` (the signal
    /// follows after the kill timeout). Returns the timer to set for `kill_timeout`.
    fn ask_to_stop(&mut self, id: u32, signal: i32, graceful: bool) -> Event {
        self.stop_sent = true;
        let pid = self.pid;
        if let Some(conduit) = &self.conduit {
            if self.stop_by_message && graceful {
                match conduit.codec() {
                    Codec::Node => conduit.send_line(|_| node::line(&"shutdown".into())),
                    Codec::Corral => conduit.send(&MasterMessage::Shutdown),
                }
                return Event::SignalTimer { id, pid };
            }
            if self.node_cluster && graceful {
                conduit.send_line(node::disconnect);
                return Event::SignalTimer { id, pid };
            }
            if conduit.codec() == Codec::Corral {
                conduit.send(&MasterMessage::Shutdown);
            }
        }
        if let Err(e) = corral_sys::kill_group(pid, signal) {
            crate::log!("stopping process group {pid}: {e}");
        }
        Event::KillTimer { id, pid }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(task) = &self.notify {
            task.abort();
        }
        // Connections it had not accepted go to the other workers.
        if let Some(conduit) = &self.conduit {
            conduit.close();
        }
    }
}

/// A process that no longer serves as its instance (replaced by a reload, or it said it is going
/// down) and is finishing its work.
#[derive(Debug)]
struct Draining {
    id: u32,
    process: Proc,
}

/// A rolling reload of one app: one instance at a time, the new process ready before the old one
/// is stopped; the first failure ends it with the old process back in service.
#[derive(Debug)]
struct Reload {
    app: String,
    queue: VecDeque<u32>,
    step: Option<ReloadStep>,
    reply: Option<oneshot::Sender<Response>>,
}

#[derive(Debug, Clone, Copy)]
struct ReloadStep {
    id: u32,
    /// The process being replaced, if the instance was running.
    old: Option<u32>,
    old_signaled: bool,
}

/// A process group whose leader ended while other members lived on.
#[derive(Debug)]
struct Lingering {
    pgid: u32,
    instance: u32,
    kill_at: Instant,
    killed: bool,
}

#[derive(Debug)]
struct Waiter {
    /// Instances that must be down (no process, no lingering group) first.
    ids: Vec<u32>,
    then: Then,
}

/// What `scale` did: instances to wait for until ready, or to remove once down.
#[derive(Debug)]
enum Scaled {
    Growing(Vec<u32>),
    Shrinking(Vec<u32>, String),
}

/// A `scale` up waiting for its new instances to be ready (or for one to fail).
#[derive(Debug)]
struct ReadyWaiter {
    app: String,
    ids: Vec<u32>,
    reply: oneshot::Sender<Response>,
}

#[derive(Debug)]
enum Then {
    Report(Vec<u32>, oneshot::Sender<Response>),
    Done(String, oneshot::Sender<Response>),
    StartAgain(Vec<u32>, oneshot::Sender<Response>),
    Remove(String, oneshot::Sender<Response>),
}

/// The state of the daemon's apps.
#[derive(Debug)]
pub struct Supervisor {
    home: Home,
    apps: Vec<App>,
    next_id: u32,
    events: mpsc::UnboundedSender<Event>,
    waiters: Vec<Waiter>,
    lingering: Vec<Lingering>,
    linger_tick_pending: bool,
    draining: Vec<Draining>,
    reloads: Vec<Reload>,
    ready_waiters: Vec<ReadyWaiter>,
    notify_serial: u64,
    epoch: Instant,
    cpu: CpuSampler,
    shutting_down: bool,
    bus: Arc<Bus>,
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::error(kind, message)
}

fn describe_exit(exit: ExitKind) -> String {
    match exit {
        ExitKind::Code(code) => format!("exited with code {code}"),
        ExitKind::Signal(signal) => format!("killed by {}", Signal::describe(signal)),
    }
}

impl Supervisor {
    /// A supervisor with no apps; `events` is the sender of the channel [`Supervisor::run`] reads.
    pub fn new(home: Home, events: mpsc::UnboundedSender<Event>, bus: Arc<Bus>) -> Supervisor {
        Supervisor {
            home,
            apps: Vec::new(),
            next_id: 0,
            events,
            waiters: Vec::new(),
            lingering: Vec::new(),
            linger_tick_pending: false,
            draining: Vec::new(),
            reloads: Vec::new(),
            ready_waiters: Vec::new(),
            notify_serial: 0,
            epoch: Instant::now(),
            cpu: CpuSampler::default(),
            shutting_down: false,
            bus,
        }
    }

    /// Handles events until every sender is gone.
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        while let Some(event) = events.recv().await {
            self.handle(event);
            self.stop_agents_after_workers();
            self.release_held_workers();
            self.settle_waiters();
            self.advance_reloads();
            self.settle_ready_waiters();
            self.update_routers();
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Request { request, reply } => self.request(request, reply),
            Event::LogSources {
                target,
                streams,
                reply,
            } => {
                let _ = reply.send(self.log_sources(target.as_deref(), streams));
            }
            Event::Reaped { pid, exit } => self.reaped(pid, exit),
            Event::ReadyTimer { id, pid } => {
                if let Some(inst) = self.instance_mut(id)
                    && inst.status == Status::Starting
                    && inst.process.as_ref().is_some_and(|p| p.pid == pid)
                {
                    inst.status = Status::Online;
                }
            }
            Event::RestartTimer { id, token } => {
                if let Some(inst) = self.instance_mut(id)
                    && inst.token == token
                    && inst.want_running
                    && inst.status == Status::BackingOff
                {
                    self.respawn(id);
                }
            }
            Event::KillTimer { id, pid } => self.kill_timer(id, pid),
            Event::SignalTimer { id, pid } => self.signal_timer(id, pid),
            Event::Node { pid, message } => self.node_message(pid, message),
            Event::LingerTick => self.linger_tick(),
            Event::Worker { pid, message } => self.worker_message(pid, message),
            Event::ChannelFault { pid, problem } => {
                self.end_worker(pid, format!("broke its channel protocol ({problem})"));
            }
            Event::ListenTimeout { id, pid } => {
                let Some((a, _)) = self.locate(id) else {
                    return;
                };
                let app = &self.apps[a];
                let spec = &app.spec;
                let what = if spec.wait_ready {
                    "did not say it is ready".to_string()
                } else if spec.is_node_cluster() {
                    "did not listen (a Node.js cluster worker is ready when a server of its \
                     listens; one without a server runs with --exec-mode fork)"
                        .to_string()
                } else if spec.lb == corral_proto::LbMode::Proxy {
                    "did not accept connections on its PORT".to_string()
                } else if app.spec.needs_ready() {
                    format!(
                        "did not say it is ready on its channel (with --lb {}, a worker takes \
                         its connections from its channel, as corral-worker's incoming() does; \
                         a program that accepts on an inherited socket wants --lb shared, one \
                         that listens on PORT --lb proxy)",
                        spec.lb
                    )
                } else {
                    "did not say it is ready".to_string()
                };
                let timeout = spec.listen_timeout_ms;
                if let Some(inst) = self.instance_mut(id)
                    && inst.status == Status::Starting
                    && inst.process.as_ref().is_some_and(|p| p.pid == pid)
                {
                    self.end_worker(
                        pid,
                        format!("{what} within its listen timeout ({timeout}ms)"),
                    );
                }
            }
        }
    }

    fn request(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        if self.shutting_down && !matches!(request, Request::Ping | Request::List) {
            let _ = reply.send(error(
                ErrorKind::ShuttingDown,
                "the daemon is shutting down; run the command again in a moment",
            ));
            return;
        }
        let immediate = match request {
            Request::Ping => Response::Pong {
                pid: std::process::id(),
                version: corral_proto::PACKAGE_VERSION.into(),
                uptime_ms: self.epoch.elapsed().as_millis() as u64,
            },
            Request::Start { apps, base_env } => self.start(apps, &base_env),
            Request::List => {
                let ids = self.all_ids();
                self.report(&ids)
            }
            Request::Describe { target } => self.describe(&target),
            Request::Stop { target } => match self.resolve(&target) {
                Ok(ids) => {
                    for &id in &ids {
                        self.stop(id);
                    }
                    self.waiters.push(Waiter {
                        ids: ids.clone(),
                        then: Then::Report(ids, reply),
                    });
                    return;
                }
                Err(response) => response,
            },
            Request::Restart { target } => match self.resolve(&target) {
                Ok(ids) => {
                    self.restart(ids, reply);
                    return;
                }
                Err(response) => response,
            },
            Request::Reload { target } => {
                self.reload(&target, reply);
                return;
            }
            Request::Delete { target } => match self.resolve(&target) {
                Ok(ids) => {
                    for &id in &ids {
                        self.stop(id);
                    }
                    let message = format!("deleted {target} ({} instance(s))", ids.len());
                    self.waiters.push(Waiter {
                        ids,
                        then: Then::Remove(message, reply),
                    });
                    return;
                }
                Err(response) => response,
            },
            Request::Scale { app, instances } => match self.scale(&app, instances) {
                Ok(Scaled::Shrinking(ids, message)) => {
                    self.waiters.push(Waiter {
                        ids,
                        then: Then::Remove(message, reply),
                    });
                    return;
                }
                Ok(Scaled::Growing(added)) => {
                    // As a reload does: the answer comes once the new instances are ready.
                    self.ready_waiters.push(ReadyWaiter {
                        app,
                        ids: added,
                        reply,
                    });
                    return;
                }
                Err(response) => response,
            },
            Request::Signal { target, signal } => self.signal(&target, signal),
            Request::Send {
                target,
                data,
                reply: true,
                timeout_ms,
            } => match self.resolve(&target) {
                Ok(ids) => {
                    let pids: Vec<u32> = ids
                        .iter()
                        .filter_map(|&id| self.instance_mut(id)?.process.as_ref().map(|p| p.pid))
                        .collect();
                    self.bus.request_from_cli(&pids, &data, timeout_ms, reply);
                    return;
                }
                Err(response) => response,
            },
            Request::Send { target, data, .. } => self.send(&target, &data),
            Request::State { app, call } => {
                let backend = match self.state_backend(app.as_deref()) {
                    Ok(backend) => backend,
                    Err(response) => {
                        let _ = reply.send(response);
                        return;
                    }
                };
                let bus = self.bus.clone();
                tokio::spawn(async move {
                    let _ = reply.send(bus.cli_state(&backend, call).await);
                });
                return;
            }
            Request::Reset { .. } | Request::Events { .. } => error(
                ErrorKind::BadFrame,
                "this daemon does not serve that request yet",
            ),
            Request::Logs { .. } => error(
                ErrorKind::BadFrame,
                "logs requests are served by the connection, not the supervisor",
            ),
            Request::Flush { target } => self.flush(target.as_deref()),
            Request::Save { force } => {
                let specs = self.apps.iter().map(|a| a.spec.clone()).collect();
                let path = self.home.dump();
                match dump::save(&path, specs, force) {
                    Ok(count) => Response::Done {
                        message: format!("saved {count} app(s) to {}", path.display()),
                    },
                    Err(e) => error(ErrorKind::Io, e.to_string()),
                }
            }
            Request::Resurrect { base_env } => self.resurrect(&base_env),
            Request::Kill => {
                self.shutting_down = true;
                let ids = self.all_ids();
                for &id in &ids {
                    self.stop(id);
                }
                let message = format!("stopped {} app(s); the daemon exits", self.apps.len());
                self.waiters.push(Waiter {
                    ids,
                    then: Then::Done(message, reply),
                });
                return;
            }
        };
        let _ = reply.send(immediate);
    }

    // ---- lookups ----

    fn all_ids(&self) -> Vec<u32> {
        self.apps
            .iter()
            .flat_map(|a| a.instances.iter().map(|i| i.id))
            .collect()
    }

    fn app_ids(&self, name: &str) -> Vec<u32> {
        self.apps
            .iter()
            .filter(|a| a.spec.name == name)
            .flat_map(|a| a.instances.iter().map(|i| i.id))
            .collect()
    }

    fn locate(&self, id: u32) -> Option<(usize, usize)> {
        self.apps.iter().enumerate().find_map(|(a, app)| {
            app.instances
                .iter()
                .position(|i| i.id == id)
                .map(|i| (a, i))
        })
    }

    fn instance_mut(&mut self, id: u32) -> Option<&mut Instance> {
        let (a, i) = self.locate(id)?;
        Some(&mut self.apps[a].instances[i])
    }

    /// `all`, an instance id, or an app name, to instance ids.
    fn resolve(&self, target: &str) -> Result<Vec<u32>, Response> {
        if target == "all" {
            return Ok(self.all_ids());
        }
        if let Ok(id) = target.parse::<u32>() {
            return match self.locate(id) {
                Some(_) => Ok(vec![id]),
                None => Err(error(
                    ErrorKind::UnknownTarget,
                    format!("no instance has id {id}: `corral ls` lists the ids"),
                )),
            };
        }
        match self.apps.iter().find(|a| a.spec.name == target) {
            Some(app) => Ok(app.instances.iter().map(|i| i.id).collect()),
            None => Err(self.unknown_app(target)),
        }
    }

    /// The store of app `name`; without a name, the one every app uses (the daemon's memory
    /// when there is no app).
    fn state_backend(&self, name: Option<&str>) -> Result<corral_proto::StateBackend, Response> {
        if let Some(name) = name {
            return self
                .apps
                .iter()
                .find(|a| a.spec.name == name)
                .map(|app| app.spec.state.clone())
                .ok_or_else(|| self.unknown_app(name));
        }
        let backends: BTreeSet<String> =
            self.apps.iter().map(|a| a.spec.state.to_string()).collect();
        if backends.len() > 1 {
            return Err(error(
                ErrorKind::InvalidSpec,
                format!(
                    "the apps use different state stores ({}): say which app's with --app",
                    backends.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(self
            .apps
            .first()
            .map(|a| a.spec.state.clone())
            .unwrap_or_default())
    }

    fn unknown_app(&self, name: &str) -> Response {
        let known: Vec<&str> = self.apps.iter().map(|a| a.spec.name.as_str()).collect();
        let listed = if known.is_empty() {
            "no app is running".to_string()
        } else {
            format!("the apps are: {}", known.join(", "))
        };
        error(
            ErrorKind::UnknownTarget,
            format!("no app is named '{name}' ({listed})"),
        )
    }

    // ---- commands ----

    fn start(&mut self, specs: Vec<AppSpec>, base_env: &BTreeMap<String, String>) -> Response {
        for (n, spec) in specs.iter().enumerate() {
            if let Err(message) = validate(spec) {
                return error(
                    ErrorKind::InvalidSpec,
                    format!("app '{}': {message}", spec.name),
                );
            }
            if let Some(existing) = self.apps.iter().find(|a| a.spec.name == spec.name) {
                let id = existing.instances.first().map_or(0, |i| i.id);
                return error(
                    ErrorKind::DuplicateName,
                    format!(
                        "an app named '{}' exists already (id {id}): give this one another \
                         --name, or run `corral restart {}`",
                        spec.name, spec.name
                    ),
                );
            }
            if specs[..n].iter().any(|s| s.name == spec.name) {
                return error(
                    ErrorKind::DuplicateName,
                    format!(
                        "two apps are named '{}': app names must be unique",
                        spec.name
                    ),
                );
            }
        }
        // Every address of every app first: a failure starts nothing.
        let mut bound = Vec::new();
        for spec in &specs {
            match spec.listen.iter().map(|a| listeners::bind(a)).collect() {
                Ok(listeners) => bound.push(listeners),
                Err(message) => {
                    return error(
                        ErrorKind::InvalidSpec,
                        format!("app '{}': {message}", spec.name),
                    );
                }
            }
        }
        let mut started = Vec::new();
        for (spec, listeners) in specs.into_iter().zip(bound) {
            started.extend(self.add_app(spec, base_env.clone(), listeners));
        }
        self.report(&started)
    }

    fn add_app(
        &mut self,
        spec: AppSpec,
        base_env: BTreeMap<String, String>,
        listeners: Vec<Listener>,
    ) -> Vec<u32> {
        crate::log!(
            "starting app '{}': {} instance(s) of {}",
            spec.name,
            spec.instances,
            spec.script.display()
        );
        let count = spec.instances;
        for listener in &listeners {
            crate::log!("app '{}' listens on {}", spec.name, listener.resolved);
        }
        let (mut router, mut balancer, mut accept_loops) = (None, None, Vec::new());
        match spec.lb {
            corral_proto::LbMode::Proxy => {
                let proxy = Arc::new(Router::default());
                accept_loops = proxy::serve(&spec.name, &listeners, &proxy);
                router = Some(proxy);
            }
            corral_proto::LbMode::RoundRobin | corral_proto::LbMode::LeastConn => {
                let least_conn = spec.lb == corral_proto::LbMode::LeastConn;
                let shared = Balancer::new(&spec.name, least_conn, None);
                accept_loops = shared.serve(&spec.name, &listeners);
                balancer = Some(shared);
            }
            corral_proto::LbMode::Shared => {}
        }
        self.apps.push(App {
            spec,
            base_env,
            instances: Vec::new(),
            listeners,
            router,
            balancer,
            accept_loops,
            node_servers: BTreeMap::new(),
        });
        let app = self.apps.len() - 1;
        let mut ids = Vec::new();
        if self.apps[app].spec.agent.is_some() {
            ids.push(self.add_process(app, AGENT_INDEX, true));
        }
        ids.extend((0..count).map(|index| self.add_instance(app, index)));
        ids
    }

    fn add_instance(&mut self, app: usize, index: u32) -> u32 {
        self.add_process(app, index, false)
    }

    /// An instance, the app's agent when `agent` (its index is [`AGENT_INDEX`]); started at
    /// once, or for a worker once the app's agent is ready.
    fn add_process(&mut self, app: usize, index: u32, agent: bool) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let spec = &self.apps[app].spec;
        let sink = |stream| {
            let path = if agent {
                self.home.agent_log_file(&spec.name, stream)
            } else {
                self.home.log_file(&spec.name, index, stream)
            };
            LogSink::new(path, spec.log_max_size, spec.log_keep)
        };
        let instance = Instance {
            id,
            index,
            status: Status::Starting,
            process: None,
            token: 0,
            tracker: RestartTracker::new(),
            last_exit: None,
            out: sink(Stream::Out),
            err: sink(Stream::Err),
            want_running: true,
            agent,
            held: false,
            stop_after_workers: false,
        };
        let agent_pending = !agent
            && self.apps[app]
                .instances
                .iter()
                .any(|i| i.agent && i.want_running && i.status != Status::Online);
        self.apps[app].instances.push(instance);
        if agent_pending {
            let inst = self.instance_mut(id).expect("just added");
            inst.held = true;
        } else {
            self.spawn(id);
        }
        id
    }

    /// Restarts instance `id` after its exit. A worker whose app's agent is itself on its way
    /// back waits for it, as at the app's start: the agent is restarted first.
    fn respawn(&mut self, id: u32) {
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        let app = &mut self.apps[a];
        let agent_coming = !app.instances[i].agent
            && app.instances.iter().any(|other| {
                other.agent
                    && other.want_running
                    && matches!(other.status, Status::Starting | Status::BackingOff)
            });
        if agent_coming {
            let inst = &mut app.instances[i];
            inst.held = true;
            inst.status = Status::Starting;
        } else {
            self.spawn(id);
        }
    }

    /// Starts the workers that waited for their agent, once it is ready (or will not be: then
    /// they start without it, and the log says so).
    fn release_held_workers(&mut self) {
        let mut release = Vec::new();
        for app in &self.apps {
            if !app.instances.iter().any(|i| i.held) {
                continue;
            }
            let agent = app.instances.iter().find(|i| i.agent);
            let waiting = agent.is_some_and(|a| {
                a.want_running && matches!(a.status, Status::Starting | Status::BackingOff)
            });
            if waiting {
                continue;
            }
            if let Some(agent) = agent
                && agent.status != Status::Online
            {
                crate::log!(
                    "app '{}': its agent is {}; starting the workers without it",
                    app.spec.name,
                    agent.status
                );
            }
            release.extend(app.instances.iter().filter(|i| i.held).map(|i| i.id));
        }
        for id in release {
            if let Some(inst) = self.instance_mut(id) {
                inst.held = false;
                if inst.want_running {
                    self.spawn(id);
                }
            }
        }
    }

    /// Stops the agents asked to stop once their app's workers being stopped are down: an agent
    /// is stopped last.
    fn stop_agents_after_workers(&mut self) {
        let mut due = Vec::new();
        for app in &self.apps {
            let workers_stopping = app
                .instances
                .iter()
                .any(|i| !i.agent && !i.want_running && i.process.is_some());
            if workers_stopping {
                continue;
            }
            due.extend(
                app.instances
                    .iter()
                    .filter(|i| i.agent && i.stop_after_workers)
                    .map(|i| i.id),
            );
        }
        for id in due {
            if let Some(inst) = self.instance_mut(id) {
                inst.stop_after_workers = false;
            }
            self.stop(id);
        }
    }

    fn describe(&mut self, target: &str) -> Response {
        let app = match target.parse::<u32>() {
            Ok(id) => self.locate(id).map(|(a, _)| a),
            Err(_) => self.apps.iter().position(|a| a.spec.name == target),
        };
        let Some(app) = app else {
            return match target.parse::<u32>() {
                Ok(id) => error(
                    ErrorKind::UnknownTarget,
                    format!("no instance has id {id}: `corral ls` lists the ids"),
                ),
                Err(_) => self.unknown_app(target),
            };
        };
        let ids: Vec<u32> = self.apps[app].instances.iter().map(|i| i.id).collect();
        let instances = ids.iter().filter_map(|&id| self.info(id)).collect();
        let app = &self.apps[app];
        let log_files = app
            .instances
            .iter()
            .map(|i| (i.index, i.out.path().into(), i.err.path().into()))
            .collect();
        Response::App(Box::new(AppInfo {
            spec: app.spec.clone(),
            instances,
            log_files,
            events: Vec::new(),
        }))
    }

    fn restart(&mut self, ids: Vec<u32>, reply: oneshot::Sender<Response>) {
        let mut running = Vec::new();
        for &id in &ids {
            let Some(inst) = self.instance_mut(id) else {
                continue;
            };
            inst.tracker.reset();
            inst.token += 1;
            if inst.process.is_some() {
                running.push(id);
            }
        }
        for &id in &running {
            self.stop(id);
        }
        for &id in &ids {
            if !running.contains(&id) {
                self.spawn(id);
            }
        }
        self.waiters.push(Waiter {
            ids: running.clone(),
            then: Then::StartAgain(ids, reply),
        });
    }

    /// Grows or shrinks an app; when shrinking, returns the instances to remove once down.
    fn scale(&mut self, name: &str, count: u32) -> Result<Scaled, Response> {
        if count == 0 || count > MAX_INSTANCES {
            return Err(error(
                ErrorKind::InvalidSpec,
                format!(
                    "cannot scale '{name}' to {count}: give 1 to {MAX_INSTANCES} instances (`corral stop {name}` stops them all)"
                ),
            ));
        }
        let Some(app) = self.apps.iter().position(|a| a.spec.name == name) else {
            return Err(self.unknown_app(name));
        };
        let current = self.apps[app].instances.iter().filter(|i| !i.agent).count() as u32;
        self.apps[app].spec.instances = count;
        if count >= current {
            let mut added = Vec::new();
            for _ in current..count {
                let used: Vec<u32> = self.apps[app].instances.iter().map(|i| i.index).collect();
                let index = (0..=MAX_INSTANCES)
                    .find(|i| !used.contains(i))
                    .expect("fewer than MAX_INSTANCES are in use");
                added.push(self.add_instance(app, index));
            }
            return Ok(Scaled::Growing(added));
        }
        let mut by_index: Vec<(u32, u32)> = self.apps[app]
            .instances
            .iter()
            .filter(|i| !i.agent)
            .map(|i| (i.index, i.id))
            .collect();
        by_index.sort_unstable();
        let removed: Vec<u32> = by_index[count as usize..]
            .iter()
            .map(|&(_, id)| id)
            .collect();
        for &id in &removed {
            self.stop(id);
        }
        Ok(Scaled::Shrinking(
            removed,
            format!("scaled '{name}' from {current} to {count} instance(s)"),
        ))
    }

    fn signal(&mut self, target: &str, number: i32) -> Response {
        let ids = match self.resolve(target) {
            Ok(ids) => ids,
            Err(response) => return response,
        };
        let name = Signal::describe(number);
        let mut sent = 0;
        for id in ids {
            if let Some(pid) = self
                .instance_mut(id)
                .and_then(|i| i.process.as_ref().map(|p| p.pid))
            {
                match corral_sys::kill(pid, number) {
                    Ok(()) => sent += 1,
                    Err(e) => crate::log!("sending {name} to pid {pid}: {e}"),
                }
            }
        }
        if sent == 0 {
            return error(
                ErrorKind::UnknownTarget,
                format!("no instance of {target} is running, so none got {name}"),
            );
        }
        Response::Done {
            message: format!("sent {name} to {sent} instance(s) of {target}"),
        }
    }

    fn send(&mut self, target: &str, data: &serde_json::Value) -> Response {
        let ids = match self.resolve(target) {
            Ok(ids) => ids,
            Err(response) => return response,
        };
        let mut sent = 0;
        for id in ids {
            let conduit = self
                .instance_mut(id)
                .and_then(|i| i.process.as_ref()?.conduit.clone());
            let Some(conduit) = conduit else { continue };
            match conduit.codec() {
                Codec::Node => conduit.send_line(|_| node::line(data)),
                Codec::Corral => conduit.send(&MasterMessage::Message {
                    data: data.clone(),
                    from: Some("cli".into()),
                    request: None,
                }),
            }
            sent += 1;
        }
        if sent == 0 {
            return error(
                ErrorKind::UnknownTarget,
                format!("no instance of {target} is running, so none got the message"),
            );
        }
        Response::Done {
            message: format!("sent the message to {sent} instance(s) of {target}"),
        }
    }

    fn flush(&mut self, target: Option<&str>) -> Response {
        let sources = match self.log_sources(target, Streams::Both) {
            Ok(sources) => sources,
            Err(response) => return response,
        };
        for source in &sources {
            if let Err(e) = source.sink.flush() {
                return error(
                    ErrorKind::Io,
                    format!("cannot empty {}: {e}", source.sink.path().display()),
                );
            }
        }
        Response::Done {
            message: format!("emptied {} log file(s)", sources.len()),
        }
    }

    fn resurrect(&mut self, base_env: &BTreeMap<String, String>) -> Response {
        let specs = match dump::load(&self.home.dump()) {
            Ok(specs) => specs,
            Err(e) => return error(ErrorKind::Io, e.to_string()),
        };
        let total = specs.len();
        let missing: Vec<AppSpec> = specs
            .into_iter()
            .filter(|s| !self.apps.iter().any(|a| a.spec.name == s.name))
            .collect();
        if missing.is_empty() {
            return Response::Done {
                message: format!("nothing to resurrect: the {total} saved app(s) run already"),
            };
        }
        let mut started = Vec::new();
        for spec in missing {
            let bound: Result<Vec<Listener>, String> = match validate(&spec) {
                Ok(()) => spec.listen.iter().map(|a| listeners::bind(a)).collect(),
                Err(message) => Err(message),
            };
            match bound {
                Ok(listeners) => started.extend(self.add_app(spec, base_env.clone(), listeners)),
                Err(message) => crate::log!("resurrect: skipping app '{}': {message}", spec.name),
            }
        }
        self.report(&started)
    }

    fn log_sources(
        &self,
        target: Option<&str>,
        streams: Streams,
    ) -> Result<Vec<LogSource>, Response> {
        let ids = match target {
            None => self.all_ids(),
            Some(target) => self.resolve(target)?,
        };
        let mut sources = Vec::new();
        for id in ids {
            let Some((a, i)) = self.locate(id) else {
                continue;
            };
            let app = &self.apps[a];
            let inst = &app.instances[i];
            for (stream, sink) in [(Stream::Out, &inst.out), (Stream::Err, &inst.err)] {
                let wanted = match streams {
                    Streams::Both => true,
                    Streams::Out => stream == Stream::Out,
                    Streams::Err => stream == Stream::Err,
                };
                if wanted {
                    sources.push(LogSource {
                        app: app.spec.name.clone(),
                        instance: inst.index,
                        stream,
                        sink: sink.clone(),
                    });
                }
            }
        }
        Ok(sources)
    }

    // ---- processes ----

    fn spawn(&mut self, id: u32) {
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        let app = &self.apps[a];
        let spec = &app.spec;
        let inst = &app.instances[i];
        // The agent runs its own program, as a plain process: no listening sockets, no port,
        // not a Node cluster worker.
        let agent = spec.agent.as_ref().filter(|_| inst.agent);
        let (interpreter, interpreter_args, script, script_args) = match agent {
            Some(a) => (&a.interpreter, &a.interpreter_args, &a.script, &a.args),
            None => (
                &spec.interpreter,
                &spec.interpreter_args,
                &spec.script,
                &spec.args,
            ),
        };
        let node = corral_proto::runs_on_node(interpreter.as_deref());
        let node_cluster = agent.is_none() && spec.is_node_cluster();
        let (program, mut args) = match interpreter {
            Some(interpreter) => {
                let mut args = interpreter_args.clone();
                if node_cluster && spec.env.get(NODE_DRAIN_SWITCH).is_none_or(|v| v != "off") {
                    args.push("--require".into());
                    args.push(self.home.node_drain().to_string_lossy().into_owned());
                }
                args.push(script.to_string_lossy().into_owned());
                (std::ffi::OsString::from(interpreter), args)
            }
            None => (script.clone().into_os_string(), Vec::new()),
        };
        args.extend(script_args.iter().cloned());
        // The channel to the master, and in shared mode the listening sockets, at fixed numbers:
        // listeners from 3 (systemd's convention), the channel right after them.
        let listen_fds: Vec<_> = match spec.lb {
            corral_proto::LbMode::Shared if agent.is_none() => {
                app.listeners.iter().map(|l| l.fd.as_fd()).collect()
            }
            _ => Vec::new(),
        };
        // Proxy mode: a fresh port for every process, so that an old and a new one of the same
        // instance can run side by side during a reload.
        let port = match spec.lb {
            corral_proto::LbMode::Proxy if agent.is_none() => match proxy::free_port() {
                Ok(port) => Some(port),
                Err(e) => {
                    crate::log!(
                        "app '{}': no free loopback port for a worker: {e}",
                        spec.name
                    );
                    None
                }
            },
            _ => None,
        };
        let channel = corral_sys::fd::stream_pair();
        self.notify_serial += 1;
        let notify = match crate::notify::bind(id, self.notify_serial) {
            Ok(notify) => Some(notify),
            Err(e) => {
                crate::log!("no NOTIFY_SOCKET for instance {id}: {e}");
                None
            }
        };
        let mut command = if listen_fds.is_empty() {
            std::process::Command::new(&program)
        } else {
            // LISTEN_PID must be the program's own pid, unknown before the fork: a tiny exec
            // shim (this binary) sets it and execs the program with the same pid.
            let mut shim = std::process::Command::new("/proc/self/exe");
            shim.arg(ACTIVATE_SHIM).arg(&program);
            shim
        };
        let channel_fd = 3 + listen_fds.len() as i32;
        let role = if agent.is_some() { "agent" } else { "worker" };
        command
            .args(&args)
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(&app.base_env)
            .envs(&spec.env)
            .env(env::CORRAL_APP, &spec.name)
            .env(env::CORRAL_INSTANCE, inst.index.to_string())
            .env(env::CORRAL_ID, id.to_string())
            .env(env::NODE_APP_INSTANCE, inst.index.to_string())
            .env(env::CORRAL_WORKER_ID, id.to_string())
            .env(env::CORRAL_LB, spec.lb.to_string())
            .env(env::CORRAL_ROLE, role)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if node {
            // Node's own IPC channel: `process.send` and `process.on('message')` work, and in
            // cluster mode corral is the cluster primary.
            command
                .env("NODE_CHANNEL_FD", channel_fd.to_string())
                .env("NODE_CHANNEL_SERIALIZATION_MODE", "json");
            if node_cluster {
                command.env("NODE_UNIQUE_ID", id.to_string());
            }
        } else {
            command
                .env(env::CORRAL_CHANNEL_FD, channel_fd.to_string())
                .env(
                    env::CORRAL_CHANNEL_PROTOCOL,
                    CHANNEL_PROTOCOL_VERSION.to_string(),
                );
        }
        if let Some(port) = port {
            command.env("PORT", port.to_string());
        }
        if let Some(notify) = &notify {
            command.env("NOTIFY_SOCKET", &notify.address);
        }
        if !listen_fds.is_empty() {
            let names: Vec<String> = (0..listen_fds.len())
                .map(|n| format!("listen{n}"))
                .collect();
            command
                .env(env::LISTEN_FDS, listen_fds.len().to_string())
                .env(env::LISTEN_FDNAMES, names.join(":"));
        }
        let spawned = channel.and_then(|(master_end, worker_end)| {
            let mut placed: Vec<_> = listen_fds
                .iter()
                .enumerate()
                .map(|(n, fd)| (*fd, 3 + n as i32))
                .collect();
            placed.push((worker_end.as_fd(), channel_fd));
            corral_sys::fd::place_fds(&mut command, &placed)?;
            let child = command.spawn()?;
            Ok((child, master_end))
        });
        drop(command);
        let wait_ready = if agent.is_some() {
            spec.wait_ready
        } else {
            spec.needs_ready()
        };
        let codec = if node { Codec::Node } else { Codec::Corral };
        let stop_by_message = spec.shutdown_with_message;
        let listen_timeout = Duration::from_millis(spec.listen_timeout_ms);
        let timestamps = spec.time;
        let min_uptime = Duration::from_millis(spec.min_uptime_ms);
        let policy = app.policy();
        let name = spec.name.clone();
        let backend = spec.state.clone();
        let cwd = spec.cwd.display().to_string();
        let now = self.epoch.elapsed();
        let inst = &mut self.apps[a].instances[i];
        inst.token += 1;
        match spawned {
            Ok((mut child, channel)) => {
                let pid = child.id();
                let conduit = match crate::channel::open(channel) {
                    Ok(stream) => {
                        let conduit = Conduit::new(pid, codec, stream);
                        self.bus.join(
                            Joining {
                                pid,
                                id,
                                app: name.clone(),
                                agent: inst.agent,
                                backend: backend.clone(),
                            },
                            conduit.clone(),
                        );
                        tokio::spawn(crate::channel::read(
                            conduit.clone(),
                            self.events.clone(),
                            self.bus.clone(),
                        ));
                        Some(conduit)
                    }
                    Err(e) => {
                        crate::log!("cannot read the channel of pid {pid}: {e}");
                        None
                    }
                };
                let notify = notify.map(|notify| {
                    tokio::spawn(crate::notify::read(notify, pid, self.events.clone()))
                        .abort_handle()
                });
                for (pipe, sink) in [
                    (child.stdout.take().map(OwnedFd::from), inst.out.clone()),
                    (child.stderr.take().map(OwnedFd::from), inst.err.clone()),
                ] {
                    let Some(pipe) = pipe else { continue };
                    match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
                        Ok(pipe) => {
                            tokio::spawn(pump(pipe, sink, timestamps));
                        }
                        Err(e) => crate::log!("cannot read output of pid {pid}: {e}"),
                    }
                }
                // Exits are collected by the reaper (waitpid on any pid), not through `child`.
                drop(child);
                inst.process = Some(Proc {
                    pid,
                    started: Instant::now(),
                    stop_sent: false,
                    reason: None,
                    port,
                    notify,
                    conduit,
                    node_cluster,
                    stop_by_message,
                });
                inst.tracker.on_spawn(now);
                inst.want_running = true;
                if wait_ready {
                    inst.status = Status::Starting;
                    self.after(listen_timeout, Event::ListenTimeout { id, pid });
                } else if let Some(port) = port {
                    // Proxy mode: ready when its port accepts, the only readiness that matters
                    // to the connections relayed to it.
                    inst.status = Status::Starting;
                    tokio::spawn(proxy::probe(port, pid, listen_timeout, self.events.clone()));
                    self.after(listen_timeout, Event::ListenTimeout { id, pid });
                } else if min_uptime.is_zero() {
                    inst.status = Status::Online;
                } else {
                    inst.status = Status::Starting;
                    self.after(min_uptime, Event::ReadyTimer { id, pid });
                }
            }
            Err(e) => {
                let permanent = matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) || e.raw_os_error() == Some(8); // ENOEXEC
                let message = format!(
                    "cannot start {}: {e}. Check that it exists, is executable (or has an \
                     interpreter), and that the working directory {} exists",
                    program.to_string_lossy(),
                    cwd
                );
                crate::log!("app '{name}' instance {}: {message}", inst.index);
                let _ = inst.err.write(format!("[corral] {message}\n").as_bytes());
                inst.last_exit = Some(message);
                inst.tracker.on_spawn(now);
                let decision = if permanent {
                    Decision::Errored {
                        unstable_restarts: inst.tracker.unstable_restarts(),
                    }
                } else {
                    inst.tracker.on_exit(&policy, now, ExitCause::Unexpected)
                };
                self.apply(id, decision);
            }
        }
    }

    /// Asks an instance to stop: the stop signal to its process group, SIGKILL after `kill_timeout`.
    fn stop(&mut self, id: u32) {
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        let stop_signal = self.apps[a].spec.stop_signal;
        let kill_timeout = Duration::from_millis(self.apps[a].spec.kill_timeout_ms);
        let mut timers = Vec::new();
        for draining in self.draining.iter_mut().filter(|d| d.id == id) {
            if !draining.process.stop_sent {
                timers.push(draining.process.ask_to_stop(id, stop_signal, true));
            }
        }
        let inst = &mut self.apps[a].instances[i];
        inst.want_running = false;
        inst.token += 1;
        inst.held = false;
        if inst.agent && inst.process.is_some() && !inst.stop_after_workers {
            let workers_up = self.apps[a]
                .instances
                .iter()
                .any(|w| !w.agent && w.process.is_some());
            if workers_up {
                // Workers may still need it while they finish; it goes once they are down
                // (or at once when they keep running: see `stop_agents_after_workers`).
                let inst = &mut self.apps[a].instances[i];
                inst.stop_after_workers = true;
                inst.status = Status::Stopping;
                return;
            }
        }
        let inst = &mut self.apps[a].instances[i];
        match inst.process.as_mut() {
            Some(process) => {
                inst.status = Status::Stopping;
                if !process.stop_sent {
                    timers.push(process.ask_to_stop(id, stop_signal, true));
                }
            }
            None => {
                if inst.status != Status::Errored {
                    inst.status = Status::Stopped;
                }
            }
        }
        for timer in timers {
            self.after(kill_timeout, timer);
        }
    }

    /// A Node cluster worker did not leave within the kill timeout of its `disconnect`: the stop
    /// signal now, SIGKILL after another kill timeout.
    fn signal_timer(&mut self, id: u32, pid: u32) {
        let alive =
            self.draining.iter().any(|d| d.process.pid == pid) || self.by_pid(pid).is_some();
        let Some((a, _)) = self.locate(id) else {
            return;
        };
        if alive {
            let spec = &self.apps[a].spec;
            crate::log!(
                "pid {pid} of app '{}' did not exit within {}ms of being asked to leave (by a \
                 message on its channel): sending {}",
                spec.name,
                spec.kill_timeout_ms,
                Signal::describe(spec.stop_signal)
            );
            let _ = corral_sys::kill_group(pid, spec.stop_signal);
            let kill_timeout = Duration::from_millis(spec.kill_timeout_ms);
            self.after(kill_timeout, Event::KillTimer { id, pid });
        }
    }

    /// What a Node cluster worker asks of its primary.
    fn node_message(&mut self, pid: u32, message: node::Cluster) {
        match message {
            node::Cluster::QueryServer { seq, query } => self.node_query(pid, seq, &query),
            node::Cluster::Listening => {
                if let Some((a, i)) = self.by_pid(pid) {
                    let wait_ready = self.apps[a].spec.wait_ready;
                    let inst = &mut self.apps[a].instances[i];
                    if inst.status == Status::Starting && !wait_ready {
                        inst.status = Status::Online;
                    }
                }
            }
            node::Cluster::Close { key } => {
                for app in &mut self.apps {
                    if let Some(server) = app.node_servers.get_mut(&key) {
                        server.members.remove(&pid);
                    }
                }
            }
            _ => {}
        }
    }

    /// A Node worker's `listen()`: the master's socket for that key (bound now if it is the
    /// first), and from then on its connections, round robin.
    fn node_query(&mut self, pid: u32, seq: u64, query: &serde_json::Value) {
        let Some((a, i)) = self.by_pid(pid) else {
            return;
        };
        let Some(conduit) = self.apps[a].instances[i]
            .process
            .as_ref()
            .and_then(|p| p.conduit.clone())
        else {
            return;
        };
        let key = node::server_key(query);
        let data = query.get("data").cloned().unwrap_or_default();
        let app = &mut self.apps[a];
        if !app.node_servers.contains_key(&key) {
            match node_listen(query) {
                Ok((address, listener, datagram)) => {
                    crate::log!(
                        "app '{}' listens on {} (its workers' listen({address}))",
                        app.spec.name,
                        listener.resolved
                    );
                    let server = if datagram || app.spec.lb == corral_proto::LbMode::Shared {
                        // The socket itself goes to every worker, as Node's SCHED_NONE does.
                        let _ = corral_sys::fd::set_nonblocking(listener.fd.as_fd(), true);
                        let kind = if datagram {
                            "dgram.Native"
                        } else {
                            "net.Native"
                        };
                        NodeServer {
                            listener,
                            balancer: None,
                            shared: Some(kind),
                            accept_loops: Vec::new(),
                            data,
                            sockname: None,
                            members: BTreeSet::new(),
                        }
                    } else {
                        let least_conn = app.spec.lb == corral_proto::LbMode::LeastConn;
                        let balancer = Balancer::new(&app.spec.name, least_conn, Some(key.clone()));
                        let accept_loops =
                            balancer.serve(&app.spec.name, std::slice::from_ref(&listener));
                        let sockname = listener
                            .resolved
                            .parse::<std::net::SocketAddr>()
                            .ok()
                            .map(node::sockname);
                        NodeServer {
                            listener,
                            balancer: Some(balancer),
                            shared: None,
                            accept_loops,
                            data,
                            sockname,
                            members: BTreeSet::new(),
                        }
                    };
                    app.node_servers.insert(key.clone(), server);
                }
                Err((errno, why)) => {
                    crate::log!(
                        "app '{}' instance {}: its listen() fails: {why}",
                        app.spec.name,
                        app.instances[i].index
                    );
                    conduit.send_line(|next| node::error_reply(&key, seq, &data, errno, next));
                    return;
                }
            }
        }
        let server = app.node_servers.get_mut(&key).expect("inserted above");
        server.members.insert(pid);
        let (data, sockname) = (server.data.clone(), server.sockname.clone());
        let Some(kind) = server.shared else {
            let reply = |next| node::round_robin_reply(&key, seq, &data, sockname, next);
            conduit.send_line(reply);
            return;
        };
        match server.listener.fd.try_clone() {
            Ok(fd) => {
                let reply = |next| node::shared_reply(kind, &key, seq, &data, next);
                conduit.send_handle(reply, fd);
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(24);
                conduit.send_line(|next| node::error_reply(&key, seq, &data, errno, next));
            }
        }
    }

    fn kill_timer(&mut self, id: u32, pid: u32) {
        if self.draining.iter().any(|d| d.process.pid == pid) {
            crate::log!(
                "draining pid {pid} of instance {id} did not exit within its kill timeout: sending SIGKILL to its process group"
            );
            let _ = corral_sys::kill_group(pid, 9);
            return;
        }
        let Some(inst) = self.instance_mut(id) else {
            return;
        };
        if inst.process.as_ref().is_some_and(|p| p.pid == pid) {
            crate::log!(
                "instance {id} (pid {pid}) did not stop within its kill timeout: sending SIGKILL to its process group"
            );
            let _ = corral_sys::kill_group(pid, 9);
        }
    }

    fn reaped(&mut self, pid: u32, exit: ExitKind) {
        for app in &mut self.apps {
            for server in app.node_servers.values_mut() {
                server.members.remove(&pid);
            }
        }
        let Some((a, i)) = self.by_pid(pid) else {
            if let Some(n) = self.draining.iter().position(|d| d.process.pid == pid) {
                let draining = self.draining.swap_remove(n);
                let (signal, kill_timeout) = self.locate(draining.id).map_or((15, 0), |(a, _)| {
                    (
                        self.apps[a].spec.stop_signal,
                        self.apps[a].spec.kill_timeout_ms,
                    )
                });
                crate::log!(
                    "draining pid {pid} of instance {} {}",
                    draining.id,
                    describe_exit(exit)
                );
                self.reap_group(
                    pid,
                    draining.id,
                    draining.process.stop_sent,
                    signal,
                    Duration::from_millis(kill_timeout),
                );
            }
            // Otherwise an adopted orphan, or a leftover of a group: reaped, nothing more to do.
            return;
        };
        // The new process of a reload step ended before it was ready: no restart, the reload
        // rolls back to the old process (restarting it could go on for ever when the exits are
        // not quick enough to make a crash loop).
        let in_reload = self.reloads.iter().any(|r| {
            r.step
                .is_some_and(|s| !s.old_signaled && self.apps[a].instances[i].id == s.id)
        });
        let app = &mut self.apps[a];
        let mut policy = app.policy();
        let stop_signal = app.spec.stop_signal;
        let kill_timeout = Duration::from_millis(app.spec.kill_timeout_ms);
        let name = app.spec.name.clone();
        let now = self.epoch.elapsed();
        let probed = app.spec.needs_ready() || app.spec.lb == corral_proto::LbMode::Proxy;
        let inst = &mut app.instances[i];
        if (probed || (inst.agent && app.spec.wait_ready)) && inst.status == Status::Starting {
            // It never said it is ready, so it never started: its exit is unstable however long
            // it took (a listen timeout longer than min_uptime must not hide a crash loop).
            policy.min_uptime = Duration::MAX;
        }
        let id = inst.id;
        let process = inst.process.take().expect("found by its process");
        let how = match &process.reason {
            Some(reason) => format!("{reason}; {}", describe_exit(exit)),
            None => describe_exit(exit),
        };
        inst.last_exit = Some(how.clone());
        let cause = if inst.want_running {
            ExitCause::Unexpected
        } else {
            ExitCause::Requested
        };
        let which = if inst.agent {
            "agent".to_string()
        } else {
            format!("instance {}", inst.index)
        };
        crate::log!(
            "app '{name}' {which} (pid {pid}) {how} after {:.1}s",
            process.started.elapsed().as_secs_f64()
        );
        if in_reload && cause == ExitCause::Unexpected {
            inst.status = Status::Errored;
            self.reap_group(pid, id, process.stop_sent, stop_signal, kill_timeout);
            return;
        }
        let decision = inst.tracker.on_exit(&policy, now, cause);
        self.reap_group(pid, id, process.stop_sent, stop_signal, kill_timeout);
        self.apply(id, decision);
    }

    /// The leader of group `pgid` is gone; whatever is left of its group goes too (as systemd
    /// does): the stop signal unless it had it already, SIGKILL after the kill timeout.
    fn reap_group(
        &mut self,
        pgid: u32,
        id: u32,
        signaled: bool,
        signal: i32,
        kill_timeout: Duration,
    ) {
        if stats::group_has_live_members(pgid) {
            if !signaled {
                let _ = corral_sys::kill_group(pgid, signal);
            }
            self.lingering.push(Lingering {
                pgid,
                instance: id,
                kill_at: Instant::now() + kill_timeout,
                killed: false,
            });
            self.schedule_linger_tick();
        }
    }

    /// Finds the instance whose current process is `pid`.
    fn by_pid(&self, pid: u32) -> Option<(usize, usize)> {
        self.apps.iter().enumerate().find_map(|(a, app)| {
            app.instances
                .iter()
                .position(|inst| inst.process.as_ref().is_some_and(|p| p.pid == pid))
                .map(|i| (a, i))
        })
    }

    /// Ends a worker the daemon gave up on (not ready in time, broke its channel): its group gets
    /// the stop signal, then SIGKILL; its exit then counts as a crash, restarted by the policy.
    fn end_worker(&mut self, pid: u32, reason: String) {
        let Some((a, i)) = self.by_pid(pid) else {
            return;
        };
        let name = self.apps[a].spec.name.clone();
        let stop_signal = self.apps[a].spec.stop_signal;
        let kill_timeout = Duration::from_millis(self.apps[a].spec.kill_timeout_ms);
        let inst = &mut self.apps[a].instances[i];
        let id = inst.id;
        crate::log!(
            "app '{name}' instance {} (pid {pid}) {reason}: ending it",
            inst.index
        );
        let process = inst.process.as_mut().expect("found by its process");
        process.reason = Some(reason);
        if !process.stop_sent {
            // Its channel may be what is broken: the signal at once.
            let timer = process.ask_to_stop(id, stop_signal, false);
            self.after(kill_timeout, timer);
        }
    }

    fn worker_message(&mut self, pid: u32, message: WorkerMessage) {
        let Some((a, i)) = self.by_pid(pid) else {
            return;
        };
        let name = self.apps[a].spec.name.clone();
        let policy = self.apps[a].policy();
        let kill_timeout = Duration::from_millis(self.apps[a].spec.kill_timeout_ms);
        let now = self.epoch.elapsed();
        let inst = &mut self.apps[a].instances[i];
        let id = inst.id;
        match message {
            WorkerMessage::Ready => {
                if inst.status == Status::Starting {
                    inst.status = Status::Online;
                }
            }
            WorkerMessage::Message { data } => {
                crate::log!("app '{name}' instance {} says: {data}", inst.index);
            }
            // Answers about connections stay with the channel's reader and its conduit.
            // ... and bus and state messages with the bus.
            WorkerMessage::Accepted { .. }
            | WorkerMessage::Refused { .. }
            | WorkerMessage::Closed { .. }
            | WorkerMessage::Send { .. }
            | WorkerMessage::Reply { .. }
            | WorkerMessage::State { .. } => {}
            WorkerMessage::GoingDown { reason } => {
                // The seed's graceful restart: the replacement starts now, the old process
                // finishes its work and exits on its own (SIGKILL after the kill timeout). Its
                // going down counts as a crash, so a worker that dies at every start still ends
                // errored.
                crate::log!(
                    "app '{name}' instance {} (pid {pid}) is going down ({reason}): starting its replacement",
                    inst.index
                );
                let process = inst.process.take().expect("found by its process");
                inst.last_exit = Some(format!("said it was going down: {reason}"));
                let decision = if inst.want_running {
                    inst.tracker.on_exit(&policy, now, ExitCause::Unexpected)
                } else {
                    Decision::Stay
                };
                self.draining.push(Draining { id, process });
                self.after(kill_timeout, Event::KillTimer { id, pid });
                self.apply(id, decision);
            }
        }
    }

    fn reload(&mut self, target: &str, reply: oneshot::Sender<Response>) {
        let names: Vec<String> = if target == "all" {
            self.apps.iter().map(|a| a.spec.name.clone()).collect()
        } else if self.apps.iter().any(|a| a.spec.name == target) {
            vec![target.to_string()]
        } else {
            let _ = reply.send(self.unknown_app(target));
            return;
        };
        if let Some(busy) = names
            .iter()
            .find(|n| self.reloads.iter().any(|r| &r.app == *n))
        {
            let _ = reply.send(error(
                ErrorKind::InvalidSpec,
                format!("'{busy}' is being reloaded already; wait for that reload to finish"),
            ));
            return;
        }
        if names.is_empty() {
            let _ = reply.send(Response::Done {
                message: "no app to reload".into(),
            });
            return;
        }
        // Apps are reloaded side by side; the answer goes with the last one to finish... kept
        // simple: with the last app's reload.
        let last = names.len() - 1;
        let mut reply = Some(reply);
        for (n, name) in names.into_iter().enumerate() {
            let mut queue: Vec<(bool, u32, u32)> = self
                .apps
                .iter()
                .filter(|a| a.spec.name == name)
                .flat_map(|a| a.instances.iter().map(|i| (!i.agent, i.index, i.id)))
                .collect();
            // The agent first, as at start.
            queue.sort_unstable();
            crate::log!(
                "reloading app '{name}': {} instance(s), one at a time",
                queue.len()
            );
            self.reloads.push(Reload {
                app: name,
                queue: queue.into_iter().map(|(_, _, id)| id).collect(),
                step: None,
                reply: if n == last { reply.take() } else { None },
            });
        }
    }

    /// Moves every reload as far as it can go now.
    fn advance_reloads(&mut self) {
        let mut n = 0;
        while n < self.reloads.len() {
            match self.advance_reload(n) {
                Some(response) => {
                    let reload = self.reloads.remove(n);
                    if let Some(reply) = reload.reply {
                        let _ = reply.send(response);
                    }
                }
                None => n += 1,
            }
        }
    }

    /// One reload's next steps; its final answer once it is over.
    fn advance_reload(&mut self, n: usize) -> Option<Response> {
        loop {
            let Some(step) = self.reloads[n].step else {
                let Some(id) = self.reloads[n].queue.pop_front() else {
                    let ids = self.app_ids(&self.reloads[n].app);
                    return Some(self.report(&ids));
                };
                let Some(inst) = self.instance_mut(id) else {
                    continue;
                };
                inst.tracker.reset();
                inst.token += 1;
                let old = inst.process.take();
                let old_pid = old.as_ref().map(|p| p.pid);
                if let Some(process) = old {
                    self.draining.push(Draining { id, process });
                }
                self.spawn(id);
                self.reloads[n].step = Some(ReloadStep {
                    id,
                    old: old_pid,
                    old_signaled: false,
                });
                continue;
            };
            let Some((a, i)) = self.locate(step.id) else {
                self.reloads[n].step = None;
                continue;
            };
            let status = self.apps[a].instances[i].status;
            if !step.old_signaled {
                match status {
                    Status::Starting => return None,
                    Status::Online => {
                        if let Some(old) = step.old {
                            self.retire(step.id, old);
                        }
                        self.reloads[n].step = Some(ReloadStep {
                            old_signaled: true,
                            ..step
                        });
                        continue;
                    }
                    _ => return Some(self.roll_back(n, step)),
                }
            }
            let old_gone = step.old.is_none_or(|old| {
                !self.draining.iter().any(|d| d.process.pid == old)
                    && !self.lingering.iter().any(|l| l.pgid == old)
            });
            if !old_gone {
                return None;
            }
            self.reloads[n].step = None;
        }
    }

    /// Stops a replaced process: the stop signal to its group, SIGKILL after the kill timeout.
    fn retire(&mut self, id: u32, pid: u32) {
        let Some((a, _)) = self.locate(id) else {
            return;
        };
        let stop_signal = self.apps[a].spec.stop_signal;
        let kill_timeout = Duration::from_millis(self.apps[a].spec.kill_timeout_ms);
        if let Some(draining) = self.draining.iter_mut().find(|d| d.process.pid == pid) {
            let timer = draining.process.ask_to_stop(id, stop_signal, true);
            self.after(kill_timeout, timer);
        }
    }

    /// The new process of a reload step failed: the old one (still running, never signaled)
    /// serves again, the rest of the reload is called off, and the answer says why.
    fn roll_back(&mut self, n: usize, step: ReloadStep) -> Response {
        let app = self.reloads[n].app.clone();
        self.reloads[n].queue.clear();
        let Some((a, i)) = self.locate(step.id) else {
            return error(
                ErrorKind::Spawn,
                format!("reload of '{app}' stopped: an instance was deleted meanwhile"),
            );
        };
        let index = self.apps[a].instances[i].index;
        let why = self.apps[a].instances[i]
            .last_exit
            .clone()
            .unwrap_or_else(|| "failed".into());
        // Unless the user stopped the instance meanwhile (then the old process goes too).
        let wanted = self.apps[a].instances[i].want_running;
        let restored = step.old.filter(|_| wanted).and_then(|old| {
            let k = self.draining.iter().position(|d| d.process.pid == old)?;
            Some(self.draining.swap_remove(k).process)
        });
        let inst = &mut self.apps[a].instances[i];
        // Cancel the new process's pending restart; if it is still up, it goes.
        inst.token += 1;
        let failed = inst.process.take();
        let kept = restored.is_some();
        if let Some(process) = restored {
            // The old process serves again: its own start time counts for min_uptime again, and
            // the failure is what `describe` shows.
            let started = self
                .epoch
                .elapsed()
                .saturating_sub(process.started.elapsed());
            inst.tracker.reset();
            inst.tracker.on_spawn(started);
            inst.last_exit = Some(format!("a reload failed: its new process {why}"));
            inst.process = Some(process);
            inst.status = Status::Online;
            inst.want_running = true;
        }
        if let Some(process) = failed {
            let _ = corral_sys::kill_group(process.pid, 9);
            self.draining.push(Draining {
                id: step.id,
                process,
            });
        }
        crate::log!("reload of app '{app}' stopped at instance {index}: {why}");
        let outcome = if kept {
            "The old processes keep serving: fix the cause (`corral logs` shows it) and reload again"
        } else if step.old.is_some() {
            "Its old process had exited meanwhile, so that instance is down: fix the cause and run `corral restart`"
        } else {
            "That instance was not running before the reload either"
        };
        error(
            ErrorKind::Spawn,
            format!(
                "reload of '{app}' stopped at instance {index}: its new process {why}. {outcome}"
            ),
        )
    }

    fn apply(&mut self, id: u32, decision: Decision) {
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        let name = self.apps[a].spec.name.clone();
        let inst = &mut self.apps[a].instances[i];
        match decision {
            Decision::Stay => inst.status = Status::Stopped,
            Decision::Restart { after, .. } if after.is_zero() => self.respawn(id),
            Decision::Restart { after, .. } => {
                inst.status = Status::BackingOff;
                let token = inst.token;
                self.after(after, Event::RestartTimer { id, token });
            }
            Decision::Errored { unstable_restarts } => {
                inst.status = Status::Errored;
                let last = inst.last_exit.clone().unwrap_or_default();
                let message = format!(
                    "crash loop: {last}, after {unstable_restarts} restart(s) in a row that each \
                     ended within min_uptime; left stopped. Read `corral logs {name}`, fix the \
                     cause, then run `corral restart {name}`"
                );
                crate::log!("app '{name}' instance {}: {message}", inst.index);
                inst.last_exit = Some(message);
            }
        }
    }

    fn schedule_linger_tick(&mut self) {
        if !self.linger_tick_pending {
            self.linger_tick_pending = true;
            self.after(LINGER_POLL, Event::LingerTick);
        }
    }

    fn linger_tick(&mut self) {
        self.linger_tick_pending = false;
        let now = Instant::now();
        self.lingering.retain_mut(|l| {
            if !stats::group_has_live_members(l.pgid) {
                return false;
            }
            if !l.killed && now >= l.kill_at {
                crate::log!(
                    "process group {} outlived its leader by the kill timeout: sending SIGKILL",
                    l.pgid
                );
                let _ = corral_sys::kill_group(l.pgid, 9);
                l.killed = true;
            }
            true
        });
        if !self.lingering.is_empty() {
            self.schedule_linger_tick();
        }
    }

    fn after(&self, delay: Duration, event: Event) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event);
        });
    }

    // ---- waiting for instances to be down ----

    fn is_down(&self, id: u32) -> bool {
        match self.locate(id) {
            None => true,
            Some((a, i)) => {
                self.apps[a].instances[i].process.is_none()
                    && !self.draining.iter().any(|d| d.id == id)
                    && !self.lingering.iter().any(|l| l.instance == id)
            }
        }
    }

    /// Tells each proxy the workers it may relay to now: those online (a draining, stopping or
    /// starting process gets no new connection).
    fn update_routers(&self) {
        for app in &self.apps {
            for server in app.node_servers.values() {
                let Some(balancer) = &server.balancer else {
                    continue;
                };
                let ready = app
                    .instances
                    .iter()
                    .filter(|i| i.status == Status::Online && !i.agent)
                    .filter_map(|i| i.process.as_ref())
                    .filter(|p| server.members.contains(&p.pid))
                    .filter_map(|p| p.conduit.clone())
                    .collect();
                balancer.set(ready);
            }
            if let Some(balancer) = &app.balancer {
                let ready = app
                    .instances
                    .iter()
                    .filter(|i| i.status == Status::Online && !i.agent)
                    .filter_map(|i| i.process.as_ref()?.conduit.clone())
                    .collect();
                balancer.set(ready);
            }
            let Some(router) = &app.router else { continue };
            let ready = app
                .instances
                .iter()
                .filter(|i| i.status == Status::Online && !i.agent)
                .filter_map(|i| i.process.as_ref()?.port)
                .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .collect();
            router.set(ready);
        }
    }

    /// Answers each `scale` whose new instances are all online, or one of which failed.
    fn settle_ready_waiters(&mut self) {
        let mut n = 0;
        while n < self.ready_waiters.len() {
            let waiter = &self.ready_waiters[n];
            let mut failed = None;
            let mut pending = false;
            for &id in &waiter.ids {
                let Some((a, i)) = self.locate(id) else {
                    continue;
                };
                let inst = &self.apps[a].instances[i];
                match inst.status {
                    Status::Online => {}
                    Status::Starting => pending = true,
                    _ => {
                        let why = inst
                            .last_exit
                            .clone()
                            .unwrap_or_else(|| inst.status.to_string());
                        failed = Some((inst.index, why));
                    }
                }
            }
            if pending && failed.is_none() {
                n += 1;
                continue;
            }
            let waiter = self.ready_waiters.swap_remove(n);
            let response = match failed {
                None => {
                    let ids = self.app_ids(&waiter.app);
                    self.report(&ids)
                }
                Some((index, why)) => error(
                    ErrorKind::Spawn,
                    format!(
                        "'{}' was scaled up, but its new instance {index} did not become ready:                          {why}. It is restarted by its restart policy; `corral logs {}` shows why",
                        waiter.app, waiter.app
                    ),
                ),
            };
            let _ = waiter.reply.send(response);
        }
    }

    fn settle_waiters(&mut self) {
        let mut n = 0;
        while n < self.waiters.len() {
            if self.waiters[n].ids.iter().all(|&id| self.is_down(id)) {
                let waiter = self.waiters.swap_remove(n);
                self.complete(waiter);
            } else {
                n += 1;
            }
        }
    }

    fn complete(&mut self, waiter: Waiter) {
        match waiter.then {
            Then::Report(ids, reply) => {
                let _ = reply.send(self.report(&ids));
            }
            Then::Done(message, reply) => {
                let _ = reply.send(Response::Done { message });
            }
            Then::StartAgain(ids, reply) => {
                for &id in &waiter.ids {
                    self.spawn(id);
                }
                let _ = reply.send(self.report(&ids));
            }
            Then::Remove(message, reply) => {
                for app in &mut self.apps {
                    app.instances.retain(|inst| {
                        let remove = waiter.ids.contains(&inst.id);
                        if remove {
                            inst.out.close();
                            inst.err.close();
                        }
                        !remove
                    });
                }
                self.apps.retain(|a| !a.instances.is_empty());
                let _ = reply.send(Response::Done { message });
            }
        }
    }

    // ---- reporting ----

    fn report(&mut self, ids: &[u32]) -> Response {
        let mut instances: Vec<InstanceInfo> = ids.iter().filter_map(|&id| self.info(id)).collect();
        let draining: Vec<(u32, u32, Duration)> = self
            .draining
            .iter()
            .filter(|d| ids.contains(&d.id))
            .map(|d| (d.id, d.process.pid, d.process.started.elapsed()))
            .collect();
        for (id, pid, uptime) in draining {
            if let Some(mut row) = instances.iter().find(|i| i.id == id).cloned() {
                row.pid = Some(pid);
                row.status = Status::Draining;
                row.uptime_ms = Some(uptime.as_millis() as u64);
                row.cpu_percent = self.cpu.percent(pid, uptime);
                row.memory_bytes = stats::resident_bytes(pid).unwrap_or(0);
                row.last_exit = None;
                instances.push(row);
            }
        }
        let live: Vec<u32> = self
            .apps
            .iter()
            .flat_map(|a| {
                a.instances
                    .iter()
                    .filter_map(|i| i.process.as_ref().map(|p| p.pid))
            })
            .chain(self.draining.iter().map(|d| d.process.pid))
            .collect();
        self.cpu.retain(|pid| live.contains(&pid));
        Response::Instances { instances }
    }

    fn info(&mut self, id: u32) -> Option<InstanceInfo> {
        let (a, i) = self.locate(id)?;
        let app = &self.apps[a];
        let inst = &app.instances[i];
        let (pid, uptime) = inst
            .process
            .as_ref()
            .map(|p| (p.pid, p.started.elapsed()))
            .unzip();
        let (cpu_percent, memory_bytes) = match (pid, uptime) {
            (Some(pid), Some(uptime)) => (
                self.cpu.percent(pid, uptime),
                stats::resident_bytes(pid).unwrap_or(0),
            ),
            _ => (0.0, 0),
        };
        Some(InstanceInfo {
            id,
            app: app.spec.name.clone(),
            instance: inst.index,
            pid,
            status: inst.status,
            uptime_ms: uptime.map(|u| u.as_millis() as u64),
            restarts: inst.tracker.total_restarts(),
            last_restart: None,
            unstable_restarts: inst.tracker.unstable_restarts(),
            cpu_percent,
            memory_bytes,
            last_exit: inst.last_exit.clone(),
            role: if inst.agent {
                corral_proto::Role::Agent
            } else {
                corral_proto::Role::Worker
            },
            listen: app
                .listeners
                .iter()
                .chain(app.node_servers.values().map(|s| &s.listener))
                .map(|l| l.resolved.clone())
                .collect(),
        })
    }
}

/// Binds what a Node worker's `queryServer` asks for: its address (for the log), the socket,
/// and whether it is UDP; or the errno for the worker and why.
fn node_listen(query: &serde_json::Value) -> Result<(String, Listener, bool), (i32, String)> {
    const EINVAL: i32 = 22;
    let address = match node::wanted(query)? {
        node::Wanted::Datagram(addr) => {
            return listeners::bind_udp(addr)
                .map(|l| (format!("udp {addr}"), l, true))
                .map_err(|e| (e.errno.unwrap_or(EINVAL), e.message));
        }
        node::Wanted::Stream(address) => address,
    };
    let bind = |address: &str| {
        let parsed = listeners::parse(address).map_err(|why| (EINVAL, why))?;
        listeners::bind_parsed(address, parsed).map_err(|e| (e.errno.unwrap_or(EINVAL), e.message))
    };
    match bind(&address) {
        // No IPv6 on this machine: every IPv4 interface, as Node falls back to.
        Err((97 | 99, _)) if address.starts_with("[::]:") => {
            let v4 = address.replacen("[::]", "0.0.0.0", 1);
            bind(&v4).map(|l| (v4, l, false))
        }
        other => other.map(|l| (address, l, false)),
    }
}

/// The daemon's own check of a spec: a client may be anything, not only our CLI.
pub fn validate(spec: &AppSpec) -> Result<(), String> {
    let name = &spec.name;
    if name.is_empty() || name.len() > 128 {
        return Err("the name must have 1 to 128 characters".into());
    }
    if name == "all" || name.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "'{name}' cannot be an app name: `all` and numbers name instances in commands"
        ));
    }
    if name.starts_with('.')
        || name.starts_with('-')
        || name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "'{name}' cannot be an app name: use letters, digits and . _ - @ : (no '/', no spaces, not starting with '.' or '-')"
        ));
    }
    if !spec.script.is_absolute() {
        return Err(format!(
            "the script path {} is not absolute",
            spec.script.display()
        ));
    }
    if !spec.script.exists() {
        return Err(format!(
            "the script {} does not exist",
            spec.script.display()
        ));
    }
    if !spec.cwd.is_dir() {
        return Err(format!(
            "the working directory {} is not a directory",
            spec.cwd.display()
        ));
    }
    if spec.instances == 0 || spec.instances > MAX_INSTANCES {
        return Err(format!(
            "{} instances: give 1 to {MAX_INSTANCES}",
            spec.instances
        ));
    }
    for address in &spec.listen {
        listeners::parse(address)?;
    }
    if spec.is_node_cluster() && !spec.listen.is_empty() {
        return Err(
            "a Node.js cluster app listens where its code calls listen(), on sockets corral \
             binds for it: drop --listen (or run it with --exec-mode fork --lb shared and \
             listen({fd: 3}))"
                .into(),
        );
    }
    if spec.lb == corral_proto::LbMode::Proxy && spec.listen.is_empty() {
        return Err(
            "--lb proxy relays connections from the app's addresses: give at least one --listen"
                .into(),
        );
    }
    if Signal::parse(&spec.stop_signal.to_string()).is_none() {
        return Err(format!("{} is not a signal number", spec.stop_signal));
    }
    Ok(())
}
