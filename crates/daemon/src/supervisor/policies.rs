//! The runtime policies of an app, each one more reason to replace an instance: its memory
//! limit, its cron schedule, its watched files, its health check, its watchdog. Each only
//! notices; what a replacement means (overlap or stop first, counting, crash loops) is the
//! lifecycle core's.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use corral_policy::lifecycle::{Cause, Input, Source, Transition};
use corral_proto::HealthCheck;
use tokio::sync::mpsc;

use super::Supervisor;
use crate::inbox::Event;
use crate::probe::{self, ExecContext, Exits, Outcome};
use crate::watch::{Change, WatchSpec, Watcher};
use crate::{cron, stats};

/// How often the memory of the apps with a limit is sampled.
pub const MEMORY_SAMPLE: Duration = Duration::from_secs(1);
/// How often a process not ready yet is probed (capped by its check's interval).
const STARTUP_PROBE_PACE: Duration = Duration::from_millis(200);

impl Supervisor {
    pub(super) fn policy_event(&mut self, event: Event) {
        match event {
            Event::Watchdog { pid } => {
                if let Some(io) = self.procs.get_mut(&pid) {
                    io.watchdog = Some(Instant::now());
                }
            }
            Event::WatchdogCheck { pid } => self.watchdog_check(pid),
            Event::Probed { pid, outcome } => self.probed(pid, outcome),
            Event::MemoryTick => self.memory_tick(),
            Event::Cron { app } => {
                let expr = self
                    .apps
                    .iter()
                    .find(|a| a.spec.name == app)
                    .and_then(|a| a.spec.cron_restart.clone());
                if let Some(expr) = expr {
                    self.roll_for(&app, Cause::Cron, &format!("its cron schedule '{expr}'"));
                }
            }
            Event::Watched { app, change } => {
                let detail = changed(&change);
                self.roll_for(&app, Cause::Watch, &detail);
            }
            Event::WatchStarted { app, watcher } => self.watch_started(&app, watcher),
            _ => {}
        }
    }

    /// What app `a` needs besides its processes: its cron task, its file watcher.
    pub(super) fn start_app_policies(&mut self, a: usize) {
        let app = &mut self.apps[a];
        let name = app.spec.name.clone();
        if let Some(expr) = &app.spec.cron_restart {
            match cron::Schedule::parse(expr) {
                Ok(schedule) => {
                    let events = self.events.clone();
                    let task = tokio::spawn(cron_loop(schedule, name.clone(), events));
                    app.cron = Some(task.abort_handle());
                }
                Err(why) => crate::log!("app '{name}': no cron restarts: {why}"),
            }
        }
        if !app.spec.watch.is_empty() {
            let spec = WatchSpec {
                paths: app.spec.watch.clone(),
                ignore: app.spec.ignore_watch.clone(),
                delay: Duration::from_millis(app.spec.watch_delay_ms),
            };
            // Setting up walks the whole tree: off the supervisor's task.
            let events = self.events.clone();
            tokio::task::spawn_blocking(move || {
                let on_change = {
                    let (events, app) = (events.clone(), name.clone());
                    Box::new(move |change| {
                        let _ = events.send(Event::Watched {
                            app: app.clone(),
                            change,
                        });
                    })
                };
                let watcher = Watcher::start(spec, on_change);
                let _ = events.send(Event::WatchStarted { app: name, watcher });
            });
        }
    }

    fn watch_started(&mut self, name: &str, watcher: Result<Watcher, crate::watch::WatchError>) {
        let Some(a) = self.apps.iter().position(|a| a.spec.name == name) else {
            return;
        };
        match watcher {
            Ok(watcher) => {
                crate::log!(
                    "app '{name}': watching {} directorie(s) for changes",
                    watcher.directories()
                );
                self.apps[a].watcher = Some(watcher);
            }
            Err(why) => {
                let detail = format!("not watching its files: {why}");
                crate::log!("app '{name}': {detail}");
                if let Some(id) = self.apps[a].instances.first().map(|i| i.id) {
                    self.note(id, Cause::Watch, detail);
                }
            }
        }
    }

    /// An event about an instance that changes nothing of its status.
    fn note(&mut self, id: u32, cause: Cause, detail: String) {
        let Some(inst) = self.instance(id) else {
            return;
        };
        let phase = inst.slot.phase();
        let pid = inst.slot.current().map(|p| p.pid);
        let transition = Transition {
            pid,
            from: phase,
            to: phase,
            cause,
            detail,
        };
        self.record(id, transition);
    }

