//! The fan-out benchmark's baseline: programs talking to Redis themselves with the same client
//! crate as corral's Redis store, the way workers would without corral. It opens `SUBSCRIBERS`
//! pub/sub connections, each `PSUBSCRIBE lat.*`, and one command connection, publishes `COUNT`
//! messages on `lat.x`, each stamped `<seq> <ns since the UNIX epoch>` and awaited, then waits
//! `GAP_US` microseconds (`tokio::time::sleep`, as the corral worker paces them) before the next.
//! Each subscriber records the time from a message's stamp to its arrival; it prints
//! `{"subscribers": S, "count": N, "receivers": R, "secs": T, "p50_us": .., "p99_us": ..,
//! "max_us": ..}` (R: what the last `PUBLISH` returned; T: how long publishing took), or fails
//! when a subscriber missed a message.
//!
//! `cargo run --release -p corral-state --example redis_fanout -- redis://127.0.0.1:6379/0 8 2000 200`

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt as _;
use tokio::time::timeout;

/// How long connecting, subscribing or one `PUBLISH` may take.
const CALL_WITHIN: Duration = Duration::from_secs(10);
/// How long a subscriber waits for its next message (on top of the gap) before giving up.
const QUIET_WITHIN: Duration = Duration::from_secs(10);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, subscribers, count, gap_us] = args.as_slice() else {
        eprintln!("usage: redis_fanout <redis://host:port/db> <subscribers> <count> <gap_us>");
        std::process::exit(2);
    };
    let (Ok(subscribers), Ok(count), Ok(gap_us)) = (
        subscribers.parse::<usize>(),
        count.parse::<usize>(),
        gap_us.parse::<u64>(),
    ) else {
        eprintln!(
            "redis_fanout: <subscribers> and <count> are positive integers, <gap_us> an integer"
        );
        std::process::exit(2);
    };
    if subscribers == 0 || count == 0 {
        eprintln!("redis_fanout: <subscribers> and <count> are positive integers");
        std::process::exit(2);
    }
    // Several threads, as the corral workers have (the `state` example's runtime).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let gap = Duration::from_micros(gap_us);
    match runtime.block_on(fan_out(url, subscribers, count, gap)) {
        Ok(summary) => println!("{summary}"),
        Err(e) => {
            eprintln!("redis_fanout: {url}: {e}");
            std::process::exit(1);
        }
    }
}

/// Runs the measurement; the JSON line to print.
async fn fan_out(
    url: &str,
    subscribers: usize,
    count: usize,
    gap: Duration,
) -> Result<String, String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut tasks = Vec::new();
    for n in 0..subscribers {
        let mut pubsub = within("connecting a subscriber", client.get_async_pubsub()).await?;
        within("PSUBSCRIBE lat.*", pubsub.psubscribe("lat.*")).await?;
        let mut messages = pubsub.into_on_message();
        let quiet = QUIET_WITHIN + gap;
        tasks.push((
            n,
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(count);
                let mut unreadable = 0usize;
                while latencies.len() + unreadable < count {
                    let Ok(Some(message)) = timeout(quiet, messages.next()).await else {
                        break;
                    };
                    let now = unix_nanos();
                    match std::str::from_utf8(message.get_payload_bytes())
                        .ok()
                        .and_then(|text| latency_us(text, now))
                    {
                        Some(latency) => latencies.push(latency),
                        None => unreadable += 1,
                    }
                }
                latencies
            }),
        ));
    }
    let mut connection = within(
        "connecting the publisher",
        client.get_multiplexed_async_connection(),
    )
    .await?;
    let mut receivers = 0u64;
    let started = Instant::now();
    for seq in 0..count {
        let message = format!("{seq} {}", unix_nanos());
        let mut publish = redis::cmd("PUBLISH");
        publish.arg("lat.x").arg(message);
        receivers = within("PUBLISH", publish.query_async(&mut connection)).await?;
        if !gap.is_zero() && seq + 1 < count {
            tokio::time::sleep(gap).await;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let mut all = Vec::with_capacity(subscribers * count);
    for (n, task) in tasks {
        let latencies = task
            .await
            .map_err(|e| format!("subscriber {n} failed: {e}"))?;
        if latencies.len() != count {
            return Err(format!(
                "subscriber {n} got {} of the {count} messages (or some without a stamp)",
                latencies.len()
            ));
        }
        all.extend(latencies);
    }
    all.sort_by(f64::total_cmp);
    Ok(format!(
        "{{\"subscribers\": {subscribers}, \"count\": {count}, \"receivers\": {receivers}, \
         \"secs\": {secs}, \"p50_us\": {}, \"p99_us\": {}, \"max_us\": {}}}",
        percentile(&all, 0.50),
        percentile(&all, 0.99),
        percentile(&all, 1.0),
    ))
}

/// `future`'s value, or an error naming `what` when it fails or takes over [`CALL_WITHIN`].
async fn within<T>(
    what: &str,
    future: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match timeout(CALL_WITHIN, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!("{what}: no answer within {CALL_WITHIN:?}")),
    }
}

/// Nanoseconds since the UNIX epoch, by the system clock.
fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as u64)
}

/// The latency of a message `<seq> <stamp>` arrived at `now` (ns since the UNIX epoch), in
/// microseconds; `None` when it carries no stamp.
fn latency_us(message: &str, now: u64) -> Option<f64> {
    let stamp: u64 = message.rsplit(' ').next()?.parse().ok()?;
    Some((i128::from(now) - i128::from(stamp)) as f64 / 1000.0)
}

/// The `q` quantile of `sorted` (nearest rank), to a tenth of a microsecond.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    (sorted[rank - 1] * 10.0).round() / 10.0
}
