//! The I/O shell around the lifecycle core: every input goes to an instance's slot, and every
//! action the slot returns is carried out here (spawn, a stop step, a timer, routing, an
//! event). Also what only the daemon can see: reaped children, process groups that outlive
//! their leader, and the order of an app's agent (first up, last down).

use std::time::{Duration, Instant};

use corral_policy::lifecycle::{Action, Cause, Exit, Input, Phase, Source, StopStep};
use corral_proto::channel::{MasterMessage, WorkerMessage};
use corral_proto::signal::Signal;
use corral_sys::ExitKind;

use super::Supervisor;
use crate::balance::Codec;
use crate::inbox::Event;
use crate::{node, stats};

const LINGER_POLL: Duration = Duration::from_millis(20);

/// A process group whose leader ended while other members lived on.
#[derive(Debug)]
pub struct Lingering {
    pub pgid: u32,
    pub instance: u32,
    kill_at: Instant,
    killed: bool,
}

pub fn describe_exit(exit: ExitKind) -> String {
    match exit {
        ExitKind::Code(code) => format!("exited with code {code}"),
        ExitKind::Signal(signal) => format!("killed by {}", Signal::describe(signal)),
    }
}

impl Supervisor {
    /// Gives `input` to instance `id`'s slot and carries out what it decides.
    pub(super) fn feed(&mut self, id: u32, input: Input) {
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        let now = self.epoch.elapsed();
        let app = &mut self.apps[a];
        let agent = app.instances[i].agent;
        let settings = if agent {
            &app.agent_settings
        } else {
            &app.settings
        };
        let actions = app.instances[i].slot.handle(settings, input, now);
        self.touched.insert(id);
        for action in actions {
            self.execute(id, action);
        }
    }

    fn execute(&mut self, id: u32, action: Action) {
        match action {
            Action::Spawn => self.spawn_or_hold(id),
            Action::Stop { pid, step } => self.stop_step(id, pid, step),
            Action::SetTimer { after, timer } => self.after(after, Event::Timer { id, timer }),
            Action::Route => {
                if let Some((a, _)) = self.locate(id) {
                    self.reroute.insert(self.apps[a].spec.name.clone());
                }
            }
            Action::Replaced(result) => self.reload_replaced(id, result),
            Action::Event(transition) => self.record(id, transition),
        }
    }

    /// Spawns now, or, for a worker whose app's agent is on its way up, once the agent is
    /// ready (see [`Supervisor::agent_order`]).
    fn spawn_or_hold(&mut self, id: u32) {
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        let app = &self.apps[a];
        let agent_coming = !app.instances[i].agent
            && app.instances.iter().any(|other| {
                other.agent
                    && other.slot.wanted()
                    && matches!(other.slot.phase(), Phase::Starting | Phase::BackingOff)
            });
        if agent_coming {
            self.apps[a].instances[i].held = true;
            return;
        }
        self.spawn_now(id);
    }

    fn spawn_now(&mut self, id: u32) {
        let input = match self.spawn_process(id) {
            Ok(pid) => Input::Spawned { pid },
            Err(e) => Input::SpawnFailed {
                error: e.message,
                permanent: e.permanent,
            },
        };
        self.feed(id, input);
    }

