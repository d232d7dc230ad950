//! End-to-end tests of clusters: listening sockets bound once by the master, and the ways
//! connections reach the workers (`--lb rr`, the default, and `least-conn`: the master accepts
//! and hands each connection over the worker's channel; `shared`: socket activation; `proxy`),
//! the worker channel (ready, going down, messages, bad input), `--wait-ready` with its listen
//! timeout, and rolling reloads with their rollback.
//!
//! The fixtures are python3 programs written into each test's own directory: `web.py`, an HTTP
//! server that answers every request with its pid, in any of the modes, and `chan.py`, the
//! worker's end of the channel.

// Shared by the cluster test files; each uses part of it.
#[allow(dead_code)]
mod http;
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::*;
use serde_json::Value;
use support::*;

// ---- fixtures ----

/// The worker's end of the channel: frames of a 4-byte big-endian length, then JSON.
const CHAN_PY: &str = r#"
import json, os, socket, struct

_channel = None

def channel():
    global _channel
    if _channel is None:
        _channel = socket.socket(fileno=int(os.environ["CORRAL_CHANNEL_FD"]))
    return _channel

def send_raw(data):
    channel().sendall(data)

def send(obj):
    body = json.dumps(obj, separators=(",", ":")).encode()
    send_raw(struct.pack(">I", len(body)) + body)
"#;

/// An HTTP server, in the load-balancing mode named by `WEB_LB` (see [`Lb`]), which it checks its
/// environment against (it exits 3 when it is wrong). Every answer's body is its pid; HTTP/1.1
/// keep-alive unless the request says `Connection: close`.
///
/// `shared`: it accepts on the socket inherited at descriptor 3. `rr`, `least-conn`: it takes
/// each connection from a `connection` frame on its channel (the descriptor comes with the
/// frame), says `accepted` before reading it and `closed` once it closed it; under `least-conn`
/// it also sends a `message` `{"closed": id}` after each `closed`, which the master logs, so that
/// a test knows when the master has counted the close.
///
/// On SIGTERM (or a `shutdown` frame) it stops taking connections (it closes its copy of the
/// listening socket, or says `refused` to every further `connection` frame), answers one more
/// request on each open connection (with `Connection: close`), and exits 0 once they are done.
///
/// `MODE` picks more behaviour: `going-down` says so on SIGUSR1 and exits 2 s later; `hold` takes
/// no connection until a file `release` exists in its working directory, then takes them all.
/// Only in the instance `BAD_INSTANCE`: `garbage`, `huge` and `fds` break the channel once,
/// shortly after it is ready; `refuse` refuses every connection; `die-holding` exits at once on
/// its first `connection` frame, without a word (once: a marker file remembers it). A file
/// `mode` in the working directory holding `broken` makes it exit 1 at once; holding `silent`, it
/// never says it is ready.
const WEB_PY: &str = r#"
import collections, json, os, selectors, signal, socket, struct, sys, time
import chan

PID = os.getpid()
LB = os.environ.get("WEB_LB", "?")
MODE = os.environ.get("MODE", "serve")
INSTANCE = os.environ.get("CORRAL_INSTANCE", "?")
BAD = INSTANCE == os.environ.get("BAD_INSTANCE")

def give_up(why):
    print("refusing to serve: " + why, flush=True)
    sys.exit(3)

if LB == "shared":
    wanted_env = (("LISTEN_PID", str(PID)), ("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "listen0"),
                  ("CORRAL_CHANNEL_FD", "4"))
elif LB in ("rr", "least-conn"):
    wanted_env = (("LISTEN_PID", None), ("LISTEN_FDS", None), ("LISTEN_FDNAMES", None),
                  ("CORRAL_CHANNEL_FD", "3"))
else:
    give_up("WEB_LB=%r is no mode" % LB)
for name, wanted in wanted_env + (("CORRAL_CHANNEL_PROTOCOL", "2"),):
    if os.environ.get(name) != wanted:
        give_up("%s=%r, expected %r" % (name, os.environ.get(name), wanted))

flaw = ""
if os.path.exists("mode"):
    with open("mode") as f:
        flaw = f.read().strip()
if flaw == "broken":
    print("broken on purpose, pid %d" % PID, flush=True)
    sys.exit(1)
if flaw == "silent":
    print("never ready, pid %d" % PID, flush=True)
    while True:
        time.sleep(3600)

selector = selectors.DefaultSelector()
channel = chan.channel()
listener = None
if LB == "shared":
    listener = socket.socket(fileno=3)
    if listener.type != socket.SOCK_STREAM:
        give_up("descriptor 3 is not a stream socket")
    listener.setblocking(False)
    selector.register(listener, selectors.EVENT_READ)
else:
    if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_STREAM:
        give_up("the channel is not a unix stream socket")
    selector.register(channel, selectors.EVENT_READ)

stopping = False
going_down_asked = False

def on_term(signum, frame):
    global stopping
    stopping = True

def on_usr1(signum, frame):
    global going_down_asked
    going_down_asked = True

signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGUSR1, on_usr1)

chan.send({"type": "ready"})
print("serving pid=%d instance=%s lb=%s mode=%s" % (PID, INSTANCE, LB, MODE), flush=True)

if MODE in ("garbage", "huge", "fds") and BAD:
    marker = "bad-%s.pid" % INSTANCE
    if not os.path.exists(marker):
        with open(marker + ".tmp", "w") as f:
            f.write(str(PID))
        os.rename(marker + ".tmp", marker)
        time.sleep(0.2)
        if MODE == "garbage":
            chan.send_raw(b"\x00\x00\x00\x05hello")
        elif MODE == "huge":
            chan.send_raw(b"\x40\x00\x00\x00")
        else:
            socket.send_fds(channel, [b"x"], [0])
        print("broke the channel", flush=True)

body = str(PID).encode()
connections = {}
going_down_since = None
stopped_since = None

# rr and least-conn: the descriptors received, in the order of their `connection` frames; the
# bytes of the channel not yet a whole frame; connections held back (MODE=hold); the master's id
# of each connection taken.
received_fds = collections.deque()
channel_open = LB != "shared"
inbox = b""
held = []
ids = {}

