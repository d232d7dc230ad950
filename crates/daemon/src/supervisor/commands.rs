//! The client's requests: each becomes inputs to instances' slots, and an answer now or once
//! the instances got where the request takes them (see [`super::waiters`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use corral_policy::lifecycle::{Cause, Input, Slot};
use corral_proto::channel::MasterMessage;
use corral_proto::signal::Signal;
use corral_proto::{AppSpec, ErrorKind, Request, Response, Stream};
use tokio::sync::oneshot;

use super::app::{App, Instance, settings};
use super::waiters::{ReadyWaiter, Then, Until, Waiter};
use super::{AGENT_INDEX, MAX_INSTANCES, Supervisor, error, validate};
use crate::balance::{Balancer, Codec};
use crate::listeners::{self, Listener};
use crate::logs::LogSink;
use crate::node;
use crate::proxy::{self, Router};

impl Supervisor {
    pub(super) fn request(&mut self, request: Request, reply: oneshot::Sender<Response>) {
        if self.shutting_down && !matches!(request, Request::Ping | Request::List) {
            let _ = reply.send(error(
                ErrorKind::ShuttingDown,
                "the daemon is shutting down; run the command again in a moment",
            ));
            return;
        }
        let immediate = match request {
            Request::Ping => Response::Pong {
                pid: std::process::id(),
                version: corral_proto::PACKAGE_VERSION.into(),
                uptime_ms: self.epoch.elapsed().as_millis() as u64,
            },
            Request::Start { apps, base_env } => self.start(apps, &base_env),
            Request::List => {
                let ids = self.all_ids();
                self.report(&ids)
            }
            Request::Describe { target } => self.describe(&target),
            Request::Stop { target } => {
                return self.stop_target(&target, Cause::Stop, reply);
            }
            Request::Restart { target } => {
                return self.restart(&target, reply);
            }
            Request::Reload { target } => {
                return self.reload(&target, reply);
            }
            Request::Delete { target } => {
                return self.stop_target(&target, Cause::Delete, reply);
            }
            Request::Scale { app, instances } => {
                return self.scale(&app, instances, reply);
            }
            Request::Reset { target } => self.reset(&target),
            Request::Signal { target, signal } => self.signal(&target, signal),
            Request::Send {
                target,
                data,
                reply: true,
                timeout_ms,
            } => match self.resolve(&target) {
                Ok(ids) => {
                    let pids: Vec<u32> = ids
                        .iter()
                        .filter_map(|&id| Some(self.instance(id)?.slot.current()?.pid))
                        .collect();
                    self.bus.request_from_cli(&pids, &data, timeout_ms, reply);
                    return;
                }
                Err(response) => response,
            },
            Request::Send { target, data, .. } => self.send(&target, &data),
            Request::State { app, call } => {
                return self.state(app.as_deref(), call, reply);
            }
            Request::Logs { .. } | Request::Events { .. } => error(
                ErrorKind::BadFrame,
                "logs and events requests are served by the connection, not the supervisor",
            ),
            Request::Flush { target } => self.flush(target.as_deref()),
            Request::Save { force } => self.save(force),
            Request::Resurrect { base_env } => self.resurrect(&base_env),
            Request::Kill => {
                self.shutting_down = true;
                let ids = self.all_ids();
                self.stop_ids(&ids, Cause::Shutdown);
                let message = format!("stopped {} app(s); the daemon exits", self.apps.len());
                self.waiters.push(Waiter {
                    ids,
                    until: Until::Down,
                    then: Then::Done(message, reply),
                });
                self.settle_waiters();
                return;
            }
        };
        let _ = reply.send(immediate);
    }

    fn start(&mut self, specs: Vec<AppSpec>, base_env: &BTreeMap<String, String>) -> Response {
        for (n, spec) in specs.iter().enumerate() {
            if let Err(message) = validate(spec) {
                return error(
                    ErrorKind::InvalidSpec,
                    format!("app '{}': {message}", spec.name),
                );
            }
            if let Some(existing) = self.apps.iter().find(|a| a.spec.name == spec.name) {
                let id = existing.instances.first().map_or(0, |i| i.id);
                return error(
                    ErrorKind::DuplicateName,
                    format!(
                        "an app named '{}' exists already (id {id}): give this one another \
                         --name, or run `corral restart {}`",
                        spec.name, spec.name
                    ),
                );
            }
            if specs[..n].iter().any(|s| s.name == spec.name) {
                return error(
                    ErrorKind::DuplicateName,
                    format!(
                        "two apps are named '{}': app names must be unique",
                        spec.name
                    ),
                );
            }
        }
        // Every address of every app first: a failure starts nothing.
        let mut bound = Vec::new();
        for spec in &specs {
            match spec.listen.iter().map(|a| listeners::bind(a)).collect() {
                Ok(listeners) => bound.push(listeners),
                Err(message) => {
                    return error(
                        ErrorKind::InvalidSpec,
                        format!("app '{}': {message}", spec.name),
                    );
                }
            }
        }
        let mut started = Vec::new();
        for (spec, listeners) in specs.into_iter().zip(bound) {
            started.extend(self.add_app(spec, base_env.clone(), listeners));
        }
        self.report(&started)
    }

