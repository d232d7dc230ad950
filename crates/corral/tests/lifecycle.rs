//! End-to-end tests of the lifecycle core and the runtime policies, with real processes: restart
//! counting and `reset`, lifecycle events, stop exit codes, the late `ready` that once made an
//! app flap for ever, Node.js workers that never listen, memory limits and cron restarts of a
//! Node cluster under load, watched files, health checks and readiness by probe, the watchdog.
//!
//! Fixtures are Python and Node.js programs written into each test's own directory; the `node`
//! is `$CORRAL_TEST_NODE` when set, else `node` from `PATH`.

// Shared by the cluster test files; each uses part of it.
#[allow(dead_code)]
mod http;
// The harness serves every test file; this one uses only part of it.
#[allow(dead_code)]
mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use http::*;
use serde_json::Value;
use support::*;

// ---- fixtures ----

/// Idles; exits with the code in a file `exit-code` of its directory once it exists.
const IDLE_PY: &str = r#"
import os, time
print("up, pid %d" % os.getpid(), flush=True)
while not os.path.exists("exit-code"):
    time.sleep(0.02)
raise SystemExit(int(open("exit-code").read()))
"#;

/// Speaks the channel: says `ready` at once, or, when a file `late` exists, only after
/// `LATE_MS` with SIGTERM ignored: the late word arrives while the master is stopping it.
const LATE_PY: &str = r#"
import json, os, signal, socket, struct, time
def send(obj):
    body = json.dumps(obj).encode()
    channel.sendall(struct.pack(">I", len(body)) + body)
