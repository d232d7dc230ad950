//! Supervision policy for corral: what to do when a managed process exits.
//!
//! # What this crate owns
//!
//! The restart decision and nothing else: whether an exit should lead to a
//! restart, how long to wait before it (fixed delay, exponential backoff, or
//! the automatic crash-loop backoff), and when a process that keeps crashing
//! must be given up on ([`Decision::Errored`]).
//!
//! # What it does not own
//!
//! Spawning processes, sending signals, timers, sockets and clocks all live in
//! the daemon. This crate does no I/O, starts no threads, has no dependencies
//! and never reads the clock: every moment is passed in as a [`Duration`]
//! since an arbitrary monotonic epoch. The daemon passes a real monotonic
//! clock; tests pass plain values they advance by hand.
//!
//! # How it works
//!
//! One [`RestartTracker`] lives next to each managed process. The daemon calls
//! [`RestartTracker::on_spawn`] when the process starts and
//! [`RestartTracker::on_exit`] when it ends; the latter returns a [`Decision`].
//! An exit with an uptime below [`RestartPolicy::min_uptime`] is *unstable*.
//! Unstable exits in a row are counted; once `max_restarts` unstable restarts
//! have been made in a row, the next unstable exit yields `Errored`. Only a
//! stable exit or a user action ([`RestartTracker::reset`]) clears the count,
//! never the mere passing of time, so an app that ran fine once and then
//! crashes at every boot is still caught.

#![warn(missing_docs)]

pub mod lifecycle;
pub mod rolling;

use std::time::Duration;

/// Growth factor of every backoff: each delay is the previous one times this.
pub const BACKOFF_FACTOR: f64 = 1.5;
/// Upper bound of every backoff delay.
pub const BACKOFF_CAP: Duration = Duration::from_secs(15);
/// First delay of the automatic crash-loop backoff (used without `exp_backoff`).
pub const CRASH_LOOP_BACKOFF_START: Duration = Duration::from_millis(100);

/// How a process should be restarted, as configured by the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restart the process when it exits unexpectedly (default `true`).
    pub autorestart: bool,
    /// An exit before this uptime is unstable (default 1 s).
    pub min_uptime: Duration,
    /// Unstable restarts in a row allowed before giving up (default 10).
    pub max_restarts: u32,
    /// Delay before restarting after a stable exit (default 0).
    pub restart_delay: Duration,
    /// Initial exponential backoff delay, like PM2's
    /// `exp_backoff_restart_delay` (default `None`).
    pub exp_backoff: Option<Duration>,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            autorestart: true,
            min_uptime: Duration::from_secs(1),
            max_restarts: 10,
            restart_delay: Duration::ZERO,
            exp_backoff: None,
        }
    }
}

/// Why a process exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// The user or the daemon stopped it (stop, restart, delete, kill).
    Requested,
    /// It exited or crashed on its own.
    Unexpected,
}

/// What the supervisor should do after an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Schedule a restart.
    Restart {
        /// How long to wait before restarting.
        after: Duration,
        /// Whether the exit that caused it was unstable.
        unstable: bool,
    },
    /// Do not restart (autorestart is off, or the exit was requested).
    Stay,
    /// Crash loop: give up until the user acts.
    Errored {
        /// Unstable restarts made in a row before giving up.
        unstable_restarts: u32,
    },
}

/// Restart bookkeeping for one managed process.
#[derive(Debug, Clone, Default)]
pub struct RestartTracker {
    started_at: Option<Duration>,
    unstable_in_a_row: u32,
    total_restarts: u32,
    backoff: Option<Duration>,
    errored: bool,
}

/// Multiplies a delay by [`BACKOFF_FACTOR`], capped at [`BACKOFF_CAP`].
fn grow(delay: Duration) -> Duration {
    delay
        .min(BACKOFF_CAP)
        .mul_f64(BACKOFF_FACTOR)
        .min(BACKOFF_CAP)
}

impl RestartTracker {
    /// A tracker with no history.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that the current process started at `now`.
    pub fn on_spawn(&mut self, now: Duration) {
        self.started_at = Some(now);
    }

