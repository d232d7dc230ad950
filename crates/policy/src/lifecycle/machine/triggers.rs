//! Replacements (reload steps and the policy triggers), timers, and responsiveness.

use std::time::Duration;

use super::Run;
use crate::lifecycle::{Action, Cause, Held, Phase, ReadyBy, Replacing, Role, StopStep, Timer};
use crate::{Decision, ExitCause};

impl Run<'_> {
    pub(super) fn replace(&mut self, cause: Cause, overlap: bool, detail: String) {
        let user = cause.is_user();
        if self.slot.replacing.is_some() || self.slot.next.is_some() {
            // One replacement at a time; the one under way ends with its own `Replaced`.
            return;
        }
        if !user && self.now < self.slot.replace_not_before {
            if self.slot.pending_trigger.is_none() {
                let young = self.young();
                self.slot.pending_trigger = Some(Held {
                    cause,
                    detail,
                    overlap,
                    young,
                });
                let wait = self.slot.replace_not_before.saturating_sub(self.now);
                self.timer_after(wait, Timer::ReplaceDue);
            }
            return;
        }
        let running = self
            .slot
            .current
            .as_ref()
            .is_some_and(|p| p.stopping.is_none());
        if !running || !self.slot.want {
            if user {
                // A reload of an instance that is not running starts it.
                self.slot.replacing = Some(Replacing {
                    cause,
                    after_exit: false,
                });
                if self.slot.current.is_some() {
                    self.slot.want = true;
                    self.slot.start_after_exit = Some(cause);
                } else {
                    self.start(cause);
                }
            }
            return;
        }
        if user {
            self.slot.tracker.reset();
        } else {
            let young = self.young();
            if !self.count_trigger(cause, &detail, young) {
                return;
            }
        }
        self.slot.pending_trigger = None;
        self.begin_replace(cause, overlap, detail);
    }

    fn begin_replace(&mut self, cause: Cause, overlap: bool, detail: String) {
        if overlap {
            self.slot.replacing = Some(Replacing {
                cause,
                after_exit: false,
            });
            let phase = self.slot.phase;
            let pid = self.slot.current.as_ref().map(|p| p.pid);
            self.event(
                pid,
                phase,
                phase,
                cause,
                format!("{detail}: starting a replacement"),
            );
            self.spawn(Role::Next, cause, detail);
        } else {
            self.slot.replacing = Some(Replacing {
                cause,
                after_exit: true,
            });
            let mut proc = self.slot.current.take().expect("running");
            let style = self.settings.stop;
            self.ask_to_stop(&mut proc, style, cause);
            let pid = proc.pid;
            self.slot.current = Some(proc);
            self.enter(Phase::Stopping, Some(pid), cause, detail);
        }
    }

    /// A policy's replacement that waited out its backoff: counted by the age the process had
    /// when it was triggered.
    fn replace_held(&mut self, held: Held) {
        let Held {
            cause,
            detail,
            overlap,
            young,
        } = held;
        let running = self
            .slot
            .current
            .as_ref()
            .is_some_and(|p| p.stopping.is_none());
        if !running || !self.slot.want || self.slot.replacing.is_some() {
            return;
        }
        if self.count_trigger(cause, &detail, young) {
            self.begin_replace(cause, overlap, detail);
        }
    }

    /// A policy's restart of a process younger than `min_uptime` is unstable, as a crash is;
    /// too many in a row end in `errored`. Returns whether the replacement goes ahead.
    pub(super) fn count_trigger(&mut self, cause: Cause, detail: &str, young: bool) -> bool {
        let started = self.slot.current.as_ref().map(|p| p.started);
        let mut policy = self.settings.restart;
        // The user asked for the limit (memory, cron...): it applies with autorestart off too.
        policy.autorestart = true;
        if young {
            policy.min_uptime = Duration::MAX;
        }
        let decision = self
            .slot
            .tracker
            .on_exit(&policy, self.now, ExitCause::Unexpected);
        if let Some(started) = started {
            self.slot.tracker.on_spawn(started);
        }
        match decision {
            Decision::Errored { unstable_restarts } => {
                self.give_up(cause, unstable_restarts, detail);
                false
            }
            Decision::Restart {
                after,
                unstable: true,
            } => {
                self.slot.replace_not_before = self.now + after;
                true
            }
            Decision::Restart { .. } | Decision::Stay => true,
        }
    }

    /// Whether the current process is younger than `min_uptime`.
    fn young(&self) -> bool {
        self.slot
            .current
            .as_ref()
            .is_some_and(|p| self.now.saturating_sub(p.started) < self.min_uptime())
    }

    pub(super) fn timer(&mut self, timer: Timer) {
        match timer {
            Timer::ReplaceDue => {
                if let Some(held) = self.slot.pending_trigger.take() {
                    self.slot.replace_not_before = self.now;
                    self.replace_held(held);
                }
            }
            Timer::Uptime(pid) => {
                let suffices = match self.settings.ready_by {
                    ReadyBy::Uptime => true,
                    ReadyBy::Listen { uptime_suffices } => uptime_suffices,
                    ReadyBy::Word | ReadyBy::Probe => false,
                };
                if suffices {
                    let up = self.min_uptime().as_millis();
                    self.became_ready(pid, format!("it stayed up for min_uptime ({up}ms)"));
                }
            }
            Timer::ReadyDeadline(pid) => self.ready_deadline(pid),
            Timer::StopSignal(pid) => {
                let proc = self
                    .slot
                    .current
                    .iter_mut()
                    .chain(self.slot.next.iter_mut())
                    .chain(self.slot.old.iter_mut())
                    .find(|p| p.pid == pid);
                if let Some(stopping) = proc.and_then(|p| p.stopping.as_mut())
                    && !stopping.signaled
                {
                    stopping.signaled = true;
                    self.actions.push(Action::Stop {
                        pid,
                        step: StopStep::Signal,
                    });
                }
            }
            Timer::Kill(pid) => {
                let stopping = self
                    .slot
                    .procs()
                    .any(|p| p.pid == pid && p.stopping.is_some());
                if stopping {
                    self.actions.push(Action::Stop {
                        pid,
                        step: StopStep::Kill,
                    });
                }
            }
            Timer::Backoff(generation) => {
                if generation == self.slot.generation
                    && self.slot.phase == Phase::BackingOff
                    && self.slot.want
                {
                    let cause = self.slot.backoff_cause;
                    self.spawn(Role::Current, cause, "its restart delay is over".into());
                }
            }
        }
    }

    /// The time to become ready is over: under a strict rule the process is ended (and
    /// counted as unstable); a Node.js worker that never listens runs on, as PM2 lets it.
    fn ready_deadline(&mut self, pid: u32) {
        let waiting = self
            .slot
            .current
            .iter()
            .chain(self.slot.next.iter())
            .any(|p| p.pid == pid && !p.ready && p.stopping.is_none());
        if !waiting {
            return;
        }
        let within = self.settings.ready_timeout.as_millis();
        match self.settings.ready_by {
            ReadyBy::Uptime => {}
            ReadyBy::Listen { .. } => self.became_ready(
                pid,
                format!(
                    "it did not listen within its listen timeout ({within}ms) and runs on \
                     without a server, as PM2 lets it"
                ),
            ),
            ReadyBy::Word | ReadyBy::Probe => {
                let detail = format!(
                    "{} within its listen timeout ({within}ms)",
                    self.settings.not_ready
                );
                self.end(pid, Cause::NotReady, &detail);
            }
        }
    }

    pub(super) fn responsive(&mut self, pid: u32, answers: bool) {
        let Some(proc) = self.slot.current.as_mut().filter(|p| p.pid == pid) else {
            return;
        };
        if proc.unresponsive != answers {
            return;
        }
        proc.unresponsive = !answers;
        let ready = proc.ready && proc.stopping.is_none();
        self.actions.push(Action::Route);
        if ready {
            let (to, detail) = if answers {
                (Phase::Online, "it answers again")
            } else {
                (
                    Phase::Unresponsive,
                    "it left connections unacknowledged past their deadline: no new ones go to it",
                )
            };
            self.enter(to, Some(pid), Cause::Unresponsive, detail.into());
        }
    }
}
