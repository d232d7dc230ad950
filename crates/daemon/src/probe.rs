//! Running one health probe: an HTTP `GET`, a TCP connect, or a command, each within a deadline.
//!
//! It knows nothing of apps, intervals or failure thresholds: the supervisor decides when to
//! probe and what a failure means; this module only answers "healthy, or why not".
//!
//! # How it works
//! HTTP and TCP probes connect to the instance (names resolved through tokio's lookup) and, for
//! HTTP, speak just enough HTTP/1.1 to read a status line: one request, the head of the answer
//! read up to [`MAX_HEAD`] bytes, never a body. [`http_on`] speaks the same request over any
//! connected stream, so the daemon can also probe one specific worker over a connection it hands
//! to that worker ([`loopback_pair`]).
//!
//! An exec probe is a child of the daemon, in its own process group. The daemon's reaper reaps
//! every pid with `waitpid(-1)`, so the probe cannot wait for its child itself: it registers the
//! pid with [`Exits`], and the reaper hands the exit over through [`Exits::claim`].

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::{Pin, pin};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use corral_proto::Probe;
use corral_proto::signal::Signal;
use corral_sys::ExitKind;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

/// Most bytes of an HTTP answer read: its status line and headers. The body is never read.
pub const MAX_HEAD: usize = 16 * 1024;
/// Bytes of an exec probe's output kept (the end of it), for the reason it failed.
const OUTPUT_TAIL: usize = 512;
/// How long an exec probe killed at its deadline may take to be reaped before the probe gives up
/// waiting (its exit is still claimed, and dropped, whenever the reaper sees it).
const KILL_GRACE: Duration = Duration::from_secs(1);
/// How long output still in the pipes is read once an exec probe has exited.
const OUTPUT_GRACE: Duration = Duration::from_millis(100);
/// Where an exec probe's program is looked for when its environment has no `PATH` (what a shell
/// would use on most systems).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The probe passed.
    Healthy,
    /// The probe failed; the text says why, for a person (`HTTP 503 Service Unavailable from
    /// http://127.0.0.1:8080/healthz`, `connection refused by 127.0.0.1:8080`).
    Unhealthy(String),
}

/// Where an exec probe runs.
#[derive(Debug, Clone)]
pub struct ExecContext {
    /// The working directory (the app's).
    pub cwd: PathBuf,
    /// The complete environment: nothing of the daemon's own is inherited.
    pub env: BTreeMap<String, String>,
}

/// Routes the exits of processes the daemon starts for itself (exec probes) to whoever waits for
/// them, since the daemon's reaper reaps every pid.
#[derive(Debug, Clone, Default)]
pub struct Exits {
    inner: Arc<Mutex<Waiting>>,
}

#[derive(Debug, Default)]
struct Waiting {
    by_pid: HashMap<u32, oneshot::Sender<ExitKind>>,
    /// Tests have no daemon reaper: this tells theirs which pid to wait for.
    #[cfg(test)]
    on_spawn: Option<std::sync::mpsc::Sender<u32>>,
}

impl Exits {
    /// Called by the reaper for every reaped pid: true when it was an exit someone waits for
    /// (then the supervisor is not told).
    pub fn claim(&self, pid: u32, exit: ExitKind) -> bool {
        let Some(waiter) = self.lock().by_pid.remove(&pid) else {
            return false;
        };
        // The waiter may have given up (its probe was cancelled): the exit was still ours.
        let _ = waiter.send(exit);
        true
    }

    /// Spawns `command` and registers its pid, returning where its exit will arrive.
    fn spawn(
        &self,
        command: &mut Command,
    ) -> io::Result<(std::process::Child, oneshot::Receiver<ExitKind>)> {
        // The reaper may reap the child the moment it exists, before its pid is registered, and
        // the exit would then go to the supervisor as a stranger's and be lost. So the lock is
        // held from before the fork until the pid is in the map, and `claim`, which the reaper
        // calls only after `waitpid` has returned, takes the same lock: any claim of this pid
        // comes after the registration. (On the daemon's single thread nothing can run between
        // the two anyway; the lock makes it true on any runtime, and in tests.) The lock is never
        // held across an await, and `spawn` only waits for the child's exec.
        let mut waiting = self.lock();
        let child = command.spawn()?;
        let (sender, receiver) = oneshot::channel();
        waiting.by_pid.insert(child.id(), sender);
        #[cfg(test)]
        if let Some(on_spawn) = &waiting.on_spawn {
            let _ = on_spawn.send(child.id());
        }
        drop(waiting);
        Ok((child, receiver))
    }

