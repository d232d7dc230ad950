//! End-to-end tests of the bus and the shared state: real daemons, real workers (the Rust
//! example `crates/worker/examples/state.rs` and Node programs using `clients/node/corral.js`),
//! an app's agent, and a real `redis-server` started on a free port for the Redis store.

// The harness serves every test file; this one uses only part of it.
#[allow(dead_code)]
mod support;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use support::*;

// ---- fixtures ----

/// The example's binary, built beside this test.
fn state_example() -> PathBuf {
    example("state")
}

/// The Node helper shipped in the repo.
fn corral_js() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../clients/node/corral.js")
}

fn node() -> String {
    std::env::var("CORRAL_TEST_NODE").unwrap_or_else(|_| "node".to_string())
}

/// A Node program using `corral.js`, its behaviour chosen by `MODE`:
/// - `count`: `N` concurrent `incr('counter')`, then `counted N last=<max>`;
/// - `subscribe`: subscribes to `PATTERN`, says `subscribed`, then `got <channel> <message>`;
/// - `ask`: asks the agent, prints `answer <json>` or `error <text>`; asks `all`, prints `all
///   <json>`; then sends to an unknown worker and prints what it was told.
const NODE_JS: &str = r"
const corral = require(process.env.CORRAL_JS);
const mode = process.env.MODE;
(async () => {
  if (mode === 'count') {
    const n = Number(process.env.N);
    const calls = [];
    for (let i = 0; i < n; i++) calls.push(corral.state.incr('counter'));
    const results = await Promise.all(calls);
    console.log(`counted ${n} last=${Math.max(...results)}`);
  } else if (mode === 'subscribe') {
    await corral.state.subscribe(process.env.PATTERN, (message, channel) => {
      console.log(`got ${channel} ${message}`);
    });
    console.log(`subscribed ${process.env.PATTERN}`);
  } else if (mode === 'ask') {
    try {
      const answer = await corral.request('agent', { q: corral.id }, { timeoutMs: 5000 });
      console.log(`answer ${JSON.stringify(answer)}`);
    } catch (e) {
      console.log(`error ${e.message}`);
    }
    const everyone = await corral.request('all', { q: corral.id }, { timeoutMs: 5000 });
    console.log(`all ${JSON.stringify(everyone)}`);
    try {
      await corral.send('worker:99999', { hello: 1 });
      console.log('unknown: delivered?');
    } catch (e) {
      console.log(`unknown: ${e.message}`);
    }
  }
  setInterval(() => {}, 1 << 30);
})().catch((e) => { console.error(`failed: ${e.stack}`); process.exit(1); });
";

/// Starts the Rust state example as `name` with `STATE_*` variables and `args`.
fn start_rust(home: &Home, name: &str, env: &[(&str, &str)], args: &[&str]) {
    let program = state_example();
    let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut all = vec!["start", arg(&program), "-n", name];
    for pair in &pairs {
        all.extend(["--env", pair]);
    }
    all.extend_from_slice(args);
    home.ok(&all);
}

/// Starts the Node fixture as `name` in fork mode with `env` and `args`.
fn start_node(home: &Home, name: &str, env: &[(&str, &str)], args: &[&str]) {
    let script = home.file(&format!("{name}.js"), NODE_JS);
    let helper = format!("CORRAL_JS={}", corral_js().display());
    let pairs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let node = node();
    let mut all = vec![
        "start",
        arg(&script),
        "-n",
        name,
        "--interpreter",
        &node,
        "--exec-mode",
        "fork",
        "--env",
        &helper,
    ];
    for pair in &pairs {
        all.extend(["--env", pair]);
    }
    all.extend_from_slice(args);
    home.ok(&all);
}

fn agent_log(home: &Home, app: &str, stream: &str) -> String {
    std::fs::read_to_string(
        home.path()
            .join("logs")
            .join(format!("{app}-agent-{stream}.log")),
    )
    .unwrap_or_default()
}

fn wait_agent_log(home: &Home, app: &str, needle: &str) -> String {
    wait_until(
        Duration::from_secs(20),
        &format!("the agent log of {app} holds {needle:?}"),
        || {
            let text = agent_log(home, app, "out");
            if text.contains(needle) {
                Ok(text)
            } else {
                Err(text)
            }
        },
    )
}

