//! PM2's ecosystem files (`ecosystem.config.js`, `.json`), so that moving from PM2 is one
//! command: `corral start ecosystem.config.js`. A `.js` file is evaluated by the machine's
//! `node`; every option corral supports is mapped, and the ones it does not are listed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, anyhow, bail};
use corral_proto::AppSpec;
use serde_json::{Map, Value};

use crate::config::{self, Raw};
use crate::policies::{self, Naming, Policies, Watch};

/// Whether `path` names an ecosystem file rather than a program: `*.config.js` (`.cjs`,
/// `.mjs`), `ecosystem*.js`, or any `.json`.
pub fn is_ecosystem(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let js = [".js", ".cjs", ".mjs"].iter().any(|e| name.ends_with(e));
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || (js && (name.contains(".config.") || name.starts_with("ecosystem")))
}

/// The apps of an ecosystem file, and one line per app naming the options left out.
pub fn specs_from_file(path: &Path) -> Result<(Vec<AppSpec>, Vec<String>)> {
    let path =
        std::fs::canonicalize(path).with_context(|| format!("cannot read {}", path.display()))?;
    let value = if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| anyhow!("{} is not valid JSON: {e}", path.display()))?
    } else {
        evaluate(&path)?
    };
    let apps = match value {
        Value::Object(mut top) if top.contains_key("apps") => {
            top.remove("apps").unwrap_or_default()
        }
        Value::Object(app) => Value::Array(vec![Value::Object(app)]),
        other => other,
    };
    let Value::Array(apps) = apps else {
        bail!(
            "{}: `apps` is not a list of apps: write module.exports = {{ apps: [{{ name: \"api\", \
             script: \"server.js\" }}] }}",
            path.display()
        );
    };
    if apps.is_empty() {
        bail!("{} lists no app", path.display());
    }
    let dir = path
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let mut specs = Vec::new();
    let mut ignored = Vec::new();
    for (n, app) in apps.into_iter().enumerate() {
        let Value::Object(app) = app else {
            bail!("{}: app #{} is not an object", path.display(), n + 1);
        };
        let label = app
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("#{}", n + 1), str::to_string);
        let origin = format!("{}: app {label}", path.display());
        let (spec, left_out) = app_spec(&app, &dir, &origin)?;
        if !left_out.is_empty() {
            ignored.push(ignoring_line(&origin, &left_out));
        }
        specs.push(spec);
    }
    Ok((specs, ignored))
}

