//! What the user typed: the command line as clap sees it. Turned into validated values by
//! [`crate::config`]; nothing else reads these raw strings.

// These doc comments are the help text users read in a terminal, not rustdoc: no Markdown.
#![allow(clippy::doc_markdown)]

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// corral: runs any program as a supervised cluster, with the commands you know from PM2.
#[derive(Debug, Parser)]
#[command(name = "corral", version, about, max_term_width = 100)]
#[command(
    after_help = "The daemon starts in the background on the first command that needs it. \
Its files (socket, logs, dump.json) live in $CORRAL_HOME, by default ~/.corral."
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a script, a binary, or every app of a corral.toml.
    Start(Box<StartArgs>),
    /// List every instance.
    #[command(alias = "list", alias = "status")]
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show everything about one app.
    #[command(alias = "show", alias = "info")]
    Describe {
        /// App name or instance id.
        target: String,
    },
    /// Stop instances (they stay listed).
    Stop {
        /// App name, instance id, or `all`.
        target: String,
    },
    /// Restart instances (also stopped and errored ones).
    Restart {
        /// App name, instance id, or `all`.
        target: String,
    },
    /// Replace every instance one at a time, each new one ready before the old one stops.
    Reload {
        /// App name, or `all`.
        target: String,
    },
    /// Stop instances and forget them.
    #[command(alias = "del")]
    Delete {
        /// App name, instance id, or `all`.
        target: String,
    },
    /// Change an app's number of instances.
    Scale {
        /// App name.
        app: String,
        /// New number of instances.
        instances: String,
    },
    /// Send a signal to the main process of instances.
    #[command(alias = "sendSignal")]
    Signal {
        /// Signal: SIGUSR2, USR2 or 12.
        signal: String,
        /// App name, instance id, or `all`.
        target: String,
    },
    /// Send a JSON message to the running instances (Node: `process.on('message')`).
    Send {
        /// App name, instance id, or `all`.
        target: String,
        /// The message, as JSON: '{"cmd":"refresh"}', '"ready"', 42.
        json: String,
        /// Wait for the instance's answer and print it (one instance; it gets the message as a
        /// bus request).
        #[arg(long)]
        reply: bool,
        /// With --reply: how long to wait [default: 5s].
        #[arg(long, value_name = "DURATION")]
        timeout: Option<String>,
    },
    /// Read and change the shared state of the apps (key/value and publish).
    State {
        /// The app whose store (needed when apps use different stores).
        #[arg(long, global = true)]
        app: Option<String>,
        /// What to do.
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Clear the restart counters of instances.
    Reset {
        /// App name, instance id, or `all`.
        target: String,
    },
    /// Print recent lifecycle events (every change of status, with its cause); with -f, keep
    /// printing new ones.
    Events(EventsArgs),
    /// Print recent log lines; with -f, keep printing new ones.
    Logs(LogsArgs),
    /// Empty log files.
    Flush {
        /// App name or instance id; every app when left out.
        target: Option<String>,
    },
    /// Save the list of apps to `$CORRAL_HOME/dump.json`.
    #[command(alias = "dump")]
    Save {
        /// Save even an empty list over a dump that lists apps.
        #[arg(long)]
        force: bool,
    },
    /// Start the apps saved by `corral save`.
    Resurrect,
    /// Stop every app, then the daemon.
    Kill,
    /// Check that the daemon answers (starting it if needed).
    Ping,
    /// Run the daemon in the foreground (for systemd and containers).
    Daemon {
        /// Tell the starting CLI on stdout when ready (internal).
        #[arg(long, hide = true)]
        ready_on_stdout: bool,
    },
}

