//! The harness of the end-to-end tests.
//!
//! Every test owns a [`Home`]: a private `CORRAL_HOME` (a temporary directory, passed to each
//! command with `.env`, never set for the whole test process, since tests run in parallel
//! threads) and a second temporary directory for fixtures and data. Commands run the real
//! `corral` binary with a time limit. Nothing synchronises with `sleep`: [`wait_until`] polls a
//! condition and, when its time is up, fails with what it waited for and what it saw last.
//!
//! Dropping a [`Home`] (also while a test panics) runs `corral kill`, then SIGKILLs whatever is
//! left of this home: the daemon, every process group seen in `corral ls --json`, and any process
//! whose environment names this `CORRAL_HOME`.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// The binary under test.
pub const CORRAL: &str = env!("CARGO_BIN_EXE_corral");
/// The most any one `corral` command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How often [`wait_until`] looks again.
const POLL: Duration = Duration::from_millis(20);

/// Calls `check` until it returns `Ok`, at most for `timeout`; the `Err` text is the observed
/// state, shown with `what` when the time is up.
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(state) => assert!(
                Instant::now() < deadline,
                "gave up after {timeout:?} waiting until {what}; last observed state:\n{state}"
            ),
        }
        thread::sleep(POLL);
    }
}

/// Runs `command` with its output captured and stdin closed; `Err` when it cannot start or does
/// not end within `timeout` (it is then killed), with whatever it printed.
pub fn run_bounded(mut command: Command, timeout: Duration) -> Result<Output, String> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let shown = format!("{command:?}");
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let pid = child.id();
    let (done, status) = mpsc::channel();
    thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    let text = |buffer: &Arc<Mutex<Vec<u8>>>| {
        String::from_utf8_lossy(&buffer.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    };
    match status.recv_timeout(timeout) {
        Ok(Ok(status)) => {
            let stdout = join(stdout);
            let stderr = join(stderr);
            Ok(Output {
                status,
                stdout,
                stderr,
            })
        }
        Ok(Err(e)) => Err(format!("waiting for {shown}: {e}")),
        Err(_) => {
            let _ = corral_sys::kill(pid, 9);
            let _ = status.recv_timeout(Duration::from_secs(5));
            Err(format!(
                "{shown} did not finish within {timeout:?}\n--- stdout so far:\n{}\n--- stderr so far:\n{}",
                text(&stdout.1),
                text(&stderr.1)
            ))
        }
    }
}

type Collector = (thread::JoinHandle<()>, Arc<Mutex<Vec<u8>>>);

fn collect(pipe: Option<impl Read + Send + 'static>) -> Collector {
    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = buffer.clone();
    let handle = thread::spawn(move || {
        let Some(mut pipe) = pipe else { return };
        let mut chunk = [0; 8192];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(&chunk[..n]);
        }
    });
    (handle, buffer)
}

fn join((handle, buffer): Collector) -> Vec<u8> {
    let _ = handle.join();
    std::mem::take(&mut *buffer.lock().unwrap_or_else(PoisonError::into_inner))
}

