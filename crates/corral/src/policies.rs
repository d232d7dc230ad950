//! The lifecycle policies `start` can give an app: a memory limit, a cron restart, file watching,
//! stop exit codes, a health check, readiness by probe and a watchdog.
//!
//! Two steps, as for the other options: each value is parsed alone (so that `corral.toml`
//! reports a bad one with its line and column), then [`Policies::apply`] checks them together and
//! against the app (a timeout below its interval, watched paths that exist in the app's
//! directory) and writes them into its spec. The command line, `corral.toml` and PM2's ecosystem
//! files share both steps, so they accept and refuse the same things.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

use anyhow::{Result, anyhow, bail};
use corral_proto::{AppSpec, HealthCheck, Probe, ReadyWhen};
use serde_json::Value;

use crate::args::StartArgs;
use crate::config;

/// How the user wrote the options, so that a message names them as they were typed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Naming {
    /// `--health-interval`, on the command line.
    Flags,
    /// `health_interval`, in `corral.toml` or an ecosystem file.
    #[default]
    Keys,
}

impl Naming {
    /// `key` (written with `_`) as the user wrote it.
    pub fn name(self, key: &str) -> String {
        match self {
            Naming::Flags => format!("--{}", key.replace('_', "-")),
            Naming::Keys => format!("`{key}`"),
        }
    }
}

/// What to watch, as the user said it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Watch {
    /// Nothing.
    #[default]
    Off,
    /// The app's working directory: `--watch` alone, `watch = true` (PM2's meaning).
    Cwd,
    /// These paths, relative to the app's working directory.
    Paths(Vec<String>),
}

/// The policy options as parsed, before they are checked together.
#[derive(Debug, Default)]
pub(crate) struct Policies {
    pub naming: Naming,
    pub max_memory_restart: Option<u64>,
    pub cron_restart: Option<String>,
    pub watch: Watch,
    pub ignore_watch: Vec<String>,
    pub watch_delay_ms: Option<u64>,
    pub stop_exit_codes: Vec<i32>,
    pub health: Option<Probe>,
    pub health_interval_ms: Option<u64>,
    pub health_timeout_ms: Option<u64>,
    pub health_failures: Option<u32>,
    pub ready_when: Option<ReadyWhen>,
    pub watchdog_ms: Option<u64>,
}

/// A memory limit: a size above zero.
pub fn parse_memory_limit(text: &str) -> Result<u64, String> {
    match config::parse_size(text)? {
        0 => Err(format!(
            "'{text}' would restart the app as soon as it starts: give a limit such as 300M or 1G"
        )),
        bytes => Ok(bytes),
    }
}

/// A duration above zero.
pub fn parse_positive_duration(text: &str) -> Result<u64, String> {
    match config::parse_duration_ms(text)? {
        0 => Err(format!(
            "'{text}' is no time at all: give a duration such as 500ms, 10s or 1m"
        )),
        ms => Ok(ms),
    }
}

/// A number of failures, at least 1.
pub fn parse_failures(text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{text}' is not a number of failures: give a whole number from 1"))
}

/// An exit code, 0 to 255.
pub fn parse_exit_code(text: &str) -> Result<i32, String> {
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|code| (0..=255).contains(code))
        .ok_or_else(|| format!("'{text}' is not an exit code: give a number from 0 to 255"))
}

/// Exit codes separated by commas or spaces: `0,3`.
pub fn parse_exit_codes(text: &str) -> Result<Vec<i32>, String> {
    let codes: Vec<i32> = text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|c| !c.is_empty())
        .map(parse_exit_code)
        .collect::<Result<_, _>>()?;
    if codes.is_empty() {
        return Err(format!(
            "'{text}' names no exit code: give numbers from 0 to 255, such as 0,3"
        ));
    }
    Ok(codes)
}

/// A cron expression, checked by the daemon's own parser, so that what `start` accepts is what
/// the daemon runs.
pub fn parse_cron(text: &str) -> Result<String, String> {
    corral_daemon::cron::Schedule::parse(text).map(|schedule| schedule.expression().to_string())
}