    fn lock(&self) -> MutexGuard<'_, Waiting> {
        // A panic elsewhere while holding the lock leaves the map consistent (one insert or one
        // remove): keep using it.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Runs one probe with its deadline. Never panics, never blocks the runtime; an exec probe still
/// running at the deadline is killed with its whole process group (SIGKILL) and reaped.
pub async fn run(probe: &Probe, exec: &ExecContext, exits: &Exits, timeout: Duration) -> Outcome {
    let exchange = async {
        match probe {
            Probe::Http { host, port, path } => match connect(host, *port).await {
                Ok(stream) => http_on(stream, host, *port, path).await,
                Err(why) => Outcome::Unhealthy(why),
            },
            Probe::Tcp { host, port } => match connect(host, *port).await {
                Ok(_) => Outcome::Healthy,
                Err(why) => Outcome::Unhealthy(why),
            },
            Probe::Exec { argv } => run_exec(probe, argv, exec, exits, timeout).await,
        }
    };
    if matches!(probe, Probe::Exec { .. }) {
        // It keeps its own deadline: it must kill and reap its process group, not just stop.
        return exchange.await;
    }
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| {
            Outcome::Unhealthy(format!("no answer within {} from {probe}", human(timeout)))
        })
}

/// `host:port`, with a bare IPv6 address in brackets.
fn authority(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Connects to `host` (a name, an IPv4 address, or an IPv6 one with or without brackets), trying
/// each address it resolves to in turn.
async fn connect(host: &str, port: u16) -> Result<tokio::net::TcpStream, String> {
    let target = authority(host, port);
    let name = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host((name, port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut other = None;
    for address in &addresses {
        match tokio::net::TcpStream::connect(address).await {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => other = Some(e),
        }
    }
    Err(match other {
        _ if addresses.is_empty() => format!("{host} resolves to no address"),
        Some(e) => format!("cannot connect to {target}: {e}"),
        None => format!("connection refused by {target}"),
    })
}

/// An HTTP GET over an already connected stream (the daemon also delivers probes to one specific
/// worker over a connection it hands to that worker): 2xx/3xx healthy; anything else, a malformed
/// or missing status line, or the stream closing early, unhealthy with the reason. Reads at most
/// [`MAX_HEAD`] bytes (the status line and headers), never the body. Sends `Host`,
/// `Connection: close`, `User-Agent: corral-health`.
pub async fn http_on<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    host: &str,
    port: u16,
    path: &str,
) -> Outcome {
    let authority = authority(host, port);
    let url = format!("http://{authority}{path}");
    // Both go into the request line and a header as they are: nothing may end a line early.
    let unsafe_text = |text: &str| text.bytes().any(|b| b.is_ascii_control() || b == b' ');
    if !path.starts_with('/') || unsafe_text(path) || unsafe_text(host) {
        return Outcome::Unhealthy(format!(
            "{url} is not a URL an HTTP probe can ask for: write http://HOST:PORT/path"
        ));
    }
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: corral-health\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    );
    if let Err(e) = send(&mut stream, request.as_bytes()).await {
        return Outcome::Unhealthy(format!("cannot send the request to {url}: {e}"));
    }
    match read_head(&mut stream).await {
        Ok(Status { code, reason }) => {
            if (200..400).contains(&code) {
                Outcome::Healthy
            } else if reason.is_empty() {
                Outcome::Unhealthy(format!("HTTP {code} from {url}"))
            } else {
                Outcome::Unhealthy(format!("HTTP {code} {reason} from {url}"))
            }
        }
        Err(why) => Outcome::Unhealthy(format!("{why} from {url}")),
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// The status of a final (not 1xx) HTTP answer.
#[derive(Debug, PartialEq, Eq)]
struct Status {
    code: u16,
    /// The reason phrase (`Service Unavailable`), possibly empty.
    reason: String,
}

/// How far the head of an answer has arrived.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// No complete status line yet.
    NoStatus,
    /// A status line, but not yet the empty line that ends the headers.
    InHeaders(Status),
    /// The status line and all the headers of the final answer.
    Complete(Status),
    /// Not HTTP: the text says what came.
    Malformed(String),
}

/// Reads the head of the answer, at most [`MAX_HEAD`] bytes, and returns its status, or why
/// there is none.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Status, String> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let seen = parse_head(&head);
        let full = head.len() >= MAX_HEAD;
        match seen {
            Head::Complete(status) => return Ok(status),
            Head::Malformed(why) => return Err(why),
            // The status is what a probe asks; headers too big to read do not change it.
            Head::InHeaders(status) if full && status.code >= 200 => return Ok(status),
            Head::InHeaders(_) | Head::NoStatus if full => {
                return Err(format!(
                    "no final status line in the first {} KiB of the answer",
                    MAX_HEAD / 1024
                ));
            }
            Head::InHeaders(_) | Head::NoStatus => {}
        }
        let room = (MAX_HEAD - head.len()).min(chunk.len());
        let read = match stream.read(&mut chunk[..room]).await {
            Ok(read) => read,
            Err(e) => return Err(format!("cannot read the answer ({e})")),
        };
        if read == 0 {
            return Err(match parse_head(&head) {
                _ if head.is_empty() => "the connection closed without an answer".to_string(),
                Head::InHeaders(status) => format!(
                    "the connection closed in the middle of the headers after HTTP {}",
                    status.code
                ),
                _ => "the connection closed in the middle of the status line".to_string(),
            });
        }
        head.extend_from_slice(&chunk[..read]);
    }
}