fn state(home: &Home, args: &[&str]) -> String {
    let mut all = vec!["state"];
    all.extend_from_slice(args);
    home.ok(&all).trim().to_string()
}

// ---- the embedded store ----

#[test]
fn rust_and_node_workers_share_a_counter_without_losing_an_update() {
    let home = Home::new();
    start_rust(
        &home,
        "rust",
        &[
            ("STATE_MODE", "count"),
            ("STATE_INCRS", "3000"),
            ("STATE_CONCURRENCY", "32"),
        ],
        &["-i", "2"],
    );
    start_node(&home, "js", &[("MODE", "count"), ("N", "2000")], &[]);
    for i in 0..2 {
        home.wait_log("rust", i, "out", "counted 3000");
    }
    home.wait_log("js", 0, "out", "counted 2000");
    assert_eq!(state(&home, &["get", "counter"]), "8000");
    // The last value any one of them saw is the total for exactly one of them.
    let lasts: Vec<u64> = (0..2)
        .map(|i| home.log("rust", i, "out"))
        .chain([home.log("js", 0, "out")])
        .map(|log| {
            let last = log.split("last=").nth(1).expect("a last= value");
            last.trim().parse().expect("a number")
        })
        .collect();
    assert_eq!(lasts.iter().max(), Some(&8000), "{lasts:?}");
    home.ok(&["delete", "all"]);
}

#[test]
fn a_publication_reaches_every_subscriber_of_a_matching_pattern() {
    let home = Home::new();
    start_rust(
        &home,
        "rust",
        &[("STATE_MODE", "subscribe"), ("STATE_PATTERN", "news.*")],
        &["-i", "2"],
    );
    start_node(
        &home,
        "js",
        &[("MODE", "subscribe"), ("PATTERN", "news.*")],
        &[],
    );
    start_node(
        &home,
        "other",
        &[("MODE", "subscribe"), ("PATTERN", "sport.*")],
        &[],
    );
    for i in 0..2 {
        home.wait_log("rust", i, "out", "subscribed news.*");
    }
    home.wait_log("js", 0, "out", "subscribed news.*");
    home.wait_log("other", 0, "out", "subscribed sport.*");
    let count: u64 = state(&home, &["publish", "news.today", "rain at noon"])
        .parse()
        .expect("a count");
    assert!(count >= 1, "{count}");
    for i in 0..2 {
        home.wait_log("rust", i, "out", "got news.today rain at noon");
    }
    home.wait_log("js", 0, "out", "got news.today rain at noon");
    // Not subscribed to it: a later publication on its own channel arrives alone.
    state(&home, &["publish", "sport.final", "2-1"]);
    let other = home.wait_log("other", 0, "out", "got sport.final 2-1");
    assert!(!other.contains("news.today"), "{other}");
    home.ok(&["delete", "all"]);
}

#[test]
fn the_state_cli_reads_and_changes_keys_and_refuses_bad_input() {
    let home = Home::new();
    start_node(&home, "js", &[("MODE", "idle")], &[]);
    home.wait_online("js", 1);
    assert_eq!(state(&home, &["set", "greeting", "hello"]), "true");
    assert_eq!(state(&home, &["get", "greeting"]), "hello");
    assert_eq!(state(&home, &["incr", "hits", "5"]), "5");
    assert_eq!(state(&home, &["incr", "hits", "-2"]), "3");
    let keys: Value = serde_json::from_str(&state(&home, &["ls"])).expect("JSON");
    assert_eq!(keys, serde_json::json!(["greeting", "hits"]));
    let cas = |args: &[&str]| state(&home, &[&["cas", "greeting"], args].concat());
    assert_eq!(cas(&["--expect", "hi", "--new", "x"]), "false");
    assert_eq!(cas(&["--expect", "hello", "--new", "hi"]), "true");
    assert_eq!(state(&home, &["get", "greeting"]), "hi");
    assert_eq!(cas(&["--expect-missing", "--new", "x"]), "false");
    assert_eq!(cas(&["--expect", "hi", "--delete"]), "true");
    assert_eq!(
        cas(&["--expect-missing", "--new", "back", "--ttl", "1h"]),
        "true"
    );
    let unclear = home.fails(&["state", "cas", "greeting", "--new", "x"]);
    assert!(unclear.contains("--expect"), "{unclear}");
    assert_eq!(state(&home, &["del", "greeting"]), "true");
    assert_eq!(state(&home, &["get", "greeting"]), "null");
    let not_integer = {
        state(&home, &["set", "name", "ada"]);
        home.fails(&["state", "incr", "name"])
    };
    assert!(not_integer.contains("name"), "{not_integer}");
    // (A command-line argument cannot hold a value over the 512 KiB limit; a key over 1 KiB
    // shows the same refusal.)
    let long = "k".repeat(2000);
    let too_long = home.fails(&["state", "set", &long, "v"]);
    assert!(
        too_long.contains("2000") && too_long.contains("1024"),
        "{too_long}"
    );
    let unknown = home.fails(&["state", "--app", "nope", "get", "k"]);
    assert!(unknown.contains("no app is named 'nope'"), "{unknown}");
    home.assert_daemon_answers();
    home.ok(&["delete", "all"]);
}

