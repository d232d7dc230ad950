//! End-to-end tests of corral as the Node.js cluster primary, with the machine's real `node`:
//! unmodified Node programs whose `listen()` goes through the master (round robin over their
//! channel), on TCP ports the kernel picks or fixed ones, plain `net` servers, Unix socket paths,
//! several servers per worker, `cluster.isWorker` and `cluster.worker.id`, `process.send` and
//! `corral send`, `EADDRINUSE` raised in the app, reloads under load, a worker stuck in its
//! `disconnect`, Node apps in fork mode, `--lb shared` (Node's `SCHED_NONE`) and UDP servers.
//!
//! The fixtures are JavaScript programs written into each test's own directory. The `node` they
//! run on is `$CORRAL_TEST_NODE` when set (CI runs this file on Node 18 and 22 that way), else
//! `node` from `PATH`; corral treats an interpreter named `node` as Node.js.

// Shared by the cluster test files; each uses part of it.
#[allow(dead_code)]
mod http;
// The harness serves every test file; this one uses only part of it.
#[allow(dead_code)]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use http::*;
use serde_json::Value;
use support::*;

// ---- fixtures ----

/// An HTTP server on `listen(PORT)` (0, the kernel's choice, without `PORT`), on every interface
/// as Node's `listen(port)` does; each answer names the worker by its pid.
const HTTP_JS: &str = r"
const http = require('http');
const port = process.env.PORT ? Number(process.env.PORT) : 0;
http.createServer((req, res) => {
  res.end(`hello from instance ${process.env.CORRAL_INSTANCE} (pid ${process.pid})\n`);
}).listen(port);
";

/// A plain `net` server: it reads one chunk and answers `pid N echo <chunk>`, then closes.
const NET_JS: &str = r"
const net = require('net');
net.createServer((socket) => {
  socket.once('data', (data) => socket.end(`pid ${process.pid} echo ${data}`));
}).listen(0);
";

/// An HTTP server on the Unix socket path `SOCK`.
const UNIX_JS: &str = r"
const http = require('http');
http.createServer((req, res) => res.end(`over unix (pid ${process.pid})`)).listen(process.env.SOCK);
";

/// Two HTTP servers in one worker, both on `listen(0)`: each answer names its server.
const TWO_JS: &str = r"
const http = require('http');
for (const name of ['a', 'b']) {
  http.createServer((req, res) => res.end(`server ${name} (pid ${process.pid})`)).listen(0);
}
";

/// Prints what the `cluster` module says of this process, then serves.
const IDS_JS: &str = r"
const cluster = require('cluster');
const http = require('http');
const id = cluster.worker ? cluster.worker.id : 'none';
console.log(`isWorker=${cluster.isWorker} id=${id} pid=${process.pid} ` +
  `NODE_UNIQUE_ID=${process.env.NODE_UNIQUE_ID}`);
http.createServer((req, res) => res.end(`${process.pid}`)).listen(0);
";

/// Says hello on its channel at start, logs every message it gets and echoes it back.
const CHAT_JS: &str = r"
const http = require('http');
process.send({ hello: process.pid });
process.on('message', (m) => {
  console.log(`got ${JSON.stringify(m)}`);
  process.send({ echo: m });
});
http.createServer((req, res) => res.end(`${process.pid}`)).listen(0);
";

/// `listen(PORT, HOST)` (without `HOST`: every interface); on an error it prints what Node's
/// error says and serves on a port the kernel picks instead.
const TAKEN_JS: &str = r"
const http = require('http');
const server = http.createServer((req, res) => res.end(`first (pid ${process.pid})`));
server.on('error', (err) => {
  console.log(`listen error code=${err.code} syscall=${err.syscall} errno=${err.errno} ` +
    `port=${err.port}`);
  http.createServer((req, res) => res.end(`fallback (pid ${process.pid})`)).listen(0);
});
server.listen(Number(process.env.PORT), process.env.HOST);
";

/// Takes requests and never answers them; ignores SIGTERM (saying so).
const STUCK_JS: &str = r"
const http = require('http');
process.on('SIGTERM', () => console.log(`ignoring SIGTERM (pid ${process.pid})`));
http.createServer((req, res) => {
  console.log(`holding a request (pid ${process.pid})`);
}).listen(0);
";

