//! End-to-end tests of clusters: listening sockets bound once by the master and shared with the
//! workers by socket activation, the worker channel (ready, going down, messages, bad input),
//! `--wait-ready` with its listen timeout, and rolling reloads with their rollback.
//!
//! The fixtures are python3 programs written into each test's own directory: `web.py`, an HTTP
//! server that answers every request with its pid, and `chan.py`, the worker's end of the channel.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

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

/// An HTTP server on the socket inherited at descriptor 3. Every answer's body is its pid;
/// HTTP/1.1 keep-alive unless the request says `Connection: close`.
///
/// On SIGTERM it closes its copy of the listening socket, answers one more request on each open
/// connection (with `Connection: close`), and exits 0. `MODE` picks more behaviour: `going-down`
/// says so on SIGUSR1 and exits 2 s later; `garbage`, `huge` and `fds` break the channel once
/// (the instance `BAD_INSTANCE`, shortly after it is ready). A file `mode` in the working directory
/// holding `broken` makes it exit 1 at once; holding `silent`, it never says it is ready.
const WEB_PY: &str = r#"
import os, selectors, signal, socket, sys, time
import chan

PID = os.getpid()
MODE = os.environ.get("MODE", "serve")
INSTANCE = os.environ.get("CORRAL_INSTANCE", "?")

def refuse(why):
    print("refusing to serve: " + why, flush=True)
    sys.exit(3)

for name, wanted in (("LISTEN_PID", str(PID)), ("LISTEN_FDS", "1"),
                     ("LISTEN_FDNAMES", "listen0"), ("CORRAL_CHANNEL_FD", "4"),
                     ("CORRAL_CHANNEL_PROTOCOL", "1")):
    if os.environ.get(name) != wanted:
        refuse("%s=%r, expected %r" % (name, os.environ.get(name), wanted))

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

listener = socket.socket(fileno=3)
if listener.type != socket.SOCK_STREAM:
    refuse("descriptor 3 is not a stream socket")
listener.setblocking(False)

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
print("serving pid=%d instance=%s mode=%s" % (PID, INSTANCE, MODE), flush=True)

if MODE in ("garbage", "huge", "fds") and INSTANCE == os.environ.get("BAD_INSTANCE"):
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
            socket.send_fds(chan.channel(), [b"x"], [0])
        print("broke the channel", flush=True)

body = str(PID).encode()
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
connections = {}
going_down_since = None
stopped_since = None

def drop(conn):
    selector.unregister(conn)
    del connections[conn]
    conn.close()

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
        selector.unregister(listener)
        listener.close()
        print("no longer accepting, pid %d" % PID, flush=True)
    if stopped_since is not None and (not connections or now - stopped_since > 3.0):
        break
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

print("exiting, pid %d" % PID, flush=True)
sys.exit(0)
"#;

/// Checks that its channel is an open Unix stream socket at the advertised descriptor, says hello
/// on it, then idles.
const CHANNEL_PY: &str = r#"
import os, socket, stat, sys, time
import chan

problems = []
for name, wanted in (("CORRAL_CHANNEL_FD", "3"), ("CORRAL_CHANNEL_PROTOCOL", "1"),
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

/// The addresses an instance of `ls --json` listens on.
fn listen_of(instance: &Value) -> Vec<String> {
    instance["listen"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The one TCP address an app listens on, as `ls --json` shows it for each of its instances.
fn tcp_address(instances: &[Value]) -> SocketAddr {
    let listen = listen_of(&instances[0]);
    for instance in instances {
        assert_eq!(listen_of(instance), listen, "{}", show(instances));
    }
    assert_eq!(listen.len(), 1, "{listen:?}");
    listen[0]
        .parse()
        .unwrap_or_else(|e| panic!("{:?} is not a socket address: {e}", listen[0]))
}

fn pids_of(instances: &[Value]) -> Vec<u32> {
    instances.iter().filter_map(pid).collect()
}

fn ids_of(instances: &[Value]) -> Vec<u64> {
    instances.iter().filter_map(|i| i["id"].as_u64()).collect()
}

fn daemon_log(home: &Home) -> String {
    std::fs::read_to_string(home.path().join("daemon.log")).unwrap_or_default()
}

/// Waits until daemon.log holds `needle`; returns it.
fn wait_daemon_log(home: &Home, needle: &str) -> String {
    wait_until(
        Duration::from_secs(20),
        &format!("daemon.log contains {needle:?}"),
        || {
            let text = daemon_log(home);
            if text.contains(needle) {
                Ok(text)
            } else {
                Err(text)
            }
        },
    )
}

const CLOSE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: corral-test\r\nConnection: close\r\n\r\n";
const KEEP_ALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: corral-test\r\n\r\n";
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The pid in a whole answer to a `Connection: close` request.
fn pid_in_answer(answer: &[u8]) -> Result<u32, String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("an answer without the end of its head: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200 OK\r\n") {
        return Err(format!("not a 200 answer: {text:?}"));
    }
    body.parse()
        .map_err(|e| format!("the body is no pid ({e}): {text:?}"))
}

/// One request on a new connection, the answer read until the server closes it.
fn exchange(mut stream: impl Read + Write) -> Result<u32, String> {
    stream
        .write_all(CLOSE_REQUEST)
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading the answer: {e} (got {answer:?})"))?;
    pid_in_answer(&answer)
}

/// One request to a TCP address on a new connection; the pid that answered.
fn get(addr: SocketAddr) -> Result<u32, String> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    exchange(stream)
}

/// One request to a Unix socket on a new connection; the pid that answered.
fn get_unix(path: &Path) -> Result<u32, String> {
    let stream =
        UnixStream::connect(path).map_err(|e| format!("connecting to {}: {e}", path.display()))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    exchange(stream)
}

/// A client that keeps its connection open between requests until the server says
/// `Connection: close`.
struct KeepAliveClient {
    addr: SocketAddr,
    connection: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    opened: usize,
}

impl KeepAliveClient {
    fn new(addr: SocketAddr) -> KeepAliveClient {
        KeepAliveClient {
            addr,
            connection: None,
            opened: 0,
        }
    }

    fn get(&mut self) -> Result<u32, String> {
        let result = self.exchange();
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    fn exchange(&mut self) -> Result<u32, String> {
        if self.connection.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)
                .map_err(|e| format!("connecting to {}: {e}", self.addr))?;
            stream
                .set_read_timeout(Some(IO_TIMEOUT))
                .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
                .map_err(|e| e.to_string())?;
            self.connection = Some(BufReader::new(stream));
            self.opened += 1;
        }
        let number = self.opened;
        let connection = self.connection.as_mut().expect("connected above");
        connection
            .get_mut()
            .write_all(KEEP_ALIVE_REQUEST)
            .map_err(|e| format!("sending a request on connection {number}: {e}"))?;
        let mut head = String::new();
        let mut length = None;
        let mut close = false;
        loop {
            let mut line = String::new();
            let n = connection
                .read_line(&mut line)
                .map_err(|e| format!("reading a head on connection {number}: {e} ({head:?})"))?;
            if n == 0 {
                return Err(format!(
                    "connection {number} closed before the answer ended: {head:?}"
                ));
            }
            if line == "\r\n" {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = value.trim().parse::<usize>().ok();
            }
            if lower.trim_end() == "connection: close" {
                close = true;
            }
            head.push_str(&line);
        }
        let length = length.ok_or_else(|| format!("no Content-Length in {head:?}"))?;
        let mut body = vec![0; length];
        connection
            .read_exact(&mut body)
            .map_err(|e| format!("reading a body on connection {number}: {e}"))?;
        if close {
            self.connection = None;
        }
        let mut whole = head.into_bytes();
        whole.extend_from_slice(b"\r\n");
        whole.extend_from_slice(&body);
        pid_in_answer(&whole)
    }
}

