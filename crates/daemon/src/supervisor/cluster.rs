//! corral as a Node.js cluster primary: the servers a worker's `listen()` asks for
//! (`queryServer`), bound once by the master and kept across restarts, and what `listening`
//! and `close` mean to an instance.

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::sync::Arc;

use corral_policy::lifecycle::{Input, Source};
use tokio::task::AbortHandle;

use super::Supervisor;
use crate::balance::Balancer;
use crate::listeners::{self, Listener};
use crate::node;

/// A listening socket a Node app's workers asked for with `listen()`.
#[derive(Debug)]
pub struct NodeServer {
    pub listener: Listener,
    /// Round robin: the master accepts and hands connections over. `None` when the socket
    /// itself goes to the workers (`--lb shared`, UDP).
    pub balancer: Option<Arc<Balancer>>,
    /// In shared mode, Node's handle type for the socket.
    shared: Option<&'static str>,
    accept_loops: Vec<AbortHandle>,
    /// The first worker's `data` (TLS ticket keys), given to every worker.
    data: serde_json::Value,
    /// What the workers' `server.address()` reports (TCP).
    sockname: Option<serde_json::Value>,
    /// The processes serving it.
    pub members: BTreeSet<u32>,
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        for task in &self.accept_loops {
            task.abort();
        }
    }
}

impl Supervisor {
    /// What a Node cluster worker asks of its primary.
    pub(super) fn node_message(&mut self, pid: u32, message: node::Cluster) {
        match message {
            node::Cluster::QueryServer { seq, query } => self.node_query(pid, seq, &query),
            node::Cluster::Listening => {
                let Some(id) = self.procs.get(&pid).map(|p| p.id) else {
                    return;
                };
                if let Some((a, _)) = self.locate(id) {
                    self.apps[a].note_listening();
                    self.reroute.insert(self.apps[a].spec.name.clone());
                }
                let source = Source::Listening;
                self.feed(id, Input::Ready { pid, source });
            }
            node::Cluster::Close { key } => {
                for app in &mut self.apps {
                    if let Some(server) = app.node_servers.get_mut(&key) {
                        server.members.remove(&pid);
                        self.reroute.insert(app.spec.name.clone());
                    }
                }
            }
            _ => {}
        }
    }

    /// A Node worker's `listen()`: the master's socket for that key (bound now if it is the
    /// first), and from then on its connections, round robin.
    fn node_query(&mut self, pid: u32, seq: u64, query: &serde_json::Value) {
        let Some(io) = self.procs.get(&pid) else {
            return;
        };
        let Some(conduit) = io.conduit.clone() else {
            return;
        };
        let Some((a, i)) = self.locate(io.id) else {
            return;
        };
        let key = node::server_key(query);
        let data = query.get("data").cloned().unwrap_or_default();
        let app = &mut self.apps[a];
        if !app.node_servers.contains_key(&key) {
            match node_listen(query) {
                Ok((address, listener, datagram)) => {
                    crate::log!(
                        "app '{}' listens on {} (its workers' listen({address}))",
                        app.spec.name,
                        listener.resolved
                    );
                    let server = new_server(&app.spec, &key, listener, datagram, data.clone());
                    app.node_servers.insert(key.clone(), server);
                }
                Err((errno, why)) => {
                    crate::log!(
                        "app '{}' instance {}: its listen() fails: {why}",
                        app.spec.name,
                        app.instances[i].index
                    );
                    conduit.send_line(|next| node::error_reply(&key, seq, &data, errno, next));
                    return;
                }
            }
        }
        self.reroute.insert(app.spec.name.clone());
        let server = app.node_servers.get_mut(&key).expect("inserted above");
        server.members.insert(pid);
        let (data, sockname) = (server.data.clone(), server.sockname.clone());
        let Some(kind) = server.shared else {
            let reply = |next| node::round_robin_reply(&key, seq, &data, sockname, next);
            conduit.send_line(reply);
            return;
        };
        match server.listener.fd.try_clone() {
            Ok(fd) => {
                let reply = |next| node::shared_reply(kind, &key, seq, &data, next);
                conduit.send_handle(reply, fd);
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(24);
                conduit.send_line(|next| node::error_reply(&key, seq, &data, errno, next));
            }
        }
    }
}

/// The master's side of a new server: accept loops for round robin, or the socket itself for
/// every worker (`--lb shared`, UDP), as Node's `SCHED_NONE` does.
fn new_server(
    spec: &corral_proto::AppSpec,
    key: &str,
    listener: Listener,
    datagram: bool,
    data: serde_json::Value,
) -> NodeServer {
    if datagram || spec.lb == corral_proto::LbMode::Shared {
        let _ = corral_sys::fd::set_nonblocking(listener.fd.as_fd(), true);
        let kind = if datagram {
            "dgram.Native"
        } else {
            "net.Native"
        };
        return NodeServer {
            listener,
            balancer: None,
            shared: Some(kind),
            accept_loops: Vec::new(),
            data,
            sockname: None,
            members: BTreeSet::new(),
        };
    }
    let least_conn = spec.lb == corral_proto::LbMode::LeastConn;
    let balancer = Balancer::new(&spec.name, least_conn, Some(key.to_string()));
    let accept_loops = balancer.serve(&spec.name, std::slice::from_ref(&listener));
    let sockname = listener
        .resolved
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(node::sockname);
    NodeServer {
        listener,
        balancer: Some(balancer),
        shared: None,
        accept_loops,
        data,
        sockname,
        members: BTreeSet::new(),
    }
}

/// Binds what a Node worker's `queryServer` asks for: its address (for the log), the socket,
/// and whether it is UDP; or the errno for the worker and why.
fn node_listen(query: &serde_json::Value) -> Result<(String, Listener, bool), (i32, String)> {
    const EINVAL: i32 = 22;
    let address = match node::wanted(query)? {
        node::Wanted::Datagram(addr) => {
            return listeners::bind_udp(addr)
                .map(|l| (format!("udp {addr}"), l, true))
                .map_err(|e| (e.errno.unwrap_or(EINVAL), e.message));
        }
        node::Wanted::Stream(address) => address,
    };
    let bind = |address: &str| {
        let parsed = listeners::parse(address).map_err(|why| (EINVAL, why))?;
        listeners::bind_parsed(address, parsed).map_err(|e| (e.errno.unwrap_or(EINVAL), e.message))
    };
    match bind(&address) {
        // No IPv6 on this machine: every IPv4 interface, as Node falls back to.
        Err((97 | 99, _)) if address.starts_with("[::]:") => {
            let v4 = address.replacen("[::]", "0.0.0.0", 1);
            bind(&v4).map(|l| (v4, l, false))
        }
        other => other.map(|l| (address, l, false)),
    }
}