/// What the bytes received so far say. Informational (1xx) answers before the final one are
/// skipped, as a client must.
fn parse_head(mut bytes: &[u8]) -> Head {
    loop {
        let Some(end_of_line) = bytes.iter().position(|&b| b == b'\n') else {
            // Refuse a stranger (an SSH banner, a TLS alert) at once rather than at the deadline.
            let prefix = &bytes[..bytes.len().min(5)];
            return if b"HTTP/".starts_with(prefix) {
                Head::NoStatus
            } else {
                Head::Malformed(not_http(bytes))
            };
        };
        let line = &bytes[..end_of_line];
        let Some(status) = parse_status_line(line.strip_suffix(b"\r").unwrap_or(line)) else {
            return Head::Malformed(not_http(line));
        };
        let Some(end) = end_of_headers(bytes, end_of_line + 1) else {
            return Head::InHeaders(status);
        };
        if status.code >= 200 {
            return Head::Complete(status);
        }
        bytes = &bytes[end..];
    }
}

/// Where the headers that start at `from` end: just past their empty line.
fn end_of_headers(bytes: &[u8], mut from: usize) -> Option<usize> {
    while let Some(offset) = bytes.get(from..)?.iter().position(|&b| b == b'\n') {
        let line = &bytes[from..from + offset];
        from += offset + 1;
        if line.is_empty() || line == b"\r" {
            return Some(from);
        }
    }
    None
}

/// `HTTP/1.1 503 Service Unavailable` (the reason phrase may be empty or missing).
fn parse_status_line(line: &[u8]) -> Option<Status> {
    let rest = line.strip_prefix(b"HTTP/")?;
    let space = rest.iter().position(|&b| b == b' ')?;
    let version = &rest[..space];
    if version.is_empty() || !version.iter().all(|b| b.is_ascii_digit() || *b == b'.') {
        return None;
    }
    let rest = &rest[space + 1..];
    let digits = rest.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    let reason = match &rest[3..] {
        [] => String::new(),
        [b' ', reason @ ..] => String::from_utf8_lossy(reason).trim().to_string(),
        _ => return None,
    };
    (code >= 100).then_some(Status { code, reason })
}

/// What came instead of HTTP, shown safely and briefly.
fn not_http(bytes: &[u8]) -> String {
    let shown: String = bytes.escape_ascii().to_string().chars().take(60).collect();
    format!("an answer that is not HTTP (\"{shown}\")")
}

