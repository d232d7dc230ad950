//! Starting one process of an instance: its command line, environment and descriptors (the
//! channel, and in shared mode the listening sockets), then the tasks that read its output,
//! its channel and its notify socket. Between fork and exec only descriptors are placed.

use std::ffi::OsString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use corral_proto::channel::CHANNEL_PROTOCOL_VERSION;
use corral_proto::{LbMode, env};

use super::app::{App, Instance, ProcIo};
use super::{ACTIVATE_SHIM, Supervisor};
use crate::balance::{Codec, Conduit};
use crate::bus::Joining;
use crate::logs::pump;
use crate::notify::NotifySocket;
use crate::proxy;

/// An app's env variable that, set to `off`, leaves the drain preload (`js/drain.js`) out of
/// its Node cluster workers.
const NODE_DRAIN_SWITCH: &str = "CORRAL_NODE_DRAIN";

/// Why a process could not be started.
#[derive(Debug)]
pub struct SpawnError {
    pub message: String,
    /// Trying again cannot help.
    pub permanent: bool,
}

/// The program to run and its arguments.
struct Program {
    path: OsString,
    args: Vec<String>,
    node: bool,
    node_cluster: bool,
    agent: bool,
}

fn program(app: &App, inst: &Instance, drain: &std::path::Path) -> Program {
    let spec = &app.spec;
    // The agent runs its own program, as a plain process: no listening sockets, no port,
    // not a Node cluster worker.
    let agent = spec.agent.as_ref().filter(|_| inst.agent);
    let (interpreter, interpreter_args, script, script_args) = match agent {
        Some(a) => (&a.interpreter, &a.interpreter_args, &a.script, &a.args),
        None => (
            &spec.interpreter,
            &spec.interpreter_args,
            &spec.script,
            &spec.args,
        ),
    };
    let node = corral_proto::runs_on_node(interpreter.as_deref());
    let node_cluster = agent.is_none() && spec.is_node_cluster();
    let (program, mut args) = match interpreter {
        Some(interpreter) => {
            let mut args = interpreter_args.clone();
            if node_cluster && spec.env.get(NODE_DRAIN_SWITCH).is_none_or(|v| v != "off") {
                args.push("--require".into());
                args.push(drain.to_string_lossy().into_owned());
            }
            args.push(script.to_string_lossy().into_owned());
            (OsString::from(interpreter), args)
        }
        None => (script.clone().into_os_string(), Vec::new()),
    };
    args.extend(script_args.iter().cloned());
    Program {
        path: program,
        args,
        node,
        node_cluster,
        agent: agent.is_some(),
    }
}

/// The command, with everything but the descriptors.
fn command(
    app: &App,
    inst: &Instance,
    what: &Program,
    channel_fd: i32,
    listen_fds: usize,
    port: Option<u16>,
    notify: Option<&NotifySocket>,
) -> Command {
    let spec = &app.spec;
    let mut command = if listen_fds == 0 {
        Command::new(&what.path)
    } else {
        // LISTEN_PID must be the program's own pid, unknown before the fork: a tiny exec
        // shim (this binary) sets it and execs the program with the same pid.
        let mut shim = Command::new("/proc/self/exe");
        shim.arg(ACTIVATE_SHIM).arg(&what.path);
        shim
    };
    let role = if what.agent { "agent" } else { "worker" };
    command
        .args(&what.args)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(&app.base_env)
        .envs(&spec.env)
        .env(env::CORRAL_APP, &spec.name)
        .env(env::CORRAL_INSTANCE, inst.index.to_string())
        .env(env::CORRAL_ID, inst.id.to_string())
        .env(env::NODE_APP_INSTANCE, inst.index.to_string())
        .env(env::CORRAL_WORKER_ID, inst.id.to_string())
        .env(env::CORRAL_LB, spec.lb.to_string())
        .env(env::CORRAL_ROLE, role)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if what.node {
        // Node's own IPC channel: `process.send` and `process.on('message')` work, and in
        // cluster mode corral is the cluster primary.
        command
            .env("NODE_CHANNEL_FD", channel_fd.to_string())
            .env("NODE_CHANNEL_SERIALIZATION_MODE", "json");
        if what.node_cluster {
            command.env("NODE_UNIQUE_ID", inst.id.to_string());
        }
    } else {
        command
            .env(env::CORRAL_CHANNEL_FD, channel_fd.to_string())
            .env(
                env::CORRAL_CHANNEL_PROTOCOL,
                CHANNEL_PROTOCOL_VERSION.to_string(),
            );
    }
    if let Some(port) = port {
        command.env("PORT", port.to_string());
    }
    if let Some(notify) = notify {
        command.env("NOTIFY_SOCKET", &notify.address);
    }
    if let Some(watchdog) = spec.watchdog_ms.filter(|_| !what.agent) {
        command.env("WATCHDOG_USEC", (watchdog * 1000).to_string());
    }
    if listen_fds > 0 {
        let names: Vec<String> = (0..listen_fds).map(|n| format!("listen{n}")).collect();
        command
            .env(env::LISTEN_FDS, listen_fds.to_string())
            .env(env::LISTEN_FDNAMES, names.join(":"));
    }
    command
}

