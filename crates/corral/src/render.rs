//! How answers look in a terminal.

use std::fmt::Write as _;
use std::time::{Duration, UNIX_EPOCH};

use corral_proto::{AppInfo, AppSpec, InstanceInfo, LifecycleEvent, ReadyWhen, signal::Signal};

/// A plain text table: a header row, columns padded to their widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (cell, width) in cells.zip(&widths) {
            let _ = write!(text, "{cell:<width$}  ");
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `45s`, `12m`, `3h`, `2d`.
pub fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// `812.0 KiB`, `23.4 MiB`.
pub fn bytes(n: u64) -> String {
    let n = n as f64;
    if n < 1024.0 * 1024.0 {
        format!("{:.1} KiB", n / 1024.0)
    } else if n < 1024.0 * 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / 1024.0 / 1024.0)
    } else {
        format!("{:.2} GiB", n / 1024.0 / 1024.0 / 1024.0)
    }
}

/// The `ls` table.
pub fn instances(list: &[InstanceInfo]) -> String {
    if list.is_empty() {
        return "no app is running: start one with `corral start <script>`\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                i.id.to_string(),
                i.app.clone(),
                if i.role == corral_proto::Role::Agent {
                    "agent".into()
                } else {
                    i.instance.to_string()
                },
                i.pid.map_or_else(|| "-".into(), |p| p.to_string()),
                i.status.to_string(),
                i.uptime_ms.map_or_else(|| "-".into(), duration),
                match &i.last_restart {
                    Some(cause) if i.restarts > 0 => format!("{} ({cause})", i.restarts),
                    _ => i.restarts.to_string(),
                },
                if i.pid.is_some() {
                    format!("{:.0}%", i.cpu_percent)
                } else {
                    "-".into()
                },
                if i.pid.is_some() {
                    bytes(i.memory_bytes)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    let mut out = table(
        &[
            "id", "name", "inst", "pid", "status", "uptime", "restarts", "cpu", "memory",
        ],
        &rows,
    );
    let mut listening: Vec<(&str, &[String])> = Vec::new();
    for i in list {
        if !i.listen.is_empty() && !listening.iter().any(|(app, _)| *app == i.app) {
            listening.push((&i.app, &i.listen));
        }
    }
    for (app, addresses) in listening {
        let _ = writeln!(out, "{app} listens on {}", addresses.join(", "));
    }
    for i in list {
        if let (corral_proto::Status::Errored, Some(why)) = (i.status, &i.last_exit) {
            let _ = writeln!(out, "\n{} (id {}): {why}", i.app, i.id);
        }
    }
    out
}

/// Events on a `describe` page: the daemon keeps more, and `corral events` shows them.
const EVENTS_SHOWN: usize = 10;

/// The `describe` page.
pub fn app(info: &AppInfo) -> String {
    let s = &info.spec;
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<22}{value}");
    };
    program_fields(s, &mut field);
    let listen = info
        .instances
        .first()
        .map(|i| i.listen.join(", "))
        .unwrap_or_default();
    field(
        "listen",
        if listen.is_empty() {
            "-".into()
        } else {
            listen
        },
    );
    if s.is_node_cluster() {
        field(
            "exec mode",
            "cluster (corral is the Node.js cluster primary)".into(),
        );
    }
    field("load balancing", s.lb.to_string());
    field("ready", readiness(s));
    policy_fields(s, &mut field);
    out.push('\n');
    out.push_str(&instances(&info.instances));
    out.push('\n');
    for (index, out_path, err_path) in &info.log_files {
        let _ = writeln!(out, "logs of instance {index}: {}", out_path.display());
        let _ = writeln!(out, "{:<17}{}", "", err_path.display());
    }
    for i in &info.instances {
        if let Some(last) = &i.last_exit
            && i.status != corral_proto::Status::Errored
        {
            let _ = writeln!(out, "instance {} last exit: {last}", i.instance);
        }
    }
    if !info.events.is_empty() {
        out.push_str("\nlast events:\n");
        for e in &info.events[info.events.len().saturating_sub(EVENTS_SHOWN)..] {
            out.push_str(&event(e));
            out.push('\n');
        }
    }
    out
}

