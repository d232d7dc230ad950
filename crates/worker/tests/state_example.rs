//! The `state` example against a stand-in master: the test holds the other end of the example's
//! channel (a real socket pair, the example's end at descriptor 3 as corral places it) and
//! speaks the channel protocol on it, keeping a small key/value store. The real master's
//! end-to-end tests live with the daemon; these check the example's modes and output lines.
//!
//! The example is built by `cargo test -p corral-worker --all-features` next to this test.

#![cfg(feature = "tokio")]

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use corral_proto::channel::{
    StateCall, WorkerMessage, finish_state_batch, read_state_batch, start_state_batch,
};
use corral_proto::resp;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(30);

/// The example's binary, built beside this test.
fn example() -> PathBuf {
    let me = std::env::current_exe().expect("the test's own path");
    let profile = me
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from <target>/<profile>/deps");
    let path = profile.join("examples").join("state");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test -p corral-worker --all-features`, which \
         builds the examples",
        path.display()
    );
    path
}

/// The example, run with its channel's other end held here.
struct Worker {
    child: Child,
    writer: Arc<Mutex<UnixStream>>,
    lines: mpsc::Receiver<String>,
    /// What the example sent other than state calls (which the stand-in answers).
    seen: mpsc::Receiver<WorkerMessage>,
    store: Arc<Mutex<BTreeMap<String, String>>>,
}

impl Worker {
    /// Starts the example with `env`; the stand-in answers state calls once `hold` of them are
    /// unanswered (at once with 1).
    fn start(env: &[(&str, &str)], hold: usize) -> Worker {
        let (master, worker) = UnixStream::pair().unwrap();
        let mut command = Command::new(example());
        for (name, _) in std::env::vars() {
            if name.starts_with("CORRAL_") || name.starts_with("STATE_") || name == "LISTEN_FDS" {
                command.env_remove(name);
            }
        }
        command
            .env("CORRAL_CHANNEL_FD", "3")
            .env("CORRAL_CHANNEL_PROTOCOL", "2")
            .env("CORRAL_WORKER_ID", "5")
            .env("CORRAL_APP", "state")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        corral_sys::fd::place_fds(&mut command, &[(worker.as_fd(), 3)]).unwrap();
        let mut child = command.spawn().unwrap();
        drop(command);
        drop(worker);

        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line_tx.send(line).is_err() {
                    break;
                }
            }
        });

        let writer = Arc::new(Mutex::new(master.try_clone().unwrap()));
        let store = Arc::new(Mutex::new(BTreeMap::new()));
        let (seen_tx, seen) = mpsc::channel();
        let (answers_to, store_of_master) = (writer.clone(), store.clone());
        thread::spawn(move || serve(master, &answers_to, &store_of_master, &seen_tx, hold));
        Worker {
            child,
            writer,
            lines,
            seen,
            store,
        }
    }

    /// Sends the master's message `json`.
    fn send(&self, json: &Value) {
        write_frame(&self.writer, json);
    }

    /// The example's next line on stdout.
    fn line(&self) -> String {
        self.lines
            .recv_timeout(LONG)
            .expect("the example printed its next line in time")
    }

    /// The example's next message other than a state call.
    fn seen(&self) -> WorkerMessage {
        self.seen
            .recv_timeout(LONG)
            .expect("the example sent its next message in time")
    }

    fn value(&self, key: &str) -> Option<String> {
        self.store
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Tells the example to shut down; how it exited.
    fn stop(mut self) -> ExitStatus {
        self.send(&json!({"type": "shutdown"}));
        wait_exit(&mut self.child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + LONG;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the example did not exit");
        thread::sleep(Duration::from_millis(10));
    }
}

fn write_frame(writer: &Mutex<UnixStream>, json: &Value) {
    let body = json.to_string();
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(body.as_bytes());
    write_bytes(writer, &frame);
}

fn write_bytes(writer: &Mutex<UnixStream>, bytes: &[u8]) {
    let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
    // The example may be gone already (a test that expects it to fail).
    let _ = writer.write_all(bytes);
}

/// The stand-in master: answers state calls from `store` (a `state` message in kind, a state
/// batch in a batch frame of one reply per call), passes the rest on to `seen`.
fn serve(
    mut master: UnixStream,
    writer: &Mutex<UnixStream>,
    store: &Mutex<BTreeMap<String, String>>,
    seen: &mpsc::Sender<WorkerMessage>,
    hold: usize,
) {
    let mut unanswered: VecDeque<Vec<u8>> = VecDeque::new();
    loop {
        let mut len = [0u8; 4];
        if master.read_exact(&mut len).is_err() {
            return;
        }
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if master.read_exact(&mut body).is_err() {
            return;
        }
        let mut store = store.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((first, mut commands)) = read_state_batch(&body) {
            let mut id = first;
            while !commands.is_empty() {
                let (command, len) = resp::read_command(commands).unwrap().unwrap();
                let call = StateCall::from_command(command.args()).unwrap();
                let mut reply = Vec::new();
                match (&call, do_call(&mut store, call.clone())) {
                    (_, Value::String(value)) => resp::bulk(&mut reply, Some(value.as_bytes())),
                    (_, Value::Null) => resp::bulk(&mut reply, None),
                    (StateCall::Set { .. }, _) => resp::ok(&mut reply),
                    (_, Value::Bool(yes)) => resp::integer(&mut reply, i64::from(yes)),
                    (_, n) => resp::integer(&mut reply, n.as_i64().unwrap()),
                }
                let mut frame = Vec::new();
                let start = start_state_batch(&mut frame, id);
                frame.extend_from_slice(&reply);
                finish_state_batch(&mut frame, start);
                unanswered.push_back(frame);
                commands = &commands[len..];
                id += 1;
            }
        } else {
            match serde_json::from_slice(&body).unwrap() {
                WorkerMessage::State { id, call } => {
                    let ok = do_call(&mut store, call);
                    let answer = json!({"type": "state", "id": id, "ok": ok}).to_string();
                    let mut frame = (answer.len() as u32).to_be_bytes().to_vec();
                    frame.extend_from_slice(answer.as_bytes());
                    unanswered.push_back(frame);
                }
                other => {
                    let _ = seen.send(other);
                }
            }
        }
        drop(store);
        if unanswered.len() >= hold {
            for answer in unanswered.drain(..) {
                write_bytes(writer, &answer);
            }
        }
    }
}

fn do_call(store: &mut BTreeMap<String, String>, call: StateCall) -> Value {
    match call {
        StateCall::Get { key } => json!(store.get(&key)),
        StateCall::Set { key, value, .. } => {
            store.insert(key, value);
            json!(true)
        }
        StateCall::Del { key } => json!(store.remove(&key).is_some()),
        StateCall::Incr { key, by } => {
            let n = store.get(&key).map_or(0, |v| v.parse::<i64>().unwrap()) + by;
            store.insert(key, n.to_string());
            json!(n)
        }
        StateCall::Subscribe { .. } | StateCall::Unsubscribe { .. } => json!(true),
        other => panic!("the example made an unexpected call: {other:?}"),
    }
}

#[test]
fn count_keeps_its_increments_in_flight_and_prints_the_total() {
    // The stand-in answers only when 16 calls wait: the example must keep 16 in flight.
    let worker = Worker::start(
        &[
            ("STATE_MODE", "count"),
            ("STATE_INCRS", "1600"),
            ("STATE_KEY", "hits"),
        ],
        16,
    );
    assert_eq!(worker.seen(), WorkerMessage::Ready);
    assert_eq!(worker.line(), "counted 1600 last=1600");
    assert_eq!(worker.value("hits").as_deref(), Some("1600"));
    assert!(worker.stop().success());
}

#[test]
fn subscribe_prints_what_is_published() {
    let worker = Worker::start(
        &[("STATE_MODE", "subscribe"), ("STATE_PATTERN", "news.*")],
        1,
    );
    assert_eq!(worker.seen(), WorkerMessage::Ready);
    assert_eq!(worker.line(), "subscribed news.*");
    for message in ["goal", "rain tomorrow"] {
        worker.send(&json!({"type": "published", "pattern": "news.*",
                            "channel": "news.sport", "message": message}));
    }
    assert_eq!(worker.line(), "got news.sport goal");
    assert_eq!(worker.line(), "got news.sport rain tomorrow");
    assert!(worker.stop().success());
}

#[test]
fn answer_echoes_requests_and_prints_messages() {
    let worker = Worker::start(&[("STATE_MODE", "answer")], 1);
    assert_eq!(worker.seen(), WorkerMessage::Ready);
    worker.send(&json!({"type": "message", "data": {"q": 1}, "from": "worker:2", "request": 9}));
    assert_eq!(
        worker.seen(),
        WorkerMessage::Reply {
            request: 9,
            data: json!({"echo": {"q": 1}, "by": 5}),
            error: None
        }
    );
    assert_eq!(worker.line(), r#"request from worker:2: {"q":1}"#);
    worker.send(&json!({"type": "message", "data": "hi", "from": "cli"}));
    assert_eq!(worker.line(), r#"message from cli: "hi""#);
    assert!(worker.stop().success());
}

#[test]
fn bench_runs_what_it_is_asked_and_answers_with_the_numbers() {
    let worker = Worker::start(&[("STATE_MODE", "bench")], 1);
    assert_eq!(worker.seen(), WorkerMessage::Ready);
    let asked = json!({"bench": {"op": "set", "ops": 1000, "batch": 64}});
    worker.send(&json!({"type": "message", "data": asked, "from": "cli", "request": 4}));
    let WorkerMessage::Reply {
        request: 4,
        data,
        error: None,
    } = worker.seen()
    else {
        panic!("the bench request was not answered with numbers")
    };
    assert_eq!((&data["op"], &data["ops"]), (&json!("set"), &json!(1000)));
    assert!(data["ops_per_sec"].as_f64().unwrap() > 0.0);
    let line = worker.line();
    let words: Vec<&str> = line.split(' ').collect();
    assert_eq!(words[..3], ["bench", "op=set", "ops=1000"], "{line}");
    assert!(words[3].starts_with("secs=") && words[4].starts_with("ops_per_sec="));
    // Keys bench:0 to bench:99, the last value written to each.
    assert_eq!(worker.value("bench:99").as_deref(), Some("999"));

    // Asked by a plain message: a line, no answer.
    worker.send(&json!({"type": "message", "data": {"bench": {"op": "get", "ops": 300}}}));
    assert!(worker.line().starts_with("bench op=get ops=300 secs="));
    // Not a benchmark: an error for the requester.
    worker.send(&json!({"type": "message", "data": {"hello": 1}, "request": 5}));
    let WorkerMessage::Reply {
        request: 5,
        error: Some(error),
        ..
    } = worker.seen()
    else {
        panic!("a request that is no benchmark got no error")
    };
    assert!(error.contains("not a benchmark"), "{error}");
    assert!(worker.stop().success());
}

#[test]
fn an_unknown_or_missing_mode_is_an_error() {
    for env in [&[("STATE_MODE", "juggle")][..], &[]] {
        let mut worker = Worker::start(env, 1);
        let status = wait_exit(&mut worker.child);
        assert_eq!(status.code(), Some(2), "{env:?}");
    }
}
