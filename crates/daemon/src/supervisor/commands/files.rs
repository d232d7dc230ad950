//! The requests about what the daemon keeps besides processes: log files, the saved app list,
//! the shared state.

use std::collections::{BTreeMap, BTreeSet};

use corral_proto::channel::StateCall;
use corral_proto::{AppSpec, ErrorKind, Response, Stream, Streams};
use tokio::sync::oneshot;

use super::super::{Supervisor, error, validate};
use crate::dump;
use crate::inbox::LogSource;
use crate::listeners::{self, Listener};

impl Supervisor {
    pub(in crate::supervisor) fn flush(&mut self, target: Option<&str>) -> Response {
        let sources = match self.log_sources(target, Streams::Both) {
            Ok(sources) => sources,
            Err(response) => return response,
        };
        for source in &sources {
            if let Err(e) = source.sink.flush() {
                return error(
                    ErrorKind::Io,
                    format!("cannot empty {}: {e}", source.sink.path().display()),
                );
            }
        }
        Response::Done {
            message: format!("emptied {} log file(s)", sources.len()),
        }
    }

    pub(in crate::supervisor) fn save(&mut self, force: bool) -> Response {
        let specs = self.apps.iter().map(|a| a.spec.clone()).collect();
        let path = self.home.dump();
        match dump::save(&path, specs, force) {
            Ok(count) => Response::Done {
                message: format!("saved {count} app(s) to {}", path.display()),
            },
            Err(e) => error(ErrorKind::Io, e.to_string()),
        }
    }

    pub(in crate::supervisor) fn resurrect(
        &mut self,
        base_env: &BTreeMap<String, String>,
    ) -> Response {
        let specs = match dump::load(&self.home.dump()) {
            Ok(specs) => specs,
            Err(e) => return error(ErrorKind::Io, e.to_string()),
        };
        let total = specs.len();
        let missing: Vec<AppSpec> = specs
            .into_iter()
            .filter(|s| !self.apps.iter().any(|a| a.spec.name == s.name))
            .collect();
        if missing.is_empty() {
            return Response::Done {
                message: format!("nothing to resurrect: the {total} saved app(s) run already"),
            };
        }
        let mut started = Vec::new();
        for spec in missing {
            let bound: Result<Vec<Listener>, String> = match validate(&spec) {
                Ok(()) => spec.listen.iter().map(|a| listeners::bind(a)).collect(),
                Err(message) => Err(message),
            };
            match bound {
                Ok(listeners) => started.extend(self.add_app(spec, base_env.clone(), listeners)),
                Err(message) => crate::log!("resurrect: skipping app '{}': {message}", spec.name),
            }
        }
        self.report(&started)
    }

    pub(in crate::supervisor) fn log_sources(
        &self,
        target: Option<&str>,
        streams: Streams,
    ) -> Result<Vec<LogSource>, Response> {
        let ids = match target {
            None => self.all_ids(),
            Some(target) => self.resolve(target)?,
        };
        let mut sources = Vec::new();
        for id in ids {
            let Some((a, i)) = self.locate(id) else {
                continue;
            };
            let app = &self.apps[a];
            let inst = &app.instances[i];
            for (stream, sink) in [(Stream::Out, &inst.out), (Stream::Err, &inst.err)] {
                let wanted = match streams {
                    Streams::Both => true,
                    Streams::Out => stream == Stream::Out,
                    Streams::Err => stream == Stream::Err,
                };
                if wanted {
                    sources.push(LogSource {
                        app: app.spec.name.clone(),
                        instance: inst.index,
                        stream,
                        sink: sink.clone(),
                    });
                }
            }
        }
        Ok(sources)
    }

    /// `corral state`: answered by the bus, off the supervisor's task.
    pub(in crate::supervisor) fn state(
        &mut self,
        app: Option<&str>,
        call: StateCall,
        reply: oneshot::Sender<Response>,
    ) {
        let backend = match self.state_backend(app) {
            Ok(backend) => backend,
            Err(response) => {
                let _ = reply.send(response);
                return;
            }
        };
        let bus = self.bus.clone();
        tokio::spawn(async move {
            let _ = reply.send(bus.cli_state(&backend, call).await);
        });
    }

    /// The store of app `name`; without a name, the one every app uses (the daemon's memory
    /// when there is no app).
    fn state_backend(&self, name: Option<&str>) -> Result<corral_proto::StateBackend, Response> {
        if let Some(name) = name {
            return self
                .apps
                .iter()
                .find(|a| a.spec.name == name)
                .map(|app| app.spec.state.clone())
                .ok_or_else(|| self.unknown_app(name));
        }
        let backends: BTreeSet<String> =
            self.apps.iter().map(|a| a.spec.state.to_string()).collect();
        if backends.len() > 1 {
            return Err(error(
                ErrorKind::InvalidSpec,
                format!(
                    "the apps use different state stores ({}): say which app's with --app",
                    backends.into_iter().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(self
            .apps
            .first()
            .map(|a| a.spec.state.clone())
            .unwrap_or_default())
    }
}
