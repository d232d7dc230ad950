//! Lifecycle events: every transition a slot reports becomes a [`LifecycleEvent`], kept with
//! its app (for `describe` and `corral events`), broadcast to followers, and written to the
//! daemon's log.

use std::time::{SystemTime, UNIX_EPOCH};

use corral_policy::lifecycle::{Cause, Phase, Transition};
use corral_proto::{ErrorKind, LifecycleEvent, Response};
use tokio::sync::broadcast;

use super::app::EVENTS_KEPT;
use super::report::status;
use super::{Supervisor, error};
use crate::inbox::{EventFeed, EventFilter};

/// How many events a follower may fall behind before it misses some.
const FOLLOWER_BACKLOG: usize = 1024;

/// The daemon's stream of events.
#[derive(Debug)]
pub struct Journal {
    seq: u64,
    live: broadcast::Sender<LifecycleEvent>,
}

impl Journal {
    pub fn new() -> Journal {
        Journal {
            seq: 0,
            live: broadcast::Sender::new(FOLLOWER_BACKLOG),
        }
    }
}

impl Supervisor {
    /// Records a transition of instance `id`.
    pub(super) fn record(&mut self, id: u32, t: Transition) {
        let Some((a, i)) = self.locate(id) else {
            return;
        };
        let app = &mut self.apps[a];
        let name = app.spec.name.clone();
        let inst = &mut app.instances[i];
        if t.to == Phase::Errored && t.cause == Cause::CrashLoop {
            let last = inst.slot.last_exit().unwrap_or_default().to_string();
            inst.slot.set_last_exit(format!(
                "{last}. Read `corral logs {name}`, fix the cause, then run `corral restart \
                 {name}`"
            ));
        }
        let label = inst.label();
        if matches!(t.cause, Cause::NotReady | Cause::ChannelFault)
            && let Some(pid) = t.pid
        {
            crate::log!("app '{name}' {label} (pid {pid}) {}: ending it", t.detail);
        }
        self.journal.seq += 1;
        let at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let event = LifecycleEvent {
            seq: self.journal.seq,
            at_ms,
            app: name.clone(),
            instance: inst.index,
            id,
            pid: t.pid,
            from: status(t.from),
            to: status(t.to),
            cause: t.cause.word().into(),
            reason: t.detail,
        };
        let pid = event.pid.map(|p| format!(" pid {p}")).unwrap_or_default();
        let reason = if event.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", event.reason)
        };
        crate::log!(
            "app '{name}' {label}{pid}: {} -> {} ({}){reason}",
            event.from,
            event.to,
            event.cause
        );
        if app.events.len() >= EVENTS_KEPT {
            app.events.pop_front();
        }
        app.events.push_back(event.clone());
        // Nobody following is fine.
        let _ = self.journal.live.send(event);
    }

    /// The recent events of a target and the live feed, for `corral events`.
    pub(super) fn event_feed(
        &self,
        target: Option<&str>,
        lines: usize,
    ) -> Result<EventFeed, Response> {
        let filter = match target {
            None | Some("all") => None,
            Some(t) => match t.parse::<u32>() {
                Ok(id) if self.locate(id).is_some() => Some(EventFilter::Id(id)),
                Ok(id) => {
                    return Err(error(
                        ErrorKind::UnknownTarget,
                        format!("no instance has id {id}: `corral ls` lists the ids"),
                    ));
                }
                Err(_) if self.apps.iter().any(|a| a.spec.name == t) => {
                    Some(EventFilter::App(t.to_string()))
                }
                Err(_) => return Err(self.unknown_app(t)),
            },
        };
        let mut recent: Vec<LifecycleEvent> = self
            .apps
            .iter()
            .flat_map(|a| a.events.iter())
            .filter(|e| filter.as_ref().is_none_or(|f| f.wants(e)))
            .cloned()
            .collect();
        recent.sort_by_key(|e| e.seq);
        let skip = recent.len().saturating_sub(lines);
        recent.drain(..skip);
        Ok(EventFeed {
            recent,
            live: self.journal.live.subscribe(),
            filter,
        })
    }
}