/// Runs `node` to read what a `.js` ecosystem file exports.
fn evaluate(path: &Path) -> Result<Value> {
    const READ: &str = "const m = require(process.argv[1]); \
                        process.stdout.write(JSON.stringify((m && m.default) || m));";
    let node = config::find_on_path("node").ok_or_else(|| {
        anyhow!(
            "{} is JavaScript, and node is not on PATH to read it: install node, or write the \
             apps as JSON or corral.toml",
            path.display()
        )
    })?;
    let output = Command::new(node)
        .arg("-e")
        .arg(READ)
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run node to read {}", path.display()))?;
    if !output.status.success() {
        bail!(
            "node could not read {}:\n{}",
            path.display(),
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    serde_json::from_slice(&output.stdout).map_err(|e| {
        anyhow!(
            "{} does not export plain data ({e}): export {{ apps: [...] }}",
            path.display()
        )
    })
}

/// The PM2 app options corral maps, and corral's own keys (PM2 itself ignores keys it does not
/// know, so one file can serve both): `health`, `health_interval`, `health_timeout`,
/// `health_failures`, `ready_when`, `watchdog`.
const KNOWN: &[&str] = &[
    "name",
    "script",
    "args",
    "cwd",
    "instances",
    "exec_mode",
    "env",
    "interpreter",
    "interpreter_args",
    "node_args",
    "autorestart",
    "time",
    "min_uptime",
    "max_restarts",
    "restart_delay",
    "exp_backoff_restart_delay",
    "kill_timeout",
    "wait_ready",
    "listen_timeout",
    "shutdown_with_message",
    "max_memory_restart",
    "cron_restart",
    "cron",
    "watch",
    "ignore_watch",
    "watch_delay",
    "stop_exit_codes",
    "health",
    "health_interval",
    "health_timeout",
    "health_failures",
    "ready_when",
    "watchdog",
];

/// Why a key of the file is left out.
const UNSUPPORTED: &str = "not supported by corral";
/// PM2 hands `watch_options` to chokidar; corral's watcher is another program.
const CHOKIDAR: &str = "chokidar's options, for PM2's watcher: corral's watcher has its own \
                        defaults (it ignores node_modules and .git and reloads after \
                        watch_delay, 500ms, of quiet); set ignore_watch and watch_delay instead";
/// PM2 files often keep these beside `watch: false`, where PM2 does nothing with them either.
const WATCH_OFF: &str = "watch is off";

/// The keys left out of one app, with why, as one line: `ignoring a, b (not supported by
/// corral); watch_options (...)`.
fn ignoring_line(origin: &str, left_out: &[(String, &str)]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for (key, why) in left_out {
        match groups.iter_mut().find(|(w, _)| w == why) {
            Some((_, keys)) => keys.push(key),
            None => groups.push((why, vec![key])),
        }
    }
    let groups: Vec<String> = groups
        .iter()
        .map(|(why, keys)| format!("{} ({why})", keys.join(", ")))
        .collect();
    format!("{origin}: ignoring {}", groups.join("; "))
}

/// Reads the keys of one app; every error names the key and the app.
struct Keys<'a> {
    app: &'a Map<String, Value>,
    origin: &'a str,
}

impl Keys<'_> {
    fn bad(&self, key: &str, why: &str) -> anyhow::Error {
        anyhow!("{}: `{key}` {why}", self.origin)
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.app.get(key).filter(|v| !v.is_null())
    }

    fn text(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(self.bad(key, "is not a string")),
        }
    }

    fn flag(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.bad(key, "is not true or false")),
        }
    }

    /// A string or a number, parsed.
    fn parsed<T>(&self, key: &str, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>> {
        self.text(key)?
            .map(|t| parse(&t).map_err(|e| self.bad(key, &e)))
            .transpose()
    }

    fn duration(&self, key: &str) -> Result<Option<u64>> {
        self.parsed(key, config::parse_duration_ms)
    }

    /// A value of several shapes (`watch: true` or a list of paths), converted.
    fn shaped<T: Default>(&self, key: &str, convert: fn(&Value) -> Result<T, String>) -> Result<T> {
        self.get(key).map_or_else(
            || Ok(T::default()),
            |v| convert(v).map_err(|e| self.bad(key, &e)),
        )
    }

    /// `env`: an object whose values are strings or numbers, as PM2 writes them.
    fn env(&self) -> Result<BTreeMap<String, String>> {
        match self.get("env") {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(vars)) => Ok(vars
                .iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.clone(), value)
                })
                .collect()),
            Some(_) => Err(self.bad("env", "is not an object")),
        }
    }

    fn list(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_string).collect()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect()),
            Some(_) => Err(self.bad(key, "is not a string or a list of strings")),
        }
    }
}