/// `corral start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// A script (.js, .py, .sh, ...), a binary, a command on PATH, a corral.toml, or the name of a
    /// stopped app.
    pub script: String,
    /// Arguments for the program, after `--`.
    #[arg(last = true)]
    pub args: Vec<String>,
    /// App name (default: the script's file name without extension).
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// Number of instances, or `max` for one per CPU.
    #[arg(long, short = 'i')]
    pub instances: Option<String>,
    /// Working directory (default: the current one).
    #[arg(long)]
    pub cwd: Option<PathBuf>,
    /// An environment variable for the app, K=V (repeatable).
    #[arg(long = "env", short = 'e', value_name = "K=V")]
    pub env: Vec<String>,
    /// Program that runs the script (default by extension: .js node, .py python3, .sh bash);
    /// `none` executes the script itself.
    #[arg(long)]
    pub interpreter: Option<String>,
    /// Arguments for the interpreter, before the script.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub interpreter_args: Option<String>,
    /// Prefix every log line with its UTC time.
    #[arg(long)]
    pub time: bool,
    /// Do not restart the program when it exits.
    #[arg(long)]
    pub no_autorestart: bool,
    /// An exit sooner than this after start is unstable [default: 1s].
    #[arg(long, value_name = "DURATION")]
    pub min_uptime: Option<String>,
    /// Unstable restarts in a row before the app is errored [default: 10].
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<String>,
    /// Wait this long before each restart [default: 0].
    #[arg(long, value_name = "DURATION")]
    pub restart_delay: Option<String>,
    /// Exponential backoff between restarts, starting at this delay (x1.5, at most 15s).
    #[arg(long, value_name = "DURATION")]
    pub exp_backoff_restart_delay: Option<String>,
    /// Time from the first stop notice to SIGKILL (a Node cluster worker or one stopped by a
    /// message gets the stop signal halfway) [default: 1600ms].
    #[arg(long, value_name = "DURATION")]
    pub kill_timeout: Option<String>,
    /// Signal that asks the program to stop [default: SIGTERM].
    #[arg(long, value_name = "SIGNAL")]
    pub stop_signal: Option<String>,
    /// Rotate a log file at this size; 0 never rotates [default: 10M].
    #[arg(long, value_name = "SIZE")]
    pub log_max_size: Option<String>,
    /// Rotated log files to keep [default: 5].
    #[arg(long, value_name = "N")]
    pub log_keep: Option<String>,
    /// An address the master listens on and shares with the workers (repeatable):
    /// 127.0.0.1:8080, [::1]:0, 8080, unix:/path.
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<String>,
    /// How connections reach workers: `rr` (the master accepts and hands each connection to
    /// the next ready worker over its channel; workers built on corral-worker), `least-conn`
    /// (the same, to the worker with the fewest open connections), `shared` (each worker gets
    /// the listening sockets by systemd socket activation and accepts on its own) or `proxy`
    /// (each worker listens on its own loopback port, given in PORT, and the master relays
    /// connections round robin) [default: rr].
    #[arg(long, value_name = "MODE")]
    pub lb: Option<String>,
    /// A worker is ready only when it says so (a `ready` message), not after --min-uptime.
    #[arg(long)]
    pub wait_ready: bool,
    /// With --wait-ready, in rr and least-conn modes and in proxy mode: how long a worker may
    /// take to be ready before it counts as failed [default: 3s].
    #[arg(long, value_name = "DURATION")]
    pub listen_timeout: Option<String>,
    /// For Node.js apps: `cluster` (corral is their cluster primary: every worker's `listen()`
    /// gets the master's socket) or `fork` [default: cluster with more than one instance].
    #[arg(long, value_name = "MODE")]
    pub exec_mode: Option<String>,
    /// Stop the app by a message instead of the stop signal (Node: `'shutdown'` in
    /// `process.on('message')`, as with PM2); the signal follows halfway through --kill-timeout.
    #[arg(long)]
    pub shutdown_with_message: bool,
    /// The app's agent: a script or binary run once per app, started and ready before the
    /// workers, stopped after them, never given connections (CORRAL_ROLE=agent).
    #[arg(long, value_name = "SCRIPT")]
    pub agent: Option<String>,
    /// Where the app's shared state lives: `memory` (the daemon's), `saved` (the daemon's, kept
    /// in $CORRAL_HOME/state.json) or redis://host:port/db [default: memory].
    #[arg(long, value_name = "STORE")]
    pub state: Option<String>,
    /// Restart an instance gracefully once the memory of its process group passes this size:
    /// 300M, 1G [default: off].
    #[arg(long, value_name = "SIZE")]
    pub max_memory_restart: Option<String>,
    /// Restart the app at every time matching this cron expression, in local time: 5 fields
    /// (minute hour day month weekday: "0 3 * * *"), 6 with seconds first, or @daily, @hourly,
    /// ...; a rolling reload when the master owns its listener [default: off].
    #[arg(long, value_name = "EXPR", visible_alias = "cron")]
    pub cron_restart: Option<String>,
    /// Reload the app when a file changes under these paths (relative to its working directory;
    /// with no path, that directory itself). Give it after the script, or end its paths with
    /// another option [default: off].
    #[arg(long, value_name = "PATH", num_args = 0..)]
    pub watch: Option<Vec<String>>,
    /// With --watch: ignore changes to paths matching this glob (repeatable, or several in one
    /// value separated by spaces); node_modules and .git are always ignored.
    #[arg(long, value_name = "GLOB")]
    pub ignore_watch: Vec<String>,
    /// With --watch: quiet time after the last change before the reload starts [default: 500ms].
    #[arg(long, value_name = "DURATION")]
    pub watch_delay: Option<String>,
    /// Exit codes that mean the program is done: such an exit is neither restarted nor a crash
    /// (0 to 255, separated by commas) [default: none].
    #[arg(long, value_name = "N,...", value_delimiter = ',')]
    pub stop_exit_codes: Vec<String>,
    /// A health check, restarting an instance gracefully when it fails: http://127.0.0.1:PORT/path
    /// (a 2xx or 3xx answer), tcp:PORT (the port accepts) or exec:CMD (exit 0, run in the app's
    /// directory) [default: none].
    #[arg(long, value_name = "PROBE")]
    pub health: Option<String>,
    /// With --health: time between probes [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub health_interval: Option<String>,
    /// With --health: how long a probe may take before it counts as failed; below the interval
    /// [default: 2s].
    #[arg(long, value_name = "DURATION")]
    pub health_timeout: Option<String>,
    /// With --health: failures in a row that restart the instance [default: 3].
    #[arg(long, value_name = "N")]
    pub health_failures: Option<String>,
    /// What makes a new process ready: `probe` (only a passing --health probe, within
    /// --listen-timeout) or `default` (a ready message, or --min-uptime up) [default: default].
    #[arg(long, value_name = "WHEN")]
    pub ready_when: Option<String>,
    /// Each process must send WATCHDOG=1 (sd_notify) at least this often once ready, or it is
    /// restarted; it gets WATCHDOG_USEC [default: off].
    #[arg(long, value_name = "DURATION")]
    pub watchdog: Option<String>,
}