    /// A step of stopping process `pid` of instance `id`.
    fn stop_step(&mut self, id: u32, pid: u32, step: StopStep) {
        let Some((a, _)) = self.locate(id) else {
            return;
        };
        let spec = &self.apps[a].spec;
        let (name, signal, kill_timeout) =
            (spec.name.clone(), spec.stop_signal, spec.kill_timeout_ms);
        let Some(io) = self.procs.get_mut(&pid) else {
            return;
        };
        if step == StopStep::Notice {
            io.noticed = true;
        }
        let step = match (step, &io.conduit) {
            (StopStep::Notice, Some(conduit)) if io.stop_by_message => {
                match conduit.codec() {
                    Codec::Node => conduit.send_line(|_| node::line(&"shutdown".into())),
                    Codec::Corral => conduit.send(&MasterMessage::Shutdown),
                }
                io.shutdown_sent = true;
                return;
            }
            (StopStep::Notice, Some(conduit)) if io.node_cluster => {
                conduit.send_line(node::disconnect);
                return;
            }
            (StopStep::Notice, _) if io.port.is_some() => {
                let port = io.port.expect("checked");
                if let Some(router) = self.apps[a].router.clone() {
                    let limit = Duration::from_millis(kill_timeout / 2);
                    let done = Event::Timer {
                        id,
                        timer: corral_policy::lifecycle::Timer::StopSignal(pid),
                    };
                    let events = self.events.clone();
                    tokio::spawn(crate::proxy::drained(router, port, limit, done, events));
                    return;
                }
                StopStep::Signal
            }
            (StopStep::Notice, _) => StopStep::Signal,
            (step, _) => step,
        };
        match step {
            StopStep::Signal => {
                if let Some(conduit) = io.conduit.as_ref().filter(|_| !io.shutdown_sent)
                    && conduit.codec() == Codec::Corral
                {
                    conduit.send(&MasterMessage::Shutdown);
                    io.shutdown_sent = true;
                }
                if io.noticed && io.port.is_some() {
                    crate::log!(
                        "app '{name}' pid {pid}: no connection is relayed to it any more (or \
                         half its kill timeout passed): sending {}",
                        Signal::describe(signal)
                    );
                } else if io.noticed {
                    crate::log!(
                        "app '{name}' pid {pid} did not exit within {}ms of being asked to \
                         leave: sending {}",
                        kill_timeout / 2,
                        Signal::describe(signal)
                    );
                }
                if let Err(e) = corral_sys::kill_group(pid, signal) {
                    crate::log!("stopping process group {pid}: {e}");
                }
            }
            StopStep::Kill => {
                crate::log!(
                    "app '{name}' pid {pid} did not stop within its kill timeout \
                     ({kill_timeout}ms): sending SIGKILL to its process group"
                );
                let _ = corral_sys::kill_group(pid, 9);
            }
            StopStep::Notice => unreachable!("mapped above"),
        }
    }

    pub(super) fn reaped(&mut self, pid: u32, exit: ExitKind) {
        for app in &mut self.apps {
            for server in app.node_servers.values_mut() {
                server.members.remove(&pid);
            }
        }
        // Otherwise an adopted orphan, or a leftover of a group: reaped, nothing more to do.
        let Some(io) = self.procs.remove(&pid) else {
            return;
        };
        let id = io.id;
        let how = describe_exit(exit);
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        let app = &self.apps[a];
        let inst = &app.instances[i];
        let proc = inst.slot.procs().find(|p| p.pid == pid);
        let signaled = proc.and_then(|p| p.stopping).is_some_and(|s| s.signaled);
        let reason = proc
            .and_then(|p| p.end_reason.as_deref())
            .map(|r| format!("{r}; "))
            .unwrap_or_default();
        if inst.slot.old().iter().any(|p| p.pid == pid) {
            crate::log!("draining pid {pid} of instance {id} {how}");
        } else {
            crate::log!(
                "app '{}' {} (pid {pid}) {reason}{how} after {:.1}s",
                app.spec.name,
                inst.label(),
                io.started.elapsed().as_secs_f64()
            );
        }
        let (signal, kill_timeout) = (app.spec.stop_signal, app.spec.kill_timeout_ms);
        drop(io);
        let group_left = self.reap_group(pid, id, signaled, signal, kill_timeout);
        let exit = match exit {
            ExitKind::Code(code) => Exit::Code(code),
            ExitKind::Signal(signal) => Exit::Signal(signal),
        };
        self.feed(
            id,
            Input::Exited {
                pid,
                exit,
                how,
                group_left,
            },
        );
    }

    /// The leader of group `pgid` is gone; whatever is left of its group goes too (as systemd
    /// does): the stop signal unless it had it already, SIGKILL after the kill timeout. Returns
    /// whether anything was left.
    fn reap_group(
        &mut self,
        pgid: u32,
        id: u32,
        signaled: bool,
        signal: i32,
        kill_ms: u64,
    ) -> bool {
        if !stats::group_has_live_members(pgid) {
            return false;
        }
        if !signaled {
            let _ = corral_sys::kill_group(pgid, signal);
        }
        self.lingering.push(Lingering {
            pgid,
            instance: id,
            kill_at: Instant::now() + Duration::from_millis(kill_ms),
            killed: false,
        });
        self.schedule_linger_tick();
        true
    }