    /// Decides what to do about an exit at `now`.
    ///
    /// An exit without a recorded spawn is treated as having zero uptime.
    pub fn on_exit(&mut self, policy: &RestartPolicy, now: Duration, cause: ExitCause) -> Decision {
        let uptime = self.uptime(now).unwrap_or(Duration::ZERO);
        self.started_at = None;
        if cause == ExitCause::Requested || !policy.autorestart {
            return Decision::Stay;
        }
        let unstable = uptime < policy.min_uptime;
        if unstable {
            if self.unstable_in_a_row >= policy.max_restarts {
                self.errored = true;
                return Decision::Errored {
                    unstable_restarts: self.unstable_in_a_row,
                };
            }
            self.unstable_in_a_row += 1;
        } else {
            self.unstable_in_a_row = 0;
            self.backoff = None;
        }
        let after = match policy.exp_backoff {
            Some(initial) => {
                let current = self.backoff.unwrap_or(initial).min(BACKOFF_CAP);
                self.backoff = Some(grow(current));
                current
            }
            None if unstable => {
                let current = self.backoff.unwrap_or(CRASH_LOOP_BACKOFF_START);
                self.backoff = Some(grow(current));
                policy.restart_delay.max(current)
            }
            None => policy.restart_delay,
        };
        self.total_restarts = self.total_restarts.saturating_add(1);
        Decision::Restart { after, unstable }
    }

    /// A user action (start, restart, reload): clears the unstable count, the
    /// backoff and the errored state; keeps the total restart count.
    pub fn reset(&mut self) {
        self.unstable_in_a_row = 0;
        self.backoff = None;
        self.errored = false;
    }

    /// Unstable exits in a row so far.
    pub fn unstable_restarts(&self) -> u32 {
        self.unstable_in_a_row
    }

    /// Automatic restarts ever decided.
    pub fn total_restarts(&self) -> u32 {
        self.total_restarts
    }

    /// Whether the tracker gave up on a crash loop.
    pub fn is_errored(&self) -> bool {
        self.errored
    }

