//! The life of one instance, as a pure state machine: `(slot, input, now) -> actions`.
//!
//! A [`Slot`] is one instance of an app: the process serving as it (`current`), perhaps a
//! replacement starting beside it (`next`, during a reload step or a graceful restart), and the
//! processes it retired that are still finishing (`old`). Everything that can happen to it is an
//! [`Input`]: a spawn done, a ready word, an exit, a user's command, a timer, a policy trigger.
//! [`Slot::handle`] decides and returns [`Action`]s for the daemon to carry out (spawn, signal,
//! set a timer, route or not) and a [`Transition`] for every change of status, with its
//! [`Cause`]. It does no I/O and never reads a clock: `now` is passed in.
//!
//! ```text
//!                 spawned                 ready (word, listening, probe, min_uptime)
//!   (start) ─────────────▶ starting ──────────────────────────────▶ online ◀──▶ unresponsive
//!                             │ ▲                                     │
//!        exited / not ready   │ │ backoff over          stop asked    │  exited (crash)
//!                             ▼ │                                     ▼
//!   errored ◀──────────── backing-off ◀─────────────────────────── stopping ──▶ stopped
//!         too many unstable restarts                    (a stop asked by the user)
//! ```
//!
//! Rules the machine keeps, each with a regression test:
//! - a process being stopped never becomes ready (a late `ready` after its listen timeout);
//! - a replacement takes over only once it is ready and not stopping; the old process serves
//!   until then;
//! - a process ended for not becoming ready counts as unstable, however long it took;
//! - every restart counts in [`Slot::restarts`], whatever its cause;
//! - a stop takes at most `kill_timeout` from the first notice to SIGKILL.

use std::time::Duration;

use crate::{RestartPolicy, RestartTracker};

/// Where an instance is in its life (the daemon shows it as its status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Spawned (or about to be), not ready yet.
    Starting,
    /// Running and ready: gets connections.
    Online,
    /// Running but not answering (connections left unacknowledged): gets no new connection.
    Unresponsive,
    /// Asked to stop; its process has not exited yet.
    Stopping,
    /// Not running, by request or because it is done.
    Stopped,
    /// Exited; waiting for its restart delay.
    BackingOff,
    /// Given up on (crash loop, or a program that cannot start) until the user acts.
    Errored,
    /// A retired process finishing its work (only in transitions of `old` processes).
    Draining,
}

/// Why something happened: the reason carried by every transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Started by the user (or the app's start).
    Start,
    /// Became ready.
    Ready,
    /// Exited on its own.
    Crash,
    /// Exited with one of its stop exit codes: done, not restarted.
    Done,
    /// Stopped by the user.
    Stop,
    /// Restarted by the user.
    Restart,
    /// A rolling reload.
    Reload,
    /// Removed by a scale-down.
    Scale,
    /// Deleted.
    Delete,
    /// The daemon is going down.
    Shutdown,
    /// It said it is going down (the graceful restart of the seed).
    GoingDown,
    /// It did not become ready in time.
    NotReady,
    /// It broke its channel protocol.
    ChannelFault,
    /// Its memory went over the limit.
    Memory,
    /// Its cron schedule.
    Cron,
    /// A watched file changed.
    Watch,
    /// Its health check failed.
    Health,
    /// It missed its watchdog ping.
    Watchdog,
    /// It stopped acknowledging connections, or answered again.
    Unresponsive,
    /// Its program could not be started.
    SpawnFailed,
    /// Too many unstable restarts in a row.
    CrashLoop,
    /// A worker waited for its app's agent.
    Agent,
}

impl Cause {
    /// One word for events and `ls`: `crash`, `memory`, `reload`, ...
    pub fn word(self) -> &'static str {
        match self {
            Cause::Start => "start",
            Cause::Ready => "ready",
            Cause::Crash => "crash",
            Cause::Done => "done",
            Cause::Stop => "stop",
            Cause::Restart => "restart",
            Cause::Reload => "reload",
            Cause::Scale => "scale",
            Cause::Delete => "delete",
            Cause::Shutdown => "shutdown",
            Cause::GoingDown => "going-down",
            Cause::NotReady => "not-ready",
            Cause::ChannelFault => "channel-fault",
            Cause::Memory => "memory",
            Cause::Cron => "cron",
            Cause::Watch => "watch",
            Cause::Health => "health",
            Cause::Watchdog => "watchdog",
            Cause::Unresponsive => "unresponsive",
            Cause::SpawnFailed => "spawn-failed",
            Cause::CrashLoop => "crash-loop",
            Cause::Agent => "agent",
        }
    }

    /// Whether a person asked for it: such a restart clears the crash-loop count instead of
    /// adding to it.
    pub fn is_user(self) -> bool {
        matches!(
            self,
            Cause::Start
                | Cause::Stop
                | Cause::Restart
                | Cause::Reload
                | Cause::Scale
                | Cause::Delete
                | Cause::Shutdown
        )
    }
}

