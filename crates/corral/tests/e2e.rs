//! End-to-end tests: the real `corral` binary and its daemon, real programs (python3 and bash
//! fixtures written into each test's own directory), one private `CORRAL_HOME` per test.
//!
//! Every test ends by checking that the process groups of its apps are gone.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Home, arg, assert_groups_gone, assert_nothing_runs_in, is_running, pid, proc_stat, restarts,
    show, status, wait_until,
};

// ---- fixtures ----

/// Prints who it is, then idles.
const IDENTITY_PY: &str = r#"
import os, time
print("identity app=%s instance=%s node=%s pid=%d" % (
    os.environ.get("CORRAL_APP"), os.environ.get("CORRAL_INSTANCE"),
    os.environ.get("NODE_APP_INSTANCE"), os.getpid()), flush=True)
while True:
    time.sleep(3600)
"#;

/// Prints an option from its environment and its arguments, then idles.
const ENV_PY: &str = r#"
import os, sys, time
print("env FOO=%s SIDE=%s SECRET=%s args=%s instance=%s pid=%d" % (
    os.environ.get("FOO", "-"), os.environ.get("SIDE", "-"),
    os.environ.get("CORRAL_TEST_SECRET", "-"), ",".join(sys.argv[1:]) or "-",
    os.environ.get("CORRAL_INSTANCE"), os.getpid()), flush=True)
while True:
    time.sleep(3600)
"#;

/// Crashes at once.
const CRASH_SH: &str = "echo crashing\nexit 1\n";

/// Runs for a second, then fails.
const SHORT_LIVED_PY: &str = r#"
import os, time
print("up pid=%d" % os.getpid(), flush=True)
time.sleep(1.0)
raise SystemExit(3)
"#;

/// Ignores SIGTERM.
const STUBBORN_PY: &str = r#"
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", flush=True)
while True:
    time.sleep(3600)
"#;

/// Two background children, their pids appended to the file named by $1, then waits.
const FAMILY_SH: &str = r#"
sleep 1000 &
echo $! >> "$1"
sleep 1000 &
echo $! >> "$1"
echo children started
wait
"#;

/// Leaves a child that ignores SIGTERM behind and exits.
const DESERTER_SH: &str = r#"
( trap '' TERM; exec sleep 1000 ) &
echo "$$ $!" > "$1.tmp"
mv "$1.tmp" "$1"
echo leader leaves
exit 0
"#;

/// Writes $1 numbered lines of 101 bytes to stdout in writes of an odd size, so that lines are
/// torn across `write()` calls.
const FLOOD_PY: &str = r#"
import sys
count = int(sys.argv[1])
out = sys.stdout.buffer
payloads = [bytes([c]) * 90 + b"\n" for c in range(ord("a"), ord("z") + 1)]
chunk = 1000003
buf = bytearray()
for i in range(count):
    buf += b"%09d " % i
    buf += payloads[i % 26]
    if len(buf) >= chunk:
        out.write(buf[:chunk])
        del buf[:chunk]
out.write(buf)
out.flush()
"#;

/// Writes 500 lines of 100 bytes in one write, then exits.
const ROTATE_PY: &str = r#"
import sys
sys.stdout.buffer.write(b"".join(b"%05d " % i + b"r" * 93 + b"\n" for i in range(500)))
sys.stdout.flush()
"#;

/// Fixed lines on both streams, then idles.
const STATIC_PY: &str = r#"
import sys, time
for i in range(1, 31):
    print("line %d" % i)
for i in range(1, 9):
    print("err %d" % i, file=sys.stderr)
sys.stdout.flush()
sys.stderr.flush()
print("static done", file=sys.stderr, flush=True)
while True:
    time.sleep(3600)
"#;

/// A line every 100 ms; once the file named by $1 exists, a line with its content.
const TICKER_PY: &str = r#"
import os, sys, time
trigger = sys.argv[1]
marked = False
n = 0
while True:
    print("tick %d" % n, flush=True)
    n += 1
    if not marked and os.path.exists(trigger):
        with open(trigger) as f:
            print("MARKER " + f.read().strip(), flush=True)
        marked = True
    time.sleep(0.1)
"#;

/// Writes a line on SIGUSR1.
const SIGNALS_PY: &str = r#"
import os, signal, time
def on_usr1(signum, frame):
    print("got SIGUSR1 in pid %d" % os.getpid(), flush=True)
signal.signal(signal.SIGUSR1, on_usr1)
print("ready for signals", flush=True)
while True:
    time.sleep(3600)
"#;

// ---- helpers ----

fn pids_of(instances: &[Value]) -> Vec<u32> {
    instances.iter().filter_map(pid).collect()
}

