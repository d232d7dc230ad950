#!/usr/bin/env python3
"""Node.js cluster benchmark: the same Node hello app, 2 workers, behind three cluster primaries:
corral (`corral start hello.js -i 2`), Node's own cluster module (apps/node_primary.js) and PM2's
cluster mode (`pm2 start hello.js -i 2`), loaded with wrk on loopback.

Measures requests/s with a new connection per request and with keep-alive, the primary's CPU
time per 100k connections, and failed requests during 10 consecutive rolling reloads under
load, then prints a Markdown table with the project's targets. See bench/README.md.
Python 3 standard library only (and bench/benchlib.py); needs node, wrk
(`apt-get install -y wrk`), cargo (unless `--corral`/`--no-build`) and npm (to install PM2
locally the first time, unless `--pm2`).

Exit status: 0 when every measurement ran (whether or not a target is met, and even when
requests failed: those are in the table), 1 when something broke (a build failed, a primary
would not start, a worker never answered, wrk printed nothing usable), 2 on bad options.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchlib.py, wherever the script is run from

from benchlib import (ANSWER_TIMEOUT, CHILDREN, EXPECTED_LOG, REPO, SETTLE_TIMEOUT,  # noqa: E402
                      Broken, CorralHome, DaemonHome, OtherCpu, Wrk, add_output_options,
                      add_pm2_options, add_wrk_options, alive, bounded, build_corral,
                      check_replaced, clean_env, clean_up, cpu_ms, describe_errors,
                      exit_on_signals, find_wrk, fmt, free_port, hello_js_pid, install_pm2,
                      load_average, machine_info, machine_line, node_version, others_line,
                      per_100k, pm2_jlist, pm2_version, proc_stat, publish, read_text, rounds,
                      rps_cell, rps_summary, run, say, say_daemon_logs, times, verdict,
                      wait_answers, wait_drained, wait_workers, warm_up, wrk_defaults)

APPS = HERE / "apps"
HELLO = APPS / "hello.js"
NODE_PRIMARY = APPS / "node_primary.js"

RELOAD_TIMEOUT = 30.0  # seconds one rolling reload may take
RELOADS = 10  # consecutive rolling reloads under load
RELOAD_LEAD = 0.5  # seconds wrk runs before the first reload
RELOAD_TAIL = 1.0  # seconds wrk runs after the last reload returned
RELOAD_WRK_MAX = 240  # wrk's -d for the reload runs (it gets SIGINT once the reloads are done)
RELOAD_BUDGET = 200.0  # no reload is started this many seconds after the reload run began
WORKERS = 2

CORRAL, NODE, PM2 = "corral", "node", "pm2"
# With --shared: the workers accept on the one listening socket themselves (Node's SCHED_NONE).
CORRAL_SHARED, NODE_NONE = "corral-shared", "node-none"


# ---------------------------------------------------------------- processes


def cpu_ms_or_none(pid: int) -> float | None:
    try:
        return cpu_ms(pid)
    except Broken:
        return None


def children_cpu_ms() -> float:
    """utime + stime of this script's reaped children (in the throughput runs: wrk), ms."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * 1000.0


def cpu_times() -> tuple[int, int]:
    """(idle + iowait, total) ticks of the whole machine, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])  # up to steal; guest time is in user


def children_of(parent: int) -> list[int]:
    """Live processes whose parent is `parent`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = proc_stat(int(name))
        if fields is not None and fields[0] != "Z" and fields[1] == str(parent):
            found.append(int(name))
    return found


# In the environment of every process this run starts (and so of the primaries' workers): what
# tells them from the rest of the machine when counting the CPU time other programs take.
MARK = f"NODE_CLUSTER_BENCH_RUN={os.getpid()}"
OTHERS = OtherCpu(MARK)


def bench_env() -> dict:
    """The environment without anything that would make node think it is a cluster worker or
    runs under a process manager (or point corral or PM2 at someone else's home), with this
    run's mark."""
    return clean_env(prefixes=("CORRAL_", "PM2_", "LISTEN_", "NOTIFY_SOCKET", "NODE_APP_INSTANCE",
                               "NODE_UNIQUE_ID", "NODE_CHANNEL_", "NODE_CLUSTER_SCHED_POLICY",
                               "NODE_CLUSTER_BENCH_RUN"), names=("PORT", "WORKERS"), mark=MARK)


# ---------------------------------------------------------------- the three primaries