impl Supervisor {
    /// Starts a process for instance `id`; returns its pid.
    pub(super) fn spawn_process(&mut self, id: u32) -> Result<u32, SpawnError> {
        let (a, i) = self.locate(id).expect("spawned instances exist");
        self.notify_serial += 1;
        let notify = match crate::notify::bind(id, self.notify_serial) {
            Ok(notify) => Some(notify),
            Err(e) => {
                crate::log!("no NOTIFY_SOCKET for instance {id}: {e}");
                None
            }
        };
        let app = &self.apps[a];
        let inst = &app.instances[i];
        let what = program(app, inst, &self.home.node_drain());
        // The channel to the master, and in shared mode the listening sockets, at fixed numbers:
        // listeners from 3 (systemd's convention), the channel right after them.
        let listen_fds: Vec<BorrowedFd<'_>> = match app.spec.lb {
            LbMode::Shared if !what.agent => app.listeners.iter().map(|l| l.fd.as_fd()).collect(),
            _ => Vec::new(),
        };
        let port = self.proxy_port(a, what.agent);
        let channel_fd = 3 + listen_fds.len() as i32;
        let mut command = command(
            app,
            inst,
            &what,
            channel_fd,
            listen_fds.len(),
            port,
            notify.as_ref(),
        );
        let spawned = corral_sys::fd::stream_pair().and_then(|(master_end, worker_end)| {
            let mut placed: Vec<_> = listen_fds
                .iter()
                .enumerate()
                .map(|(n, fd)| (*fd, 3 + n as i32))
                .collect();
            placed.push((worker_end.as_fd(), channel_fd));
            corral_sys::fd::place_fds(&mut command, &placed)?;
            let child = command.spawn()?;
            Ok((child, master_end))
        });
        drop(command);
        let (child, channel) = spawned.map_err(|e| self.spawn_error(a, i, &what, &e))?;
        Ok(self.attach(a, i, &what, child, channel, notify, port))
    }

    /// In proxy mode: a fresh port for every process, so that an old and a new one of the same
    /// instance can run side by side during a reload.
    fn proxy_port(&self, a: usize, agent: bool) -> Option<u16> {
        let spec = &self.apps[a].spec;
        if spec.lb != LbMode::Proxy || agent {
            return None;
        }
        match proxy::free_port() {
            Ok(port) => Some(port),
            Err(e) => {
                crate::log!(
                    "app '{}': no free loopback port for a worker: {e}",
                    spec.name
                );
                None
            }
        }
    }

    fn spawn_error(&self, a: usize, i: usize, what: &Program, e: &std::io::Error) -> SpawnError {
        let app = &self.apps[a];
        let inst = &app.instances[i];
        let permanent = matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
        ) || e.raw_os_error() == Some(8); // ENOEXEC
        let message = format!(
            "cannot start {}: {e}. Check that it exists, is executable (or has an interpreter), \
             and that the working directory {} exists",
            what.path.to_string_lossy(),
            app.spec.cwd.display()
        );
        crate::log!("app '{}' {}: {message}", app.spec.name, inst.label());
        let _ = inst.err.write(format!("[corral] {message}\n").as_bytes());
        SpawnError { message, permanent }
    }

    /// Connects a new child: its channel to the bus and a reader, its notify socket, its output
    /// pipes to the logs; the reaper collects its exit.
    #[allow(clippy::too_many_arguments)]
    fn attach(
        &mut self,
        a: usize,
        i: usize,
        what: &Program,
        mut child: std::process::Child,
        channel: OwnedFd,
        notify: Option<NotifySocket>,
        port: Option<u16>,
    ) -> u32 {
        let pid = child.id();
        let app = &self.apps[a];
        let inst = &app.instances[i];
        let id = inst.id;
        let codec = if what.node {
            Codec::Node
        } else {
            Codec::Corral
        };
        let conduit = match crate::channel::open(channel) {
            Ok(stream) => {
                let conduit = Conduit::new(pid, codec, stream);
                let joining = Joining {
                    pid,
                    id,
                    app: app.spec.name.clone(),
                    agent: inst.agent,
                    backend: app.spec.state.clone(),
                };
                self.bus.join(joining, conduit.clone());
                tokio::spawn(crate::channel::read(
                    conduit.clone(),
                    self.events.clone(),
                    self.bus.clone(),
                ));
                Some(conduit)
            }
            Err(e) => {
                crate::log!("cannot read the channel of pid {pid}: {e}");
                None
            }
        };
        let notify = notify.map(|notify| {
            tokio::spawn(crate::notify::read(notify, pid, self.events.clone())).abort_handle()
        });
        for (pipe, sink) in [
            (child.stdout.take().map(OwnedFd::from), inst.out.clone()),
            (child.stderr.take().map(OwnedFd::from), inst.err.clone()),
        ] {
            let Some(pipe) = pipe else { continue };
            match tokio::net::unix::pipe::Receiver::from_owned_fd(pipe) {
                Ok(pipe) => {
                    tokio::spawn(pump(pipe, sink, app.spec.time));
                }
                Err(e) => crate::log!("cannot read output of pid {pid}: {e}"),
            }
        }
        if let Some(port) = port {
            // Proxy mode: ready when its port accepts, the only readiness that matters to the
            // connections relayed to it.
            let limit = Duration::from_millis(app.spec.listen_timeout_ms);
            tokio::spawn(proxy::probe(port, pid, limit, self.events.clone()));
        }
        // Exits are collected by the reaper (waitpid on any pid), not through `child`.
        drop(child);
        let io = ProcIo {
            id,
            started: Instant::now(),
            port,
            notify,
            conduit,
            node_cluster: what.node_cluster,
            stop_by_message: app.spec.shutdown_with_message,
            shutdown_sent: false,
            noticed: false,
            health: None,
            health_failures: 0,
            watchdog: None,
            watchdog_fired: false,
        };
        self.procs.insert(pid, io);
        if !what.agent {
            self.watch_process(a, pid);
        }
        pid
    }
}
