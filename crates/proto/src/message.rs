//! The messages of the control protocol.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`crate::PROTOCOL_VERSION`] of the client.
    pub protocol: u32,
    /// Package version of the client, for messages.
    pub version: String,
}

/// The daemon's answer to [`Hello`] when it speaks the client's protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// [`crate::PROTOCOL_VERSION`] of the daemon.
    pub protocol: u32,
    /// Package version of the daemon.
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
}

/// What a client asks of the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Is the daemon there?
    Ping,
    /// Clear the restart counters of instances (PM2's `reset`).
    Reset {
        /// `all`, an app name or an instance id.
        target: String,
    },
    /// Recent lifecycle events, and with `follow` every new one until the client leaves.
    Events {
        /// An app name or instance id; `None` for every app.
        target: Option<String>,
        /// How many of the most recent events to send first.
        lines: usize,
        /// Keep streaming new events.
        follow: bool,
    },
    /// Start new apps. Fails as a whole, starting nothing, when any spec is refused.
    Start {
        /// The apps, validated by the client and again by the daemon.
        apps: Vec<AppSpec>,
        /// The caller's environment, under the apps' own `env`. Kept in memory, never saved.
        base_env: BTreeMap<String, String>,
    },
    /// The state of every instance.
    List,
    /// Everything about one app.
    Describe {
        /// An app name or an instance id.
        target: String,
    },
    /// Stop instances and keep them listed.
    Stop {
        /// `all`, an app name or an instance id.
        target: String,
    },
    /// Stop (if running) and start instances again; starts stopped and errored ones too.
    Restart {
        /// `all`, an app name or an instance id.
        target: String,
    },
    /// Replace every instance one at a time, each new one ready before its old one stops.
    Reload {
        /// `all` or an app name.
        target: String,
    },
    /// Stop instances and forget them.
    Delete {
        /// `all`, an app name or an instance id.
        target: String,
    },
    /// Change an app's number of instances.
    Scale {
        /// The app name.
        app: String,
        /// The new number of instances, at least 1.
        instances: u32,
    },
    /// Send a signal to the main process of instances.
    Signal {
        /// `all`, an app name or an instance id.
        target: String,
        /// The signal number.
        signal: i32,
    },
    /// Recent log lines, and with `follow` every new one until the client leaves.
    Logs {
        /// `None` for every app.
        target: Option<String>,
        /// How many of the last lines of each file to send first.
        lines: usize,
        /// Keep streaming new lines.
        follow: bool,
        /// Which streams.
        streams: Streams,
    },
    /// Empty the log files.
    Flush {
        /// `None` for every app.
        target: Option<String>,
    },
    /// Write the list of apps to `dump.json`.
    Save {
        /// Replace a dump that lists apps with an empty list.
        force: bool,
    },
    /// Start the apps of `dump.json` that are not running yet.
    Resurrect {
        /// The caller's environment, as in [`Request::Start`].
        base_env: BTreeMap<String, String>,
    },
    /// Stop every app, then the daemon.
    Kill,
    /// Send a message to the running instances of a target: `process.on('message')` in Node
    /// apps, a `message` frame on the channel of others.
    Send {
        /// App name, instance id, or `all`.
        target: String,
        /// Any JSON.
        data: serde_json::Value,
        /// Wait for the instance's answer (one instance only), at most `timeout_ms`.
        #[serde(default)]
        reply: bool,
        /// How long to wait for the answer.
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// A shared-state operation on an app's store (`corral state`).
    State {
        /// The app whose store; `None`: the store every app uses (the daemon's memory when
        /// there is no app).
        app: Option<String>,
        /// What to do.
        call: crate::channel::StateCall,
    },
}

/// Which of an instance's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Streams {
    /// stdout and stderr.
    #[default]
    Both,
    /// stdout only.
    Out,
    /// stderr only.
    Err,
}

/// One output stream of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// The program's stdout.
    Out,
    /// The program's stderr.
    Err,
}

impl Stream {
    /// `out` or `err`, as in the log file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Out => "out",
            Stream::Err => "err",
        }
    }
}

