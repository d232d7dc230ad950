//! The runtime policies of an app, each one more reason to replace an instance: its memory
//! limit, its cron schedule, its watched files, its health check, its watchdog.

use super::Supervisor;
use crate::inbox::Event;

impl Supervisor {
    pub(super) fn policy_event(&mut self, event: Event) {
        let _ = event;
    }
}