/// What runs, where, how it restarts, and its logs.
fn program_fields(s: &AppSpec, field: &mut impl FnMut(&str, String)) {
    field("name", s.name.clone());
    field("script", s.script.display().to_string());
    field(
        "args",
        if s.args.is_empty() {
            "-".into()
        } else {
            s.args.join(" ")
        },
    );
    field(
        "interpreter",
        s.interpreter
            .clone()
            .unwrap_or_else(|| "none (executed directly)".into()),
    );
    if !s.interpreter_args.is_empty() {
        field("interpreter args", s.interpreter_args.join(" "));
    }
    field("cwd", s.cwd.display().to_string());
    field("instances", s.instances.to_string());
    field("autorestart", s.autorestart.to_string());
    field("min uptime", format!("{}ms", s.min_uptime_ms));
    field("max restarts", s.max_restarts.to_string());
    field("restart delay", format!("{}ms", s.restart_delay_ms));
    field(
        "exp backoff",
        s.exp_backoff_restart_delay_ms
            .map_or_else(|| "off".into(), |d| format!("from {d}ms")),
    );
    field("kill timeout", format!("{}ms", s.kill_timeout_ms));
    field("stop signal", Signal::describe(s.stop_signal));
    field("log timestamps", s.time.to_string());
    field(
        "log rotation",
        if s.log_max_size == 0 {
            "off".into()
        } else {
            format!("at {}, keep {}", bytes(s.log_max_size), s.log_keep)
        },
    );
    let env: Vec<String> = s.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    field(
        "env",
        if env.is_empty() {
            "-".into()
        } else {
            env.join(" ")
        },
    );
}

/// What makes a new process ready.
fn readiness(s: &AppSpec) -> String {
    if s.ready_when == ReadyWhen::Probe {
        format!(
            "when its health check passes, within {}ms",
            s.listen_timeout_ms
        )
    } else if s.is_node_cluster() && !s.wait_ready {
        format!(
            "when a server of it listens, within {}ms",
            s.listen_timeout_ms
        )
    } else if s.needs_ready() {
        format!("when it says so, within {}ms", s.listen_timeout_ms)
    } else if s.lb == corral_proto::LbMode::Proxy {
        format!("when its PORT accepts, within {}ms", s.listen_timeout_ms)
    } else {
        format!("after {}ms up, or when it says so", s.min_uptime_ms)
    }
}

/// The lifecycle policies, each only when it is set.
fn policy_fields(s: &AppSpec, field: &mut impl FnMut(&str, String)) {
    if let Some(limit) = s.max_memory_restart {
        field("memory limit", format!("restart above {}", bytes(limit)));
    }
    if let Some(cron) = &s.cron_restart {
        field("cron restart", cron.clone());
    }
    if !s.watch.is_empty() {
        let paths: Vec<String> = s.watch.iter().map(|p| p.display().to_string()).collect();
        field(
            "watch",
            format!(
                "{}, reload {}ms after the last change",
                paths.join(", "),
                s.watch_delay_ms
            ),
        );
        // The daemon's watcher always leaves these two out.
        let mut ignored = vec!["node_modules".to_string(), ".git".to_string()];
        ignored.extend(s.ignore_watch.iter().cloned());
        field("watch ignores", ignored.join(", "));
    }
    if !s.stop_exit_codes.is_empty() {
        let codes: Vec<String> = s.stop_exit_codes.iter().map(i32::to_string).collect();
        field("stop exit codes", codes.join(", "));
    }
    if let Some(health) = &s.health {
        field(
            "health check",
            format!(
                "{} every {}ms, timeout {}ms, restart after {} failures in a row",
                health.probe, health.interval_ms, health.timeout_ms, health.failures
            ),
        );
    }
    if let Some(ms) = s.watchdog_ms {
        field("watchdog", format!("WATCHDOG=1 at least every {ms}ms"));
    }
}