/// A health check probe.
pub fn parse_probe(text: &str) -> Result<Probe, String> {
    text.parse()
}

/// `probe` or `default`.
pub fn parse_ready_when(text: &str) -> Result<ReadyWhen, String> {
    text.parse()
}

/// Glob patterns separated by spaces, as PM2 takes `--ignore-watch`.
pub fn split_globs(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_string).collect()
}

/// `true`, `false`, a path, or a list of paths (PM2's `watch`).
pub fn watch_from_json(value: &Value) -> Result<Watch, String> {
    match value {
        Value::Null | Value::Bool(false) => Ok(Watch::Off),
        // PM2 watches the app's directory for `true`, and for an empty list too.
        Value::Bool(true) => Ok(Watch::Cwd),
        Value::Array(items) if items.is_empty() => Ok(Watch::Cwd),
        Value::String(path) => Ok(Watch::Paths(vec![path.clone()])),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(path) => Ok(path.clone()),
                other => Err(format!(
                    "{other} is not a path: write paths as strings, such as [\"src\", \
                     \"config.json\"]"
                )),
            })
            .collect::<Result<_, _>>()
            .map(Watch::Paths),
        other => Err(format!(
            "{other} is not true, false or a list of paths: write true (the app's directory) \
             or paths such as [\"src\"]"
        )),
    }
}

/// Glob patterns: one string (several separated by spaces) or a list of strings (PM2's
/// `ignore_watch`).
pub fn globs_from_json(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::String(text) => Ok(split_globs(text)),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(glob) if !glob.trim().is_empty() => Ok(glob.trim().to_string()),
                Value::String(_) => Err("'' is an empty pattern: remove it".to_string()),
                // What JSON.stringify makes of a RegExp, which PM2 also takes.
                Value::Object(map) if map.is_empty() => Err(
                    "{} is not a glob pattern (a RegExp, as a .js file exports it?): corral \
                     takes globs, such as \"*.log\" or \"tmp/**\""
                        .to_string(),
                ),
                other => Err(format!(
                    "{other} is not a glob pattern: write strings such as \"*.log\""
                )),
            })
            .collect(),
        other => Err(format!(
            "{other} is not a list of glob patterns: write [\"*.log\", \"tmp\"]"
        )),
    }
}

/// An exit code or a list of them (PM2's `stop_exit_codes`).
pub fn exit_codes_from_json(value: &Value) -> Result<Vec<i32>, String> {
    let one = |item: &Value| match item {
        Value::Number(n) => parse_exit_code(&n.to_string()).map(|c| vec![c]),
        Value::String(text) => parse_exit_codes(text),
        other => Err(format!(
            "{other} is not an exit code: give a number from 0 to 255"
        )),
    };
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => Ok(items
            .iter()
            .map(one)
            .collect::<Result<Vec<_>, _>>()?
            .concat()),
        item => one(item),
    }
}

