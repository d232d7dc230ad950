//! Which processes get connections: each instance's routable process (ready, answering, not
//! stopping; see `Slot::routable`), told to the app's balancers and proxy when it changes.

use std::sync::Arc;

use super::Supervisor;
use crate::balance::Conduit;

impl Supervisor {
    /// Tells app `a`'s balancers and proxy the workers they may hand connections to now.
    pub(super) fn update_routes(&self, a: usize) {
        let app = &self.apps[a];
        // A stopped app's master-owned ports refuse at once; they serve again when it starts.
        let serving = app.instances.iter().any(|i| !i.agent && i.slot.wanted());
        for listener in app
            .listeners
            .iter()
            .chain(app.node_servers.values().map(|s| &s.listener))
        {
            listener.set_open(serving);
        }
        let routable: Vec<u32> = app
            .instances
            .iter()
            .filter(|i| !i.agent)
            .filter_map(|i| i.slot.routable())
            .collect();
        let conduit = |pid: &u32| -> Option<Arc<Conduit>> { self.procs.get(pid)?.conduit.clone() };
        for server in app.node_servers.values() {
            if let Some(balancer) = &server.balancer {
                // A Node worker gets a server's connections from the moment it listens on it.
                let ready = routable
                    .iter()
                    .filter(|pid| server.members.contains(pid))
                    .filter_map(conduit)
                    .collect();
                balancer.set(ready);
            }
        }
        if let Some(balancer) = &app.balancer {
            balancer.set(routable.iter().filter_map(conduit).collect());
        }
        if let Some(router) = &app.router {
            let ready = routable
                .iter()
                .filter_map(|pid| self.procs.get(pid)?.port)
                .map(|port| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
                .collect();
            router.set(ready);
        }
    }
}