    fn add_app(
        &mut self,
        spec: AppSpec,
        base_env: BTreeMap<String, String>,
        listeners: Vec<Listener>,
    ) -> Vec<u32> {
        crate::log!(
            "starting app '{}': {} instance(s) of {}",
            spec.name,
            spec.instances,
            spec.script.display()
        );
        let count = spec.instances;
        for listener in &listeners {
            crate::log!("app '{}' listens on {}", spec.name, listener.resolved);
        }
        let (mut router, mut balancer, mut accept_loops) = (None, None, Vec::new());
        match spec.lb {
            corral_proto::LbMode::Proxy => {
                let proxy = Arc::new(Router::default());
                accept_loops = proxy::serve(&spec.name, &listeners, &proxy);
                router = Some(proxy);
            }
            corral_proto::LbMode::RoundRobin | corral_proto::LbMode::LeastConn => {
                let least_conn = spec.lb == corral_proto::LbMode::LeastConn;
                let shared = Balancer::new(&spec.name, least_conn, None);
                accept_loops = shared.serve(&spec.name, &listeners);
                balancer = Some(shared);
            }
            corral_proto::LbMode::Shared => {}
        }
        self.apps.push(App {
            settings: settings(&spec, false, false),
            agent_settings: settings(&spec, true, false),
            spec,
            base_env,
            instances: Vec::new(),
            listeners,
            router,
            balancer,
            accept_loops,
            node_servers: BTreeMap::new(),
            events: VecDeque::new(),
            watcher: None,
            cron: None,
        });
        let app = self.apps.len() - 1;
        self.start_app_policies(app);
        let mut ids = Vec::new();
        if self.apps[app].spec.agent.is_some() {
            ids.push(self.add_process(app, AGENT_INDEX, true));
        }
        ids.extend((0..count).map(|index| self.add_process(app, index, false)));
        ids
    }