class Setup:
    """One cluster primary serving hello.js with WORKERS workers on one port."""

    key = ""
    label = ""
    primary_pid: int | None = None
    port = 0

    def start(self) -> None:
        raise NotImplementedError

    def workers(self) -> set[int]:
        """The pids of the workers currently serving (online), draining ones excluded."""
        raise NotImplementedError

    def worker_processes(self) -> list[int]:
        """Every live worker process, draining ones included."""
        raise NotImplementedError

    def reload(self) -> dict:
        """One rolling reload, returned once it is done: {status (0 when it went well, None
        when it hung), seconds, detail}."""
        raise NotImplementedError

    def crashes(self) -> int | None:
        """Workers that died unasked since the start (None when the primary cannot say)."""
        return None

    def diagnostics(self, broken: bool, failed: bool) -> list[str]:
        """What a reader should see about this setup (logs): `broken` when a reload or a worker
        went wrong, `failed` when requests failed."""
        return []

    def shutdown(self) -> None:
        raise NotImplementedError

    def wait_online(self, not_pids: set[int] = frozenset()) -> set[int]:
        """Waits until WORKERS workers are online, none of them in `not_pids`."""
        return wait_workers(self.label, self.workers, WORKERS, not_pids)

    def wait_settled(self) -> tuple[float, int]:
        """Waits until only WORKERS worker processes are left (the old ones drained). Returns
        the seconds it took and the number of worker processes left."""
        return wait_drained(self.worker_processes, WORKERS)

    def check_alive(self) -> None:
        if self.primary_pid is None or not alive(self.primary_pid):
            raise Broken(f"{self.label}: the primary (pid {self.primary_pid}) is gone")


def read_pid_file(path: Path, label: str) -> int:
    for _ in bounded(10, 0.05):
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            pass
    raise Broken(f"{label}: no pid in {path}")


