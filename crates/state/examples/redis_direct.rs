//! The benchmark's baseline: a program talking to Redis itself with the same client crate as
//! corral's Redis store, the way a worker would without corral. It makes `OPS` GETs or SETs on
//! keys `bench:0` to `bench:99`, `BATCH` at a time in one pipeline, on one multiplexed
//! connection, and prints `{"op": ..., "ops": N, "secs": S, "ops_per_sec": R}`.
//!
//! `cargo run --release -p corral-state --example redis_direct -- redis://127.0.0.1:6379/0 get 100000 100`

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [url, op, ops, batch] = args.as_slice() else {
        eprintln!("usage: redis_direct <redis://host:port/db> <get|set> <ops> <batch>");
        std::process::exit(2);
    };
    let (Ok(ops), Ok(batch)) = (ops.parse::<usize>(), batch.parse::<usize>()) else {
        eprintln!("redis_direct: <ops> and <batch> are positive integers");
        std::process::exit(2);
    };
    if op != "get" && op != "set" {
        eprintln!("redis_direct: the op is get or set, not {op}");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let result = runtime.block_on(async {
        let client = redis::Client::open(url.as_str())?;
        let mut connection = client.get_multiplexed_async_connection().await?;
        let started = Instant::now();
        let mut done = 0;
        while done < ops {
            let n = batch.min(ops - done);
            let mut pipe = redis::pipe();
            for i in done..done + n {
                let key = format!("bench:{}", i % 100);
                if op == "get" {
                    pipe.get(key);
                } else {
                    pipe.set(key, "value").ignore();
                }
            }
            let _: Vec<Option<String>> = pipe.query_async(&mut connection).await?;
            done += n;
        }
        Ok::<_, redis::RedisError>(started.elapsed().as_secs_f64())
    });
    match result {
        Ok(secs) => println!(
            "{{\"op\": \"{op}\", \"ops\": {ops}, \"secs\": {secs}, \"ops_per_sec\": {}}}",
            ops as f64 / secs
        ),
        Err(e) => {
            eprintln!("redis_direct: {url}: {e}");
            std::process::exit(1);
        }
    }
}
