//! Second stage of argument handling: raw strings (from the command line or `corral.toml`) to
//! validated [`AppSpec`]s. Every error names the value, where it came from, and what is accepted.

use std::collections::BTreeMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use corral_proto::signal::Signal;
use corral_proto::{AgentSpec, AppSpec, ExecMode, LbMode, Probe, ReadyWhen, StateBackend};
use serde::{Deserialize, Deserializer};

use crate::args::StartArgs;
use crate::policies::{self, Policies, Watch};

/// Most instances an app may have (the daemon checks this too).
pub const MAX_INSTANCES: u32 = 1024;

/// `500ms`, `2s`, `1m`, `1h`, or a number of milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let value: u64 = digits.parse().map_err(|_| {
        format!("'{text}' is not a duration: write 500ms, 2s, 1m, 1h, or milliseconds")
    })?;
    let factor = match unit.trim() {
        "" | "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "'{text}' is not a duration: write 500ms, 2s, 1m, 1h, or milliseconds"
            ));
        }
    };
    value
        .checked_mul(factor)
        .ok_or_else(|| format!("'{text}' is too long a duration"))
}

/// `10M`, `512K`, `1G`, `10MB`, or a number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("'{text}' is not a size: write 512K, 10M, 1G, or bytes");
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(bad()),
    };
    value.checked_mul(factor).ok_or_else(bad)
}

/// `4` or `max`.
pub fn parse_instances(text: &str) -> Result<u32, String> {
    if text.trim().eq_ignore_ascii_case("max") {
        return Ok(std::thread::available_parallelism().map_or(1, |n| n.get() as u32));
    }
    match text.trim().parse::<i64>() {
        Ok(n) if (1..=i64::from(MAX_INSTANCES)).contains(&n) => Ok(n as u32),
        _ => Err(format!(
            "'{text}' is not an instance count: give a number from 1 to {MAX_INSTANCES}, or max"
        )),
    }
}

fn parse_count(text: &str, what: &str) -> Result<u32, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a valid {what}: give a whole number"))
}

/// A signal name or number.
pub fn parse_signal(text: &str) -> Result<i32, String> {
    Signal::parse(text).map(|s| s.number).ok_or_else(|| {
        format!(
            "'{text}' is not a signal: use a name such as SIGTERM, SIGINT, SIGUSR2, or its number"
        )
    })
}

fn parse_env(pair: &str) -> Result<(String, String), String> {
    match pair.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("--env '{pair}' is not KEY=VALUE")),
    }
}

/// The interpreter for a script by its extension.
fn interpreter_for(script: &Path) -> Option<&'static str> {
    match script.extension()?.to_str()? {
        "js" | "mjs" | "cjs" => Some("node"),
        "py" => Some("python3"),
        "sh" | "bash" => Some("bash"),
        _ => None,
    }
}

