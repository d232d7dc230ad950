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
            ignored.push(format!(
                "{origin}: ignoring {} (not supported by corral)",
                left_out.join(", ")
            ));
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

/// The PM2 app options corral maps.
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
];

/// One app: its spec, and the keys corral does not support.
fn app_spec(app: &Map<String, Value>, dir: &Path, origin: &str) -> Result<(AppSpec, Vec<String>)> {
    let bad = |key: &str, why: &str| anyhow!("{origin}: `{key}` {why}");
    let text = |key: &str| -> Result<Option<String>> {
        match app.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(_) => Err(bad(key, "is not a string")),
        }
    };
    let flag = |key: &str| -> Result<Option<bool>> {
        match app.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(bad(key, "is not true or false")),
        }
    };
    let duration = |key: &str| -> Result<Option<u64>> {
        text(key)?
            .map(|t| config::parse_duration_ms(&t).map_err(|e| bad(key, &e)))
            .transpose()
    };
    let list = |key: &str| -> Result<Vec<String>> {
        match app.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_string).collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Ok(other.to_string()),
                })
                .collect(),
            Some(_) => Err(bad(key, "is not a string or a list of strings")),
        }
    };
    let script = text("script")?.ok_or_else(|| bad("script", "is missing"))?;
    let cwd = match text("cwd")? {
        Some(cwd) => dir.join(cwd),
        None => dir.to_path_buf(),
    };
    if !cwd.is_dir() {
        bail!("{origin}: cwd {} is not a directory", cwd.display());
    }
    // PM2: "max", 0 or -1 mean one per core.
    let instances = match text("instances")? {
        None => None,
        Some(n) if n == "max" || n == "0" || n.starts_with('-') => {
            Some(config::parse_instances("max").map_err(|e| bad("instances", &e))?)
        }
        Some(n) => Some(config::parse_instances(&n).map_err(|e| bad("instances", &e))?),
    };
    let mut env = BTreeMap::new();
    match app.get("env") {
        None | Some(Value::Null) => {}
        Some(Value::Object(vars)) => {
            for (k, v) in vars {
                let value = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                env.insert(k.clone(), value);
            }
        }
        Some(_) => return Err(bad("env", "is not an object")),
    }
    let mut interpreter_args = list("interpreter_args")?;
    interpreter_args.extend(list("node_args")?);
    let raw = Raw {
        name: text("name")?,
        args: list("args")?,
        instances,
        interpreter: text("interpreter")?,
        interpreter_args,
        env,
        autorestart: flag("autorestart")?,
        time: flag("time")?,
        min_uptime_ms: duration("min_uptime")?,
        max_restarts: text("max_restarts")?
            .map(|n| {
                n.parse()
                    .map_err(|_| bad("max_restarts", "is not a whole number"))
            })
            .transpose()?,
        restart_delay_ms: duration("restart_delay")?,
        exp_backoff_ms: duration("exp_backoff_restart_delay")?,
        kill_timeout_ms: duration("kill_timeout")?,
        stop_signal: None,
        log_max_size: None,
        log_keep: None,
        listen: Vec::new(),
        lb: None,
        wait_ready: flag("wait_ready")?,
        listen_timeout_ms: duration("listen_timeout")?,
        exec_mode: text("exec_mode")?
            .map(|m| config::parse_exec_mode(&m).map_err(|e| bad("exec_mode", &e)))
            .transpose()?,
        shutdown_with_message: flag("shutdown_with_message")?,
        agent: None,
        state: None,
    };
    let left_out: Vec<String> = app
        .keys()
        .filter(|k| !KNOWN.contains(&k.as_str()))
        .cloned()
        .collect();
    let spec = config::build(&script, &cwd, raw, &origin)?;
    Ok((spec, left_out))
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

    #[test]
    fn maps_pm2_options_and_lists_the_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server.js"), "").unwrap();
        let file = dir.path().join("apps.json");
        std::fs::write(
            &file,
            r#"{"apps": [{"name": "api", "script": "server.js", "instances": 2,
                "exec_mode": "cluster", "env": {"PORT": 3000, "MODE": "prod"},
                "kill_timeout": 3000, "min_uptime": "5s", "args": "--fast --quiet",
                "watch": true, "max_memory_restart": "300M"}]}"#,
        )
        .unwrap();
        let (specs, ignored) = specs_from_file(&file).unwrap();
        let api = &specs[0];
        assert_eq!(api.name, "api");
        assert_eq!(api.instances, 2);
        assert_eq!(api.exec_mode, corral_proto::ExecMode::Cluster);
        assert_eq!(api.env["PORT"], "3000");
        assert_eq!(api.kill_timeout_ms, 3000);
        assert_eq!(api.min_uptime_ms, 5000);
        assert_eq!(api.args, ["--fast", "--quiet"]);
        assert_eq!(ignored.len(), 1);
        assert!(
            ignored[0].contains("max_memory_restart, watch") && ignored[0].contains("app api"),
            "{ignored:?}"
        );
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
