//! The lifecycle core with a fake clock and no processes: every transition, and the bugs found
//! by hand as regression tests.

use std::time::Duration;

use super::*;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A slot, its settings, a clock advanced by hand, and everything it decided.
struct Sim {
    slot: Slot,
    settings: Settings,
    now: Duration,
    next_pid: u32,
    actions: Vec<Action>,
}

fn sim(edit: impl FnOnce(&mut Settings)) -> Sim {
    let mut settings = Settings::default();
    edit(&mut settings);
    Sim {
        slot: Slot::new(),
        settings,
        now: ms(1_000_000),
        next_pid: 100,
        actions: Vec::new(),
    }
}

impl Sim {
    fn feed(&mut self, input: Input) -> Vec<Action> {
        let actions = self.slot.handle(&self.settings, input, self.now);
        self.actions.extend(actions.iter().cloned());
        actions
    }

    fn at(&mut self, advance_ms: u64) -> &mut Sim {
        self.now += ms(advance_ms);
        self
    }

    /// Answers a spawn with a new pid; returns it.
    fn spawned(&mut self) -> u32 {
        self.next_pid += 1;
        let pid = self.next_pid;
        self.feed(Input::Spawned { pid });
        pid
    }

    /// Starts the slot and makes its process ready; returns its pid.
    fn online(&mut self) -> u32 {
        let actions = self.feed(Input::Start(Cause::Start));
        assert!(actions.contains(&Action::Spawn), "{actions:?}");
        let pid = self.spawned();
        self.feed(Input::Ready {
            pid,
            source: Source::Word,
        });
        assert_eq!(self.slot.phase(), Phase::Online);
        pid
    }

    fn exit(&mut self, pid: u32, code: i32) -> Vec<Action> {
        self.feed(Input::Exited {
            pid,
            exit: Exit::Code(code),
            how: format!("exited with code {code}"),
            group_left: false,
        })
    }

    fn timer(&mut self, timer: Timer) -> Vec<Action> {
        self.feed(Input::Timer(timer))
    }

    fn causes(&self) -> Vec<(Phase, Phase, Cause)> {
        self.actions
            .iter()
            .filter_map(|a| match a {
                Action::Event(t) => Some((t.from, t.to, t.cause)),
                _ => None,
            })
            .collect()
    }
}

fn stop(pid: u32, step: StopStep) -> Action {
    Action::Stop { pid, step }
}

fn timer(after: Duration, timer: Timer) -> Action {
    Action::SetTimer { after, timer }
}

fn replaced(actions: &[Action]) -> Option<Result<(), String>> {
    actions.iter().find_map(|a| match a {
        Action::Replaced(r) => Some(r.clone()),
        _ => None,
    })
}

#[test]
fn a_program_that_says_nothing_is_online_after_min_uptime() {
    let mut s = sim(|_| {});
    let actions = s.feed(Input::Start(Cause::Start));
    assert_eq!(actions[0], Action::Spawn);
    let pid = s.spawned();
    assert!(s.actions.contains(&timer(ms(1000), Timer::Uptime(pid))));
    assert_eq!(s.slot.phase(), Phase::Starting);
    assert_eq!(s.slot.routable(), None);
    s.at(1000).timer(Timer::Uptime(pid));
    assert_eq!(s.slot.phase(), Phase::Online);
    assert_eq!(s.slot.routable(), Some(pid));
    assert_eq!(
        s.causes(),
        [
            (Phase::Stopped, Phase::Starting, Cause::Start),
            (Phase::Starting, Phase::Online, Cause::Ready)
        ]
    );
    assert_eq!(s.slot.restarts(), 0, "a first start is no restart");
}

#[test]
fn zero_min_uptime_is_online_at_once() {
    let mut s = sim(|st| st.restart.min_uptime = Duration::ZERO);
    s.feed(Input::Start(Cause::Start));
    let pid = s.spawned();
    assert_eq!(s.slot.routable(), Some(pid));
}

