//! A worker that uses the shared state and the bus, for corral's end-to-end tests and benchmark.
//! `STATE_MODE` says what it does; it tells ready, prints each result as one line on stdout, and
//! stays until told to shut down:
//!
//! - `count`: `STATE_INCRS` (1000) increments of `STATE_KEY` (`counter`) by 1, with
//!   `STATE_CONCURRENCY` (16) calls in flight at a time; prints `counted <n> last=<value>`, the
//!   value being the highest the increments returned (the counter after this worker's last one).
//! - `subscribe`: subscribes to `STATE_PATTERN`; prints `subscribed <pattern>` once corral
//!   confirmed it, then `got <channel> <message>` for each message published.
//! - `answer`: answers each request on the bus with `{"echo": <data>, "by": <worker id>}`, and
//!   prints `request from <from>: <data>`; prints `message from <from>: <data>` for each plain
//!   message.
//! - `bench`: for each message or request `{"bench": {"op": "get"|"set", "ops": N, "batch": B}}`
//!   (B: 100 when left out), makes N calls on keys `bench:0` to `bench:99`, B at a time in one
//!   `call_many`; prints `bench op=<op> ops=<N> secs=<secs> ops_per_sec=<rate>`, and answers a
//!   request with the same numbers as JSON.
//!
//! Anything else is an error (exit status 2).
//!
//! ```sh
//! cargo build --release --example state -p corral-worker --features tokio
//! STATE_MODE=count corral start target/release/examples/state -i 4
//! ```

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use corral_worker::{CallError, StateCall};
use serde_json::{Value, json};

/// Prints one line on stdout, at once.
macro_rules! say {
    ($($arg:tt)*) => {{
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, $($arg)*);
        let _ = out.flush();
    }};
}

/// What to do, from the environment.
#[derive(Debug)]
enum Mode {
    Count {
        key: String,
        incrs: u64,
        concurrency: u64,
    },
    Subscribe {
        pattern: String,
    },
    Answer,
    Bench,
}

fn mode() -> Result<Mode, String> {
    let mode = std::env::var("STATE_MODE").unwrap_or_default();
    match mode.as_str() {
        "count" => Ok(Mode::Count {
            key: std::env::var("STATE_KEY").unwrap_or_else(|_| "counter".into()),
            incrs: positive("STATE_INCRS", 1000)?,
            concurrency: positive("STATE_CONCURRENCY", 16)?,
        }),
        "subscribe" => match std::env::var("STATE_PATTERN") {
            Ok(pattern) if !pattern.is_empty() => Ok(Mode::Subscribe { pattern }),
            _ => Err(
                "STATE_MODE=subscribe needs STATE_PATTERN, the pattern to subscribe to \
                      (`news.*`)"
                    .into(),
            ),
        },
        "answer" => Ok(Mode::Answer),
        "bench" => Ok(Mode::Bench),
        "" => Err("STATE_MODE is not set: say count, subscribe, answer or bench".into()),
        other => Err(format!(
            "STATE_MODE={other} is not a mode: say count, subscribe, answer or bench"
        )),
    }
}

/// A positive integer from `name`, or `default` when it is not set.
fn positive(name: &str, default: u64) -> Result<u64, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(text) => match text.parse() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!("{name}={text} is not a positive integer")),
        },
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let mode = match mode() {
        Ok(mode) => mode,
        Err(error) => {
            eprintln!("state: {error}");
            return ExitCode::from(2);
        }
    };
    if let Err(error) = corral_worker::ready() {
        eprintln!("state: telling corral this worker is ready: {error}");
        return ExitCode::FAILURE;
    }
    let shutdown = corral_worker::tokio::shutdown();
    tokio::pin!(shutdown);
    let work = async {
        match mode {
            Mode::Count {
                key,
                incrs,
                concurrency,
            } => count(key, incrs, concurrency).await,
            Mode::Subscribe { pattern } => subscribe(&pattern).await,
            Mode::Answer => answer().await,
            Mode::Bench => bench().await,
        }
    };
    tokio::select! {
        () = work => {}
        () = &mut shutdown => return ExitCode::SUCCESS,
    }
    // The work is done (or the channel closed): stay until told to go.
    shutdown.await;
    ExitCode::SUCCESS
}

/// `count`: `incrs` increments, `concurrency` in flight at a time.
async fn count(key: String, incrs: u64, concurrency: u64) {
    let state = corral_worker::tokio::state();
    let key = Arc::new(key);
    let issued = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(incrs) {
        let (key, issued) = (key.clone(), issued.clone());
        tasks.spawn(async move {
            let (mut done, mut last) = (0u64, i64::MIN);
            while issued.fetch_add(1, Ordering::Relaxed) < incrs {
                last = last.max(state.incr(&key, 1).await?);
                done += 1;
            }
            Ok::<_, CallError>((done, last))
        });
    }
    let (mut counted, mut last) = (0u64, i64::MIN);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok((done, highest))) => {
                counted += done;
                last = last.max(highest);
            }
            Ok(Err(error)) => {
                eprintln!("state: incr {key}: {error}");
                return;
            }
            Err(error) => {
                eprintln!("state: an incr task failed: {error}");
                return;
            }
        }
    }
    say!("counted {counted} last={last}");
}

