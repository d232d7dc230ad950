//! Probes against real loopback sockets on kernel-picked ports and real child processes.

use std::sync::mpsc;
use std::time::Instant;

use tokio::net::TcpListener;

use super::*;

/// A bound for every wait that would hang only if the code under test were wrong.
async fn within<T>(future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), future)
        .await
        .expect("took far too long")
}

/// Exits with a stand-in for the daemon's reaper: a thread per spawned pid that waits for that
/// one pid (never `waitpid(-1)`, which would steal other tests' children) and claims its exit.
/// Also returns the pids spawned.
fn reaping() -> (Exits, Arc<Mutex<Vec<u32>>>) {
    let (on_spawn, spawned) = mpsc::channel();
    let exits = Exits::default();
    exits.lock().on_spawn = Some(on_spawn);
    // Weak, so that the thread ends with the test's Exits (which holds the sending side).
    let inner = Arc::downgrade(&exits.inner);
    let pids = Arc::new(Mutex::new(Vec::new()));
    let seen = pids.clone();
    std::thread::spawn(move || {
        for pid in spawned {
            seen.lock().unwrap().push(pid);
            let inner = inner.clone();
            std::thread::spawn(move || {
                let exit = wait_for(pid);
                if let Some(inner) = inner.upgrade() {
                    Exits { inner }.claim(pid, exit);
                }
            });
        }
    });
    (exits, pids)
}

fn wait_for(pid: u32) -> ExitKind {
    let target = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    loop {
        match rustix::process::waitpid(Some(target), rustix::process::WaitOptions::empty()) {
            Ok(Some((_, status))) => {
                return match (status.exit_status(), status.terminating_signal()) {
                    (Some(code), _) => ExitKind::Code(code),
                    (None, Some(signal)) => ExitKind::Signal(signal),
                    (None, None) => ExitKind::Code(-1),
                };
            }
            Ok(None) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("waitpid {pid}: {e}"),
        }
    }
}

/// The processes of group `pgid` still alive (zombies are dead, only waiting for a parent that
/// may be init and not ours to hurry).
fn live_members(group: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| {
            let member: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{member}/stat")).ok()?;
            // After "pid (comm) ": state, ppid, pgrp. The name may hold spaces and parentheses.
            let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
            let state = fields.next()?;
            let pgrp: u32 = fields.nth(1)?.parse().ok()?;
            (pgrp == group && state != "Z" && state != "X").then_some(member)
        })
        .collect()
}

/// Waits until nothing of group `pgid` is alive: SIGKILL is sent at once but takes effect when
/// each process next runs.
async fn group_ends(pgid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = live_members(pgid);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "group {pgid} lives on: {left:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn context() -> ExecContext {
    let path = std::env::var("PATH").expect("tests run with a PATH");
    ExecContext {
        cwd: std::env::current_dir().unwrap(),
        env: BTreeMap::from([("PATH".to_string(), path)]),
    }
}

fn exec(argv: &[&str]) -> Probe {
    Probe::Exec {
        argv: argv.iter().map(|s| (*s).to_string()).collect(),
    }
}

fn http(host: &str, port: u16, path: &str) -> Probe {
    Probe::Http {
        host: host.into(),
        port,
        path: path.into(),
    }
}

async fn probe(probe: &Probe, timeout: Duration) -> Outcome {
    within(run(probe, &context(), &Exits::default(), timeout)).await
}

async fn probe_exec(argv: &[&str], timeout: Duration) -> (Outcome, u32) {
    let (exits, pids) = reaping();
    let outcome = within(run(&exec(argv), &context(), &exits, timeout)).await;
    let pid = pids.lock().unwrap().first().copied().unwrap_or(0);
    (outcome, pid)
}

fn unhealthy(outcome: Outcome) -> String {
    match outcome {
        Outcome::Unhealthy(why) => why,
        Outcome::Healthy => panic!("healthy, unexpectedly"),
    }
}

const SECONDS: Duration = Duration::from_secs(5);

async fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

/// Reads a request's head (or what comes before the peer closes).
async fn read_request(stream: &mut tokio::net::TcpStream) -> String {
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.ends_with(b"\r\n\r\n") && request.len() < 65_536 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&request).into_owned()
}