def frame(obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    return struct.pack(">I", len(data)) + data

def take(batch):
    # One write for all the acknowledgements: the master reads them together.
    chan.send_raw(b"".join(frame({"type": "accepted", "id": cid}) for cid, _ in batch))
    for cid, fd in batch:
        conn = socket.socket(fileno=fd)
        conn.setblocking(False)
        ids[conn] = cid
        connections[conn] = b""
        selector.register(conn, selectors.EVENT_READ)

def on_connection(cid, fd):
    if stopping or (BAD and MODE == "refuse"):
        chan.send({"type": "refused", "id": cid})
        os.close(fd)
        print("refused connection %d" % cid, flush=True)
    elif BAD and MODE == "die-holding" and not os.path.exists("died-holding.pid"):
        with open("died-holding.pid.tmp", "w") as f:
            f.write(str(PID))
        os.rename("died-holding.pid.tmp", "died-holding.pid")
        print("pid %d dies holding connection %d" % (PID, cid), flush=True)
        os._exit(7)
    elif MODE == "hold" and not os.path.exists("release"):
        held.append((cid, fd))
        print("holding connection %d" % cid, flush=True)
    else:
        take([(cid, fd)])

def on_channel():
    global inbox, stopping, channel_open
    data, fds, _, _ = socket.recv_fds(channel, 65536, 16)
    received_fds.extend(fds)
    if not data:
        print("the master closed the channel, pid %d" % PID, flush=True)
        selector.unregister(channel)
        channel_open = False
        stopping = True
        return
    inbox += data
    while len(inbox) >= 4 and len(inbox) >= 4 + struct.unpack(">I", inbox[:4])[0]:
        length = struct.unpack(">I", inbox[:4])[0]
        message = json.loads(inbox[4:4 + length])
        inbox = inbox[4 + length:]
        if message["type"] == "connection":
            on_connection(message["id"], received_fds.popleft())
        elif message["type"] == "shutdown":
            print("told to shut down by the master, pid %d" % PID, flush=True)
            stopping = True
        else:
            give_up("an unknown frame from the master: %r" % message)

def drop(conn):
    selector.unregister(conn)
    del connections[conn]
    conn.close()
    cid = ids.pop(conn, None)
    if cid is not None:
        chan.send({"type": "closed", "id": cid})
        if LB == "least-conn":
            chan.send({"type": "message", "data": {"closed": cid}})

def answer(conn, close):
    head = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n" % (
        len(body), "close" if close else "keep-alive")
    conn.setblocking(True)
    try:
        conn.sendall(head.encode() + body)
    except OSError:
        pass
    conn.setblocking(False)

while True:
    now = time.monotonic()
    if going_down_asked and going_down_since is None:
        going_down_since = now
        chan.send({"type": "going_down", "reason": "asked to by SIGUSR1"})
        print("going down, pid %d" % PID, flush=True)
    if going_down_since is not None and now - going_down_since >= 2.0:
        stopping = True
    if stopping and stopped_since is None:
        stopped_since = now
        if listener is not None:
            selector.unregister(listener)
            listener.close()
        print("no longer accepting, pid %d" % PID, flush=True)
    if stopped_since is not None and (not connections or now - stopped_since > 3.0):
        break
    if held and os.path.exists("release"):
        print("releasing %d connection(s)" % len(held), flush=True)
        take(held)
        held = []
    for key, _ in selector.select(timeout=0.05):
        sock = key.fileobj
        if sock is listener:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            conn.setblocking(False)
            connections[conn] = b""
            selector.register(conn, selectors.EVENT_READ)
            continue
        if sock is channel:
            on_channel()
            continue
        if sock not in connections:
            continue
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            drop(sock)
            continue
        pending = connections[sock] + data
        closing = False
        while b"\r\n\r\n" in pending and not closing:
            head, _, pending = pending.partition(b"\r\n\r\n")
            closing = stopping or b"connection: close" in head.lower()
            answer(sock, closing)
        if closing:
            drop(sock)
        else:
            connections[sock] = pending

# What the master sent before the stop signal (the shutdown frame, connections to refuse) is
# read before leaving.
if channel_open:
    channel.setblocking(False)
    try:
        while channel_open:
            on_channel()
    except BlockingIOError:
        pass
print("exiting, pid %d" % PID, flush=True)
sys.exit(0)
"#;

/// Checks that its channel is an open Unix stream socket at the advertised descriptor, says hello
/// on it, then idles.
const CHANNEL_PY: &str = r#"
import os, socket, stat, sys, time
import chan

problems = []
for name, wanted in (("CORRAL_CHANNEL_FD", "3"), ("CORRAL_CHANNEL_PROTOCOL", "2"),
                     ("CORRAL_WORKER_ID", os.environ.get("CORRAL_ID"))):
    if os.environ.get(name) != wanted:
        problems.append("%s=%r, expected %r" % (name, os.environ.get(name), wanted))
for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
    if name in os.environ:
        problems.append("%s is set without --listen" % name)
try:
    mode = os.fstat(3).st_mode
except OSError as e:
    problems.append("descriptor 3 is not open: %s" % e)
else:
    if not stat.S_ISSOCK(mode):
        problems.append("descriptor 3 is not a socket")
    elif chan.channel().family != socket.AF_UNIX or chan.channel().type != socket.SOCK_STREAM:
        problems.append("descriptor 3 is not a unix stream socket")
if problems:
    print("channel problems: " + "; ".join(problems), flush=True)
    sys.exit(3)
chan.send({"type": "message", "data": {"hello": 1}})
print("said hello", flush=True)
while True:
    time.sleep(3600)
"#;

/// Says it is going down as soon as it starts, and exits.
const GOING_DOWN_AT_ONCE_PY: &str = r#"
import chan
chan.send({"type": "going_down", "reason": "cannot start"})
print("going down at once", flush=True)
"#;

/// Never says it is ready.
const SILENT_PY: &str = r#"
import time
print("never ready", flush=True)
while True:
    time.sleep(3600)
"#;

// ---- helpers ----

/// Writes `chan.py` and the fixture into the work directory; returns the fixture's path.
fn fixture(home: &Home, name: &str, content: &str) -> PathBuf {
    home.file("chan.py", CHAN_PY);
    home.file(name, content)
}

/// How connections reach the workers of `web.py`; it is told which in `WEB_LB`, and checks that
/// its environment is that of the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lb {
    /// `--lb shared`: every worker accepts on the listening socket it inherits.
    Shared,
    /// `--lb rr`, the default (so not given): the master hands connections out in turn.
    Rr,
    /// `--lb least-conn`: to the worker with the fewest open connections.
    LeastConn,
}

impl Lb {
    /// The `start` arguments that pick this mode.
    fn args(self) -> &'static [&'static str] {
        match self {
            Lb::Shared => &["--lb", "shared", "-e", "WEB_LB=shared"],
            Lb::Rr => &["-e", "WEB_LB=rr"],
            Lb::LeastConn => &["--lb", "least-conn", "-e", "WEB_LB=least-conn"],
        }
    }
}

/// Starts `web.py` as `name` in mode `lb`, with `args` after the script.
fn start_web(home: &Home, name: &str, lb: Lb, args: &[&str]) -> PathBuf {
    let script = fixture(home, "web.py", WEB_PY);
    let mut all = vec!["start", arg(&script), "-n", name];
    all.extend_from_slice(lb.args());
    all.extend_from_slice(args);
    home.ok(&all);
    script
}

// ---- shared listening sockets ----