/// `subscribe`: every message published on `pattern`.
async fn subscribe(pattern: &str) {
    let state = corral_worker::tokio::state();
    let mut subscription = match state.subscribe(pattern).await {
        Ok(subscription) => subscription,
        Err(error) => {
            eprintln!("state: subscribe {pattern}: {error}");
            return;
        }
    };
    say!("subscribed {pattern}");
    while let Some(published) = subscription.next().await {
        say!("got {} {}", published.channel, published.message);
    }
}

/// `answer`: echoes requests, prints plain messages.
async fn answer() {
    let bus = corral_worker::tokio::bus();
    let me = corral_worker::worker_id();
    loop {
        // Both are cancel-safe: each takes a request or message only when it returns it.
        tokio::select! {
            request = bus.next_request() => {
                let Some(request) = request else { return };
                say!("request from {}: {}", request.from, request.data);
                let echo = json!({"echo": request.data, "by": me});
                if let Err(error) = request.reply(Ok(echo)) {
                    eprintln!("state: reply: {error}");
                }
            }
            message = corral_worker::tokio::next_message() => {
                let Some(message) = message else { return };
                let from = message.from.as_deref().unwrap_or("unknown");
                say!("message from {from}: {}", message.data);
            }
        }
    }
}

/// One benchmark run, as asked.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Bench {
    set: bool,
    ops: u64,
    batch: u64,
}

impl Bench {
    fn op(self) -> &'static str {
        if self.set { "set" } else { "get" }
    }

    /// The run asked for by `data`: `{"bench": {"op": "get"|"set", "ops": N, "batch": B}}`.
    fn parse(data: &Value) -> Result<Bench, String> {
        let usage =
            r#"a benchmark is asked for with {"bench": {"op": "get"|"set", "ops": N, "batch": B}}"#;
        let Some(asked) = data.get("bench") else {
            return Err(format!("not a benchmark: {usage}"));
        };
        let set = match asked.get("op").and_then(Value::as_str) {
            Some("get") => false,
            Some("set") => true,
            _ => return Err(format!("no op get or set: {usage}")),
        };
        let ops = match asked.get("ops").and_then(Value::as_u64) {
            Some(ops) if ops > 0 => ops,
            _ => return Err(format!("ops is not a positive integer: {usage}")),
        };
        let batch = match asked.get("batch") {
            None => 100,
            Some(batch) => match batch.as_u64() {
                Some(batch) if batch > 0 => batch,
                _ => return Err(format!("batch is not a positive integer: {usage}")),
            },
        };
        Ok(Bench { set, ops, batch })
    }

    /// Runs it; the seconds it took.
    async fn run(self, state: corral_worker::tokio::State) -> Result<f64, CallError> {
        let started = Instant::now();
        let mut next = 0;
        while next < self.ops {
            let end = self.ops.min(next + self.batch);
            let calls = (next..end)
                .map(|i| {
                    let key = format!("bench:{}", i % 100);
                    if self.set {
                        StateCall::Set {
                            key,
                            value: i.to_string(),
                            ttl_ms: None,
                        }
                    } else {
                        StateCall::Get { key }
                    }
                })
                .collect();
            for answer in state.call_many(calls).await {
                answer?;
            }
            next = end;
        }
        Ok(started.elapsed().as_secs_f64())
    }
}

/// `bench`: runs each benchmark asked for, by message or request.
async fn bench() {
    let state = corral_worker::tokio::state();
    let bus = corral_worker::tokio::bus();
    loop {
        let (data, request) = tokio::select! {
            request = bus.next_request() => match request {
                Some(mut request) => (std::mem::take(&mut request.data), Some(request)),
                None => return,
            },
            message = corral_worker::tokio::next_message() => match message {
                Some(message) => (message.data, None),
                None => return,
            },
        };
        let outcome = match Bench::parse(&data) {
            Ok(bench) => match bench.run(state).await {
                Ok(secs) => {
                    let rate = bench.ops as f64 / secs;
                    say!(
                        "bench op={} ops={} secs={secs} ops_per_sec={rate}",
                        bench.op(),
                        bench.ops
                    );
                    Ok(json!({
                        "op": bench.op(),
                        "ops": bench.ops,
                        "batch": bench.batch,
                        "secs": secs,
                        "ops_per_sec": rate,
                    }))
                }
                Err(error) => Err(format!("the {} benchmark failed: {error}", bench.op())),
            },
            Err(error) => Err(error),
        };
        match (request, outcome) {
            (Some(request), outcome) => {
                if let Err(error) = request.reply(outcome) {
                    eprintln!("state: reply: {error}");
                }
            }
            (None, Err(error)) => eprintln!("state: {error}"),
            (None, Ok(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_benchmark_is_read_from_its_message() {
        let asked = json!({"bench": {"op": "set", "ops": 1000, "batch": 50}});
        assert_eq!(
            Bench::parse(&asked),
            Ok(Bench {
                set: true,
                ops: 1000,
                batch: 50
            })
        );
        let asked = json!({"bench": {"op": "get", "ops": 10}});
        assert_eq!(Bench::parse(&asked).map(|b| b.batch), Ok(100));
        assert!(Bench::parse(&json!({"bench": {"op": "del", "ops": 1}})).is_err());
        assert!(Bench::parse(&json!({"bench": {"op": "get", "ops": 0}})).is_err());
        assert!(Bench::parse(&json!({"hello": 1})).is_err());
    }
}
