//! The channel between the master and each worker: a Unix stream socket whose worker end is the
//! descriptor named by [`crate::env::CORRAL_CHANNEL_FD`]. Frames are those of [`crate::frame`]
//! (4-byte big-endian length, then JSON), at most [`MAX_CHANNEL_FRAME_LEN`] bytes.

use serde::{Deserialize, Serialize};

/// Version of the channel protocol, given to workers in [`crate::env::CORRAL_CHANNEL_PROTOCOL`].
pub const CHANNEL_PROTOCOL_VERSION: u32 = 1;

/// The largest frame on a worker channel: 1 MiB.
pub const MAX_CHANNEL_FRAME_LEN: usize = 1024 * 1024;

/// What a worker tells the master.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WorkerMessage {
    /// The worker is ready for work.
    Ready,
    /// The worker is about to exit (a panic, an uncaught exception, a memory limit): the master
    /// starts its replacement at once and lets it finish its open work.
    GoingDown {
        /// Why, for the log.
        #[serde(default)]
        reason: String,
    },
    /// Any JSON for the master (logged today).
    Message {
        /// The payload.
        data: serde_json::Value,
    },
}