/// The daemon's answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Ping`].
    Pong {
        /// The daemon's process id.
        pid: u32,
        /// The daemon's package version.
        version: String,
        /// How long the daemon has been running.
        uptime_ms: u64,
    },
    /// The instances a request touched (or every instance, for [`Request::List`]).
    Instances {
        /// One entry per instance, ordered by id.
        instances: Vec<InstanceInfo>,
    },
    /// Answer to [`Request::Describe`].
    App(Box<AppInfo>),
    /// A batch of log lines.
    LogLines {
        /// The lines, in the order they were written per file.
        lines: Vec<LogLine>,
    },
    /// The end of a log answer without `follow`.
    LogEnd,
    /// A batch of lifecycle events, oldest first.
    Events {
        /// The events.
        events: Vec<crate::LifecycleEvent>,
    },
    /// A value: a state operation's result, an instance's answer to `send --reply`.
    Value {
        /// Any JSON.
        value: serde_json::Value,
    },
    /// Something was done; the text says what.
    Done {
        /// One line for the user.
        message: String,
    },
    /// The request failed.
    Error {
        /// What kind of failure.
        kind: ErrorKind,
        /// What is wrong, where, and what to do, for the user.
        message: String,
    },
}

impl Response {
    /// An error response.
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

/// Kinds of [`Response::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The client and daemon speak different protocol versions.
    VersionMismatch,
    /// The peer is another user.
    PermissionDenied,
    /// The frame was too large or not a valid message.
    BadFrame,
    /// No app or instance matches the target.
    UnknownTarget,
    /// An app of that name exists already.
    DuplicateName,
    /// An app description was refused.
    InvalidSpec,
    /// A file could not be read or written.
    Io,
    /// The program could not be started.
    Spawn,
    /// The daemon is shutting down.
    ShuttingDown,
}

/// How to run one app: everything `start` and `corral.toml` can say, and what `save` keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// Unique name.
    pub name: String,
    /// Absolute path of the script or binary.
    pub script: PathBuf,
    /// Arguments after the script.
    #[serde(default)]
    pub args: Vec<String>,
    /// Program that runs the script (`node`, `python3`, ...); `None` executes the script itself.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// Arguments given to the interpreter before the script.
    #[serde(default)]
    pub interpreter_args: Vec<String>,
    /// Working directory, absolute.
    pub cwd: PathBuf,
    /// Environment the user gave for this app (over the caller's environment).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Number of instances, at least 1.
    #[serde(default = "defaults::instances")]
    pub instances: u32,
    /// Restart after an unexpected exit.
    #[serde(default = "defaults::yes")]
    pub autorestart: bool,
    /// An exit before this uptime counts as unstable.
    #[serde(default = "defaults::min_uptime_ms")]
    pub min_uptime_ms: u64,
    /// Unstable restarts in a row before the instance is `errored`.
    #[serde(default = "defaults::max_restarts")]
    pub max_restarts: u32,
    /// Delay before a restart.
    #[serde(default)]
    pub restart_delay_ms: u64,
    /// Initial delay of exponential backoff between restarts (PM2's `exp_backoff_restart_delay`).
    #[serde(default)]
    pub exp_backoff_restart_delay_ms: Option<u64>,
    /// Time from the first stop notice (or the stop signal) to SIGKILL of the process group.
    #[serde(default = "defaults::kill_timeout_ms")]
    pub kill_timeout_ms: u64,
    /// Signal that asks the program to stop.
    #[serde(default = "defaults::stop_signal")]
    pub stop_signal: i32,
    /// Prefix each log line with its UTC time.
    #[serde(default)]
    pub time: bool,
    /// Rotate a log file when it would grow past this many bytes; 0 never rotates.
    #[serde(default = "defaults::log_max_size")]
    pub log_max_size: u64,
    /// Rotated files kept per log.
    #[serde(default = "defaults::log_keep")]
    pub log_keep: u32,
    /// Addresses the master listens on for the app: `127.0.0.1:8080`, `[::1]:0`, `unix:/path`.
    #[serde(default)]
    pub listen: Vec<String>,
    /// How connections reach the workers.
    #[serde(default)]
    pub lb: LbMode,
    /// Only a `ready` message (not `min_uptime`) makes a worker ready.
    #[serde(default)]
    pub wait_ready: bool,
    /// With `wait_ready`: how long a worker may take to say `ready` before it counts as failed.
    #[serde(default = "defaults::listen_timeout_ms")]
    pub listen_timeout_ms: u64,
    /// For Node.js apps: `cluster` makes corral their cluster primary.
    #[serde(default)]
    pub exec_mode: ExecMode,
    /// Stop by a message on the channel (`'shutdown'` for Node apps, as PM2 sends it; the
    /// `shutdown` frame for others) instead of the stop signal, which follows halfway through
    /// the kill timeout (SIGKILL at its end).
    #[serde(default)]
    pub shutdown_with_message: bool,
    /// The app's agent: one more process, started and ready before the workers, stopped after
    /// them, never given connections, with `CORRAL_ROLE=agent`.
    #[serde(default)]
    pub agent: Option<AgentSpec>,
    /// Where the app's shared state lives.
    #[serde(default)]
    pub state: StateBackend,
    /// Restart an instance gracefully once the resident memory of its whole process group
    /// exceeds this many bytes (PM2's `max_memory_restart`).
    #[serde(default)]
    pub max_memory_restart: Option<u64>,
    /// A cron expression (5 fields, or 6 with seconds first): restart at every match, as a
    /// rolling reload when the app has a master-owned listener (PM2's `cron_restart`).
    #[serde(default)]
    pub cron_restart: Option<String>,
    /// Absolute paths to watch; a change reloads the app (restarts it in fork mode). Empty:
    /// no watching (PM2's `watch`).
    #[serde(default)]
    pub watch: Vec<PathBuf>,
    /// Glob patterns of paths whose changes are ignored, besides `node_modules` and `.git`
    /// (PM2's `ignore_watch`).
    #[serde(default)]
    pub ignore_watch: Vec<String>,
    /// Quiet time after the last change before the reload starts (PM2's `watch_delay`).
    #[serde(default = "defaults::watch_delay_ms")]
    pub watch_delay_ms: u64,
    /// Exit codes that mean "done": such an exit is not restarted and not a crash (PM2's
    /// `stop_exit_codes`).
    #[serde(default)]
    pub stop_exit_codes: Vec<i32>,
    /// A health check; failing, the instance is restarted gracefully.
    #[serde(default)]
    pub health: Option<crate::HealthCheck>,
    /// What makes a new process ready.
    #[serde(default)]
    pub ready_when: crate::ReadyWhen,
    /// With a value, each process must send `WATCHDOG=1` (`sd_notify`) at least this often once
    /// ready, or it is restarted (systemd's `WatchdogSec`); it gets `WATCHDOG_USEC`.
    #[serde(default)]
    pub watchdog_ms: Option<u64>,
}

