#!/usr/bin/env python3
"""Shared-state benchmark: key/value ops/s and pub/sub fan-out latency through corral vs Redis.

Key/value operations per second from corral workers, and pub/sub fan-out latency to 8
subscribers, through the master to the embedded store and to Redis, against programs talking to
Redis directly with the same client crate (`crates/state/examples/redis_direct.rs` and
`redis_fanout.rs`).

Each worker is `crates/worker/examples/state.rs` in `bench` mode. Key/value (`kv`): asked with
`corral send <id> '{"bench": {...}}' --reply`, it makes OPS gets or sets, BATCH at a time in one
`call_many` (pipelined), and answers with its rate. With N workers the N runs go at once and
their rates are summed; the direct client runs as N processes at once the same way.

Fan-out (`fanout`): 9 workers; 8 are asked to `listen` on `lat.*` (each answers once its
subscription is confirmed), the 9th to `publish` COUNT messages on `lat.x`, each stamped with the
time it was sent and awaited, GAP µs apart; then the 8 are asked to `report` the latency of every
message they got (stamp to arrival, one clock) until each has all COUNT. All samples together
give p50, p99 and max. The direct baseline opens 8 pub/sub connections (`PSUBSCRIBE lat.*`) and
one publishing connection in one process, with the same stamps and pacing.

Prints a Markdown table per part (ratios against the direct client); `--only kv|fanout` runs one
part. Python 3 standard library only; needs redis-server (`apt-get install -y redis-server`) and
cargo (unless --no-build). Every process it starts is ended at exit (corral kill, then SIGKILL to
each process group it started). Exit status: 0 when every measurement ran, 1 when something
broke (a subscriber that missed a message included), 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "target" / "release"
CORRAL = TARGET / "corral"
WORKER = TARGET / "examples" / "state"
DIRECT = TARGET / "examples" / "redis_direct"
DIRECT_FANOUT = TARGET / "examples" / "redis_fanout"
DEADLINE = 120.0  # seconds any one step may take
SUBSCRIBERS = 8  # fan-out: listening workers (and direct subscriber connections)
REPORT_DEADLINE = 30.0  # seconds the listeners may take to report every message once published
FANOUT_WARM_UP = 100  # messages published and thrown away before each fan-out measurement

started_groups: list[int] = []


class Broken(Exception):
    """A step failed; the message says which and why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], env: dict[str, str], timeout: float = DEADLINE) -> str:
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise Broken(f"{' '.join(args[:4])}...: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    child = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    started_groups.append(child.pid)
    return child


def wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Broken(f"gave up waiting for {what}")
        time.sleep(0.05)


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    if shutil.which("redis-server") is None:
        raise Broken("redis-server is not installed: apt-get install -y redis-server")
    port = free_port()
    child = spawn(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(tmp)], dict(os.environ))

    def answers():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_for("redis-server to answer", answers)
    return child, port


def corral_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["CORRAL_HOME"] = str(home)
    return env


def summed_rates(commands: list[list[str]], env: dict[str, str]) -> float:
    """Runs `commands` at once, each printing JSON with `ops_per_sec`; the sum of those rates."""
    children = [spawn(command, env) for command in commands]
    total = 0.0
    for command, child in zip(commands, children):
        out, err = child.communicate(timeout=DEADLINE)
        if child.returncode != 0:
            raise Broken(f"{Path(command[0]).name}: {err.strip()}")
        total += json.loads(out)["ops_per_sec"]
    return total


def worker_rates(env: dict[str, str], ids: list[int], op: str, ops: int, batch: int) -> float:
    """Runs the benchmark in every worker at once; the sum of their rates."""
    message = json.dumps({"bench": {"op": op, "ops": ops, "batch": batch}})
    return summed_rates([[str(CORRAL), "send", str(i), message, "--reply", "--timeout", "120s"]
                         for i in ids], env)


def direct_rates(url: str, n: int, op: str, ops: int, batch: int) -> float:
    """Runs the direct client as `n` processes at once; the sum of their rates."""
    return summed_rates([[str(DIRECT), url, op, str(ops), str(batch)]] * n, dict(os.environ))