    /// What a new process of app `a` is watched by: its health check, its watchdog, the memory
    /// sampler.
    pub(super) fn watch_process(&mut self, a: usize, pid: u32) {
        let app = &self.apps[a];
        let spec = &app.spec;
        let Some(id) = self.procs.get(&pid).map(|p| p.id) else {
            return;
        };
        let index = self.instance(id).map_or(0, |i| i.index);
        if let Some(check) = spec.health.clone() {
            let mut env = app.base_env.clone();
            env.extend(spec.env.clone());
            env.insert("CORRAL_APP".into(), spec.name.clone());
            env.insert("CORRAL_INSTANCE".into(), index.to_string());
            env.insert("CORRAL_PID".into(), pid.to_string());
            let exec = ExecContext {
                cwd: spec.cwd.clone(),
                env,
            };
            let paced = Arc::new(AtomicBool::new(false));
            let task = tokio::spawn(health_loop(
                check,
                pid,
                exec,
                self.exits.clone(),
                self.events.clone(),
                paced.clone(),
            ));
            if let Some(io) = self.procs.get_mut(&pid) {
                io.health = Some((task.abort_handle(), paced));
            }
        }
        if let Some(watchdog) = spec.watchdog_ms {
            self.after(
                Duration::from_millis(watchdog),
                Event::WatchdogCheck { pid },
            );
        }
        if spec.max_memory_restart.is_some() && !self.memory_tick_pending {
            self.memory_tick_pending = true;
            self.after(MEMORY_SAMPLE, Event::MemoryTick);
        }
    }

    /// Replaces instance `id`'s current process `pid` for a policy's reason.
    fn replace_for(&mut self, id: u32, pid: u32, cause: Cause, detail: String) {
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        if self.apps[a].instances[i]
            .slot
            .current()
            .is_none_or(|p| p.pid != pid)
        {
            return;
        }
        let overlap = self.apps[a].overlaps();
        self.feed(
            id,
            Input::Replace {
                cause,
                overlap,
                detail,
            },
        );
    }

    /// Whether `pid` is a ready process of its instance that is not being stopped.
    fn serving(&self, id: u32, pid: u32) -> Option<bool> {
        let proc = self.instance(id)?.slot.procs().find(|p| p.pid == pid)?;
        proc.stopping.is_none().then_some(proc.ready)
    }

    fn probed(&mut self, pid: u32, outcome: Outcome) {
        let Some(io) = self.procs.get_mut(&pid) else {
            return;
        };
        let id = io.id;
        let Some(ready) = self.serving(id, pid) else {
            return;
        };
        let io = self.procs.get_mut(&pid).expect("checked");
        if !ready {
            // Before it is ready only a pass matters: it is the readiness signal of
            // `--ready-when probe`, and failures of a program still starting count for nothing.
            if outcome == Outcome::Healthy {
                let source = Source::Probe;
                self.feed(id, Input::Ready { pid, source });
            }
            return;
        }
        if let Some((_, paced)) = &io.health {
            paced.store(true, Ordering::Relaxed);
        }
        let Outcome::Unhealthy(why) = outcome else {
            io.health_failures = 0;
            return;
        };
        io.health_failures += 1;
        let failures = io.health_failures;
        let Some((a, _)) = self.locate(id) else {
            return;
        };
        let threshold = self.apps[a]
            .spec
            .health
            .as_ref()
            .map_or(u32::MAX, |h| h.failures);
        let name = self.apps[a].spec.name.clone();
        crate::log!("app '{name}' pid {pid}: health check failed ({failures}/{threshold}): {why}");
        if failures == threshold {
            let detail = format!("its health check failed {failures} time(s) in a row: {why}");
            self.replace_for(id, pid, Cause::Health, detail);
        }
    }