/// A server for one connection: it reads the request, writes `answer` and closes; the task gives
/// back the request.
async fn answering(answer: &'static [u8]) -> (u16, tokio::task::JoinHandle<String>) {
    let (listener, port) = listener().await;
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let request = read_request(&mut stream).await;
        let _ = stream.write_all(answer).await;
        request
    });
    (port, server)
}

/// A server for one connection that reads the request, writes `first`, then `filler` until the
/// client goes; the task gives back how many bytes it wrote.
async fn flooding(first: &'static [u8], filler: Vec<u8>) -> (u16, tokio::task::JoinHandle<usize>) {
    let (listener, port) = listener().await;
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        read_request(&mut stream).await;
        let mut written = 0;
        if stream.write_all(first).await.is_ok() {
            if filler.is_empty() {
                // Hold the connection open, saying nothing more.
                std::future::pending::<()>().await;
            }
            while stream.write_all(&filler).await.is_ok() {
                written += filler.len();
            }
        }
        written
    });
    (port, server)
}

/// A port nothing listens on: bound by the kernel's choice, then closed.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn http_200_is_healthy_and_the_request_says_who_asks() {
    let (port, server) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let outcome = probe(&http("127.0.0.1", port, "/healthz?deep=1"), SECONDS).await;
    assert_eq!(outcome, Outcome::Healthy);
    let request = server.await.unwrap();
    assert!(
        request.starts_with("GET /healthz?deep=1 HTTP/1.1\r\n"),
        "{request}"
    );
    for header in [
        format!("Host: 127.0.0.1:{port}"),
        "Connection: close".to_string(),
        "User-Agent: corral-health".to_string(),
    ] {
        assert!(request.contains(&format!("\r\n{header}\r\n")), "{request}");
    }
}

#[tokio::test]
async fn http_503_is_unhealthy_with_the_status_and_the_url() {
    let (port, _server) = answering(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
    let why = unhealthy(probe(&http("127.0.0.1", port, "/healthz"), SECONDS).await);
    assert_eq!(
        why,
        format!("HTTP 503 Service Unavailable from http://127.0.0.1:{port}/healthz")
    );
}

#[tokio::test]
async fn a_redirect_is_healthy_and_informational_answers_are_skipped() {
    let (port, _server) =
        answering(b"HTTP/1.1 301 Moved Permanently\r\nLocation: /elsewhere\r\n\r\n").await;
    assert_eq!(
        probe(&http("127.0.0.1", port, "/"), SECONDS).await,
        Outcome::Healthy
    );
    // The final answer counts, not the 103 before it.
    let (port, _server) = answering(
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.0 500 Internal Server Error\r\n\r\n",
    )
    .await;
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), SECONDS).await);
    assert!(
        why.starts_with("HTTP 500 Internal Server Error from"),
        "{why}"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_fails_at_the_deadline() {
    let (listener, port) = listener().await;
    let server = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        read_request(&mut stream).await;
        std::future::pending::<()>().await;
        drop(stream);
    });
    let started = Instant::now();
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), Duration::from_millis(200)).await);
    assert_eq!(
        why,
        format!("no answer within 200ms from http://127.0.0.1:{port}/")
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    server.abort();
}

#[tokio::test]
async fn a_server_that_closes_at_once_or_mid_way_is_unhealthy() {
    let (listener, port) = listener().await;
    let server = tokio::spawn(async move { drop(listener.accept().await.unwrap()) });
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), SECONDS).await);
    // A close before the request arrived is a FIN; after, a reset: either way, no answer.
    assert!(
        why.ends_with(&format!("from http://127.0.0.1:{port}/")),
        "{why}"
    );
    server.await.unwrap();

    let (port, _server) = answering(b"HTTP/1.1 200 OK\r\nContent-").await;
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), SECONDS).await);
    assert!(
        why.starts_with("the connection closed in the middle of the headers after HTTP 200"),
        "{why}"
    );

    let (port, _server) = answering(b"").await;
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), SECONDS).await);
    assert!(
        why.starts_with("the connection closed without an answer"),
        "{why}"
    );
}