/// A connected pair of loopback TCP sockets: the first (std, non-blocking, close-on-exec) to hand
/// to a worker as if the master had accepted it, the second (tokio) to speak the probe on. Must
/// be called within a tokio runtime. Connecting to a fresh loopback listener completes at once,
/// so nothing here waits.
pub fn loopback_pair() -> io::Result<(std::net::TcpStream, tokio::net::TcpStream)> {
    let listener = std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    let probe_end = std::net::TcpStream::connect(listener.local_addr()?)?;
    let ours = probe_end.local_addr()?;
    // Between the bind and the connect, any local process could have connected to the port:
    // hand over only the connection that came from our own socket.
    let worker_end = loop {
        let (stream, peer) = listener.accept()?;
        if peer == ours {
            break stream;
        }
    };
    // std opens every descriptor close-on-exec already; workers expect non-blocking sockets.
    worker_end.set_nonblocking(true)?;
    probe_end.set_nonblocking(true)?;
    Ok((worker_end, tokio::net::TcpStream::from_std(probe_end)?))
}

/// Runs an exec probe: spawn, wait for the exit within `timeout` while reading the output, and
/// kill the probe's process group whatever happened.
async fn run_exec(
    probe: &Probe,
    argv: &[String],
    context: &ExecContext,
    exits: &Exits,
    timeout: Duration,
) -> Outcome {
    let Some((name, arguments)) = argv.split_first() else {
        return Outcome::Unhealthy(format!("{probe} names no command"));
    };
    let program = match find_program(name, &context.cwd, context.env.get("PATH")) {
        Ok(program) => program,
        Err(why) => return Outcome::Unhealthy(format!("{probe}: {why}")),
    };
    let mut command = Command::new(&program);
    command
        .args(arguments)
        .current_dir(&context.cwd)
        .env_clear()
        .envs(&context.env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let (mut child, mut exit) = match exits.spawn(&mut command) {
        Ok(spawned) => spawned,
        Err(e) => return Outcome::Unhealthy(spawn_failure(probe, &program, &context.cwd, &e)),
    };
    let group = Group(child.id());
    let stdout = child.stdout.take().and_then(|p| reader(p.into()));
    let stderr = child.stderr.take().and_then(|p| reader(p.into()));
    // The reaper collects the exit; `child` would only be a second, wrong way to wait.
    drop(child);

    let (mut out, mut err) = (Tail::default(), Tail::default());
    let ended = {
        let mut reading = pin!(async {
            tokio::join!(drain(stdout, &mut out), drain(stderr, &mut err));
        });
        let mut read_all = false;
        let ended = wait_exit(&mut exit, reading.as_mut(), &mut read_all, timeout).await;
        // Whatever is left of the group goes now: all of a probe past its deadline, or what a
        // finished one left running in the background (which may also hold its pipes open).
        drop(group);
        let ended = match ended {
            Some(Ok(exit)) => End::Exited(exit),
            Some(Err(_)) => End::Lost,
            None => End::TimedOut(tokio::time::timeout(KILL_GRACE, &mut exit).await.is_ok()),
        };
        if !read_all {
            let _ = tokio::time::timeout(OUTPUT_GRACE, reading).await;
        }
        ended
    };
    judge_exit(
        probe,
        ended,
        timeout,
        err.last_line().or_else(|| out.last_line()),
    )
}

/// How an exec probe's wait ended.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The reaper reported its exit.
    Exited(ExitKind),
    /// Its sender went without a word (cannot happen while `claim` always sends).
    Lost,
    /// The deadline came first; whether it has been reaped since it was killed.
    TimedOut(bool),
}

fn judge_exit(probe: &Probe, ended: End, timeout: Duration, said: Option<String>) -> Outcome {
    let what = match ended {
        End::Exited(ExitKind::Code(0)) => return Outcome::Healthy,
        End::Exited(ExitKind::Code(code)) => format!("{probe} exited with code {code}"),
        End::Exited(ExitKind::Signal(number)) => {
            format!("{probe} was killed by {}", Signal::describe(number))
        }
        End::Lost => format!("{probe}: its exit status was lost"),
        End::TimedOut(reaped) => format!(
            "no answer within {} from {probe}; killed it with its process group{}",
            human(timeout),
            if reaped { "" } else { " (not reaped yet)" }
        ),
    };
    Outcome::Unhealthy(match said {
        Some(line) => format!("{what}: {line}"),
        None => what,
    })
}

