//! What the supervisor keeps of an app, an instance and a live process, and how an app's spec
//! becomes the settings of its instances' lifecycle.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_policy::RestartPolicy;
use corral_policy::lifecycle::{ReadyBy, Settings, Slot, StopStyle};
use corral_proto::{AppSpec, LbMode, LifecycleEvent, ReadyWhen};
use tokio::task::AbortHandle;

use super::cluster::NodeServer;
use crate::balance::Balancer;
use crate::listeners::Listener;
use crate::logs::LogSink;
use crate::proxy::Router;

/// How many lifecycle events an app keeps for `describe` and `corral events`.
pub const EVENTS_KEPT: usize = 200;

#[derive(Debug)]
pub struct App {
    pub spec: AppSpec,
    pub base_env: BTreeMap<String, String>,
    pub instances: Vec<Instance>,
    /// Bound once, kept across restarts and reloads, closed with the app.
    pub listeners: Vec<Listener>,
    /// In proxy mode: the ready workers the accept loops relay to.
    pub router: Option<Arc<Router>>,
    /// In rr and least-conn modes: the ready workers the accept loops hand connections to.
    pub balancer: Option<Arc<Balancer>>,
    /// In proxy, rr and least-conn modes: the accept loops, stopped with the app.
    pub accept_loops: Vec<AbortHandle>,
    /// Node cluster apps: the servers their workers asked for, by Node's key; kept, like the
    /// `--listen` sockets, until the app is deleted.
    pub node_servers: BTreeMap<String, NodeServer>,
    /// The lifecycle settings of its workers and of its agent.
    pub settings: Settings,
    pub agent_settings: Settings,
    /// Its last lifecycle events, oldest first.
    pub events: VecDeque<LifecycleEvent>,
    /// Its watched files (`--watch`), once the watcher is set up.
    pub watcher: Option<crate::watch::Watcher>,
    /// The task that says when its cron schedule matches.
    pub cron: Option<AbortHandle>,
}

impl Drop for App {
    fn drop(&mut self) {
        for task in self.accept_loops.iter().chain(&self.cron) {
            task.abort();
        }
    }
}

impl App {
    /// Whether a new process may start beside the one it replaces: the master owns the app's
    /// sockets (`--listen`, or a Node.js cluster's servers). A program that binds its own port
    /// is stopped first, or its replacement would fail with EADDRINUSE.
    pub fn overlaps(&self) -> bool {
        !self.listeners.is_empty() || self.spec.is_node_cluster()
    }

    /// A Node.js cluster app's workers wait for `listen()` once one of them has listened: the
    /// others are servers too, and a reload must not retire an old worker for a new one that
    /// does not serve yet.
    pub fn note_listening(&mut self) {
        if let ReadyBy::Listen {
            uptime_suffices: true,
        } = self.settings.ready_by
        {
            self.settings = settings(&self.spec, false, true);
        }
    }
}

#[derive(Debug)]
pub struct Instance {
    pub id: u32,
    pub index: u32,
    pub slot: Slot,
    pub out: Arc<LogSink>,
    pub err: Arc<LogSink>,
    /// The app's agent (`--agent`), not one of its workers.
    pub agent: bool,
    /// A spawn held back until the app's agent is ready.
    pub held: bool,
    /// An agent asked to stop (and why), which waits for its app's workers to be down first.
    pub stop_after_workers: Option<corral_policy::lifecycle::Cause>,
}

impl Instance {
    /// `agent` or `instance N`, for the log.
    pub fn label(&self) -> String {
        if self.agent {
            "agent".into()
        } else {
            format!("instance {}", self.index)
        }
    }
}

/// The I/O side of one live process: what the daemon holds for it, released when it is gone.
#[derive(Debug)]
pub struct ProcIo {
    /// The instance it belongs to.
    pub id: u32,
    pub started: Instant,
    /// In proxy mode: the loopback port it was told to listen on (`PORT`).
    pub port: Option<u16>,
    /// The reader of its `NOTIFY_SOCKET`, stopped when the process is forgotten.
    pub notify: Option<AbortHandle>,
    /// The master's end of its channel, for writing; closed when the process is forgotten.
    pub conduit: Option<Arc<crate::balance::Conduit>>,
    /// A Node cluster worker: its notice is `disconnect`.
    pub node_cluster: bool,
    /// Its notice is a message (`shutdown_with_message`).
    pub stop_by_message: bool,
    /// The shutdown frame went already.
    pub shutdown_sent: bool,
    /// It got a notice (`disconnect`, a shutdown message, no new connections) before any
    /// signal.
    pub noticed: bool,
    /// Its health check's task, and whether it probes at the slow pace (ready) yet.
    pub health: Option<(AbortHandle, Arc<std::sync::atomic::AtomicBool>)>,
    /// Health check failures in a row.
    pub health_failures: u32,
    /// Its last `WATCHDOG=1`, and whether the watchdog runs yet (it starts once ready).
    pub watchdog: Option<Instant>,
    pub watchdog_fired: bool,
}