/// What the clients of a [`Load`] saw.
#[derive(Debug, Default)]
struct Tally {
    answered: AtomicUsize,
    /// Keep-alive connections opened.
    connections: AtomicUsize,
    failures: Mutex<Vec<String>>,
    pids: Mutex<BTreeSet<u32>>,
}

impl Tally {
    fn pids(&self) -> BTreeSet<u32> {
        self.pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Client threads sending requests back to back until stopped (also when dropped by a failing
/// test) or for at most [`Load::LIMIT`].
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    const LIMIT: Duration = Duration::from_secs(60);

    fn start(addr: SocketAddr, clients: usize, keep_alive: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let threads = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                let tally = tally.clone();
                thread::spawn(move || {
                    let began = Instant::now();
                    let mut client = keep_alive.then(|| KeepAliveClient::new(addr));
                    while !stop.load(Ordering::SeqCst) && began.elapsed() < Load::LIMIT {
                        let result = match &mut client {
                            Some(client) => client.get(),
                            None => get(addr),
                        };
                        match result {
                            Ok(pid) => {
                                tally
                                    .pids
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .insert(pid);
                                tally.answered.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => tally
                                .failures
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(e),
                        }
                    }
                    if let Some(client) = client {
                        tally.connections.fetch_add(client.opened, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Load {
            stop,
            tally,
            threads,
        }
    }

    fn answered(&self) -> usize {
        self.tally.answered.load(Ordering::SeqCst)
    }

    /// Waits until the clients have had at least `count` answers in all.
    fn wait_answered(&self, count: usize) {
        wait_until(Duration::from_secs(20), "answers for the clients", || {
            if self.answered() >= count {
                Ok(())
            } else {
                Err(format!(
                    "{} of {count} answered; failures: {:?}",
                    self.answered(),
                    self.tally.failures()
                ))
            }
        });
    }

    /// Stops the clients and waits for them.
    fn finish(mut self) -> Arc<Tally> {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            thread.join().expect("a client thread panicked");
        }
        self.tally.clone()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts `web.py` as `name` with `args` after the script.
fn start_web(home: &Home, name: &str, args: &[&str]) -> PathBuf {
    let script = fixture(home, "web.py", WEB_PY);
    let mut all = vec!["start", arg(&script), "-n", name];
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

#[test]
fn a_unix_socket_listener_serves_and_is_removed_with_the_app() {
    let home = Home::new();
    let socket = home.work().join("app.sock");
    let address = format!("unix:{}", socket.display());
    start_web(&home, "sock", &["--listen", &address, "--wait-ready"]);
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
fn reload_under_load(keep_alive: bool) {
    let home = Home::new();
    start_web(
        &home,
        "web",
        &[
            "-i",
            "2",
            "--listen",
            "127.0.0.1:0",
            "--wait-ready",
            "--kill-timeout",
            "5s",
        ],
    );
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
        let out = home.ok(&["reload", "web"]);
        assert!(out.contains("online"), "reload {round}: {out}");
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

    home.ok(&["delete", "web"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn reload_under_load_loses_no_request() {
    reload_under_load(false);
}

#[test]
fn reload_under_load_loses_no_request_on_keep_alive_connections() {
    reload_under_load(true);
}

#[test]
fn a_reload_whose_new_process_exits_rolls_back_to_the_old_ones() {
    let home = Home::new();
    start_web(
        &home,
        "web",
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
    assert!(err.contains("shared or proxy"), "{err}");
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