#[tokio::test]
async fn garbage_instead_of_a_status_line_is_refused_without_waiting() {
    // No newline and the connection held open: refused on the first bytes, not at the deadline.
    let (port, server) = flooding(b"SSH-2.0-OpenSSH_9.6", Vec::new()).await;
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), Duration::from_secs(30)).await);
    assert!(
        why.starts_with("an answer that is not HTTP (\"SSH-2.0"),
        "{why}"
    );
    server.abort();

    let (port, _server) = answering(b"HTTP/1.1 OK 200\r\n\r\n").await;
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), SECONDS).await);
    assert!(why.starts_with("an answer that is not HTTP"), "{why}");
}

#[tokio::test]
async fn a_huge_head_is_read_only_up_to_its_bound() {
    // Endless headers after a 200: the status line decides, the rest is never read.
    let mut header = b"X-Filler: ".to_vec();
    header.extend([b'a'; 1000]);
    header.extend(b"\r\n");
    let (port, server) = flooding(b"HTTP/1.1 200 OK\r\n", header).await;
    assert_eq!(
        probe(&http("127.0.0.1", port, "/"), SECONDS).await,
        Outcome::Healthy
    );
    assert!(within(server).await.unwrap() >= MAX_HEAD);

    // An endless status line has no status at all.
    let (port, server) = flooding(b"HTTP/1.1 200 ", vec![b'a'; 1000]).await;
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), SECONDS).await);
    assert!(
        why.starts_with("no final status line in the first 16 KiB"),
        "{why}"
    );
    within(server).await.unwrap();
}

#[tokio::test]
async fn a_closed_port_is_refused_for_http_and_tcp() {
    let port = closed_port();
    let refused = format!("connection refused by 127.0.0.1:{port}");
    let why = unhealthy(probe(&http("127.0.0.1", port, "/"), SECONDS).await);
    assert_eq!(why, refused);
    let tcp = Probe::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    assert_eq!(unhealthy(probe(&tcp, SECONDS).await), refused);
}

#[tokio::test]
async fn tcp_is_healthy_when_the_port_accepts_and_names_resolve() {
    let (_listener, port) = listener().await;
    for host in ["127.0.0.1", "localhost"] {
        let tcp = Probe::Tcp {
            host: host.into(),
            port,
        };
        assert_eq!(probe(&tcp, SECONDS).await, Outcome::Healthy, "{host}");
    }
    let (port, server) = answering(b"HTTP/1.1 204 No Content\r\n\r\n").await;
    assert_eq!(
        probe(&http("localhost", port, "/"), SECONDS).await,
        Outcome::Healthy
    );
    let request = server.await.unwrap();
    assert!(
        request.contains(&format!("\r\nHost: localhost:{port}\r\n")),
        "{request}"
    );
}

#[tokio::test]
async fn http_on_speaks_over_a_handed_over_connection() {
    let (worker, mut probe_end) = loopback_pair().unwrap();
    let flags = rustix::fs::fcntl_getfl(&worker).unwrap();
    assert!(flags.contains(rustix::fs::OFlags::NONBLOCK));
    let fd_flags = rustix::io::fcntl_getfd(&worker).unwrap();
    assert!(fd_flags.contains(rustix::io::FdFlags::CLOEXEC));
    let mut worker = tokio::net::TcpStream::from_std(worker).unwrap();
    assert_eq!(worker.peer_addr().unwrap(), probe_end.local_addr().unwrap());

    // Bytes go both ways.
    probe_end.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    worker.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
    worker.write_all(b"pong").await.unwrap();
    probe_end.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"pong");

    let answer = tokio::spawn(async move {
        let request = read_request(&mut worker).await;
        worker.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        request
    });
    let outcome = within(http_on(probe_end, "127.0.0.1", 8080, "/ready")).await;
    assert_eq!(outcome, Outcome::Healthy);
    let request = answer.await.unwrap();
    assert!(request.starts_with("GET /ready HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"));
}