/// `corral logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// App name or instance id; every app when left out.
    pub target: Option<String>,
    /// How many recent lines of each file.
    #[arg(long, default_value_t = 15)]
    pub lines: usize,
    /// Keep printing new lines.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Only stderr.
    #[arg(long, conflicts_with = "out")]
    pub err: bool,
    /// Only stdout.
    #[arg(long)]
    pub out: bool,
    /// Print the lines without the app prefix.
    #[arg(long)]
    pub raw: bool,
}

/// `corral events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// App name or instance id; every app when left out.
    pub target: Option<String>,
    /// How many recent events.
    #[arg(long, default_value_t = 20)]
    pub lines: usize,
    /// Keep printing new events.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Print each event as one line of JSON (JSON Lines).
    #[arg(long)]
    pub json: bool,
}

/// `corral state`.
#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Print a key's value.
    Get {
        /// The key.
        key: String,
    },
    /// Set a key.
    Set {
        /// The key.
        key: String,
        /// The value (a string).
        value: String,
        /// Remove it after this long: 30s, 5m.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
    /// Remove a key.
    #[command(alias = "rm")]
    Del {
        /// The key.
        key: String,
    },
    /// Add to the integer in a key.
    Incr {
        /// The key.
        key: String,
        /// The increment [default: 1].
        #[arg(allow_hyphen_values = true)]
        by: Option<i64>,
    },
    /// Compare-and-set: change a key only if it holds the value expected; prints whether it did.
    #[command(group(clap::ArgGroup::new("expected").required(true).args(["expect", "expect_missing"])))]
    #[command(group(clap::ArgGroup::new("change").required(true).args(["new", "delete"])))]
    Cas {
        /// The key.
        key: String,
        /// The value it must hold now.
        #[arg(long, value_name = "VALUE")]
        expect: Option<String>,
        /// It must not be set now.
        #[arg(long)]
        expect_missing: bool,
        /// The value it gets.
        #[arg(long, value_name = "VALUE")]
        new: Option<String>,
        /// It is removed.
        #[arg(long)]
        delete: bool,
        /// The new value is removed after this long: 30s, 5m.
        #[arg(long, value_name = "DURATION", conflicts_with = "delete")]
        ttl: Option<String>,
    },
    /// List keys matching a glob pattern.
    #[command(alias = "keys")]
    Ls {
        /// The pattern: *, user:*, job:[0-9]* [default: *].
        pattern: Option<String>,
    },
    /// Publish a message on a channel.
    Publish {
        /// The channel.
        channel: String,
        /// The message.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[test]
    fn the_definitions_hold_together() {
        Cli::command().debug_assert();
    }

    #[test]
    fn events_show_20_by_default_and_take_follow_and_json() {
        let Command::Events(args) = Cli::try_parse_from(["corral", "events"]).unwrap().command
        else {
            panic!("not events")
        };
        assert_eq!(
            (args.target, args.lines, args.follow, args.json),
            (None, 20, false, false)
        );
        let parsed =
            Cli::try_parse_from(["corral", "events", "api", "--lines", "5", "-f", "--json"]);
        let Command::Events(args) = parsed.unwrap().command else {
            panic!("not events")
        };
        assert_eq!(
            (args.target.as_deref(), args.lines, args.follow, args.json),
            (Some("api"), 5, true, true)
        );
    }

    #[test]
    fn reset_needs_a_target() {
        assert!(Cli::try_parse_from(["corral", "reset"]).is_err());
        let Command::Reset { target } = Cli::try_parse_from(["corral", "reset", "all"])
            .unwrap()
            .command
        else {
            panic!("not reset")
        };
        assert_eq!(target, "all");
    }
}