/// Regression: a process that says `ready` just after its listen timeout, while it is being
/// stopped, was taken as ready; the app then flapped between starting and online for ever.
#[test]
fn a_process_being_stopped_never_becomes_ready_and_the_late_ready_case_ends_errored() {
    let mut s = sim(|st| {
        st.ready_by = ReadyBy::Word;
        st.restart.max_restarts = 2;
        st.restart.min_uptime = ms(100);
    });
    s.feed(Input::Start(Cause::Start));
    for round in 0..3 {
        let pid = s.spawned();
        let actions = s.at(3000).timer(Timer::ReadyDeadline(pid));
        assert!(
            actions.contains(&stop(pid, StopStep::Signal)),
            "{actions:?}"
        );
        assert_eq!(s.slot.phase(), Phase::Stopping);
        let late = s.feed(Input::Ready {
            pid,
            source: Source::Word,
        });
        assert!(!late.contains(&Action::Route), "{late:?}");
        assert_eq!(s.slot.phase(), Phase::Stopping);
        assert_eq!(s.slot.routable(), None);
        // Its exit after 3 s is unstable although min_uptime is 100 ms: it never started.
        let after = s.exit(pid, 143);
        if round < 2 {
            assert_eq!(s.slot.unstable_restarts(), round + 1);
            assert_eq!(s.slot.phase(), Phase::BackingOff, "{after:?}");
            let generation = s.slot.generation;
            s.at(10_000).timer(Timer::Backoff(generation));
        }
    }
    assert_eq!(s.slot.phase(), Phase::Errored);
    assert!(
        s.slot.last_exit().unwrap().contains("crash loop"),
        "{:?}",
        s.slot.last_exit()
    );
    assert!(
        s.slot
            .last_exit()
            .unwrap()
            .contains("did not say it is ready"),
        "{:?}",
        s.slot.last_exit()
    );
}

/// Regression: a reload step advanced on a new process that was being stopped for its late
/// `ready`; now the step fails and the old process keeps serving.
#[test]
fn a_reload_advances_only_on_a_process_that_is_ready_and_not_stopping() {
    let mut s = sim(|st| st.ready_by = ReadyBy::Word);
    let old = s.online();
    s.feed(Input::Replace {
        cause: Cause::Reload,
        overlap: true,
        detail: "reload".into(),
    });
    let new = s.spawned();
    assert_eq!(
        s.slot.routable(),
        Some(old),
        "the old one serves while the new one starts"
    );
    s.at(3000).timer(Timer::ReadyDeadline(new));
    let late = s.feed(Input::Ready {
        pid: new,
        source: Source::Word,
    });
    assert_eq!(replaced(&late), None, "{late:?}");
    let exit = s.exit(new, 143);
    let result = replaced(&exit).expect("the replace is over");
    assert!(result.unwrap_err().contains("did not say it is ready"));
    assert_eq!(s.slot.routable(), Some(old));
    assert_eq!(s.slot.phase(), Phase::Online);
    assert_eq!(
        s.slot.unstable_restarts(),
        0,
        "a person's reload is no crash"
    );
}

#[test]
fn a_reload_step_starts_the_new_process_before_retiring_the_old() {
    let mut s = sim(|st| {
        st.ready_by = ReadyBy::Word;
        st.stop = StopStyle::Notice;
    });
    let old = s.online();
    s.feed(Input::Replace {
        cause: Cause::Reload,
        overlap: true,
        detail: "reload".into(),
    });
    let new = s.spawned();
    let ready = s.feed(Input::Ready {
        pid: new,
        source: Source::Word,
    });
    assert_eq!(replaced(&ready), Some(Ok(())));
    assert!(ready.contains(&stop(old, StopStep::Notice)), "{ready:?}");
    assert!(ready.contains(&timer(ms(800), Timer::StopSignal(old))));
    assert!(ready.contains(&timer(ms(1600), Timer::Kill(old))));
    assert_eq!(s.slot.routable(), Some(new));
    assert_eq!(s.slot.old().len(), 1);
    s.exit(old, 0);
    assert!(s.slot.old().is_empty());
    assert_eq!(
        (s.slot.restarts(), s.slot.last_restart()),
        (1, Some(Cause::Reload))
    );
}

#[test]
fn a_process_ended_for_not_becoming_ready_counts_as_unstable() {
    let mut s = sim(|st| {
        st.ready_by = ReadyBy::Probe;
        st.ready_timeout = ms(5000);
    });
    s.feed(Input::Start(Cause::Start));
    let pid = s.spawned();
    // A word is not a probe: with --ready-when probe only the probe counts.
    s.feed(Input::Ready {
        pid,
        source: Source::Word,
    });
    assert_eq!(s.slot.phase(), Phase::Starting);
    s.at(5000).timer(Timer::ReadyDeadline(pid));
    s.exit(pid, 1);
    assert_eq!(s.slot.unstable_restarts(), 1);
}