#[tokio::test]
async fn http_on_refuses_to_send_a_path_that_would_split_the_request() {
    let (_worker, probe_end) = loopback_pair().unwrap();
    let why = unhealthy(http_on(probe_end, "127.0.0.1", 80, "/a\r\nX-Evil: 1").await);
    assert!(
        why.contains("is not a URL an HTTP probe can ask for"),
        "{why}"
    );
}

#[tokio::test]
async fn exec_true_is_healthy_and_false_is_not() {
    assert_eq!(probe_exec(&["true"], SECONDS).await.0, Outcome::Healthy);
    let why = unhealthy(probe_exec(&["false"], SECONDS).await.0);
    assert_eq!(why, "exec:false exited with code 1");
}

#[tokio::test]
async fn an_exec_failure_carries_its_code_and_last_words() {
    let (outcome, _) = probe_exec(&["sh", "-c", "echo fine; echo oops >&2; exit 3"], SECONDS).await;
    let why = unhealthy(outcome);
    assert!(why.starts_with("exec:sh -c "), "{why}");
    assert!(why.ends_with(" exited with code 3: oops"), "{why}");
    // Nothing on stderr: the last line on stdout.
    let (outcome, _) = probe_exec(&["sh", "-c", "echo first; echo last; exit 2"], SECONDS).await;
    assert!(unhealthy(outcome).ends_with("exited with code 2: last"));
    // A flood of output is read and only its end kept.
    let script = "i=0; while [ $i -lt 2000 ]; do echo filler line $i; i=$((i+1)); done; \
                  echo the end >&2; exit 1";
    let (outcome, _) = probe_exec(&["sh", "-c", script], SECONDS).await;
    assert!(unhealthy(outcome).ends_with("exited with code 1: the end"));
    let (outcome, _) = probe_exec(&["sh", "-c", "kill -9 $$"], SECONDS).await;
    assert!(unhealthy(outcome).ends_with("was killed by SIGKILL"));
}

