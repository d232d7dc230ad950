//! The transitions of [`Slot`]: one method per input, each small enough to read at once.

use std::time::Duration;

use super::{
    Action, Cause, Input, Phase, Proc, ReadyBy, Role, Settings, Slot, Source, StopStep, StopStyle,
    Stopping, Timer, Transition,
};
use crate::ExitCause;

/// One call of [`Slot::handle`]: the slot, what it may know of its app, the time, and the
/// actions decided so far.
pub(super) struct Run<'a> {
    pub slot: &'a mut Slot,
    pub settings: &'a Settings,
    pub now: Duration,
    pub actions: Vec<Action>,
}

impl Run<'_> {
    pub fn input(&mut self, input: Input) {
        match input {
            Input::Start(cause) => self.start(cause),
            Input::Spawned { pid } => self.spawned(pid),
            Input::SpawnFailed { error, permanent } => self.spawn_failed(error, permanent),
            Input::Ready { pid, source } => self.ready(pid, source),
            Input::Exited {
                pid,
                exit,
                how,
                group_left,
            } => self.exited(pid, exit, how, group_left),
            Input::GroupGone { pid } => self.group_gone(pid),
            Input::GoingDown { pid, reason } => self.going_down(pid, &reason),
            Input::Stop(cause) => self.stop(cause),
            Input::Restart(cause) => self.restart(cause),
            Input::Replace {
                cause,
                overlap,
                detail,
            } => self.replace(cause, overlap, detail),
            Input::End { pid, cause, detail } => self.end(pid, cause, &detail),
            Input::Timer(timer) => self.timer(timer),
            Input::Responsive { pid, answers } => self.responsive(pid, answers),
            Input::Reset => {
                self.slot.restarts = 0;
                self.slot.last_restart = None;
                self.slot.tracker.reset();
            }
        }
    }

    // ---- helpers ----

    fn event(&mut self, pid: Option<u32>, from: Phase, to: Phase, cause: Cause, detail: String) {
        self.actions.push(Action::Event(Transition {
            pid,
            from,
            to,
            cause,
            detail,
        }));
    }

    /// Moves the slot to `to`, recording why.
    fn enter(&mut self, to: Phase, pid: Option<u32>, cause: Cause, detail: String) {
        let from = self.slot.phase;
        self.slot.phase = to;
        self.event(pid, from, to, cause, detail);
    }

    /// Asks for a process; every spawn but an instance's first is a restart, whatever its cause.
    fn spawn(&mut self, role: Role, cause: Cause, detail: String) {
        if self.slot.spawned_once {
            self.slot.restarts = self.slot.restarts.saturating_add(1);
            self.slot.last_restart = Some(cause);
        }
        self.slot.spawned_once = true;
        self.slot.spawning = Some(role);
        self.actions.push(Action::Spawn);
        if role == Role::Current {
            self.enter(Phase::Starting, None, cause, detail);
        }
    }

    fn timer_after(&mut self, after: Duration, timer: Timer) {
        self.actions.push(Action::SetTimer { after, timer });
    }

    fn min_uptime(&self) -> Duration {
        self.settings.restart.min_uptime
    }

    fn finish_replace(&mut self, result: Result<(), String>) {
        if self.slot.replacing.take().is_some() {
            self.actions.push(Action::Replaced(result));
        }
    }

    // ---- starting ----

    fn start(&mut self, cause: Cause) {
        if cause.is_user() {
            self.slot.tracker.reset();
        }
        self.slot.want = true;
        match &self.slot.current {
            Some(p) if p.stopping.is_some() => self.slot.start_after_exit = Some(cause),
            Some(_) => {}
            // A spawn asked for already (held for the agent) is on its way.
            None if self.slot.spawning.is_some() => {}
            None if self.slot.awaiting_group.is_some() => {
                self.slot.start_after_exit = Some(cause);
            }
            None => {
                self.slot.generation += 1;
                self.spawn(Role::Current, cause, String::new());
            }
        }
    }

    fn spawned(&mut self, pid: u32) {
        let Some(role) = self.slot.spawning.take() else {
            // Nobody asked for it any more (stopped meanwhile): it goes at once.
            self.actions.push(Action::Stop {
                pid,
                step: StopStep::Kill,
            });
            return;
        };
        let proc = Proc::new(pid, self.now);
        match role {
            Role::Current => {
                self.slot.tracker.on_spawn(self.now);
                self.slot.current = Some(proc);
            }
            Role::Next => self.slot.next = Some(proc),
        }
        let (min_uptime, timeout) = (self.min_uptime(), self.settings.ready_timeout);
        match self.settings.ready_by {
            ReadyBy::Uptime if min_uptime.is_zero() => {
                self.became_ready(pid, "it runs (min_uptime is 0)".into());
            }
            ReadyBy::Uptime => self.timer_after(min_uptime, Timer::Uptime(pid)),
            ReadyBy::Word | ReadyBy::Probe => {
                self.timer_after(timeout, Timer::ReadyDeadline(pid));
            }
            ReadyBy::Listen { uptime_suffices } => {
                self.timer_after(timeout, Timer::ReadyDeadline(pid));
                if uptime_suffices {
                    self.timer_after(min_uptime, Timer::Uptime(pid));
                }
            }
        }
    }

    fn spawn_failed(&mut self, error: String, permanent: bool) {
        let Some(role) = self.slot.spawning.take() else {
            return;
        };
        self.slot.last_exit = Some(error.clone());
        if role == Role::Next {
            self.event(
                None,
                self.slot.phase,
                self.slot.phase,
                Cause::SpawnFailed,
                format!("its replacement could not start: {error}"),
            );
            self.finish_replace(Err(error));
            return;
        }
        self.finish_replace(Err(error.clone()));
        if permanent || !self.slot.want {
            self.slot.want = false;
            self.enter(Phase::Errored, None, Cause::SpawnFailed, error);
            return;
        }
        self.slot.tracker.on_spawn(self.now);
        let decision =
            self.slot
                .tracker
                .on_exit(&self.settings.restart, self.now, ExitCause::Unexpected);
        self.apply(decision, Cause::SpawnFailed, error);
    }

    // ---- ready ----

    fn ready(&mut self, pid: u32, source: Source) {
        if !self.settings.ready_by.accepts(source) {
            return;
        }
        let said = match source {
            Source::Word => "it said it is ready",
            Source::Listening => "its server listens",
            Source::Probe => "its probe passed",
        };
        self.became_ready(pid, said.into());
    }

    /// `pid` is ready, unless it is being stopped (a late `ready` after its timeout) or was
    /// ready already.
    fn became_ready(&mut self, pid: u32, detail: String) {
        let eligible = |p: &Option<Proc>| {
            p.as_ref()
                .is_some_and(|p| p.pid == pid && !p.ready && p.stopping.is_none())
        };
        if eligible(&self.slot.current) {
            let proc = self.slot.current.as_mut().expect("checked");
            proc.ready = true;
            let to = if proc.unresponsive {
                Phase::Unresponsive
            } else {
                Phase::Online
            };
            self.enter(to, Some(pid), Cause::Ready, detail);
            self.actions.push(Action::Route);
            self.finish_replace(Ok(()));
        } else if eligible(&self.slot.next) {
            self.take_over(detail);
        }
    }

    /// The replacement is ready: it serves, the process it replaces is retired.
    fn take_over(&mut self, detail: String) {
        let mut next = self.slot.next.take().expect("a replacement");
        next.ready = true;
        let cause = self
            .slot
            .replacing
            .as_ref()
            .map_or(Cause::Reload, |r| r.cause);
        if let Some(mut old) = self.slot.current.take() {
            let style = self.settings.stop;
            self.ask_to_stop(&mut old, style, cause);
            self.event(
                Some(old.pid),
                self.slot.phase,
                Phase::Draining,
                cause,
                format!("replaced by pid {}", next.pid),
            );
            self.slot.old.push(old);
        }
        self.slot.tracker.on_spawn(next.started);
        let pid = next.pid;
        self.slot.current = Some(next);
        self.enter(Phase::Online, Some(pid), Cause::Ready, detail);
        self.actions.push(Action::Route);
        self.finish_replace(Ok(()));
    }

    // ---- stopping ----

    /// The first step of stopping `proc`, and the timers of the next ones: whatever the style,
    /// SIGKILL comes `kill_timeout` after the first notice.
    fn ask_to_stop(&mut self, proc: &mut Proc, style: StopStyle, cause: Cause) {
        if proc.stopping.is_some() {
            return;
        }
        let pid = proc.pid;
        let kill_timeout = self.settings.kill_timeout;
        let signaled = style == StopStyle::Signal;
        proc.stopping = Some(Stopping {
            since: self.now,
            cause,
            signaled,
        });
        let step = if signaled {
            StopStep::Signal
        } else {
            StopStep::Notice
        };
        self.actions.push(Action::Stop { pid, step });
        if !signaled {
            self.timer_after(kill_timeout / 2, Timer::StopSignal(pid));
        }
        self.timer_after(kill_timeout, Timer::Kill(pid));
        self.actions.push(Action::Route);
    }

    /// A replacement that is not needed any more: it never served, so it goes at once.
    fn drop_next(&mut self, cause: Cause, why: &str) {
        if let Some(mut next) = self.slot.next.take() {
            self.ask_to_stop(&mut next, StopStyle::Signal, cause);
            self.slot.old.push(next);
        }
        if self.slot.spawning == Some(Role::Next) {
            self.slot.spawning = None;
        }
        self.finish_replace(Err(why.into()));
    }

    fn stop(&mut self, cause: Cause) {
        self.slot.want = false;
        self.slot.start_after_exit = None;
        self.drop_next(cause, "the instance was stopped");
        self.slot.pending_trigger = None;
        self.slot.spawning = None;
        self.slot.generation += 1;
        // Going-down processes finish on their own; a stop asks them now.
        for n in 0..self.slot.old.len() {
            let proc = &mut self.slot.old[n];
            if let Some(stopping) = proc.stopping.as_mut().filter(|s| !s.signaled) {
                stopping.signaled = true;
                let pid = proc.pid;
                self.actions.push(Action::Stop {
                    pid,
                    step: StopStep::Signal,
                });
            }
        }
        if !self.stop_current(cause) && self.slot.phase != Phase::Errored {
            self.enter(Phase::Stopped, None, cause, String::new());
        }
    }

    /// Asks the current process to stop, if there is one: the slot is `stopping`.
    fn stop_current(&mut self, cause: Cause) -> bool {
        let Some(mut proc) = self.slot.current.take() else {
            return false;
        };
        let style = self.settings.stop;
        self.ask_to_stop(&mut proc, style, cause);
        let pid = proc.pid;
        self.slot.current = Some(proc);
        self.enter(Phase::Stopping, Some(pid), cause, String::new());
        true
    }

    fn restart(&mut self, cause: Cause) {
        self.slot.tracker.reset();
        self.slot.want = true;
        self.drop_next(cause, "the instance was restarted");
        self.slot.pending_trigger = None;
        if self.slot.current.is_some() {
            self.slot.start_after_exit = Some(cause);
            self.stop_current(cause);
        } else {
            self.start(cause);
        }
    }

    /// Ends the current process (or the replacement) for a fault the daemon saw: the signal at
    /// once, since its channel may be what is broken.
    fn end(&mut self, pid: u32, cause: Cause, detail: &str) {
        let phase = self.slot.phase;
        for role in [Role::Current, Role::Next] {
            let taken = match role {
                Role::Current => self.slot.current.take(),
                Role::Next => self.slot.next.take(),
            };
            let Some(mut proc) = taken else { continue };
            if proc.pid == pid && proc.stopping.is_none() {
                proc.end_reason = Some(detail.to_string());
                self.ask_to_stop(&mut proc, StopStyle::Signal, cause);
                let to = if role == Role::Current {
                    Phase::Stopping
                } else {
                    phase
                };
                if role == Role::Current {
                    self.slot.phase = to;
                }
                self.event(Some(pid), phase, to, cause, detail.to_string());
            }
            match role {
                Role::Current => self.slot.current = Some(proc),
                Role::Next => self.slot.next = Some(proc),
            }
        }
    }
}

mod exits;
mod triggers;
