//! How answers look in a terminal.

use std::fmt::Write as _;

use corral_proto::{AppInfo, InstanceInfo, signal::Signal};

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
                i.restarts.to_string(),
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

/// The `describe` page.
pub fn app(info: &AppInfo) -> String {
    let s = &info.spec;
    let mut out = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(out, "{name:<22}{value}");
    };
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
    let node_cluster = s.is_node_cluster();
    if node_cluster {
        field(
            "exec mode",
            "cluster (corral is the Node.js cluster primary)".into(),
        );
    }
    field("load balancing", s.lb.to_string());
    field(
        "ready",
        if node_cluster && !s.wait_ready {
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
        },
    );
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
    out
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
}