#[tokio::test]
async fn exec_runs_in_its_directory_with_exactly_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("marker"), "").unwrap();
    let script = dir.path().join("check.sh");
    std::fs::write(&script, "#!/bin/sh\necho nope >&2\nexit 4\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut context = context();
    context.cwd = dir.path().to_path_buf();
    context.env.insert("PROBE_X".into(), "yes".into());
    let (exits, _) = reaping();
    let check = exec(&[
        "sh",
        "-c",
        r#"test -f marker && test "$PROBE_X" = yes && test -z "$HOME""#,
    ]);
    assert_eq!(
        within(run(&check, &context, &exits, SECONDS)).await,
        Outcome::Healthy
    );
    // A relative program is found from the probe's directory.
    let outcome = within(run(&exec(&["./check.sh"]), &context, &exits, SECONDS)).await;
    assert_eq!(
        unhealthy(outcome),
        "exec:./check.sh exited with code 4: nope"
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let outcome = within(run(&exec(&["./check.sh"]), &context, &exits, SECONDS)).await;
    assert!(unhealthy(outcome).contains("make it executable"));
}

#[tokio::test]
async fn a_missing_program_or_directory_says_so() {
    let why = unhealthy(probe_exec(&["no-such-probe-program", "x"], SECONDS).await.0);
    assert!(
        why.starts_with(
            "exec:no-such-probe-program x: no program 'no-such-probe-program' on the probe's PATH ("
        ),
        "{why}"
    );
    let why = unhealthy(probe_exec(&["./no-such-script.sh"], SECONDS).await.0);
    assert!(why.contains(": there is no file "), "{why}");
    assert!(why.ends_with("no-such-script.sh"), "{why}");

    let dir = tempfile::tempdir().unwrap();
    let mut context = context();
    context.cwd = dir.path().join("gone");
    let outcome = within(run(&exec(&["true"]), &context, &Exits::default(), SECONDS)).await;
    let why = unhealthy(outcome);
    assert!(
        why.starts_with("exec:true: the working directory "),
        "{why}"
    );
    assert!(why.ends_with("gone does not exist"), "{why}");
}

#[tokio::test]
async fn a_hanging_exec_is_killed_and_reaped_at_the_deadline() {
    let started = Instant::now();
    let (outcome, pid) = probe_exec(&["sleep", "30"], Duration::from_millis(200)).await;
    assert_eq!(
        unhealthy(outcome),
        "no answer within 200ms from exec:sleep 30; killed it with its process group"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Reaped (claimed only after waitpid returned), so gone from /proc, and its group with it.
    assert!(pid > 0);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(live_members(pid).is_empty());
}

#[tokio::test]
async fn the_whole_group_of_an_exec_goes_with_it() {
    // Past the deadline, the children it started die with it.
    let (outcome, pgid) = probe_exec(
        &["sh", "-c", "sleep 30 & sleep 30"],
        Duration::from_millis(200),
    )
    .await;
    assert!(unhealthy(outcome).starts_with("no answer within 200ms"));
    group_ends(pgid).await;
    // A probe that passes but leaves a child running (holding its stdout open) does not wait
    // for it, nor leave it behind.
    let (outcome, pgid) = probe_exec(&["sh", "-c", "sleep 30 & echo started"], SECONDS).await;
    assert_eq!(outcome, Outcome::Healthy);
    group_ends(pgid).await;
}

#[tokio::test]
async fn an_exec_probe_given_up_on_is_killed() {
    let (exits, pids) = reaping();
    let check = exec(&["sleep", "30"]);
    let given_up = tokio::time::timeout(
        Duration::from_millis(100),
        run(&check, &context(), &exits, Duration::from_secs(30)),
    )
    .await;
    assert!(given_up.is_err());
    let pgid = pids.lock().unwrap()[0];
    group_ends(pgid).await;
}

#[test]
fn an_exit_is_claimed_once_and_only_if_awaited() {
    let exits = Exits::default();
    assert!(!exits.claim(4_000_000, ExitKind::Code(0)));
    let (child, mut exit) = exits
        .spawn(Command::new("true").stdout(Stdio::null()))
        .unwrap();
    let pid = child.id();
    // The registration was made before `spawn` returned: a reaper claiming now finds it.
    let status = wait_for(pid);
    assert!(exits.claim(pid, status));
    assert!(!exits.claim(pid, status));
    assert_eq!(exit.try_recv(), Ok(ExitKind::Code(0)));
}

#[test]
fn heads_parse_as_a_client_must() {
    let ok = |code, reason: &str| Status {
        code,
        reason: reason.into(),
    };
    assert_eq!(parse_head(b""), Head::NoStatus);
    assert_eq!(parse_head(b"HTT"), Head::NoStatus);
    assert_eq!(
        parse_head(b"HTTP/1.1 200 OK\r\n"),
        Head::InHeaders(ok(200, "OK"))
    );
    assert_eq!(
        parse_head(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody"),
        Head::Complete(ok(200, "OK"))
    );
    assert_eq!(parse_head(b"HTTP/1.0 404\n\n"), Head::Complete(ok(404, "")));
    assert_eq!(
        parse_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 Fine\r\n"),
        Head::InHeaders(ok(200, "Fine"))
    );
    for bad in [
        &b"hello\r\n"[..],
        b"HTTP/1.1 2000 OK\r\n",
        b"HTTP/1.1 20 OK\r\n",
        b"HTTP/ 200 OK\r\n",
        b"HTTP/1.1 099 Low\r\n",
        b"\x16\x03\x01",
    ] {
        assert!(matches!(parse_head(bad), Head::Malformed(_)), "{bad:?}");
    }
}

#[test]
fn small_helpers() {
    assert_eq!(human(Duration::from_millis(200)), "200ms");
    assert_eq!(human(Duration::from_secs(2)), "2s");
    assert_eq!(human(Duration::from_millis(1500)), "1.5s");
    assert_eq!(authority("::1", 80), "[::1]:80");
    assert_eq!(authority("[::1]", 80), "[::1]:80");
    assert_eq!(authority("localhost", 80), "localhost:80");
    let mut tail = Tail::default();
    tail.push(&[b'x'; 2000]);
    tail.push(b"\nlast words\n\n");
    assert_eq!(tail.0.len(), OUTPUT_TAIL);
    assert_eq!(tail.last_line().as_deref(), Some("last words"));
    assert_eq!(Tail::default().last_line(), None);
}