/// How to run an app's agent. It shares the app's working directory, environment and restart
/// policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Absolute path of the script or binary.
    pub script: PathBuf,
    /// Program that runs the script; `None` executes it itself.
    #[serde(default)]
    pub interpreter: Option<String>,
    /// Arguments given to the interpreter before the script.
    #[serde(default)]
    pub interpreter_args: Vec<String>,
    /// Arguments after the script.
    #[serde(default)]
    pub args: Vec<String>,
}

/// Where an app's shared state (key/value, pub/sub) lives: `memory` (the daemon's, lost when it
/// stops), `saved` (the daemon's, kept in `$CORRAL_HOME/state.json`) or a Redis URL
/// (`redis://host:port/db`, shared by every corral that uses it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum StateBackend {
    /// In the daemon's memory.
    #[default]
    Memory,
    /// In the daemon's memory and saved in its home.
    Saved,
    /// On a Redis server.
    Redis(String),
}

impl fmt::Display for StateBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateBackend::Memory => f.write_str("memory"),
            StateBackend::Saved => f.write_str("saved"),
            StateBackend::Redis(url) => f.write_str(url),
        }
    }
}

impl std::str::FromStr for StateBackend {
    type Err = String;

    fn from_str(text: &str) -> Result<StateBackend, String> {
        match text {
            "memory" => Ok(StateBackend::Memory),
            "saved" => Ok(StateBackend::Saved),
            url if url.starts_with("redis://") => Ok(StateBackend::Redis(url.to_string())),
            other => Err(format!(
                "'{other}' is not a state store: say memory, saved or redis://host:port/db"
            )),
        }
    }
}

impl From<StateBackend> for String {
    fn from(backend: StateBackend) -> String {
        backend.to_string()
    }
}

impl TryFrom<String> for StateBackend {
    type Error = String;

    fn try_from(text: String) -> Result<StateBackend, String> {
        text.parse()
    }
}

impl AppSpec {
    /// Whether the app runs under Node.js: its interpreter is `node`, `nodejs` or `node` and a
    /// version (`node18`), by file name.
    pub fn runs_on_node(&self) -> bool {
        runs_on_node(self.interpreter.as_deref())
    }

    /// Whether corral is the app's Node.js cluster primary.
    pub fn is_node_cluster(&self) -> bool {
        self.runs_on_node() && self.exec_mode == ExecMode::Cluster
    }

