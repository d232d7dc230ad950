//! The library a program links to cooperate with corral.
//!
//! It owns the worker's side of the environment contract of `corral-proto`. Today that is who the
//! program is ([`app`], [`instance`]); the IPC channel, readiness, incoming connections and shared
//! state arrive with cluster mode.

#![warn(missing_docs)]

use corral_proto::env;

/// Whether this program was started by corral.
pub fn is_managed() -> bool {
    std::env::var_os(env::CORRAL_APP).is_some()
}

/// The name of the app this program runs as, when started by corral.
pub fn app() -> Option<String> {
    std::env::var(env::CORRAL_APP).ok()
}

/// The index of this instance within its app (`0..instances`), when started by corral.
pub fn instance() -> Option<u32> {
    std::env::var(env::CORRAL_INSTANCE).ok()?.parse().ok()
}
