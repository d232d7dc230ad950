#!/usr/bin/env python3
"""Shared-state benchmark: key/value operations per second from corral workers, through the
master to the embedded store and to Redis, against a program talking to Redis directly with the
same client crate (`crates/state/examples/redis_direct.rs`).

Each worker is `crates/worker/examples/state.rs` in `bench` mode: asked with
`corral send <id> '{"bench": {...}}' --reply`, it makes OPS gets or sets, BATCH at a time in one
`call_many` (pipelined), and answers with its rate. With N workers the N runs go at once and
their rates are summed; the direct client runs as N processes at once the same way.

Prints a Markdown table (ratios against the direct client). Python 3 standard library only;
needs redis-server (`apt-get install -y redis-server`) and cargo (unless --no-build). Every
process it starts is ended at exit (corral kill, then SIGKILL to each process group it started).
Exit status: 0 when every measurement ran, 1 when something broke, 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
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
DEADLINE = 120.0  # seconds any one step may take

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=300_000, help="operations per worker run")
    parser.add_argument("--batch", type=int, default=200, help="calls per pipelined batch")
    parser.add_argument("--workers", type=int, default=4, help="N for the N-worker rows")
    parser.add_argument("--runs", type=int, default=3, help="runs per cell (median)")
    parser.add_argument("--no-build", action="store_true", help="use target/release as it is")
    args = parser.parse_args()
    if min(args.ops, args.batch, args.workers, args.runs) < 1:
        parser.error("every number must be at least 1")
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "corral", "-p",
                        "corral-worker", "--features", "corral-worker/tokio", "--example", "state",
                        "-p", "corral-state", "--example", "redis_direct"],
                       cwd=REPO, check=True)
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-state-"))
    home = tmp / "home"
    try:
        _, port = start_redis(tmp)
        url = f"redis://127.0.0.1:{port}/0"
        rows = []
        for op in ("get", "set"):
            for n in (1, args.workers):
                direct = statistics.median(
                    [direct_rates(url, n, op, args.ops, args.batch) for _ in range(args.runs)])
                embedded = measure_corral(home, "memory", n, op, args.ops, args.batch, args.runs)
                redis = measure_corral(home, url, n, op, args.ops, args.batch, args.runs)
                rows.append((op, n, embedded, redis, direct))
        print(f"corral shared state, {args.ops:,} ops per worker run in pipelined batches of "
              f"{args.batch}, median of {args.runs}; {os.cpu_count()} cores\n")
        print("| op | workers | embedded ops/s | through corral to Redis ops/s | "
              "direct Redis client ops/s | Redis path × direct |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for op, n, embedded, redis, direct in rows:
            print(f"| {op} | {n} | {fmt(embedded)} | {fmt(redis)} | {fmt(direct)} | "
                  f"{redis / direct:.2f}× |")
        get_one = next(r for r in rows if r[0] == "get" and r[1] == 1)
        worst = min(r[3] / r[4] for r in rows)
        print("\nTargets:")
        print(f"- embedded get ≥ 100k ops/s pipelined from one worker: {fmt(get_one[2])}: "
              f"**{'met' if get_one[2] >= 100_000 else 'missed'}**")
        print(f"- the Redis path ≥ 0.8× a direct client: worst {worst:.2f}×: "
              f"**{'met' if worst >= 0.8 else 'missed'}**")
        return 0
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