/// Finds `program` in the directories of `$PATH`.
pub fn find_on_path(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        return path.is_file().then_some(path);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

pub(crate) fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Where the script is: a path (relative to `cwd`), or a command on PATH.
pub fn locate_script(arg: &str, cwd: &Path) -> Option<PathBuf> {
    let candidate = cwd.join(arg);
    if arg.contains('/') || candidate.exists() {
        return candidate
            .is_file()
            .then(|| std::fs::canonicalize(&candidate).unwrap_or(candidate));
    }
    find_on_path(arg)
}

/// Options common to the command line and `corral.toml`, as raw values.
#[derive(Debug, Default)]
pub(crate) struct Raw {
    pub name: Option<String>,
    pub args: Vec<String>,
    pub instances: Option<u32>,
    pub interpreter: Option<String>,
    pub interpreter_args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub autorestart: Option<bool>,
    pub time: Option<bool>,
    pub min_uptime_ms: Option<u64>,
    pub max_restarts: Option<u32>,
    pub restart_delay_ms: Option<u64>,
    pub exp_backoff_ms: Option<u64>,
    pub kill_timeout_ms: Option<u64>,
    pub stop_signal: Option<i32>,
    pub log_max_size: Option<u64>,
    pub log_keep: Option<u32>,
    pub listen: Vec<String>,
    pub lb: Option<LbMode>,
    pub wait_ready: Option<bool>,
    pub listen_timeout_ms: Option<u64>,
    pub exec_mode: Option<ExecMode>,
    pub shutdown_with_message: Option<bool>,
    pub agent: Option<String>,
    pub state: Option<StateBackend>,
    pub policies: Policies,
}

/// `fork` or `cluster`.
pub fn parse_exec_mode(text: &str) -> Result<ExecMode, String> {
    match text.trim() {
        "fork" | "fork_mode" => Ok(ExecMode::Fork),
        "cluster" | "cluster_mode" => Ok(ExecMode::Cluster),
        other => Err(format!(
            "'{other}' is not an exec mode: use fork or cluster"
        )),
    }
}

/// `rr`, `least-conn`, `shared` or `proxy`.
pub fn parse_lb(text: &str) -> Result<LbMode, String> {
    match text.trim() {
        "rr" | "round-robin" => Ok(LbMode::RoundRobin),
        "least-conn" => Ok(LbMode::LeastConn),
        "shared" => Ok(LbMode::Shared),
        "proxy" => Ok(LbMode::Proxy),
        other => Err(format!(
            "'{other}' is not a load-balancing mode: use rr, least-conn, shared or proxy"
        )),
    }
}

/// Checks a listen address.
fn check_listen(address: &str) -> Result<String, String> {
    corral_daemon::listeners::parse(address).map(|_| address.trim().to_string())
}

/// Builds one spec: resolves the script, the interpreter, the name, and applies the options.
pub(crate) fn build(
    script_arg: &str,
    cwd: &Path,
    raw: Raw,
    origin: &dyn fmt::Display,
) -> Result<AppSpec> {
    let script = locate_script(script_arg, cwd).ok_or_else(|| {
        anyhow!(
            "{origin}: script '{script_arg}' not found: no file {} and no such command on PATH",
            cwd.join(script_arg).display()
        )
    })?;
    let interpreter = match raw.interpreter.as_deref() {
        Some("none") => None,
        Some(i) => Some(i.to_string()),
        None => interpreter_for(&script).map(str::to_string),
    };
    match &interpreter {
        Some(i) if find_on_path(i).is_none() => bail!(
            "{origin}: the interpreter '{i}' for {} is not on PATH: install it, or give its path \
             with --interpreter",
            script.display()
        ),
        None if !is_executable(&script) => bail!(
            "{origin}: {} is not executable: run `chmod +x {}`, or name its interpreter with \
             --interpreter",
            script.display(),
            script.display()
        ),
        _ => {}
    }
    let name = match raw.name {
        Some(name) => name,
        None => script
            .file_stem()
            .map_or_else(|| "app".into(), |s| s.to_string_lossy().into_owned()),
    };
    let mut spec = AppSpec::new(name, script, cwd.to_path_buf());
    spec.args = raw.args;
    spec.interpreter = interpreter;
    spec.interpreter_args = raw.interpreter_args;
    spec.env = raw.env;
    let d = |v: Option<u64>, default: u64| v.unwrap_or(default);
    spec.instances = raw.instances.unwrap_or(spec.instances);
    spec.autorestart = raw.autorestart.unwrap_or(true);
    spec.time = raw.time.unwrap_or(false);
    spec.min_uptime_ms = d(raw.min_uptime_ms, spec.min_uptime_ms);
    spec.max_restarts = raw.max_restarts.unwrap_or(spec.max_restarts);
    spec.restart_delay_ms = d(raw.restart_delay_ms, spec.restart_delay_ms);
    spec.exp_backoff_restart_delay_ms = raw.exp_backoff_ms;
    spec.kill_timeout_ms = d(raw.kill_timeout_ms, spec.kill_timeout_ms);
    spec.stop_signal = raw.stop_signal.unwrap_or(spec.stop_signal);
    spec.log_max_size = raw.log_max_size.unwrap_or(spec.log_max_size);
    spec.log_keep = raw.log_keep.unwrap_or(spec.log_keep);
    spec.listen = raw
        .listen
        .iter()
        .map(|a| check_listen(a).map_err(|e| anyhow!("{origin}: {e}")))
        .collect::<Result<_>>()?;
    spec.lb = raw.lb.unwrap_or(spec.lb);
    spec.wait_ready = raw.wait_ready.unwrap_or(false);
    spec.listen_timeout_ms = raw.listen_timeout_ms.unwrap_or(spec.listen_timeout_ms);
    spec.shutdown_with_message = raw.shutdown_with_message.unwrap_or(false);
    spec.state = raw.state.unwrap_or_default();
    if let Some(agent) = &raw.agent {
        spec.agent = Some(agent_spec(agent, cwd, origin)?);
    }
    // As PM2 does: a Node.js app with more than one instance is a cluster unless told otherwise.
    spec.exec_mode = raw
        .exec_mode
        .unwrap_or(if spec.runs_on_node() && spec.instances > 1 {
            ExecMode::Cluster
        } else {
            ExecMode::Fork
        });
    raw.policies.apply(&mut spec, origin)?;
    Ok(spec)
}

/// The agent's program: its script located and its interpreter chosen as for the app's.
fn agent_spec(script_arg: &str, cwd: &Path, origin: &dyn fmt::Display) -> Result<AgentSpec> {
    let script = locate_script(script_arg, cwd).ok_or_else(|| {
        anyhow!(
            "{origin}: agent script '{script_arg}' not found: no file {} and no such command on \
             PATH",
            cwd.join(script_arg).display()
        )
    })?;
    let interpreter = interpreter_for(&script).map(str::to_string);
    match &interpreter {
        Some(i) if find_on_path(i).is_none() => bail!(
            "{origin}: the interpreter '{i}' for the agent {} is not on PATH: install it",
            script.display()
        ),
        None if !is_executable(&script) => bail!(
            "{origin}: the agent {} is not executable: run `chmod +x {}`",
            script.display(),
            script.display()
        ),
        _ => {}
    }
    Ok(AgentSpec {
        script,
        interpreter,
        interpreter_args: Vec::new(),
        args: Vec::new(),
    })
}

/// The spec of `corral start <script> [options]`.
pub fn spec_from_args(args: &StartArgs) -> Result<AppSpec> {
    let here = std::env::current_dir().context("cannot read the current directory")?;
    let cwd = match &args.cwd {
        Some(dir) => {
            let dir = here.join(dir);
            if !dir.is_dir() {
                bail!("--cwd {}: no such directory", dir.display());
            }
            std::fs::canonicalize(&dir).unwrap_or(dir)
        }
        None => here,
    };
    let opt = |value: &Option<String>, flag: &str, parse: fn(&str) -> Result<u64, String>| {
        value
            .as_deref()
            .map(|v| parse(v).map_err(|e| anyhow!("--{flag}: {e}")))
            .transpose()
    };
    let count = |value: &Option<String>, flag: &str| {
        value
            .as_deref()
            .map(|v| parse_count(v, flag).map_err(|e| anyhow!("--{flag}: {e}")))
            .transpose()
    };
    let mut env = BTreeMap::new();
    for pair in &args.env {
        let (k, v) = parse_env(pair).map_err(|e| anyhow!(e))?;
        env.insert(k, v);
    }
    let raw = Raw {
        name: args.name.clone(),
        args: args.args.clone(),
        instances: args
            .instances
            .as_deref()
            .map(|v| parse_instances(v).map_err(|e| anyhow!("-i/--instances: {e}")))
            .transpose()?,
        interpreter: args.interpreter.clone(),
        interpreter_args: args
            .interpreter_args
            .as_deref()
            .map(|a| a.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default(),
        env,
        autorestart: args.no_autorestart.then_some(false),
        time: args.time.then_some(true),
        min_uptime_ms: opt(&args.min_uptime, "min-uptime", parse_duration_ms)?,
        max_restarts: count(&args.max_restarts, "max-restarts")?,
        restart_delay_ms: opt(&args.restart_delay, "restart-delay", parse_duration_ms)?,
        exp_backoff_ms: opt(
            &args.exp_backoff_restart_delay,
            "exp-backoff-restart-delay",
            parse_duration_ms,
        )?,
        kill_timeout_ms: opt(&args.kill_timeout, "kill-timeout", parse_duration_ms)?,
        stop_signal: args
            .stop_signal
            .as_deref()
            .map(|s| parse_signal(s).map_err(|e| anyhow!("--stop-signal: {e}")))
            .transpose()?,
        log_max_size: opt(&args.log_max_size, "log-max-size", parse_size)?,
        log_keep: count(&args.log_keep, "log-keep")?,
        listen: args.listen.clone(),
        lb: args
            .lb
            .as_deref()
            .map(|m| parse_lb(m).map_err(|e| anyhow!("--lb: {e}")))
            .transpose()?,
        wait_ready: args.wait_ready.then_some(true),
        listen_timeout_ms: opt(&args.listen_timeout, "listen-timeout", parse_duration_ms)?,
        exec_mode: args
            .exec_mode
            .as_deref()
            .map(|m| parse_exec_mode(m).map_err(|e| anyhow!("--exec-mode: {e}")))
            .transpose()?,
        shutdown_with_message: args.shutdown_with_message.then_some(true),
        agent: args.agent.clone(),
        state: args
            .state
            .as_deref()
            .map(|s| s.parse().map_err(|e| anyhow!("--state: {e}")))
            .transpose()?,
        policies: policies::from_args(args)?,
    };
    build(&args.script, &cwd, raw, &"start")
}

// ---- corral.toml ----

/// A value given either as text (`"2s"`, `"10M"`, `"max"`, `"SIGINT"`) or as a number.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TextOrNumber {
    Number(i64),
    Text(String),
}

impl TextOrNumber {
    fn text(&self) -> String {
        match self {
            TextOrNumber::Number(n) => n.to_string(),
            TextOrNumber::Text(t) => t.clone(),
        }
    }
}

/// Deserializes with a parser, so that a bad value is reported with its line by the TOML parser.
macro_rules! parsed_field {
    ($name:ident, $ty:ty, $parse:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<$ty>, D::Error> {
            let raw = TextOrNumber::deserialize(d)?;
            $parse(&raw.text())
                .map(Some)
                .map_err(serde::de::Error::custom)
        }
    };
}
parsed_field!(duration_field, u64, parse_duration_ms);
parsed_field!(size_field, u64, parse_size);
parsed_field!(instances_field, u32, parse_instances);
parsed_field!(signal_field, i32, parse_signal);
parsed_field!(lb_field, LbMode, parse_lb);
parsed_field!(exec_mode_field, ExecMode, parse_exec_mode);
parsed_field!(state_field, StateBackend, str::parse::<StateBackend>);
parsed_field!(memory_field, u64, policies::parse_memory_limit);
parsed_field!(cron_field, String, policies::parse_cron);
parsed_field!(
    positive_duration_field,
    u64,
    policies::parse_positive_duration
);
parsed_field!(failures_field, u32, policies::parse_failures);
parsed_field!(probe_field, Probe, policies::parse_probe);
parsed_field!(ready_when_field, ReadyWhen, policies::parse_ready_when);

/// Deserializes a value that may take several shapes (`watch = true` or a list of paths) by
/// reading it whole and converting it, so that a bad one is still reported with its line.
macro_rules! shaped_field {
    ($name:ident, $ty:ty, $convert:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<$ty, D::Error> {
            let value = serde_json::Value::deserialize(d)?;
            $convert(&value).map_err(serde::de::Error::custom)
        }
    };
}
shaped_field!(watch_field, Watch, policies::watch_from_json);
shaped_field!(globs_field, Vec<String>, policies::globs_from_json);
shaped_field!(exit_codes_field, Vec<i32>, policies::exit_codes_from_json);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default, rename = "apps")]
    apps: Vec<ConfigApp>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigApp {
    name: Option<String>,
    script: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default, deserialize_with = "instances_field")]
    instances: Option<u32>,
    cwd: Option<PathBuf>,
    interpreter: Option<String>,
    #[serde(default)]
    interpreter_args: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    autorestart: Option<bool>,
    time: Option<bool>,
    #[serde(default, deserialize_with = "duration_field")]
    min_uptime: Option<u64>,
    max_restarts: Option<u32>,
    #[serde(default, deserialize_with = "duration_field")]
    restart_delay: Option<u64>,
    #[serde(default, deserialize_with = "duration_field")]
    exp_backoff_restart_delay: Option<u64>,
    #[serde(default, deserialize_with = "duration_field")]
    kill_timeout: Option<u64>,
    #[serde(default, deserialize_with = "signal_field")]
    stop_signal: Option<i32>,
    #[serde(default, deserialize_with = "size_field")]
    log_max_size: Option<u64>,
    log_keep: Option<u32>,
    #[serde(default)]
    listen: Vec<String>,
    #[serde(default, deserialize_with = "lb_field")]
    lb: Option<LbMode>,
    wait_ready: Option<bool>,
    #[serde(default, deserialize_with = "duration_field")]
    listen_timeout: Option<u64>,
    #[serde(default, deserialize_with = "exec_mode_field")]
    exec_mode: Option<ExecMode>,
    shutdown_with_message: Option<bool>,
    agent: Option<String>,
    #[serde(default, deserialize_with = "state_field")]
    state: Option<StateBackend>,
    #[serde(default, deserialize_with = "memory_field")]
    max_memory_restart: Option<u64>,
    #[serde(default, deserialize_with = "cron_field")]
    cron_restart: Option<String>,
    #[serde(default, deserialize_with = "watch_field")]
    watch: Watch,
    #[serde(default, deserialize_with = "globs_field")]
    ignore_watch: Vec<String>,
    #[serde(default, deserialize_with = "duration_field")]
    watch_delay: Option<u64>,
    #[serde(default, deserialize_with = "exit_codes_field")]
    stop_exit_codes: Vec<i32>,
    #[serde(default, deserialize_with = "probe_field")]
    health: Option<Probe>,
    #[serde(default, deserialize_with = "positive_duration_field")]
    health_interval: Option<u64>,
    #[serde(default, deserialize_with = "positive_duration_field")]
    health_timeout: Option<u64>,
    #[serde(default, deserialize_with = "failures_field")]
    health_failures: Option<u32>,
    #[serde(default, deserialize_with = "ready_when_field")]
    ready_when: Option<ReadyWhen>,
    #[serde(default, deserialize_with = "positive_duration_field")]
    watchdog: Option<u64>,
}