/// Lines of a file of pids.
fn read_pids(path: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

// ---- 1. start ----

#[test]
fn start_runs_instances_with_distinct_pids_that_go_online_with_their_identity() {
    let home = Home::new();
    let script = home.file("identity.py", IDENTITY_PY);
    let started = home.ok(&[
        "start",
        arg(&script),
        "-n",
        "ident",
        "-i",
        "2",
        "--min-uptime",
        "200ms",
    ]);
    // The answer to `start` comes right after the spawn, within min_uptime.
    assert_eq!(started.matches("starting").count(), 2, "{started}");

    let list = home.wait_online("ident", 2);
    let pids = pids_of(&list);
    assert_eq!(pids.len(), 2, "{}", show(&list));
    assert_ne!(pids[0], pids[1]);
    for (index, instance) in list.iter().enumerate() {
        assert_eq!(instance["instance"], index as u64);
        let p = pid(instance).unwrap();
        // Each instance leads its own process group.
        assert_eq!(proc_stat(p).map(|(_, group)| group), Some(p));
    }

    let expected: Vec<String> = pids
        .iter()
        .enumerate()
        .map(|(i, p)| format!("identity app=ident instance={i} node={i} pid={p}"))
        .collect();
    let logs = wait_until(
        Duration::from_secs(20),
        "`corral logs` shows both identity lines",
        || {
            let out = home.ok(&["logs", "ident", "--raw", "--out"]);
            if expected.iter().all(|e| out.lines().any(|l| l == e)) {
                Ok(out)
            } else {
                Err(out)
            }
        },
    );
    assert!(!logs.contains("ident:"), "--raw has no prefix: {logs}");

    home.ok(&["delete", "ident"]);
    assert!(home.ls().is_empty());
    assert_groups_gone(&pids);
}

// ---- 2. stop, restart, delete ----

#[test]
fn stop_keeps_the_app_listed_restart_gives_a_new_pid_and_delete_forgets_it() {
    let home = Home::new();
    let script = home.file("idle.py", IDENTITY_PY);
    home.ok(&["start", arg(&script), "--min-uptime", "100ms"]);
    let first = pid(&home.wait_online("idle", 1)[0]).unwrap();

    let stopped = home.ok(&["stop", "idle"]);
    assert!(stopped.contains("stopped"), "{stopped}");
    assert_nothing_runs_in(first);
    let list = home.instances("idle");
    assert_eq!(list.len(), 1, "{}", show(&list));
    assert_eq!(status(&list[0]), "stopped");
    assert_eq!(pid(&list[0]), None);
    assert_groups_gone(&[first]);

    home.ok(&["restart", "idle"]);
    let list = home.wait_online("idle", 1);
    let second = pid(&list[0]).unwrap();
    assert_ne!(second, first);
    assert!(is_running(second));

    let deleted = home.ok(&["delete", "idle"]);
    assert!(deleted.contains("deleted idle"), "{deleted}");
    assert_nothing_runs_in(second);
    assert!(home.ls().is_empty());
    assert!(home.ok(&["ls"]).contains("no app is running"));
    assert_groups_gone(&[first, second]);
}

// ---- 3. crash loop ----

#[test]
fn a_crash_loop_ends_errored_stays_down_and_restart_resets_it() {
    let home = Home::new();
    let script = home.file("crash.sh", CRASH_SH);
    home.ok(&[
        "start",
        arg(&script),
        "--max-restarts",
        "3",
        "--min-uptime",
        "1s",
    ]);
    let errored = |list: &[Value]| list.len() == 1 && status(&list[0]) == "errored";
    let list = home.wait_app(Duration::from_secs(20), "crash", "errored", errored);
    assert_eq!(restarts(&list[0]), 3, "{}", show(&list));
    assert_eq!(pid(&list[0]), None);
    // One first run and three restarts.
    assert_eq!(home.log("crash", 0, "out").matches("crashing").count(), 4);

    // Errored means left down: nothing changes for a while.
    let window = Instant::now() + Duration::from_millis(800);
    while Instant::now() < window {
        let list = home.instances("crash");
        assert!(errored(&list) && restarts(&list[0]) == 3, "{}", show(&list));
    }
    assert_eq!(home.log("crash", 0, "out").matches("crashing").count(), 4);

    let table = home.ok(&["ls"]);
    for words in [
        "crash loop",
        "exited with code 1",
        "3 restart(s) in a row",
        "corral restart crash",
    ] {
        assert!(table.contains(words), "no {words:?} in:\n{table}");
    }

    // A restart by the user clears the crash-loop count (three more restarts before it is
    // errored again) and counts as a restart itself, as PM2's restart_time does: 3 + 1 + 3.
    let restarted = home.ok(&["restart", "crash"]);
    assert!(restarted.contains("starting"), "{restarted}");
    let list = home.wait_app(
        Duration::from_secs(20),
        "crash",
        "errored again after 3 more restarts",
        |list| errored(list) && restarts(&list[0]) == 7,
    );
    assert_eq!(list[0]["unstable_restarts"], 3);
    assert_eq!(home.log("crash", 0, "out").matches("crashing").count(), 8);
    home.ok(&["delete", "crash"]);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- 4. crash after min_uptime ----

#[test]
fn an_app_that_exits_after_min_uptime_is_restarted_and_never_errored() {
    let home = Home::new();
    let script = home.file("short.py", SHORT_LIVED_PY);
    // max-restarts 1: were these exits counted as unstable, the app would be errored at once.
    home.ok(&[
        "start",
        arg(&script),
        "--min-uptime",
        "300ms",
        "--max-restarts",
        "1",
    ]);
    let mut pids = BTreeSet::new();
    let list = home.wait_app(
        Duration::from_secs(20),
        "short",
        "restarted twice",
        |list| {
            assert!(
                list.iter().all(|i| status(i) != "errored"),
                "{}",
                show(list)
            );
            pids.extend(pids_of(list));
            restarts(&list[0]) >= 2 && pid(&list[0]).is_some()
        },
    );
    assert_eq!(list[0]["unstable_restarts"], 0, "{}", show(&list));
    assert_eq!(list[0]["last_exit"], "exited with code 3");
    assert!(pids.len() >= 2, "pids seen: {pids:?}");
    home.ok(&["delete", "short"]);
    assert_groups_gone(&pids.into_iter().collect::<Vec<_>>());
}

// ---- 5. SIGTERM ignored ----

#[test]
fn stop_kills_a_program_that_ignores_sigterm_after_the_kill_timeout() {
    let home = Home::new();
    let script = home.file("stubborn.py", STUBBORN_PY);
    home.ok(&[
        "start",
        arg(&script),
        "--kill-timeout",
        "500ms",
        "--min-uptime",
        "100ms",
    ]);
    let p = pid(&home.wait_online("stubborn", 1)[0]).unwrap();
    home.wait_log("stubborn", 0, "out", "ignoring SIGTERM");

    let began = Instant::now();
    home.ok(&["stop", "stubborn"]);
    let took = began.elapsed();
    assert!(took >= Duration::from_millis(500), "stop took {took:?}");
    assert_nothing_runs_in(p);
    let list = home.instances("stubborn");
    assert_eq!(status(&list[0]), "stopped", "{}", show(&list));
    assert_eq!(list[0]["last_exit"], "killed by SIGKILL");
    home.ok(&["delete", "stubborn"]);
    assert_groups_gone(&[p]);
}

// ---- 6. grandchildren ----

#[test]
fn stop_ends_the_children_of_a_program_too() {
    let home = Home::new();
    let script = home.file("family.sh", FAMILY_SH);
    let pid_file = home.work().join("children");
    home.ok(&[
        "start",
        arg(&script),
        "--min-uptime",
        "100ms",
        "--",
        arg(&pid_file),
    ]);
    let leader = pid(&home.wait_online("family", 1)[0]).unwrap();
    let children = wait_until(
        Duration::from_secs(20),
        "the fixture wrote its two children's pids",
        || {
            let pids = read_pids(&pid_file);
            if pids.len() == 2 {
                Ok(pids)
            } else {
                Err(format!("{pids:?}"))
            }
        },
    );
    for &child in &children {
        assert_eq!(proc_stat(child).map(|(_, g)| g), Some(leader));
        assert!(is_running(child));
    }

    home.ok(&["stop", "family"]);
    for &child in &children {
        assert!(!is_running(child), "grandchild {child} survived the stop");
    }
    assert_nothing_runs_in(leader);
    home.ok(&["delete", "family"]);
    assert_groups_gone(&[leader]);
}

#[test]
fn what_a_program_leaves_behind_when_it_exits_is_killed() {
    let home = Home::new();
    let script = home.file("deserter.sh", DESERTER_SH);
    let pid_file = home.work().join("leftover");
    home.ok(&[
        "start",
        arg(&script),
        "--no-autorestart",
        "--kill-timeout",
        "300ms",
        "--",
        arg(&pid_file),
    ]);
    let (leader, leftover) = wait_until(
        Duration::from_secs(20),
        "the fixture wrote its own and its child's pid",
        || {
            let text = std::fs::read_to_string(&pid_file).unwrap_or_default();
            let pids: Vec<u32> = text
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect();
            match pids[..] {
                [leader, child] => Ok((leader, child)),
                _ => Err(text),
            }
        },
    );
    // The leftover ignores SIGTERM: it is SIGKILLed once the kill timeout has passed.
    wait_until(
        Duration::from_secs(10),
        "the leftover child is killed",
        || {
            if is_running(leftover) {
                Err(format!("{leftover}: {:?}", proc_stat(leftover)))
            } else {
                Ok(())
            }
        },
    );
    let list = home.wait_app(Duration::from_secs(10), "deserter", "stopped", |l| {
        l.len() == 1 && status(&l[0]) == "stopped"
    });
    assert_eq!(list[0]["last_exit"], "exited with code 0");
    let mut groups = home.recorded_pgids();
    groups.push(leader);
    home.ok(&["delete", "deserter"]);
    assert_groups_gone(&groups);
}

// ---- 7. no loss under a flood ----

#[test]
fn a_200_mb_flood_reaches_the_log_whole_in_order_and_untorn() {
    const LINES: usize = 2_000_000;
    const LINE: usize = 101;
    let home = Home::new();
    let script = home.file("flood.py", FLOOD_PY);
    let began = Instant::now();
    home.ok(&[
        "start",
        arg(&script),
        "--no-autorestart",
        "--log-max-size",
        "0",
        "--",
        &LINES.to_string(),
    ]);
    home.wait_app(Duration::from_secs(120), "flood", "stopped", |l| {
        l.len() == 1 && status(&l[0]) == "stopped"
    });
    let stopped_after = began.elapsed();
    // The process may be reaped before its pipe is drained: the last bytes follow at once.
    let path = home.log_file("flood", 0, "out");
    let expected_len = (LINES * LINE) as u64;
    wait_until(
        Duration::from_secs(20),
        "the out log has every byte",
        || match std::fs::metadata(&path).map(|m| m.len()) {
            Ok(len) if len >= expected_len => Ok(()),
            other => Err(format!("{other:?} of {expected_len} bytes")),
        },
    );
    let logged_after = began.elapsed();

    let mut bytes = Vec::with_capacity(LINES * LINE);
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    let payloads: Vec<Vec<u8>> = (b'a'..=b'z')
        .map(|c| {
            let mut p = vec![c; 90];
            p.push(b'\n');
            p
        })
        .collect();
    let mut offset = 0;
    for i in 0..LINES {
        let Some(line) = bytes.get(offset..offset + LINE) else {
            panic!(
                "the log ends at line {i} (byte {offset} of {})",
                bytes.len()
            );
        };
        let number = std::str::from_utf8(&line[..9])
            .ok()
            .and_then(|n| n.parse::<usize>().ok());
        let good = number == Some(i) && line[9] == b' ' && line[10..] == payloads[i % 26][..];
        if !good {
            let end = (offset + 3 * LINE).min(bytes.len());
            panic!(
                "line {i} (byte {offset}) is wrong:\n{}",
                String::from_utf8_lossy(&bytes[offset.saturating_sub(LINE)..end])
            );
        }
        offset += LINE;
    }
    assert_eq!(offset, bytes.len(), "bytes after the last line");
    eprintln!(
        "flood: {} MB; app stopped after {stopped_after:?}, log complete after {logged_after:?}, \
         verified after {:?}",
        bytes.len() / 1_000_000,
        began.elapsed()
    );
    home.ok(&["delete", "flood"]);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- 8. last line without newline ----

#[test]
fn a_last_line_without_newline_is_logged_at_exit() {
    let home = Home::new();
    let script = home.file("partial.sh", "echo 'first line'\nprintf 'partial'\n");
    home.ok(&["start", arg(&script), "--no-autorestart"]);
    home.wait_app(Duration::from_secs(20), "partial", "stopped", |l| {
        l.len() == 1 && status(&l[0]) == "stopped"
    });
    wait_until(Duration::from_secs(10), "the log holds both lines", || {
        let text = home.log("partial", 0, "out");
        if text == "first line\npartial\n" {
            Ok(())
        } else {
            Err(format!("{text:?}"))
        }
    });
    home.ok(&["delete", "partial"]);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- 9. rotation ----

#[test]
fn rotation_keeps_whole_lines_in_bounded_files_and_drops_the_oldest() {
    let home = Home::new();
    let script = home.file("rotate.py", ROTATE_PY);
    home.ok(&[
        "start",
        arg(&script),
        "--no-autorestart",
        "--log-max-size",
        "10K",
        "--log-keep",
        "2",
    ]);
    home.wait_app(Duration::from_secs(20), "rotate", "stopped", |l| {
        l.len() == 1 && status(&l[0]) == "stopped"
    });
    let base = home.log_file("rotate", 0, "out");
    let numbered = |n: u32| std::path::PathBuf::from(format!("{}.{n}", base.display()));
    wait_until(
        Duration::from_secs(10),
        "the current log ends with the last line",
        || {
            let text = std::fs::read_to_string(&base).unwrap_or_default();
            if text.lines().last().is_some_and(|l| l.starts_with("00499 ")) {
                Ok(())
            } else {
                Err(text)
            }
        },
    );
    assert!(!numbered(3).exists(), "log-keep 2 leaves no .3");
    let mut lines = Vec::new();
    for path in [numbered(2), numbered(1), base.clone()] {
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            text.len() <= 10 * 1024,
            "{} has {} bytes",
            path.display(),
            text.len()
        );
        assert!(
            text.ends_with('\n') && !text.is_empty(),
            "{}",
            path.display()
        );
        lines.extend(text.lines().map(str::to_string));
    }
    let first: usize = lines[0][..5].parse().unwrap();
    assert!(first > 0, "the oldest lines were dropped");
    for (n, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("{:05} {}", first + n, "r".repeat(93)),
            "line {n} of the kept files"
        );
    }
    assert_eq!(
        first + lines.len(),
        500,
        "the kept lines end with the last one"
    );
    home.ok(&["delete", "rotate"]);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- 10. logs ----

#[test]
fn logs_prints_the_last_lines_filters_streams_and_follows() {
    let home = Home::new();
    let fixed = home.file("static.py", STATIC_PY);
    let ticker = home.file("ticker.py", TICKER_PY);
    let trigger = home.work().join("trigger");
    home.ok(&["start", arg(&fixed), "--min-uptime", "100ms"]);
    home.ok(&[
        "start",
        arg(&ticker),
        "--min-uptime",
        "100ms",
        "--",
        arg(&trigger),
    ]);
    home.wait_log("static", 0, "out", "line 30\n");
    home.wait_log("static", 0, "err", "static done\n");

    // The last 5 lines of each file, stdout first.
    let out = home.ok(&["logs", "static", "--lines", "5"]);
    let expected: Vec<String> = (26..=30)
        .map(|i| format!("static:0 out | line {i}"))
        .chain(
            ["err 5", "err 6", "err 7", "err 8", "static done"]
                .iter()
                .map(|l| format!("static:0 err | {l}")),
        )
        .collect();
    assert_eq!(out.lines().collect::<Vec<_>>(), expected, "{out}");

    let err = home.ok(&["logs", "static", "--raw", "--err"]);
    let expected_err: Vec<String> = (1..=8)
        .map(|i| format!("err {i}"))
        .chain(["static done".to_string()])
        .collect();
    assert_eq!(err.lines().collect::<Vec<_>>(), expected_err, "{err}");

    // Follow: a marker written after the stream started must arrive through it.
    home.wait_log("ticker", 0, "out", "tick 1\n");
    let mut follow = home.command(&["logs", "-f", "ticker", "--raw", "--out"]);
    follow.stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = follow.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let next = |seen: &mut Vec<String>| {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines_rx.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                line
            }
            // The follower is killed by the cleanup of `home`: its environment names the home.
            Err(e) => panic!("`logs -f` printed no more lines ({e}); it printed: {seen:?}"),
        }
    };
    let first = next(&mut seen);
    assert!(first.starts_with("tick "), "{first}");
    let token = format!("follow-{}", std::process::id());
    let staged = home.work().join("trigger.tmp");
    std::fs::write(&staged, &token).unwrap();
    std::fs::rename(&staged, &trigger).unwrap();
    let marker = format!("MARKER {token}");
    while next(&mut seen) != marker {}
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.iter().all(|l| l.starts_with("tick ") || *l == marker),
        "{seen:?}"
    );

    home.ok(&["delete", "all"]);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- 11. save, kill, resurrect ----

#[test]
fn resurrect_restores_saved_apps_with_their_options_but_not_the_callers_environment() {
    let home = Home::new();
    let script = home.file("envapp.py", ENV_PY);
    let mut start = home.command(&[
        "start",
        arg(&script),
        "-n",
        "keeper",
        "-i",
        "2",
        "--env",
        "FOO=bar baz",
        "--min-uptime",
        "100ms",
        "--",
        "alpha",
        "beta",
    ]);
    start.env("CORRAL_TEST_SECRET", "hush-hush");
    support::succeeds(start);
    let before = pids_of(&home.wait_online("keeper", 2));
    // The caller's environment is the base of the app's while the daemon runs...
    home.wait_log("keeper", 0, "out", "SECRET=hush-hush");

    let saved = home.ok(&["save"]);
    assert!(saved.contains("saved 1 app(s)"), "{saved}");
    let dump = std::fs::read_to_string(home.path().join("dump.json")).unwrap();
    // ...but it is never saved: only what was given with --env is.
    assert!(!dump.contains("CORRAL_TEST_SECRET"), "{dump}");
    assert!(!dump.contains("hush-hush"), "{dump}");
    assert!(dump.contains("\"FOO\": \"bar baz\""), "{dump}");

    home.ok(&["kill"]);
    assert_groups_gone(&before);

    // A new daemon has no app: saving would replace the dump with nothing.
    let refused = home.fails(&["save"]);
    assert!(refused.contains("--force"), "{refused}");
    assert!(
        std::fs::read_to_string(home.path().join("dump.json")).unwrap() == dump,
        "the refused save left the dump alone"
    );

    home.ok(&["resurrect"]);
    let after = home.wait_online("keeper", 2);
    let describe = home.ok(&["describe", "keeper"]);
    let field = |name: &str| {
        describe
            .lines()
            .find_map(|l| l.strip_prefix(name).filter(|v| v.starts_with(' ')))
            .map_or_else(|| panic!("no {name} in:\n{describe}"), str::trim)
    };
    assert_eq!(field("name"), "keeper");
    assert_eq!(field("args"), "alpha beta");
    assert_eq!(field("instances"), "2");
    assert_eq!(field("env"), "FOO=bar baz");
    for (index, instance) in after.iter().enumerate() {
        let p = pid(instance).unwrap();
        assert!(!before.contains(&p));
        let line =
            format!("env FOO=bar baz SIDE=- SECRET=- args=alpha,beta instance={index} pid={p}");
        home.wait_log("keeper", index as u32, "out", &line);
    }
    home.ok(&["kill"]);
    let mut all = before;
    all.extend(pids_of(&after));
    assert_groups_gone(&all);
}

// ---- 12. corral.toml ----

#[test]
fn corral_toml_starts_every_app_and_reports_mistakes_with_their_line() {
    let home = Home::new();
    home.file("envapp.py", ENV_PY);
    let config = home.file(
        "corral.toml",
        r#"
[[apps]]
name = "north"
script = "envapp.py"
min_uptime = "100ms"
env = { SIDE = "north-side" }

[[apps]]
name = "south"
script = "envapp.py"
instances = 2
min_uptime = "100ms"
env = { SIDE = "south-side" }
"#,
    );
    home.ok(&["start", arg(&config)]);
    let north = home.wait_online("north", 1);
    let south = home.wait_online("south", 2);
    home.wait_log("north", 0, "out", "SIDE=north-side");
    home.wait_log("south", 0, "out", "SIDE=south-side");
    home.wait_log("south", 1, "out", "SIDE=south-side");

    let unknown = home.file(
        "unknown.toml",
        "[[apps]]\nname = \"x\"\nscript = \"envapp.py\"\ncolour = \"blue\"\n",
    );
    let err = home.fails(&["start", arg(&unknown)]);
    for words in [arg(&unknown), "line 4", "colour"] {
        assert!(err.contains(words), "no {words:?} in:\n{err}");
    }
    let bad_signal = home.file(
        "signal.toml",
        "[[apps]]\nname = \"y\"\nscript = \"envapp.py\"\n\nstop_signal = \"SIGNOPE\"\n",
    );
    let err = home.fails(&["start", arg(&bad_signal)]);
    for words in [arg(&bad_signal), "line 5", "SIGNOPE", "not a signal"] {
        assert!(err.contains(words), "no {words:?} in:\n{err}");
    }
    let names: BTreeSet<String> = home
        .ls()
        .iter()
        .map(|i| i["app"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["north", "south"].map(String::from).into());

    home.ok(&["delete", "all"]);
    let mut pids = pids_of(&north);
    pids.extend(pids_of(&south));
    assert_groups_gone(&pids);
}

// ---- 13. bad input ----

#[test]
fn bad_input_is_refused_with_an_explanation_and_the_daemon_stays_up() {
    let home = Home::new();
    let script = home.file("idle.py", IDENTITY_PY);
    home.ok(&["start", arg(&script), "--min-uptime", "100ms"]);
    let running = pids_of(&home.wait_online("idle", 1));

    let missing = home.work().join("missing.py");
    let err = home.fails(&["start", arg(&missing)]);
    assert!(
        err.contains("not found") && err.contains(arg(&missing)),
        "{err}"
    );
    home.assert_daemon_answers();

    let plain = home.file("plain", "#!/bin/sh\necho hi\n");
    let err = home.fails(&["start", arg(&plain)]);
    assert!(
        err.contains("not executable") && err.contains("chmod +x") && err.contains(arg(&plain)),
        "{err}"
    );
    home.assert_daemon_answers();

    for command in ["stop", "restart", "delete", "describe", "logs"] {
        let err = home.fails(&[command, "ghost"]);
        assert!(
            err.contains("no app is named 'ghost'") && err.contains("idle"),
            "{command}: {err}"
        );
        home.assert_daemon_answers();
    }
    for command in ["stop", "restart", "delete", "describe", "logs"] {
        let err = home.fails(&[command, "4242"]);
        assert!(err.contains("no instance has id 4242"), "{command}: {err}");
    }
    home.assert_daemon_answers();

    let err = home.fails(&["start", arg(&script), "--min-uptime", "100ms"]);
    assert!(
        err.contains("an app named 'idle' exists already") && err.contains("--name"),
        "{err}"
    );
    home.assert_daemon_answers();
    for count in ["0", "abc"] {
        let err = home.fails(&["start", arg(&script), "-n", "other", "-i", count]);
        assert!(
            err.contains("--instances") && err.contains(&format!("'{count}'")),
            "{err}"
        );
    }
    let err = home.fails(&["signal", "SIGBOGUS", "idle"]);
    assert!(err.contains("'SIGBOGUS' is not a signal"), "{err}");
    let err = home.fails(&[
        "start",
        arg(&script),
        "-n",
        "other",
        "--stop-signal",
        "NOPE",
    ]);
    assert!(
        err.contains("--stop-signal") && err.contains("'NOPE' is not a signal"),
        "{err}"
    );
    home.assert_daemon_answers();
    // Nothing was started by the refused commands.
    let names: Vec<Value> = home.ls().iter().map(|i| i["app"].clone()).collect();
    assert_eq!(names, ["idle"]);

    // A CORRAL_HOME below a regular file cannot be used.
    let blocker = home.file("blocker", "not a directory");
    let below = blocker.join("home");
    let mut ping = home.command(&["ping"]);
    ping.env("CORRAL_HOME", &below);
    let output = support::run(ping);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("CORRAL_HOME") && err.contains(arg(&below)),
        "{err}"
    );

    // --version and --help need no home and start no daemon.
    let fresh = home.work().join("fresh-home");
    for flag in ["--version", "--help"] {
        let mut command = home.command(&[flag]);
        command.env("CORRAL_HOME", &fresh);
        let out = support::succeeds(command);
        assert!(out.contains("corral"), "{out}");
        assert!(!fresh.exists(), "{flag} created {}", fresh.display());
    }

    home.ok(&["delete", "idle"]);
    assert_groups_gone(&running);
}

// ---- 14. control socket robustness ----

fn write_frame(stream: &mut UnixStream, body: &[u8]) {
    stream
        .write_all(&(body.len() as u32).to_be_bytes())
        .unwrap();
    stream.write_all(body).unwrap();
}

/// One frame from the daemon, or `None` when it closed the connection.
fn read_frame(stream: &mut UnixStream) -> Option<Value> {
    let mut prefix = [0; 4];
    if stream.read_exact(&mut prefix).is_err() {
        return None;
    }
    let mut body = vec![0; u32::from_be_bytes(prefix) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(serde_json::from_slice(&body).expect("the daemon sends JSON frames"))
}

fn connect(home: &Home) -> UnixStream {
    let stream = UnixStream::connect(home.path().join("corral.sock")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

fn hello(home: &Home) -> UnixStream {
    let mut stream = connect(home);
    write_frame(&mut stream, br#"{"protocol":2,"version":"e2e"}"#);
    let welcome = read_frame(&mut stream).expect("a welcome");
    assert_eq!(welcome["protocol"], 2, "{welcome}");
    stream
}

fn assert_error_or_close(reply: Option<&Value>, kind: &str) {
    if let Some(reply) = reply {
        assert_eq!(reply["response"], "error", "{reply}");
        assert_eq!(reply["kind"], kind, "{reply}");
    }
}

#[test]
fn the_control_socket_survives_garbage_huge_frames_and_other_protocols() {
    let home = Home::new();
    home.assert_daemon_answers();

    // Garbage instead of a hello: its first four bytes announce an absurd length.
    let mut stream = connect(&home);
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_error_or_close(read_frame(&mut stream).as_ref(), "bad_frame");
    home.assert_daemon_answers();

    // A frame of the right shape that is not JSON.
    let mut stream = connect(&home);
    write_frame(&mut stream, b"\x00\xffnot json at all");
    assert_error_or_close(read_frame(&mut stream).as_ref(), "bad_frame");
    home.assert_daemon_answers();

    // A request that is JSON but no request, after a good hello.
    let mut stream = hello(&home);
    write_frame(&mut stream, br#"{"request":"explode"}"#);
    assert_error_or_close(read_frame(&mut stream).as_ref(), "bad_frame");
    home.assert_daemon_answers();

    // A gigabyte announced: refused by its length alone.
    let mut stream = hello(&home);
    stream.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    let reply = read_frame(&mut stream).expect("an error reply");
    assert_eq!(reply["response"], "error", "{reply}");
    assert_eq!(reply["kind"], "bad_frame", "{reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(
        message.contains("1073741824") && message.contains("limit"),
        "{message}"
    );
    assert!(
        read_frame(&mut stream).is_none(),
        "the connection is closed"
    );
    home.assert_daemon_answers();

    // Another protocol version.
    let mut stream = connect(&home);
    write_frame(&mut stream, br#"{"protocol":999,"version":"x"}"#);
    let reply = read_frame(&mut stream).expect("an error reply");
    assert_eq!(reply["response"], "error", "{reply}");
    assert_eq!(reply["kind"], "version_mismatch", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("corral kill"),
        "{reply}"
    );
    home.assert_daemon_answers();

    // A well-behaved raw client still gets answers.
    let mut stream = hello(&home);
    write_frame(&mut stream, br#"{"request":"ping"}"#);
    let pong = read_frame(&mut stream).expect("a pong");
    assert_eq!(pong["response"], "pong", "{pong}");
    assert_eq!(pong["pid"], home.daemon_pid().unwrap());
    assert!(home.ls().is_empty());
    assert_groups_gone(&home.recorded_pgids());
}

// ---- 15. version mismatch seen by the CLI ----

#[test]
fn the_cli_reports_a_daemon_of_another_version() {
    let home = Home::new();
    let listener = UnixListener::bind(home.path().join("corral.sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    let message = "the running daemon is corral 9.9.9 (protocol 99): run `corral kill` first";
    let fake = std::thread::spawn(move || {
        let mut stream = wait_until(Duration::from_secs(30), "the CLI connects", || {
            listener
                .accept()
                .map(|(stream, _)| stream)
                .map_err(|e| e.to_string())
        });
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let hello = read_frame(&mut stream).expect("the CLI says hello");
        let reply = serde_json::json!({
            "response": "error",
            "kind": "version_mismatch",
            "message": message,
        });
        write_frame(&mut stream, reply.to_string().as_bytes());
        hello
    });
    let err = home.fails(&["ls"]);
    let hello = fake.join().unwrap();
    assert_eq!(hello["protocol"], 2, "{hello}");
    assert!(err.contains(message), "{err}");
    // No daemon of ours was started behind the fake's back.
    assert_eq!(home.daemon_pid(), None);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- 16. stale socket, second daemon ----

#[test]
fn a_stale_socket_is_replaced_and_a_second_daemon_is_refused() {
    let home = Home::new();
    let socket = home.path().join("corral.sock");
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists(), "the stale socket file stays behind");

    let pong = home.ok(&["ping"]);
    let daemon = home.daemon_pid().unwrap();
    assert!(pong.contains(&format!("pid {daemon}")), "{pong}");
    let log = std::fs::read_to_string(home.path().join("daemon.log")).unwrap();
    assert!(log.contains("stale socket"), "{log}");

    let output = home.corral(&["daemon"]);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    assert!(
        err.contains("another corral daemon") && err.contains(&format!("pid {daemon}")),
        "{err}"
    );
    // The first one is unharmed.
    assert!(home.ok(&["ping"]).contains(&format!("pid {daemon}")));
    assert_groups_gone(&home.recorded_pgids());
}

// ---- 17. scale, signal ----

#[test]
fn scale_adds_and_removes_instances_and_signal_reaches_the_program() {
    let home = Home::new();
    let script = home.file("sig.py", SIGNALS_PY);
    home.ok(&["start", arg(&script), "--min-uptime", "100ms"]);
    home.wait_online("sig", 1);
    // Like a reload, scaling up answers once the new instances are ready.
    let grown = home.ok(&["scale", "sig", "3"]);
    assert_eq!(grown.matches("online").count(), 3, "{grown}");
    let three = home.wait_online("sig", 3);
    let indexes: Vec<&Value> = three.iter().map(|i| &i["instance"]).collect();
    assert_eq!(indexes, [0, 1, 2]);
    let removed: Vec<u32> = pids_of(&three[1..]);
    assert_eq!(removed.len(), 2);

    let scaled = home.ok(&["scale", "sig", "1"]);
    assert!(scaled.contains("from 3 to 1"), "{scaled}");
    for &p in &removed {
        assert_nothing_runs_in(p);
    }
    assert_groups_gone(&removed);
    let one = home.instances("sig");
    assert_eq!(one.len(), 1, "{}", show(&one));
    assert_eq!(pid(&one[0]), pid(&three[0]), "instance 0 was left alone");

    home.wait_log("sig", 0, "out", "ready for signals");
    let sent = home.ok(&["signal", "SIGUSR1", "sig"]);
    assert!(sent.contains("sent SIGUSR1 to 1 instance(s)"), "{sent}");
    let kept = pid(&one[0]).unwrap();
    home.wait_log("sig", 0, "out", &format!("got SIGUSR1 in pid {kept}"));
    assert!(is_running(kept), "SIGUSR1 was handled, not fatal");

    home.ok(&["delete", "sig"]);
    assert_groups_gone(&pids_of(&three));
}

// ---- 18. kill ----

#[test]
fn kill_stops_every_app_and_the_daemon_and_removes_the_socket() {
    let home = Home::new();
    let idle = home.file("idle.py", IDENTITY_PY);
    let stubborn = home.file("stubborn.py", STUBBORN_PY);
    home.ok(&["start", arg(&idle), "-i", "2", "--min-uptime", "100ms"]);
    home.ok(&[
        "start",
        arg(&stubborn),
        "--kill-timeout",
        "300ms",
        "--min-uptime",
        "100ms",
    ]);
    let mut pids = pids_of(&home.wait_online("idle", 2));
    pids.extend(pids_of(&home.wait_online("stubborn", 1)));
    home.wait_log("stubborn", 0, "out", "ignoring SIGTERM");
    let daemon = home.daemon_pid().unwrap();
    assert!(is_running(daemon));

    let out = home.ok(&["kill"]);
    assert!(out.contains("stopped 2 app(s)"), "{out}");
    assert!(!is_running(daemon), "the daemon {daemon} still runs");
    assert!(!home.path().join("corral.sock").exists());
    assert!(!home.path().join("daemon.pid").exists());
    for &p in &pids {
        assert_nothing_runs_in(p);
    }
    assert_groups_gone(&pids);
    // Nothing answers any more, and `kill` says so.
    let again = home.ok(&["kill"]);
    assert!(again.contains("no daemon runs"), "{again}");
}

// ---- options that shape how the program runs ----

#[test]
fn time_prefixes_each_line_and_interpreter_runs_the_script() {
    let home = Home::new();
    // No extension: without --interpreter this file would be executed directly (and fail, it
    // is not executable); with it, python3 runs it and gets the interpreter arguments first.
    let script = home.file(
        "printer",
        "import sys\nprint('flags', sys.flags.dont_write_bytecode)\nprint('second line')\n",
    );
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "stamped",
        "--time",
        "--interpreter",
        "python3",
        "--interpreter-args",
        "-B",
        "--no-autorestart",
    ]);
    let log = home.wait_log("stamped", 0, "out", "second line");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 2, "{log}");
    for (line, text) in lines.iter().zip(["flags 1", "second line"]) {
        let (stamp, rest) = line.split_once(' ').unwrap();
        // 2026-11-24T08:15:02.123Z
        assert_eq!(stamp.len(), 24, "{line}");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{line}"
        );
        assert_eq!(rest, text);
    }
    let described = home.ok(&["describe", "stamped"]);
    assert!(
        described.contains("python3") && described.contains("-B"),
        "{described}"
    );
    home.ok(&["delete", "stamped"]);
}

#[test]
fn a_client_of_another_uid_is_refused_even_when_it_can_reach_the_socket() {
    // Switching to another uid needs root; CI runs as root.
    if corral_sys::effective_uid() != 0 {
        eprintln!("skipped: needs root to run a client as another user");
        return;
    }
    let home = Home::new();
    home.assert_daemon_answers();
    // Open the way to the socket, as a careless chmod would: only the peer check is left.
    let socket = home.path().join("corral.sock");
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    // The CLI itself, run as nobody, with this home: it reaches the socket and is told why not.
    // A copy in the (now open) home, since the build directory may be closed to other users.
    let client = home.path().join("corral-client");
    std::fs::copy(support::CORRAL, &client).unwrap();
    std::fs::set_permissions(&client, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = std::process::Command::new("setpriv");
    command
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&client)
        .arg("ping")
        .env("CORRAL_HOME", home.path());
    let output = support::run(command);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refused") && stderr.contains("uid 65534 may not control it"),
        "{stderr}"
    );
    home.assert_daemon_answers();
}

#[test]
fn scaling_up_reports_a_new_instance_that_does_not_become_ready() {
    let home = Home::new();
    // Fails at start once the file `broken` exists in its working directory.
    let script = home.file(
        "fragile.py",
        "import os, sys, time\nif os.path.exists('broken'):\n    sys.exit(1)\ntime.sleep(3600)\n",
    );
    home.ok(&[
        "start",
        arg(&script),
        "--cwd",
        arg(home.work()),
        // Long enough that the broken start (python3 starting and exiting) ends before it even
        // on a loaded machine: the new instance is never `online`.
        "--min-uptime",
        "2s",
        "--max-restarts",
        "1",
    ]);
    let first = home.wait_online("fragile", 1);
    std::fs::write(home.work().join("broken"), "").unwrap();
    let err = home.fails(&["scale", "fragile", "2"]);
    assert!(
        err.contains("instance 1 did not become ready") && err.contains("exited with code 1"),
        "{err}"
    );
    let list = home.instances("fragile");
    assert_eq!(pid(&list[0]), pid(&first[0]), "{}", show(&list));
    assert_eq!(status(&list[0]), "online", "{}", show(&list));
    home.ok(&["delete", "fragile"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn an_ecosystem_file_starts_every_app_and_names_the_options_left_out() {
    let home = Home::new();
    home.file(
        "worker.py",
        "import os, time\nprint('py up A=%s' % os.environ.get('A'), flush=True)\ntime.sleep(3600)\n",
    );
    home.file(
        "server.js",
        "console.log('js up B=' + process.env.B);\nsetInterval(() => {}, 60000);\n",
    );
    let eco = home.file(
        "ecosystem.config.js",
        r#"module.exports = {
  apps: [
    { name: "js", script: "server.js", env: { B: 2 }, vizion: false, watch_options: { usePolling: true } },
    { name: "py", script: "worker.py", interpreter: "python3", env: { A: "one" }, kill_timeout: 2500 },
  ],
};
"#,
    );
    let output = home.corral(&["start", arg(&eco)]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("app js: ignoring vizion (not supported by corral); watch_options ("),
        "the options left out are named: {stderr}"
    );
    home.wait_online("js", 1);
    home.wait_online("py", 1);
    home.wait_log("js", 0, "out", "js up B=2");
    home.wait_log("py", 0, "out", "py up A=one");
    let described = home.ok(&["describe", "py"]);
    assert!(described.contains("2500ms"), "{described}");

    // A file that is not valid says where.
    let broken = home.file(
        "broken.config.js",
        "module.exports = { apps: [ { name: 'x' ",
    );
    let err = home.fails(&["start", arg(&broken)]);
    assert!(
        err.contains("broken.config.js") && err.contains("node could not read"),
        "{err}"
    );
    let no_script = home.file("apps.json", r#"{"apps": [{"name": "lost"}]}"#);
    let err = home.fails(&["start", arg(&no_script)]);
    assert!(
        err.contains("app lost") && err.contains("`script` is missing"),
        "{err}"
    );
    home.ok(&["delete", "all"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn shutdown_with_message_asks_a_node_app_to_leave_before_any_signal() {
    let home = Home::new();
    let script = home.file(
        "polite.js",
        r"process.on('SIGTERM', () => { console.log('got SIGTERM'); process.exit(3); });
process.on('message', (m) => {
  if (m === 'shutdown') { console.log('got shutdown'); process.exit(0); }
});
console.log('polite up');
setInterval(() => {}, 60000);
",
    );
    home.ok(&[
        "start",
        arg(&script),
        "--shutdown-with-message",
        "--kill-timeout",
        "5s",
    ]);
    home.wait_online("polite", 1);
    home.wait_log("polite", 0, "out", "polite up");
    home.ok(&["stop", "polite"]);
    let log = home.log("polite", 0, "out");
    assert!(
        log.contains("got shutdown") && !log.contains("got SIGTERM"),
        "{log}"
    );
    let list = home.instances("polite");
    assert_eq!(
        list[0]["last_exit"].as_str(),
        Some("exited with code 0"),
        "{}",
        show(&list)
    );
}
