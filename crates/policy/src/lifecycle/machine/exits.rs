//! Processes that end: exits, groups gone, processes going down, and the restart decision.

use std::time::Duration;

use super::Run;
use crate::lifecycle::{Cause, Exit, Phase, ReadyBy, Role, Timer};
use crate::{Decision, ExitCause};

impl Run<'_> {
    pub(super) fn exited(&mut self, pid: u32, exit: Exit, how: String, group_left: bool) {
        if let Some(n) = self.slot.old.iter().position(|p| p.pid == pid) {
            let proc = self.slot.old.remove(n);
            let cause = proc.stopping.map_or(Cause::Crash, |s| s.cause);
            self.event(Some(pid), Phase::Draining, Phase::Stopped, cause, how);
            return;
        }
        if self.slot.next.as_ref().is_some_and(|p| p.pid == pid) {
            self.next_exited(how);
            return;
        }
        if self.slot.current.as_ref().is_none_or(|p| p.pid != pid) {
            return;
        }
        let proc = self.slot.current.take().expect("checked");
        let how = match &proc.end_reason {
            Some(reason) => format!("{reason}; {how}"),
            None => how,
        };
        self.slot.last_exit = Some(how.clone());
        if group_left {
            self.slot.awaiting_group = Some(pid);
        }
        let stop_first = self.slot.replacing.as_ref().is_some_and(|r| r.after_exit);
        let asked = proc
            .stopping
            .is_some_and(|s| s.cause.is_user() || stop_first);
        if asked || !self.slot.want {
            self.stopped_as_asked(pid, proc.stopping.map_or(Cause::Stop, |s| s.cause), how);
            return;
        }
        if let Exit::Code(code) = exit
            && self.settings.stop_exit_codes.contains(&code)
        {
            self.slot.want = false;
            self.drop_next(Cause::Done, "the instance is done");
            let detail = format!("{how}, one of its stop exit codes: done, not restarted");
            self.enter(Phase::Stopped, Some(pid), Cause::Done, detail);
            return;
        }
        // Ended before it was ready under a rule where only its word counts: it never started,
        // so its exit is unstable however long it took (a listen timeout longer than min_uptime
        // must not hide a crash loop).
        let strict = matches!(self.settings.ready_by, ReadyBy::Word | ReadyBy::Probe);
        let never_ready = !proc.ready && (strict || proc.end_reason.is_some());
        let cause = proc.stopping.map_or(Cause::Crash, |s| s.cause);
        self.current_left(pid, cause, how, never_ready);
    }

    /// The current process is gone on its own: a replacement starting takes its place, or the
    /// restart policy decides.
    fn current_left(&mut self, pid: u32, cause: Cause, how: String, never_ready: bool) {
        // A replacement under way takes its place (and still ends the replace when ready).
        if let Some(next) = self.slot.next.take() {
            self.slot.tracker.on_spawn(next.started);
            let next_pid = next.pid;
            let ready = next.ready;
            self.slot.current = Some(next);
            let to = if ready {
                Phase::Online
            } else {
                Phase::Starting
            };
            let detail = format!("{how}; its replacement pid {next_pid} takes over");
            self.enter(to, Some(pid), cause, detail);
            return;
        }
        self.finish_replace(Err(how.clone()));
        let mut policy = self.settings.restart;
        if never_ready {
            policy.min_uptime = Duration::MAX;
        }
        let decision = self
            .slot
            .tracker
            .on_exit(&policy, self.now, ExitCause::Unexpected);
        self.apply(decision, cause, how);
    }

    /// A process stopped because it was asked to: stopped for good, or started again.
    fn stopped_as_asked(&mut self, pid: u32, cause: Cause, how: String) {
        let _ = self
            .slot
            .tracker
            .on_exit(&self.settings.restart, self.now, ExitCause::Requested);
        if self.slot.awaiting_group.is_some() {
            let to = self.slot.phase;
            self.enter(
                to,
                Some(pid),
                cause,
                format!("{how}; its group is still ending"),
            );
            return;
        }
        self.after_stop(Some(pid), cause, how);
    }

    /// What follows a stopped process (and its gone group): a restart or a stop-first
    /// replacement starts now; otherwise the slot is stopped.
    fn after_stop(&mut self, pid: Option<u32>, cause: Cause, how: String) {
        let replace = self
            .slot
            .replacing
            .as_ref()
            .filter(|r| r.after_exit)
            .map(|r| r.cause);
        if let Some(cause) = self.slot.start_after_exit.take().or(replace)
            && self.slot.want
        {
            self.spawn(Role::Current, cause, how);
        } else if self.slot.phase == Phase::Errored {
            self.event(pid, Phase::Errored, Phase::Errored, cause, how);
        } else {
            self.enter(Phase::Stopped, pid, cause, how);
        }
    }

    pub(super) fn group_gone(&mut self, pid: u32) {
        if self.slot.awaiting_group != Some(pid) {
            return;
        }
        self.slot.awaiting_group = None;
        if self.slot.current.is_none() && self.slot.spawning.is_none() {
            if self.slot.want
                && (self.slot.start_after_exit.is_some() || self.slot.replacing.is_some())
            {
                self.after_stop(Some(pid), Cause::Restart, "its group is gone".into());
            } else if self.slot.phase == Phase::Stopping {
                self.after_stop(Some(pid), Cause::Stop, "its group is gone".into());
            }
        }
    }

    /// The replacement ended before it was ready: the process it was to replace still serves.
    fn next_exited(&mut self, how: String) {
        let next = self.slot.next.take().expect("checked");
        let how = match &next.end_reason {
            Some(reason) => format!("{reason}; {how}"),
            None => how,
        };
        let cause = self
            .slot
            .replacing
            .as_ref()
            .map_or(Cause::Reload, |r| r.cause);
        let phase = self.slot.phase;
        let detail = format!("its replacement pid {} {how}", next.pid);
        self.event(Some(next.pid), phase, phase, cause, detail);
        if next.stopping.is_some() && next.end_reason.is_none() {
            // Stopped on purpose (the instance was stopped or restarted meanwhile).
            return;
        }
        self.slot.last_exit = Some(format!("its new process {how}"));
        self.finish_replace(Err(how.clone()));
        if !cause.is_user() {
            self.count_failed_replacement(cause, &how);
        }
    }

    /// A replacement asked by a policy (memory, cron, health...) failed: that counts as an
    /// unstable restart, so a trigger that fires at every start ends in `errored`.
    fn count_failed_replacement(&mut self, cause: Cause, how: &str) {
        // As a trigger against a young process: it never served, however long it took.
        let _ = self.count_trigger(cause, &format!("its replacement {how}"), true);
    }

    pub(super) fn going_down(&mut self, pid: u32, reason: &str) {
        let Some(mut proc) = self
            .slot
            .current
            .take_if(|p| p.pid == pid && p.stopping.is_none())
        else {
            return;
        };
        let kill_timeout = self.settings.kill_timeout;
        proc.stopping = Some(crate::lifecycle::Stopping {
            since: self.now,
            cause: Cause::GoingDown,
            signaled: false,
        });
        self.timer_after(kill_timeout, Timer::Kill(pid));
        self.actions.push(crate::lifecycle::Action::Route);
        let how = format!("said it was going down: {reason}");
        self.slot.last_exit = Some(how.clone());
        self.event(
            Some(pid),
            self.slot.phase,
            Phase::Draining,
            Cause::GoingDown,
            how.clone(),
        );
        let never_ready = !proc.ready;
        self.slot.old.push(proc);
        if !self.slot.want {
            self.enter(Phase::Stopped, Some(pid), Cause::GoingDown, how);
            return;
        }
        // Its going down counts as a crash, so a worker that dies at every start still ends
        // errored.
        let strict = matches!(self.settings.ready_by, ReadyBy::Word | ReadyBy::Probe);
        self.current_left(pid, Cause::GoingDown, how, never_ready && strict);
    }

    /// Carries out the restart policy's decision after an unexpected exit.
    pub(super) fn apply(&mut self, decision: Decision, cause: Cause, how: String) {
        match decision {
            Decision::Stay => {
                self.slot.want = false;
                let detail = format!("{how}; autorestart is off");
                self.enter(Phase::Stopped, None, cause, detail);
            }
            Decision::Restart { after, .. } if after.is_zero() => {
                self.slot.generation += 1;
                self.spawn(Role::Current, cause, how);
            }
            Decision::Restart { after, .. } => {
                self.slot.generation += 1;
                self.slot.backoff_cause = cause;
                let detail = format!("{how}; restarting in {}ms", after.as_millis());
                self.enter(Phase::BackingOff, None, cause, detail);
                let generation = self.slot.generation;
                self.timer_after(after, Timer::Backoff(generation));
            }
            Decision::Errored { unstable_restarts } => {
                self.give_up(cause, unstable_restarts, &how);
            }
        }
    }

    /// A crash loop: everything stops and the slot is errored until a person acts.
    pub(super) fn give_up(&mut self, cause: Cause, unstable_restarts: u32, how: &str) {
        let message = format!(
            "crash loop: {how} ({}), after {unstable_restarts} restart(s) in a row that each \
             ended within min_uptime; left stopped",
            cause.word()
        );
        self.slot.want = false;
        self.slot.last_exit = Some(message.clone());
        self.drop_next(Cause::CrashLoop, "crash loop");
        if let Some(mut proc) = self.slot.current.take() {
            let style = self.settings.stop;
            self.ask_to_stop(&mut proc, style, Cause::CrashLoop);
            self.slot.current = Some(proc);
        }
        self.enter(Phase::Errored, None, Cause::CrashLoop, message);
    }
}