class DaemonSetup(Setup):
    """A primary that is a process manager's daemon (corral, PM2) with a home of its own (a
    benchlib.DaemonHome): its workers are the home's other processes, `<cli> reload hello` is a
    rolling reload, and `<cli> kill` ends it."""

    pid_file = ""  # the daemon's pid file in its home

    def start_daemon(self) -> None:
        """Starts the daemon (`ping`) and picks the app's port."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.cli("ping")
        self.primary_pid = read_pid_file(self.home / self.pid_file, self.label)
        self.port = free_port()

    def worker_processes(self) -> list[int]:
        return [p for p in self.processes() if p != self.primary_pid]

    def reload(self) -> dict:
        t0 = time.monotonic()
        try:
            done = self.cli("reload", "hello", check=False, timeout=RELOAD_TIMEOUT)
            return {"status": done.returncode, "seconds": time.monotonic() - t0,
                    "detail": (done.stderr or "").strip()[-500:]}
        except Broken as e:  # it hung: keep going, so that it shows in the table
            return {"status": None, "seconds": time.monotonic() - t0, "detail": str(e)}

    def shutdown(self) -> None:
        """`<cli> kill`, then SIGKILL for whatever is left; never raises."""
        self.stop(self.primary_pid)


class CorralSetup(DaemonSetup, CorralHome):
    """`corral start hello.js -i 2 --name hello --env PORT=<port>` in a home of its own: corral
    is the cluster primary of the unmodified app."""

    key = CORRAL
    label = "corral"
    pid_file = "daemon.pid"

    def __init__(self, corral: Path, home: Path, shared: bool = False) -> None:
        super().__init__(corral, home, bench_env())
        self.shared = shared
        if shared:
            self.key, self.label = CORRAL_SHARED, "corral --lb shared"

    def start(self) -> None:
        self.start_daemon()
        self.cli("start", str(HELLO), "--name", "hello", "-i", str(WORKERS),
                 "--env", f"PORT={self.port}", *(["--lb", "shared"] if self.shared else []))
        wait_answers(hello_js_pid, self.port, self.label, self.wait_online())

    def workers(self) -> set[int]:
        return {r["pid"] for r in self.instances() if r.get("status") == "online" and r.get("pid")}

    def crashes(self) -> int | None:
        return sum(r.get("restarts", 0) or 0 for r in self.instances())

    def diagnostics(self, broken: bool, failed: bool) -> list[str]:
        out = []
        unexpected = self.unexpected_log()
        if unexpected:
            out.append(f"{self.label}: daemon.log has {len(unexpected)} unexpected line(s):\n"
                       + "\n".join(f"    {line}" for line in unexpected[:30]))
        elif broken or failed:
            log = self.daemon_log()
            started = sum(1 for line in log if EXPECTED_LOG[0].search(line))
            drained = sum(1 for line in log if EXPECTED_LOG[1].search(line))
            out.append(f"{self.label}: daemon.log has only the expected lines: {started} "
                       f"reload(s) started, {drained} old worker(s) drained and exited with "
                       f"code 0")
        if broken or failed:
            try:
                done = self.cli("logs", "hello", "--err", "--lines", "20", check=False,
                                timeout=15)
                logs = (done.stdout + done.stderr).rstrip() or "(nothing)"
            except Broken as e:
                logs = str(e)
            out.append(f"{self.label}: the workers' stderr, `corral logs hello --err --lines "
                       f"20`:\n" + "\n".join(f"    {line}" for line in logs.splitlines()[-40:]))
        return out


class NodeSetup(Setup):
    """`node apps/node_primary.js apps/hello.js`: Node's own cluster module as the primary,
    default scheduling (round robin on Linux). SIGUSR2 asks it for a rolling reload, and it says
    `reloaded <n> <pids>` on stdout once that is done."""

    key = NODE
    label = "Node's primary"

    def __init__(self, work: Path, sched_none: bool = False) -> None:
        self.sched_none = sched_none
        if sched_none:
            self.key, self.label = NODE_NONE, "Node's primary, SCHED_NONE"
        self.err_path = work / f"{self.key}-primary.err"
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.current: set[int] = set()
        self.reloads = 0
        self.died: list[str] = []

    def start(self) -> None:
        self.port = free_port()
        env = bench_env()
        env["PORT"] = str(self.port)
        env["WORKERS"] = str(WORKERS)
        if self.sched_none:
            env["NODE_CLUSTER_SCHED_POLICY"] = "none"
        with open(self.err_path, "wb") as err:
            self.proc = CHILDREN.popen(["node", str(NODE_PRIMARY), str(HELLO)], env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=err, cwd=str(HERE))
        self.primary_pid = self.proc.pid
        line = self.wait_line("ready", ANSWER_TIMEOUT)
        if line is None:
            raise Broken(f"{self.label}: no `ready` line within {ANSWER_TIMEOUT:.0f}s; "
                         f"stderr: {self.stderr_tail()}")
        wait_answers(hello_js_pid, self.port, self.label, self.current)

    def stderr_tail(self) -> str:
        try:
            return self.err_path.read_text(errors="replace").strip()[-2000:] or "(empty)"
        except OSError:
            return "(none)"

    def wait_line(self, prefix: str, seconds: float) -> str | None:
        """Reads the primary's stdout (the workers' lines included) until a line that starts
        with `prefix`, for at most `seconds`; keeps track of the pids and deaths it announces."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + seconds
        polled = False
        for _ in range(100_000):
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode(errors="replace")
                words = line.split()
                if words and words[0] in ("ready", "reloaded"):
                    self.current = {int(w) for w in words[1 + (words[0] == "reloaded"):]}
                elif words and words[0] == "died":
                    self.died.append(line)
                if line.startswith(prefix):
                    return line
            left = end - time.monotonic()
            if left <= 0 and polled:
                return None
            polled = True
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise Broken(f"{self.label}: the primary closed its stdout (exit status "
                                 f"{self.proc.poll()}); stderr: {self.stderr_tail()}")
                self.buf += chunk
        return None

    def workers(self) -> set[int]:
        self.wait_line("\0", 0)  # takes in what the primary said meanwhile
        return {p for p in self.current if alive(p)}

    def worker_processes(self) -> list[int]:
        return children_of(self.primary_pid) if self.primary_pid else []

    def reload(self) -> dict:
        t0 = time.monotonic()
        self.reloads += 1
        os.kill(self.primary_pid, signal.SIGUSR2)
        line = self.wait_line(f"reloaded {self.reloads} ", RELOAD_TIMEOUT)
        if line is None:
            return {"status": None, "seconds": time.monotonic() - t0,
                    "detail": f"no `reloaded {self.reloads}` line within {RELOAD_TIMEOUT:.0f}s"}
        return {"status": 0, "seconds": time.monotonic() - t0, "detail": ""}

    def crashes(self) -> int | None:
        self.wait_line("\0", 0)
        return len(self.died)

    def diagnostics(self, broken: bool, failed: bool) -> list[str]:
        out = []
        if self.died:
            out.append(f"{self.label}: " + "; ".join(self.died[:10]))
        if broken or failed:
            out.append(f"{self.label}: stderr: {self.stderr_tail()}")
        return out

    def shutdown(self) -> None:
        if self.proc is not None:
            CHILDREN.end(self.proc)  # SIGKILL to its process group: the workers are in it
            self.proc = None