    /// An instance, the app's agent when `agent` (its index is [`AGENT_INDEX`]); started at
    /// once, or for a worker once the app's agent is ready.
    fn add_process(&mut self, app: usize, index: u32, agent: bool) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        let spec = &self.apps[app].spec;
        let sink = |stream| {
            let path = if agent {
                self.home.agent_log_file(&spec.name, stream)
            } else {
                self.home.log_file(&spec.name, index, stream)
            };
            LogSink::new(path, spec.log_max_size, spec.log_keep)
        };
        let instance = Instance {
            id,
            index,
            slot: Slot::new(),
            out: sink(Stream::Out),
            err: sink(Stream::Err),
            agent,
            held: false,
            stop_after_workers: None,
        };
        self.apps[app].instances.push(instance);
        self.feed(id, Input::Start(Cause::Start));
        id
    }

    /// Asks instances to stop. An agent whose workers are still up waits for them: it goes
    /// last (see `agent_order`).
    pub(super) fn stop_ids(&mut self, ids: &[u32], cause: Cause) {
        for &id in ids {
            let Some((a, i)) = self.locate(id) else {
                continue;
            };
            let app = &mut self.apps[a];
            let workers_up = app.instances.iter().any(|w| !w.agent && !w.slot.is_down());
            let inst = &mut app.instances[i];
            inst.held = false;
            if inst.agent && workers_up && !inst.slot.is_down() {
                inst.stop_after_workers = Some(cause);
                continue;
            }
            self.feed(id, Input::Stop(cause));
        }
    }

    fn stop_target(&mut self, target: &str, cause: Cause, reply: oneshot::Sender<Response>) {
        let ids = match self.resolve(target) {
            Ok(ids) => ids,
            Err(response) => {
                let _ = reply.send(response);
                return;
            }
        };
        self.stop_ids(&ids, cause);
        let then = if cause == Cause::Delete {
            Then::Remove(
                format!("deleted {target} ({} instance(s))", ids.len()),
                reply,
            )
        } else {
            Then::Report(ids.clone(), reply)
        };
        self.waiters.push(Waiter {
            ids,
            until: Until::Down,
            then,
        });
        self.settle_waiters();
    }

    fn restart(&mut self, target: &str, reply: oneshot::Sender<Response>) {
        let ids = match self.resolve(target) {
            Ok(ids) => ids,
            Err(response) => {
                let _ = reply.send(response);
                return;
            }
        };
        for &id in &ids {
            self.feed(id, Input::Restart(Cause::Restart));
        }
        self.waiters.push(Waiter {
            ids: ids.clone(),
            until: Until::Restarted,
            then: Then::Report(ids, reply),
        });
        self.settle_waiters();
    }

    /// Grows or shrinks an app: growing answers once the new instances are ready, shrinking
    /// once the removed ones are down.
    fn scale(&mut self, name: &str, count: u32, reply: oneshot::Sender<Response>) {
        if count == 0 || count > MAX_INSTANCES {
            let _ = reply.send(error(
                ErrorKind::InvalidSpec,
                format!(
                    "cannot scale '{name}' to {count}: give 1 to {MAX_INSTANCES} instances \
                     (`corral stop {name}` stops them all)"
                ),
            ));
            return;
        }
        let Some(app) = self.apps.iter().position(|a| a.spec.name == name) else {
            let _ = reply.send(self.unknown_app(name));
            return;
        };
        let current = self.apps[app].instances.iter().filter(|i| !i.agent).count() as u32;
        self.apps[app].spec.instances = count;
        if count >= current {
            let mut ids = Vec::new();
            for _ in current..count {
                let used: BTreeSet<u32> =
                    self.apps[app].instances.iter().map(|i| i.index).collect();
                let index = (0..=MAX_INSTANCES)
                    .find(|i| !used.contains(i))
                    .expect("fewer than MAX_INSTANCES are in use");
                ids.push(self.add_process(app, index, false));
            }
            let app = name.to_string();
            self.ready_waiters.push(ReadyWaiter { app, ids, reply });
            self.settle_ready_waiters();
            return;
        }
        let mut by_index: Vec<(u32, u32)> = self.apps[app]
            .instances
            .iter()
            .filter(|i| !i.agent)
            .map(|i| (i.index, i.id))
            .collect();
        by_index.sort_unstable();
        let removed: Vec<u32> = by_index[count as usize..]
            .iter()
            .map(|&(_, id)| id)
            .collect();
        self.stop_ids(&removed, Cause::Scale);
        let message = format!("scaled '{name}' from {current} to {count} instance(s)");
        self.waiters.push(Waiter {
            ids: removed,
            until: Until::Down,
            then: Then::Remove(message, reply),
        });
        self.settle_waiters();
    }

    fn reset(&mut self, target: &str) -> Response {
        match self.resolve(target) {
            Ok(ids) => {
                for &id in &ids {
                    self.feed(id, Input::Reset);
                }
                self.report(&ids)
            }
            Err(response) => response,
        }
    }

    fn signal(&mut self, target: &str, number: i32) -> Response {
        let ids = match self.resolve(target) {
            Ok(ids) => ids,
            Err(response) => return response,
        };
        let name = Signal::describe(number);
        let mut sent = 0;
        for id in ids {
            if let Some(pid) = self
                .instance(id)
                .and_then(|i| i.slot.current().map(|p| p.pid))
            {
                match corral_sys::kill(pid, number) {
                    Ok(()) => sent += 1,
                    Err(e) => crate::log!("sending {name} to pid {pid}: {e}"),
                }
            }
        }
        if sent == 0 {
            return error(
                ErrorKind::UnknownTarget,
                format!("no instance of {target} is running, so none got {name}"),
            );
        }
        Response::Done {
            message: format!("sent {name} to {sent} instance(s) of {target}"),
        }
    }

    fn send(&mut self, target: &str, data: &serde_json::Value) -> Response {
        let ids = match self.resolve(target) {
            Ok(ids) => ids,
            Err(response) => return response,
        };
        let mut sent = 0;
        for id in ids {
            let conduit = self
                .instance(id)
                .and_then(|i| i.slot.current())
                .and_then(|p| self.procs.get(&p.pid)?.conduit.clone());
            let Some(conduit) = conduit else { continue };
            match conduit.codec() {
                Codec::Node => conduit.send_line(|_| node::line(data)),
                Codec::Corral => conduit.send(&MasterMessage::Message {
                    data: data.clone(),
                    from: Some("cli".into()),
                    request: None,
                }),
            }
            sent += 1;
        }
        if sent == 0 {
            return error(
                ErrorKind::UnknownTarget,
                format!("no instance of {target} is running, so none got the message"),
            );
        }
        Response::Done {
            message: format!("sent the message to {sent} instance(s) of {target}"),
        }
    }
}

mod files;
