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