#[test]
fn every_restart_counts_whatever_its_cause_and_reset_clears_them() {
    let mut s = sim(|st| st.ready_by = ReadyBy::Word);
    let pid = s.online();
    s.at(5000).exit(pid, 1);
    let pid = s.spawned();
    assert_eq!(
        (s.slot.restarts(), s.slot.last_restart()),
        (1, Some(Cause::Crash))
    );
    s.feed(Input::Ready {
        pid,
        source: Source::Word,
    });
    s.feed(Input::Restart(Cause::Restart));
    assert_eq!(s.slot.phase(), Phase::Stopping);
    let after = s.exit(pid, 0);
    assert!(after.contains(&Action::Spawn), "{after:?}");
    let pid = s.spawned();
    assert_eq!(
        (s.slot.restarts(), s.slot.last_restart()),
        (2, Some(Cause::Restart))
    );
    s.feed(Input::Ready {
        pid,
        source: Source::Word,
    });
    s.feed(Input::Replace {
        cause: Cause::Memory,
        overlap: true,
        detail: "memory".into(),
    });
    s.spawned();
    assert_eq!(
        (s.slot.restarts(), s.slot.last_restart()),
        (3, Some(Cause::Memory))
    );
    s.feed(Input::Reset);
    assert_eq!((s.slot.restarts(), s.slot.last_restart()), (0, None));
}

#[test]
fn a_stop_takes_at_most_the_kill_timeout_from_the_first_notice_to_sigkill() {
    for (style, first) in [
        (StopStyle::Signal, StopStep::Signal),
        (StopStyle::Notice, StopStep::Notice),
    ] {
        let mut s = sim(|st| st.stop = style);
        let pid = s.online();
        let actions = s.feed(Input::Stop(Cause::Stop));
        assert_eq!(actions[0], stop(pid, first));
        let kill_at: Vec<Duration> = actions
            .iter()
            .filter_map(|a| match a {
                Action::SetTimer { after, timer } if *timer != Timer::Uptime(pid) => Some(*after),
                _ => None,
            })
            .collect();
        assert!(kill_at.iter().all(|&t| t <= ms(1600)), "{kill_at:?}");
        assert!(actions.contains(&timer(ms(1600), Timer::Kill(pid))));
        let signal = s.at(800).timer(Timer::StopSignal(pid));
        if style == StopStyle::Notice {
            assert_eq!(signal, [stop(pid, StopStep::Signal)]);
        } else {
            assert!(signal.is_empty(), "signaled at once already");
        }
        assert_eq!(
            s.at(800).timer(Timer::Kill(pid)),
            [stop(pid, StopStep::Kill)]
        );
        s.exit(pid, 137);
        assert_eq!(s.slot.phase(), Phase::Stopped);
        assert!(s.slot.is_down());
        assert!(
            s.timer(Timer::Kill(pid)).is_empty(),
            "a stale timer does nothing"
        );
    }
}

#[test]
fn a_node_worker_that_never_listens_is_online_after_min_uptime() {
    let mut s = sim(|st| {
        st.ready_by = ReadyBy::Listen {
            uptime_suffices: true,
        };
    });
    s.feed(Input::Start(Cause::Start));
    let pid = s.spawned();
    s.at(1000).timer(Timer::Uptime(pid));
    assert_eq!(s.slot.phase(), Phase::Online);
    s.at(2000).timer(Timer::ReadyDeadline(pid));
    assert_eq!(s.slot.phase(), Phase::Online, "still online, not ended");
}

#[test]
fn a_node_worker_of_a_listening_app_waits_for_listen_and_runs_on_at_the_timeout() {
    let mut s = sim(|st| {
        st.ready_by = ReadyBy::Listen {
            uptime_suffices: false,
        };
    });
    s.feed(Input::Start(Cause::Start));
    let pid = s.spawned();
    s.at(1000).timer(Timer::Uptime(pid));
    assert_eq!(s.slot.phase(), Phase::Starting, "min_uptime is not enough");
    let at_timeout = s.at(2000).timer(Timer::ReadyDeadline(pid));
    assert!(!at_timeout.iter().any(|a| matches!(a, Action::Stop { .. })));
    assert_eq!(s.slot.phase(), Phase::Online);
    // One that listens is ready when it does.
    let mut s = sim(|st| {
        st.ready_by = ReadyBy::Listen {
            uptime_suffices: false,
        };
    });
    s.feed(Input::Start(Cause::Start));
    let pid = s.spawned();
    s.feed(Input::Ready {
        pid,
        source: Source::Listening,
    });
    assert_eq!(s.slot.routable(), Some(pid));
}