impl Drop for ProcIo {
    fn drop(&mut self) {
        if let Some(task) = &self.notify {
            task.abort();
        }
        if let Some((task, _)) = &self.health {
            task.abort();
        }
        // Connections it had not accepted go to the other workers.
        if let Some(conduit) = &self.conduit {
            conduit.close();
        }
    }
}

/// The restart policy of an app.
pub fn restart_policy(spec: &AppSpec) -> RestartPolicy {
    RestartPolicy {
        autorestart: spec.autorestart,
        min_uptime: Duration::from_millis(spec.min_uptime_ms),
        max_restarts: spec.max_restarts,
        restart_delay: Duration::from_millis(spec.restart_delay_ms),
        exp_backoff: spec.exp_backoff_restart_delay_ms.map(Duration::from_millis),
    }
}

/// The lifecycle settings of an app's workers (or, with `agent`, of its agent); `listened`: a
/// worker of this Node.js cluster app has listened already.
pub fn settings(spec: &AppSpec, agent: bool, listened: bool) -> Settings {
    let node_cluster = spec.is_node_cluster() && !agent;
    let ready_by = if agent {
        if spec.wait_ready {
            ReadyBy::Word
        } else {
            ReadyBy::Uptime
        }
    } else if spec.ready_when == ReadyWhen::Probe {
        ReadyBy::Probe
    } else if spec.wait_ready || (spec.needs_ready() && !node_cluster) {
        ReadyBy::Word
    } else if spec.lb == LbMode::Proxy {
        // Ready when its PORT accepts (the proxy's probe says so).
        ReadyBy::Word
    } else if node_cluster {
        ReadyBy::Listen {
            uptime_suffices: !listened,
        }
    } else {
        ReadyBy::Uptime
    };
    // A proxied worker's notice is to get no new connection: its stop signal follows once
    // the connections relayed to it are over.
    let proxied = spec.lb == LbMode::Proxy && !agent;
    let stop = if spec.shutdown_with_message || node_cluster || proxied {
        StopStyle::Notice
    } else {
        StopStyle::Signal
    };
    Settings {
        restart: restart_policy(spec),
        kill_timeout: Duration::from_millis(spec.kill_timeout_ms),
        ready_by,
        ready_timeout: Duration::from_millis(spec.listen_timeout_ms),
        stop,
        stop_exit_codes: spec.stop_exit_codes.clone(),
        not_ready: not_ready_hint(spec, agent),
    }
}

/// What a process ended for not being ready failed to do, with the way out.
fn not_ready_hint(spec: &AppSpec, agent: bool) -> String {
    if agent || spec.wait_ready {
        "did not say it is ready".into()
    } else if spec.ready_when == ReadyWhen::Probe {
        let probe = spec
            .health
            .as_ref()
            .map_or_else(|| "its health check".to_string(), |h| h.probe.to_string());
        format!("did not pass its probe ({probe})")
    } else if spec.lb == LbMode::Proxy {
        "did not accept connections on its PORT".into()
    } else if spec.needs_ready() {
        format!(
            "did not say it is ready on its channel (with --lb {}, a worker takes its \
             connections from its channel, as corral-worker's incoming() does; a program that \
             accepts on an inherited socket wants --lb shared, one that listens on PORT --lb \
             proxy)",
            spec.lb
        )
    } else {
        "did not say it is ready".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use corral_proto::ExecMode;

    fn spec(edit: impl FnOnce(&mut AppSpec)) -> AppSpec {
        let mut spec = AppSpec::new("a".into(), "/a".into(), "/".into());
        edit(&mut spec);
        spec
    }

    #[test]
    fn readiness_follows_what_the_app_can_say() {
        let plain = spec(|_| {});
        assert_eq!(settings(&plain, false, false).ready_by, ReadyBy::Uptime);
        let rr = spec(|s| s.listen = vec!["127.0.0.1:0".into()]);
        assert_eq!(settings(&rr, false, false).ready_by, ReadyBy::Word);
        let node = spec(|s| {
            s.interpreter = Some("node".into());
            s.exec_mode = ExecMode::Cluster;
        });
        let before = settings(&node, false, false);
        assert_eq!(
            before.ready_by,
            ReadyBy::Listen {
                uptime_suffices: true
            }
        );
        assert_eq!(before.stop, StopStyle::Notice);
        assert_eq!(
            settings(&node, false, true).ready_by,
            ReadyBy::Listen {
                uptime_suffices: false
            }
        );
        // The agent of a Node cluster app is a plain process.
        let agent = settings(&node, true, false);
        assert_eq!(
            (agent.ready_by, agent.stop),
            (ReadyBy::Uptime, StopStyle::Signal)
        );
        let strict = spec(|s| {
            s.interpreter = Some("node".into());
            s.exec_mode = ExecMode::Cluster;
            s.wait_ready = true;
        });
        assert_eq!(settings(&strict, false, false).ready_by, ReadyBy::Word);
        let probe = spec(|s| s.ready_when = ReadyWhen::Probe);
        assert_eq!(settings(&probe, false, false).ready_by, ReadyBy::Probe);
    }
}