/// What made a process say it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A `ready` message on its channel, or `READY=1` on its `NOTIFY_SOCKET`.
    Word,
    /// A Node.js cluster worker's server listens.
    Listening,
    /// A probe passed (a health check, or its `PORT` accepting in proxy mode).
    Probe,
}

/// What makes a new process ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyBy {
    /// Staying up for `min_uptime` (at once when it is zero); any word sooner counts too.
    Uptime,
    /// Its word (a `ready` message, `READY=1`, or listening); none within the timeout is a
    /// failure: the process is ended and its exit counts as unstable.
    Word,
    /// A passing probe only; none within the timeout is a failure.
    Probe,
    /// A Node.js cluster worker: listening (or a `ready` message). One that never listens is
    /// taken as ready once the timeout passes with it alive (as PM2 does), or after
    /// `min_uptime` when `uptime_suffices` (no worker of its app has listened yet: a queue
    /// consumer needs no server).
    Listen {
        /// Whether `min_uptime` alone makes it ready.
        uptime_suffices: bool,
    },
}

impl ReadyBy {
    fn accepts(self, source: Source) -> bool {
        match self {
            ReadyBy::Uptime | ReadyBy::Word | ReadyBy::Listen { .. } => source != Source::Probe,
            ReadyBy::Probe => source == Source::Probe,
        }
    }
}

/// How a process is asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStyle {
    /// The stop signal at once; SIGKILL at `kill_timeout`.
    Signal,
    /// A notice first (Node's `disconnect`, or a shutdown message), the stop signal halfway
    /// through `kill_timeout`, SIGKILL at its end.
    Notice,
}

/// One step of stopping a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStep {
    /// The graceful notice of [`StopStyle::Notice`].
    Notice,
    /// The app's stop signal to the process group (with a shutdown frame for channel speakers).
    Signal,
    /// SIGKILL to the process group.
    Kill,
}

/// How an app's instances live: everything [`Slot::handle`] needs to know of the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Restarts, backoff, crash loops.
    pub restart: RestartPolicy,
    /// From the first stop notice to SIGKILL.
    pub kill_timeout: Duration,
    /// What makes a process ready.
    pub ready_by: ReadyBy,
    /// How long a process may take to be ready (see [`ReadyBy`] for what passing it means).
    pub ready_timeout: Duration,
    /// How it is asked to stop.
    pub stop: StopStyle,
    /// Exit codes that mean "done": not restarted.
    pub stop_exit_codes: Vec<i32>,
    /// What a process ended for not being ready in time failed to do, for the event ("did not
    /// say it is ready").
    pub not_ready: String,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            restart: RestartPolicy::default(),
            kill_timeout: Duration::from_millis(1600),
            ready_by: ReadyBy::Uptime,
            ready_timeout: Duration::from_secs(3),
            stop: StopStyle::Signal,
            stop_exit_codes: Vec::new(),
            not_ready: "did not say it is ready".into(),
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// A timer the daemon sets for a slot; stale ones are recognised and ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// The process has been up for `min_uptime`.
    Uptime(u32),
    /// The process's time to become ready is over.
    ReadyDeadline(u32),
    /// Halfway through the kill timeout of a notice: the stop signal.
    StopSignal(u32),
    /// The kill timeout is over: SIGKILL.
    Kill(u32),
    /// The restart delay is over (the number is the slot's generation when it was set).
    Backoff(u64),
    /// The backoff that held a policy's replacement back is over.
    ReplaceDue,
}