/// One lifecycle event on one line:
/// `2026-12-07 23:59:01.123 api:0 pid 4242 online → stopping  reload: why`.
pub fn event(e: &LifecycleEvent) -> String {
    let at = corral_daemon::logs::format_utc(UNIX_EPOCH + Duration::from_millis(e.at_ms));
    // `2026-12-07T23:59:01.123Z`, written as people read it; still UTC.
    let at = at.replacen('T', " ", 1);
    let at = at.trim_end_matches('Z');
    // The agent's index is u32::MAX.
    let instance = if e.instance == u32::MAX {
        "agent".to_string()
    } else {
        e.instance.to_string()
    };
    let pid = e.pid.map_or_else(|| "-".into(), |p| p.to_string());
    let mut line = format!(
        "{at} {}:{instance} pid {pid} {} → {}  {}",
        e.app, e.from, e.to, e.cause
    );
    if !e.reason.is_empty() {
        // One event, one line, whatever the reason holds.
        let reason: String = e
            .reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let _ = write!(line, ": {reason}");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_columns() {
        let t = table(&["a", "bb"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(t, "a     bb\nlong  x\n");
    }

    #[test]
    fn human_units() {
        assert_eq!(duration(59_999), "59s");
        assert_eq!(duration(3_600_000), "1h");
        assert_eq!(bytes(2048), "2.0 KiB");
        assert_eq!(bytes(5 * 1024 * 1024), "5.0 MiB");
    }

    fn instance(status: corral_proto::Status, restarts: u32, cause: Option<&str>) -> InstanceInfo {
        InstanceInfo {
            id: 0,
            app: "api".into(),
            instance: 0,
            pid: Some(4242),
            status,
            uptime_ms: Some(5000),
            restarts,
            last_restart: cause.map(str::to_string),
            unstable_restarts: 0,
            cpu_percent: 0.0,
            memory_bytes: 1 << 20,
            last_exit: None,
            role: corral_proto::Role::Worker,
            listen: Vec::new(),
        }
    }

    fn event_at(seq: u64, instance: u32, pid: Option<u32>, reason: &str) -> LifecycleEvent {
        LifecycleEvent {
            seq,
            // 2026-12-07 23:59:01.123 UTC.
            at_ms: 1_796_687_941_123,
            app: "api".into(),
            instance,
            id: 3,
            pid,
            from: corral_proto::Status::Online,
            to: corral_proto::Status::Stopping,
            cause: "reload".into(),
            reason: reason.into(),
        }
    }

    #[test]
    fn ls_shows_unresponsive_and_the_cause_of_the_last_restart() {
        use corral_proto::Status;
        let table = instances(&[instance(Status::Unresponsive, 3, Some("memory"))]);
        let row = table.lines().nth(1).unwrap();
        assert!(row.contains("unresponsive"), "{table}");
        assert!(row.contains("3 (memory)"), "{table}");
        // A cause is shown only for restarts still counted (after `corral reset`, none).
        let table = instances(&[instance(Status::Online, 0, Some("crash"))]);
        assert!(!table.contains("crash"), "{table}");
        let table = instances(&[instance(Status::Online, 2, None)]);
        assert!(table.lines().nth(1).unwrap().contains(" 2 "), "{table}");
    }

    #[test]
    fn an_event_is_one_line_in_utc() {
        assert_eq!(
            event(&event_at(1, 0, Some(4242), "replaced by pid 4300")),
            "2026-12-07 23:59:01.123 api:0 pid 4242 online → stopping  reload: replaced by pid \
             4300"
        );
        assert_eq!(
            event(&event_at(2, u32::MAX, None, "")),
            "2026-12-07 23:59:01.123 api:agent pid - online → stopping  reload"
        );
        assert_eq!(
            event(&event_at(3, 1, None, "line one\nline two")),
            "2026-12-07 23:59:01.123 api:1 pid - online → stopping  reload: line one line two"
        );
    }

    fn described(spec: AppSpec, events: Vec<LifecycleEvent>) -> String {
        app(&AppInfo {
            spec,
            instances: vec![instance(corral_proto::Status::Online, 0, None)],
            log_files: Vec::new(),
            events,
        })
    }

    #[test]
    fn describe_shows_the_policies_that_are_set() {
        let mut spec = AppSpec::new("api".into(), "/srv/api/server".into(), "/srv/api".into());
        let plain = described(spec.clone(), Vec::new());
        for name in [
            "memory limit",
            "cron restart",
            "watch",
            "stop exit codes",
            "health",
            "watchdog",
        ] {
            assert!(!plain.contains(name), "{name} shown unset: {plain}");
        }
        spec.max_memory_restart = Some(300 << 20);
        spec.cron_restart = Some("0 3 * * *".into());
        spec.watch = vec!["/srv/api/src".into(), "/srv/api/config.json".into()];
        spec.ignore_watch = vec!["*.log".into()];
        spec.watch_delay_ms = 1000;
        spec.stop_exit_codes = vec![0, 3];
        let mut health = corral_proto::HealthCheck::new("tcp:3000".parse().unwrap());
        health.failures = 5;
        spec.health = Some(health);
        spec.ready_when = ReadyWhen::Probe;
        spec.watchdog_ms = Some(30_000);
        let page = described(spec, Vec::new());
        for line in [
            "memory limit          restart above 300.0 MiB",
            "cron restart          0 3 * * *",
            "watch                 /srv/api/src, /srv/api/config.json, reload 1000ms after the \
             last change",
            "watch ignores         node_modules, .git, *.log",
            "stop exit codes       0, 3",
            "health check          tcp:127.0.0.1:3000 every 10000ms, timeout 2000ms, restart \
             after 5 failures in a row",
            "ready                 when its health check passes, within 3000ms",
            "watchdog              WATCHDOG=1 at least every 30000ms",
        ] {
            assert!(
                page.lines().any(|l| l == line),
                "{line:?} missing from:\n{page}"
            );
        }
    }

    #[test]
    fn describe_shows_the_last_ten_events_oldest_first() {
        let spec = AppSpec::new("api".into(), "/srv/api/server".into(), "/srv/api".into());
        let events = (1..=12)
            .map(|seq| event_at(seq, 0, Some(4000 + seq as u32), ""))
            .collect();
        let page = described(spec, events);
        let shown: Vec<&str> = page
            .lines()
            .skip_while(|l| *l != "last events:")
            .skip(1)
            .collect();
        assert_eq!(shown.len(), 10, "{page}");
        assert!(shown[0].contains("pid 4003"), "{page}");
        assert!(shown[9].contains("pid 4012"), "{page}");
        let quiet = described(
            AppSpec::new("api".into(), "/srv/api/server".into(), "/srv/api".into()),
            Vec::new(),
        );
        assert!(!quiet.contains("last events"), "{quiet}");
    }
}