    fn schedule_linger_tick(&mut self) {
        if !self.linger_tick_pending {
            self.linger_tick_pending = true;
            self.after(LINGER_POLL, Event::LingerTick);
        }
    }

    pub(super) fn linger_tick(&mut self) {
        self.linger_tick_pending = false;
        let now = Instant::now();
        let mut gone = Vec::new();
        self.lingering.retain_mut(|l| {
            if !stats::group_has_live_members(l.pgid) {
                gone.push((l.instance, l.pgid));
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
        for (id, pgid) in gone {
            self.feed(id, Input::GroupGone { pid: pgid });
        }
        if !self.lingering.is_empty() {
            self.schedule_linger_tick();
        }
    }

    pub(super) fn worker_message(&mut self, pid: u32, message: WorkerMessage) {
        let Some(id) = self.procs.get(&pid).map(|p| p.id) else {
            return;
        };
        match message {
            WorkerMessage::Ready => {
                let source = Source::Word;
                self.feed(id, Input::Ready { pid, source });
            }
            WorkerMessage::GoingDown { reason } => {
                if let Some((a, i)) = self.locate(id) {
                    crate::log!(
                        "app '{}' {} (pid {pid}) is going down ({reason}): starting its \
                         replacement",
                        self.apps[a].spec.name,
                        self.apps[a].instances[i].label()
                    );
                }
                self.feed(id, Input::GoingDown { pid, reason });
            }
            WorkerMessage::Message { data } => {
                if let Some((a, i)) = self.locate(id) {
                    let app = &self.apps[a];
                    let label = app.instances[i].label();
                    crate::log!("app '{}' {label} says: {data}", app.spec.name);
                }
            }
            // Answers about connections stay with the channel's reader and its conduit, and
            // bus and state messages with the bus.
            WorkerMessage::Accepted { .. }
            | WorkerMessage::Refused { .. }
            | WorkerMessage::Closed { .. }
            | WorkerMessage::Send { .. }
            | WorkerMessage::Reply { .. }
            | WorkerMessage::State { .. } => {}
        }
    }

    pub(super) fn channel_fault(&mut self, pid: u32, problem: &str) {
        let Some(id) = self.procs.get(&pid).map(|p| p.id) else {
            return;
        };
        let detail = format!("broke its channel protocol ({problem})");
        let cause = Cause::ChannelFault;
        self.feed(id, Input::End { pid, cause, detail });
    }

    /// An app's agent is up first and down last: workers held for it start once it is ready
    /// (or will not be: then without it, and the log says so); an agent asked to stop goes once
    /// the workers being stopped are down.
    pub(super) fn agent_order(&mut self, a: usize) {
        let app = &self.apps[a];
        let Some(agent) = app.instances.iter().find(|i| i.agent) else {
            return;
        };
        let coming = agent.slot.wanted()
            && matches!(agent.slot.phase(), Phase::Starting | Phase::BackingOff);
        let mut release = Vec::new();
        if !coming && app.instances.iter().any(|i| i.held) {
            if agent.slot.phase() != Phase::Online {
                crate::log!(
                    "app '{}': its agent is {}; starting the workers without it",
                    app.spec.name,
                    super::report::status(agent.slot.phase())
                );
            }
            release.extend(app.instances.iter().filter(|i| i.held).map(|i| i.id));
        }
        let workers_stopping = app
            .instances
            .iter()
            .any(|i| !i.agent && !i.slot.wanted() && !i.slot.is_down());
        let stop_agent = agent
            .stop_after_workers
            .filter(|_| !workers_stopping)
            .map(|cause| (agent.id, cause));
        for id in release {
            let awaits = self.instance_mut(id).is_some_and(|inst| {
                inst.held = false;
                inst.slot.awaits_spawn()
            });
            if awaits {
                self.spawn_now(id);
            }
        }
        if let Some((id, cause)) = stop_agent {
            if let Some(inst) = self.instance_mut(id) {
                inst.stop_after_workers = None;
            }
            self.feed(id, Input::Stop(cause));
        }
    }
}
