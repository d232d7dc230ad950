#!/usr/bin/env python3
"""Cluster benchmark: the same Rust hello worker behind each corral `--lb` mode, next to the
workers alone (two with SO_REUSEPORT, and one), on loopback with wrk.

Measures requests/s with a new connection per request and with keep-alive, failed requests
during 10 consecutive `corral reload`s under load, and the master's CPU time per 100k
connections, then prints a Markdown table with the project's targets. See bench/README.md.
Python 3 standard library only (and bench/benchlib.py); needs wrk (`apt-get install -y wrk`)
and cargo.

Exit status: 0 when every measurement ran (whether or not a target is met, and even when
requests failed: those are in the table), 1 when something broke (a build failed, a daemon
would not start, a worker never answered, wrk printed nothing usable), 2 on bad options.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchlib.py, wherever the script is run from

from benchlib import (CHILDREN, REPO, SETTLE_TIMEOUT, Broken, CorralHome,  # noqa: E402
                      OtherCpu, Wrk, add_output_options, add_wrk_options, cargo_build,
                      check_replaced, clean_env, clean_up, cpu_ms, describe_errors,
                      exit_on_signals, find_wrk, fmt, free_port, http_get, load_average,
                      machine_info, machine_line, others_line, per_100k, publish, read_text,
                      rounds, rps_cell, rps_summary, run, say, say_daemon_logs, times, verdict,
                      wait_answers, wait_drained, wait_workers, warm_up, wrk_defaults)

RELOADS = 10  # consecutive `corral reload`s under load
RELOAD_LEAD = 0.5  # seconds wrk runs before the first reload
WORKERS = 2

CORRAL_MODES = ("rr", "least-conn", "shared", "proxy")
REUSEPORT = "reuseport"
SINGLE = "single"

# In the environment of every process this run starts (and so of the daemons' workers): what
# tells them from the rest of the machine when counting the CPU time other programs take.
MARK = f"CLUSTER_BENCH_RUN={os.getpid()}"
OTHERS = OtherCpu(MARK)


def bench_env() -> dict:
    """The environment without anything that would make hello think it runs under corral (or
    point corral at someone else's home), with this run's mark."""
    return clean_env(prefixes=("CORRAL_", "LISTEN_", "NOTIFY_SOCKET", "NODE_APP_INSTANCE",
                               "HELLO_", "CLUSTER_BENCH_RUN"), names=("PORT",), mark=MARK)


# ---------------------------------------------------------------- network


HELLO_BODY = re.compile(rb"^hello from (?:worker \d+|standalone) \(pid (\d+)\)\n$")
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def hello_pid(port: int) -> int | None:
    """GET / on 127.0.0.1:port with a new connection: the pid hello says it has, else None."""
    answer = http_get(port, 0.5, GET_CLOSE)
    if answer is None or not answer[0].startswith(b"HTTP/1.1 200"):
        return None
    m = HELLO_BODY.match(answer[1])
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------- the setups


class Setup:
    """One way of serving hello on a port."""

    key = ""
    label = ""
    daemon_pid: int | None = None
    port = 0

    def start(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError


class CorralSetup(Setup, CorralHome):
    """`corral start hello -i 2 --listen 127.0.0.1:0 --lb <mode>` in a home of its own."""

    def __init__(self, mode: str, corral: Path, hello: Path, home: Path) -> None:
        super().__init__(corral, home, bench_env(), cwd=REPO)
        self.mode = mode
        self.key = mode
        self.label = f"corral `--lb {mode}`"
        self.hello = hello

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        pong = self.cli("ping").stdout
        m = re.search(r"\bpid (\d+)", pong)
        if not m:
            raise Broken(f"{self.label}: `corral ping` printed no pid: {pong.strip()!r}")
        self.daemon_pid = int(m.group(1))
        self.cli("start", str(self.hello), "-n", "hello", "-i", str(WORKERS),
                 "--listen", "127.0.0.1:0", "--lb", self.mode)
        rows = self.instances()
        listen = (rows[0].get("listen") or [None])[0] if rows else None
        m = re.fullmatch(r"127\.0\.0\.1:(\d+)", listen or "")
        if not m or int(m.group(1)) == 0:
            raise Broken(f"{self.label}: no resolved address in `corral ls --json`: {rows}")
        self.port = int(m.group(1))
        described = self.cli("describe", "hello").stdout
        if f"listens on 127.0.0.1:{self.port}" not in described:
            say(f"{self.label}: `corral describe hello` does not say `listens on "
                f"127.0.0.1:{self.port}`")
        self.wait_online()
        wait_answers(hello_pid, self.port, self.label)

    def workers(self) -> set[int]:
        return {r["pid"] for r in self.instances() if r.get("status") == "online" and r.get("pid")}

    def wait_online(self, not_pids: set[int] = frozenset()) -> set[int]:
        """Waits until WORKERS instances are online, none of them in `not_pids`."""
        return wait_workers(self.label, self.workers, WORKERS, not_pids)

    def wait_settled(self) -> tuple[float, int]:
        """Waits until only the daemon and WORKERS workers are left (the old ones drained).
        Returns the seconds it took and the number of processes left."""
        return wait_drained(self.processes, WORKERS + 1)

    def worker_logs(self) -> str:
        try:
            done = self.cli("logs", "hello", "--lines", "50", check=False, timeout=15)
            return (done.stdout + done.stderr).rstrip()
        except Broken as e:
            return str(e)

    def shutdown(self) -> None:
        """`corral kill`, then SIGKILL for whatever is left; never raises."""
        self.stop(self.daemon_pid)


class StandaloneSetup(Setup):
    """hello run directly: `count` processes on one port (with SO_REUSEPORT when more than one)."""

    def __init__(self, key: str, label: str, hello: Path, count: int) -> None:
        self.key = key
        self.label = label
        self.hello = hello
        self.count = count
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        self.port = free_port()
        env = bench_env()
        env["HELLO_ADDR"] = f"127.0.0.1:{self.port}"
        if self.count > 1:
            env["HELLO_REUSEPORT"] = "1"
        for _ in range(self.count):
            self.procs.append(CHILDREN.popen([str(self.hello)], env=env,
                                             stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL))
        want = {p.pid for p in self.procs}
        for proc in self.procs:
            if proc.poll() is not None:
                raise Broken(f"{self.label}: hello exited with status {proc.returncode}")
        seen = wait_answers(hello_pid, self.port, self.label, want)
        if not seen <= want:
            raise Broken(f"{self.label}: pids {sorted(seen - want)} answered on port "
                         f"{self.port}, not ours")

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.poll() is not None:
                raise Broken(f"{self.label}: hello pid {proc.pid} exited with status "
                             f"{proc.returncode}")

    def shutdown(self) -> None:
        for proc in self.procs:
            CHILDREN.end(proc)
        self.procs.clear()


# ---------------------------------------------------------------- measurements


def throughput_round(setup: Setup, wrk: Wrk, seconds: int, close: bool) -> dict:
    """One wrk run; for a corral setup, also the daemon's CPU time over it; and the CPU time
    other programs on the machine took meanwhile."""
    others = OTHERS.snapshot()
    t0 = time.monotonic()
    before = cpu_ms(setup.daemon_pid) if setup.daemon_pid else None
    r = wrk.run(setup.port, seconds, close)
    if setup.daemon_pid:
        r["master_cpu_ms"] = cpu_ms(setup.daemon_pid) - before
    r["others_cpu_pct"] = OTHERS.percent(others, OTHERS.snapshot(), time.monotonic() - t0)
    if isinstance(setup, StandaloneSetup):
        setup.check_alive()
    return r


def reload_under_load(setup: CorralSetup, wrk: Wrk, seconds: int, close: bool) -> dict:
    """wrk for `seconds`; after RELOAD_LEAD s, RELOADS `corral reload hello` one after another."""
    before = setup.wait_online()
    t0 = time.monotonic()
    proc = wrk.start(setup.port, seconds, close)
    time.sleep(RELOAD_LEAD)
    reloads = []
    for _ in range(RELOADS):
        r0 = time.monotonic()
        try:
            done = setup.cli("reload", "hello", check=False)
            reloads.append({"status": done.returncode, "seconds": time.monotonic() - r0,
                            "stderr": done.stderr.strip()})
        except Broken as e:  # the reload hung: keep going so that it shows in the table
            reloads.append({"status": None, "seconds": time.monotonic() - r0,
                            "stderr": str(e)})
    reloads_done = time.monotonic() - t0
    r = wrk.finish(proc, seconds)
    r["reloads"] = reloads
    r["reloads_done_at"] = reloads_done
    r["reloads_failed"] = sum(1 for x in reloads if x["status"] != 0)
    # The reloads must end while wrk still runs, with time left for the last drain.
    r["covered"] = reloads_done <= seconds - 0.5
    check_replaced(setup, before, r)
    return r


def measure(setups: list[Setup], wrk: Wrk, cfg: argparse.Namespace) -> dict:
    res: dict = {s.key: {"close": [], "keepalive": []} for s in setups}
    warm_up(setups, wrk, cfg.warmup)
    for n, s, close, kind in rounds(setups, cfg.runs):
        r = throughput_round(s, wrk, cfg.duration, close)
        res[s.key][kind].append(r)
        extra = ""
        if "master_cpu_ms" in r:
            extra = f", master CPU {r['master_cpu_ms']:.0f} ms"
        say(f"round {n + 1}/{cfg.runs} {s.label} {kind}: {r['rps']:,.0f} req/s, "
            f"{r['requests']:,} requests, errors: {describe_errors(r)}{extra}; "
            f"other programs {r['others_cpu_pct']:.0f}% CPU")
    for s in setups:
        if not isinstance(s, CorralSetup):
            continue
        for close, kind in ((True, "close"), (False, "keepalive")):
            say(f"{s.label}: {RELOADS} reloads under {kind} load ({cfg.reload_duration}s of wrk)")
            r = reload_under_load(s, wrk, cfg.reload_duration, close)
            res[s.key][f"reload_{kind}"] = r
            times_ms = ", ".join(f"{x['seconds'] * 1000:.0f}" for x in r["reloads"])
            say(f"  {r['requests']:,} requests, failed {r['failed']:,} "
                f"({describe_errors(r)}); reload times (ms): {times_ms}; "
                f"{r['reloads_failed']} reload(s) failed; old workers gone after "
                f"{r['settle_s']:.1f}s more ({r['left']} processes left)")
    return res


def summarize(setups: list[Setup], res: dict) -> dict:
    out = {}
    for s in setups:
        d = res[s.key]
        row = {}
        for kind in ("close", "keepalive"):
            runs = d[kind]
            row[kind] = rps_summary(runs)
            if isinstance(s, CorralSetup):
                row[kind]["master_ms_per_100k"] = per_100k(
                    sum(r["master_cpu_ms"] for r in runs), sum(r["requests"] for r in runs))
        out[s.key] = row
    return out


# ---------------------------------------------------------------- report


def report(cfg, setups: list[Setup], res: dict, machine: dict, wrk: Wrk,
           problems: list[str]) -> str:
    summ = summarize(setups, res)
    base = summ[REUSEPORT]

    def reload_cell(key: str) -> tuple[str, str]:
        d = res[key]
        parts, served = [], []
        for kind in ("close", "keepalive"):
            r = d.get(f"reload_{kind}")
            if r is None:
                parts.append("n/a")
                served.append("n/a")
                continue
            text = f"{r['failed']:,}"
            if r["reloads_failed"]:
                text += f" ({r['reloads_failed']} reload(s) failed)"
            if not r["covered"]:
                text += " (reloads outlasted wrk)"
            parts.append(text)
            served.append(f"{r['requests']:,}")
        return " / ".join(parts), " / ".join(served)

    rows = []
    for s in setups:
        row = summ[s.key]
        if isinstance(s, CorralSetup):
            failed, served = reload_cell(s.key)
            cpu = fmt(row["close"]["master_ms_per_100k"])
        else:
            failed = served = cpu = "—"
        rows.append(f"| {s.label} | {rps_cell(row['close'], cfg.runs)} | "
                    f"{times(row['close']['median'], base['close']['median'])} | "
                    f"{rps_cell(row['keepalive'], cfg.runs)} | "
                    f"{times(row['keepalive']['median'], base['keepalive']['median'])} | "
                    f"{failed} | {served} | {cpu} |")

    rr = summ.get("rr")
    targets = []
    if rr:
        for kind, what, want in (("close", "new connections", 0.8),
                                 ("keepalive", "keep-alive", 0.95)):
            got = rr[kind]["median"] / base[kind]["median"] if base[kind]["median"] else 0.0
            targets.append(f"- rr ≥ {want}× SO_REUSEPORT on {what}: {got:.2f}× "
                           f"({fmt(rr[kind]['median'])} vs {fmt(base[kind]['median'])} req/s): "
                           f"{verdict(got >= want and rr[kind]['failed'] == 0)}"
                           + (" (the rr runs had failed requests)" if rr[kind]["failed"] else ""))
    for s in setups:
        if not isinstance(s, CorralSetup):
            continue
        rc, rk = res[s.key]["reload_close"], res[s.key]["reload_keepalive"]
        ok = (rc["failed"] == 0 and rk["failed"] == 0 and rc["reloads_failed"] == 0
              and rk["reloads_failed"] == 0 and rc["covered"] and rk["covered"])
        name = "" if s.key == "rr" else " (not a target: for comparison)"
        targets.append(f"- {s.key}: zero failed requests across {RELOADS} reloads, keep-alive "
                       f"included{name}: {rc['failed']:,} / {rk['failed']:,}: {verdict(ok)}")

    lines = [
        f"## corral cluster benchmark ({'quick' if cfg.quick else 'full'} run)",
        "",
        f"- Date: {machine['date']}",
        machine_line(machine),
        others_line(res, setups),
        f"- {machine['corral']}, {machine['wrk']}; worker: `{machine['hello']}` "
        f"(axum, one thread), {WORKERS} workers",
        wrk.describe(cfg.duration, cfg.runs, cfg.warmup)
        + f"; reloads: {RELOADS} consecutive `corral reload hello` starting {RELOAD_LEAD}s into "
        f"a {cfg.reload_duration}s wrk run",
        "",
        "| setup | new conns req/s | × SO_REUSEPORT | keep-alive req/s | × SO_REUSEPORT | "
        f"failed in {RELOADS} reloads (close / keep-alive) | served during the reloads "
        "(close / keep-alive) | master CPU ms per 100k conns |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Failed = wrk's connect + read + write + timeout socket errors + non-2xx responses. "
        "Master CPU = the daemon's utime + stime over the new-connection runs ÷ requests served "
        "× 100k.",
        "",
        "Targets:",
        *targets,
    ]
    if problems:
        lines += ["", "Problems seen:", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def collect_problems(setups: list[Setup], res: dict, summ: dict) -> list[str]:
    """Everything a reader should know went wrong, with the daemon's and workers' logs."""
    problems = []
    for s in setups:
        for kind in ("close", "keepalive"):
            for e in summ[s.key][kind]["errors"]:
                problems.append(f"{s.label}, {kind} throughput run: {e}")
        if not isinstance(s, CorralSetup):
            continue
        bad = False
        for kind in ("close", "keepalive"):
            r = res[s.key].get(f"reload_{kind}")
            if r is None:
                continue
            if r["failed"]:
                bad = True
                problems.append(f"{s.label}, reloads under {kind} load: {r['failed']:,} failed "
                                f"({describe_errors(r)}) of {r['requests']:,}")
            for n, x in enumerate(r["reloads"], 1):
                if x["status"] != 0:
                    bad = True
                    problems.append(f"{s.label}, {kind}: reload {n} exited with "
                                    f"{x['status']}: {x['stderr']}")
            if not r["covered"]:
                problems.append(f"{s.label}, {kind}: the reloads ended {r['reloads_done_at']:.1f}s "
                                f"after wrk's start, too close to its end")
            if r["after_error"]:
                bad = True
                problems.append(f"{s.label}, {kind}: after the reloads: {r['after_error']}")
            elif not r["replaced"]:
                bad = True
                problems.append(f"{s.label}, {kind}: a worker from before the reloads still runs")
            if r["left"] > WORKERS + 1:
                bad = True
                problems.append(f"{s.label}, {kind}: {r['left']} processes left "
                                f"{SETTLE_TIMEOUT:.0f}s after the reloads (old workers not gone)")
        restarts = sum(row.get("restarts", 0) or 0 for row in res[s.key].get("final_ls", []))
        if restarts:
            bad = True
            problems.append(f"{s.label}: workers restarted {restarts} time(s) (crashes)")
        if not res[s.key].get("daemon_alive", True):
            bad = True
            problems.append(f"{s.label}: the daemon (pid {s.daemon_pid}) is gone")
        unexpected = res[s.key].get("unexpected_log", [])
        if unexpected:
            bad = True
            shown = unexpected[:20]
            problems.append(f"{s.label}: daemon.log has {len(unexpected)} unexpected line(s):\n"
                            + "\n".join(f"    {line}" for line in shown))
        if bad and res[s.key].get("worker_logs"):
            logs = res[s.key]["worker_logs"].splitlines()[-40:]
            problems.append(f"{s.label}: last lines of `corral logs hello --lines 50`:\n"
                            + "\n".join(f"    {line}" for line in logs))
    return problems


# ---------------------------------------------------------------- setup of the run


def build() -> tuple[Path, Path]:
    """target/release/corral and target/release/examples/hello, from cargo build."""
    args = ["build", "--release", "-p", "corral", "-p", "corral-worker", "--features",
            "corral-worker/tokio", "--bins", "--examples"]
    say(f"building: cargo {' '.join(args)}")
    found = cargo_build(args, {"corral": "bin", "hello": "example"},
                        "install Rust, or pass --no-build with built binaries")
    return found["corral"], found["hello"]


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark corral's --lb modes against the workers alone, with wrk.")
    ap.add_argument("--quick", action="store_true",
                    help="one 2 s run per cell and shorter reload runs (about a minute)")
    add_wrk_options(ap)
    ap.add_argument("--no-build", action="store_true",
                    help="use target/release/corral and target/release/examples/hello as built")
    ap.add_argument("--corral", type=Path, help="corral binary (implies no build of it)")
    ap.add_argument("--hello", type=Path, help="hello example binary")
    add_output_options(ap)
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary CORRAL_HOME directories (daemon and worker logs)")
    cfg = ap.parse_args(argv)
    wrk_defaults(ap, cfg)
    cfg.reload_duration = 3 if cfg.quick else 4
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    exit_on_signals()
    wrk_bin = find_wrk()
    if not wrk_bin:
        return 1
    work = Path(tempfile.mkdtemp(prefix="corral-cluster-bench-"))
    setups: list[Setup] = []
    try:
        if cfg.no_build or (cfg.corral and cfg.hello):
            corral_bin = cfg.corral or REPO / "target/release/corral"
            hello_bin = cfg.hello or REPO / "target/release/examples/hello"
        else:
            built_corral, built_hello = build()
            corral_bin, hello_bin = cfg.corral or built_corral, cfg.hello or built_hello
        corral_bin, hello_bin = corral_bin.resolve(), hello_bin.resolve()
        for path in (corral_bin, hello_bin):
            if not path.is_file():
                raise Broken(f"no binary at {path}")
        wrk = Wrk(wrk_bin, 1, cfg.connections, cfg.wrk_timeout, bench_env())
        machine = {
            **machine_info(),
            "tw_reuse": read_text("/proc/sys/net/ipv4/tcp_tw_reuse"),
            "corral": run([str(corral_bin), "--version"], bench_env(), cwd=REPO).stdout.strip(),
            "wrk": wrk.version(),
            "hello": os.path.relpath(hello_bin, REPO),
        }
        say(f"machine: {machine}")

        setups = [CorralSetup(mode, corral_bin, hello_bin, work / f"home-{mode}")
                  for mode in CORRAL_MODES]
        setups.append(StandaloneSetup(REUSEPORT, f"{WORKERS} workers alone, SO_REUSEPORT",
                                      hello_bin, WORKERS))
        setups.append(StandaloneSetup(SINGLE, "1 worker alone", hello_bin, 1))
        for s in setups:
            s.start()
            extra = f", daemon pid {s.daemon_pid}" if s.daemon_pid else ""
            say(f"{s.label}: serving on 127.0.0.1:{s.port}{extra}")

        res = measure(setups, wrk, cfg)

        for s in setups:
            if isinstance(s, CorralSetup):
                d = res[s.key]
                d["daemon_alive"] = s.daemon_pid in s.processes()
                d["final_ls"] = s.instances() if d["daemon_alive"] else []
                d["unexpected_log"] = s.unexpected_log()
                d["worker_logs"] = s.worker_logs() if d["daemon_alive"] else ""
        machine["load_end"] = load_average()
        problems = collect_problems(setups, res, summarize(setups, res))
        publish(report(cfg, setups, res, machine, wrk, problems), cfg.output, cfg.json,
                {"machine": machine, "results": res})
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Broken as e:
        say(f"error: {e}")
        say_daemon_logs(setups)
        return 1
    finally:
        if setups or CHILDREN.procs:
            say("cleaning up: corral kill, and SIGKILL to every process group started here")
        clean_up(setups, work, cfg.keep_temp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
