//! Answers that wait: a stop, delete or kill answers once its instances are down (process and
//! group gone); a restart once each is started again; a scale-up once its new instances are
//! ready, or one of them failed.

use corral_policy::lifecycle::Phase;
use corral_proto::{ErrorKind, Response};
use tokio::sync::oneshot;

use super::{Supervisor, error};

#[derive(Debug)]
pub struct Waiter {
    /// The instances it waits for.
    pub ids: Vec<u32>,
    pub until: Until,
    pub then: Then,
}

/// What the instances must have reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    /// No process, no lingering group.
    Down,
    /// Past stopping: started again (or failed to).
    Restarted,
}

#[derive(Debug)]
pub enum Then {
    /// Answer with the rows of these instances.
    Report(Vec<u32>, oneshot::Sender<Response>),
    /// Answer with this line.
    Done(String, oneshot::Sender<Response>),
    /// Forget the instances, then answer with this line.
    Remove(String, oneshot::Sender<Response>),
}

/// A `scale` up waiting for its new instances to be ready (or for one to fail).
#[derive(Debug)]
pub struct ReadyWaiter {
    pub app: String,
    pub ids: Vec<u32>,
    pub reply: oneshot::Sender<Response>,
}

impl Supervisor {
    pub(super) fn is_down(&self, id: u32) -> bool {
        self.instance(id).is_none_or(|inst| {
            inst.slot.is_down() && !self.lingering.iter().any(|l| l.instance == id)
        })
    }

    fn reached(&self, id: u32, until: Until) -> bool {
        match until {
            Until::Down => self.is_down(id),
            Until::Restarted => self
                .instance(id)
                .is_none_or(|inst| inst.slot.phase() != Phase::Stopping),
        }
    }

    pub(super) fn settle_waiters(&mut self) {
        let mut n = 0;
        while n < self.waiters.len() {
            let waiter = &self.waiters[n];
            if waiter.ids.iter().all(|&id| self.reached(id, waiter.until)) {
                let waiter = self.waiters.swap_remove(n);
                self.complete(waiter);
            } else {
                n += 1;
            }
        }
    }

    fn complete(&mut self, waiter: Waiter) {
        match waiter.then {
            Then::Report(ids, reply) => {
                let _ = reply.send(self.report(&ids));
            }
            Then::Done(message, reply) => {
                let _ = reply.send(Response::Done { message });
            }
            Then::Remove(message, reply) => {
                for id in &waiter.ids {
                    self.forget_in_reloads(*id);
                }
                for app in &mut self.apps {
                    app.instances.retain(|inst| {
                        let remove = waiter.ids.contains(&inst.id);
                        if remove {
                            inst.out.close();
                            inst.err.close();
                        }
                        !remove
                    });
                }
                self.apps.retain(|a| !a.instances.is_empty());
                let _ = reply.send(Response::Done { message });
            }
        }
    }

    /// Answers each `scale` whose new instances are all online, or one of which failed.
    pub(super) fn settle_ready_waiters(&mut self) {
        let mut n = 0;
        while n < self.ready_waiters.len() {
            let waiter = &self.ready_waiters[n];
            let mut failed = None;
            let mut pending = false;
            for &id in &waiter.ids {
                let Some(inst) = self.instance(id) else {
                    continue;
                };
                match inst.slot.phase() {
                    Phase::Online | Phase::Unresponsive => {}
                    Phase::Starting => pending = true,
                    phase => {
                        let why = inst.slot.last_exit().map_or_else(
                            || super::report::status(phase).to_string(),
                            str::to_string,
                        );
                        failed = Some((inst.index, why));
                    }
                }
            }
            if pending && failed.is_none() {
                n += 1;
                continue;
            }
            let waiter = self.ready_waiters.swap_remove(n);
            let response = match failed {
                None => {
                    let ids = self.app_ids(&waiter.app);
                    self.report(&ids)
                }
                Some((index, why)) => error(
                    ErrorKind::Spawn,
                    format!(
                        "'{}' was scaled up, but its new instance {index} did not become ready: \
                         {why}. It is restarted by its restart policy; `corral logs {}` shows why",
                        waiter.app, waiter.app
                    ),
                ),
            };
            let _ = waiter.reply.send(response);
        }
    }
}