/// What happens to a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Run it: a new instance, or a stopped one started again.
    Start(Cause),
    /// The process asked for by [`Action::Spawn`] runs.
    Spawned {
        /// Its pid.
        pid: u32,
    },
    /// The process asked for by [`Action::Spawn`] could not be started.
    SpawnFailed {
        /// Why.
        error: String,
        /// Trying again cannot help (no such file, not executable).
        permanent: bool,
    },
    /// A process said (or showed) that it is ready.
    Ready {
        /// The process.
        pid: u32,
        /// How.
        source: Source,
    },
    /// A process of the slot exited and was reaped.
    Exited {
        /// The process.
        pid: u32,
        /// How it ended.
        exit: Exit,
        /// How it ended, for a person ("killed by SIGKILL").
        how: String,
        /// Members of its process group live on (they are being ended): a start that waits for
        /// this process waits for [`Input::GroupGone`] too.
        group_left: bool,
    },
    /// The last member of an exited process's group is gone.
    GroupGone {
        /// The process (its group id).
        pid: u32,
    },
    /// The current process said it is going down: it finishes on its own, and its replacement
    /// starts at once.
    GoingDown {
        /// The process.
        pid: u32,
        /// What it said.
        reason: String,
    },
    /// Stop and stay down.
    Stop(Cause),
    /// Stop if running, then start again (a person's restart).
    Restart(Cause),
    /// Replace the process: with `overlap`, a new one is started and takes over once ready,
    /// the old one serving until then (a reload step, a graceful restart); without, the old one
    /// stops first (a program that binds its own port).
    Replace {
        /// Why.
        cause: Cause,
        /// Whether old and new may run side by side.
        overlap: bool,
        /// What triggered it, for the event.
        detail: String,
    },
    /// End the current process for a fault the daemon saw; its exit is a crash, handled by the
    /// restart policy.
    End {
        /// The process.
        pid: u32,
        /// Why.
        cause: Cause,
        /// What happened, for the event and `describe`.
        detail: String,
    },
    /// A timer fired.
    Timer(Timer),
    /// The current process stopped answering (`false`) or answers again (`true`).
    Responsive {
        /// The process.
        pid: u32,
        /// Whether it answers.
        answers: bool,
    },
    /// Clear the counters (`corral reset`).
    Reset,
}

/// What the daemon must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a process for the slot, then feed [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn,
    /// A step of stopping a process.
    Stop {
        /// The process (its group).
        pid: u32,
        /// Which step.
        step: StopStep,
    },
    /// Feed [`Input::Timer`] after a delay.
    SetTimer {
        /// The delay.
        after: Duration,
        /// The timer.
        timer: Timer,
    },
    /// Which process gets connections changed: route to [`Slot::routable`].
    Route,
    /// A [`Input::Replace`] is over: the new process serves, or it failed (and the old one, if
    /// any, still serves).
    Replaced(Result<(), String>),
    /// Record a transition.
    Event(Transition),
}

/// One change of status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The process concerned.
    pub pid: Option<u32>,
    /// Status before.
    pub from: Phase,
    /// Status after.
    pub to: Phase,
    /// Why.
    pub cause: Cause,
    /// What happened, for a person.
    pub detail: String,
}

/// One process of a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Its pid (also its process group).
    pub pid: u32,
    /// When it started.
    pub started: Duration,
    /// Whether it became ready.
    pub ready: bool,
    /// Whether it stopped acknowledging connections.
    pub unresponsive: bool,
    /// Once asked to stop: when, and whether the stop signal went already.
    pub stopping: Option<Stopping>,
    /// Why the daemon ended it, said with its exit.
    pub end_reason: Option<String>,
}

/// A process asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopping {
    /// When the first notice went.
    pub since: Duration,
    /// Why.
    pub cause: Cause,
    /// Whether its group got the stop signal (not only a notice).
    pub signaled: bool,
}

impl Proc {
    fn new(pid: u32, now: Duration) -> Proc {
        Proc {
            pid,
            started: now,
            ready: false,
            unresponsive: false,
            stopping: None,
            end_reason: None,
        }
    }
}

/// Which role a process being spawned will have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Current,
    Next,
}

/// A replacement under way.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replacing {
    cause: Cause,
    /// A stop-first replace: the old process is stopping, the new one starts once it is gone.
    after_exit: bool,
}

/// A policy's replacement held back by its backoff.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Held {
    cause: Cause,
    detail: String,
    overlap: bool,
    /// The process was younger than `min_uptime` when it was triggered: it counts as unstable
    /// when carried out, however long the backoff made it wait.
    young: bool,
}

