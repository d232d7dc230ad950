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
//!   request with the same numbers as JSON. It also measures pub/sub fan-out latency, asked by
//!   these requests (or messages, which print a line instead of answering):
//!   - `{"listen": {"pattern": "lat.*"}}`: subscribes to the pattern and answers
//!     `{"listening": <pattern>}` once corral confirmed it (`"already": true` when it listens on
//!     it already). From then on a task records, for each message published there, the time from
//!     the stamp it carries (`<seq> <ns since the UNIX epoch>`, as `publish` writes it) to its
//!     arrival, keeping at most 100,000 samples; the worker answers requests meanwhile.
//!   - `{"report": {}}`: answers `{"count": n, "samples_us": [...], "remaining": r, "dropped": d,
//!     "unreadable": u}` and forgets what it answered: the latencies in microseconds (at most
//!     50,000 per answer, so that it fits in a frame; `remaining` are left for the next report),
//!     the messages that came while 100,000 samples were kept (`dropped`), and those without a
//!     stamp (`unreadable`).
//!   - `{"publish": {"channel": "lat.x", "count": N, "gap_us": G}}`: publishes N stamped
//!     messages one after another, each awaited, then waits G microseconds (0 when left out;
//!     `tokio::time::sleep`, so at least about a millisecond) before the next; answers
//!     `{"published": N, "receivers": R, "secs": S}`, R being what the last publish returned
//!     (the store counts one per subscribed pattern, not per subscriber).
//!
//! Anything else is an error (exit status 2).
//!
//! ```sh
//! cargo build --release --example state -p corral-worker --features tokio
//! STATE_MODE=count corral start target/release/examples/state -i 4
//! ```

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// The latency samples kept at most; later messages are counted as dropped.
const MAX_SAMPLES: usize = 100_000;
/// The samples given in one report at most, so that the answer stays well within a frame (1 MiB).
const REPORT_MOST: usize = 50_000;

/// What a `bench` worker is asked, by message or request.
#[derive(Debug, Clone, PartialEq)]
enum Asked {
    Bench(Bench),
    Listen { pattern: String },
    Report,
    Publish(Publish),
}

impl Asked {
    /// The request `data` makes: `{"bench": ...}`, `{"listen": ...}`, `{"report": {}}` or
    /// `{"publish": ...}`.
    fn parse(data: &Value) -> Result<Asked, String> {
        if data.get("bench").is_some() {
            return Bench::parse(data).map(Asked::Bench);
        }
        if let Some(asked) = data.get("listen") {
            let usage = r#"a listener is asked for with {"listen": {"pattern": "lat.*"}}"#;
            return match asked.get("pattern").and_then(Value::as_str) {
                Some(pattern) if !pattern.is_empty() => Ok(Asked::Listen {
                    pattern: pattern.to_string(),
                }),
                _ => Err(format!("no pattern to listen on: {usage}")),
            };
        }
        if data.get("report").is_some() {
            return Ok(Asked::Report);
        }
        if data.get("publish").is_some() {
            return Publish::parse(data).map(Asked::Publish);
        }
        Err(
            r#"not a benchmark request: ask for {"bench": {"op": "get"|"set", "ops": N, "batch": B}}, {"listen": {"pattern": P}}, {"report": {}} or {"publish": {"channel": C, "count": N, "gap_us": G}}"#
                .into(),
        )
    }
}

/// Stamped messages to publish, as asked.
#[derive(Debug, Clone, PartialEq)]
struct Publish {
    channel: String,
    count: u64,
    gap_us: u64,
}

impl Publish {
    /// The run asked for by `data`: `{"publish": {"channel": C, "count": N, "gap_us": G}}`.
    fn parse(data: &Value) -> Result<Publish, String> {
        let usage = r#"publishing is asked for with {"publish": {"channel": "lat.x", "count": N, "gap_us": G}}"#;
        let Some(asked) = data.get("publish") else {
            return Err(format!("not a publish request: {usage}"));
        };
        let channel = match asked.get("channel").and_then(Value::as_str) {
            Some(channel) if !channel.is_empty() => channel.to_string(),
            _ => return Err(format!("no channel to publish on: {usage}")),
        };
        let count = match asked.get("count").and_then(Value::as_u64) {
            Some(count) if count > 0 => count,
            _ => return Err(format!("count is not a positive integer: {usage}")),
        };
        let gap_us = match asked.get("gap_us") {
            None => 0,
            Some(gap) => match gap.as_u64() {
                Some(gap) if gap <= 60_000_000 => gap,
                _ => {
                    return Err(format!(
                        "gap_us is not an integer from 0 to 60000000 (a minute): {usage}"
                    ));
                }
            },
        };
        Ok(Publish {
            channel,
            count,
            gap_us,
        })
    }