def measure_corral(home: Path, state: str, workers: int, op: str, ops: int, batch: int,
                   runs: int) -> float:
    env = corral_env(home)
    run([str(CORRAL), "start", str(WORKER), "-n", "bench", "-i", str(workers), "-e",
         "STATE_MODE=bench", "--state", state], env)

    def ready():
        listed = json.loads(run([str(CORRAL), "ls", "--json"], env))
        online = [i["id"] for i in listed if i["status"] == "online"]
        return online if len(online) == workers else None

    ids = wait_for("the workers to be online", ready)
    worker_rates(env, ids, op, ops // 10, batch)  # warm-up
    rate = statistics.median(worker_rates(env, ids, op, ops, batch) for _ in range(runs))
    run([str(CORRAL), "delete", "bench"], env)
    return rate


def fmt(rate: float) -> str:
    return f"{rate:,.0f}"


def kv_section(args, url: str, home: Path) -> list[str]:
    """The key/value part: its report, as lines."""
    rows = []
    for op in ("get", "set"):
        for n in (1, args.workers):
            direct = statistics.median(
                [direct_rates(url, n, op, args.ops, args.batch) for _ in range(args.runs)])
            embedded = measure_corral(home, "memory", n, op, args.ops, args.batch, args.runs)
            redis = measure_corral(home, url, n, op, args.ops, args.batch, args.runs)
            rows.append((op, n, embedded, redis, direct))
    lines = [f"corral shared state, {args.ops:,} ops per worker run in pipelined batches of "
             f"{args.batch}, median of {args.runs}; {os.cpu_count()} cores", "",
             "| op | workers | embedded ops/s | through corral to Redis ops/s | "
             "direct Redis client ops/s | Redis path × direct |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for op, n, embedded, redis, direct in rows:
        lines.append(f"| {op} | {n} | {fmt(embedded)} | {fmt(redis)} | {fmt(direct)} | "
                     f"{redis / direct:.2f}× |")
    get_one = next(r for r in rows if r[0] == "get" and r[1] == 1)
    worst = min(r[3] / r[4] for r in rows)
    lines += ["", "Targets:",
              f"- embedded get ≥ 100k ops/s pipelined from one worker: {fmt(get_one[2])}: "
              f"**{'met' if get_one[2] >= 100_000 else 'missed'}**",
              f"- the Redis path ≥ 0.8× a direct client: worst {worst:.2f}×: "
              f"**{'met' if worst >= 0.8 else 'missed'}**"]
    return lines


def percentile(sorted_values: list[float], q: float) -> float:
    """The `q` quantile of `sorted_values`, nearest rank (as redis_fanout computes it)."""
    rank = min(max(1, math.ceil(q * len(sorted_values))), len(sorted_values))
    return sorted_values[rank - 1]


def ask(env: dict[str, str], worker: int, request: dict, timeout: float = 30.0) -> dict:
    """`corral send <worker> <request> --reply`; the worker's answer."""
    out = run([str(CORRAL), "send", str(worker), json.dumps(request), "--reply", "--timeout",
               f"{int(timeout * 1000)}ms"], env, timeout=timeout + 10)
    try:
        answer = json.loads(out)
    except ValueError:
        raise Broken(f"worker {worker} answered {out.strip()[:200]!r} to {request}, "
                     "not JSON") from None
    if not isinstance(answer, dict):
        raise Broken(f"worker {worker} answered {answer!r} to {request}")
    return answer


def publish_and_collect(env: dict[str, str], publisher: int, listeners: list[int], count: int,
                        gap_us: int) -> tuple[list[float], int, float, dict[int, str]]:
    """Has `publisher` publish `count` stamped messages, then asks every listener for its
    latencies until it has all `count`: (every sample, the last publish's count of receivers,
    the seconds publishing took, what went wrong per listener that did not get them all)."""
    # tokio's timer works in milliseconds: a gap takes at least about one.
    publish_secs = count * (gap_us + 2000) / 1e6 + 30
    if publish_secs > 590:
        raise Broken(f"publishing {count} messages {gap_us} µs apart would take longer than "
                     "corral send --reply waits (600 s): lower --fanout-count or --fanout-gap-us")
    published = ask(env, publisher, {"publish": {"channel": "lat.x", "count": count,
                                                 "gap_us": gap_us}}, timeout=publish_secs)
    if published.get("published") != count:
        raise Broken(f"worker {publisher} was asked to publish {count} messages and answered "
                     f"{published}")
    receivers = published.get("receivers", 0)
    secs = published.get("secs", 0.0)
    samples: list[float] = []
    missed: dict[int, str] = {}
    deadline = time.monotonic() + REPORT_DEADLINE
    for worker in listeners:
        got, dropped, unreadable = [], 0, 0
        while True:
            report = ask(env, worker, {"report": {}})
            got += report.get("samples_us", [])
            dropped += report.get("dropped", 0)
            unreadable += report.get("unreadable", 0)
            if report.get("remaining", 0) > 0:
                continue
            if len(got) + dropped + unreadable >= count or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if len(got) != count or dropped or unreadable:
            missed[worker] = (f"worker {worker} reported {len(got)} of the {count} messages "
                              f"({dropped} beyond its samples, {unreadable} without a stamp)")
        samples += got
    return samples, receivers, secs, missed


def measure_fanout(home: Path, state: str, count: int, gap_us: int) -> dict:
    """Fan-out through corral with `state` as the store."""
    env = corral_env(home)
    workers = SUBSCRIBERS + 1
    run([str(CORRAL), "start", str(WORKER), "-n", "fanout", "-i", str(workers), "-e",
         "STATE_MODE=bench", "--state", state], env)

    def ready():
        listed = json.loads(run([str(CORRAL), "ls", "--json"], env))
        online = sorted(i["id"] for i in listed if i.get("app") == "fanout"
                        and i["status"] == "online")
        return online if len(online) == workers else None

    ids = wait_for("the fan-out workers to be online", ready)
    listeners, publisher = ids[:SUBSCRIBERS], ids[SUBSCRIBERS]
    for worker in listeners:
        answer = ask(env, worker, {"listen": {"pattern": "lat.*"}})
        if answer.get("listening") != "lat.*":
            raise Broken(f"worker {worker} was asked to listen on lat.* and answered {answer}")
    warm_up = min(count, FANOUT_WARM_UP)
    _, _, _, missed = publish_and_collect(env, publisher, listeners, warm_up, gap_us)
    if missed:
        raise Broken(f"--state {state}, warm-up: " + "; ".join(missed.values()))
    samples, receivers, secs, missed = publish_and_collect(env, publisher, listeners, count,
                                                           gap_us)
    run([str(CORRAL), "delete", "fanout"], env)
    samples.sort()
    if not samples:
        raise Broken(f"--state {state}: no listener got a message")
    return {"p50": percentile(samples, 0.50), "p99": percentile(samples, 0.99),
            "max": samples[-1], "receivers": receivers, "secs": secs,
            "missed": list(missed.values())}


def measure_direct_fanout(url: str, count: int, gap_us: int) -> dict:
    """The direct baseline: one redis_fanout process."""
    env = dict(os.environ)
    timeout = count * (gap_us + 2000) / 1e6 + 60
    run([str(DIRECT_FANOUT), url, str(SUBSCRIBERS), str(min(count, FANOUT_WARM_UP)),
         str(gap_us)], env, timeout=timeout)
    out = run([str(DIRECT_FANOUT), url, str(SUBSCRIBERS), str(count), str(gap_us)], env,
              timeout=timeout)
    try:
        line = json.loads(out)
        return {"p50": line["p50_us"], "p99": line["p99_us"], "max": line["max_us"],
                "receivers": line["receivers"], "secs": line["secs"], "missed": []}
    except (ValueError, KeyError, TypeError):
        raise Broken(f"{DIRECT_FANOUT.name} printed {out.strip()[:200]!r}, "
                     "not its JSON line") from None


def fanout_section(args, url: str, home: Path) -> tuple[list[str], bool]:
    """The fan-out part: its report, as lines, and whether every subscriber got every
    message."""
    count, gap = args.fanout_count, args.fanout_gap_us
    direct = measure_direct_fanout(url, count, gap)
    rows = [("corral, embedded store", measure_fanout(home, "memory", count, gap)),
            ("corral, Redis store", measure_fanout(home, url, count, gap)),
            ("direct Redis client", direct)]
    lines = [f"corral pub/sub fan-out: {count:,} messages published one at a time on lat.x, "
             f"{gap} µs apart (tokio sleep, so at least about 1 ms), each to {SUBSCRIBERS} "
             f"subscribers of lat.*; latency from the publisher's stamp to a subscriber's "
             f"arrival, all subscribers' samples together; {os.cpu_count()} cores", "",
             "| path | subscribers | messages | p50 µs | p99 µs | max µs | p50 × direct Redis |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path, r in rows:
        lines.append(f"| {path} | {SUBSCRIBERS} | {count:,} | {r['p50']:,.1f} | "
                     f"{r['p99']:,.1f} | {r['max']:,.1f} | {r['p50'] / direct['p50']:.2f}× |")
    lines += ["", "Time per publish, the gap included: " +
              ", ".join(f"{path} {r['secs'] / count * 1e6:,.0f} µs" for path, r in rows) + ".",
              "What the last publish returned (the store counts one per subscribed pattern, and "
              "corral's daemon subscribes once for all its workers): " +
              ", ".join(f"{path} {r['receivers']}" for path, r in rows) + "."]
    missed = [m for _, r in rows for m in r["missed"]]
    if missed:
        lines += ["", "**Missed messages:**"] + [f"- {m}" for m in missed]
    return lines, not missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=300_000, help="operations per worker run")
    parser.add_argument("--batch", type=int, default=200, help="calls per pipelined batch")
    parser.add_argument("--workers", type=int, default=4, help="N for the N-worker rows")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--fanout-count", type=int, default=2000,
                        help="fan-out: messages published per run")
    parser.add_argument("--fanout-gap-us", type=int, default=200,
                        help="fan-out: microseconds between two publishes (0: none)")
    parser.add_argument("--only", choices=("fanout", "kv"),
                        help="run only the pub/sub fan-out or only the key/value part")
    parser.add_argument("--no-build", action="store_true", help="use target/release as it is")
    args = parser.parse_args()
    if min(args.ops, args.batch, args.workers, args.runs, args.fanout_count) < 1:
        parser.error("every number must be at least 1")
    if not 0 <= args.fanout_gap_us <= 1_000_000:
        parser.error("--fanout-gap-us must be from 0 to 1000000")
    if not args.no_build:
        built = subprocess.run(
            # --bin corral: with --example given, cargo builds only the targets named.
            ["cargo", "build", "--release", "--locked", "-p", "corral", "--bin", "corral",
             "-p", "corral-worker",
             "--features", "corral-worker/tokio", "--example", "state", "-p", "corral-state",
             "--example", "redis_direct", "--example", "redis_fanout"], cwd=REPO)
        if built.returncode != 0:
            print("bench/state.py: cargo build failed (see above)", file=sys.stderr)
            return 1
    for binary in (CORRAL, WORKER, DIRECT, DIRECT_FANOUT):
        if not binary.exists():
            print(f"bench/state.py: {binary} is missing: run without --no-build",
                  file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-state-"))
    home = tmp / "home"
    try:
        _, port = start_redis(tmp)
        url = f"redis://127.0.0.1:{port}/0"
        ok = True
        sections = []
        if args.only in (None, "kv"):
            sections.append(kv_section(args, url, home))
        if args.only in (None, "fanout"):
            lines, ok = fanout_section(args, url, home)
            sections.append(lines)
        print("\n\n".join("\n".join(lines) for lines in sections))
        if not ok:
            print("bench/state.py: a subscriber missed messages (see above)", file=sys.stderr)
        return 0 if ok else 1
    except (Broken, subprocess.SubprocessError, ValueError, KeyError) as e:
        print(f"bench/state.py: {e}", file=sys.stderr)
        return 1
    finally:
        if home.exists():
            subprocess.run([str(CORRAL), "kill"], env=corral_env(home), capture_output=True,
                           timeout=DEADLINE)
        for group in started_groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
