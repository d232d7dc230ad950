//! The CLI's side of the control socket: connect (starting the daemon when none answers),
//! handshake, one request and its answer at a time.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use corral_daemon::Home;
use corral_proto::{
    FrameError, Hello, PACKAGE_VERSION, PROTOCOL_VERSION, Request, Response, Welcome, frame,
};
use serde::Deserialize;

/// Exit code of `corral daemon` when another daemon holds the home's lock.
pub const EXIT_LOCKED: i32 = 75;
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A connection to the daemon.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    /// The daemon's pid.
    pub daemon_pid: u32,
}

/// Why no daemon could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// None runs (and none was to be started).
    #[error("no corral daemon runs with CORRAL_HOME={0}")]
    NotRunning(String),
    /// It runs but speaks another protocol.
    #[error("{0}")]
    VersionMismatch(String),
    /// Anything else.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum HelloReply {
    Welcome(Welcome),
    Refused(Response),
}

impl Client {
    /// Connects, starting a daemon in the background when `autostart` and none answers.
    pub fn connect(home: &Home, autostart: bool) -> Result<Client, ConnectError> {
        match UnixStream::connect(home.socket()) {
            Ok(stream) => Client::handshake(stream),
            // NotADirectory: CORRAL_HOME is below a file; preparing the home explains that.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound
                        | std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::NotADirectory
                ) =>
            {
                if !autostart {
                    return Err(ConnectError::NotRunning(home.root().display().to_string()));
                }
                start_daemon(home)?;
                let stream = UnixStream::connect(home.socket()).with_context(|| {
                    format!(
                        "the daemon started but {} refuses connections",
                        home.socket().display()
                    )
                })?;
                Client::handshake(stream)
            }
            Err(e) => Err(anyhow!(
                "cannot reach the daemon at {}: {e}",
                home.socket().display()
            )
            .into()),
        }
    }

    fn handshake(mut stream: UnixStream) -> Result<Client, ConnectError> {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            version: PACKAGE_VERSION.into(),
        };
        // A daemon that refuses a client (another uid) answers before reading anything and
        // closes: the hello may then fail with EPIPE, but the answer is there to read.
        let sent = frame::write(&mut stream, &hello);
        let reply = frame::read::<_, HelloReply>(&mut stream);
        if let (Err(e), Err(_)) = (&sent, &reply) {
            return Err(anyhow!("sending the handshake to the daemon: {e}").into());
        }
        match reply {
            Ok(HelloReply::Welcome(welcome)) => {
                if welcome.version != PACKAGE_VERSION {
                    eprintln!(
                        "corral: warning: the daemon is corral {} and this command is corral \
                         {PACKAGE_VERSION}; run `corral kill` and retry to use the new daemon",
                        welcome.version
                    );
                }
                Ok(Client {
                    stream,
                    daemon_pid: welcome.pid,
                })
            }
            Ok(HelloReply::Refused(Response::Error {
                kind: corral_proto::ErrorKind::VersionMismatch,
                message,
            })) => Err(ConnectError::VersionMismatch(message)),
            Ok(HelloReply::Refused(Response::Error { message, .. })) => {
                Err(anyhow!("the daemon refused the connection: {message}").into())
            }
            Ok(HelloReply::Refused(other)) => {
                Err(anyhow!("the daemon answered the handshake with {other:?}").into())
            }
            Err(FrameError::Malformed(e)) => Err(anyhow!(
                "the daemon's handshake is not understood ({e}): it may be another version of \
                 corral; run `corral kill` and retry"
            )
            .into()),
            Err(e) => Err(anyhow!("handshake with the daemon failed: {e}").into()),
        }
    }

    /// Sends a request and reads its answer.
    pub fn call(&mut self, request: &Request) -> Result<Response> {
        self.send(request)?;
        self.receive()
    }

    /// Sends a request.
    pub fn send(&mut self, request: &Request) -> Result<()> {
        frame::write(&mut self.stream, request).context("sending the request to the daemon")
    }

    /// Reads one answer.
    pub fn receive(&mut self) -> Result<Response> {
        frame::read(&mut self.stream).map_err(|e| match e {
            FrameError::Closed => anyhow!(
                "the daemon closed the connection without answering; see its log (daemon.log in \
                 CORRAL_HOME)"
            ),
            e => anyhow!("reading the daemon's answer: {e}"),
        })
    }
}

/// Starts `corral daemon` in its own session, its stderr appended to `daemon.log`, and waits
/// until it says it is ready (or exits, in which case its last log lines explain why).
fn start_daemon(home: &Home) -> Result<()> {
    home.prepare()?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match spawn_daemon(home)? {
            Spawned::Ready => return Ok(()),
            Spawned::Locked => {
                // Another daemon holds the home: one started by a command running at the same
                // moment (use it once it answers), or one on its way out (start anew after it).
                let wait_until = Instant::now() + Duration::from_secs(1);
                while Instant::now() < wait_until {
                    if UnixStream::connect(home.socket()).is_ok() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                if Instant::now() > deadline {
                    bail!(
                        "another corral daemon holds {} but does not answer on {}",
                        home.lock_file().display(),
                        home.socket().display()
                    );
                }
            }
        }
    }
}

enum Spawned {
    Ready,
    Locked,
}

/// `daemon.log` is moved to `daemon.log.1` when a daemon starts and finds it over this size.
const DAEMON_LOG_MAX: u64 = 10 * 1024 * 1024;

fn spawn_daemon(home: &Home) -> Result<Spawned> {
    let log_path = home.daemon_log();
    if std::fs::metadata(&log_path).is_ok_and(|m| m.len() > DAEMON_LOG_MAX) {
        let _ = std::fs::rename(&log_path, log_path.with_extension("log.1"));
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let exe = std::env::current_exe().context("cannot find the corral executable")?;
    let mut command = Command::new(exe);
    command
        .args(["daemon", "--ready-on-stdout"])
        .env(corral_proto::env::CORRAL_HOME, home.root())
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    corral_sys::start_new_session(&mut command);
    let mut child = command.spawn().context("cannot start the daemon")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) if line.trim() == "ready" => return Ok(Spawned::Ready),
        Ok(_) => {}
        Err(_) => bail!(
            "the daemon did not become ready within {}s; see {}",
            START_TIMEOUT.as_secs(),
            log_path.display()
        ),
    }
    let status = child.wait().context("waiting for the daemon")?;
    if status.code() == Some(EXIT_LOCKED) {
        return Ok(Spawned::Locked);
    }
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(5).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    bail!(
        "the daemon could not start ({status}):\n  {}\n(from {})",
        tail.join("\n  "),
        log_path.display()
    )
}