    /// Whether only a worker's word makes it ready (not `min_uptime`): asked for with
    /// `wait_ready`, or it takes connections from its channel (it must be reading it), or it is
    /// a Node cluster worker (ready when it listens).
    pub fn needs_ready(&self) -> bool {
        self.wait_ready
            || (self.lb.over_channel() && !self.listen.is_empty())
            || self.is_node_cluster()
    }
}

/// Whether a program run by `interpreter` runs under Node.js: `node`, `nodejs`, or `node` and a
/// version (`node18`), by file name.
pub fn runs_on_node(interpreter: Option<&str>) -> bool {
    interpreter.is_some_and(|i| {
        let name = std::path::Path::new(i)
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default();
        name == "nodejs"
            || name.strip_prefix("node").is_some_and(|version| {
                version
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.' || c == '-')
            })
    })
}

/// How a Node.js app runs (PM2's `exec_mode`); other programs ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExecMode {
    /// Plain processes.
    #[default]
    Fork,
    /// Cluster workers of corral, which speaks Node's cluster protocol as their primary: their
    /// `listen()` calls are answered with the master's sockets.
    Cluster,
}

impl fmt::Display for ExecMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExecMode::Fork => "fork",
            ExecMode::Cluster => "cluster",
        })
    }
}

/// How an app's listening sockets reach its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LbMode {
    /// The master accepts each connection and hands it to the next ready worker over the
    /// worker's channel (a `connection` frame carrying the descriptor); the worker acknowledges
    /// it. Workers must say `ready` before they get any.
    #[default]
    #[serde(rename = "rr")]
    RoundRobin,
    /// As [`LbMode::RoundRobin`], but to the ready worker with the fewest open connections (as the
    /// workers report them closed; round robin among equals).
    LeastConn,
    /// Every worker gets the listening sockets themselves (systemd socket activation:
    /// `LISTEN_FDS`, `LISTEN_PID`, `LISTEN_FDNAMES`, descriptors from 3) and accepts on its own.
    Shared,
    /// Every worker listens on its own loopback port, given in `PORT`; the master accepts on the
    /// app's addresses and relays each connection to the next ready worker, round robin.
    Proxy,
}

impl fmt::Display for LbMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LbMode::RoundRobin => "rr",
            LbMode::LeastConn => "least-conn",
            LbMode::Shared => "shared",
            LbMode::Proxy => "proxy",
        })
    }
}

impl LbMode {
    /// Whether the master hands connections to the workers over their channels.
    pub fn over_channel(self) -> bool {
        matches!(self, LbMode::RoundRobin | LbMode::LeastConn)
    }
}

/// Default values of [`AppSpec`] fields.
pub mod defaults {
    /// One instance.
    pub fn instances() -> u32 {
        1
    }
    /// `true`.
    pub fn yes() -> bool {
        true
    }
    /// One second, as PM2.
    pub fn min_uptime_ms() -> u64 {
        1000
    }
    /// Ten unstable restarts in a row.
    pub fn max_restarts() -> u32 {
        10
    }
    /// 1.6 s, as PM2.
    pub fn kill_timeout_ms() -> u64 {
        1600
    }
    /// SIGTERM.
    pub fn stop_signal() -> i32 {
        15
    }
    /// 10 MiB.
    pub fn log_max_size() -> u64 {
        10 * 1024 * 1024
    }
    /// Five rotated files.
    pub fn log_keep() -> u32 {
        5
    }
    /// Three seconds, as PM2.
    pub fn listen_timeout_ms() -> u64 {
        3000
    }
    /// Half a second of quiet after the last change of a watched file.
    pub fn watch_delay_ms() -> u64 {
        500
    }
}

impl AppSpec {
    /// A spec with every option at its default.
    pub fn new(name: String, script: PathBuf, cwd: PathBuf) -> AppSpec {
        AppSpec {
            name,
            script,
            args: Vec::new(),
            interpreter: None,
            interpreter_args: Vec::new(),
            cwd,
            env: BTreeMap::new(),
            instances: defaults::instances(),
            autorestart: true,
            min_uptime_ms: defaults::min_uptime_ms(),
            max_restarts: defaults::max_restarts(),
            restart_delay_ms: 0,
            exp_backoff_restart_delay_ms: None,
            kill_timeout_ms: defaults::kill_timeout_ms(),
            stop_signal: defaults::stop_signal(),
            time: false,
            log_max_size: defaults::log_max_size(),
            log_keep: defaults::log_keep(),
            listen: Vec::new(),
            lb: LbMode::default(),
            wait_ready: false,
            listen_timeout_ms: defaults::listen_timeout_ms(),
            exec_mode: ExecMode::Fork,
            shutdown_with_message: false,
            agent: None,
            state: StateBackend::Memory,
            max_memory_restart: None,
            cron_restart: None,
            watch: Vec::new(),
            ignore_watch: Vec::new(),
            watch_delay_ms: defaults::watch_delay_ms(),
            stop_exit_codes: Vec::new(),
            health: None,
            ready_when: crate::ReadyWhen::Default,
            watchdog_ms: None,
        }
    }
}