#[test]
fn shared_mode_gives_every_worker_the_socket_and_both_answer() {
    let home = Home::new();
    start_web(
        &home,
        "web",
        Lb::Shared,
        &["-i", "2", "--listen", "127.0.0.1:0", "--wait-ready"],
    );
    let list = home.wait_online("web", 2);
    let pids: BTreeSet<u32> = pids_of(&list).into_iter().collect();
    assert_eq!(pids.len(), 2, "{}", show(&list));
    let addr = tcp_address(&list);
    assert!(addr.ip().is_loopback() && addr.port() != 0, "{addr}");
    // The fixture exits 3 unless LISTEN_PID, LISTEN_FDS and the rest are right: both serve.
    for (index, p) in pids_of(&list).iter().enumerate() {
        let out = home.wait_log("web", index as u32, "out", "serving pid=");
        assert!(
            out.contains(&format!("serving pid={p} instance={index}")),
            "{out}"
        );
    }

    let table = home.ok(&["ls"]);
    assert!(table.contains(&format!("web listens on {addr}")), "{table}");
    let described = home.ok(&["describe", "web"]);
    assert!(
        described
            .lines()
            .any(|l| l.starts_with("listen") && l.ends_with(&addr.to_string())),
        "{described}"
    );

    // The kernel decides which worker accepts: every request is answered, and both answer
    // within a bounded number of requests.
    let mut seen = BTreeSet::new();
    let mut sent = 0;
    while sent < 200 || (seen.len() < 2 && sent < 500) {
        let answered = get(addr).unwrap_or_else(|e| panic!("request {sent}: {e}"));
        assert!(
            pids.contains(&answered),
            "{answered} is not one of {pids:?}"
        );
        seen.insert(answered);
        sent += 1;
    }
    assert_eq!(seen, pids, "after {sent} requests");

    home.ok(&["delete", "web"]);
    assert!(home.ls().is_empty());
    assert!(get(addr).is_err(), "the socket closes with the app");
    assert_groups_gone(&home.recorded_pgids());
}

fn unix_socket_listener(lb: Lb) {
    let home = Home::new();
    let socket = home.work().join("app.sock");
    let address = format!("unix:{}", socket.display());
    start_web(&home, "sock", lb, &["--listen", &address, "--wait-ready"]);
    let list = home.wait_online("sock", 1);
    assert_eq!(listen_of(&list[0]), vec![address.clone()]);
    assert!(
        home.ok(&["ls"])
            .contains(&format!("sock listens on {address}"))
    );
    let answered = get_unix(&socket).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(Some(answered), pid(&list[0]));

    home.ok(&["delete", "sock"]);
    assert!(!socket.exists(), "{} is left behind", socket.display());
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn a_unix_socket_listener_serves_and_is_removed_with_the_app() {
    unix_socket_listener(Lb::Shared);
}

#[test]
fn a_unix_socket_listener_serves_in_rr_mode_too() {
    unix_socket_listener(Lb::Rr);
}

#[test]
fn a_listen_address_in_use_or_malformed_starts_nothing() {
    let home = Home::new();
    let script = fixture(&home, "web.py", WEB_PY);
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err = home.fails(&["start", arg(&script), "-n", "web", "--listen", &addr]);
    assert!(
        err.contains(&addr) && err.contains("'web'"),
        "the message names the address and the app: {err}"
    );
    assert!(home.ls().is_empty(), "{}", show(&home.ls()));

    let err = home.fails(&["start", arg(&script), "-n", "web", "--listen", "nonsense"]);
    assert!(err.contains("nonsense"), "{err}");
    assert!(home.ls().is_empty(), "{}", show(&home.ls()));
    assert!(
        !daemon_log(&home).contains("starting app"),
        "{}",
        daemon_log(&home)
    );
    home.assert_daemon_answers();
}

// ---- rolling reload ----

/// Five reloads of two instances while clients send requests: not one request fails.
fn reload_under_load(lb: Lb, keep_alive: bool) {
    let home = Home::new();
    // In rr mode a worker is ready only when it says so, without --wait-ready. The listen
    // timeout is long: a new process that starts slowly on a busy machine is no lost request.
    let wait_ready: &[&str] = if lb == Lb::Shared {
        &["--wait-ready"]
    } else {
        &[]
    };
    let args = [
        &[
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--kill-timeout",
            "5s",
            "--listen-timeout",
            "20s",
        ],
        wait_ready,
    ]
    .concat();
    start_web(&home, "web", lb, &args);
    let initial = home.wait_online("web", 2);
    let initial_pids = pids_of(&initial);
    let ids = ids_of(&initial);
    let addr = tcp_address(&initial);

    let load = Load::start(addr, 3, keep_alive);
    wait_until(Duration::from_secs(20), "the clients got answers", || {
        if load.answered() >= 20 {
            Ok(())
        } else {
            Err(format!(
                "{} answered, failures: {:?}",
                load.answered(),
                load.tally.failures()
            ))
        }
    });
    let mut every_pid: BTreeSet<u32> = initial_pids.iter().copied().collect();
    for round in 1..=5 {
        let output = home.corral(&["reload", "web"]);
        let out = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success() && out.contains("online"),
            "reload {round}: {out}{}\n--- daemon.log:\n{}\n--- web-0-out.log:\n{}\n--- web-1-out.log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            daemon_log(&home),
            home.log("web", 0, "out"),
            home.log("web", 1, "out")
        );
        let list = home.instances("web");
        assert!(
            list.len() == 2 && list.iter().all(|i| status(i) == "online"),
            "after reload {round}, without draining processes:\n{}",
            show(&list)
        );
        assert_eq!(ids_of(&list), ids, "reload {round} keeps the ids");
        for p in pids_of(&list) {
            assert!(
                every_pid.insert(p),
                "reload {round} gave a new pid: {}",
                show(&list)
            );
        }
    }
    let last = home.wait_online("web", 2);
    let last_pids = pids_of(&last);
    wait_until(
        Duration::from_secs(20),
        "the new processes answered the clients",
        || {
            let seen = load.tally.pids();
            if last_pids.iter().any(|p| seen.contains(p)) {
                Ok(())
            } else {
                Err(format!("answered by {seen:?}"))
            }
        },
    );
    let tally = load.finish();
    let answered = tally.answered.load(Ordering::SeqCst);
    let failures = tally.failures();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}",
        failures.len(),
        answered + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(answered > 0);
    if keep_alive {
        // Connections were kept across requests, and closed by the server when it stopped.
        let connections = tally.connections.load(Ordering::SeqCst);
        assert!(
            connections > 3 && connections * 10 < answered,
            "{connections} connections for {answered} requests"
        );
    }
    let seen = tally.pids();
    assert!(
        seen.len() > 2 && seen.is_subset(&every_pid),
        "answered by {seen:?}; the processes were {every_pid:?}"
    );

    assert_eq!(ids_of(&last), ids);
    for p in &last_pids {
        assert!(!initial_pids.contains(p), "{}", show(&last));
    }
    assert!(
        initial_pids.iter().all(|&p| !is_running(p)),
        "the replaced processes are gone"
    );
    let log = daemon_log(&home);
    assert!(!log.contains("SIGKILL"), "they exited on SIGTERM:\n{log}");
    if lb != Lb::Shared {
        // Each replaced process was told on its channel before its SIGTERM.
        let replaced: Vec<u32> = every_pid
            .difference(&last_pids.iter().copied().collect())
            .copied()
            .collect();
        assert_eq!(replaced.len(), 10, "{replaced:?}");
        wait_until(
            Duration::from_secs(10),
            "every replaced process logged its shutdown frame",
            || {
                let out = home.log("web", 0, "out") + &home.log("web", 1, "out");
                let missing: Vec<&u32> = replaced
                    .iter()
                    .filter(|p| {
                        !out.contains(&format!("told to shut down by the master, pid {p}\n"))
                    })
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("not told: {missing:?}\n{out}"))
                }
            },
        );
    }

    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn reload_under_load_loses_no_request() {
    reload_under_load(Lb::Shared, false);
}