    /// Uptime of the current process at `now`, if one is running.
    pub fn uptime(&self, now: Duration) -> Option<Duration> {
        self.started_at.map(|start| now.saturating_sub(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-driven clock: plain durations since an arbitrary epoch.
    #[derive(Debug, Default)]
    struct FakeClock(Duration);

    impl FakeClock {
        fn advance(&mut self, ms: u64) -> Duration {
            self.0 += Duration::from_millis(ms);
            self.0
        }
    }

    /// A tracker, its policy and a fake clock.
    struct Sim {
        t: RestartTracker,
        p: RestartPolicy,
        c: FakeClock,
    }

    fn sim(edit: impl FnOnce(&mut RestartPolicy)) -> Sim {
        let mut p = RestartPolicy::default();
        edit(&mut p);
        let (t, c) = (RestartTracker::new(), FakeClock::default());
        Sim { t, p, c }
    }

    impl Sim {
        /// Spawns, runs `run_ms`, exits unexpectedly, then waits out any restart delay.
        fn run(&mut self, run_ms: u64) -> Decision {
            self.t.on_spawn(self.c.0);
            let now = self.c.advance(run_ms);
            let d = self.t.on_exit(&self.p, now, ExitCause::Unexpected);
            if let Decision::Restart { after, .. } = d {
                self.c.0 += after;
            }
            d
        }

        fn delay(&mut self, run_ms: u64) -> u128 {
            match self.run(run_ms) {
                Decision::Restart { after, .. } => after.as_millis(),
                d => panic!("expected a restart, got {d:?}"),
            }
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn restart(after_ms: u64, unstable: bool) -> Decision {
        let after = ms(after_ms);
        Decision::Restart { after, unstable }
    }

    fn errored(unstable_restarts: u32) -> Decision {
        Decision::Errored { unstable_restarts }
    }

    #[test]
    fn requested_exit_stays_and_is_not_unstable() {
        let mut s = sim(|_| {});
        s.t.on_spawn(ms(0));
        assert_eq!(
            s.t.on_exit(&s.p, ms(5), ExitCause::Requested),
            Decision::Stay
        );
        assert_eq!((s.t.unstable_restarts(), s.t.total_restarts()), (0, 0));
    }

    #[test]
    fn autorestart_off_stays() {
        let mut s = sim(|p| p.autorestart = false);
        s.t.on_spawn(ms(0));
        assert_eq!(
            s.t.on_exit(&s.p, ms(5), ExitCause::Unexpected),
            Decision::Stay
        );
        assert!(!s.t.is_errored());
    }

    #[test]
    fn stable_exit_resets_unstable_count_and_backoff() {
        let mut s = sim(|_| {});
        s.run(10);
        assert_eq!(s.run(10), restart(150, true));
        assert_eq!(s.t.unstable_restarts(), 2);
        assert_eq!(s.run(1000), restart(0, false));
        assert_eq!(s.t.unstable_restarts(), 0);
        assert_eq!(s.run(10), restart(100, true));
    }

    #[test]
    fn errored_after_max_restarts_unstable() {
        let mut s = sim(|p| p.max_restarts = 3);
        for _ in 0..3 {
            assert!(matches!(
                s.run(10),
                Decision::Restart { unstable: true, .. }
            ));
        }
        assert!(!s.t.is_errored());
        assert_eq!(s.run(10), errored(3));
        assert!(s.t.is_errored());
    }

    #[test]
    fn zero_max_restarts_errors_on_first_unstable_exit() {
        let mut s = sim(|p| p.max_restarts = 0);
        assert_eq!(s.run(10), errored(0));
        assert!(s.t.is_errored());
    }

    #[test]
    fn crash_loop_detection_never_switches_off() {
        let hour = 3_600_000;
        for exp_backoff in [None, Some(ms(100)), Some(ms(10_000))] {
            let mut s = sim(|p| p.exp_backoff = exp_backoff);
            s.c.advance(hour); // absolute time is already large at the first start
            assert_eq!(s.run(hour).into_unstable(), Some(false));
            for _ in 0..10 {
                assert_eq!(s.run(10).into_unstable(), Some(true));
            }
            assert!(s.c.0 > ms(2 * hour));
            assert_eq!(s.run(10), errored(10));
            assert!(s.t.is_errored());
        }
        // Long waits between crashes (far beyond PM2's 16 s window) still count,
        // and so does a large exponential backoff.
        let mut s = sim(|p| (p.max_restarts, p.restart_delay) = (2, ms(60_000)));
        s.run(10);
        s.run(10);
        s.c.advance(24 * hour);
        assert_eq!(s.run(10), errored(2));
        let mut s = sim(|p| (p.max_restarts, p.exp_backoff) = (30, Some(ms(14_000))));
        for _ in 0..30 {
            s.run(10);
        }
        assert!(s.c.0 > ms(400_000));
        assert_eq!(s.run(10), errored(30));
    }

    #[test]
    fn exp_backoff_grows_caps_and_resets_on_stable_exit() {
        let mut s = sim(|p| (p.exp_backoff, p.max_restarts) = (Some(ms(1000)), 100));
        let delays: Vec<u128> = (0..10).map(|_| s.delay(10)).collect();
        let want = [
            1000, 1500, 2250, 3375, 5062, 7593, 11390, 15000, 15000, 15000,
        ];
        assert_eq!(delays, want);
        // Stable exits also wait the backoff; a stable exit resets it to `initial`.
        assert_eq!(s.run(5000), restart(1000, false));
        assert_eq!(s.run(5000), restart(1000, false));
        assert_eq!(s.run(10), restart(1500, true));
        assert_eq!(s.run(10), restart(2250, true));
    }

    #[test]
    fn exp_backoff_initial_above_cap_is_capped() {
        let mut s = sim(|p| p.exp_backoff = Some(Duration::MAX));
        assert_eq!(s.run(10), restart(15_000, true));
        assert_eq!(s.run(10), restart(15_000, true));
    }

    #[test]
    fn crash_loop_backoff_without_exp_backoff() {
        let mut s = sim(|p| p.max_restarts = 100);
        let delays: Vec<u128> = (0..16).map(|_| s.delay(10)).collect();
        assert_eq!(&delays[..4], [100, 150, 225, 337]);
        assert_eq!(&delays[12..], [12974, 15000, 15000, 15000]);
    }

    #[test]
    fn restart_delay_applies_to_stable_and_bounds_unstable() {
        let mut s = sim(|p| p.restart_delay = ms(200));
        assert_eq!(s.run(2000), restart(200, false));
        assert_eq!(s.run(10), restart(200, true));
        assert_eq!(s.run(10), restart(200, true));
        assert_eq!(s.run(10), restart(225, true));
    }

    #[test]
    fn reset_clears_errored_count_and_backoff_but_not_total() {
        let mut s = sim(|p| p.max_restarts = 2);
        s.run(10);
        s.run(10);
        assert_eq!(s.run(10), errored(2));
        s.t.reset();
        assert!(!s.t.is_errored());
        assert_eq!((s.t.unstable_restarts(), s.t.total_restarts()), (0, 2));
        assert_eq!(s.run(10), restart(100, true));
    }

    #[test]
    fn total_restarts_counts_restart_decisions_only() {
        let mut s = sim(|p| p.max_restarts = 1);
        assert_eq!(s.run(10), restart(100, true));
        assert_eq!(s.run(10), errored(1));
        s.t.on_spawn(s.c.0);
        let now = s.c.advance(10);
        assert_eq!(s.t.on_exit(&s.p, now, ExitCause::Requested), Decision::Stay);
        assert_eq!(s.t.total_restarts(), 1);
    }

    #[test]
    fn uptime_tracks_current_process() {
        let mut s = sim(|_| {});
        assert_eq!(s.t.uptime(ms(5)), None);
        s.t.on_spawn(ms(100));
        assert_eq!(s.t.uptime(ms(350)), Some(ms(250)));
        s.t.on_exit(&s.p, ms(400), ExitCause::Unexpected);
        assert_eq!(s.t.uptime(ms(500)), None);
    }

    #[test]
    fn exit_without_spawn_is_unstable() {
        let mut s = sim(|_| {});
        let d = s.t.on_exit(&s.p, ms(5000), ExitCause::Unexpected);
        assert_eq!(d, restart(100, true));
    }

    impl Decision {
        fn into_unstable(self) -> Option<bool> {
            match self {
                Decision::Restart { unstable, .. } => Some(unstable),
                _ => None,
            }
        }
    }

    #[test]
    fn random_sequences_keep_invariants() {
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = |bound: u64| {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005);
            seed = seed.wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % bound
        };
        for _ in 0..500 {
            let mut s = sim(|p| {
                p.autorestart = next(8) != 0;
                p.min_uptime = ms(next(2000));
                p.max_restarts = next(6) as u32;
                p.restart_delay = ms(next(3) * next(1000));
                p.exp_backoff = (next(2) == 0).then(|| ms(next(20_000)));
            });
            let mut restarts = 0;
            for _ in 0..200 {
                s.t.on_spawn(s.c.0);
                let before = s.t.unstable_restarts();
                let now = s.c.advance(next(4) * next(1500));
                let requested = next(6) == 0;
                let cause = [ExitCause::Unexpected, ExitCause::Requested][usize::from(requested)];
                let was_unstable = s.t.uptime(now).unwrap() < s.p.min_uptime;
                match s.t.on_exit(&s.p, now, cause) {
                    Decision::Restart { after, unstable } => {
                        restarts += 1;
                        assert!(after <= BACKOFF_CAP + s.p.restart_delay);
                        assert_eq!(unstable, was_unstable);
                        assert!(s.t.unstable_restarts() <= s.p.max_restarts);
                        s.c.0 += after;
                    }
                    Decision::Stay => {
                        assert!(requested || !s.p.autorestart);
                        assert_eq!(s.t.unstable_restarts(), before);
                    }
                    Decision::Errored { unstable_restarts } => {
                        assert!(was_unstable && s.t.is_errored());
                        assert_eq!(unstable_restarts, s.p.max_restarts);
                        assert_eq!(before, s.p.max_restarts);
                        s.t.reset();
                    }
                }
                assert_eq!(s.t.total_restarts(), restarts);
            }
        }
    }
}