class Pm2Setup(DaemonSetup, DaemonHome):
    """`pm2 start hello.js -i 2 --name hello` (cluster mode: PM2's God daemon is the primary,
    through Node's cluster module) in a PM2_HOME of its own; PORT comes from the CLI's
    environment, which PM2 hands to the app."""

    key = PM2
    label = "PM2"
    home_var = "PM2_HOME"
    pid_file = "pm2.pid"

    def __init__(self, pm2: Path, home: Path) -> None:
        super().__init__(pm2, home, bench_env())

    def instances(self) -> list[dict]:
        return [r for r in pm2_jlist(self.cli("jlist").stdout, self.label)
                if r.get("name") == "hello"]

    def start(self) -> None:
        self.start_daemon()
        self.env["PORT"] = str(self.port)
        self.cli("start", str(HELLO), "--name", "hello", "-i", str(WORKERS))
        wait_answers(hello_js_pid, self.port, self.label, self.wait_online())

    def workers(self) -> set[int]:
        return {r["pid"] for r in self.instances()
                if (r.get("pm2_env") or {}).get("status") == "online" and r.get("pid")}

    def diagnostics(self, broken: bool, failed: bool) -> list[str]:
        if not broken:  # its log has 6 lines per worker replaced: only when something broke
            return []
        try:
            lines = (self.home / "pm2.log").read_text(errors="replace").splitlines()[-30:]
        except OSError:
            lines = ["(no pm2.log)"]
        return [f"{self.label}: last lines of pm2.log:\n"
                + "\n".join(f"    {line}" for line in lines)]


# ---------------------------------------------------------------- measurements


def throughput_round(setup: Setup, wrk: Wrk, seconds: int, close: bool) -> dict:
    """One wrk run; the CPU time the primary, the workers and wrk took over it; and the CPU
    time other programs on the machine took meanwhile."""
    workers = {p: cpu_ms_or_none(p) for p in setup.worker_processes()}
    others = OTHERS.snapshot()
    t0 = time.monotonic()
    before = cpu_ms(setup.primary_pid, "primary")
    wrk0 = children_cpu_ms()
    idle0, total0 = cpu_times()
    r = wrk.run(setup.port, seconds, close)
    idle1, total1 = cpu_times()
    r["idle_pct"] = (idle1 - idle0) / max(total1 - total0, 1) * 100.0
    r["wrk_cpu_ms"] = children_cpu_ms() - wrk0
    r["primary_cpu_ms"] = cpu_ms(setup.primary_pid, "primary") - before
    after = {p: cpu_ms_or_none(p) for p in workers}
    r["workers_cpu_ms"] = sum(after[p] - workers[p] for p in workers
                              if workers[p] is not None and after[p] is not None)
    r["others_cpu_pct"] = OTHERS.percent(others, OTHERS.snapshot(), time.monotonic() - t0)
    return r


def reload_under_load(setup: Setup, wrk: Wrk, close: bool) -> dict:
    """wrk runs; after RELOAD_LEAD s, RELOADS rolling reloads one after another, each waited
    for; RELOAD_TAIL s after the last, wrk gets SIGINT and reports."""
    before = setup.wait_online()
    t0 = time.monotonic()
    cpu0 = cpu_ms(setup.primary_pid, "primary")
    proc = wrk.start(setup.port, RELOAD_WRK_MAX, close)
    time.sleep(RELOAD_LEAD)
    reloads = []
    for _ in range(RELOADS):
        if time.monotonic() - t0 > RELOAD_BUDGET or proc.poll() is not None:
            break
        reloads.append(setup.reload())
    reloads_s = sum(x["seconds"] for x in reloads)
    time.sleep(RELOAD_TAIL)
    covered = proc.poll() is None  # wrk ran from before the first reload to after the last
    r = wrk.stop(proc)
    r["primary_cpu_ms"] = cpu_ms(setup.primary_pid, "primary") - cpu0
    r["wall_s"] = time.monotonic() - t0
    r["reloads"] = reloads
    r["reloads_s"] = reloads_s
    r["reloads_failed"] = sum(1 for x in reloads if x["status"] != 0) + RELOADS - len(reloads)
    r["covered"] = covered
    check_replaced(setup, before, r)
    return r


