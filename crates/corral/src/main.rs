//! `corral`: the command line. It parses and validates what the user typed, asks the daemon, and
//! renders the answer; it holds no supervision logic. `corral daemon` runs the daemon itself.

mod args;
mod client;
mod config;
mod ecosystem;
mod policies;
mod render;

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use clap::Parser;
use corral_daemon::{Home, HomeError};
use corral_proto::channel::StateCall;
use corral_proto::{Request, Response, Streams};

use args::{Cli, Command, EventsArgs, LogsArgs, StartArgs, StateCommand};
use client::{Client, ConnectError};

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    if argv
        .nth(1)
        .is_some_and(|a| a == corral_daemon::supervisor::ACTIVATE_SHIM)
    {
        return activate(argv);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if is_broken_pipe(&e) {
                return ExitCode::SUCCESS;
            }
            eprintln!("corral: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The exec shim of socket activation: `corral __activate <program> [args]` execs the program
/// with `LISTEN_PID` set to its own pid (the same pid after exec), which the daemon cannot know
/// before it forks. Everything else (descriptors, environment) passes through unchanged.
fn activate(mut argv: std::env::ArgsOs) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let Some(program) = argv.next() else {
        eprintln!(
            "corral: {} needs a program",
            corral_daemon::supervisor::ACTIVATE_SHIM
        );
        return ExitCode::from(127);
    };
    let error = std::process::Command::new(&program)
        .args(argv)
        .env(
            corral_proto::env::LISTEN_PID,
            std::process::id().to_string(),
        )
        .exec();
    eprintln!(
        "corral: cannot start {}: {error}",
        program.to_string_lossy()
    );
    ExitCode::from(127)
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

fn base_env() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

fn connect(home: &Home) -> Result<Client> {
    Client::connect(home, true).map_err(|e| anyhow!(e))
}

fn run(cli: Cli) -> Result<ExitCode> {
    let home = Home::from_env();
    match cli.command {
        Command::Daemon { ready_on_stdout } => {
            let options = corral_daemon::Options {
                home,
                ready_on_stdout,
            };
            return match corral_daemon::run(&options) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("corral daemon: {e}");
                    let locked = matches!(
                        e,
                        corral_daemon::DaemonError::Home(HomeError::Locked { .. })
                    );
                    Ok(ExitCode::from(if locked {
                        client::EXIT_LOCKED as u8
                    } else {
                        1
                    }))
                }
            };
        }
        Command::Kill => return kill(&home),
        Command::Start(args) => start(&home, &args)?,
        Command::Ls { json } => {
            let instances = expect_instances(connect(&home)?.call(&Request::List)?)?;
            if json {
                println_out(&serde_json::to_string_pretty(&instances)?)?;
            } else {
                print_out(&render::instances(&instances))?;
            }
        }
        Command::Describe { target } => {
            match connect(&home)?.call(&Request::Describe { target })? {
                Response::App(info) => print_out(&render::app(&info))?,
                other => return Err(unexpected(other)),
            }
        }
        Command::Stop { target } => instances_command(&home, &Request::Stop { target })?,
        Command::Restart { target } => instances_command(&home, &Request::Restart { target })?,
        Command::Reload { target } => instances_command(&home, &Request::Reload { target })?,
        Command::Reset { target } => instances_command(&home, &Request::Reset { target })?,
        Command::Events(args) => events(&home, &args)?,
        Command::Delete { target } => done_command(&home, &Request::Delete { target })?,
        Command::Scale { app, instances } => {
            let instances = config::parse_instances(&instances).map_err(|e| anyhow!(e))?;
            instances_or_done(connect(&home)?.call(&Request::Scale { app, instances })?)?;
        }
        Command::Signal { signal, target } => {
            let signal = config::parse_signal(&signal).map_err(|e| anyhow!(e))?;
            done_command(&home, &Request::Signal { target, signal })?;
        }
        Command::Send {
            target,
            json,
            reply,
            timeout,
        } => {
            let data = serde_json::from_str(&json).map_err(|e| {
                anyhow!(
                    "the message {json:?} is not JSON ({e}): quote it for the shell, as in \
                     corral send {target} '{{\"cmd\": \"refresh\"}}' or '\"text\"'"
                )
            })?;
            let timeout_ms = timeout
                .as_deref()
                .map(|t| config::parse_duration_ms(t).map_err(|e| anyhow!("--timeout: {e}")))
                .transpose()?;
            let request = Request::Send {
                target,
                data,
                reply,
                timeout_ms,
            };
            if reply {
                value_command(&home, &request)?;
            } else {
                done_command(&home, &request)?;
            }
        }
        Command::State { app, command } => {
            let call = state_call(command)?;
            value_command(&home, &Request::State { app, call })?;
        }
        Command::Logs(args) => logs(&home, &args)?,
        Command::Flush { target } => done_command(&home, &Request::Flush { target })?,
        Command::Save { force } => done_command(&home, &Request::Save { force })?,
        Command::Resurrect => {
            let response = connect(&home)?.call(&Request::Resurrect {
                base_env: base_env(),
            })?;
            instances_or_done(response)?;
        }
        Command::Ping => match connect(&home)?.call(&Request::Ping)? {
            Response::Pong {
                pid,
                version,
                uptime_ms,
            } => println_out(&format!(
                "pong: corral daemon {version}, pid {pid}, up {}",
                render::duration(uptime_ms)
            ))?,
            other => return Err(unexpected(other)),
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn print_out(text: &str) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn println_out(text: &str) -> Result<()> {
    print_out(&format!("{text}\n"))
}

fn unexpected(response: Response) -> anyhow::Error {
    match response {
        Response::Error { message, .. } => anyhow!(message),
        other => anyhow!("unexpected answer from the daemon: {other:?}"),
    }
}

fn expect_instances(response: Response) -> Result<Vec<corral_proto::InstanceInfo>> {
    match response {
        Response::Instances { instances } => Ok(instances),
        other => Err(unexpected(other)),
    }
}

fn instances_or_done(response: Response) -> Result<()> {
    match response {
        Response::Instances { instances } => print_out(&render::instances(&instances)),
        Response::Done { message } => println_out(&message),
        other => Err(unexpected(other)),
    }
}

fn instances_command(home: &Home, request: &Request) -> Result<()> {
    let instances = expect_instances(connect(home)?.call(request)?)?;
    print_out(&render::instances(&instances))
}

/// A request answered with a value: printed as JSON, or a string as it is.
fn value_command(home: &Home, request: &Request) -> Result<()> {
    match connect(home)?.call(request)? {
        Response::Value {
            value: serde_json::Value::String(text),
        } => println_out(&text),
        Response::Value { value } => println_out(&serde_json::to_string_pretty(&value)?),
        other => Err(unexpected(other)),
    }
}

/// `corral state ...` as a state call.
fn state_call(command: StateCommand) -> Result<StateCall> {
    Ok(match command {
        StateCommand::Get { key } => StateCall::Get { key },
        StateCommand::Set { key, value, ttl } => StateCall::Set {
            key,
            value,
            ttl_ms: ttl_ms(ttl.as_deref())?,
        },
        StateCommand::Del { key } => StateCall::Del { key },
        StateCommand::Incr { key, by } => StateCall::Incr {
            key,
            by: by.unwrap_or(1),
        },
        StateCommand::Cas {
            key,
            expect,
            new,
            ttl,
            ..
        } => StateCall::Cas {
            key,
            expected: expect,
            new,
            ttl_ms: ttl_ms(ttl.as_deref())?,
        },
        StateCommand::Ls { pattern } => StateCall::Keys {
            pattern: pattern.unwrap_or_else(|| "*".into()),
        },
        StateCommand::Publish { channel, message } => StateCall::Publish { channel, message },
    })
}

/// `--ttl` in milliseconds.
fn ttl_ms(ttl: Option<&str>) -> Result<Option<u64>> {
    ttl.map(|t| config::parse_duration_ms(t).map_err(|e| anyhow!("--ttl: {e}")))
        .transpose()
}

fn done_command(home: &Home, request: &Request) -> Result<()> {
    match connect(home)?.call(request)? {
        Response::Done { message } => println_out(&message),
        other => Err(unexpected(other)),
    }
}

fn start(home: &Home, args: &StartArgs) -> Result<()> {
    let is_config = Path::new(&args.script)
        .extension()
        .is_some_and(|e| e == "toml");
    let specs = if is_config {
        config::specs_from_file(Path::new(&args.script))?
    } else if ecosystem::is_ecosystem(Path::new(&args.script)) && Path::new(&args.script).is_file()
    {
        let (specs, ignored) = ecosystem::specs_from_file(Path::new(&args.script))?;
        for line in ignored {
            eprintln!("corral: {line}");
        }
        specs
    } else if config::locate_script(&args.script, &std::env::current_dir()?).is_none() {
        // Not a file: perhaps the name of an app to start again, as `pm2 start <name>` does. No
        // daemon means no such app: a mistyped script name does not start one.
        let Ok(mut client) = Client::connect(home, false) else {
            return Err(config::spec_from_args(args)
                .err()
                .unwrap_or_else(|| anyhow!("script '{}' not found", args.script)));
        };
        return match client.call(&Request::Restart {
            target: args.script.clone(),
        })? {
            Response::Instances { instances } => print_out(&render::instances(&instances)),
            Response::Error { .. } => Err(config::spec_from_args(args)
                .err()
                .unwrap_or_else(|| anyhow!("script '{}' not found", args.script)))
            .map_err(|e| anyhow!("{e:#} (nor is it the name of an app)")),
            other => Err(unexpected(other)),
        };
    } else {
        vec![config::spec_from_args(args)?]
    };
    let response = connect(home)?.call(&Request::Start {
        apps: specs,
        base_env: base_env(),
    })?;
    let instances = expect_instances(response)?;
    print_out(&render::instances(&instances))
}

fn logs(home: &Home, args: &LogsArgs) -> Result<()> {
    let streams = match (args.out, args.err) {
        (true, false) => Streams::Out,
        (false, true) => Streams::Err,
        _ => Streams::Both,
    };
    let mut client = connect(home)?;
    client.send(&Request::Logs {
        target: args.target.clone(),
        lines: args.lines,
        follow: args.follow,
        streams,
    })?;
    let mut out = io::stdout().lock();
    loop {
        match client.receive() {
            Ok(Response::LogLines { lines }) => {
                for l in lines {
                    if args.raw {
                        writeln!(out, "{}", l.line)?;
                    } else {
                        // The agent's index is u32::MAX.
                        let instance = if l.instance == u32::MAX {
                            "agent".to_string()
                        } else {
                            l.instance.to_string()
                        };
                        writeln!(
                            out,
                            "{}:{instance} {} | {}",
                            l.app,
                            l.stream.as_str(),
                            l.line
                        )?;
                    }
                }
                out.flush()?;
            }
            Ok(Response::LogEnd) => return Ok(()),
            Ok(other) => return Err(unexpected(other)),
            Err(e) if args.follow => {
                // The daemon went away (corral kill): the stream is over.
                eprintln!("corral: log stream ended: {e:#}");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// `corral events`: the recent events, then (with `--follow`) new ones until the daemon goes.
fn events(home: &Home, args: &EventsArgs) -> Result<()> {
    let mut client = connect(home)?;
    client.send(&Request::Events {
        target: args.target.clone(),
        lines: args.lines,
        follow: args.follow,
    })?;
    let mut out = io::stdout().lock();
    loop {
        match client.receive() {
            Ok(Response::Events { events }) => {
                for event in &events {
                    if args.json {
                        writeln!(out, "{}", serde_json::to_string(event)?)?;
                    } else {
                        writeln!(out, "{}", render::event(event))?;
                    }
                }
                out.flush()?;
            }
            Ok(Response::LogEnd) => return Ok(()),
            Ok(other) => return Err(unexpected(other)),
            Err(e) if args.follow => {
                // The daemon went away (corral kill): the stream is over.
                eprintln!("corral: event stream ended: {e:#}");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

/// Stops every app and the daemon. Works across versions: a daemon that speaks another protocol
/// gets SIGTERM, which also stops every app first.
fn kill(home: &Home) -> Result<ExitCode> {
    match Client::connect(home, false) {
        Ok(mut client) => {
            let pid = client.daemon_pid;
            let message = match client.call(&Request::Kill)? {
                Response::Done { message } => message,
                other => return Err(unexpected(other)),
            };
            wait_gone(pid)?;
            println_out(&message)?;
        }
        Err(ConnectError::NotRunning(home)) => {
            println_out(&format!("no daemon runs with CORRAL_HOME={home}"))?;
        }
        Err(ConnectError::VersionMismatch(_)) => {
            let pid = home.read_pid().ok_or_else(|| {
                anyhow!("the daemon speaks another protocol and left no pid file")
            })?;
            corral_sys::kill(pid, 15)?;
            wait_gone(pid)?;
            println_out(&format!(
                "stopped the daemon of another version (pid {pid}) and its apps"
            ))?;
        }
        Err(ConnectError::Other(e)) => return Err(e),
    }
    Ok(ExitCode::SUCCESS)
}

/// Waits until the daemon process is gone (a zombie waiting for its reaper counts as gone).
fn wait_gone(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let alive = |pid| corral_daemon::stats::read_stat(pid).is_some_and(|s| s.state != b'Z');
    while alive(pid) {
        if Instant::now() > deadline {
            bail!("the daemon (pid {pid}) is still running after 60s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