/// The apps of a `corral.toml`. Relative paths are relative to the file's directory.
pub fn specs_from_file(path: &Path) -> Result<Vec<AppSpec>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let file: ConfigFile = toml::from_str(&text)
        .map_err(|e| anyhow!("{} is not a valid corral.toml:\n{e}", path.display()))?;
    if file.apps.is_empty() {
        bail!(
            "{} lists no app: add one with\n\n[[apps]]\nname = \"web\"\nscript = \"server.js\"",
            path.display()
        );
    }
    let dir = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let mut specs = Vec::new();
    for (n, app) in file.apps.into_iter().enumerate() {
        let label = app.name.clone().unwrap_or_else(|| format!("#{}", n + 1));
        let origin = format!("{}: app {label}", path.display());
        let cwd = app.cwd.map_or_else(|| dir.clone(), |c| dir.join(c));
        if !cwd.is_dir() {
            bail!("{origin}: cwd {} is not a directory", cwd.display());
        }
        let raw = Raw {
            name: app.name,
            args: app.args,
            instances: app.instances,
            interpreter: app.interpreter,
            interpreter_args: app.interpreter_args,
            env: app.env,
            autorestart: app.autorestart,
            time: app.time,
            min_uptime_ms: app.min_uptime,
            max_restarts: app.max_restarts,
            restart_delay_ms: app.restart_delay,
            exp_backoff_ms: app.exp_backoff_restart_delay,
            kill_timeout_ms: app.kill_timeout,
            stop_signal: app.stop_signal,
            log_max_size: app.log_max_size,
            log_keep: app.log_keep,
            listen: app.listen,
            lb: app.lb,
            wait_ready: app.wait_ready,
            listen_timeout_ms: app.listen_timeout,
            exec_mode: app.exec_mode,
            shutdown_with_message: app.shutdown_with_message,
            agent: app.agent,
            state: app.state,
            policies: Policies {
                naming: policies::Naming::Keys,
                max_memory_restart: app.max_memory_restart,
                cron_restart: app.cron_restart,
                watch: app.watch,
                ignore_watch: app.ignore_watch,
                watch_delay_ms: app.watch_delay,
                stop_exit_codes: app.stop_exit_codes,
                health: app.health,
                health_interval_ms: app.health_interval,
                health_timeout_ms: app.health_timeout,
                health_failures: app.health_failures,
                ready_when: app.ready_when,
                watchdog_ms: app.watchdog,
            },
        };
        specs.push(build(&app.script, &cwd, raw, &origin)?);
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("1500"), Ok(1500));
        assert_eq!(parse_duration_ms("2s"), Ok(2000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("1m"), Ok(60_000));
        assert!(
            parse_duration_ms("soon")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(parse_duration_ms("-5").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("512kb"), Ok(512 << 10));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("10X").is_err());
    }

    #[test]
    fn instance_counts() {
        assert_eq!(parse_instances("4"), Ok(4));
        assert!(parse_instances("max").unwrap() >= 1);
        for bad in ["0", "-1", "lots", "100000"] {
            assert!(
                parse_instances(bad).unwrap_err().contains("1 to 1024"),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_bad_value_in_corral_toml_is_reported_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corral.toml");
        std::fs::write(
            &path,
            "[[apps]]\nname = \"a\"\nscript = \"/bin/true\"\nstop_signal = \"SIGNOPE\"\n",
        )
        .unwrap();
        let err = format!("{:#}", specs_from_file(&path).unwrap_err());
        assert!(
            err.contains("line 4") && err.contains("not a signal"),
            "{err}"
        );
    }

    #[test]
    fn an_unknown_key_in_corral_toml_is_named_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("corral.toml");
        std::fs::write(&path, "[[apps]]\nscript = \"/bin/true\"\ninstanses = 2\n").unwrap();
        let err = format!("{:#}", specs_from_file(&path).unwrap_err());
        assert!(err.contains("line 3") && err.contains("instanses"), "{err}");
    }

    /// The apps of a corral.toml holding `text`, in a directory with a `src/`.
    fn toml_apps(text: &str) -> (tempfile::TempDir, Result<Vec<AppSpec>>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let path = dir.path().join("corral.toml");
        std::fs::write(&path, text).unwrap();
        let specs = specs_from_file(&path);
        (dir, specs)
    }

    #[test]
    fn corral_toml_takes_the_policy_keys() {
        let (dir, specs) = toml_apps(
            r#"[[apps]]
name = "api"
script = "/bin/true"
max_memory_restart = "300M"
cron_restart = "0 3 * * *"
watch = ["src"]
ignore_watch = ["*.log", "tmp"]
watch_delay = "1s"
stop_exit_codes = [0, 3]
health = "http://127.0.0.1:3000/healthz"
health_interval = "5s"
health_timeout = 1000
health_failures = 2
ready_when = "probe"
watchdog = "30s"

[[apps]]
name = "web"
script = "/bin/true"
watch = true
ignore_watch = "*.tmp dist"
stop_exit_codes = 2
"#,
        );
        let specs = specs.unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let api = &specs[0];
        assert_eq!(api.max_memory_restart, Some(300 << 20));
        assert_eq!(api.cron_restart.as_deref(), Some("0 3 * * *"));
        assert_eq!(api.watch, [root.join("src")]);
        assert_eq!(api.ignore_watch, ["*.log", "tmp"]);
        assert_eq!(api.watch_delay_ms, 1000);
        assert_eq!(api.stop_exit_codes, [0, 3]);
        let health = api.health.as_ref().unwrap();
        assert_eq!(health.probe.to_string(), "http://127.0.0.1:3000/healthz");
        assert_eq!(
            (health.interval_ms, health.timeout_ms, health.failures),
            (5000, 1000, 2)
        );
        assert_eq!(api.ready_when, ReadyWhen::Probe);
        assert_eq!(api.watchdog_ms, Some(30_000));
        let web = &specs[1];
        assert_eq!(web.watch, [root]);
        assert_eq!(web.ignore_watch, ["*.tmp", "dist"]);
        assert_eq!(web.stop_exit_codes, [2]);
        assert_eq!(web.health, None);
    }

    #[test]
    fn a_bad_policy_value_in_corral_toml_is_reported_with_its_line() {
        for (line, says) in [
            ("max_memory_restart = 0", "would restart the app"),
            ("max_memory_restart = \"lots\"", "not a size"),
            ("cron_restart = \"0 25 * * *\"", "not a cron expression"),
            ("watch = 3", "3 is not true, false or a list of paths"),
            ("watch = [\"src\", 1]", "1 is not a path"),
            ("ignore_watch = [\"\"]", "empty pattern"),
            ("watch_delay = \"soon\"", "not a duration"),
            ("stop_exit_codes = [0, 300]", "'300' is not an exit code"),
            ("stop_exit_codes = true", "true is not an exit code"),
            ("health = \"ftp://x\"", "not a health check"),
            ("health_interval = \"0s\"", "no time"),
            ("health_timeout = 0", "no time"),
            ("health_failures = 0", "from 1"),
            ("ready_when = \"soon\"", "not a readiness signal"),
            ("watchdog = \"0\"", "no time"),
        ] {
            let (_dir, specs) = toml_apps(&format!(
                "[[apps]]\nname = \"api\"\nscript = \"/bin/true\"\n{line}\n"
            ));
            let err = format!("{:#}", specs.unwrap_err());
            assert!(
                err.contains("corral.toml") && err.contains("line 4") && err.contains(says),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn policy_keys_that_do_not_fit_together_name_the_file_and_the_app() {
        for (lines, says) in [
            ("ignore_watch = [\"*.log\"]", "`ignore_watch` needs `watch`"),
            (
                "watch = false\nwatch_delay = 100",
                "`watch_delay` needs `watch`",
            ),
            ("watch = [\"nope\"]", "`watch` nope:"),
            ("health_failures = 2", "`health_failures` needs `health`"),
            (
                "health = \"tcp:1\"\nhealth_interval = \"1s\"",
                "`health_timeout` (2000ms by default) must be below `health_interval` (1000ms)",
            ),
            (
                "ready_when = \"probe\"",
                "`ready_when` probe needs `health`",
            ),
            (
                "health = \"tcp:1\"\nready_when = \"probe\"\nwait_ready = true",
                "`ready_when` probe and `wait_ready`",
            ),
        ] {
            let (_dir, specs) = toml_apps(&format!(
                "[[apps]]\nname = \"api\"\nscript = \"/bin/true\"\n{lines}\n"
            ));
            let err = format!("{:#}", specs.unwrap_err());
            assert!(
                err.contains("corral.toml: app api: ") && err.contains(says),
                "{lines}: {err}"
            );
        }
    }
}
