//! The corral daemon (the master): it owns the control socket, the supervised processes and their
//! logs, and does no work of the apps' own.
//!
//! It does not parse command lines or render anything: the CLI does that. It does not decide
//! when to restart: `corral-policy` does, and the [`supervisor`] applies the decisions.
//!
//! # How it works
//! One thread, one tokio current-thread runtime. A single [`supervisor::Supervisor`] task owns
//! all state and reacts to events: client requests from the [`server`] connections, children
//! reaped by the reaper (this process is a child subreaper and reaps every pid with `waitpid`),
//! and timers. Output pipes are drained by their own tasks into [`logs`]. The exits of the
//! daemon's own helpers (exec health probes, [`probe`]) go not to the supervisor but to whoever
//! waits for them, through [`probe::Exits`].

pub mod accept;
pub mod balance;
pub mod bus;
pub mod channel;
pub mod cron;
pub mod dump;
pub mod home;
pub mod inbox;
pub mod listeners;
pub mod logs;
pub mod node;
pub mod notify;
pub mod probe;
pub mod proxy;
pub mod server;
pub mod stats;
pub mod supervisor;
pub mod watch;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, mpsc};

pub use home::{Home, HomeError};

/// Writes one line to the daemon's log (its stderr), with a UTC timestamp.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log_line(format_args!($($arg)*))
    };
}

#[doc(hidden)]
pub fn log_line(args: std::fmt::Arguments<'_>) {
    let mut err = io::stderr().lock();
    let _ = writeln!(err, "{} {args}", logs::format_utc(SystemTime::now()));
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// Its home directory.
    pub home: Home,
    /// Print `ready` on stdout once the socket accepts, then point stdout at /dev/null: how the
    /// CLI that started the daemon in the background learns it is up.
    pub ready_on_stdout: bool,
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The home directory is unusable or taken.
    #[error(transparent)]
    Home(#[from] HomeError),
    /// The control socket could not be set up.
    #[error("cannot listen on {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// The runtime or signal handlers could not be set up.
    #[error("cannot start the daemon: {0}")]
    Setup(#[from] io::Error),
}

/// Runs the daemon until `corral kill`, SIGTERM or SIGINT; every app is stopped before it returns.
pub fn run(options: &Options) -> Result<(), DaemonError> {
    let home = options.home.clone();
    home.prepare()?;
    let _lock = home.lock()?;
    // Holding the lock, any socket file here is a dead daemon's: replace it.
    let socket_path = home.socket();
    let socket_error = |source| DaemonError::Socket {
        path: socket_path.display().to_string(),
        source,
    };
    match std::fs::remove_file(&socket_path) {
        Ok(()) => log!("removed the stale socket of a daemon that is gone"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(&socket_path).map_err(socket_error)?;
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o600))
        .map_err(socket_error)?;
    listener.set_nonblocking(true).map_err(socket_error)?;
    if let Err(e) = corral_sys::become_child_subreaper() {
        log!("cannot become a child subreaper ({e}); orphaned grandchildren go to init");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(serve(home.clone(), listener, options.ready_on_stdout));
    // Leave no zombie of ours to whoever adopts them next.
    while let Ok(Some(_)) = corral_sys::reap_any() {}
    let _ = std::fs::remove_file(&socket_path);
    let _ = std::fs::remove_file(home.pid_file());
    log!("daemon exits");
    result
}

async fn serve(
    home: Home,
    listener: std::os::unix::net::UnixListener,
    ready_on_stdout: bool,
) -> Result<(), DaemonError> {
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let (events, inbox) = mpsc::unbounded_channel();
    // Registered before the first child exists, so no SIGCHLD is missed.
    let mut children = signal(SignalKind::child())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let reaper_events = events.clone();
    // The exits of the daemon's own helpers (exec probes) go to whoever waits for them, not to
    // the supervisor. The supervisor has a clone, for its health checks.
    let exits = probe::Exits::default();
    let reaper_exits = exits.clone();
    tokio::spawn(async move {
        loop {
            loop {
                match corral_sys::reap_any() {
                    Ok(Some((pid, exit))) => {
                        if !reaper_exits.claim(pid, exit) {
                            let _ = reaper_events.send(supervisor::Event::Reaped { pid, exit });
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        log!("waitpid: {e}");
                        break;
                    }
                }
            }
            if children.recv().await.is_none() {
                return;
            }
        }
    });
    let shutdown = Arc::new(Notify::new());
    let bus = bus::Bus::new(home.root().join("state.json"));
    let supervisor = supervisor::Supervisor::new(home.clone(), events.clone(), bus.clone());
    tokio::spawn(supervisor.with_exits(exits).run(inbox));
    tokio::spawn(server::serve(
        listener,
        events.clone(),
        shutdown.clone(),
        bus.clone(),
    ));
    log!(
        "corral daemon {} (pid {}) listening on {}",
        corral_proto::PACKAGE_VERSION,
        std::process::id(),
        home.socket().display()
    );
    if ready_on_stdout {
        let mut out = io::stdout().lock();
        let _ = out.write_all(b"ready\n").and_then(|()| out.flush());
        drop(out);
        if let Ok(null) = File::options().write(true).open("/dev/null") {
            let _ = rustix::stdio::dup2_stdout(&null);
        }
    }
    loop {
        tokio::select! {
            () = shutdown.notified() => {
                bus.flush().await;
                return Ok(());
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            _ = hangup.recv() => log!("SIGHUP ignored (stop the daemon with `corral kill` or SIGTERM)"),
        }
    }
    log!("stopping every app before exiting");
    let _ = server::ask(&events, corral_proto::Request::Kill).await;
    bus.flush().await;
    Ok(())
}