#[test]
fn going_down_starts_the_replacement_at_once_and_lets_the_old_one_finish() {
    let mut s = sim(|_| {});
    let old = s.online();
    let actions = s.at(5000).feed(Input::GoingDown {
        pid: old,
        reason: "uncaught exception".into(),
    });
    assert!(actions.contains(&Action::Spawn), "{actions:?}");
    assert!(actions.contains(&timer(ms(1600), Timer::Kill(old))));
    assert!(
        !actions.iter().any(|a| matches!(a, Action::Stop { .. })),
        "it leaves by itself"
    );
    let new = s.spawned();
    assert_eq!(s.slot.old()[0].pid, old);
    assert_eq!(s.slot.current().unwrap().pid, new);
    s.exit(old, 1);
    assert!(s.slot.old().is_empty());
    assert_eq!(s.slot.last_restart(), Some(Cause::GoingDown));
}

#[test]
fn a_stop_exit_code_means_done() {
    let mut s = sim(|st| st.stop_exit_codes = vec![0, 3]);
    let pid = s.online();
    let actions = s.at(5000).exit(pid, 3);
    assert!(!actions.contains(&Action::Spawn));
    assert_eq!(s.slot.phase(), Phase::Stopped);
    assert!(
        s.causes()
            .contains(&(Phase::Online, Phase::Stopped, Cause::Done))
    );
    // Another code is a crash.
    s.feed(Input::Start(Cause::Start));
    let pid = s.spawned();
    let actions = s.at(5000).exit(pid, 4);
    assert!(actions.contains(&Action::Spawn), "{actions:?}");
}

#[test]
fn a_trigger_at_every_start_is_a_crash_loop() {
    let mut s = sim(|st| st.restart.max_restarts = 3);
    let mut pid = s.online();
    let mut errored = false;
    for _ in 0..10 {
        // Over its memory limit 200 ms after it started, every time.
        s.at(200);
        let actions = s.feed(Input::Replace {
            cause: Cause::Memory,
            overlap: true,
            detail: "memory over 100M".into(),
        });
        if s.slot.phase() == Phase::Errored {
            assert!(
                actions.contains(&stop(pid, StopStep::Signal)),
                "{actions:?} {:?}",
                s.causes()
            );
            errored = true;
            break;
        }
        let new = s.spawned();
        s.feed(Input::Ready {
            pid: new,
            source: Source::Word,
        });
        s.exit(pid, 0);
        pid = new;
        // Over again at 200 ms: held back by the backoff, carried out when it is over, and
        // still counted as unstable.
        s.at(200);
        let held = s.feed(Input::Replace {
            cause: Cause::Memory,
            overlap: true,
            detail: "memory over 100M".into(),
        });
        if s.slot.phase() == Phase::Errored {
            errored = true;
            break;
        }
        if let Some(wait) = held.iter().find_map(|a| match a {
            Action::SetTimer {
                after,
                timer: Timer::ReplaceDue,
            } => Some(*after),
            _ => None,
        }) {
            s.now += wait;
            s.timer(Timer::ReplaceDue);
            if s.slot.phase() == Phase::Errored {
                errored = true;
                break;
            }
            let new = s.spawned();
            s.feed(Input::Ready {
                pid: new,
                source: Source::Word,
            });
            s.exit(pid, 0);
            pid = new;
        }
    }
    assert!(errored, "{:?}", s.causes());
    assert!(
        s.slot.last_exit().unwrap().contains("memory"),
        "{:?}",
        s.slot.last_exit()
    );
}

#[test]
fn a_trigger_inside_the_backoff_of_a_young_process_waits() {
    let mut s = sim(|_| {});
    let pid = s.online();
    s.at(100).feed(Input::Replace {
        cause: Cause::Cron,
        overlap: true,
        detail: "cron".into(),
    });
    let new = s.spawned();
    s.feed(Input::Ready {
        pid: new,
        source: Source::Word,
    });
    s.exit(pid, 0);
    let again = s.at(10).feed(Input::Replace {
        cause: Cause::Cron,
        overlap: true,
        detail: "cron".into(),
    });
    assert!(!again.contains(&Action::Spawn), "{again:?}");
    assert!(matches!(
        again[..],
        [Action::SetTimer {
            timer: Timer::ReplaceDue,
            ..
        }]
    ));
}

