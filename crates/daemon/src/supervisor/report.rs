//! What `ls`, `describe` and the answers of commands show: one row per instance, and one more
//! per process it is replacing or retiring.

use corral_policy::lifecycle::{Phase, Proc};
use corral_proto::{AppInfo, ErrorKind, InstanceInfo, Response, Role, Status};

use super::{Supervisor, error};
use crate::stats;

/// The status a phase is shown as.
pub fn status(phase: Phase) -> Status {
    match phase {
        Phase::Starting => Status::Starting,
        Phase::Online => Status::Online,
        Phase::Unresponsive => Status::Unresponsive,
        Phase::Stopping => Status::Stopping,
        Phase::Stopped => Status::Stopped,
        Phase::BackingOff => Status::BackingOff,
        Phase::Errored => Status::Errored,
        Phase::Draining => Status::Draining,
    }
}

impl Supervisor {
    pub(super) fn report(&mut self, ids: &[u32]) -> Response {
        let mut instances: Vec<InstanceInfo> = Vec::new();
        for &id in ids {
            let Some(row) = self.info(id) else { continue };
            let extra = self.extra_rows(&row);
            instances.push(row);
            instances.extend(extra);
        }
        let live: Vec<u32> = self.procs.keys().copied().collect();
        self.cpu.retain(|pid| live.contains(&pid));
        Response::Instances { instances }
    }

    /// The rows of a replacement starting (`starting`) and of retired processes (`draining`).
    fn extra_rows(&mut self, row: &InstanceInfo) -> Vec<InstanceInfo> {
        let Some(inst) = self.instance(row.id) else {
            return Vec::new();
        };
        let others: Vec<(u32, Status)> = inst
            .slot
            .next()
            .map(|p| (p.pid, Status::Starting))
            .into_iter()
            .chain(inst.slot.old().iter().map(|p| (p.pid, Status::Draining)))
            .collect();
        let mut rows = Vec::new();
        for (pid, status) in others {
            let Some(uptime) = self.procs.get(&pid).map(|io| io.started.elapsed()) else {
                continue;
            };
            let mut extra = row.clone();
            extra.pid = Some(pid);
            extra.status = status;
            extra.uptime_ms = Some(uptime.as_millis() as u64);
            extra.cpu_percent = self.cpu.percent(pid, uptime);
            extra.memory_bytes = stats::resident_bytes(pid).unwrap_or(0);
            extra.last_exit = None;
            rows.push(extra);
        }
        rows
    }

    pub(super) fn info(&mut self, id: u32) -> Option<InstanceInfo> {
        let (a, i) = self.locate(id)?;
        let app = &self.apps[a];
        let inst = &app.instances[i];
        let current: Option<&Proc> = inst.slot.current();
        let pid = current.map(|p| p.pid);
        let uptime = pid.and_then(|pid| Some(self.procs.get(&pid)?.started.elapsed()));
        let (cpu_percent, memory_bytes) = match (pid, uptime) {
            (Some(pid), Some(uptime)) => (
                self.cpu.percent(pid, uptime),
                stats::resident_bytes(pid).unwrap_or(0),
            ),
            _ => (0.0, 0),
        };
        Some(InstanceInfo {
            id,
            app: app.spec.name.clone(),
            instance: inst.index,
            pid,
            status: status(inst.slot.phase()),
            uptime_ms: uptime.map(|u| u.as_millis() as u64),
            restarts: inst.slot.restarts(),
            last_restart: inst.slot.last_restart().map(|c| c.word().to_string()),
            unstable_restarts: inst.slot.unstable_restarts(),
            cpu_percent,
            memory_bytes,
            last_exit: inst.slot.last_exit().map(str::to_string),
            role: if inst.agent {
                Role::Agent
            } else {
                Role::Worker
            },
            listen: app
                .listeners
                .iter()
                .chain(app.node_servers.values().map(|s| &s.listener))
                .map(|l| l.resolved.clone())
                .collect(),
        })
    }

    pub(super) fn describe(&mut self, target: &str) -> Response {
        let app = match target.parse::<u32>() {
            Ok(id) => self.locate(id).map(|(a, _)| a),
            Err(_) => self.apps.iter().position(|a| a.spec.name == target),
        };
        let Some(app) = app else {
            return match target.parse::<u32>() {
                Ok(id) => error(
                    ErrorKind::UnknownTarget,
                    format!("no instance has id {id}: `corral ls` lists the ids"),
                ),
                Err(_) => self.unknown_app(target),
            };
        };
        let ids: Vec<u32> = self.apps[app].instances.iter().map(|i| i.id).collect();
        let instances = ids.iter().filter_map(|&id| self.info(id)).collect();
        let app = &self.apps[app];
        let log_files = app
            .instances
            .iter()
            .map(|i| (i.index, i.out.path().into(), i.err.path().into()))
            .collect();
        Response::App(Box::new(AppInfo {
            spec: app.spec.clone(),
            instances,
            log_files,
            events: app.events.iter().cloned().collect(),
        }))
    }
}