#[test]
fn saved_state_outlives_the_daemon() {
    let home = Home::new();
    start_node(&home, "js", &[("MODE", "idle")], &["--state", "saved"]);
    home.wait_online("js", 1);
    state(&home, &["set", "kept", "across restarts"]);
    home.ok(&["kill"]);
    start_node(&home, "js", &[("MODE", "idle")], &["--state", "saved"]);
    home.wait_online("js", 1);
    assert_eq!(state(&home, &["get", "kept"]), "across restarts");
    home.ok(&["delete", "all"]);
}

/// A worker that floods the master with state calls on its raw channel and never reads an answer:
/// it stores a 100 KB value, then asks for it 100 calls a write, up to 20,000 calls (2 GB of
/// answers). Its writes time out after 2 s once the master stops reading it: then it prints
/// `held back after <n> calls`; if they never do, `never held back`.
const STATE_FLOOD_PY: &str = r#"
import json, os, socket, struct, time

channel = socket.socket(fileno=int(os.environ["CORRAL_CHANNEL_FD"]))
channel.settimeout(2)

def frame(message):
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body

channel.sendall(frame({"type": "state", "id": 0,
                       "call": {"op": "set", "key": "big", "value": "x" * 100000}}))
def gets(first):
    """100 gets of the big value: state messages, or with FLOOD=batch one state batch."""
    if os.environ.get("FLOOD") == "batch":
        body = b"R" + struct.pack(">Q", first) + b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n" * 100
        return struct.pack(">I", len(body)) + body
    return b"".join(frame({"type": "state", "id": first + i,
                           "call": {"op": "get", "key": "big"}}) for i in range(100))

sent = 0
while sent < 20000:
    calls = gets(sent + 1)
    try:
        channel.sendall(calls)
    except socket.timeout:
        print(f"held back after {sent} calls", flush=True)
        break
    sent += 100
else:
    print(f"never held back: {sent} calls sent", flush=True)
while True:
    time.sleep(3600)
"#;

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    line.split_whitespace()
        .nth(1)
        .expect("a number")
        .parse()
        .expect("KiB")
}

#[test]
fn a_worker_flooding_the_state_without_reading_is_held_back_and_harms_no_one() {
    flood_is_held_back("messages");
}

#[test]
fn a_worker_flooding_state_batches_without_reading_is_held_back_too() {
    flood_is_held_back("batch");
}

/// A worker asks for 100 KB values over and over and reads none of the answers, as state
/// messages or (`mode` "batch") in state batches.
fn flood_is_held_back(mode: &str) {
    let home = Home::new();
    let flood = home.file("flood.py", STATE_FLOOD_PY);
    let mode = format!("FLOOD={mode}");
    home.ok(&[
        "start",
        arg(&flood),
        "-n",
        "flood",
        "--no-autorestart",
        "-e",
        &mode,
    ]);
    let log = home.wait_log("flood", 0, "out", "held back after");
    let daemon = home.daemon_pid().expect("the daemon's pid");
    // Held: 256 calls of 100 KB answers at most, 8 MiB unread, the socket buffers: about 40 MiB
    // in all (without the limits the daemon passes 170 MiB here, and goes on growing).
    let rss = rss_kib(daemon);
    assert!(
        rss < 64 * 1024,
        "the daemon holds {rss} KiB; the flooder says {log}"
    );
    // Meanwhile the others are served as usual.
    assert_eq!(state(&home, &["incr", "calm"]), "1");
    start_rust(
        &home,
        "calm",
        &[
            ("STATE_MODE", "count"),
            ("STATE_KEY", "calm"),
            ("STATE_INCRS", "1000"),
        ],
        &[],
    );
    home.wait_log("calm", 0, "out", "counted 1000");
    assert_eq!(state(&home, &["get", "calm"]), "1001");
    home.assert_daemon_answers();
    // Its answers go with it.
    home.ok(&["delete", "flood"]);
    assert_eq!(state(&home, &["get", "big"]).len(), 100_000);
    home.ok(&["delete", "all"]);
}

