//! The daemon's own check of a spec: a client may be anything, not only our CLI, so every
//! value is checked again here, with a message that says what to do.

use corral_proto::AppSpec;
use corral_proto::signal::Signal;

use super::MAX_INSTANCES;
use crate::listeners;

/// The daemon's own check of a spec: a client may be anything, not only our CLI.
pub fn validate(spec: &AppSpec) -> Result<(), String> {
    let name = &spec.name;
    if name.is_empty() || name.len() > 128 {
        return Err("the name must have 1 to 128 characters".into());
    }
    if name == "all" || name.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "'{name}' cannot be an app name: `all` and numbers name instances in commands"
        ));
    }
    if name.starts_with('.')
        || name.starts_with('-')
        || name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "'{name}' cannot be an app name: use letters, digits and . _ - @ : (no '/', no spaces, not starting with '.' or '-')"
        ));
    }
    if !spec.script.is_absolute() {
        return Err(format!(
            "the script path {} is not absolute",
            spec.script.display()
        ));
    }
    if !spec.script.exists() {
        return Err(format!(
            "the script {} does not exist",
            spec.script.display()
        ));
    }
    if !spec.cwd.is_dir() {
        return Err(format!(
            "the working directory {} is not a directory",
            spec.cwd.display()
        ));
    }
    if spec.instances == 0 || spec.instances > MAX_INSTANCES {
        return Err(format!(
            "{} instances: give 1 to {MAX_INSTANCES}",
            spec.instances
        ));
    }
    for address in &spec.listen {
        listeners::parse(address)?;
    }
    if spec.is_node_cluster() && !spec.listen.is_empty() {
        return Err(
            "a Node.js cluster app listens where its code calls listen(), on sockets corral \
             binds for it: drop --listen (or run it with --exec-mode fork --lb shared and \
             listen({fd: 3}))"
                .into(),
        );
    }
    if spec.lb == corral_proto::LbMode::Proxy && spec.listen.is_empty() {
        return Err(
            "--lb proxy relays connections from the app's addresses: give at least one --listen"
                .into(),
        );
    }
    if Signal::parse(&spec.stop_signal.to_string()).is_none() {
        return Err(format!("{} is not a signal number", spec.stop_signal));
    }
    policies(spec)
}

/// The lifecycle policies' values.
fn policies(spec: &AppSpec) -> Result<(), String> {
    if spec.max_memory_restart == Some(0) {
        return Err(
            "max_memory_restart of 0 bytes would restart it at once: give a size such as 300M"
                .into(),
        );
    }
    if let Some(code) = spec
        .stop_exit_codes
        .iter()
        .find(|c| !(0..=255).contains(*c))
    {
        return Err(format!(
            "stop exit code {code} is not an exit code: give 0 to 255"
        ));
    }
    if let Some(health) = &spec.health {
        if health.interval_ms == 0 || health.timeout_ms == 0 || health.failures == 0 {
            return Err("the health check's interval, timeout and failures must be above 0".into());
        }
        if health.timeout_ms >= health.interval_ms {
            return Err(format!(
                "the health check's timeout ({}ms) must be below its interval ({}ms)",
                health.timeout_ms, health.interval_ms
            ));
        }
    }
    if spec.ready_when == corral_proto::ReadyWhen::Probe && spec.health.is_none() {
        return Err("--ready-when probe needs a health check: give --health".into());
    }
    if let Some(expr) = &spec.cron_restart {
        crate::cron::Schedule::parse(expr).map_err(|why| format!("cron_restart: {why}"))?;
    }
    if !spec.watch.is_empty() {
        let watch = crate::watch::WatchSpec {
            paths: spec.watch.clone(),
            ignore: spec.ignore_watch.clone(),
            delay: std::time::Duration::from_millis(spec.watch_delay_ms),
        };
        crate::watch::validate(&watch).map_err(|e| format!("watch: {e}"))?;
    }
    if spec.watchdog_ms == Some(0) {
        return Err("a watchdog of 0 would restart it at once: give a duration such as 10s".into());
    }
    Ok(())
}