def measure(setups: list[Setup], wrk: Wrk, cfg: argparse.Namespace) -> dict:
    res: dict = {s.key: {"close": [], "keepalive": []} for s in setups}
    warm_up(setups, wrk, cfg.warmup)
    for n, s, close, kind in rounds(setups, cfg.runs):
        r = throughput_round(s, wrk, cfg.duration, close)
        res[s.key][kind].append(r)
        s.check_alive()
        say(f"round {n + 1}/{cfg.runs} {s.label} {kind}: {r['rps']:,.0f} req/s, "
            f"{r['requests']:,} requests, errors: {describe_errors(r)}, primary CPU "
            f"{r['primary_cpu_ms']:.0f} ms; other programs {r['others_cpu_pct']:.0f}% CPU")
    for s in setups:
        for close, kind in ((True, "close"), (False, "keepalive")):
            say(f"{s.label}: {RELOADS} reloads under {kind} load")
            r = reload_under_load(s, wrk, close)
            res[s.key][f"reload_{kind}"] = r
            s.check_alive()
            times_ms = ", ".join(f"{x['seconds'] * 1000:.0f}" for x in r["reloads"])
            say(f"  {r['requests']:,} requests in {r['seconds']:.1f}s, failed {r['failed']:,} "
                f"({describe_errors(r)}); reload times (ms): {times_ms}; "
                f"{r['reloads_failed']} reload(s) failed; old workers gone after "
                f"{r['settle_s']:.1f}s more ({r['left']} worker processes left)")
    return res


def summarize(setups: list[Setup], res: dict) -> dict:
    out = {}
    for s in setups:
        d = res[s.key]
        row = {}
        for kind in ("close", "keepalive"):
            runs = d[kind]
            served = sum(r["requests"] for r in runs)
            row[kind] = {
                **rps_summary(runs),
                **{f"{who}_ms_per_100k": per_100k(sum(r[f"{who}_cpu_ms"] for r in runs), served)
                   for who in ("primary", "workers", "wrk")},
                "idle_pct": statistics.mean(r["idle_pct"] for r in runs),
            }
        out[s.key] = row
    return out


# ---------------------------------------------------------------- report