/// One instance.
#[derive(Debug, Clone)]
pub struct Slot {
    phase: Phase,
    want: bool,
    current: Option<Proc>,
    next: Option<Proc>,
    old: Vec<Proc>,
    spawning: Option<Role>,
    replacing: Option<Replacing>,
    /// A person's restart waiting for the current process to be gone.
    start_after_exit: Option<Cause>,
    /// An exited process whose group must be gone before the next start.
    awaiting_group: Option<u32>,
    /// Why the restart waited out by the backoff timer happens.
    backoff_cause: Cause,
    tracker: RestartTracker,
    restarts: u32,
    last_restart: Option<Cause>,
    last_exit: Option<String>,
    /// Policy-triggered replacements are not made before this (their backoff).
    replace_not_before: Duration,
    /// A policy's replacement held back by that backoff.
    pending_trigger: Option<Held>,
    spawned_once: bool,
    generation: u64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot::new()
    }
}

mod machine;
#[cfg(test)]
mod tests;

impl Slot {
    /// A slot that has never run.
    pub fn new() -> Slot {
        Slot {
            phase: Phase::Stopped,
            want: false,
            current: None,
            next: None,
            old: Vec::new(),
            spawning: None,
            replacing: None,
            start_after_exit: None,
            awaiting_group: None,
            backoff_cause: Cause::Crash,
            tracker: RestartTracker::new(),
            restarts: 0,
            last_restart: None,
            last_exit: None,
            replace_not_before: Duration::ZERO,
            pending_trigger: None,
            spawned_once: false,
            generation: 0,
        }
    }

    /// Its status.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Whether it should be running.
    pub fn wanted(&self) -> bool {
        self.want
    }

    /// The process serving as this instance.
    pub fn current(&self) -> Option<&Proc> {
        self.current.as_ref()
    }

    /// A replacement being started beside the current process.
    pub fn next(&self) -> Option<&Proc> {
        self.next.as_ref()
    }

    /// Retired processes still finishing their work.
    pub fn old(&self) -> &[Proc] {
        &self.old
    }

    /// Every live process of the slot: current, next, old.
    pub fn procs(&self) -> impl Iterator<Item = &Proc> {
        self.current.iter().chain(&self.next).chain(&self.old)
    }

    /// The process that gets connections now: the current one, when ready, answering and not
    /// stopping.
    pub fn routable(&self) -> Option<u32> {
        self.current
            .as_ref()
            .filter(|p| p.ready && !p.unresponsive && p.stopping.is_none())
            .map(|p| p.pid)
    }

    /// Whether no process of the slot runs and none is about to be spawned.
    pub fn is_down(&self) -> bool {
        self.procs().next().is_none() && self.spawning.is_none()
    }

    /// Whether it asked for a spawn that has not been done yet (the daemon may hold it back,
    /// for a worker whose app's agent is not ready).
    pub fn awaits_spawn(&self) -> bool {
        self.spawning.is_some()
    }

    /// Which of its processes `pid` is, if any.
    pub fn owns(&self, pid: u32) -> bool {
        self.procs().any(|p| p.pid == pid)
    }

    /// Restarts so far, whatever their cause (PM2's `restart_time`).
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// The cause of the last restart.
    pub fn last_restart(&self) -> Option<Cause> {
        self.last_restart
    }

    /// Unstable restarts in a row (the crash-loop count).
    pub fn unstable_restarts(&self) -> u32 {
        self.tracker.unstable_restarts()
    }

    /// How the last process ended, or why the slot is errored.
    pub fn last_exit(&self) -> Option<&str> {
        self.last_exit.as_deref()
    }

    /// Whether a replacement is under way.
    pub fn is_replacing(&self) -> bool {
        self.replacing.is_some()
    }

    /// Sets what `describe` shows as the last exit (a reload's failure, said by the daemon).
    pub fn set_last_exit(&mut self, text: String) {
        self.last_exit = Some(text);
    }

    /// Decides what `input` at `now` leads to.
    pub fn handle(&mut self, settings: &Settings, input: Input, now: Duration) -> Vec<Action> {
        let mut run = machine::Run {
            slot: self,
            settings,
            now,
            actions: Vec::new(),
        };
        run.input(input);
        run.actions
    }
}