#[test]
fn a_stop_first_replacement_stops_the_old_process_then_starts_the_new_one() {
    let mut s = sim(|st| st.stop = StopStyle::Notice);
    let old = s.online();
    let actions = s.feed(Input::Replace {
        cause: Cause::Reload,
        overlap: false,
        detail: "reload".into(),
    });
    assert_eq!(actions[0], stop(old, StopStep::Notice));
    assert!(!actions.contains(&Action::Spawn));
    assert_eq!(s.slot.phase(), Phase::Stopping);
    let after = s.exit(old, 0);
    assert!(after.contains(&Action::Spawn), "{after:?}");
    let new = s.spawned();
    let ready = s.feed(Input::Ready {
        pid: new,
        source: Source::Word,
    });
    assert_eq!(replaced(&ready), Some(Ok(())));
    assert_eq!(s.slot.last_restart(), Some(Cause::Reload));
}

#[test]
fn a_restart_waits_for_the_rest_of_the_old_group() {
    let mut s = sim(|_| {});
    let pid = s.online();
    s.feed(Input::Restart(Cause::Restart));
    let after = s.feed(Input::Exited {
        pid,
        exit: Exit::Code(0),
        how: "exited with code 0".into(),
        group_left: true,
    });
    assert!(!after.contains(&Action::Spawn), "{after:?}");
    assert!(!s.slot.is_down() || s.slot.awaiting_group.is_some());
    let gone = s.feed(Input::GroupGone { pid });
    assert!(gone.contains(&Action::Spawn), "{gone:?}");
}

#[test]
fn an_unresponsive_process_gets_no_connection_until_it_answers_again() {
    let mut s = sim(|_| {});
    let pid = s.online();
    let actions = s.feed(Input::Responsive {
        pid,
        answers: false,
    });
    assert!(actions.contains(&Action::Route));
    assert_eq!(s.slot.phase(), Phase::Unresponsive);
    assert_eq!(s.slot.routable(), None);
    s.feed(Input::Responsive { pid, answers: true });
    assert_eq!(
        (s.slot.phase(), s.slot.routable()),
        (Phase::Online, Some(pid))
    );
}

#[test]
fn a_stop_during_a_replacement_ends_both_and_the_replace() {
    let mut s = sim(|st| st.ready_by = ReadyBy::Word);
    let old = s.online();
    s.feed(Input::Replace {
        cause: Cause::Reload,
        overlap: true,
        detail: "reload".into(),
    });
    let new = s.spawned();
    let actions = s.feed(Input::Stop(Cause::Stop));
    assert_eq!(
        replaced(&actions),
        Some(Err("the instance was stopped".into()))
    );
    assert!(actions.contains(&stop(new, StopStep::Signal)));
    assert!(actions.contains(&stop(old, StopStep::Signal)));
    s.exit(new, 143);
    s.exit(old, 143);
    assert_eq!(s.slot.phase(), Phase::Stopped);
    assert!(s.slot.is_down());
}

#[test]
fn a_spawn_nobody_waits_for_is_killed() {
    let mut s = sim(|_| {});
    s.feed(Input::Start(Cause::Start));
    s.feed(Input::Stop(Cause::Stop));
    let actions = s.feed(Input::Spawned { pid: 7 });
    assert_eq!(actions, [stop(7, StopStep::Kill)]);
}

#[test]
fn a_crash_of_the_old_process_during_a_reload_step_lets_the_new_one_take_over() {
    let mut s = sim(|st| st.ready_by = ReadyBy::Word);
    let old = s.online();
    s.feed(Input::Replace {
        cause: Cause::Reload,
        overlap: true,
        detail: "reload".into(),
    });
    let new = s.spawned();
    let crash = s.at(5000).exit(old, 1);
    assert_eq!(replaced(&crash), None, "{crash:?}");
    assert_eq!(s.slot.current().unwrap().pid, new);
    let ready = s.feed(Input::Ready {
        pid: new,
        source: Source::Word,
    });
    assert_eq!(replaced(&ready), Some(Ok(())));
}