#[test]
fn reload_under_load_loses_no_request_on_keep_alive_connections() {
    reload_under_load(Lb::Shared, true);
}

#[test]
fn rr_mode_reloads_under_load_without_a_failed_request() {
    reload_under_load(Lb::Rr, false);
}

#[test]
fn rr_mode_reloads_under_load_without_a_failed_request_on_keep_alive_connections() {
    reload_under_load(Lb::Rr, true);
}

#[test]
fn a_reload_whose_new_process_exits_rolls_back_to_the_old_ones() {
    let home = Home::new();
    start_web(
        &home,
        "web",
        Lb::Shared,
        &["-i", "2", "--listen", "127.0.0.1:0", "--wait-ready"],
    );
    let initial = home.wait_online("web", 2);
    let initial_pids = pids_of(&initial);
    let addr = tcp_address(&initial);

    home.file("mode", "broken\n");
    let err = home.fails(&["reload", "web"]);
    for words in ["instance 0", "exited with code 1", "keep serving"] {
        assert!(err.contains(words), "no {words:?} in: {err}");
    }
    let list = home.wait_app(
        Duration::from_secs(10),
        "web",
        "the two old processes online, nothing else",
        |list| list.len() == 2 && list.iter().all(|i| status(i) == "online"),
    );
    assert_eq!(pids_of(&list), initial_pids, "{}", show(&list));
    assert!(initial_pids.iter().all(|&p| is_running(p)));
    // The new process of instance 0 did run.
    home.wait_log("web", 0, "out", "broken on purpose");
    assert!(
        !home.log("web", 1, "out").contains("broken on purpose"),
        "instance 1 was left alone"
    );
    for n in 0..20 {
        let answered = get(addr).unwrap_or_else(|e| panic!("request {n}: {e}"));
        assert!(initial_pids.contains(&answered), "{answered}");
    }
    wait_daemon_log(&home, "reload of app 'web' stopped at instance 0");

    // Fixed, the next reload goes through.
    std::fs::remove_file(home.work().join("mode")).unwrap();
    home.ok(&["reload", "web"]);
    let list = home.wait_online("web", 2);
    assert!(
        pids_of(&list).iter().all(|p| !initial_pids.contains(p)),
        "{}",
        show(&list)
    );
    get(addr).unwrap_or_else(|e| panic!("{e}"));

    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn a_reload_whose_new_process_is_not_ready_in_time_rolls_back() {
    let home = Home::new();
    // The listen timeout is longer than min_uptime: the end of a silent new process is no
    // crash loop, and still the reload must stop at once.
    start_web(
        &home,
        "web",
        Lb::Shared,
        &[
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--wait-ready",
            "--listen-timeout",
            "1s",
            "--min-uptime",
            "300ms",
            "--kill-timeout",
            "1s",
        ],
    );
    let initial = home.wait_online("web", 2);
    let initial_pids = pids_of(&initial);
    let addr = tcp_address(&initial);

    home.file("mode", "silent\n");
    let output = run_bounded(home.command(&["reload", "web"]), Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("the reload did not stop: {e}\n{}", daemon_log(&home)));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    for words in [
        "instance 0",
        "did not say it is ready within its listen timeout (1000ms)",
        "keep serving",
    ] {
        assert!(err.contains(words), "no {words:?} in: {err}");
    }
    let list = home.wait_app(
        Duration::from_secs(10),
        "web",
        "the two old processes online, nothing else",
        |list| list.len() == 2 && list.iter().all(|i| status(i) == "online"),
    );
    assert_eq!(pids_of(&list), initial_pids, "{}", show(&list));
    let log = daemon_log(&home);
    let ended = log
        .lines()
        .skip_while(|l| !l.contains("reloading app 'web'"))
        .filter(|l| {
            l.contains("instance 0 (pid")
                && l.contains("ready within its listen timeout (1000ms); killed by")
        })
        .count();
    assert_eq!(
        ended, 1,
        "one new process was tried and ended, not restarted:\n{log}"
    );
    let answered = get(addr).unwrap_or_else(|e| panic!("{e}"));
    assert!(initial_pids.contains(&answered), "{answered}");

    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- connections handed over the channel (rr, least-conn) ----

#[test]
fn rr_mode_is_the_default_and_hands_connections_to_the_workers_in_turn() {
    let home = Home::new();
    start_web(
        &home,
        "web",
        Lb::Rr,
        &["-i", "3", "--listen", "127.0.0.1:0"],
    );
    let list = home.wait_online("web", 3);
    let pids = pids_of(&list);
    let addr = tcp_address(&list);
    // The fixture exits 3 unless it got the channel at descriptor 3 and no listening socket.
    for (index, p) in pids.iter().enumerate() {
        home.wait_log(
            "web",
            index as u32,
            "out",
            &format!("serving pid={p} instance={index} lb=rr "),
        );
    }
    let described = home.ok(&["describe", "web"]);
    assert!(
        described
            .lines()
            .any(|l| l.starts_with("load balancing") && l.trim_end().ends_with(" rr")),
        "{described}"
    );

    let total = 30;
    let mut answers = BTreeMap::new();
    for n in 0..total {
        let answered = get(addr).unwrap_or_else(|e| panic!("request {n}: {e}"));
        *answers.entry(answered).or_insert(0usize) += 1;
    }
    let mut sorted = pids.clone();
    sorted.sort_unstable();
    assert_eq!(answers.keys().copied().collect::<Vec<_>>(), sorted);
    let even = total / pids.len();
    assert!(
        answers.values().all(|&n| n.abs_diff(even) <= 1),
        "not within one of {even} each: {answers:?}"
    );
    let list = home.instances("web");
    assert_eq!(pids_of(&list), pids, "{}", show(&list));
    assert!(list.iter().all(|i| restarts(i) == 0), "{}", show(&list));

    home.ok(&["delete", "web"]);
    assert!(get(addr).is_err(), "the socket closes with the app");
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn rr_mode_loses_at_most_the_in_flight_requests_of_a_killed_worker() {
    let home = Home::new();
    start_web(
        &home,
        "web",
        Lb::Rr,
        &["-i", "2", "--listen", "127.0.0.1:0", "--kill-timeout", "5s"],
    );
    let list = home.wait_online("web", 2);
    let victim = pids_of(&list)[0];
    let addr = tcp_address(&list);
    let clients = 3;
    let load = Load::start(addr, clients, false);
    load.wait_answered(20);
    corral_sys::kill(victim, 9).unwrap();
    let after = home.wait_app(
        Duration::from_secs(20),
        "web",
        "a replacement of instance 0 online",
        |l| {
            l.len() == 2 && l.iter().all(|i| status(i) == "online") && !pids_of(l).contains(&victim)
        },
    );
    let replacement = pid(&after[0]).unwrap();
    load.wait_answered(load.answered() + 20);
    wait_until(
        Duration::from_secs(20),
        "the replacement answers its share",
        || {
            let seen = load.tally.pids();
            if seen.contains(&replacement) {
                Ok(())
            } else {
                Err(format!("answered by {seen:?}"))
            }
        },
    );
    let tally = load.finish();
    // Each client has at most one request in flight: only those can be lost.
    assert!(
        tally.failures().len() <= clients,
        "{:?}\n{}",
        tally.failures(),
        daemon_log(&home)
    );
    assert_eq!(pid(&after[1]), pids_of(&list).get(1).copied());
    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

/// Two rr workers of `web.py`, instance 1 in `mode`: their `ls` rows and the address.
fn two_workers_one_in_mode(home: &Home, mode: &str) -> (Vec<Value>, SocketAddr) {
    let mode = format!("MODE={mode}");
    let args = [
        "-i",
        "2",
        "--listen",
        "127.0.0.1:0",
        "-e",
        &mode,
        "-e",
        "BAD_INSTANCE=1",
    ];
    start_web(home, "web", Lb::Rr, &args);
    let list = home.wait_online("web", 2);
    let addr = tcp_address(&list);
    (list, addr)
}

#[test]
fn connections_a_worker_refuses_go_to_the_others() {
    let home = Home::new();
    let (list, addr) = two_workers_one_in_mode(&home, "refuse");
    let (server, refuser) = (pid(&list[0]).unwrap(), pid(&list[1]).unwrap());
    for n in 0..20 {
        assert_eq!(get(addr), Ok(server), "request {n}");
    }
    // Round robin offered it its share, and it refused each.
    let out = wait_until(
        Duration::from_secs(10),
        "instance 1 refused at least 5 connections",
        || {
            let out = home.log("web", 1, "out");
            if out.matches("refused connection ").count() >= 5 {
                Ok(out)
            } else {
                Err(out)
            }
        },
    );
    assert!(out.contains(&format!("serving pid={refuser} ")), "{out}");
    // Refusing is no fault: nothing was restarted.
    let list = home.instances("web");
    assert_eq!(pids_of(&list), vec![server, refuser], "{}", show(&list));
    assert!(list.iter().all(|i| restarts(i) == 0), "{}", show(&list));
    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn a_connection_left_by_a_worker_that_died_before_accepting_it_is_served_by_another() {
    let home = Home::new();
    let (list, addr) = two_workers_one_in_mode(&home, "die-holding");
    let (survivor, culprit) = (pid(&list[0]).unwrap(), pid(&list[1]).unwrap());
    // Round robin gives one of the first two connections to instance 1, which dies with it.
    let mut answers = Vec::new();
    for n in 0..10 {
        let answered =
            get(addr).unwrap_or_else(|e| panic!("request {n}: {e}\n{}", daemon_log(&home)));
        answers.push(answered);
    }
    let died: u32 = std::fs::read_to_string(home.work().join("died-holding.pid"))
        .expect("instance 1 died holding a connection")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(died, culprit);
    home.wait_log(
        "web",
        1,
        "out",
        &format!("pid {culprit} dies holding connection "),
    );
    let list = home.wait_app(
        Duration::from_secs(20),
        "web",
        "instance 1 restarted",
        |l| {
            l.len() == 2
                && l.iter().all(|i| status(i) == "online")
                && pid(&l[1]).is_some_and(|p| p != culprit)
        },
    );
    assert!(!is_running(culprit));
    assert_eq!(pid(&list[0]), Some(survivor), "{}", show(&list));
    let replacement = pid(&list[1]).unwrap();
    assert!(
        answers.iter().all(|&p| p == survivor || p == replacement),
        "{answers:?}: neither {survivor} nor {replacement}"
    );
    let log = daemon_log(&home);
    assert!(!log.contains("no ready worker took"), "{log}");
    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

/// How many of its connections' closes instance `index` has reported (and so the master has
/// counted: the master logs the message after the `closed` frame before it).
fn closes_reported(home: &Home, index: u64) -> usize {
    daemon_log(home)
        .matches(&format!("app 'web' instance {index} says: {{\"closed\":"))
        .count()
}

#[test]
fn least_conn_mode_gives_new_connections_to_the_worker_with_the_fewest_open() {
    let home = Home::new();
    start_web(
        &home,
        "web",
        Lb::LeastConn,
        &["-i", "2", "--listen", "127.0.0.1:0"],
    );
    let list = home.wait_online("web", 2);
    let addr = tcp_address(&list);
    let open = |n: usize| -> (KeepAliveClient, u32) {
        let mut client = KeepAliveClient::new(addr);
        let answered = client
            .get()
            .unwrap_or_else(|e| panic!("connection {n}: {e}"));
        (client, answered)
    };
    // Six connections kept open: three each, the least loaded taking the next.
    let mut first: Vec<(KeepAliveClient, u32)> = (0..6).map(open).collect();
    let on = |clients: &[(KeepAliveClient, u32)], p: u32| {
        clients
            .iter()
            .filter(|(_, answered)| *answered == p)
            .count()
    };
    for instance in &list {
        assert_eq!(
            on(&first, pid(instance).unwrap()),
            3,
            "{:?}",
            first.iter().map(|(_, p)| p).collect::<Vec<_>>()
        );
    }
    // Every connection of one worker closes: it has none open, the other three.
    let (emptied, busy) = (&list[0], &list[1]);
    let (emptied_pid, busy_pid) = (pid(emptied).unwrap(), pid(busy).unwrap());
    let index = emptied["instance"].as_u64().unwrap();
    assert_eq!(closes_reported(&home, index), 0);
    first.retain(|(_, answered)| *answered != emptied_pid);
    wait_until(
        Duration::from_secs(10),
        "the master counted the three closes",
        || match closes_reported(&home, index) {
            3 => Ok(()),
            n => Err(format!("{n} reported\n{}", daemon_log(&home))),
        },
    );
    // The next three go to it (round robin would send every other one to the busy worker).
    let mut second: Vec<(KeepAliveClient, u32)> = (6..9).map(open).collect();
    let landed: Vec<u32> = second.iter().map(|(_, p)| *p).collect();
    assert_eq!(
        landed,
        vec![emptied_pid; 3],
        "{emptied_pid} had no connection open, {busy_pid} three"
    );
    // The connections stayed open, each for its requests.
    for (client, answered) in first.iter_mut().chain(second.iter_mut()) {
        let again = client.get().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, *answered);
        assert_eq!(client.opened, 1);
    }
    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn a_program_that_does_not_read_its_channel_is_ended_in_rr_mode_and_told_why() {
    let home = Home::new();
    let script = home.file("silent.py", SILENT_PY);
    home.ok(&[
        "start",
        arg(&script),
        "--listen",
        "127.0.0.1:0",
        "--listen-timeout",
        "300ms",
        "--max-restarts",
        "2",
    ]);
    let list = home.wait_app(Duration::from_secs(20), "silent", "errored", |list| {
        list.len() == 1 && status(&list[0]) == "errored"
    });
    assert_eq!(restarts(&list[0]), 2, "{}", show(&list));
    let last_exit = list[0]["last_exit"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let described = home.ok(&["describe", "silent"]);
    for words in [
        "did not say it is ready on its channel",
        "--lb shared",
        "--lb proxy",
        "within its listen timeout (300ms)",
    ] {
        assert!(last_exit.contains(words), "no {words:?} in {last_exit:?}");
        assert!(described.contains(words), "no {words:?} in:\n{described}");
    }
    home.ok(&["delete", "silent"]);
    assert_groups_gone(&home.recorded_pgids());
}

/// User plus system CPU time of process `pid`, all its threads.
fn cpu_time(pid: u32) -> Duration {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/stat: {e}"));
    let fields: Vec<&str> = text[text.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .collect();
    // Fields 14 and 15 of proc(5), utime and stime, counted from field 3 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let mut getconf = Command::new("getconf");
    getconf.arg("CLK_TCK");
    let output = run(getconf);
    let per_second: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / per_second)
}

/// The descriptors process `pid` has open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("listing the descriptors of {pid}: {e}"))
        .count()
}

/// A new connection to `addr` with a `Connection: close` request sent on it.
fn send_request(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    stream.write_all(CLOSE_REQUEST).unwrap();
    stream
}

/// How many connections wait in the accept queue of the listening socket of TCP address `addr`
/// (for a listening socket, `/proc/net/tcp` shows that in `rx_queue`).
fn accept_queue(addr: SocketAddr) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("reading /proc/net/tcp");
    let port = format!(":{:04X}", addr.port());
    let queues: Vec<usize> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let listening = fields.get(3) == Some(&"0A");
            let (_, rx) = fields.get(4)?.split_once(':')?;
            (listening && fields.get(1)?.ends_with(&port))
                .then(|| usize::from_str_radix(rx, 16).ok())?
        })
        .collect();
    assert_eq!(queues.len(), 1, "one listening socket on {addr}:\n{table}");
    queues[0]
}

/// Asserts that nothing came back on `stream` yet.
fn assert_unanswered(stream: &TcpStream, n: usize) {
    stream.set_nonblocking(true).unwrap();
    let peeked = stream.peek(&mut [0; 1]);
    stream.set_nonblocking(false).unwrap();
    match peeked {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("client {n} got something while its connection is held: {other:?}"),
    }
}

#[test]
fn rr_mode_pauses_accepts_without_spinning_when_the_master_runs_out_of_descriptors() {
    let home = Home::new();
    start_web(
        &home,
        "web",
        Lb::Rr,
        &["--listen", "127.0.0.1:0", "-e", "MODE=hold"],
    );
    let list = home.wait_online("web", 1);
    let worker = pid(&list[0]).unwrap();
    let addr = tcp_address(&list);
    let daemon = home.daemon_pid().expect("daemon.pid");
    assert!(is_running(daemon));

    // A few descriptors more than it has open: the master keeps its copy of each connection
    // until the worker accepts it, and the worker holds them all.
    let limit = open_descriptors(daemon) + 8;
    let nofile = format!("--nofile={limit}:{limit}");
    let mut prlimit = Command::new("prlimit");
    prlimit.args(["--pid", &daemon.to_string(), &nofile]);
    let output = run(prlimit);
    assert!(output.status.success(), "prlimit: {output:?}");
    let holding = || {
        home.log("web", 0, "out")
            .matches("holding connection ")
            .count()
    };
    let pausing = || daemon_log(&home).matches("pausing accepts").count();

    // One connection at a time, until one is not accepted.
    let mut clients = Vec::new();
    let began = Instant::now();
    loop {
        assert!(
            clients.len() < 64,
            "accepts never paused after {} connections (limit {limit})\n{}",
            clients.len(),
            daemon_log(&home)
        );
        clients.push(send_request(addr));
        let n = clients.len();
        let paused = wait_until(
            Duration::from_secs(10),
            &format!("connection {n} is held by the worker, or accepts pause"),
            || match (pausing(), holding()) {
                (0, held) if held == n => Ok(false),
                (0, held) => Err(format!("{held} held")),
                _ => Ok(true),
            },
        );
        if paused {
            break;
        }
    }
    let paused_at = Instant::now();
    let cpu_before = cpu_time(daemon);
    // The pause came with the last free descriptor taken (the next accept fails at once) or with
    // the next connection: each connection is either held by the worker or waits in the queue.
    let held = wait_until(
        Duration::from_secs(10),
        "every connection is held by the worker or queued",
        || {
            let (held, queued) = (holding(), accept_queue(addr));
            if held + queued == clients.len() {
                Ok(held)
            } else {
                Err(format!("{held} held, {queued} queued of {}", clients.len()))
            }
        },
    );
    // A few more wait in the queue, fewer than the descriptors the worker will give back: when
    // it takes its connections, every waiting one is accepted in one go.
    for _ in 0..3 {
        clients.push(send_request(addr));
    }
    let queued = clients.len() - held;
    assert!(
        (3..=held).contains(&queued),
        "{held} connections held at a limit of {limit}, {queued} queued"
    );
    wait_until(
        Duration::from_secs(10),
        "the new connections are queued",
        || match accept_queue(addr) {
            n if n == queued => Ok(()),
            n => Err(format!("{n} of {queued} queued")),
        },
    );
    // Paused, for a while: no client is answered, the pause is logged once, and the master does
    // not spin on its listening socket.
    let floor = Duration::from_secs(1);
    wait_until(
        Duration::from_secs(10),
        "a second of paused accepts",
        || {
            for (n, client) in clients.iter().enumerate() {
                assert_unanswered(client, n);
            }
            assert_eq!(holding(), held);
            assert_eq!(accept_queue(addr), queued);
            let log = daemon_log(&home);
            assert_eq!(log.matches("pausing accepts").count(), 1, "{log}");
            assert!(!log.contains("accepting connections again"), "{log}");
            if paused_at.elapsed() >= floor {
                Ok(())
            } else {
                Err(format!("{:?} so far", paused_at.elapsed()))
            }
        },
    );
    let wall = paused_at.elapsed();
    let cpu = cpu_time(daemon).saturating_sub(cpu_before);
    assert!(
        cpu * 5 < wall,
        "the daemon used {cpu:?} of CPU in {wall:?} with accepts paused"
    );

    home.file("release", "");
    for (n, mut client) in clients.into_iter().enumerate() {
        client.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut answer = Vec::new();
        client
            .read_to_end(&mut answer)
            .unwrap_or_else(|e| panic!("client {n}: {e} (got {answer:?})"));
        assert_eq!(pid_in_answer(&answer), Ok(worker), "client {n}");
    }
    let log = wait_daemon_log(&home, "accepting connections again, after ");
    let elapsed = began.elapsed();
    assert_eq!(log.matches("pausing accepts").count(), 1, "{log}");
    let attempts: u128 = log
        .split("accepting connections again, after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of failed attempts in:\n{log}"));
    // A try every 100 ms, not more often.
    assert!(
        attempts >= 1 && attempts * 50 <= elapsed.as_millis() + 100,
        "{attempts} failed attempts in {elapsed:?}"
    );
    home.assert_daemon_answers();
    assert_eq!(home.instances("web").len(), 1);
    assert_eq!(pids_of(&home.instances("web")), vec![worker]);
}

// ---- the channel ----

#[test]
fn every_app_has_a_channel_even_without_listen() {
    let home = Home::new();
    let script = fixture(&home, "channel.py", CHANNEL_PY);
    home.ok(&["start", arg(&script), "-i", "2", "--min-uptime", "200ms"]);
    home.wait_online("channel", 2);
    for index in 0..2 {
        home.wait_log("channel", index, "out", "said hello\n");
        wait_daemon_log(
            &home,
            &format!("app 'channel' instance {index} says: {{\"hello\":1}}"),
        );
    }
    let list = home.instances("channel");
    assert!(list.iter().all(|i| restarts(i) == 0), "{}", show(&list));
    assert!(list.iter().all(|i| listen_of(i).is_empty()));
    home.ok(&["delete", "channel"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn going_down_starts_the_replacement_at_once_and_lets_the_old_process_finish() {
    let home = Home::new();
    start_web(
        &home,
        "web",
        Lb::Shared,
        &[
            "--listen",
            "127.0.0.1:0",
            "--wait-ready",
            "--kill-timeout",
            "5s",
            "-e",
            "MODE=going-down",
        ],
    );
    let first = home.wait_online("web", 1);
    let old = pid(&first[0]).unwrap();
    let id = first[0]["id"].as_u64().unwrap();
    let addr = tcp_address(&first);

    home.ok(&["signal", "SIGUSR1", "web"]);
    let both = home.wait_app(
        Duration::from_secs(20),
        "web",
        "a new online process and the old one draining",
        |list| {
            list.len() == 2
                && list
                    .iter()
                    .any(|i| pid(i) == Some(old) && status(i) == "draining")
                && list
                    .iter()
                    .any(|i| pid(i).is_some_and(|p| p != old) && status(i) == "online")
        },
    );
    assert!(both.iter().all(|i| i["id"] == id && i["instance"] == 0));
    let new = pids_of(&both).into_iter().find(|&p| p != old).unwrap();
    let answered = get(addr).unwrap_or_else(|e| panic!("while draining: {e}"));
    assert!([old, new].contains(&answered), "{answered}");

    let list = home.wait_app(
        Duration::from_secs(20),
        "web",
        "only the new process is left",
        |list| list.len() == 1 && pid(&list[0]) == Some(new),
    );
    assert_eq!(status(&list[0]), "online");
    assert_eq!(restarts(&list[0]), 1, "{}", show(&list));
    assert_nothing_runs_in(old);
    let log = wait_daemon_log(
        &home,
        &format!("draining pid {old} of instance {id} exited with code 0"),
    );
    assert!(log.contains(&format!("(pid {old}) is going down (asked to by SIGUSR1)")));
    assert!(!log.contains("SIGKILL"), "it exited by itself:\n{log}");
    assert_eq!(get(addr), Ok(new));

    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn going_down_at_every_start_still_ends_errored() {
    let home = Home::new();
    let script = fixture(&home, "downer.py", GOING_DOWN_AT_ONCE_PY);
    home.ok(&[
        "start",
        arg(&script),
        "--max-restarts",
        "2",
        "--min-uptime",
        "5s",
    ]);
    let list = home.wait_app(Duration::from_secs(20), "downer", "errored", |list| {
        list.len() == 1 && status(&list[0]) == "errored"
    });
    assert_eq!(restarts(&list[0]), 2, "{}", show(&list));
    assert_eq!(pid(&list[0]), None);
    wait_until(Duration::from_secs(10), "three starts are logged", || {
        let out = home.log("downer", 0, "out");
        if out.matches("going down at once").count() == 3 {
            Ok(())
        } else {
            Err(out)
        }
    });
    assert!(home.ok(&["ls"]).contains("crash loop"));
    home.ok(&["delete", "downer"]);
    assert_groups_gone(&home.recorded_pgids());
}

/// Instance 1 of three breaks its channel (MODE says how) once: only it is ended and restarted.
fn bad_channel_input(mode: &str, problem: &str) {
    let home = Home::new();
    let env = format!("MODE={mode}");
    start_web(
        &home,
        "bad",
        Lb::Shared,
        &[
            "-i",
            "3",
            "--listen",
            "127.0.0.1:0",
            "--wait-ready",
            "-e",
            &env,
            "-e",
            "BAD_INSTANCE=1",
        ],
    );
    let marker = home.work().join("bad-1.pid");
    let culprit: u32 = wait_until(
        Duration::from_secs(20),
        "instance 1 breaks its channel",
        || {
            std::fs::read_to_string(&marker)
                .map_err(|e| e.to_string())?
                .trim()
                .parse::<u32>()
                .map_err(|e| e.to_string())
        },
    );
    let list = home.wait_app(
        Duration::from_secs(20),
        "bad",
        "instance 1 restarted with a new pid, all online",
        |list| {
            list.len() == 3
                && list.iter().all(|i| status(i) == "online")
                && restarts(&list[1]) >= 1
                && pid(&list[1]).is_some_and(|p| p != culprit)
        },
    );
    let log = wait_daemon_log(
        &home,
        &format!("instance 1 (pid {culprit}) broke its channel protocol"),
    );
    assert!(log.contains(problem), "no {problem:?} in:\n{log}");
    assert!(!is_running(culprit));
    for index in [0, 2] {
        assert_eq!(restarts(&list[index]), 0, "{}", show(&list));
        let current = format!("serving pid={} ", pid(&list[index]).unwrap());
        let out = home.wait_log("bad", index as u32, "out", &current);
        assert_eq!(
            out.matches("serving pid=").count(),
            1,
            "instance {index} kept its first process: {out}"
        );
    }
    home.assert_daemon_answers();
    let addr = tcp_address(&list);
    get(addr).unwrap_or_else(|e| panic!("{e}"));

    home.ok(&["delete", "bad"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn garbage_on_the_channel_restarts_only_that_worker() {
    bad_channel_input("garbage", "not a worker message");
}

#[test]
fn a_huge_frame_on_the_channel_restarts_only_that_worker() {
    bad_channel_input("huge", "announced a frame of 1073741824 bytes");
}

#[test]
fn descriptors_on_the_channel_restart_only_that_worker() {
    bad_channel_input("fds", "file descriptor");
}

/// A worker that never says it is ready, under `--wait-ready --listen-timeout 300ms
/// --max-restarts 2` and the given min uptime: each start is ended at the listen timeout and
/// counts as a crash, so it ends errored, and `ls` and `describe` say why.
fn never_ready_ends_errored(min_uptime: &str) {
    let home = Home::new();
    let script = home.file("silent.py", SILENT_PY);
    home.ok(&[
        "start",
        arg(&script),
        "--wait-ready",
        "--listen-timeout",
        "300ms",
        "--max-restarts",
        "2",
        "--min-uptime",
        min_uptime,
    ]);
    let list = home.wait_app(Duration::from_secs(20), "silent", "errored", |list| {
        list.len() == 1 && status(&list[0]) == "errored"
    });
    assert_eq!(restarts(&list[0]), 2, "{}", show(&list));
    let log = daemon_log(&home);
    assert_eq!(
        log.matches("(300ms): ending it").count(),
        3,
        "one start and two restarts, each ended:\n{log}"
    );
    let why = "did not say it is ready within its listen timeout (300ms)";
    let table = home.ok(&["ls"]);
    assert!(table.contains(why), "{table}");
    let described = home.ok(&["describe", "silent"]);
    assert!(described.contains(why), "{described}");
    home.ok(&["delete", "silent"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn a_worker_never_ready_is_ended_after_its_listen_timeout_and_ends_errored() {
    never_ready_ends_errored("5s");
}

#[test]
fn a_worker_never_ready_is_a_crash_even_when_its_listen_timeout_exceeds_min_uptime() {
    never_ready_ends_errored("100ms");
}

// ---- proxy mode ----

/// An HTTP server that knows only `PORT`: one request per connection, answered with its pid; on
/// SIGTERM it stops accepting and finishes the requests it has.
const PORT_WEB_PY: &str = r#"
import http.server, os, signal, threading

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True
    def log_message(self, *args):
        pass

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = False

server = Server(("127.0.0.1", int(os.environ["PORT"])), Handler)
signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
print("serving pid=%d port=%s" % (os.getpid(), os.environ["PORT"]), flush=True)
server.serve_forever()
server.server_close()
"#;

fn start_proxied(home: &Home) -> (Vec<Value>, SocketAddr) {
    let script = fixture(home, "port_web.py", PORT_WEB_PY);
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "proxied",
        "-i",
        "2",
        "--lb",
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--min-uptime",
        "300ms",
        "--kill-timeout",
        "5s",
    ]);
    let list = home.wait_online("proxied", 2);
    let addr = tcp_address(&list);
    (list, addr)
}

#[test]
fn proxy_mode_relays_round_robin_to_workers_on_their_own_ports() {
    let home = Home::new();
    let (list, addr) = start_proxied(&home);
    let pids = pids_of(&list);
    // Each worker was told its own port, which is not the app's.
    for (i, pid) in pids.iter().enumerate() {
        let log = home.wait_log("proxied", i as u32, "out", &format!("serving pid={pid}"));
        assert!(!log.contains(&format!("port={}", addr.port())), "{log}");
    }
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let pid = get(addr).expect("an answer through the proxy");
        *answers.entry(pid).or_insert(0) += 1;
    }
    assert_eq!(answers.keys().copied().collect::<Vec<_>>(), {
        let mut sorted = pids.clone();
        sorted.sort_unstable();
        sorted
    });
    // Round robin: within one of even.
    assert!(
        answers.values().all(|&n| (19..=21).contains(&n)),
        "{answers:?}"
    );
    home.ok(&["delete", "proxied"]);
    assert_groups_gone(&home.recorded_pgids());
    assert!(
        get(addr).is_err(),
        "the proxy's address is closed with the app"
    );
}

#[test]
fn proxy_mode_reloads_under_load_without_a_failed_request() {
    let home = Home::new();
    let (list, addr) = start_proxied(&home);
    let initial = pids_of(&list);
    let load = Load::start(addr, 3, false);
    load.wait_answered(20);
    for round in 1..=5 {
        let out = home.ok(&["reload", "proxied"]);
        assert!(out.contains("online"), "reload {round}: {out}");
    }
    load.wait_answered(load.answered() + 20);
    let tally = load.finish();
    assert!(tally.failures().is_empty(), "{:?}", tally.failures());
    let now = pids_of(&home.wait_online("proxied", 2));
    assert!(
        now.iter().all(|p| !initial.contains(p)),
        "{now:?} vs {initial:?}"
    );
    home.ok(&["delete", "proxied"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn proxy_mode_loses_at_most_the_in_flight_requests_of_a_killed_worker() {
    let home = Home::new();
    let (list, addr) = start_proxied(&home);
    let victim = pids_of(&list)[0];
    let clients = 3;
    let load = Load::start(addr, clients, false);
    load.wait_answered(20);
    corral_sys::kill(victim, 9).unwrap();
    let after = home.wait_app(
        Duration::from_secs(20),
        "proxied",
        "a replacement online",
        |l| {
            l.len() == 2 && l.iter().all(|i| status(i) == "online") && !pids_of(l).contains(&victim)
        },
    );
    load.wait_answered(load.answered() + 20);
    let tally = load.finish();
    // Each client has at most one request in flight: only those can be lost.
    assert!(tally.failures().len() <= clients, "{:?}", tally.failures());
    assert!(
        tally.pids().contains(&pids_of(&after)[0]) || tally.pids().contains(&pids_of(&after)[1])
    );
    home.ok(&["delete", "proxied"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn proxy_mode_needs_a_listen_address() {
    let home = Home::new();
    let script = fixture(&home, "port_web.py", PORT_WEB_PY);
    let err = home.fails(&["start", arg(&script), "--lb", "proxy"]);
    assert!(err.contains("--listen"), "{err}");
    let err = home.fails(&[
        "start",
        arg(&script),
        "--lb",
        "round-the-houses",
        "--listen",
        "0",
    ]);
    assert!(err.contains("use rr, least-conn, shared or proxy"), "{err}");
}

// ---- sd_notify ----

/// A program that speaks only `sd_notify`: `STATUS`, then `READY=1`, on `$NOTIFY_SOCKET`.
const SD_NOTIFY_PY: &str = r#"
import os, socket, time
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"STATUS=warming up", address)
print("notifying ready, pid %d" % os.getpid(), flush=True)
s.sendto(b"READY=1", address)
while True:
    time.sleep(3600)
"#;

#[test]
fn a_program_that_speaks_sd_notify_is_ready_on_ready_1() {
    let home = Home::new();
    let script = fixture(&home, "notifier.py", SD_NOTIFY_PY);
    // Under --wait-ready only READY=1 makes it online; the timeout is long so that only the
    // notification can explain the status.
    home.ok(&[
        "start",
        arg(&script),
        "-n",
        "notifier",
        "-i",
        "2",
        "--wait-ready",
        "--listen-timeout",
        "60s",
    ]);
    let list = home.wait_online("notifier", 2);
    for instance in &list {
        assert_eq!(restarts(instance), 0, "{}", show(&list));
    }
    wait_daemon_log(&home, r#""sd_notify_status":"warming up""#);
    home.ok(&["delete", "notifier"]);
    assert_groups_gone(&home.recorded_pgids());
}
