//! What the supervisor reacts to: every happening reaches it as one [`Event`] on its channel
//! (a client's request, a reaped child, a timer, a worker's word). The tasks that produce them
//! (the control connections, the reaper, the channel and notify readers, the probes) depend on
//! this module, not on the supervisor.

use std::sync::Arc;

use corral_policy::lifecycle::Timer;
use corral_proto::channel::WorkerMessage;
use corral_proto::{LifecycleEvent, Request, Response, Stream, Streams};
use corral_sys::ExitKind;
use tokio::sync::{broadcast, oneshot};

use crate::logs::LogSink;
use crate::node;

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
    /// A client wants the lifecycle events of a target.
    Events {
        /// `None` for all.
        target: Option<String>,
        /// How many recent events first.
        lines: usize,
        /// The recent events and the live feed, or an error response.
        reply: oneshot::Sender<Result<EventFeed, Response>>,
    },
    /// A child ended and was reaped.
    Reaped {
        /// Its pid.
        pid: u32,
        /// How it ended.
        exit: ExitKind,
    },
    /// A timer of an instance's lifecycle fired.
    Timer {
        /// Instance id.
        id: u32,
        /// Which.
        timer: Timer,
    },
    /// Time to look at process groups left behind by ended leaders.
    LingerTick,
    /// A worker said something on its channel (or its notify socket, or its port answered).
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
    /// A worker left connections handed to it unacknowledged past their deadline
    /// (`answers: false`), or acknowledges again (`true`); said by its app's balancer.
    Responsive {
        /// The worker's process.
        pid: u32,
        /// Whether it answers.
        answers: bool,
    },
    /// A process sent `WATCHDOG=1` on its notify socket.
    Watchdog {
        /// The process.
        pid: u32,
    },
    /// Time to look at a process's watchdog pings.
    WatchdogCheck {
        /// The process.
        pid: u32,
    },
    /// A health probe of a process is over.
    Probed {
        /// The process.
        pid: u32,
        /// What it found.
        outcome: crate::probe::Outcome,
    },
    /// Time to sample the memory of the apps with a memory limit.
    MemoryTick,
    /// An app's cron schedule matched.
    Cron {
        /// The app.
        app: String,
    },
    /// Watched files of an app changed.
    Watched {
        /// The app.
        app: String,
        /// What changed.
        change: crate::watch::Change,
    },
    /// An app's watcher is set up (it walks the tree off the supervisor's task).
    WatchStarted {
        /// The app.
        app: String,
        /// The watcher, or why it could not watch.
        watcher: Result<crate::watch::Watcher, crate::watch::WatchError>,
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

/// What a client following lifecycle events gets: the recent ones, then the live feed, to be
/// filtered with `wants`.
#[derive(Debug)]
pub struct EventFeed {
    /// The most recent events of the target, oldest first.
    pub recent: Vec<LifecycleEvent>,
    /// Every event from now on (a follower that falls behind misses some and is told).
    pub live: broadcast::Receiver<LifecycleEvent>,
    /// The app, or the instance id, the client asked for; `None` for all.
    pub filter: Option<EventFilter>,
}

/// Which events a follower wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFilter {
    /// One app's.
    App(String),
    /// One instance's.
    Id(u32),
}

impl EventFilter {
    /// Whether `event` passes.
    pub fn wants(&self, event: &LifecycleEvent) -> bool {
        match self {
            EventFilter::App(name) => &event.app == name,
            EventFilter::Id(id) => event.id == *id,
        }
    }
}