/// No server: prints whether it is a cluster worker, says hello on its channel, and logs every
/// message it gets.
const FORKED_JS: &str = r"
const cluster = require('cluster');
console.log(`isWorker=${cluster.isWorker} pid=${process.pid}`);
process.send({ forked: process.pid });
process.on('message', (m) => console.log(`got ${JSON.stringify(m)}`));
setInterval(() => {}, 60000);
";

// ---- helpers ----

/// Where to connect to reach `addr`: the loopback address when it is a wildcard (`[::]` is
/// dual stack, so 127.0.0.1 reaches it, as it reaches 0.0.0.0).
fn reachable(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    }
}

/// The one TCP address of an app's instances, to connect to.
fn address_of(instances: &[Value]) -> SocketAddr {
    reachable(tcp_address(instances))
}

/// The whole answer to one request on a new TCP connection: (body, pid that answered).
fn body_of(addr: SocketAddr) -> Result<(String, u32), String> {
    let answer = answer(connect(addr)?)?;
    let pid = pid_in_answer(&answer)?;
    let text = String::from_utf8_lossy(&answer);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((body.to_string(), pid))
}

/// The stop and the end of every process of the home, for a test's last lines.
fn delete_all(home: &Home) {
    home.ok(&["delete", "all"]);
    assert_groups_gone(&home.recorded_pgids());
}

// ---- the tests ----

#[test]
fn workers_on_listen_0_share_one_port_and_take_connections_in_turn() {
    let home = Home::new();
    start_js(&home, "web", HTTP_JS, &["-i", "2"]);
    let instances = home.wait_online("web", 2);
    let listen = tcp_address(&instances);
    assert_ne!(listen.port(), 0, "ls shows the port the kernel picked");
    let addr = reachable(listen);
    let pids = pids_of(&instances);
    answered_by_all(&pids, || get(addr));

    // Sequential requests on new connections: round robin, so each worker gets half.
    let mut counts: BTreeMap<u32, usize> = pids.iter().map(|&p| (p, 0)).collect();
    for n in 0..20 {
        let pid = get(addr).unwrap_or_else(|e| panic!("request {n}: {e}"));
        *counts
            .get_mut(&pid)
            .unwrap_or_else(|| panic!("request {n}: {pid} is not a worker of {pids:?}")) += 1;
    }
    assert!(
        counts.values().all(|&c| c.abs_diff(10) <= 1),
        "20 requests in turn over 2 workers: {counts:?}"
    );
    delete_all(&home);
}

#[test]
fn workers_on_a_fixed_port_answer_on_that_port() {
    let home = Home::new();
    let port = free_port();
    let env = format!("PORT={port}");
    start_js(&home, "fixed", HTTP_JS, &["-i", "2", "--env", &env]);
    let instances = home.wait_online("fixed", 2);
    let listen = tcp_address(&instances);
    assert_eq!(listen.port(), port, "{}", show(&instances));
    assert!(
        listen.ip().is_unspecified(),
        "listen(port) without a host is every interface, as in Node: {listen}"
    );
    let pids = pids_of(&instances);
    answered_by_all(&pids, || get(SocketAddr::from(([127, 0, 0, 1], port))));
    if listen.is_ipv6() {
        // Dual stack, as Node binds it: IPv6 clients are served too.
        answered_by_all(&pids, || {
            get(SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, port)))
        });
    }
    delete_all(&home);
}

#[test]
fn a_plain_net_server_is_clustered_too() {
    let home = Home::new();
    start_js(&home, "echo", NET_JS, &["-i", "2"]);
    let instances = home.wait_online("echo", 2);
    let addr = address_of(&instances);
    answered_by_all(&pids_of(&instances), || {
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"marco\n")
            .map_err(|e| format!("sending: {e}"))?;
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .map_err(|e| format!("reading: {e} (got {answer:?})"))?;
        let pid = answer
            .strip_prefix("pid ")
            .and_then(|rest| rest.split_once(" echo marco\n"))
            .filter(|(_, tail)| tail.is_empty())
            .and_then(|(pid, _)| pid.parse().ok())
            .ok_or_else(|| format!("not an echo: {answer:?}"))?;
        Ok(pid)
    });
    delete_all(&home);
}

