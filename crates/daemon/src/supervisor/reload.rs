//! Rolling reloads: each app's instances one at a time (the agent first), in the order
//! `corral_policy::rolling` keeps; a reload of several apps answers once every one is done,
//! with a line per app, and fails if any failed.

use corral_policy::lifecycle::{Cause, Input};
use corral_policy::rolling::{Rolling, Step};
use corral_proto::{ErrorKind, Response};
use tokio::sync::oneshot;

use super::{Supervisor, error};

/// One `corral reload`: its apps and where the answer goes.
#[derive(Debug)]
pub struct ReloadGroup {
    apps: Vec<AppReload>,
    reply: Option<oneshot::Sender<Response>>,
}

#[derive(Debug)]
struct AppReload {
    name: String,
    /// Why: a person's reload, or a policy's (cron, watch).
    cause: Cause,
    detail: String,
    rolling: Rolling,
    /// How it ended: the line for the answer, and whether it went well.
    outcome: Option<Result<String, String>>,
}

impl Supervisor {
    pub(super) fn reload(&mut self, target: &str, reply: oneshot::Sender<Response>) {
        let names: Vec<String> = if target == "all" {
            self.apps.iter().map(|a| a.spec.name.clone()).collect()
        } else if self.apps.iter().any(|a| a.spec.name == target) {
            vec![target.to_string()]
        } else {
            let _ = reply.send(self.unknown_app(target));
            return;
        };
        if let Some(busy) = names.iter().find(|n| self.is_reloading(n)) {
            let _ = reply.send(error(
                ErrorKind::InvalidSpec,
                format!("'{busy}' is being reloaded already; wait for that reload to finish"),
            ));
            return;
        }
        if names.is_empty() {
            let _ = reply.send(Response::Done {
                message: "no app to reload".into(),
            });
            return;
        }
        self.roll(names, Cause::Reload, "a reload", Some(reply));
    }

    fn is_reloading(&self, name: &str) -> bool {
        self.reloads
            .iter()
            .flat_map(|g| &g.apps)
            .any(|r| r.name == name && r.outcome.is_none())
    }

    /// A policy's rolling replacement of app `name` (its cron schedule, its watched files);
    /// nothing when one is under way already.
    pub(super) fn roll_for(&mut self, name: &str, cause: Cause, detail: &str) {
        if self.is_reloading(name) {
            crate::log!("app '{name}': {detail}, but it is being reloaded already");
            return;
        }
        self.roll(vec![name.to_string()], cause, detail, None);
    }

    fn roll(
        &mut self,
        names: Vec<String>,
        cause: Cause,
        detail: &str,
        reply: Option<oneshot::Sender<Response>>,
    ) {
        let apps = names
            .into_iter()
            .map(|name| {
                let mut queue: Vec<(bool, u32, u32)> = self
                    .apps
                    .iter()
                    .filter(|a| a.spec.name == name)
                    .flat_map(|a| a.instances.iter().map(|i| (!i.agent, i.index, i.id)))
                    .collect();
                // The agent first, as at start.
                queue.sort_unstable();
                crate::log!(
                    "reloading app '{name}' ({detail}): {} instance(s), one at a time",
                    queue.len()
                );
                AppReload {
                    name,
                    cause,
                    detail: detail.to_string(),
                    rolling: Rolling::new(queue.into_iter().map(|(_, _, id)| id)),
                    outcome: None,
                }
            })
            .collect();
        self.reloads.push(ReloadGroup { apps, reply });
        self.advance_reloads();
    }

    /// An instance's replacement is over: its reload may go on.
    pub(super) fn reload_replaced(&mut self, id: u32, result: Result<(), String>) {
        for app in self.reloads.iter_mut().flat_map(|g| &mut g.apps) {
            if app.rolling.under_way() == Some(id) {
                app.rolling.replaced(id, result);
                return;
            }
        }
    }

    pub(super) fn forget_in_reloads(&mut self, id: u32) {
        for app in self.reloads.iter_mut().flat_map(|g| &mut g.apps) {
            app.rolling.forget(id);
        }
    }

