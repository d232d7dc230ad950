//! End-to-end tests of the Rust worker library: `crates/worker/examples/hello.rs`, an axum
//! server on `corral-worker`, run by the real daemon in every `--lb` mode, reloaded under load,
//! and run alone.
//!
//! The example is built by `cargo test --workspace` (this package enables the library's `tokio`
//! feature, which the example requires) next to this test's own binary.

// Shared by the cluster test files; each uses part of it.
#[allow(dead_code)]
mod http;
// The harness serves every test file; this one uses only part of it.
#[allow(dead_code)]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::*;
use support::*;

/// The example's binary, built beside this test.
fn hello() -> PathBuf {
    example("hello")
}

/// Starts the example as app `name`, 2 instances, with `args`; waits until both are online.
fn start_hello(home: &Home, name: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let program = hello();
    let mut all = vec!["start", arg(&program), "-n", name, "-i", "2"];
    all.extend_from_slice(args);
    home.ok(&all);
    home.wait_online(name, 2)
}

#[test]
fn the_rust_worker_serves_in_every_mode() {
    let home = Home::new();
    for lb in ["rr", "least-conn", "shared", "proxy"] {
        let name = format!("hello-{lb}");
        let instances = start_hello(&home, &name, &["--listen", "127.0.0.1:0", "--lb", lb]);
        let addr = tcp_address(&instances);
        answered_by_all(&pids_of(&instances), || get(addr));
    }
    // A Unix socket, handed over in rr mode.
    let socket = home.work().join("hello.sock");
    let listen = format!("unix:{}", socket.display());
    let instances = start_hello(&home, "hello-unix", &["--listen", &listen]);
    answered_by_all(&pids_of(&instances), || get_unix(&socket));
    home.ok(&["delete", "all"]);
    assert_groups_gone(&home.recorded_pgids());
}

/// Five reloads under three clients: not one failed request.
fn reloads_lose_no_request(lb: &str, keep_alive: bool) {
    let home = Home::new();
    let instances = start_hello(&home, "hello", &["--listen", "127.0.0.1:0", "--lb", lb]);
    let addr = tcp_address(&instances);
    let before = pids_of(&instances);
    let tally = reload_rounds(&home, "hello", Load::start(addr, 3, keep_alive), 5);
    let after = pids_of(&home.instances("hello"));
    assert!(
        after.iter().all(|pid| !before.contains(pid)),
        "every process was replaced: {before:?} then {after:?}"
    );
    assert!(
        tally.pids().len() >= 4,
        "old and new processes answered: {:?}",
        tally.pids()
    );
    if keep_alive {
        // Draining workers closed their keep-alive connections, and the clients reconnected.
        assert!(
            tally.connections.load(std::sync::atomic::Ordering::SeqCst) > 3,
            "the clients had to open new connections"
        );
    }
    home.ok(&["delete", "hello"]);
    assert_groups_gone(&home.recorded_pgids());
}

#[test]
fn rr_reloads_of_the_rust_worker_lose_no_request() {
    reloads_lose_no_request("rr", false);
}

#[test]
fn rr_reloads_of_the_rust_worker_lose_no_request_on_keep_alive_connections() {
    reloads_lose_no_request("rr", true);
}

#[test]
fn shared_reloads_of_the_rust_worker_lose_no_request_on_keep_alive_connections() {
    reloads_lose_no_request("shared", true);
}

/// Kills the process on drop, so that a failing test leaves nothing behind.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_rust_worker_runs_alone_and_drains_on_sigterm() {
    let home = Home::new();
    let port = free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut alone = Guard(
        Command::new(hello())
            .env("HELLO_ADDR", addr.to_string())
            // Not a worker, yet found by the Home's cleanup.
            .env("CORRAL_HOME", home.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the example starts"),
    );
    let pid = alone.0.id();
    answered_by_all(&[pid], || get(addr));
    let mut client = KeepAliveClient::new(addr);
    assert_eq!(client.get(), Ok(pid));
    // SIGTERM: the open keep-alive connection still gets one more answer, then it ends.
    succeeds({
        let mut kill = Command::new("kill");
        kill.args(["-TERM", &pid.to_string()]);
        kill
    });
    assert_eq!(client.get(), Ok(pid), "the next request is answered");
    let status = wait_until(Duration::from_secs(20), "the example exits", || {
        alone
            .0
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "still running".to_string())
    });
    assert!(status.success(), "{status}");
}

#[test]
fn corral_send_reaches_the_rust_worker() {
    let home = Home::new();
    start_hello(&home, "hello", &["--listen", "127.0.0.1:0"]);
    home.ok(&["send", "hello", r#"{"cmd":"refresh"}"#]);
    for instance in 0..2 {
        home.wait_log(
            "hello",
            instance,
            "err",
            r#"message from corral: {"cmd":"refresh"}"#,
        );
    }
    home.ok(&["delete", "hello"]);
    assert_groups_gone(&home.recorded_pgids());
}