def report(cfg, setups: list[Setup], res: dict, machine: dict, wrk: Wrk,
           problems: list[str]) -> str:
    summ = summarize(setups, res)
    base = summ[NODE]

    def reload_cells(key: str) -> tuple[str, str, str]:
        failed, served, took = [], [], []
        for kind in ("close", "keepalive"):
            r = res[key][f"reload_{kind}"]
            text = f"{r['failed']:,}"
            if r["reloads_failed"]:
                text += f" ({r['reloads_failed']} reload(s) failed)"
            if not r["covered"]:
                text += " (wrk ended before the reloads)"
            failed.append(text)
            served.append(f"{r['requests']:,}")
            took.append(f"{r['reloads_s']:.1f}")
        return " / ".join(failed), " / ".join(served), " / ".join(took)

    rows = []
    for s in setups:
        row = summ[s.key]
        failed, served, took = reload_cells(s.key)
        rows.append(f"| {s.label} | {rps_cell(row['close'], cfg.runs)} | "
                    f"{times(row['close']['median'], base['close']['median'])} | "
                    f"{rps_cell(row['keepalive'], cfg.runs)} | "
                    f"{times(row['keepalive']['median'], base['keepalive']['median'])} | "
                    f"{fmt(row['close']['primary_ms_per_100k'])} | {failed} | {served} | "
                    f"{took} |")

    c, n = summ[CORRAL], summ[NODE]
    got = c["close"]["median"] / n["close"]["median"] if n["close"]["median"] else 0.0
    c_cpu, n_cpu = c["close"]["primary_ms_per_100k"], n["close"]["primary_ms_per_100k"]
    ck, pk = res[CORRAL]["reload_keepalive"], res[PM2]["reload_keepalive"]
    ck_ok = ck["reloads_failed"] == 0 and ck["covered"]
    targets = [
        f"- corral ≥ 1.3× Node's primary on new connections: {got:.2f}× "
        f"({fmt(c['close']['median'])} vs {fmt(n['close']['median'])} req/s): "
        f"{verdict(got >= 1.3 and c['close']['failed'] == 0)}"
        + (" (the corral runs had failed requests)" if c["close"]["failed"] else ""),
        f"- with less primary CPU than Node's primary: {fmt(c_cpu)} vs {fmt(n_cpu)} ms per 100k "
        f"connections: {verdict(c_cpu is not None and n_cpu is not None and c_cpu < n_cpu)}",
        f"- fewer failed requests than PM2 across {RELOADS} reloads under keep-alive load, "
        f"aiming at zero: {ck['failed']:,} vs {pk['failed']:,}: "
        f"{verdict(ck_ok and (ck['failed'] < pk['failed'] or ck['failed'] == 0))}"
        f"; zero: {verdict(ck_ok and ck['failed'] == 0)}"
        + ("" if ck_ok else " (corral's reloads did not all succeed)"),
    ]

    lines = [
        f"## Node.js cluster benchmark ({'quick' if cfg.quick else 'full'} run)",
        "",
        f"- Date: {machine['date']}",
        machine_line(machine),
        others_line(res, setups),
        f"- node {machine['node']}, PM2 {machine['pm2']}, {machine['corral']}, "
        f"{machine['wrk']}; app: `bench/apps/hello.js` (unchanged), {WORKERS} workers in every "
        f"setup; Node's primary: `bench/apps/node_primary.js` (cluster module, default "
        f"scheduling: round robin)",
        wrk.describe(cfg.duration, cfg.runs, cfg.warmup)
        + f", setups interleaved in rounds; reloads: {RELOADS} consecutive rolling reloads "
        f"(`corral reload hello`, SIGUSR2 to Node's primary, `pm2 reload hello`), each waited "
        f"for, under wrk started "
        f"{RELOAD_LEAD}s before the first and stopped {RELOAD_TAIL}s after the last",
        "",
        "| setup | new conns req/s | × Node primary | keep-alive req/s | × Node primary | "
        f"primary CPU ms per 100k conns | failed in {RELOADS} reloads (close / keep-alive) | "
        f"served during the reloads (close / keep-alive) | {RELOADS} reloads took, s "
        "(close / keep-alive) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "Failed = wrk's connect + read + write + timeout socket errors + non-2xx responses. "
        "Primary = corral's daemon, the node_primary.js process, PM2's God daemon; its CPU = "
        "utime + stime over the new-connection runs ÷ requests served × 100k.",
        "",
        "CPU per new connection in µs, primary + both workers + wrk = all, and the rate "
        f"at which that would keep the {machine['nproc']} cores busy (nproc × 10⁶ ÷ all): "
        + "; ".join(cpu_split(s.label, summ[s.key]["close"], machine["nproc"]) for s in setups)
        + ".",
        "",
        "Targets:",
        *targets,
    ]
    if problems:
        lines += ["", "Problems seen:", *[f"- {p}" for p in problems]]
    return "\n".join(lines) + "\n"


def cpu_split(label: str, cell: dict, nproc: int) -> str:
    parts = [cell[f"{who}_ms_per_100k"] for who in ("primary", "workers", "wrk")]
    if any(p is None for p in parts):
        return f"{label} n/a"
    us = [p / 100 for p in parts]  # ms per 100k connections -> µs per connection
    total = sum(us)
    return (f"{label} {' + '.join(fmt(u) for u in us)} = {fmt(total)} µs "
            f"({fmt(nproc * 1e6 / total) if total else 'n/a'}/s; the cores were idle "
            f"{cell['idle_pct']:.0f}% of the time)")