/// Where an instance is in its life. `docs/lifecycle.md` draws every state and what moves an
/// instance between them; `corral_policy::lifecycle` decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Spawned, not yet up for `min_uptime`.
    Starting,
    /// Running and ready.
    Online,
    /// Running, but it left connections handed to it unacknowledged past their deadline: it
    /// gets no new connection until it answers again.
    Unresponsive,
    /// Replaced (by a reload, or because it said it is going down): finishing its work, about to
    /// be stopped; gone from the list once it exits.
    Draining,
    /// Asked to stop; its process group is not gone yet.
    Stopping,
    /// Not running, by request (or autorestart is off).
    Stopped,
    /// Exited; waiting for its restart delay.
    BackingOff,
    /// Crash loop detected (or the program cannot be started): left down until the user acts.
    Errored,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Starting => "starting",
            Status::Online => "online",
            Status::Unresponsive => "unresponsive",
            Status::Draining => "draining",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::BackingOff => "backing-off",
            Status::Errored => "errored",
        })
    }
}

/// One instance as `ls` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Unique id within this daemon.
    pub id: u32,
    /// App name.
    pub app: String,
    /// Index within the app.
    pub instance: u32,
    /// Process id of the running program (also its process group id).
    pub pid: Option<u32>,
    /// Where it is in its life.
    pub status: Status,
    /// Time since the current process started.
    pub uptime_ms: Option<u64>,
    /// Restarts so far, whatever their cause (PM2's `restart_time`); `corral reset` clears it.
    pub restarts: u32,
    /// The cause of the last restart (`crash`, `reload`, `memory`, ...).
    #[serde(default)]
    pub last_restart: Option<String>,
    /// Unstable exits in a row.
    pub unstable_restarts: u32,
    /// CPU use since the previous sample, in percent of one core.
    pub cpu_percent: f64,
    /// Resident memory of the main process.
    pub memory_bytes: u64,
    /// How the previous process ended, or why the instance is errored.
    pub last_exit: Option<String>,
    /// Worker or agent.
    #[serde(default)]
    pub role: Role,
    /// The app's listening addresses, with the ports the kernel chose for port 0.
    #[serde(default)]
    pub listen: Vec<String>,
}

/// What an instance is to its app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// One of the app's workers.
    #[default]
    Worker,
    /// The app's agent (`--agent`).
    Agent,
}

/// Everything about one app, for `describe`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppInfo {
    /// How it is run.
    pub spec: AppSpec,
    /// Its instances.
    pub instances: Vec<InstanceInfo>,
    /// Log files per instance index: (index, stdout path, stderr path).
    pub log_files: Vec<(u32, PathBuf, PathBuf)>,
    /// The app's last lifecycle events, oldest first.
    #[serde(default)]
    pub events: Vec<crate::LifecycleEvent>,
}

/// One line of a program's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// App name.
    pub app: String,
    /// Instance index.
    pub instance: u32,
    /// Which stream.
    pub stream: Stream,
    /// The line, without its newline (invalid UTF-8 replaced).
    pub line: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_is_known_by_its_interpreter_s_name() {
        let spec = |interpreter: &str| {
            let mut spec = AppSpec::new("a".into(), "/a.js".into(), "/".into());
            spec.interpreter = Some(interpreter.into());
            spec
        };
        for node in ["node", "/usr/bin/nodejs", "node18", "/opt/bin/node22.1"] {
            assert!(spec(node).runs_on_node(), "{node}");
        }
        for other in ["nodemon", "python3", "/usr/bin/deno"] {
            assert!(!spec(other).runs_on_node(), "{other}");
        }
        let mut cluster = spec("node");
        cluster.exec_mode = ExecMode::Cluster;
        assert!(cluster.is_node_cluster());
    }
}