#[test]
fn a_unix_socket_path_is_served_by_every_worker_and_removed_with_the_app() {
    let home = Home::new();
    let socket = home.work().join("web.sock");
    let env = format!("SOCK={}", socket.display());
    start_js(&home, "unix", UNIX_JS, &["-i", "2", "--env", &env]);
    let instances = home.wait_online("unix", 2);
    for instance in &instances {
        assert_eq!(
            listen_of(instance),
            vec![format!("unix:{}", socket.display())],
            "{}",
            show(&instances)
        );
    }
    answered_by_all(&pids_of(&instances), || get_unix(&socket));
    delete_all(&home);
    // As a Node primary closing its server: the path is unlinked.
    assert!(!socket.exists(), "{} is left behind", socket.display());
}

#[test]
fn two_servers_in_one_worker_get_two_ports_each_served_by_every_worker() {
    let home = Home::new();
    start_js(&home, "two", TWO_JS, &["-i", "2"]);
    let instances = home.wait_app(
        Duration::from_secs(20),
        "two",
        "2 instances online, each listening on 2 addresses",
        |list| {
            list.len() == 2
                && list
                    .iter()
                    .all(|i| status(i) == "online" && listen_of(i).len() == 2)
        },
    );
    let listen = listen_of(&instances[0]);
    assert_eq!(listen_of(&instances[1]), listen, "{}", show(&instances));
    let addrs: Vec<SocketAddr> = listen
        .iter()
        .map(|a| reachable(a.parse().unwrap_or_else(|e| panic!("{a}: {e}"))))
        .collect();
    assert_ne!(addrs[0].port(), addrs[1].port(), "two servers, two ports");
    let pids = pids_of(&instances);
    let mut servers = BTreeSet::new();
    for addr in addrs {
        // Each port is one server, answered by every worker.
        let mut names = BTreeSet::new();
        answered_by_all(&pids, || {
            let (body, pid) = body_of(addr)?;
            names.insert(body.split(" (pid").next().unwrap_or_default().to_string());
            Ok(pid)
        });
        assert_eq!(names.len(), 1, "port {addr} is one server: {names:?}");
        servers.extend(names);
    }
    let expected: BTreeSet<String> = ["server a", "server b"].map(String::from).into();
    assert_eq!(servers, expected);
    delete_all(&home);
}

#[test]
fn cluster_is_worker_and_worker_id_are_the_instance_ids() {
    let home = Home::new();
    // Another app first, so that the ids (1 and 2) differ from the instance indexes (0 and 1).
    start_js(&home, "first", FORKED_JS, &[]);
    home.wait_online("first", 1);
    start_js(&home, "ids", IDS_JS, &["-i", "2"]);
    let instances = home.wait_online("ids", 2);
    assert_eq!(ids_of(&instances), vec![1, 2], "{}", show(&instances));
    for instance in &instances {
        let index = instance["instance"].as_u64().expect("an index") as u32;
        let id = instance["id"].as_u64().expect("an id");
        let pid = pid(instance).expect("a pid");
        // Node took NODE_UNIQUE_ID out of the environment, as it does for its own workers.
        home.wait_log(
            "ids",
            index,
            "out",
            &format!("isWorker=true id={id} pid={pid} NODE_UNIQUE_ID=undefined"),
        );
    }
    delete_all(&home);
}

