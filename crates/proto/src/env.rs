//! Environment variables corral sets for the programs it runs, and the ones it reads.

/// Name of the app an instance belongs to.
pub const CORRAL_APP: &str = "CORRAL_APP";
/// Index of the instance within its app, `0..instances`.
pub const CORRAL_INSTANCE: &str = "CORRAL_INSTANCE";
/// The instance's id, unique within one daemon (the `id` column of `corral ls`).
pub const CORRAL_ID: &str = "CORRAL_ID";
/// PM2's name for the instance index, set too so that PM2 apps run unchanged.
pub const NODE_APP_INSTANCE: &str = "NODE_APP_INSTANCE";
/// Directory of the daemon's files; read by the CLI and the daemon.
pub const CORRAL_HOME: &str = "CORRAL_HOME";
/// Number of the descriptor of the worker's end of its channel to the master.
pub const CORRAL_CHANNEL_FD: &str = "CORRAL_CHANNEL_FD";
/// Version of the channel protocol.
pub const CORRAL_CHANNEL_PROTOCOL: &str = "CORRAL_CHANNEL_PROTOCOL";
/// Set for every program corral runs: it is a worker (the value is its instance id).
pub const CORRAL_WORKER_ID: &str = "CORRAL_WORKER_ID";
/// Systemd socket activation: how many listening sockets start at descriptor 3.
pub const LISTEN_FDS: &str = "LISTEN_FDS";
/// Systemd socket activation: the pid the sockets are meant for.
pub const LISTEN_PID: &str = "LISTEN_PID";
/// Systemd socket activation: the sockets' names, separated by `:`.
pub const LISTEN_FDNAMES: &str = "LISTEN_FDNAMES";
/// How connections reach the app's workers: `rr`, `least-conn`, `shared` or `proxy`.
pub const CORRAL_LB: &str = "CORRAL_LB";
/// `worker`, or `agent` for an app's agent (`--agent`): one process, never given connections.
pub const CORRAL_ROLE: &str = "CORRAL_ROLE";