// ---- the agent and the bus ----

#[test]
fn the_agent_starts_first_answers_requests_and_stops_last() {
    let home = Home::new();
    let agent = state_example();
    let script = home.file("ask.js", NODE_JS);
    let helper = format!("CORRAL_JS={}", corral_js().display());
    let node = node();
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "web",
        "-i",
        "2",
        "--interpreter",
        &node,
        "--exec-mode",
        "fork",
        "--agent",
        arg(&agent),
        "--env",
        &helper,
        "--env",
        "MODE=ask",
        "--env",
        "STATE_MODE=answer",
    ]);
    let instances = home.wait_online("web", 3);
    let roles: Vec<&str> = instances
        .iter()
        .map(|i| i["role"].as_str().unwrap_or("worker"))
        .collect();
    assert_eq!(
        roles.iter().filter(|r| **r == "agent").count(),
        1,
        "{roles:?}"
    );
    let agent_info = instances
        .iter()
        .find(|i| i["role"] == "agent")
        .expect("the agent");
    let agent_id = agent_info["id"].as_u64().expect("an id");
    let pid_of_agent = agent_info["pid"].as_u64().expect("a pid");
    let listed = home.ok(&["ls"]);
    assert!(listed.contains("agent"), "{listed}");
    // Every worker asks the agent as soon as it starts and gets its answer: the agent was
    // running and ready before the workers started (otherwise: "has no agent running").
    for i in 0..2 {
        let log = home.wait_log("web", i, "out", "answer ");
        assert!(
            log.contains(&format!("\"by\":{agent_id}")),
            "the agent answered: {log}"
        );
        let log = home.wait_log("web", i, "out", "unknown: ");
        assert!(
            log.contains("99999"),
            "an unknown target is an error: {log}"
        );
    }
    wait_agent_log(&home, "web", "request from worker:");
    // The command line asks too.
    let answer = home.ok(&[
        "send",
        &agent_id.to_string(),
        r#"{"ping": true}"#,
        "--reply",
    ]);
    let answer: Value = serde_json::from_str(&answer).expect("JSON");
    assert_eq!(
        answer["echo"],
        serde_json::json!({"ping": true}),
        "{answer}"
    );
    // A request to several is answered by each, together: the agent echoes, the workers have
    // no handler (corral.js answers that with an error at once).
    let many: Value =
        serde_json::from_str(&home.ok(&["send", "web", r#"{"n": 1}"#, "--reply"])).expect("JSON");
    let many = many.as_array().expect("an array of answers");
    let from: Vec<&str> = many.iter().map(|a| a["from"].as_str().unwrap()).collect();
    let mut ids: Vec<u64> = instances
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    let expected: Vec<String> = ids.iter().map(|id| format!("worker:{id}")).collect();
    assert_eq!(from, expected, "{many:?}");
    for answer in many {
        if answer["from"] == format!("worker:{agent_id}") {
            assert_eq!(
                answer["data"]["echo"],
                serde_json::json!({"n": 1}),
                "{answer}"
            );
        } else {
            assert!(answer["error"].is_string(), "{answer}");
        }
    }
    // And from a worker: `all` is everyone but the sender, the agent among them.
    for i in 0..2 {
        let log = home.wait_log("web", i, "out", "all ");
        let line = log
            .lines()
            .find_map(|l| l.strip_prefix("all "))
            .expect("the line");
        let everyone: Value = serde_json::from_str(line).expect("JSON");
        let agent_said = everyone
            .as_array()
            .expect("an array")
            .iter()
            .find(|a| a["from"] == format!("worker:{agent_id}"))
            .unwrap_or_else(|| panic!("the agent is among them: {everyone}"));
        assert_eq!(agent_said["data"]["by"], agent_id, "{everyone}");
    }
    // Stopped last: the agent still answers while the workers go, and it is the last to exit.
    home.ok(&["stop", "web"]);
    let log = daemon_log(&home);
    let agent_exit = log
        .rfind(&format!("pid {pid_of_agent}"))
        .expect("the agent's exit is logged");
    for worker in instances.iter().filter(|i| i["role"] != "agent") {
        let pid = worker["pid"].as_u64().expect("a pid");
        let exit = log
            .rfind(&format!("pid {pid}"))
            .expect("the worker's exit is logged");
        assert!(
            exit < agent_exit,
            "worker {pid} exited before the agent:\n{log}"
        );
    }
    home.ok(&["delete", "all"]);
}

/// What the Python programs below that speak the channel themselves begin with: the channel,
/// and `exactly(n)`, its next `n` bytes (exiting when it closes).
const CHANNEL_PRELUDE_PY: &str = r#"
import os, socket, struct

channel = socket.socket(fileno=int(os.environ["CORRAL_CHANNEL_FD"]))

def exactly(n):
    data = b""
    while len(data) < n:
        more = channel.recv(n - len(data))
        if not more:
            raise SystemExit(0)
        data += more
    return data
"#;

/// A Python program of `body` after [`CHANNEL_PRELUDE_PY`].
fn channel_py(body: &str) -> String {
    format!("{CHANNEL_PRELUDE_PY}{body}")
}

/// Speaks corral's channel in Python. As the agent (`CORRAL_ROLE=agent`) it says ready only once
/// it gets a message (the test's `corral send`), printing `agent <pid> waiting` then `agent <pid>
/// ready`; as a worker it says ready at once and prints `worker <pid> up`. Both then read their
/// channel until it closes.
const CHANNEL_PY: &str = r#"
import json

def send(message):
    body = json.dumps(message).encode()
    channel.sendall(struct.pack(">I", len(body)) + body)

def receive():
    return json.loads(exactly(struct.unpack(">I", exactly(4))[0]))

role = os.environ["CORRAL_ROLE"]
if role == "agent":
    print(f"agent {os.getpid()} waiting", flush=True)
    while receive().get("type") != "message":
        pass
    send({"type": "ready"})
    print(f"agent {os.getpid()} ready", flush=True)
else:
    send({"type": "ready"})
    print(f"worker {os.getpid()} up", flush=True)
while True:
    receive()
"#;

#[test]
fn workers_that_crash_while_the_agent_is_down_wait_for_it_to_be_back() {
    let home = Home::new();
    let worker = home.file("worker.py", &channel_py(CHANNEL_PY));
    let agent = home.file("agent.py", &channel_py(CHANNEL_PY));
    home.ok(&[
        "start",
        arg(&worker),
        "-n",
        "app",
        "-i",
        "2",
        "--agent",
        arg(&agent),
        "--wait-ready",
    ]);
    wait_agent_log(&home, "app", "waiting");
    let agent_id = || {
        home.instances("app")
            .iter()
            .find(|i| i["role"] == "agent")
            .and_then(|i| i["id"].as_u64())
            .expect("the agent's id")
            .to_string()
    };
    home.ok(&["send", &agent_id(), r#""go""#]);
    let before = home.wait_online("app", 3);
    let pid_of = |instances: &[Value], agent: bool| -> Vec<u32> {
        instances
            .iter()
            .filter(|i| (i["role"] == "agent") == agent)
            .filter_map(pid)
            .collect()
    };
    let (old_agent, old_workers) = (pid_of(&before, true), pid_of(&before, false));
    assert_eq!(
        (old_agent.len(), old_workers.len()),
        (1, 2),
        "{}",
        show(&before)
    );
    // The agent dies; its next process waits for the test's go.
    corral_sys::kill(old_agent[0], 9).expect("kill the agent");
    let log = wait_agent_log(&home, "app", "waiting");
    wait_until(Duration::from_secs(20), "the agent's new process", || {
        let text = agent_log(&home, "app", "out");
        if text.matches("waiting").count() >= 2 {
            Ok(())
        } else {
            Err(log.clone())
        }
    });
    // Now the workers die too: they are held until their agent is back.
    for &worker in &old_workers {
        corral_sys::kill(worker, 9).expect("kill a worker");
    }
    let held = wait_until(Duration::from_secs(20), "both workers held", || {
        let now = home.instances("app");
        let held = now
            .iter()
            .filter(|i| i["role"] != "agent")
            .all(|i| status(i) == "starting" && pid(i).is_none());
        if held { Ok(now) } else { Err(show(&now)) }
    });
    assert!(
        held.iter()
            .any(|i| i["role"] == "agent" && status(i) == "starting"),
        "{}",
        show(&held)
    );
    // The agent is ready again: the workers follow.
    home.ok(&["send", &agent_id(), r#""go""#]);
    let after = home.wait_online("app", 3);
    for pid in pid_of(&after, false) {
        assert!(!old_workers.contains(&pid), "{}", show(&after));
    }
    home.ok(&["delete", "all"]);
}

// ---- state batches (RESP) ----

/// A worker speaking the channel itself: one state batch of allowed and refused commands, each
/// reply printed as `reply <number> <reply>`, then a batch that is not RESP as Redis reads it.
const BATCH_PY: &str = r#"

def command(*args):
    out = b"*%d\r\n" % len(args)
    for arg in args:
        arg = arg if isinstance(arg, bytes) else arg.encode()
        out += b"$%d\r\n%s\r\n" % (len(arg), arg)
    return out

def batch(first, resp):
    body = b"R" + struct.pack(">Q", first) + resp
    return struct.pack(">I", len(body)) + body

def replies(resp):
    """Splits RESP replies (no arrays here) into their lines."""
    out = []
    while resp:
        line, resp = resp.split(b"\r\n", 1)
        if line[:1] == b"$" and line != b"$-1":
            value, resp = resp[:int(line[1:])], resp[int(line[1:]) + 2:]
            line = b"$" + value
        out.append(line.decode(errors="replace"))
    return out

commands = [
    command("SET", "k", "v"),
    command("GET", "k"),
    command("INCRBY", "n", "5"),
    command("FLUSHALL"),
    command("EVAL", "return 1", "0"),
    command("GET", b"\xff"),
    command("SET", "t", "x", "PX", "0"),
    command("SET", "t", "x", "PX", "60000"),
    command("GET", "k" * 2000),
    command("INCRBY", "k", "1"),
    command("DEL", "k"),
    command("GET", "k"),
]
channel.sendall(batch(100, b"".join(commands)))
got = []
while len(got) < len(commands):
    body = exactly(struct.unpack(">I", exactly(4))[0])
    assert body[:1] == b"R", body
    assert struct.unpack(">Q", body[1:9])[0] == 100 + len(got)
    got += replies(body[9:])
for number, reply in enumerate(got):
    print(f"reply {number} {reply}", flush=True)
# A length Redis would not read (it would close the connection every worker's calls share).
channel.sendall(batch(200, b"*2\r\n$03\r\nGET\r\n$1\r\nk\r\n"))
while True:
    exactly(4)
"#;

/// The batch of [`BATCH_PY`] on the store given by `state_args`: the calls a batch may hold
/// run, every other command is refused by corral with a reason (never reaching Redis), and a
/// batch that is not RESP ends the worker, not the daemon.
fn batches_run_allowed_calls_and_refuse_the_rest(state_args: &[&str]) {
    let home = Home::new();
    let script = home.file("batch.py", &channel_py(BATCH_PY));
    let mut args = vec!["start", arg(&script), "-n", "batch", "--no-autorestart"];
    args.extend_from_slice(state_args);
    home.ok(&args);
    let log = home.wait_log("batch", 0, "out", "reply 11 ");
    let replies: Vec<&str> = log.lines().filter(|l| l.starts_with("reply ")).collect();
    let expect = |number: usize, wanted: &str| {
        let reply = replies[number].splitn(3, ' ').nth(2).unwrap_or_default();
        assert!(reply.starts_with(wanted), "reply {number}: {reply}\n{log}");
    };
    expect(0, "+OK");
    expect(1, "$v");
    expect(2, ":5");
    expect(
        3,
        "-CORRAL call refused: [\"FLUSHALL\"] is not a call a batch may hold",
    );
    expect(
        4,
        "-CORRAL call refused: [\"EVAL\", \"return 1\", \"0\"] is not a call",
    );
    expect(5, "-CORRAL call refused: keys and values are UTF-8 text");
    expect(6, "-CORRAL bad TTL of 0 ms");
    expect(7, "+OK");
    expect(
        8,
        "-CORRAL key, channel or pattern of 2000 bytes is over the limit",
    );
    // INCRBY on "v": the store's own error (Redis's, or the embedded store's).
    assert!(
        replies[9].contains("-CORRAL the value of key \"k\" is not an integer")
            || replies[9].contains("-ERR value is not an integer"),
        "{log}"
    );
    expect(10, ":1");
    expect(11, "$-1");
    // The refused FLUSHALL did nothing: the other keys are there.
    assert_eq!(state(&home, &["get", "n"]), "5");
    assert_eq!(state(&home, &["get", "t"]), "x");
    // The batch that is not RESP: the worker is ended and says why; the daemon goes on.
    let ended = home.wait_app(Duration::from_secs(20), "batch", "ended", |list| {
        list.iter().all(|i| status(i) != "online")
    });
    let said = daemon_log(&home);
    assert!(
        said.contains("broke its channel protocol (it sent a state batch that is not RESP")
            && said.contains("a length without a leading zero"),
        "{}\n{said}",
        show(&ended)
    );
    home.assert_daemon_answers();
    home.ok(&["delete", "all"]);
}

#[test]
fn state_batches_on_the_embedded_store() {
    batches_run_allowed_calls_and_refuse_the_rest(&[]);
}

#[test]
fn state_batches_pass_through_to_redis_as_they_are() {
    let Some(redis) = Redis::start() else {
        return;
    };
    batches_run_allowed_calls_and_refuse_the_rest(&["--state", &redis.url()]);
}

/// A worker that stores 42,000 keys in 168 state batches, all written before it reads a reply
/// (so the master's writes meet a full socket, and must wait, not drop: it prints `stored` only
/// with every reply in), then asks for them all with `keys`, an answer over the channel's frame
/// limit, and then for one key, to see the channel still works.
const KEYS_PY: &str = r#"
import json

def frame(message):
    body = json.dumps(message).encode()
    return struct.pack(">I", len(body)) + body

def next_frame():
    return exactly(struct.unpack(">I", exactly(4))[0])

oks = 0
for b in range(168):
    resp = b"".join(b"*3\r\n$3\r\nSET\r\n$24\r\nkey:%020d\r\n$1\r\nv\r\n" % (b * 250 + i)
                    for i in range(250))
    body = b"R" + struct.pack(">Q", 1000 + b * 250) + resp
    channel.sendall(struct.pack(">I", len(body)) + body)
while oks < 168 * 250:
    oks += next_frame().count(b"+OK\r\n")
print(f"stored {oks}", flush=True)
for id, call in [(1, {"op": "keys", "pattern": "key:*"}), (2, {"op": "get", "key": "key:%020d" % 7})]:
    channel.sendall(frame({"type": "state", "id": id, "call": call}))
    answer = json.loads(next_frame())
    print(f"answer {id} {json.dumps(answer)[:300]}", flush=True)
while True:
    exactly(4)
"#;

#[test]
fn every_reply_comes_through_a_full_socket_and_one_over_the_frame_limit_is_an_error() {
    let home = Home::new();
    let script = home.file("keys.py", &channel_py(KEYS_PY));
    home.ok(&["start", arg(&script), "-n", "keys", "--no-autorestart"]);
    let log = home.wait_log("keys", 0, "out", "answer 2 ");
    assert!(log.contains("stored 42000"), "{log}");
    let line = |prefix: &str| {
        log.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_default()
            .to_string()
    };
    let keys = line("answer 1 ");
    assert!(
        keys.contains(r#""id": 1"#) && keys.contains("over the channel's limit of 1048576"),
        "{log}"
    );
    assert!(line("answer 2 ").contains(r#""ok": "v""#), "{log}");
    home.assert_daemon_answers();
    home.ok(&["delete", "all"]);
}

fn daemon_log(home: &Home) -> String {
    std::fs::read_to_string(home.path().join("daemon.log")).unwrap_or_default()
}

// ---- Redis ----

/// A `redis-server` of this test's own, on a free loopback port, killed on drop.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Redis {
    /// `None` (after a note) when redis-server is not installed and this is not CI.
    fn start() -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is not installed: `apt-get install -y redis-server` (.ci/run does)"
            );
            eprintln!("note: redis-server is not installed; the Redis tests are skipped");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = Redis {
            child: None,
            port,
            dir: tempfile::TempDir::with_prefix("corral-redis-").expect("a directory"),
        };
        redis.run();
        Some(redis)
    }

    fn run(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(10), "redis-server answers", || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn two_daemons_share_keys_and_channels_through_redis_and_survive_its_restart() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let url = redis.url();
    let (a, b) = (Home::new(), Home::new());
    start_node(
        &a,
        "js",
        &[("MODE", "count"), ("N", "500")],
        &["--state", &url],
    );
    start_rust(
        &b,
        "sub",
        &[("STATE_MODE", "subscribe"), ("STATE_PATTERN", "jobs.*")],
        &["--state", &url],
    );
    // A Rust worker on B counts on the same key meanwhile (its calls pass through to Redis in
    // state batches, the Node worker's as JSON messages).
    start_rust(
        &b,
        "count",
        &[
            ("STATE_MODE", "count"),
            ("STATE_KEY", "counter"),
            ("STATE_INCRS", "500"),
        ],
        &["--state", &url],
    );
    a.wait_log("js", 0, "out", "counted 500");
    b.wait_log("count", 0, "out", "counted 500");
    b.wait_log("sub", 0, "out", "subscribed jobs.*");
    // B sees A's key, and A's publication reaches B's worker.
    assert_eq!(state(&b, &["get", "counter"]), "1000");
    state(&a, &["publish", "jobs.new", "first"]);
    b.wait_log("sub", 0, "out", "got jobs.new first");

    // Redis goes away: a clear error, the daemons live on.
    redis.kill();
    let down = a.fails(&["state", "get", "counter"]);
    assert!(
        down.contains("unreachable") || down.contains("Redis"),
        "a clear error: {down}"
    );
    a.assert_daemon_answers();
    b.assert_daemon_answers();
    // It comes back (empty: it saves nothing): calls work and the subscription resumes.
    redis.run();
    wait_until(Duration::from_secs(20), "the store answers again", || {
        let out = a.corral(&["state", "set", "back", "yes"]);
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    // B had been idle: its first call may still meet the connection Redis dropped, and is
    // answered with the clear error above; then B's reconnected store sees A's key.
    wait_until(Duration::from_secs(20), "B reads A's key again", || {
        let out = b.corral(&["state", "get", "back"]);
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && text == "yes" {
            Ok(())
        } else {
            Err(format!("{text} {}", String::from_utf8_lossy(&out.stderr)))
        }
    });
    wait_until(
        Duration::from_secs(20),
        "a publication reaches B again",
        || {
            state(&a, &["publish", "jobs.new", "second"]);
            let log = b.log("sub", 0, "out");
            if log.contains("got jobs.new second") {
                Ok(())
            } else {
                Err(log)
            }
        },
    );
    // B's pass-through connection, broken by the restart, is made again for new batches.
    start_rust(
        &b,
        "after",
        &[
            ("STATE_MODE", "count"),
            ("STATE_KEY", "after"),
            ("STATE_INCRS", "300"),
        ],
        &["--state", &url],
    );
    b.wait_log("after", 0, "out", "counted 300");
    assert_eq!(state(&a, &["get", "after"]), "300");
    a.ok(&["delete", "all"]);
    b.ok(&["delete", "all"]);
}

#[test]
fn an_unreachable_redis_is_refused_at_start() {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let home = Home::new();
    let url = format!("redis://127.0.0.1:{port}/0");
    let script = home.file("idle.js", NODE_JS);
    let node = node();
    let refused = home.fails(&[
        "start",
        arg(&script),
        "--interpreter",
        &node,
        "--state",
        &url,
    ]);
    assert!(refused.contains("unreachable"), "{refused}");
    assert!(refused.contains(&port.to_string()), "{refused}");
    let bad = home.fails(&["start", arg(&script), "--state", "mongodb://x"]);
    assert!(bad.contains("--state"), "{bad}");
    assert!(home.ls().is_empty());
}