    /// Publishes the messages; what the last publish returned, and the seconds it all took.
    async fn run(&self, state: corral_worker::tokio::State) -> Result<(u64, f64), String> {
        let gap = Duration::from_micros(self.gap_us);
        let started = Instant::now();
        let mut receivers = 0;
        for seq in 0..self.count {
            let message = format!("{seq} {}", unix_nanos());
            receivers = state
                .publish(&self.channel, &message)
                .await
                .map_err(|error| {
                    format!(
                        "publish {} of {} on {}: {error}",
                        seq + 1,
                        self.count,
                        self.channel
                    )
                })?;
            if !gap.is_zero() && seq + 1 < self.count {
                tokio::time::sleep(gap).await;
            }
        }
        Ok((receivers, started.elapsed().as_secs_f64()))
    }
}

/// Nanoseconds since the UNIX epoch, by the system clock (the one every process here shares).
fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

/// The latency of a message published by `publish` (`<seq> <stamp>`), arrived at `now` (ns
/// since the UNIX epoch), in microseconds; `None` when it carries no stamp.
fn latency_us(message: &str, now: u64) -> Option<f64> {
    let stamp: u64 = message.rsplit(' ').next()?.parse().ok()?;
    Some((i128::from(now) - i128::from(stamp)) as f64 / 1000.0)
}

/// The latencies recorded by the listening tasks, until reported.
#[derive(Debug, Default)]
struct Samples {
    us: Vec<f64>,
    dropped: u64,
    unreadable: u64,
}

impl Samples {
    fn record(&mut self, latency: Option<f64>) {
        match latency {
            Some(_) if self.us.len() >= MAX_SAMPLES => self.dropped += 1,
            Some(us) => self.us.push(us),
            None => self.unreadable += 1,
        }
    }

    /// The answer to `report`: the oldest samples (at most [`REPORT_MOST`]), forgotten here.
    fn report(&mut self) -> Value {
        let n = self.us.len().min(REPORT_MOST);
        // Tenths of a microsecond are plenty, and keep the answer short.
        let samples: Vec<f64> = self
            .us
            .drain(..n)
            .map(|us| (us * 10.0).round() / 10.0)
            .collect();
        let answer = json!({
            "count": n,
            "samples_us": samples,
            "remaining": self.us.len(),
            "dropped": self.dropped,
            "unreadable": self.unreadable,
        });
        self.dropped = 0;
        self.unreadable = 0;
        answer
    }
}

/// The subscriptions of a `bench` worker, each read by a task of its own.
#[derive(Debug, Default)]
struct Listener {
    samples: Arc<Mutex<Samples>>,
    tasks: HashMap<String, tokio::task::JoinHandle<()>>,
}

impl Listener {
    /// Subscribes to `pattern` and starts recording what comes; answers once corral confirmed
    /// the subscription.
    async fn listen(
        &mut self,
        state: corral_worker::tokio::State,
        pattern: String,
    ) -> Result<Value, String> {
        if self
            .tasks
            .get(&pattern)
            .is_some_and(|task| !task.is_finished())
        {
            return Ok(json!({"listening": pattern, "already": true}));
        }
        let mut subscription = state
            .subscribe(&pattern)
            .await
            .map_err(|error| format!("subscribe {pattern}: {error}"))?;
        let samples = self.samples.clone();
        let task = tokio::spawn(async move {
            while let Some(published) = subscription.next().await {
                let latency = latency_us(&published.message, unix_nanos());
                samples
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .record(latency);
            }
        });
        self.tasks.insert(pattern.clone(), task);
        Ok(json!({"listening": pattern}))
    }

    fn report(&self) -> Value {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .report()
    }
}