    fn watchdog_check(&mut self, pid: u32) {
        let Some(io) = self.procs.get(&pid) else {
            return;
        };
        let id = io.id;
        let Some((a, _)) = self.locate(id) else {
            return;
        };
        let Some(limit) = self.apps[a].spec.watchdog_ms.map(Duration::from_millis) else {
            return;
        };
        let Some(ready) = self.serving(id, pid) else {
            return;
        };
        let io = self.procs.get_mut(&pid).expect("checked");
        if io.watchdog_fired {
            return;
        }
        // The watchdog runs once the process is ready, as systemd's does once start-up is over.
        let since = match (ready, io.watchdog) {
            (false, _) => None,
            (true, None) => {
                io.watchdog = Some(Instant::now());
                None
            }
            (true, Some(last)) => Some(last.elapsed()),
        };
        match since {
            Some(silent) if silent > limit => {
                io.watchdog_fired = true;
                let detail = format!(
                    "no WATCHDOG=1 for {}ms (its watchdog is {}ms)",
                    silent.as_millis(),
                    limit.as_millis()
                );
                self.replace_for(id, pid, Cause::Watchdog, detail);
            }
            Some(silent) => self.after(limit.saturating_sub(silent), Event::WatchdogCheck { pid }),
            None => self.after(limit, Event::WatchdogCheck { pid }),
        }
    }

    /// Samples the memory of every process group of the apps with a limit, in one pass over
    /// `/proc`, and replaces the instances over it.
    fn memory_tick(&mut self) {
        self.memory_tick_pending = false;
        let limited: Vec<(u32, u32, u64)> = self
            .apps
            .iter()
            .filter_map(|app| Some((app, app.spec.max_memory_restart?)))
            .flat_map(|(app, limit)| {
                app.instances
                    .iter()
                    .filter(|i| !i.agent)
                    .filter_map(move |i| {
                        let p = i.slot.current().filter(|p| p.stopping.is_none())?;
                        Some((i.id, p.pid, limit))
                    })
            })
            .collect();
        if limited.is_empty() {
            return;
        }
        let groups: HashSet<u32> = limited.iter().map(|&(_, pid, _)| pid).collect();
        let rss = stats::group_resident_bytes(&groups);
        for (id, pid, limit) in limited {
            let used = rss.get(&pid).copied().unwrap_or(0);
            let replacing = self.instance(id).is_some_and(|i| i.slot.is_replacing());
            if used > limit && !replacing {
                let detail = format!(
                    "its process group uses {} of memory, over its limit of {}",
                    human(used),
                    human(limit)
                );
                self.replace_for(id, pid, Cause::Memory, detail);
            }
        }
        self.memory_tick_pending = true;
        self.after(MEMORY_SAMPLE, Event::MemoryTick);
    }
}

/// Sizes as people read them: `300.0M`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "K", "M", "G"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

fn changed(change: &Change) -> String {
    let first: Vec<String> = change
        .paths
        .iter()
        .take(3)
        .map(|p| p.display().to_string())
        .collect();
    let more = change.count.saturating_sub(first.len());
    let rest = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "{} file(s) changed: {}{rest}",
        change.count,
        first.join(", ")
    )
}

/// Says when `schedule` matches, for app `app`, until aborted with the app.
async fn cron_loop(schedule: cron::Schedule, app: String, events: mpsc::UnboundedSender<Event>) {
    loop {
        let now = SystemTime::now();
        let Some(next) = schedule.next_after(now) else {
            crate::log!(
                "app '{app}': its cron schedule '{}' never matches again",
                schedule.expression()
            );
            return;
        };
        tokio::time::sleep(next.duration_since(now).unwrap_or_default()).await;
        if events.send(Event::Cron { app: app.clone() }).is_err() {
            return;
        }
    }
}

/// Probes process `pid` until aborted: quickly while it is not ready, every interval after.
async fn health_loop(
    check: HealthCheck,
    pid: u32,
    exec: ExecContext,
    exits: Exits,
    events: mpsc::UnboundedSender<Event>,
    paced: Arc<AtomicBool>,
) {
    let interval = Duration::from_millis(check.interval_ms);
    let timeout = Duration::from_millis(check.timeout_ms);
    loop {
        let pause = if paced.load(Ordering::Relaxed) {
            interval
        } else {
            STARTUP_PROBE_PACE.min(interval)
        };
        tokio::time::sleep(pause).await;
        let outcome = probe::run(&check.probe, &exec, &exits, timeout).await;
        if events.send(Event::Probed { pid, outcome }).is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_changes_read_well() {
        assert_eq!(human(300 * 1024 * 1024), "300.0M");
        assert_eq!(human(512), "512.0B");
        let change = Change {
            paths: vec!["/a/x.js".into(), "/a/y.js".into()],
            count: 7,
        };
        assert_eq!(
            changed(&change),
            "7 file(s) changed: /a/x.js, /a/y.js and 5 more"
        );
    }
}
