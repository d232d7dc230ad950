//! Lifecycle events: every change of an instance's status, with its cause. `corral describe`
//! shows an app's last ones, `corral events` follows them live; the dashboard and metrics of
//! later work read the same stream.

use serde::{Deserialize, Serialize};

use crate::Status;

/// One transition of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    /// A number that grows by one with every event of this daemon (a follower that missed some
    /// sees the gap).
    pub seq: u64,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// App name.
    pub app: String,
    /// Instance index within the app (`u32::MAX` for the agent).
    pub instance: u32,
    /// Instance id.
    pub id: u32,
    /// The process the event is about, when there is one.
    pub pid: Option<u32>,
    /// Status before.
    pub from: Status,
    /// Status after.
    pub to: Status,
    /// The cause, as one word: `start`, `ready`, `crash`, `stop`, `restart`, `reload`,
    /// `memory`, `cron`, `watch`, `health`, `watchdog`, `unresponsive`, `not-ready`,
    /// `going-down`, `done`, `spawn-failed`, `crash-loop`, `channel-fault` (see
    /// `docs/lifecycle.md`)
    pub cause: String,
    /// What happened, for a person.
    pub reason: String,
}
