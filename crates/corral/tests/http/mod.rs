//! An HTTP/1.1 client for the cluster tests, just enough to tell which worker answered: one
//! request per connection, keep-alive, and a [`Load`] of client threads that counts answers and
//! failures. An answer names its worker by pid: the whole body is the pid, or the body contains
//! `(pid N)`.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Home, arg, pid, show, wait_until};

pub const CLOSE_REQUEST: &[u8] =
    b"GET / HTTP/1.1\r\nHost: corral-test\r\nConnection: close\r\n\r\n";
pub const KEEP_ALIVE_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: corral-test\r\n\r\n";
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The pid in a whole answer to a `Connection: close` request.
pub fn pid_in_answer(answer: &[u8]) -> Result<u32, String> {
    let text = String::from_utf8_lossy(answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("an answer without the end of its head: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200 OK\r\n") {
        return Err(format!("not a 200 answer: {text:?}"));
    }
    let pid = match body.split_once("(pid ") {
        Some((_, rest)) => rest.split(')').next().unwrap_or_default(),
        None => body.trim(),
    };
    pid.parse()
        .map_err(|e| format!("the body names no pid ({e}): {text:?}"))
}

/// One request on a new connection: the whole answer, read until the server closes it.
pub fn answer(mut stream: impl Read + Write) -> Result<Vec<u8>, String> {
    stream
        .write_all(CLOSE_REQUEST)
        .map_err(|e| format!("sending the request: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .map_err(|e| format!("reading the answer: {e} (got {answer:?})"))?;
    Ok(answer)
}

/// One request on a new connection; the pid that answered.
pub fn exchange(stream: impl Read + Write) -> Result<u32, String> {
    pid_in_answer(&answer(stream)?)
}

/// A new TCP connection to `addr`, with time limits on reads and writes.
pub fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(IO_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    Ok(stream)
}

/// One request to a TCP address on a new connection; the pid that answered.
pub fn get(addr: SocketAddr) -> Result<u32, String> {
    exchange(connect(addr)?)
}

/// One request to a Unix socket on a new connection; the pid that answered.
pub fn get_unix(path: &Path) -> Result<u32, String> {
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
pub struct KeepAliveClient {
    addr: SocketAddr,
    connection: Option<BufReader<TcpStream>>,
    /// Connections opened so far.
    pub opened: usize,
}

impl KeepAliveClient {
    pub fn new(addr: SocketAddr) -> KeepAliveClient {
        KeepAliveClient {
            addr,
            connection: None,
            opened: 0,
        }
    }

    pub fn get(&mut self) -> Result<u32, String> {
        let result = self.exchange();
        if result.is_err() {
            self.connection = None;
        }
        result
    }

    fn exchange(&mut self) -> Result<u32, String> {
        if self.connection.is_none() {
            self.connection = Some(BufReader::new(connect(self.addr)?));
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
pub struct Tally {
    pub answered: AtomicUsize,
    /// Keep-alive connections opened.
    pub connections: AtomicUsize,
    pub failures: Mutex<Vec<String>>,
    pub pids: Mutex<BTreeSet<u32>>,
}

impl Tally {
    pub fn pids(&self) -> BTreeSet<u32> {
        self.pids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Client threads sending requests back to back until stopped (also when dropped by a failing
/// test) or for at most [`Load::LIMIT`].
pub struct Load {
    stop: Arc<AtomicBool>,
    pub tally: Arc<Tally>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    pub const LIMIT: Duration = Duration::from_secs(60);

    pub fn start(addr: SocketAddr, clients: usize, keep_alive: bool) -> Load {
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

    pub fn answered(&self) -> usize {
        self.tally.answered.load(Ordering::SeqCst)
    }

    /// Waits until the clients have had at least `count` answers in all.
    pub fn wait_answered(&self, count: usize) {
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
    pub fn finish(mut self) -> Arc<Tally> {
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

// ---- where an app listens, and who serves it ----

/// The addresses an instance of `ls --json` listens on.
pub fn listen_of(instance: &Value) -> Vec<String> {
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
pub fn tcp_address(instances: &[Value]) -> SocketAddr {
    let listen = listen_of(&instances[0]);
    for instance in instances {
        assert_eq!(listen_of(instance), listen, "{}", show(instances));
    }
    assert_eq!(listen.len(), 1, "{listen:?}");
    listen[0]
        .parse()
        .unwrap_or_else(|e| panic!("{:?} is not a socket address: {e}", listen[0]))
}

pub fn pids_of(instances: &[Value]) -> Vec<u32> {
    instances.iter().filter_map(pid).collect()
}

/// The instance ids of `ls --json` rows.
pub fn ids_of(instances: &[Value]) -> Vec<u64> {
    instances.iter().filter_map(|i| i["id"].as_u64()).collect()
}

/// The daemon's log so far.
pub fn daemon_log(home: &Home) -> String {
    std::fs::read_to_string(home.path().join("daemon.log")).unwrap_or_default()
}

/// Waits until daemon.log holds `needle`; returns it.
pub fn wait_daemon_log(home: &Home, needle: &str) -> String {
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

/// Sends requests until every pid of `expected` has answered (and no other pid did).
pub fn answered_by_all(expected: &[u32], mut get: impl FnMut() -> Result<u32, String>) {
    let expected: BTreeSet<u32> = expected.iter().copied().collect();
    assert!(!expected.is_empty(), "no worker to ask");
    let mut seen = BTreeSet::new();
    wait_until(
        Duration::from_secs(20),
        "every worker answered",
        || -> Result<(), String> {
            let pid = get()?;
            if !expected.contains(&pid) {
                return Err(format!("{pid} answered; the workers are {expected:?}"));
            }
            seen.insert(pid);
            if seen == expected {
                Ok(())
            } else {
                Err(format!("answered so far: {seen:?} of {expected:?}"))
            }
        },
    );
}

/// `rounds` reloads of `app` while `load` runs, each new process serving before the next round;
/// not one request may fail. Returns what the clients saw.
pub fn reload_rounds(home: &Home, app: &str, load: Load, rounds: usize) -> Arc<Tally> {
    load.wait_answered(30);
    for round in 1..=rounds {
        let answered = load.answered();
        home.ok(&["reload", app]);
        load.wait_answered(answered + 30);
        assert!(
            load.tally.failures().is_empty(),
            "round {round}: {:?}",
            load.tally.failures()
        );
    }
    let tally = load.finish();
    assert!(tally.failures().is_empty(), "{:?}", tally.failures());
    tally
}

/// A loopback port that is free now: the kernel's pick, let go at once.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

// ---- Node.js fixtures ----

/// The `node` under test: `$CORRAL_TEST_NODE` when set (CI runs the Node tests on 18 and 22
/// that way), else `node` from `PATH`.
pub fn node() -> String {
    std::env::var("CORRAL_TEST_NODE").unwrap_or_else(|_| "node".to_string())
}

/// Writes `content` as `<name>.js` and starts it on the `node` under test as app `name`, with
/// `args` after the script.
pub fn start_js(home: &Home, name: &str, content: &str, args: &[&str]) {
    let script = home.file(&format!("{name}.js"), content);
    let node = node();
    let mut all = vec!["start", arg(&script), "-n", name, "--interpreter", &node];
    all.extend_from_slice(args);
    home.ok(&all);
}