/// Runs a command within [`COMMAND_TIMEOUT`]; fails the test when it hangs.
pub fn run(command: Command) -> Output {
    run_bounded(command, COMMAND_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn succeeds(command: Command) -> String {
    let shown = format!("{:?}", command.get_args().collect::<Vec<_>>());
    let output = run(command);
    assert!(
        output.status.success(),
        "corral {shown} failed ({})\n--- stdout:\n{}\n--- stderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What `/proc/<pid>/stat` says: (state letter, process group), `None` once the pid is gone.
pub fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
    Some((
        fields.first()?.chars().next()?,
        fields.get(2)?.parse().ok()?,
    ))
}

/// Whether `pid` is a running process (a zombie has finished running).
pub fn is_running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The processes of group `pgid` that are not zombies, as `pid state` lines.
pub fn running_members(pgid: u32) -> Vec<String> {
    all_pids()
        .into_iter()
        .filter_map(|pid| {
            let (state, group) = proc_stat(pid)?;
            (group == pgid && state != 'Z').then(|| format!("{pid} {state} {}", cmdline(pid)))
        })
        .collect()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Waits (briefly: the daemon reaps what it adopted within milliseconds) until no process, not
/// even a zombie, is left in any of `pgids`.
pub fn assert_groups_gone(pgids: &[u32]) {
    wait_until(
        Duration::from_secs(10),
        &format!("the process groups {pgids:?} are gone"),
        || {
            let left: Vec<String> = pgids
                .iter()
                .filter(|&&g| corral_sys::group_exists(g))
                .map(|&g| format!("group {g}: running members {:?}", running_members(g)))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join("\n"))
            }
        },
    );
}

/// Asserts now that no process of `pgid` is still running (zombies waiting to be reaped aside).
pub fn assert_nothing_runs_in(pgid: u32) {
    let left = running_members(pgid);
    assert!(left.is_empty(), "group {pgid} still runs: {left:?}");
}

/// A field of an instance of `ls --json`.
pub fn status(instance: &Value) -> &str {
    instance["status"].as_str().unwrap_or("?")
}

/// The pid of an instance, if it runs.
pub fn pid(instance: &Value) -> Option<u32> {
    instance["pid"].as_u64().map(|p| p as u32)
}

/// The automatic restarts of an instance.
pub fn restarts(instance: &Value) -> u64 {
    instance["restarts"].as_u64().unwrap_or(u64::MAX)
}

/// `ls --json` output, compactly, for failure messages.
pub fn show(instances: &[Value]) -> String {
    let mut out = String::new();
    for i in instances {
        let _ = writeln!(
            out,
            "  {}:{} pid={:?} status={} restarts={} unstable={} last_exit={}",
            i["app"].as_str().unwrap_or("?"),
            i["instance"],
            pid(i),
            status(i),
            i["restarts"],
            i["unstable_restarts"],
            i["last_exit"]
        );
    }
    if out.is_empty() {
        out.push_str("  (no instance)\n");
    }
    out
}

/// A corral-worker example's binary, built beside the test binaries by `cargo test --workspace`.
// Only the test files that run an example use it.
#[allow(dead_code)]
pub fn example(name: &str) -> PathBuf {
    let me = std::env::current_exe().expect("the test's own path");
    let profile = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from <target>/<profile>/deps");
    let path = profile.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds the \
         corral-worker examples",
        path.display()
    );
    path
}

/// A path as the `&str` a command line wants.
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// One test's `CORRAL_HOME`, its work directory, and everything it started.
#[derive(Debug)]
pub struct Home {
    root: TempDir,
    work: TempDir,
    pgids: Mutex<BTreeSet<u32>>,
}

impl Home {
    /// A fresh, empty home; no daemon runs for it yet.
    pub fn new() -> Home {
        Home {
            root: TempDir::with_prefix("corral-e2e-home-").expect("temporary CORRAL_HOME"),
            work: TempDir::with_prefix("corral-e2e-work-").expect("temporary work directory"),
            pgids: Mutex::new(BTreeSet::new()),
        }
    }

    /// `CORRAL_HOME`.
    pub fn path(&self) -> &Path {
        self.root.path()
    }

    /// A directory for fixtures and files the apps write.
    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// Writes a file into the work directory; returns its path.
    pub fn file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.work().join(name);
        std::fs::write(&path, content).expect("writing a fixture");
        path
    }

    /// `corral <args>` for this home, in the work directory, to be run with [`Home::run`].
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(CORRAL);
        command
            .args(args)
            .env("CORRAL_HOME", self.path())
            .current_dir(self.work());
        command
    }

    /// Runs `corral <args>`.
    pub fn corral(&self, args: &[&str]) -> Output {
        run(self.command(args))
    }

    /// Runs `corral <args>`, which must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeds(self.command(args))
    }

    /// Runs `corral <args>`, which must fail; returns its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let output = self.corral(args);
        assert!(
            !output.status.success(),
            "corral {args:?} should have failed but succeeded\n--- stdout:\n{}\n--- stderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Every instance, from `corral ls --json`; their pids are remembered for the cleanup.
    pub fn ls(&self) -> Vec<Value> {
        let out = self.ok(&["ls", "--json"]);
        let instances: Vec<Value> = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("`ls --json` printed no JSON list ({e}):\n{out}"));
        self.pgids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(instances.iter().filter_map(pid));
        instances
    }

    /// The instances of one app, by instance index.
    pub fn instances(&self, app: &str) -> Vec<Value> {
        let mut list: Vec<Value> = self.ls().into_iter().filter(|i| i["app"] == app).collect();
        list.sort_by_key(|i| i["instance"].as_u64());
        list
    }

    /// Polls `ls --json` until `ready` holds for the instances of `app`; returns them.
    pub fn wait_app(
        &self,
        timeout: Duration,
        app: &str,
        what: &str,
        mut ready: impl FnMut(&[Value]) -> bool,
    ) -> Vec<Value> {
        wait_until(timeout, &format!("app '{app}': {what}"), || {
            let list = self.instances(app);
            if ready(&list) {
                Ok(list)
            } else {
                Err(show(&list))
            }
        })
    }

    /// Waits until every instance of `app` (there are `count`) is online.
    pub fn wait_online(&self, app: &str, count: usize) -> Vec<Value> {
        self.wait_app(
            Duration::from_secs(20),
            app,
            &format!("{count} instance(s), all online"),
            |list| list.len() == count && list.iter().all(|i| status(i) == "online"),
        )
    }

    /// Every pid seen in `ls --json` so far (each the id of its process group).
    pub fn recorded_pgids(&self) -> Vec<u32> {
        self.pgids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    /// A log file of an instance.
    pub fn log_file(&self, app: &str, instance: u32, stream: &str) -> PathBuf {
        self.path()
            .join("logs")
            .join(format!("{app}-{instance}-{stream}.log"))
    }

    /// The content of a log file (empty when it does not exist yet).
    pub fn log(&self, app: &str, instance: u32, stream: &str) -> String {
        std::fs::read_to_string(self.log_file(app, instance, stream)).unwrap_or_default()
    }

    /// Waits until a log file holds `needle`; returns the content.
    pub fn wait_log(&self, app: &str, instance: u32, stream: &str, needle: &str) -> String {
        wait_until(
            Duration::from_secs(20),
            &format!("{app}-{instance}-{stream}.log contains {needle:?}"),
            || {
                let text = self.log(app, instance, stream);
                if text.contains(needle) {
                    Ok(text)
                } else {
                    Err(text)
                }
            },
        )
    }

    /// The pid in `daemon.pid`.
    pub fn daemon_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.path().join("daemon.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Asserts that the daemon answers `corral ping`.
    pub fn assert_daemon_answers(&self) {
        let pong = self.ok(&["ping"]);
        assert!(pong.starts_with("pong: corral daemon"), "{pong}");
    }

    /// Whether a process's environment names this `CORRAL_HOME` (the daemon and every app
    /// inherit it from the command that started them).
    fn is_ours(&self, pid: u32) -> bool {
        let mut needle = b"CORRAL_HOME=".to_vec();
        needle.extend_from_slice(self.path().as_os_str().as_encoded_bytes());
        std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|entry| entry == needle))
    }
}

impl Default for Home {
    fn default() -> Home {
        Home::new()
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let _ = run_bounded(self.command(&["kill"]), Duration::from_secs(30));
        let own_group = proc_stat(std::process::id()).map_or(0, |(_, g)| g);
        if let Some(daemon) = self.daemon_pid()
            && is_running(daemon)
            && self.is_ours(daemon)
        {
            let _ = corral_sys::kill(daemon, 9);
        }
        let recorded = self.recorded_pgids();
        let everything = all_pids();
        for pgid in recorded {
            // A recorded pid may have been reused by now: only groups with a member of ours.
            let ours = everything
                .iter()
                .any(|&p| proc_stat(p).is_some_and(|(_, g)| g == pgid) && self.is_ours(p));
            if pgid != own_group && ours {
                let _ = corral_sys::kill_group(pgid, 9);
            }
        }
        for pid in everything {
            if is_running(pid) && self.is_ours(pid) {
                let _ = corral_sys::kill(pid, 9);
            }
        }
    }
}