#[test]
fn messages_go_both_ways_and_corral_send_says_when_no_one_gets_them() {
    let home = Home::new();
    start_js(&home, "chat", CHAT_JS, &["-i", "2"]);
    let instances = home.wait_online("chat", 2);
    for instance in &instances {
        let index = instance["instance"].as_u64().expect("an index");
        let pid = pid(instance).expect("a pid");
        wait_daemon_log(
            &home,
            &format!("app 'chat' instance {index} says: {{\"hello\":{pid}}}"),
        );
    }

    let sent = home.ok(&["send", "chat", r#"{"ping":1}"#]);
    assert!(sent.contains("to 2 instance(s)"), "{sent}");
    for index in 0..2 {
        home.wait_log("chat", index, "out", r#"got {"ping":1}"#);
        wait_daemon_log(
            &home,
            &format!(r#"app 'chat' instance {index} says: {{"echo":{{"ping":1}}}}"#),
        );
    }

    // To one instance by its id: only that one gets it. The next message to both comes after
    // it on each channel, so once both have that one, instance 0 would have had it.
    let id = instances[1]["id"].as_u64().expect("an id").to_string();
    home.ok(&["send", &id, r#""only you""#]);
    home.ok(&["send", "chat", r#"{"ping":2}"#]);
    for index in 0..2 {
        home.wait_log("chat", index, "out", r#"got {"ping":2}"#);
    }
    assert!(home.log("chat", 1, "out").contains(r#"got "only you""#));
    assert!(
        !home.log("chat", 0, "out").contains("only you"),
        "{}",
        home.log("chat", 0, "out")
    );

    // Nobody to get it: a clear error, not a silent success.
    home.ok(&["stop", "chat"]);
    let err = home.fails(&["send", "chat", r#"{"ping":3}"#]);
    assert!(err.contains("no instance of chat is running"), "{err}");
    let err = home.fails(&["send", "ghost", "{}"]);
    assert!(err.contains("no app is named 'ghost'"), "{err}");
    let err = home.fails(&["send", "99", "{}"]);
    assert!(err.contains("no instance has id 99"), "{err}");
    let err = home.fails(&["send", "chat", "not json"]);
    assert!(err.contains("not JSON"), "{err}");
    delete_all(&home);
}

/// Holds a port and starts `TAKEN_JS` on it as `name`; the app's `listen()` fails with Node's
/// own `EADDRINUSE` error in every instance, and its fallback server on a port the kernel picks
/// serves.
fn listen_on_a_taken_port(
    name: &str,
    holder: &TcpListener,
    host: Option<&str>,
    count: usize,
    args: &[&str],
) {
    let home = Home::new();
    let port = holder.local_addr().expect("the held address").port();
    let port_env = format!("PORT={port}");
    let mut all = vec!["--env", &port_env];
    let host_env = host.map(|h| format!("HOST={h}"));
    if let Some(host_env) = &host_env {
        all.extend(["--env", host_env.as_str()]);
    }
    all.extend_from_slice(args);
    start_js(&home, name, TAKEN_JS, &all);
    let instances = home.wait_online(name, count);
    for index in 0..count as u32 {
        home.wait_log(
            name,
            index,
            "out",
            &format!("listen error code=EADDRINUSE syscall=bind errno=-98 port={port}"),
        );
    }
    let listen = tcp_address(&instances);
    assert_ne!(listen.port(), port, "only the fallback server listens");
    answered_by_all(&pids_of(&instances), || {
        let (body, pid) = body_of(reachable(listen))?;
        if body.starts_with("fallback") {
            Ok(pid)
        } else {
            Err(format!("not the fallback server: {body:?}"))
        }
    });
    wait_daemon_log(&home, "its listen() fails");
    delete_all(&home);
}

#[test]
fn a_port_in_use_raises_eaddrinuse_in_the_app_as_node_does() {
    // listen(port) binds [::]:port, dual stack: a holder on [::] (or on 0.0.0.0 on a machine
    // without IPv6) takes it.
    let holder = TcpListener::bind("[::]:0")
        .or_else(|_| TcpListener::bind("0.0.0.0:0"))
        .expect("a port to hold");
    listen_on_a_taken_port("taken", &holder, None, 2, &["-i", "2"]);
    // listen(port, '127.0.0.1'), in a one-instance cluster.
    let holder = TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    listen_on_a_taken_port(
        "taken-v4",
        &holder,
        Some("127.0.0.1"),
        1,
        &["-i", "1", "--exec-mode", "cluster"],
    );
}

#[test]
fn reloads_under_load_lose_no_request_on_new_connections() {
    let home = Home::new();
    start_js(&home, "web", HTTP_JS, &["-i", "2"]);
    let instances = home.wait_online("web", 2);
    let addr = address_of(&instances);
    let before = pids_of(&instances);
    let tally = reload_rounds(&home, "web", Load::start(addr, 3, false), 5);
    let after = home.wait_online("web", 2);
    let after = pids_of(&after);
    assert!(
        after.iter().all(|pid| !before.contains(pid)),
        "every process was replaced: {before:?} then {after:?}"
    );
    assert!(
        tally.pids().len() >= 4,
        "old and new processes answered: {:?}",
        tally.pids()
    );
    assert_eq!(address_of(&home.instances("web")), addr, "the port is kept");
    delete_all(&home);
}

#[test]
fn reloads_under_keep_alive_load_lose_no_request() {
    // Node's own `server.close()` destroys the keep-alive connections it sees as idle, racing
    // with the client's next request; corral's drain preload answers that request instead, with
    // `Connection: close`.
    let home = Home::new();
    start_js(&home, "web", HTTP_JS, &["-i", "2"]);
    let addr = address_of(&home.wait_online("web", 2));
    let tally = reload_rounds(&home, "web", Load::start(addr, 4, true), 5);
    assert!(
        tally.pids().len() >= 4,
        "old and new processes answered: {:?}",
        tally.pids()
    );
    delete_all(&home);
}

/// Prints the flags node was started with, then serves.
const EXEC_ARGV_JS: &str = r"
const http = require('http');
console.log(`execArgv=${JSON.stringify(process.execArgv)}`);
http.createServer((req, res) => res.end(`${process.pid}`)).listen(0);
";

#[test]
fn the_drain_preload_is_in_cluster_workers_unless_switched_off() {
    let home = Home::new();
    start_js(&home, "on", EXEC_ARGV_JS, &["-i", "2"]);
    start_js(
        &home,
        "off",
        EXEC_ARGV_JS,
        &["-i", "2", "--env", "CORRAL_NODE_DRAIN=off"],
    );
    start_js(&home, "fork", EXEC_ARGV_JS, &["-i", "1"]);
    for app in ["on", "off", "fork"] {
        home.wait_online(app, if app == "fork" { 1 } else { 2 });
    }
    let drain = home.path().join("node-drain.js");
    let line = |app: &str| {
        let log = home.wait_log(app, 0, "out", "execArgv=");
        log.lines()
            .find(|l| l.contains("execArgv="))
            .expect("the line")
            .to_string()
    };
    let on = line("on");
    assert!(
        on.contains("--require") && on.contains(drain.to_str().expect("utf-8")),
        "{on}"
    );
    assert!(line("off").contains("execArgv=[]"), "{}", line("off"));
    assert!(line("fork").contains("execArgv=[]"), "{}", line("fork"));
    let source = std::fs::read_to_string(&drain).expect("the preload is in CORRAL_HOME");
    assert!(source.contains("exitedAfterDisconnect"), "{source}");
    delete_all(&home);
}

/// How many requests the logs of `app`'s instances say are held, by instance.
fn held(home: &Home, app: &str) -> Vec<usize> {
    (0..2)
        .map(|i| home.log(app, i, "out").matches("holding a request").count())
        .collect()
}

#[test]
fn a_worker_stuck_in_its_disconnect_gets_the_stop_signal_then_sigkill() {
    let home = Home::new();
    start_js(
        &home,
        "stuck",
        STUCK_JS,
        &["-i", "2", "--kill-timeout", "500ms"],
    );
    let instances = home.wait_online("stuck", 2);
    let addr = address_of(&instances);
    let pids = pids_of(&instances);

    // A request that is never answered on each worker (connections go in turn; a few more
    // than two in case one came in while a worker was not ready yet).
    let mut open = Vec::new();
    for n in 1..=6 {
        let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connecting");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.write_all(KEEP_ALIVE_REQUEST).expect("sending");
        open.push(stream);
        wait_until(Duration::from_secs(20), "the request is held", || {
            let counts = held(&home, "stuck");
            if counts.iter().sum::<usize>() == n {
                Ok(())
            } else {
                Err(format!("held by instance: {counts:?}"))
            }
        });
        if held(&home, "stuck").iter().all(|&c| c > 0) {
            break;
        }
    }
    assert!(
        held(&home, "stuck").iter().all(|&c| c > 0),
        "every worker holds a request: {:?}",
        held(&home, "stuck")
    );

    let began = Instant::now();
    home.ok(&["stop", "stuck"]);
    let took = began.elapsed();
    // `disconnect`, SIGTERM (ignored) halfway through the kill timeout, SIGKILL at its end:
    // a stop takes the kill timeout the user gave, not twice that.
    assert!(
        took >= Duration::from_millis(450),
        "stop waited for the disconnect and the stop signal: {took:?}"
    );
    assert!(
        took < Duration::from_millis(1500),
        "stop took {took:?} with a kill timeout of 500ms"
    );
    assert_groups_gone(&pids);
    let log = daemon_log(&home);
    for pid in &pids {
        let asked =
            format!("app 'stuck' pid {pid} did not exit within 250ms of being asked to leave");
        let killed = format!(
            "app 'stuck' pid {pid} did not stop within its kill timeout (500ms): sending SIGKILL"
        );
        let (Some(a), Some(k)) = (log.find(&asked), log.find(&killed)) else {
            panic!("daemon.log says that {pid} was signaled, then killed:\n{log}");
        };
        assert!(a < k, "the stop signal before SIGKILL:\n{log}");
        assert!(
            log[a..]
                .lines()
                .next()
                .unwrap_or_default()
                .contains("SIGTERM"),
            "{log}"
        );
    }
    for index in 0..2 {
        let out = home.log("stuck", index, "out");
        assert!(out.contains("ignoring SIGTERM"), "instance {index}: {out}");
    }
    let list = home.instances("stuck");
    assert!(
        list.iter()
            .all(|i| status(i) == "stopped" && i["last_exit"] == "killed by SIGKILL"),
        "{}",
        show(&list)
    );
    // The clients held are let go.
    for mut stream in open {
        let mut rest = Vec::new();
        match stream.read_to_end(&mut rest) {
            Ok(_) => {}
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "a held connection is still open: {e}"
            ),
        }
    }
    delete_all(&home);
}

#[test]
fn a_killed_worker_is_replaced_on_the_same_port() {
    let home = Home::new();
    start_js(&home, "web", HTTP_JS, &["-i", "2"]);
    let instances = home.wait_online("web", 2);
    let addr = address_of(&instances);
    let before = pids_of(&instances);
    answered_by_all(&before, || get(addr));
    corral_sys::kill(before[0], 9).expect("SIGKILL to instance 0");
    let after = home.wait_app(
        Duration::from_secs(20),
        "web",
        "instance 0 replaced and online again",
        |list| {
            list.len() == 2
                && list.iter().all(|i| status(i) == "online")
                && pid(&list[0]).is_some_and(|p| p != before[0])
                && restarts(&list[0]) == 1
        },
    );
    assert_eq!(pid(&after[1]), Some(before[1]), "{}", show(&after));
    assert_eq!(address_of(&after), addr, "the master kept the port");
    answered_by_all(&pids_of(&after), || get(addr));
    delete_all(&home);
}

#[test]
fn a_node_app_in_fork_mode_has_its_channel_but_is_no_cluster_worker() {
    let home = Home::new();
    // One instance: fork mode by default; two with --exec-mode fork.
    start_js(&home, "solo", FORKED_JS, &[]);
    start_js(
        &home,
        "pair",
        FORKED_JS,
        &["-i", "2", "--exec-mode", "fork"],
    );
    for (app, count) in [("solo", 1), ("pair", 2)] {
        let instances = home.wait_online(app, count);
        for instance in &instances {
            let index = instance["instance"].as_u64().expect("an index");
            let pid = pid(instance).expect("a pid");
            home.wait_log(
                app,
                index as u32,
                "out",
                &format!("isWorker=false pid={pid}"),
            );
            wait_daemon_log(
                &home,
                &format!("app '{app}' instance {index} says: {{\"forked\":{pid}}}"),
            );
            assert!(listen_of(instance).is_empty(), "{instance}");
        }
        let described = home.ok(&["describe", app]);
        assert!(!described.contains("cluster"), "{described}");
    }
    home.ok(&["send", "solo", r#"{"ping":"solo"}"#]);
    home.wait_log("solo", 0, "out", r#"got {"ping":"solo"}"#);
    delete_all(&home);
}

/// A sanity check of the fixtures' `node`, so that a missing or broken one is named plainly.
#[test]
fn the_node_under_test_runs() {
    let node = node();
    let mut command = std::process::Command::new(&node);
    command.arg("--version");
    let output = run_bounded(command, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("the node under test ({node}) does not run: {e}"));
    assert!(output.status.success(), "{node} --version: {output:?}");
    let version = String::from_utf8_lossy(&output.stdout);
    assert!(version.starts_with('v'), "{node} --version: {version}");
    let name = Path::new(&node).file_name().unwrap_or_default();
    assert_eq!(
        name, "node",
        "corral treats an interpreter as Node.js by its file name `node`"
    );
}

/// A UDP server: every datagram is answered `pid N echo <datagram>`.
const UDP_JS: &str = r"
const dgram = require('dgram');
const socket = dgram.createSocket('udp4');
socket.on('message', (msg, from) => socket.send(`pid ${process.pid} echo ${msg}`, from.port, from.address));
socket.bind(0, '127.0.0.1');
";

#[test]
fn with_lb_shared_every_worker_gets_the_listening_socket_itself() {
    let home = Home::new();
    start_js(&home, "web", HTTP_JS, &["-i", "2", "--lb", "shared"]);
    let instances = home.wait_online("web", 2);
    let addr = address_of(&instances);
    answered_by_all(&pids_of(&instances), || get(addr));
    // The master holds the socket but never accepts on it: it passed it on (Node's SCHED_NONE),
    // so each worker has a listening socket of its own among its descriptors.
    for pid in pids_of(&instances) {
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("the worker's fds");
        let inodes: Vec<String> = fds
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .map(|target| target.to_string_lossy().into_owned())
            .filter(|t| t.starts_with("socket:"))
            .collect();
        let tcp6 = std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let port = format!(":{:04X} ", addr.port());
        let listening = tcp6.lines().chain(tcp.lines()).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local address, state 0A (LISTEN), inode
            fields.len() > 9
                && fields[1].ends_with(port.trim_end())
                && fields[3] == "0A"
                && inodes.contains(&format!("socket:[{}]", fields[9]))
        });
        assert!(
            listening,
            "pid {pid} holds the listening socket of port {}",
            addr.port()
        );
    }
    delete_all(&home);
}

#[test]
fn a_udp_server_gets_the_bound_socket_and_every_worker_answers() {
    let home = Home::new();
    start_js(&home, "udp", UDP_JS, &["-i", "2"]);
    let instances = home.wait_online("udp", 2);
    let listen = listen_of(&instances[0]);
    let port: u16 = listen
        .iter()
        .find_map(|l| l.strip_prefix("udp:127.0.0.1:")?.parse().ok())
        .unwrap_or_else(|| panic!("a udp address in {listen:?}"));
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a client socket");
    socket.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    let expected: BTreeSet<u32> = pids_of(&instances).into_iter().collect();
    let mut seen = BTreeSet::new();
    for n in 0..200 {
        if seen == expected {
            break;
        }
        socket
            .send_to(format!("ping{n}").as_bytes(), ("127.0.0.1", port))
            .expect("sending a datagram");
        let mut answer = [0u8; 256];
        let len = socket.recv(&mut answer).expect("an answer");
        let text = String::from_utf8_lossy(&answer[..len]).into_owned();
        assert!(text.ends_with(&format!("echo ping{n}")), "{text}");
        let pid: u32 = text
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("a pid in {text:?}"));
        assert!(expected.contains(&pid), "{pid} is not one of {expected:?}");
        seen.insert(pid);
    }
    assert_eq!(seen, expected, "every worker answered a datagram");
    delete_all(&home);
}
