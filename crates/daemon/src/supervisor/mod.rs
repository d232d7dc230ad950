//! The supervisor: the one task that owns every app and instance. Everything that happens reaches
//! it as an [`Event`] (a client request, a reaped child, a timer), and it never awaits, so one
//! slow client or child cannot stall it.
//!
//! It decides nothing about an instance's life itself: each instance is a
//! [`corral_policy::lifecycle::Slot`], fed every input, and this module is the I/O shell that
//! carries out the actions the slot returns (spawn, signal, kill the group, set a timer, route).
//! Its parts, by what they own:
//! - [`commands`]: the client's requests;
//! - [`shell`]: feeding slots and carrying out their actions; reaped children, lingering groups,
//!   the agent's order (first up, last down);
//! - [`spawn`]: building and starting a process;
//! - [`reload`]: rolling reloads, one instance at a time, in the order `corral-policy` keeps;
//! - [`cluster`]: Node.js's cluster protocol (the servers a worker's `listen()` asks for);
//! - [`routing`]: which processes get connections;
//! - [`waiters`]: answers that wait for instances to be down, restarted or ready;
//! - [`journal`]: lifecycle events, for `describe`, `corral events` and the log;
//! - [`report`]: what `ls` and `describe` show.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::{ErrorKind, Response};
use tokio::sync::mpsc;

use crate::bus::Bus;
use crate::home::Home;
use crate::stats::CpuSampler;

pub use crate::inbox::{Event, LogSource};
pub use validate::validate;

mod app;
mod cluster;
mod commands;
mod journal;
mod policies;
mod reload;
mod report;
mod routing;
mod shell;
mod spawn;
mod validate;
mod waiters;

use app::{App, ProcIo};

/// First argument that makes the `corral` binary an exec shim setting `LISTEN_PID`.
pub const ACTIVATE_SHIM: &str = "__activate";
/// Most instances one app may have.
pub const MAX_INSTANCES: u32 = 1024;
/// The instance index of an app's agent (its log files say `agent` instead).
pub const AGENT_INDEX: u32 = u32::MAX;

/// The state of the daemon's apps.
#[derive(Debug)]
pub struct Supervisor {
    home: Home,
    apps: Vec<App>,
    next_id: u32,
    events: mpsc::UnboundedSender<Event>,
    /// Every live process the daemon started for an instance, by pid.
    procs: HashMap<u32, ProcIo>,
    lingering: Vec<shell::Lingering>,
    linger_tick_pending: bool,
    waiters: Vec<waiters::Waiter>,
    ready_waiters: Vec<waiters::ReadyWaiter>,
    reloads: Vec<reload::ReloadGroup>,
    journal: journal::Journal,
    /// Instances fed since the last settle: only their apps are looked at again.
    touched: BTreeSet<u32>,
    /// Apps whose routing changed since the last settle.
    reroute: BTreeSet<String>,
    notify_serial: u64,
    epoch: Instant,
    cpu: CpuSampler,
    shutting_down: bool,
    bus: Arc<Bus>,
    /// Where the exits of exec probes go.
    exits: crate::probe::Exits,
    memory_tick_pending: bool,
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::error(kind, message)
}

impl Supervisor {
    /// A supervisor with no apps; `events` is the sender of the channel [`Supervisor::run`] reads.
    pub fn new(home: Home, events: mpsc::UnboundedSender<Event>, bus: Arc<Bus>) -> Supervisor {
        Supervisor {
            home,
            apps: Vec::new(),
            next_id: 0,
            events,
            procs: HashMap::new(),
            lingering: Vec::new(),
            linger_tick_pending: false,
            waiters: Vec::new(),
            ready_waiters: Vec::new(),
            reloads: Vec::new(),
            journal: journal::Journal::new(),
            touched: BTreeSet::new(),
            reroute: BTreeSet::new(),
            notify_serial: 0,
            epoch: Instant::now(),
            cpu: CpuSampler::default(),
            shutting_down: false,
            bus,
            exits: crate::probe::Exits::default(),
            memory_tick_pending: false,
        }
    }

    /// The exits of exec probes arrive through `exits` (the reaper claims them).
    #[must_use]
    pub fn with_exits(mut self, exits: crate::probe::Exits) -> Supervisor {
        self.exits = exits;
        self
    }

    /// Handles events until every sender is gone.
    pub async fn run(mut self, mut events: mpsc::UnboundedReceiver<Event>) {
        while let Some(event) = events.recv().await {
            self.handle(event);
            self.settle();
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
            Event::Events {
                target,
                lines,
                reply,
            } => {
                let _ = reply.send(self.event_feed(target.as_deref(), lines));
            }
            Event::Reaped { pid, exit } => self.reaped(pid, exit),
            Event::Timer { id, timer } => {
                self.feed(id, corral_policy::lifecycle::Input::Timer(timer));
            }
            Event::LingerTick => self.linger_tick(),
            Event::Worker { pid, message } => self.worker_message(pid, message),
            Event::ChannelFault { pid, problem } => self.channel_fault(pid, &problem),
            Event::Node { pid, message } => self.node_message(pid, message),
            Event::Responsive { pid, answers } => {
                if let Some(id) = self.procs.get(&pid).map(|p| p.id) {
                    self.feed(
                        id,
                        corral_policy::lifecycle::Input::Responsive { pid, answers },
                    );
                }
            }
            event => self.policy_event(event),
        }
    }

    /// What follows from the instances just fed, for their apps only: the agent's order, the
    /// answers waiting on them, the reloads, the routing.
    fn settle(&mut self) {
        // Releasing a held worker or stopping an agent feeds more slots: a few rounds at most.
        for _ in 0..4 {
            let touched = std::mem::take(&mut self.touched);
            if touched.is_empty() {
                break;
            }
            let apps: BTreeSet<usize> = touched
                .iter()
                .filter_map(|&id| self.locate(id).map(|(a, _)| a))
                .collect();
            for &a in apps.iter().rev() {
                // Whether it serves at all may have changed (see `update_routes`).
                self.reroute.insert(self.apps[a].spec.name.clone());
                self.agent_order(a);
            }
            self.settle_waiters();
            self.advance_reloads();
            self.settle_ready_waiters();
        }
        for name in std::mem::take(&mut self.reroute) {
            if let Some(a) = self.apps.iter().position(|a| a.spec.name == name) {
                self.update_routes(a);
            }
        }
    }

    fn after(&self, delay: Duration, event: Event) {
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = events.send(event);
        });
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

    fn instance(&self, id: u32) -> Option<&app::Instance> {
        let (a, i) = self.locate(id)?;
        Some(&self.apps[a].instances[i])
    }

    fn instance_mut(&mut self, id: u32) -> Option<&mut app::Instance> {
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
}