/// Does what `data` asks of a `bench` worker; the answer, and the line to print.
async fn bench_one(
    data: &Value,
    state: corral_worker::tokio::State,
    listener: &mut Listener,
) -> Result<(Value, String), String> {
    match Asked::parse(data)? {
        Asked::Bench(bench) => match bench.run(state).await {
            Ok(secs) => {
                let rate = bench.ops as f64 / secs;
                let line = format!(
                    "bench op={} ops={} secs={secs} ops_per_sec={rate}",
                    bench.op(),
                    bench.ops
                );
                let answer = json!({
                    "op": bench.op(),
                    "ops": bench.ops,
                    "batch": bench.batch,
                    "secs": secs,
                    "ops_per_sec": rate,
                });
                Ok((answer, line))
            }
            Err(error) => Err(format!("the {} benchmark failed: {error}", bench.op())),
        },
        Asked::Listen { pattern } => {
            let answer = listener.listen(state, pattern.clone()).await?;
            Ok((answer, format!("listening {pattern}")))
        }
        Asked::Report => {
            let answer = listener.report();
            let line = format!("report count={}", answer["count"]);
            Ok((answer, line))
        }
        Asked::Publish(publish) => {
            let (receivers, secs) = publish.run(state).await?;
            let line = format!(
                "published {} on {} receivers={receivers} secs={secs}",
                publish.count, publish.channel
            );
            let answer = json!({
                "published": publish.count,
                "receivers": receivers,
                "secs": secs,
            });
            Ok((answer, line))
        }
    }
}

/// `bench`: does each thing asked for, by message or request.
async fn bench() {
    let state = corral_worker::tokio::state();
    let bus = corral_worker::tokio::bus();
    let mut listener = Listener::default();
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
        let outcome = match bench_one(&data, state, &mut listener).await {
            Ok((answer, line)) => {
                say!("{line}");
                Ok(answer)
            }
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

    #[test]
    fn fan_out_requests_are_read_from_their_message() {
        assert_eq!(
            Asked::parse(&json!({"listen": {"pattern": "lat.*"}})),
            Ok(Asked::Listen {
                pattern: "lat.*".into()
            })
        );
        assert_eq!(Asked::parse(&json!({"report": {}})), Ok(Asked::Report));
        let asked = json!({"publish": {"channel": "lat.x", "count": 20, "gap_us": 200}});
        assert_eq!(
            Asked::parse(&asked),
            Ok(Asked::Publish(Publish {
                channel: "lat.x".into(),
                count: 20,
                gap_us: 200
            }))
        );
        let asked = json!({"publish": {"channel": "lat.x", "count": 3}});
        assert_eq!(Publish::parse(&asked).map(|p| p.gap_us), Ok(0));
        assert!(Asked::parse(&json!({"listen": {}})).is_err());
        assert!(Asked::parse(&json!({"publish": {"channel": "lat.x", "count": 0}})).is_err());
        assert!(Asked::parse(&json!({"publish": {"count": 1}})).is_err());
        let error = Asked::parse(&json!({"hello": 1})).unwrap_err();
        assert!(error.contains("not a benchmark"), "{error}");
        assert!(matches!(
            Asked::parse(&json!({"bench": {"op": "get", "ops": 5}})),
            Ok(Asked::Bench(_))
        ));
    }

    #[test]
    fn latencies_are_read_from_the_stamp_and_reported_once() {
        assert_eq!(latency_us("7 1000000", 1_250_000), Some(250.0));
        assert_eq!(latency_us("hello", 1), None);
        let mut samples = Samples::default();
        samples.record(Some(12.34));
        samples.record(None);
        let report = samples.report();
        assert_eq!(report["count"], json!(1));
        assert_eq!(report["samples_us"], json!([12.3]));
        assert_eq!(report["unreadable"], json!(1));
        assert_eq!(samples.report()["count"], json!(0));
        for _ in 0..=MAX_SAMPLES {
            samples.record(Some(1.0));
        }
        let report = samples.report();
        assert_eq!(report["count"], json!(REPORT_MOST));
        assert_eq!(report["remaining"], json!(MAX_SAMPLES - REPORT_MOST));
        assert_eq!(report["dropped"], json!(1));
    }
}