#[test]
fn a_permanent_spawn_failure_is_errored_at_once() {
    let mut s = sim(|_| {});
    s.feed(Input::Start(Cause::Start));
    s.feed(Input::SpawnFailed {
        error: "cannot start /x: no such file".into(),
        permanent: true,
    });
    assert_eq!(s.slot.phase(), Phase::Errored);
    assert_eq!(s.slot.last_exit(), Some("cannot start /x: no such file"));
}

/// Random inputs never break the invariants: at most one current, one next; a routable process
/// is ready and not stopping; an errored or stopped slot routes nothing.
#[test]
fn random_inputs_keep_the_invariants() {
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |bound: u64| {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005);
        seed = seed.wrapping_add(1_442_695_040_888_963_407);
        (seed >> 33) % bound
    };
    for _ in 0..300 {
        let ready_by = [
            ReadyBy::Uptime,
            ReadyBy::Word,
            ReadyBy::Probe,
            ReadyBy::Listen {
                uptime_suffices: true,
            },
        ][next(4) as usize];
        let mut s = sim(|st| {
            st.ready_by = ready_by;
            st.restart.max_restarts = next(4) as u32;
            st.stop = [StopStyle::Signal, StopStyle::Notice][next(2) as usize];
        });
        for _ in 0..120 {
            let pids: Vec<u32> = s.slot.procs().map(|p| p.pid).collect();
            let pid = pids
                .get(next(pids.len() as u64 + 1) as usize)
                .copied()
                .unwrap_or(999);
            let input = match next(12) {
                0 => Input::Start(Cause::Start),
                1 if s.slot.awaits_spawn() => {
                    s.next_pid += 1;
                    Input::Spawned { pid: s.next_pid }
                }
                2 => Input::Ready {
                    pid,
                    source: [Source::Word, Source::Listening, Source::Probe][next(3) as usize],
                },
                3 => Input::Exited {
                    pid,
                    exit: Exit::Code(next(4) as i32),
                    how: "exited".into(),
                    group_left: next(3) == 0,
                },
                4 => Input::GroupGone { pid },
                5 => Input::Stop(Cause::Stop),
                6 => Input::Restart(Cause::Restart),
                7 => Input::Replace {
                    cause: [Cause::Reload, Cause::Memory][next(2) as usize],
                    overlap: next(2) == 0,
                    detail: "x".into(),
                },
                8 => Input::Timer(
                    [
                        Timer::Uptime(pid),
                        Timer::ReadyDeadline(pid),
                        Timer::StopSignal(pid),
                        Timer::Kill(pid),
                        Timer::Backoff(s.slot.generation),
                    ][next(5) as usize],
                ),
                9 => Input::GoingDown {
                    pid,
                    reason: "x".into(),
                },
                10 => Input::Responsive {
                    pid,
                    answers: next(2) == 0,
                },
                _ => Input::End {
                    pid,
                    cause: Cause::Health,
                    detail: "x".into(),
                },
            };
            s.at(next(3000));
            s.feed(input);
            if let Some(pid) = s.slot.routable() {
                let p = s.slot.current().unwrap();
                assert!(p.pid == pid && p.ready && p.stopping.is_none());
                assert!(
                    matches!(s.slot.phase(), Phase::Online),
                    "{:?}",
                    s.slot.phase()
                );
            }
            if matches!(
                s.slot.phase(),
                Phase::Stopped | Phase::Errored | Phase::BackingOff
            ) {
                assert_eq!(s.slot.routable(), None);
            }
            let mut live: Vec<u32> = s.slot.procs().map(|p| p.pid).collect();
            let count = live.len();
            live.sort_unstable();
            live.dedup();
            assert_eq!(live.len(), count, "a pid in two roles");
        }
    }
}

#[test]
fn a_stop_exit_code_during_a_replacement_ends_the_replacement_too() {
    let mut s = sim(|st| {
        st.ready_by = ReadyBy::Word;
        st.stop_exit_codes = vec![0];
    });
    let old = s.online();
    s.feed(Input::Replace {
        cause: Cause::Cron,
        overlap: true,
        detail: "cron".into(),
    });
    let new = s.spawned();
    let done = s.at(5000).exit(old, 0);
    assert!(done.contains(&stop(new, StopStep::Signal)), "{done:?}");
    s.feed(Input::Ready {
        pid: new,
        source: Source::Word,
    });
    assert_eq!(s.slot.phase(), Phase::Stopped);
    assert_eq!(s.slot.routable(), None);
}