/// Waits for the exit within `timeout`, driving `reading` meanwhile (`read_all` records that it
/// finished, so that it is not polled again). `None` at the deadline.
async fn wait_exit(
    exit: &mut oneshot::Receiver<ExitKind>,
    mut reading: Pin<&mut impl Future<Output = ()>>,
    read_all: &mut bool,
    timeout: Duration,
) -> Option<Result<ExitKind, oneshot::error::RecvError>> {
    let mut deadline = pin!(tokio::time::sleep(timeout));
    loop {
        tokio::select! {
            ended = &mut *exit => return Some(ended),
            () = &mut reading, if !*read_all => *read_all = true,
            () = &mut deadline => return None,
        }
    }
}

/// The process group of an exec probe. Dropping it SIGKILLs whatever is left in the group, on
/// every path: the probe finished, timed out, or its caller gave up on it mid-way (the future
/// dropped), so nothing a probe started outlives it. Its pgid stays taken while any member
/// lives, so the signal cannot reach anyone else (short of the pid space wrapping around between
/// the leader's exit and this drop).
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        // ESRCH when nothing is left: the usual case.
        let _ = corral_sys::kill_group(self.0, 9);
    }
}

fn reader(fd: OwnedFd) -> Option<pipe::Receiver> {
    // Without the reader, the probe still runs; its reason just carries no output.
    pipe::Receiver::from_owned_fd(fd).ok()
}

/// Reads `pipe` to its end, keeping the last bytes.
async fn drain(pipe: Option<pipe::Receiver>, tail: &mut Tail) {
    let Some(mut pipe) = pipe else { return };
    let mut chunk = [0u8; 2048];
    while let Ok(read @ 1..) = pipe.read(&mut chunk).await {
        tail.push(&chunk[..read]);
    }
}

/// The last [`OUTPUT_TAIL`] bytes of a stream.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > OUTPUT_TAIL {
            self.0.drain(..self.0.len() - OUTPUT_TAIL);
        }
    }

    /// The last line with text in it.
    fn last_line(&self) -> Option<String> {
        String::from_utf8_lossy(&self.0)
            .lines()
            .map(str::trim)
            .rfind(|line| !line.is_empty())
            .map(str::to_string)
    }
}

/// The program an exec probe runs: a word with a `/` is a path from `cwd`; a bare name is looked
/// up in the probe's own `PATH` (not the daemon's), as `execvp` would in the child.
fn find_program(word: &str, cwd: &Path, path: Option<&String>) -> Result<PathBuf, String> {
    if word.contains('/') {
        let program = cwd.join(word);
        return if program.exists() {
            Ok(program)
        } else {
            Err(format!("there is no file {}", program.display()))
        };
    }
    let dirs = path.map_or(DEFAULT_PATH, String::as_str);
    let executable = |p: &Path| {
        p.metadata()
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    // An empty entry means the working directory, as for a shell.
    dirs.split(':')
        .map(|dir| cwd.join(dir).join(word))
        .find(|candidate| executable(candidate))
        .ok_or_else(|| match path {
            Some(path) => format!("no program '{word}' on the probe's PATH ({path})"),
            None => format!(
                "no program '{word}' in {DEFAULT_PATH} (the app's environment sets no PATH)"
            ),
        })
}

fn spawn_failure(probe: &Probe, program: &Path, cwd: &Path, e: &io::Error) -> String {
    let program = program.display();
    if !cwd.is_dir() {
        return format!(
            "{probe}: the working directory {} does not exist",
            cwd.display()
        );
    }
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            format!("{probe}: cannot run {program} ({e}): make it executable")
        }
        io::ErrorKind::NotFound => format!(
            "{probe}: cannot run {program} ({e}): is the interpreter on its #! line installed?"
        ),
        _ => format!("{probe}: cannot run {program}: {e}"),
    }
}

/// `200ms`, `2s`, `1.5s`.
fn human(duration: Duration) -> String {
    let ms = duration.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests;