def collect_problems(setups: list[Setup], res: dict, summ: dict) -> list[str]:
    """Everything a reader should know went wrong, with the primaries' logs."""
    problems = []
    for s in setups:
        broken = failed = False
        for kind in ("close", "keepalive"):
            for e in summ[s.key][kind]["errors"]:
                failed = True
                problems.append(f"{s.label}, {kind} throughput run: {e}")
        for kind in ("close", "keepalive"):
            r = res[s.key][f"reload_{kind}"]
            if r["failed"]:
                failed = True
                problems.append(f"{s.label}, reloads under {kind} load: {r['failed']:,} failed "
                                f"({describe_errors(r)}) of {r['requests']:,}")
            for n, x in enumerate(r["reloads"], 1):
                if x["status"] != 0:
                    broken = True
                    how = "hung" if x["status"] is None else f"exited with {x['status']}"
                    problems.append(f"{s.label}, {kind}: reload {n} {how}: {x['detail']}")
            if len(r["reloads"]) < RELOADS:
                broken = True
                problems.append(f"{s.label}, {kind}: only {len(r['reloads'])} of {RELOADS} "
                                f"reloads ran within {RELOAD_BUDGET:.0f}s")
            if not r["covered"]:
                problems.append(f"{s.label}, {kind}: wrk ended before the reloads did")
            if r["after_error"]:
                broken = True
                problems.append(f"{s.label}, {kind}: after the reloads: {r['after_error']}")
            elif not r["replaced"]:
                broken = True
                problems.append(f"{s.label}, {kind}: a worker from before the reloads still runs")
            if r["left"] > WORKERS:
                broken = True
                problems.append(f"{s.label}, {kind}: {r['left']} worker processes left "
                                f"{SETTLE_TIMEOUT:.0f}s after the reloads (old workers not gone)")
        crashes = res[s.key].get("crashes")
        if crashes:
            broken = True
            problems.append(f"{s.label}: workers died unasked {crashes} time(s)")
        problems += s.diagnostics(broken, failed)
    return problems


# ---------------------------------------------------------------- getting the programs


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark corral as a Node.js cluster primary against Node's own primary "
                    "and PM2's cluster mode, with wrk.")
    ap.add_argument("--quick", action="store_true",
                    help="one 2 s run per cell (about a minute)")
    add_wrk_options(ap)
    ap.add_argument("--no-build", action="store_true",
                    help="use target/release/corral as it is")
    ap.add_argument("--corral", type=Path, help="corral binary (implies no build)")
    ap.add_argument("--shared", action="store_true",
                    help="also measure the workers accepting on the shared socket themselves: "
                         "corral --lb shared and Node's primary with SCHED_NONE")
    add_pm2_options(ap)
    add_output_options(ap)
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary CORRAL_HOME and PM2_HOME (logs included)")
    cfg = ap.parse_args(argv)
    wrk_defaults(ap, cfg)
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    exit_on_signals()
    wrk_bin = find_wrk()
    if not wrk_bin:
        return 1
    if not shutil.which("node"):
        say("node not found")
        return 1
    work = Path(tempfile.mkdtemp(prefix="corral-node-cluster-bench-"))
    setups: list[Setup] = []
    try:
        if cfg.corral:
            corral_bin = cfg.corral
        elif cfg.no_build:
            corral_bin = REPO / "target/release/corral"
        else:
            corral_bin = build_corral("install Rust, or pass --corral PATH / --no-build")
        corral_bin = corral_bin.resolve()
        if not corral_bin.is_file():
            raise Broken(f"no corral binary at {corral_bin}")
        pm2_bin = cfg.pm2.resolve() if cfg.pm2 else install_pm2(cfg.deps.resolve(), cfg.pm2_spec)
        wrk = Wrk(wrk_bin, 1, cfg.connections, cfg.wrk_timeout, bench_env())
        machine = {
            **machine_info(),
            "tw_reuse": read_text("/proc/sys/net/ipv4/tcp_tw_reuse"),
            "node": node_version(bench_env()),
            "pm2": pm2_version(pm2_bin),
            "corral": run([str(corral_bin), "--version"], bench_env()).stdout.strip(),
            "wrk": wrk.version(),
        }
        say(f"machine: {machine}")

        setups = [CorralSetup(corral_bin, work / "corral-home"), NodeSetup(work),
                  Pm2Setup(pm2_bin, work / "pm2-home")]
        if cfg.shared:
            setups += [CorralSetup(corral_bin, work / "corral-shared-home", shared=True),
                       NodeSetup(work, sched_none=True)]
        # All three run at once (idle when not measured), so that the runs can go round.
        for s in setups:
            s.start()
            say(f"{s.label}: serving on 127.0.0.1:{s.port}, primary pid {s.primary_pid}, "
                f"workers {sorted(s.workers())}")

        res = measure(setups, wrk, cfg)

        for s in setups:
            res[s.key]["crashes"] = s.crashes()
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
            say("cleaning up: corral kill, pm2 kill, and SIGKILL to every process group started "
                "here")
        clean_up(setups, work, cfg.keep_temp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