/// The keys corral does not map, with why: plain unsupported ones first, then those with a reason
/// of their own.
fn unsupported(app: &Map<String, Value>) -> Vec<(String, &'static str)> {
    let mut left_out: Vec<(String, &'static str)> = app
        .keys()
        .filter(|k| !KNOWN.contains(&k.as_str()))
        .map(|k| {
            let why = if k == "watch_options" {
                CHOKIDAR
            } else {
                UNSUPPORTED
            };
            (k.clone(), why)
        })
        .collect();
    left_out.sort_by_key(|(_, why)| *why != UNSUPPORTED);
    left_out
}

/// One app: its spec, and the keys left out with why.
fn app_spec(
    app: &Map<String, Value>,
    dir: &Path,
    origin: &str,
) -> Result<(AppSpec, Vec<(String, &'static str)>)> {
    let keys = Keys { app, origin };
    let script = keys
        .text("script")?
        .ok_or_else(|| keys.bad("script", "is missing"))?;
    let cwd = match keys.text("cwd")? {
        Some(cwd) => dir.join(cwd),
        None => dir.to_path_buf(),
    };
    if !cwd.is_dir() {
        bail!("{origin}: cwd {} is not a directory", cwd.display());
    }
    // PM2: "max", 0 or -1 mean one per core.
    let instances = match keys.text("instances")? {
        None => None,
        Some(n) if n == "max" || n == "0" || n.starts_with('-') => {
            Some(config::parse_instances("max").map_err(|e| keys.bad("instances", &e))?)
        }
        Some(n) => Some(config::parse_instances(&n).map_err(|e| keys.bad("instances", &e))?),
    };
    let mut interpreter_args = keys.list("interpreter_args")?;
    interpreter_args.extend(keys.list("node_args")?);
    let mut left_out = unsupported(app);
    let raw = Raw {
        name: keys.text("name")?,
        args: keys.list("args")?,
        instances,
        interpreter: keys.text("interpreter")?,
        interpreter_args,
        env: keys.env()?,
        autorestart: keys.flag("autorestart")?,
        time: keys.flag("time")?,
        min_uptime_ms: keys.duration("min_uptime")?,
        max_restarts: keys
            .text("max_restarts")?
            .map(|n| {
                n.parse()
                    .map_err(|_| keys.bad("max_restarts", "is not a whole number"))
            })
            .transpose()?,
        restart_delay_ms: keys.duration("restart_delay")?,
        exp_backoff_ms: keys.duration("exp_backoff_restart_delay")?,
        kill_timeout_ms: keys.duration("kill_timeout")?,
        stop_signal: None,
        log_max_size: None,
        log_keep: None,
        listen: Vec::new(),
        lb: None,
        wait_ready: keys.flag("wait_ready")?,
        listen_timeout_ms: keys.duration("listen_timeout")?,
        exec_mode: keys
            .text("exec_mode")?
            .map(|m| config::parse_exec_mode(&m).map_err(|e| keys.bad("exec_mode", &e)))
            .transpose()?,
        shutdown_with_message: keys.flag("shutdown_with_message")?,
        agent: None,
        state: None,
        policies: app_policies(&keys, &mut left_out)?,
    };
    let spec = config::build(&script, &cwd, raw, &origin)?;
    Ok((spec, left_out))
}

/// PM2's `cron_restart`, which PM2 also takes as `cron`.
fn cron_restart(keys: &Keys) -> Result<Option<String>> {
    let long = keys.parsed("cron_restart", policies::parse_cron)?;
    let short = keys.parsed("cron", policies::parse_cron)?;
    match (long, short) {
        (Some(long), Some(short)) if long != short => bail!(
            "{}: `cron_restart` ('{long}') and `cron` ('{short}') are two names of one option and \
             disagree: keep one",
            keys.origin
        ),
        (long, short) => Ok(long.or(short)),
    }
}

/// The lifecycle policies of one app: PM2's keys, and corral's own.
fn app_policies(keys: &Keys, left_out: &mut Vec<(String, &'static str)>) -> Result<Policies> {
    let watch = keys.shaped("watch", policies::watch_from_json)?;
    let mut ignore_watch = keys.shaped("ignore_watch", policies::globs_from_json)?;
    let mut watch_delay_ms = keys.duration("watch_delay")?;
    if watch == Watch::Off {
        for key in ["ignore_watch", "watch_delay"] {
            if keys.get(key).is_some() {
                left_out.push((key.to_string(), WATCH_OFF));
            }
        }
        ignore_watch.clear();
        watch_delay_ms = None;
    }
    Ok(Policies {
        naming: Naming::Keys,
        max_memory_restart: keys.parsed("max_memory_restart", policies::parse_memory_limit)?,
        cron_restart: cron_restart(keys)?,
        watch,
        ignore_watch,
        watch_delay_ms,
        stop_exit_codes: keys.shaped("stop_exit_codes", policies::exit_codes_from_json)?,
        health: keys.parsed("health", policies::parse_probe)?,
        health_interval_ms: keys.parsed("health_interval", policies::parse_positive_duration)?,
        health_timeout_ms: keys.parsed("health_timeout", policies::parse_positive_duration)?,
        health_failures: keys.parsed("health_failures", policies::parse_failures)?,
        ready_when: keys.parsed("ready_when", policies::parse_ready_when)?,
        watchdog_ms: keys.parsed("watchdog", policies::parse_positive_duration)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_ecosystem_files_and_not_scripts() {
        for name in [
            "ecosystem.config.js",
            "pm2.config.cjs",
            "ecosystem.js",
            "apps.json",
        ] {
            assert!(is_ecosystem(Path::new(name)), "{name}");
        }
        for name in ["server.js", "app.py", "config.toml"] {
            assert!(!is_ecosystem(Path::new(name)), "{name}");
        }
    }

    /// The specs and "ignoring" lines of an `apps.json` holding `apps` in a directory with a
    /// `server.js` and a `src/`.
    type Read = Result<(Vec<AppSpec>, Vec<String>)>;

    fn read(apps: &str) -> (tempfile::TempDir, Read) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server.js"), "").unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let file = dir.path().join("apps.json");
        std::fs::write(&file, format!(r#"{{"apps": {apps}}}"#)).unwrap();
        let read = specs_from_file(&file);
        (dir, read)
    }

    fn refusal(apps: &str) -> String {
        format!("{:#}", read(apps).1.unwrap_err())
    }

    #[test]
    fn maps_pm2_options_and_lists_the_others() {
        let (dir, read) = read(
            r#"[{"name": "api", "script": "server.js", "instances": 2,
                "exec_mode": "cluster", "env": {"PORT": 3000, "MODE": "prod"},
                "kill_timeout": 3000, "min_uptime": "5s", "args": "--fast --quiet",
                "vizion": false, "pmx": true}]"#,
        );
        let (specs, ignored) = read.unwrap();
        let api = &specs[0];
        assert_eq!(api.name, "api");
        assert_eq!(api.instances, 2);
        assert_eq!(api.exec_mode, corral_proto::ExecMode::Cluster);
        assert_eq!(api.env["PORT"], "3000");
        assert_eq!(api.kill_timeout_ms, 3000);
        assert_eq!(api.min_uptime_ms, 5000);
        assert_eq!(api.args, ["--fast", "--quiet"]);
        assert_eq!(
            ignored,
            [format!(
                "{}: app api: ignoring pmx, vizion (not supported by corral)",
                std::fs::canonicalize(dir.path().join("apps.json"))
                    .unwrap()
                    .display()
            )]
        );
    }

    #[test]
    fn maps_pm2_s_lifecycle_policies() {
        let (dir, read) = read(
            r#"[{"name": "api", "script": "server.js", "watch": true,
                 "ignore_watch": ["*.log", "tmp"], "watch_delay": 1000,
                 "max_memory_restart": "300M", "stop_exit_codes": [0, 3],
                 "cron_restart": "0 3 * * *"},
                {"name": "web", "script": "server.js", "watch": ["src"],
                 "ignore_watch": "*.tmp dist", "max_memory_restart": 1048576,
                 "stop_exit_codes": 2, "cron": "*/15 * * * *"}]"#,
        );
        let (specs, ignored) = read.unwrap();
        assert!(ignored.is_empty(), "{ignored:?}");
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let api = &specs[0];
        assert_eq!(api.watch, std::slice::from_ref(&root));
        assert_eq!(api.ignore_watch, ["*.log", "tmp"]);
        assert_eq!(api.watch_delay_ms, 1000);
        assert_eq!(api.max_memory_restart, Some(300 << 20));
        assert_eq!(api.stop_exit_codes, [0, 3]);
        assert_eq!(api.cron_restart.as_deref(), Some("0 3 * * *"));
        let web = &specs[1];
        assert_eq!(web.watch, [root.join("src")]);
        assert_eq!(web.ignore_watch, ["*.tmp", "dist"]);
        assert_eq!(web.watch_delay_ms, 500);
        assert_eq!(web.max_memory_restart, Some(1 << 20));
        assert_eq!(web.stop_exit_codes, [2]);
        assert_eq!(web.cron_restart.as_deref(), Some("*/15 * * * *"));
    }

    #[test]
    fn corral_s_own_keys_for_health_readiness_and_watchdog() {
        let (_dir, read) = read(
            r#"[{"name": "api", "script": "server.js", "health": "tcp:3000",
                 "health_interval": "5s", "health_timeout": 1000, "health_failures": 2,
                 "ready_when": "probe", "watchdog": "30s"}]"#,
        );
        let (specs, ignored) = read.unwrap();
        assert!(ignored.is_empty(), "{ignored:?}");
        let api = &specs[0];
        let health = api.health.as_ref().unwrap();
        assert_eq!(health.probe.to_string(), "tcp:127.0.0.1:3000");
        assert_eq!(
            (health.interval_ms, health.timeout_ms, health.failures),
            (5000, 1000, 2)
        );
        assert_eq!(api.ready_when, corral_proto::ReadyWhen::Probe);
        assert_eq!(api.watchdog_ms, Some(30_000));
    }

    #[test]
    fn watch_options_and_watch_settings_without_watch_are_named_with_why() {
        let (_dir, read) = read(
            r#"[{"name": "api", "script": "server.js", "watch": ["src"],
                 "watch_options": {"usePolling": true}, "vizion": false},
                {"name": "web", "script": "server.js", "watch": false,
                 "ignore_watch": ["node_modules"], "watch_delay": 100}]"#,
        );
        let (specs, ignored) = read.unwrap();
        assert_eq!(ignored.len(), 2, "{ignored:?}");
        assert!(
            ignored[0].contains(
                "app api: ignoring vizion (not supported by corral); watch_options (chokidar's \
                 options, for PM2's watcher: corral's watcher has its own defaults"
            ),
            "{ignored:?}"
        );
        assert!(
            ignored[1].contains("app web: ignoring ignore_watch, watch_delay (watch is off)"),
            "{ignored:?}"
        );
        assert!(specs[1].watch.is_empty() && specs[1].ignore_watch.is_empty());
    }

    #[test]
    fn bad_policy_values_name_the_key_and_the_app() {
        for (app, says) in [
            (
                r#""max_memory_restart": "0""#,
                "`max_memory_restart` '0' would restart",
            ),
            (
                r#""max_memory_restart": "lots""#,
                "`max_memory_restart` 'lots' is not a size",
            ),
            (
                r#""cron_restart": "0 3 * * * * *""#,
                "`cron_restart` '0 3 * * * * *' is not a cron expression",
            ),
            (
                r#""cron": "soon""#,
                "`cron` 'soon' is not a cron expression",
            ),
            (
                r#""cron_restart": "0 3 * * *", "cron": "0 4 * * *""#,
                "`cron_restart` ('0 3 * * *') and `cron` ('0 4 * * *')",
            ),
            (
                r#""watch": 3"#,
                "`watch` 3 is not true, false or a list of paths",
            ),
            (r#""watch": ["nope"]"#, "`watch` nope:"),
            (
                r#""watch": true, "ignore_watch": [{}]"#,
                "`ignore_watch` {} is not a glob",
            ),
            (
                r#""stop_exit_codes": [0, 256]"#,
                "`stop_exit_codes` '256' is not an exit code",
            ),
            (
                r#""health": "ftp://x""#,
                "`health` 'ftp://x' is not a health check",
            ),
            (
                r#""health_interval": "5s""#,
                "`health_interval` needs `health`",
            ),
            (
                r#""health": "tcp:1", "health_timeout": "20s""#,
                "`health_timeout` (20000ms) must be below `health_interval` (10000ms by default)",
            ),
            (
                r#""ready_when": "probe""#,
                "`ready_when` probe needs `health`",
            ),
            (r#""watchdog": 0"#, "`watchdog` '0' is no time"),
        ] {
            let message = refusal(&format!(
                r#"[{{"name": "api", "script": "server.js", {app}}}]"#
            ));
            assert!(
                message.contains("app api") && message.contains(says),
                "{app}: {message}"
            );
        }
    }

    #[test]
    fn bad_values_name_the_key_and_the_app() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apps.json");
        std::fs::write(
            &file,
            r#"[{"name": "api", "script": "x.js", "autorestart": "yes"}]"#,
        )
        .unwrap();
        let err = specs_from_file(&file).unwrap_err().to_string();
        assert!(
            err.contains("app api") && err.contains("`autorestart`"),
            "{err}"
        );
    }
}