    /// Whether every process instance `id` retired is gone (group too).
    fn old_gone(&self, id: u32) -> bool {
        self.instance(id)
            .is_none_or(|inst| inst.slot.old().is_empty())
            && !self.lingering.iter().any(|l| l.instance == id)
    }

    /// Moves every reload as far as it can go now; answers those that are over.
    pub(super) fn advance_reloads(&mut self) {
        let mut g = 0;
        while g < self.reloads.len() {
            for r in 0..self.reloads[g].apps.len() {
                self.advance_app(g, r);
            }
            if self.reloads[g].apps.iter().all(|r| r.outcome.is_some()) {
                let group = self.reloads.remove(g);
                let response = self.answer(&group);
                if let Some(reply) = group.reply {
                    let _ = reply.send(response);
                }
            } else {
                g += 1;
            }
        }
    }

    fn advance_app(&mut self, g: usize, r: usize) {
        while self.reloads[g].apps[r].outcome.is_none() {
            let mut rolling = std::mem::take(&mut self.reloads[g].apps[r].rolling);
            let step = rolling.next(|id| self.old_gone(id));
            let name = self.reloads[g].apps[r].name.clone();
            let replaced = rolling.replaced_ids().len();
            self.reloads[g].apps[r].rolling = rolling;
            let outcome = match step {
                Step::Wait => return,
                Step::Replace(id) => {
                    let app = &self.reloads[g].apps[r];
                    let (cause, detail) = (app.cause, app.detail.clone());
                    // A person's reload overlaps, as it always has; a policy's follows what the
                    // app can take (a program binding its own port is stopped first).
                    let overlap = cause.is_user()
                        || self
                            .apps
                            .iter()
                            .find(|a| a.spec.name == name)
                            .is_some_and(super::app::App::overlaps);
                    self.feed(
                        id,
                        Input::Replace {
                            cause,
                            overlap,
                            detail,
                        },
                    );
                    continue;
                }
                Step::Done => Ok(format!("reloaded '{name}': {replaced} instance(s)")),
                Step::Failed { id, why } => Err(self.failure(&name, id, &why)),
            };
            self.reloads[g].apps[r].outcome = Some(outcome);
        }
    }

    /// Why a reload stopped, and what became of the instance it stopped at.
    fn failure(&self, app: &str, id: u32, why: &str) -> String {
        let Some(inst) = self.instance(id) else {
            return format!("reload of '{app}' stopped: an instance was deleted meanwhile");
        };
        crate::log!("reload of app '{app}' stopped at {}: {why}", inst.label());
        let outcome = if inst.slot.routable().is_some() {
            "The old processes keep serving: fix the cause (`corral logs` shows it) and reload \
             again"
        } else if inst.slot.wanted() {
            "Its old process had exited meanwhile, so that instance is down: fix the cause and \
             run `corral restart`"
        } else {
            "That instance was stopped meanwhile"
        };
        format!(
            "reload of '{app}' stopped at instance {}: its new process {why}. {outcome}",
            inst.index
        )
    }

    fn answer(&mut self, group: &ReloadGroup) -> Response {
        let failed: Vec<&String> = group
            .apps
            .iter()
            .filter_map(|r| r.outcome.as_ref()?.as_ref().err())
            .collect();
        if failed.is_empty() {
            let ids: Vec<u32> = group
                .apps
                .iter()
                .flat_map(|r| self.app_ids(&r.name))
                .collect();
            return self.report(&ids);
        }
        if group.apps.len() == 1 {
            return error(ErrorKind::Spawn, failed[0].clone());
        }
        let lines: Vec<String> = group
            .apps
            .iter()
            .filter_map(|r| match r.outcome.as_ref()? {
                Ok(line) => Some(format!("  ok: {line}")),
                Err(line) => Some(format!("  failed: {line}")),
            })
            .collect();
        error(
            ErrorKind::Spawn,
            format!(
                "{} of {} app(s) failed to reload:\n{}",
                failed.len(),
                group.apps.len(),
                lines.join("\n")
            ),
        )
    }
}