channel = socket.socket(fileno=int(os.environ["CORRAL_CHANNEL_FD"]))
if os.path.exists("late"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(int(os.environ["LATE_MS"]) / 1000)
send({"type": "ready"})
print("said ready, pid %d" % os.getpid(), flush=True)
while True:
    time.sleep(3600)
"#;

/// A Node.js cluster worker with no server: a queue consumer.
const QUEUE_JS: &str = r"
setInterval(() => {}, 1000);
console.log(`consuming, pid ${process.pid}`);
";

/// An HTTP server (`listen(0)`, clustered by corral) whose answers carry its pid, and which
/// leaks 4 MiB every 100 ms.
const LEAK_JS: &str = r"
const http = require('http');
const held = [];
setInterval(() => held.push(Buffer.alloc(4 << 20, 1)), 100);
http.createServer((req, res) => res.end(`leaking (pid ${process.pid})\n`)).listen(0);
";

/// An HTTP server (`listen(0)`) whose answers carry its pid.
const HTTP_JS: &str = r"
const http = require('http');
http.createServer((req, res) => res.end(`hello (pid ${process.pid})\n`)).listen(0);
";

/// An HTTP server on the port in `PORT`, after `DELAY_MS`; `/health` answers 503 while a file
/// `sick` exists in its directory.
const HEALTH_PY: &str = r#"
import http.server, os, time
time.sleep(int(os.environ.get("DELAY_MS", "0")) / 1000)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        code = 503 if self.path == "/health" and os.path.exists("sick") else 200
        body = ("%d" % os.getpid()).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Sends `WATCHDOG=1` on its `NOTIFY_SOCKET` every 100 ms until a file `hang` exists.
const WATCHDOG_PY: &str = r#"
import os, socket, time
address = os.environ["NOTIFY_SOCKET"]
address = "\0" + address[1:] if address.startswith("@") else address
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", address)
while True:
    if not os.path.exists("hang"):
        s.sendto(b"WATCHDOG=1", address)
    time.sleep(0.1)
"#;

/// The app's lifecycle events, from `corral events --json`.
fn events(home: &Home, app: &str) -> Vec<Value> {
    home.ok(&["events", app, "--json", "--lines", "200"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn causes(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{}:{}->{}", e["cause"], e["from"], e["to"]).replace('"', ""))
        .collect()
}

fn last_restart(instance: &Value) -> &str {
    instance["last_restart"].as_str().unwrap_or("")
}

/// A port nobody listens on now, from the kernel.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// ---- counting, reset, events ----

#[test]
fn pm2_restart_time_counts_restarts_reloads_and_crashes_and_reset_clears_it() {
    let home = Home::new();
    let script = home.file("idle.py", IDLE_PY);
    home.ok(&["start", arg(&script), "-n", "idle", "--min-uptime", "100ms"]);
    home.wait_online("idle", 1);
    home.ok(&["restart", "idle"]);
    let list = home.wait_app(Duration::from_secs(20), "idle", "restarted", |l| {
        l.len() == 1 && status(&l[0]) == "online" && restarts(&l[0]) == 1
    });
    assert_eq!(last_restart(&list[0]), "restart", "{}", show(&list));
    home.ok(&["reload", "idle"]);
    let list = home.wait_app(Duration::from_secs(20), "idle", "reloaded", |l| {
        l.len() == 1 && status(&l[0]) == "online" && restarts(&l[0]) == 2
    });
    assert_eq!(last_restart(&list[0]), "reload", "{}", show(&list));
    let before = pid(&list[0]).expect("running");
    corral_sys::kill(before, 9).expect("killing it");
    let list = home.wait_app(Duration::from_secs(20), "idle", "crashed and back", |l| {
        l.len() == 1 && status(&l[0]) == "online" && pid(&l[0]) != Some(before)
    });
    assert_eq!((restarts(&list[0]), last_restart(&list[0])), (3, "crash"));
    assert!(
        home.ok(&["ls"]).contains("3 (crash)"),
        "{}",
        home.ok(&["ls"])
    );
    let reset = home.ok(&["reset", "idle"]);
    assert!(reset.contains("online"), "{reset}");
    let list = home.instances("idle");
    assert_eq!(restarts(&list[0]), 0, "{}", show(&list));

    let seen = causes(&events(&home, "idle"));
    for wanted in [
        "start:stopped->starting",
        "ready:starting->online",
        "restart:online->stopping",
        "reload:online->draining",
        "crash:online->starting",
    ] {
        assert!(
            seen.contains(&wanted.to_string()),
            "no {wanted} in {seen:?}"
        );
    }
    let described = home.ok(&["describe", "idle"]);
    assert!(described.contains("crash"), "{described}");
    home.ok(&["delete", "idle"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn events_follow_shows_each_transition_as_it_happens() {
    let home = Home::new();
    let script = home.file("idle.py", IDLE_PY);
    home.ok(&["start", arg(&script), "-n", "idle", "--min-uptime", "100ms"]);
    home.wait_online("idle", 1);
    let mut follower = home.command(&["events", "idle", "-f", "--json", "--lines", "1"]);
    let mut child = follower
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("corral events -f");
    let guard = ChildGuard(child.id());
    let mut lines = BufReader::new(child.stdout.take().expect("its stdout")).lines();
    // The last event first: the follower is subscribed once it has printed it.
    let recent: Value =
        serde_json::from_str(&lines.next().expect("one").expect("a line")).expect("JSON");
    assert_eq!(recent["to"], "online", "{recent}");
    home.ok(&["restart", "idle"]);
    let mut seen = Vec::new();
    for line in lines.take(20) {
        let event: Value = serde_json::from_str(&line.expect("a line")).expect("JSON");
        seen.push(format!("{}->{}", event["from"], event["to"]).replace('"', ""));
        if event["to"] == "online" {
            break;
        }
    }
    drop(guard);
    let _ = child.wait();
    assert_eq!(
        seen.first().map(String::as_str),
        Some("online->stopping"),
        "{seen:?}"
    );
    assert_eq!(
        seen.last().map(String::as_str),
        Some("starting->online"),
        "{seen:?}"
    );
    home.ok(&["delete", "idle"]);
    assert_groups_gone(&home.recorded_pgids());
}

/// Kills a child this test started when dropped (also while the test panics).
struct ChildGuard(u32);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = corral_sys::kill(self.0, 9);
    }
}

#[test]
fn pm2_stop_exit_codes_mean_done_not_a_crash() {
    let home = Home::new();
    let script = home.file("idle.py", IDLE_PY);
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "job",
        "--min-uptime",
        "100ms",
        "--stop-exit-codes",
        "0,3",
    ]);
    home.wait_online("job", 1);
    home.file("exit-code", "3");
    let list = home.wait_app(Duration::from_secs(20), "job", "stopped", |l| {
        l.len() == 1 && status(&l[0]) == "stopped"
    });
    assert_eq!(restarts(&list[0]), 0, "{}", show(&list));
    assert!(causes(&events(&home, "job")).contains(&"done:online->stopped".to_string()));
    home.ok(&["delete", "job"]);
}

// ---- readiness ----

/// Regression: a process that said `ready` just after its listen timeout, while the daemon was
/// already stopping it, was taken as ready: the app flapped between starting and online for
/// ever and a reload with it exited 0.
#[test]
fn a_late_ready_while_being_stopped_ends_errored_and_a_reload_with_it_keeps_the_old_workers() {
    let home = Home::new();
    let script = home.file("late.py", LATE_PY);
    let common = [
        "--wait-ready",
        "--listen-timeout",
        "300ms",
        "--kill-timeout",
        "1s",
        "--min-uptime",
        "100ms",
        "-e",
        "LATE_MS=500",
    ];
    let mut args = vec!["start", arg(&script), "-n", "good", "-i", "2"];
    args.extend_from_slice(&common);
    home.ok(&args);
    let old = pids_of(&home.wait_online("good", 2));
    home.file("late", "");
    let failed = home.fails(&["reload", "good"]);
    assert!(failed.contains("did not say it is ready"), "{failed}");
    assert!(failed.contains("keep serving"), "{failed}");
    let list = home.wait_online("good", 2);
    assert_eq!(pids_of(&list), old, "{}", show(&list));

    let mut args = vec!["start", arg(&script), "-n", "late", "--max-restarts", "2"];
    args.extend_from_slice(&common);
    home.ok(&args);
    let list = home.wait_app(Duration::from_secs(30), "late", "errored", |l| {
        l.len() == 1 && status(&l[0]) == "errored"
    });
    assert_eq!(restarts(&list[0]), 2, "{}", show(&list));
    let seen = causes(&events(&home, "late"));
    assert!(
        !seen.iter().any(|c| c.ends_with("->online")),
        "never online: {seen:?}"
    );
    home.ok(&["delete", "all"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn a_node_queue_worker_that_never_listens_is_online_and_stays_up() {
    let home = Home::new();
    start_js(
        &home,
        "queue",
        QUEUE_JS,
        &["-i", "2", "--listen-timeout", "1s", "--min-uptime", "200ms"],
    );
    let first = pids_of(&home.wait_online("queue", 2));
    let list = home.wait_app(
        Duration::from_secs(20),
        "queue",
        "up past its listen timeout",
        |l| {
            l.len() == 2
                && l.iter()
                    .all(|i| status(i) == "online" && i["uptime_ms"].as_u64() > Some(1500))
        },
    );
    assert_eq!(pids_of(&list), first, "{}", show(&list));
    assert!(list.iter().all(|i| restarts(i) == 0), "{}", show(&list));
    home.ok(&["delete", "queue"]);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- the policies ----

/// Runs client load against `addr` until every instance of `app` has been replaced for `cause`
/// at least once; returns the failures.
fn load_until_replaced(home: &Home, app: &str, addr: SocketAddr, cause: &str) -> Vec<String> {
    let load = Load::start(addr, 2, false);
    home.wait_app(
        Duration::from_secs(40),
        app,
        &format!("every instance restarted for {cause}"),
        |l| {
            l.iter().filter(|i| status(i) == "online").count() == 2
                && l.iter()
                    .filter(|i| status(i) == "online")
                    .all(|i| restarts(i) >= 1 && last_restart(i) == cause)
        },
    );
    wait_until(Duration::from_secs(20), "a new process answers too", || {
        let pids = load.tally.pids();
        (pids.len() >= 3).then_some(()).ok_or(format!("{pids:?}"))
    });
    load.finish().failures()
}

#[test]
fn pm2_max_memory_restart_replaces_a_leaking_cluster_worker_without_a_failed_request() {
    let home = Home::new();
    start_js(
        &home,
        "leak",
        LEAK_JS,
        &["-i", "2", "--max-memory-restart", "150M"],
    );
    let addr = tcp_address(&home.wait_online("leak", 2));
    let failures = load_until_replaced(&home, "leak", addr, "memory");
    assert!(failures.is_empty(), "{failures:?}");
    let memory = events(&home, "leak")
        .into_iter()
        .find(|e| e["cause"] == "memory")
        .expect("a memory event");
    let reason = memory["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("over its limit of 150.0M"), "{reason}");
    home.ok(&["delete", "leak"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn pm2_cron_restart_reloads_a_cluster_under_load_without_a_failed_request() {
    let home = Home::new();
    start_js(
        &home,
        "tick",
        HTTP_JS,
        &["-i", "2", "--cron-restart", "*/3 * * * * *"],
    );
    let addr = tcp_address(&home.wait_online("tick", 2));
    let failures = load_until_replaced(&home, "tick", addr, "cron");
    assert!(failures.is_empty(), "{failures:?}");
    home.ok(&["delete", "tick"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn pm2_watch_restarts_on_a_change_and_ignores_ignored_files() {
    let home = Home::new();
    let dir = home.work().join("src");
    std::fs::create_dir_all(dir.join("node_modules")).expect("mkdir");
    std::fs::write(dir.join("code.py"), "1").expect("write");
    let script = home.file("idle.py", IDLE_PY);
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "watched",
        "--min-uptime",
        "100ms",
        "--watch",
        arg(&dir),
        "--ignore-watch",
        "*.log",
        "--watch-delay",
        "100ms",
    ]);
    home.wait_online("watched", 1);
    wait_until(Duration::from_secs(20), "the watcher is set up", || {
        let log = daemon_log(&home);
        log.contains("watching").then_some(()).ok_or(log)
    });
    // Ignored: a glob and node_modules. Then the positive control, a watched file.
    std::fs::write(dir.join("debug.log"), "x").expect("write");
    std::fs::write(dir.join("node_modules").join("dep.js"), "x").expect("write");
    std::fs::write(dir.join("code.py"), "2").expect("write");
    let list = home.wait_app(Duration::from_secs(20), "watched", "restarted", |l| {
        l.len() == 1 && status(&l[0]) == "online" && restarts(&l[0]) == 1
    });
    assert_eq!(last_restart(&list[0]), "watch", "{}", show(&list));
    let watch = events(&home, "watched")
        .into_iter()
        .find(|e| e["cause"] == "watch")
        .expect("a watch event");
    let reason = watch["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("1 file(s) changed") && reason.contains("code.py"),
        "{reason}"
    );
    home.ok(&["delete", "watched"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn an_http_health_check_failing_restarts_the_instance_and_says_why() {
    let home = Home::new();
    let script = home.file("health.py", HEALTH_PY);
    let port = free_port().to_string();
    let probe = format!("http://127.0.0.1:{port}/health");
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "web",
        "-e",
        &format!("PORT={port}"),
        "--min-uptime",
        "100ms",
        "--health",
        &probe,
        "--health-interval",
        "300ms",
        "--health-timeout",
        "200ms",
        "--health-failures",
        "2",
    ]);
    let first = pid(&home.wait_online("web", 1)[0]).expect("running");
    home.file("sick", "");
    let list = home.wait_app(Duration::from_secs(20), "web", "restarted", |l| {
        l.len() == 1 && restarts(&l[0]) == 1
    });
    assert_eq!(last_restart(&list[0]), "health", "{}", show(&list));
    std::fs::remove_file(home.work().join("sick")).expect("healthy again");
    let list = home.wait_online("web", 1);
    assert_ne!(pid(&list[0]), Some(first));
    let health = events(&home, "web")
        .into_iter()
        .find(|e| e["cause"] == "health")
        .expect("a health event");
    let reason = health["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("HTTP 503") && reason.contains("2 time(s)"),
        "{reason}"
    );
    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn an_exec_health_check_restarts_only_the_failing_instance() {
    let home = Home::new();
    let script = home.file("idle.py", IDLE_PY);
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "pair",
        "-i",
        "2",
        "--min-uptime",
        "100ms",
        "--health",
        "exec:sh -c 'test ! -e fail-$CORRAL_INSTANCE'",
        "--health-interval",
        "300ms",
        "--health-timeout",
        "200ms",
        "--health-failures",
        "2",
    ]);
    home.wait_online("pair", 2);
    home.file("fail-1", "");
    home.wait_app(
        Duration::from_secs(20),
        "pair",
        "instance 1 restarted",
        |l| l.len() == 2 && restarts(&l[1]) >= 1,
    );
    std::fs::remove_file(home.work().join("fail-1")).expect("healthy again");
    let list = home.wait_online("pair", 2);
    assert_eq!(restarts(&list[0]), 0, "{}", show(&list));
    assert_eq!(last_restart(&list[1]), "health", "{}", show(&list));
    home.ok(&["delete", "pair"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn ready_when_probe_waits_until_the_program_really_answers() {
    let home = Home::new();
    let script = home.file("health.py", HEALTH_PY);
    let port = free_port().to_string();
    let probe = format!("tcp:{port}");
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "slow",
        "-e",
        &format!("PORT={port}"),
        "-e",
        "DELAY_MS=1200",
        "--min-uptime",
        "100ms",
        "--listen-timeout",
        "10s",
        "--health",
        &probe,
        "--ready-when",
        "probe",
    ]);
    // Past min_uptime and still starting: only the probe counts.
    let list = home.wait_app(Duration::from_secs(20), "slow", "up 500 ms", |l| {
        l.len() == 1 && l[0]["uptime_ms"].as_u64() >= Some(500)
    });
    assert_eq!(status(&list[0]), "starting", "{}", show(&list));
    home.wait_online("slow", 1);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("an address");
    get(addr).unwrap_or_else(|e| panic!("online means it answers: {e}"));
    home.ok(&["delete", "slow"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn a_process_that_stops_its_watchdog_pings_is_restarted() {
    let home = Home::new();
    let script = home.file("dog.py", WATCHDOG_PY);
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "dog",
        "--min-uptime",
        "100ms",
        "--watchdog",
        "500ms",
    ]);
    home.wait_online("dog", 1);
    home.file("hang", "");
    let list = home.wait_app(Duration::from_secs(20), "dog", "restarted", |l| {
        l.len() == 1 && restarts(&l[0]) >= 1
    });
    assert_eq!(last_restart(&list[0]), "watchdog", "{}", show(&list));
    std::fs::remove_file(home.work().join("hang")).expect("pinging again");
    home.wait_online("dog", 1);
    home.ok(&["delete", "dog"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn bad_policy_values_are_refused_with_the_option_named() {
    let home = Home::new();
    let script = home.file("idle.py", IDLE_PY);
    for (args, says) in [
        (vec!["--cron-restart", "61 * * * *"], "61"),
        (vec!["--max-memory-restart", "lots"], "--max-memory-restart"),
        (vec!["--health", "http://10.0.0.1:80/"], "loopback"),
        (vec!["--watch", "/no/such/dir"], "/no/such/dir"),
        (vec!["--ready-when", "probe"], "--health"),
    ] {
        let mut all = vec!["start", arg(&script), "-n", "bad"];
        all.extend_from_slice(&args);
        let err = home.fails(&all);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn a_stopped_apps_port_refuses_at_once_and_serves_again_when_it_starts() {
    let home = Home::new();
    start_js(&home, "web", HTTP_JS, &["-i", "2"]);
    let addr = tcp_address(&home.wait_online("web", 2));
    get(addr).unwrap_or_else(|e| panic!("{e}"));
    home.ok(&["stop", "web"]);
    let began = std::time::Instant::now();
    let refused = get(addr);
    assert!(refused.is_err(), "a stopped app answered: {refused:?}");
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "the client learnt it at once, not after a wait: {:?}",
        began.elapsed()
    );
    home.ok(&["restart", "web"]);
    let list = home.wait_online("web", 2);
    assert_eq!(tcp_address(&list), addr, "the same port");
    get(addr).unwrap_or_else(|e| panic!("serves again: {e}"));
    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}