/// The policy options of `corral start`, parsed.
pub fn from_args(args: &StartArgs) -> Result<Policies> {
    fn opt<T>(
        value: Option<&str>,
        flag: &str,
        parse: fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>> {
        value
            .map(|v| parse(v).map_err(|e| anyhow!("--{flag}: {e}")))
            .transpose()
    }
    let mut ignore_watch = Vec::new();
    for text in &args.ignore_watch {
        let globs = split_globs(text);
        if globs.is_empty() {
            bail!("--ignore-watch '{text}' names no pattern: give a glob such as '*.log'");
        }
        ignore_watch.extend(globs);
    }
    Ok(Policies {
        naming: Naming::Flags,
        max_memory_restart: opt(
            args.max_memory_restart.as_deref(),
            "max-memory-restart",
            parse_memory_limit,
        )?,
        cron_restart: opt(args.cron_restart.as_deref(), "cron-restart", parse_cron)?,
        watch: match &args.watch {
            None => Watch::Off,
            Some(paths) if paths.is_empty() => Watch::Cwd,
            Some(paths) => Watch::Paths(paths.clone()),
        },
        ignore_watch,
        watch_delay_ms: opt(
            args.watch_delay.as_deref(),
            "watch-delay",
            config::parse_duration_ms,
        )?,
        stop_exit_codes: args
            .stop_exit_codes
            .iter()
            .map(|c| parse_exit_code(c).map_err(|e| anyhow!("--stop-exit-codes: {e}")))
            .collect::<Result<_>>()?,
        health: opt(args.health.as_deref(), "health", parse_probe)?,
        health_interval_ms: opt(
            args.health_interval.as_deref(),
            "health-interval",
            parse_positive_duration,
        )?,
        health_timeout_ms: opt(
            args.health_timeout.as_deref(),
            "health-timeout",
            parse_positive_duration,
        )?,
        health_failures: opt(
            args.health_failures.as_deref(),
            "health-failures",
            parse_failures,
        )?,
        ready_when: opt(args.ready_when.as_deref(), "ready-when", parse_ready_when)?,
        watchdog_ms: opt(
            args.watchdog.as_deref(),
            "watchdog",
            parse_positive_duration,
        )?,
    })
}

impl Policies {
    /// Checks the options together and against the app, and writes them into its spec (whose
    /// cwd, env and `wait_ready` are set already).
    pub fn apply(&self, spec: &mut AppSpec, origin: &dyn fmt::Display) -> Result<()> {
        // A command line names no app in its origin ("start"); a file's origin does.
        let at = match self.naming {
            Naming::Flags => format!("{origin} {}", spec.name),
            Naming::Keys => origin.to_string(),
        };
        let name = |key: &str| self.naming.name(key);
        spec.max_memory_restart = self.max_memory_restart;
        spec.cron_restart.clone_from(&self.cron_restart);
        spec.watch = self.watched_paths(spec, &at)?;
        spec.ignore_watch.clone_from(&self.ignore_watch);
        spec.watch_delay_ms = self.watch_delay_ms.unwrap_or(spec.watch_delay_ms);
        let mut codes = self.stop_exit_codes.clone();
        codes.sort_unstable();
        codes.dedup();
        spec.stop_exit_codes = codes;
        spec.health = self.health_check(spec, &at)?;
        if let Some(ready_when) = self.ready_when {
            if ready_when == ReadyWhen::Probe && spec.health.is_none() {
                bail!(
                    "{at}: {} probe needs {}: the probe is what says the app is ready; add {} \
                     (such as http://127.0.0.1:3000/healthz), or leave {} out",
                    name("ready_when"),
                    name("health"),
                    name("health"),
                    name("ready_when")
                );
            }
            if ready_when == ReadyWhen::Probe && spec.wait_ready {
                bail!(
                    "{at}: {} probe and {} both say what alone makes a process ready (a passing \
                     probe, a ready message): keep one",
                    name("ready_when"),
                    name("wait_ready")
                );
            }
            spec.ready_when = ready_when;
        }
        spec.watchdog_ms = self.watchdog_ms;
        Ok(())
    }

    /// The absolute paths to watch. `ignore_watch` and `watch_delay` without anything to watch
    /// would do nothing, so they are refused.
    fn watched_paths(&self, spec: &AppSpec, at: &str) -> Result<Vec<PathBuf>> {
        let name = |key: &str| self.naming.name(key);
        let paths = match &self.watch {
            Watch::Off => {
                let given = [
                    ("ignore_watch", !self.ignore_watch.is_empty()),
                    ("watch_delay", self.watch_delay_ms.is_some()),
                ];
                if let Some((key, _)) = given.iter().find(|(_, given)| *given) {
                    bail!(
                        "{at}: {} needs {}: add {} (the app's directory{}) or leave {} out",
                        name(key),
                        name("watch"),
                        name("watch"),
                        if self.naming == Naming::Flags {
                            ", or the paths after it"
                        } else {
                            ""
                        },
                        name(key)
                    );
                }
                return Ok(Vec::new());
            }
            Watch::Cwd => return Ok(vec![spec.cwd.clone()]),
            Watch::Paths(paths) => paths,
        };
        let mut watched = Vec::new();
        for path in paths {
            if path.trim().is_empty() {
                bail!(
                    "{at}: {} has an empty path: name a file or directory, or watch the app's \
                     directory with {}",
                    name("watch"),
                    if self.naming == Naming::Flags {
                        "--watch alone"
                    } else {
                        "watch = true"
                    }
                );
            }
            let full = spec.cwd.join(path);
            if !full.exists() {
                bail!(
                    "{at}: {} {path}: {} does not exist (relative paths start from the app's \
                     directory, {}): create it or correct the path",
                    name("watch"),
                    full.display(),
                    spec.cwd.display()
                );
            }
            let full = std::fs::canonicalize(&full).unwrap_or(full);
            if !watched.contains(&full) {
                watched.push(full);
            }
        }
        Ok(watched)
    }

    /// The health check, its interval, timeout and threshold checked together.
    fn health_check(&self, spec: &AppSpec, at: &str) -> Result<Option<HealthCheck>> {
        let name = |key: &str| self.naming.name(key);
        let Some(probe) = &self.health else {
            let given = [
                ("health_interval", self.health_interval_ms.is_some()),
                ("health_timeout", self.health_timeout_ms.is_some()),
                ("health_failures", self.health_failures.is_some()),
            ];
            if let Some((key, _)) = given.iter().find(|(_, given)| *given) {
                bail!(
                    "{at}: {} needs {}: add {} (http://127.0.0.1:PORT/path, tcp:PORT or \
                     exec:CMD), or leave {} out",
                    name(key),
                    name("health"),
                    name("health"),
                    name(key)
                );
            }
            return Ok(None);
        };
        if let Probe::Exec { argv } = probe {
            check_probe_program(&argv[0], spec)
                .map_err(|why| anyhow!("{at}: {} {probe}: {why}", name("health")))?;
        }
        let mut check = HealthCheck::new(probe.clone());
        check.interval_ms = self.health_interval_ms.unwrap_or(check.interval_ms);
        check.timeout_ms = self.health_timeout_ms.unwrap_or(check.timeout_ms);
        check.failures = self.health_failures.unwrap_or(check.failures);
        if check.timeout_ms >= check.interval_ms {
            let by_default = |given: Option<u64>| if given.is_none() { " by default" } else { "" };
            bail!(
                "{at}: {} ({}ms{}) must be below {} ({}ms{}): a probe ends before the next one \
                 starts; shorten the timeout or lengthen the interval",
                name("health_timeout"),
                check.timeout_ms,
                by_default(self.health_timeout_ms),
                name("health_interval"),
                check.interval_ms,
                by_default(self.health_interval_ms)
            );
        }
        Ok(Some(check))
    }
}

/// An exec probe's program is found as the daemon will look for it: a path from the app's
/// directory, or a name on the app's PATH (its `--env PATH=...`, else the caller's).
fn check_probe_program(program: &str, spec: &AppSpec) -> Result<(), String> {
    if program.contains('/') {
        let path = spec.cwd.join(program);
        return if path.is_file() {
            Ok(())
        } else {
            Err(format!(
                "{} does not exist (a relative path starts from the app's directory, {})",
                path.display(),
                spec.cwd.display()
            ))
        };
    }
    let search: Option<OsString> = spec
        .env
        .get("PATH")
        .map(OsString::from)
        .or_else(|| std::env::var_os("PATH"));
    let found = search.is_some_and(|dirs| {
        std::env::split_paths(&dirs).any(|dir| config::is_executable(&dir.join(program)))
    });
    if found {
        Ok(())
    } else {
        Err(format!(
            "'{program}' is not on PATH: install it, or give its path"
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    /// The spec of `corral start /bin/true --name api --cwd DIR ARGS...`.
    fn start(dir: &Path, options: &[&str]) -> Result<AppSpec> {
        let dir = dir.to_str().unwrap();
        let mut argv = vec![
            "corral",
            "start",
            "/bin/true",
            "--name",
            "api",
            "--cwd",
            dir,
        ];
        argv.extend(options);
        let Command::Start(start) = Cli::try_parse_from(argv)?.command else {
            unreachable!("a start command")
        };
        config::spec_from_args(&start)
    }

    /// The message of a refused `start`, which must name the app or the option.
    fn refused(dir: &Path, args: &[&str]) -> String {
        format!("{:#}", start(dir, args).unwrap_err())
    }

    fn assert_says(message: &str, parts: &[&str]) {
        for part in parts {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
    }

    #[test]
    fn memory_limits_are_sizes_above_zero() {
        assert_eq!(parse_memory_limit("300M"), Ok(300 << 20));
        assert_eq!(parse_memory_limit("1G"), Ok(1 << 30));
        assert_eq!(parse_memory_limit("512K"), Ok(512 << 10));
        assert_eq!(parse_memory_limit("1048576"), Ok(1 << 20));
        assert_says(&parse_memory_limit("0").unwrap_err(), &["'0'", "300M"]);
        assert_says(&parse_memory_limit("lots").unwrap_err(), &["not a size"]);
    }

    #[test]
    fn exit_codes_are_0_to_255() {
        assert_eq!(parse_exit_codes("0,3"), Ok(vec![0, 3]));
        assert_eq!(parse_exit_codes(" 1 2 "), Ok(vec![1, 2]));
        for bad in ["256", "-1", "x"] {
            assert_says(&parse_exit_codes(bad).unwrap_err(), &["0 to 255"]);
        }
        assert_says(&parse_exit_codes(",").unwrap_err(), &["names no exit code"]);
    }

    #[test]
    fn durations_and_counts_above_zero() {
        assert_eq!(parse_positive_duration("5s"), Ok(5000));
        assert_says(&parse_positive_duration("0s").unwrap_err(), &["no time"]);
        assert_eq!(parse_failures("3"), Ok(3));
        for bad in ["0", "-2", "many"] {
            assert_says(&parse_failures(bad).unwrap_err(), &["from 1"]);
        }
    }

    #[test]
    fn start_takes_a_memory_limit() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(dir.path(), &["--max-memory-restart", "300M"]).unwrap();
        assert_eq!(spec.max_memory_restart, Some(300 << 20));
        assert_eq!(start(dir.path(), &[]).unwrap().max_memory_restart, None);
        assert_says(
            &refused(dir.path(), &["--max-memory-restart", "0"]),
            &["--max-memory-restart", "'0'"],
        );
    }

    #[test]
    fn start_takes_a_cron_restart_checked_by_the_daemon_s_parser() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(dir.path(), &["--cron-restart", " 0 3 * * * "]).unwrap();
        assert_eq!(spec.cron_restart.as_deref(), Some("0 3 * * *"));
        // PM2's short name.
        let spec = start(dir.path(), &["--cron", "@daily"]).unwrap();
        assert_eq!(spec.cron_restart.as_deref(), Some("@daily"));
        assert_says(
            &refused(dir.path(), &["--cron-restart", "61 * * * *"]),
            &["--cron-restart", "'61 * * * *' is not a cron expression"],
        );
        assert_says(
            &refused(dir.path(), &["--cron-restart", "0 3 * *"]),
            &["--cron-restart", "4 fields"],
        );
    }

    #[test]
    fn watch_alone_watches_the_app_s_directory() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(dir.path(), &["--watch"]).unwrap();
        assert_eq!(spec.watch, [std::fs::canonicalize(dir.path()).unwrap()]);
        assert_eq!(spec.watch_delay_ms, 500);
        assert!(start(dir.path(), &[]).unwrap().watch.is_empty());
    }

    #[test]
    fn watched_paths_are_relative_to_the_app_s_directory_and_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        std::fs::write(dir.path().join("app.json"), "{}").unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let spec = start(
            dir.path(),
            &["--watch", "src", "app.json", "--watch-delay", "2s"],
        )
        .unwrap();
        assert_eq!(spec.watch, [root.join("src"), root.join("app.json")]);
        assert_eq!(spec.watch_delay_ms, 2000);
        let message = refused(dir.path(), &["--watch", "src", "nope"]);
        assert_says(&message, &["start api", "--watch nope", "does not exist"]);
        assert!(message.contains(&dir.path().join("nope").display().to_string()));
    }

    #[test]
    fn watch_stops_at_the_next_option_or_at_the_program_s_arguments() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("src")).unwrap();
        let spec = start(dir.path(), &["--watch", "src", "--time", "--", "x"]).unwrap();
        assert_eq!(spec.watch.len(), 1);
        assert!(spec.time);
        assert_eq!(spec.args, ["x"]);
        let spec = start(dir.path(), &["--watch", "--", "y"]).unwrap();
        assert_eq!(spec.watch.len(), 1);
        assert_eq!(spec.args, ["y"]);
    }

    #[test]
    fn ignore_watch_takes_globs_repeated_or_separated_by_spaces() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(
            dir.path(),
            &[
                "--watch",
                "--ignore-watch",
                "*.log tmp",
                "--ignore-watch",
                "dist/**",
            ],
        )
        .unwrap();
        assert_eq!(spec.ignore_watch, ["*.log", "tmp", "dist/**"]);
        assert_says(
            &refused(dir.path(), &["--watch", "--ignore-watch", " "]),
            &["--ignore-watch", "names no pattern"],
        );
    }

    #[test]
    fn watch_options_without_watch_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_says(
            &refused(dir.path(), &["--ignore-watch", "*.log"]),
            &["start api", "--ignore-watch needs --watch"],
        );
        assert_says(
            &refused(dir.path(), &["--watch-delay", "1s"]),
            &["start api", "--watch-delay needs --watch"],
        );
    }

    #[test]
    fn stop_exit_codes_are_a_comma_separated_list() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(dir.path(), &["--stop-exit-codes", "3,0,3"]).unwrap();
        assert_eq!(spec.stop_exit_codes, [0, 3]);
        let spec = start(
            dir.path(),
            &["--stop-exit-codes", "1", "--stop-exit-codes", "2"],
        )
        .unwrap();
        assert_eq!(spec.stop_exit_codes, [1, 2]);
        assert_says(
            &refused(dir.path(), &["--stop-exit-codes", "0,300"]),
            &["--stop-exit-codes", "'300'", "0 to 255"],
        );
    }

    #[test]
    fn a_health_check_has_defaults_and_takes_its_options() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(dir.path(), &["--health", "tcp:9000"]).unwrap();
        let health = spec.health.unwrap();
        assert_eq!(health.probe.to_string(), "tcp:127.0.0.1:9000");
        assert_eq!(
            (health.interval_ms, health.timeout_ms, health.failures),
            (10_000, 2_000, 3)
        );
        let spec = start(
            dir.path(),
            &[
                "--health",
                "http://127.0.0.1:3000/healthz",
                "--health-interval",
                "5s",
                "--health-timeout",
                "500ms",
                "--health-failures",
                "5",
            ],
        )
        .unwrap();
        let health = spec.health.unwrap();
        assert_eq!(
            (health.interval_ms, health.timeout_ms, health.failures),
            (5_000, 500, 5)
        );
    }

    #[test]
    fn health_options_are_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        for flag in ["--health-interval", "--health-timeout", "--health-failures"] {
            let value = if flag == "--health-failures" {
                "2"
            } else {
                "1s"
            };
            assert_says(
                &refused(dir.path(), &[flag, value]),
                &["start api", &format!("{flag} needs --health")],
            );
        }
        let health = ["--health", "tcp:9000"];
        for (flag, value) in [
            ("--health-interval", "0"),
            ("--health-timeout", "0ms"),
            ("--health-failures", "0"),
        ] {
            assert_says(
                &refused(dir.path(), &[&health[..], &[flag, value]].concat()),
                &[flag, &format!("'{value}'")],
            );
        }
        assert_says(
            &refused(
                dir.path(),
                &[&health[..], &["--health-interval", "1s"]].concat(),
            ),
            &[
                "start api",
                "--health-timeout (2000ms by default) must be below --health-interval (1000ms)",
            ],
        );
        assert_says(
            &refused(dir.path(), &["--health", "https://127.0.0.1/"]),
            &["--health", "plain HTTP"],
        );
    }

    #[test]
    fn an_exec_probe_s_program_must_be_there() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(dir.path(), &["--health", "exec:sh -c 'exit 0'"]).unwrap();
        assert!(matches!(spec.health.unwrap().probe, Probe::Exec { .. }));
        assert_says(
            &refused(dir.path(), &["--health", "exec:no-such-probe-program --ok"]),
            &[
                "start api",
                "--health exec:",
                "'no-such-probe-program' is not on PATH",
            ],
        );
        assert_says(
            &refused(dir.path(), &["--health", "exec:./check.sh"]),
            &["start api", "check.sh does not exist"],
        );
    }

    #[test]
    fn ready_when_probe_needs_a_health_check_and_no_wait_ready() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(
            dir.path(),
            &["--health", "tcp:9000", "--ready-when", "probe"],
        )
        .unwrap();
        assert_eq!(spec.ready_when, ReadyWhen::Probe);
        let spec = start(dir.path(), &["--ready-when", "default"]).unwrap();
        assert_eq!(spec.ready_when, ReadyWhen::Default);
        assert_says(
            &refused(dir.path(), &["--ready-when", "probe"]),
            &["start api", "--ready-when probe needs --health"],
        );
        assert_says(
            &refused(
                dir.path(),
                &[
                    "--health",
                    "tcp:9000",
                    "--ready-when",
                    "probe",
                    "--wait-ready",
                ],
            ),
            &[
                "start api",
                "--ready-when probe and --wait-ready",
                "keep one",
            ],
        );
        assert_says(
            &refused(dir.path(), &["--ready-when", "soon"]),
            &["--ready-when", "'soon'"],
        );
    }

    #[test]
    fn a_watchdog_is_a_duration_above_zero() {
        let dir = tempfile::tempdir().unwrap();
        let spec = start(dir.path(), &["--watchdog", "5s"]).unwrap();
        assert_eq!(spec.watchdog_ms, Some(5000));
        assert_says(
            &refused(dir.path(), &["--watchdog", "0"]),
            &["--watchdog", "no time"],
        );
    }

    #[test]
    fn json_shapes_of_watch_ignore_watch_and_stop_exit_codes() {
        use serde_json::json;
        assert_eq!(watch_from_json(&json!(true)), Ok(Watch::Cwd));
        assert_eq!(watch_from_json(&json!(false)), Ok(Watch::Off));
        assert_eq!(watch_from_json(&json!([])), Ok(Watch::Cwd));
        assert_eq!(
            watch_from_json(&json!("src")),
            Ok(Watch::Paths(vec!["src".into()]))
        );
        assert_says(&watch_from_json(&json!(3)).unwrap_err(), &["3 is not"]);
        assert_says(
            &watch_from_json(&json!(["a", 1])).unwrap_err(),
            &["1 is not a path"],
        );
        assert_eq!(
            globs_from_json(&json!("*.log tmp")),
            Ok(vec!["*.log".into(), "tmp".into()])
        );
        assert_eq!(
            globs_from_json(&json!(["my dir/*"])),
            Ok(vec!["my dir/*".into()])
        );
        assert_says(&globs_from_json(&json!([{}])).unwrap_err(), &["RegExp"]);
        assert_says(
            &globs_from_json(&json!([""])).unwrap_err(),
            &["empty pattern"],
        );
        assert_eq!(exit_codes_from_json(&json!(3)), Ok(vec![3]));
        assert_eq!(exit_codes_from_json(&json!([0, "3"])), Ok(vec![0, 3]));
        assert_says(
            &exit_codes_from_json(&json!([0, 256])).unwrap_err(),
            &["'256'"],
        );
        assert_says(
            &exit_codes_from_json(&json!(true)).unwrap_err(),
            &["true is not"],
        );
    }
}
