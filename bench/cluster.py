#!/usr/bin/env python3
"""Cluster benchmark: the same Rust hello worker behind each corral `--lb` mode, next to the
workers alone (two with SO_REUSEPORT, and one), on loopback with wrk.

Measures requests/s with a new connection per request and with keep-alive, failed requests
during 10 consecutive `corral reload`s under load, and the master's CPU time per 100k
connections, then prints a Markdown table with the project's targets. See bench/README.md.
Python 3 standard library only; needs wrk (`apt-get install -y wrk`) and cargo.

Exit status: 0 when every measurement ran (whether or not a target is met, and even when
requests failed: those are in the table), 1 when something broke (a build failed, a daemon
would not start, a worker never answered, wrk printed nothing usable), 2 on bad options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CLI_TIMEOUT = 60.0  # seconds any single CLI call may take
ANSWER_TIMEOUT = 20.0  # seconds a setup may take to answer HTTP
SETTLE_TIMEOUT = 20.0  # seconds the old workers of a reload may take to drain and exit
RELOADS = 10  # consecutive `corral reload`s under load
RELOAD_LEAD = 0.5  # seconds wrk runs before the first reload
WORKERS = 2

CORRAL_MODES = ("rr", "least-conn", "shared", "proxy")
REUSEPORT = "reuseport"
SINGLE = "single"

# Daemon log lines a healthy run writes; every other line is reported.
EXPECTED_LOG = [re.compile(p) for p in (
    r"reloading app 'hello': \d+ instance\(s\), one at a time$",
    r"draining pid \d+ of instance \d+ exited with code 0$",
    r"app 'hello' listens on ",
    r"^corral daemon \S+ \(pid \d+\) listening on ",
    r"^starting app 'hello': \d+ instance\(s\) of ",
    r"^daemon exits$",
    r"stopping every app before exiting$",
)]


class Broken(Exception):
    """Something failed that makes the measurement meaningless."""


def say(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def bounded(seconds: float, step: float):
    """Yields until `seconds` have passed, at most seconds/step + 1000 times, sleeping `step`
    between iterations: every polling loop of this script goes through here."""
    end = time.monotonic() + seconds
    for _ in range(int(seconds / step) + 1000):
        if time.monotonic() > end:
            return
        yield
        time.sleep(step)


# ---------------------------------------------------------------- formatting


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def times(value: float | None, base: float | None) -> str:
    if not value or not base or value != value or base != base:
        return "n/a"
    return f"{value / base:.2f}×"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


# ---------------------------------------------------------------- processes


class Children:
    """Every process this script starts, each in a new session (so its own process group), so
    that all can be ended on the way out, whatever they started themselves."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(args, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def end(self, proc: subprocess.Popen) -> None:
        """SIGKILLs the process group of `proc` (its pgid is its pid) and reaps `proc`. Only while
        `proc` is unreaped (running or a zombie), so that its pid cannot be someone else's."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            say(f"pid {proc.pid} did not exit after SIGKILL")
        if proc in self.procs:
            self.procs.remove(proc)

    def forget(self, proc: subprocess.Popen) -> None:
        """`proc` exited and was reaped (none of the programs run here leaves a process in its
        group: the corral daemon makes a session of its own)."""
        if proc in self.procs:
            self.procs.remove(proc)

    def end_all(self) -> None:
        for proc in list(self.procs):
            self.end(proc)


CHILDREN = Children()


def run(args: list[str], env: dict, timeout: float = CLI_TIMEOUT,
        check: bool = True) -> subprocess.CompletedProcess:
    """Runs a command in its own process group; on timeout the group gets SIGKILL."""
    proc = CHILDREN.popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        CHILDREN.end(proc)
        raise Broken(f"`{' '.join(args)}` took more than {timeout:.0f}s") from e
    CHILDREN.forget(proc)
    done = subprocess.CompletedProcess(args, proc.returncode, out, err)
    if check and done.returncode != 0:
        raise Broken(f"`{' '.join(args)}` exited with status {done.returncode}: "
                     f"{(err or '').strip()[-2000:]}")
    return done


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command name), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def cpu_ms(pid: int) -> float:
    """utime + stime of a process (fields 14 and 15 of /proc/<pid>/stat), in milliseconds."""
    fields = proc_stat(pid)
    if fields is None:
        raise Broken(f"pid {pid} is gone (did the daemon die?)")
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15: index 0 is field 3
    return ticks * 1000.0 / os.sysconf("SC_CLK_TCK")


def pids_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds exactly `entry` (`CORRAL_HOME=<dir>`): a daemon
    and every worker it started, since workers inherit the daemon's environment."""
    needle = entry.encode()
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env and alive(int(name)):
            found.append(int(name))
    return found


# In the environment of every process this run starts (and so of the daemons' workers): what
# tells them from the rest of the machine when counting the CPU time other programs take.
MARK = f"CLUSTER_BENCH_RUN={os.getpid()}"


def clean_env() -> dict:
    """The environment without anything that would make hello think it runs under corral (or
    point corral at someone else's home), with this run's mark."""
    drop = ("CORRAL_", "LISTEN_", "NOTIFY_SOCKET", "NODE_APP_INSTANCE", "HELLO_",
            "CLUSTER_BENCH_RUN")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop) and k != "PORT"}
    env.setdefault("LANG", "C.UTF-8")
    name, _, value = MARK.partition("=")
    env[name] = value
    return env


class OtherCpu:
    """CPU time taken by processes this run did not start (anything else on the machine) over an
    interval: two scans of /proc, processes told apart by MARK in their environment. A process
    that both starts and ends within the interval is missed."""

    def __init__(self) -> None:
        self.ours: dict[tuple[int, str], bool] = {}  # (pid, start time) -> started by this run

    def snapshot(self) -> dict[tuple[int, str], int]:
        ticks = {}
        me = os.getpid()
        needle = MARK.encode()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            fields = proc_stat(int(name))
            if fields is None or len(fields) < 20:
                continue
            key = (int(name), fields[19])  # field 22: start time
            if key not in self.ours:
                try:
                    with open(f"/proc/{name}/environ", "rb") as f:
                        self.ours[key] = needle in f.read().split(b"\0")
                except OSError:
                    self.ours[key] = False  # kernel threads and vanished processes
            if not self.ours[key]:
                ticks[key] = int(fields[11]) + int(fields[12])
        return ticks

    @staticmethod
    def percent(before: dict, after: dict, seconds: float) -> float:
        """Percent of one core used by others between two snapshots `seconds` apart."""
        used = sum(t - before.get(k, 0) for k, t in after.items())
        return used / os.sysconf("SC_CLK_TCK") / max(seconds, 1e-3) * 100.0


OTHERS = OtherCpu()


# ---------------------------------------------------------------- network


def free_port() -> int:
    """A port the kernel says is free on 127.0.0.1 (bound to port 0, read back, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


HELLO_BODY = re.compile(rb"^hello from (?:worker \d+|standalone) \(pid (\d+)\)\n$")


def hello_pid(port: int, timeout: float = 0.5) -> int | None:
    """GET / on 127.0.0.1:port with a new connection: the pid hello says it has, else None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            data = b""
            while len(data) < 8192:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    m = HELLO_BODY.match(body)
    return int(m.group(1)) if m else None


def wait_answers(port: int, label: str, want_pids: set[int] | None = None) -> set[int]:
    """Polls until hello answers on `port`; with `want_pids`, until each of them has answered
    (new connections, so SO_REUSEPORT's hash spreads them). Returns the pids seen."""
    seen: set[int] = set()
    for _ in bounded(ANSWER_TIMEOUT, 0.005):
        pid = hello_pid(port)
        if pid is not None:
            seen.add(pid)
            if want_pids is None or want_pids <= seen:
                return seen
    if not seen:
        raise Broken(f"{label}: nothing answered on 127.0.0.1:{port} within "
                     f"{ANSWER_TIMEOUT:.0f}s")
    raise Broken(f"{label}: only pid(s) {sorted(seen)} answered on 127.0.0.1:{port}, "
                 f"expected {sorted(want_pids or ())}")


# ---------------------------------------------------------------- wrk

WRK_REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)\b")
WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
WRK_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


class Wrk:
    def __init__(self, binary: str, threads: int, connections: int, timeout: int) -> None:
        self.binary = binary
        self.threads = threads
        self.connections = connections
        self.timeout = timeout

    def argv(self, port: int, seconds: int, close: bool) -> list[str]:
        args = [self.binary, f"-t{self.threads}", f"-c{self.connections}", f"-d{seconds}s",
                f"--timeout={self.timeout}s"]
        if close:
            args += ["-H", "Connection: close"]
        return args + [f"http://127.0.0.1:{port}/"]

    def start(self, port: int, seconds: int, close: bool) -> subprocess.Popen:
        return CHILDREN.popen(self.argv(port, seconds, close), env=clean_env(),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def finish(self, proc: subprocess.Popen, seconds: int) -> dict:
        try:
            out, _ = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired as e:
            CHILDREN.end(proc)
            raise Broken(f"wrk did not finish {seconds + 30}s after its start") from e
        CHILDREN.forget(proc)
        return parse_wrk(out, proc.returncode)

    def run(self, port: int, seconds: int, close: bool) -> dict:
        return self.finish(self.start(port, seconds, close), seconds)


def parse_wrk(out: str, status: int) -> dict:
    m_req, m_rps = WRK_REQUESTS.search(out), WRK_RPS.search(out)
    if status != 0 or not m_req or not m_rps:
        raise Broken(f"wrk exited with status {status} and printed:\n{out.strip()[-2000:]}")
    m_sock, m_non = WRK_SOCKET.search(out), WRK_NON2XX.search(out)
    connect, read, write, timeout = (int(x) for x in m_sock.groups()) if m_sock else (0, 0, 0, 0)
    non2xx = int(m_non.group(1)) if m_non else 0
    return {
        "requests": int(m_req.group(1)),
        "rps": float(m_rps.group(1)),
        "connect": connect, "read": read, "write": write, "timeout": timeout,
        "non2xx": non2xx,
        "failed": connect + read + write + timeout + non2xx,
        "output": out,
    }


def describe_errors(r: dict) -> str:
    parts = [f"{r[k]:,} {k}" for k in ("connect", "read", "write", "timeout") if r[k]]
    if r["non2xx"]:
        parts.append(f"{r['non2xx']:,} non-2xx")
    return ", ".join(parts) or "none"


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


class CorralSetup(Setup):
    """`corral start hello -i 2 --listen 127.0.0.1:0 --lb <mode>` in a home of its own."""

    def __init__(self, mode: str, corral: Path, hello: Path, home: Path) -> None:
        self.mode = mode
        self.key = mode
        self.label = f"corral `--lb {mode}`"
        self.corral = corral
        self.hello = hello
        self.home = home
        self.env = clean_env()
        self.env["CORRAL_HOME"] = str(home)
        self.used = False

    def cli(self, *args: str, check: bool = True,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        self.used = True
        return run([str(self.corral), *args], self.env, timeout=timeout, check=check)

    def instances(self) -> list[dict]:
        out = self.cli("ls", "--json").stdout
        try:
            return [r for r in json.loads(out) if r.get("app") == "hello"]
        except json.JSONDecodeError as e:
            raise Broken(f"{self.label}: `corral ls --json` printed something else than JSON: "
                         f"{out[:300]!r}") from e

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
        wait_answers(self.port, self.label)

    def wait_online(self, not_pids: set[int] = frozenset()) -> set[int]:
        """Waits until WORKERS instances are online, none of them in `not_pids`."""
        rows: list[dict] = []
        for _ in bounded(ANSWER_TIMEOUT, 0.05):
            rows = self.instances()
            pids = {r["pid"] for r in rows if r.get("status") == "online" and r.get("pid")}
            if len(pids) == WORKERS and not pids & not_pids:
                return pids
        raise Broken(f"{self.label}: not {WORKERS} fresh workers online within "
                     f"{ANSWER_TIMEOUT:.0f}s: {[(r.get('pid'), r.get('status')) for r in rows]}")

    def processes(self) -> list[int]:
        return pids_with_env(f"CORRAL_HOME={self.home}")

    def wait_settled(self) -> tuple[float, int]:
        """Waits until only the daemon and WORKERS workers are left (the old ones drained).
        Returns the seconds it took and the number of processes left."""
        t0 = time.monotonic()
        left = self.processes()
        for _ in bounded(SETTLE_TIMEOUT, 0.05):
            left = self.processes()
            if len(left) <= WORKERS + 1:
                break
        return time.monotonic() - t0, len(left)

    def daemon_log(self) -> list[str]:
        try:
            return (self.home / "daemon.log").read_text(errors="replace").splitlines()
        except OSError:
            return []

    def unexpected_log(self) -> list[str]:
        out = []
        for line in self.daemon_log():
            text = line.split(" ", 1)[1] if re.match(r"^\d{4}-\d\d-\d\dT\S+ ", line) else line
            if not any(p.search(text) for p in EXPECTED_LOG):
                out.append(line)
        return out

    def worker_logs(self) -> str:
        try:
            done = self.cli("logs", "hello", "--lines", "50", check=False, timeout=15)
            return (done.stdout + done.stderr).rstrip()
        except Broken as e:
            return str(e)

    def shutdown(self) -> None:
        """`corral kill`, then SIGKILL for whatever is left; never raises."""
        if not self.used:
            return
        try:
            done = run([str(self.corral), "kill"], self.env, timeout=30, check=False)
            if done.returncode != 0:
                say(f"{self.label}: `corral kill` exited with {done.returncode}: "
                    f"{done.stderr.strip()}")
        except Broken as e:
            say(f"{self.label}: {e}")
        marker = f"CORRAL_HOME={self.home}"
        if self.daemon_pid and self.daemon_pid in pids_with_env(marker):
            say(f"{self.label}: the daemon (pid {self.daemon_pid}) outlived `corral kill`: "
                f"SIGKILL to its process group")
            for kill in (lambda: os.killpg(self.daemon_pid, signal.SIGKILL),
                         lambda: os.kill(self.daemon_pid, signal.SIGKILL)):
                try:
                    kill()
                except (ProcessLookupError, PermissionError):
                    pass
        leftovers = pids_with_env(marker)
        for _ in bounded(5, 0.05):
            if not leftovers:
                break
            leftovers = pids_with_env(marker)
        for pid in leftovers:
            say(f"{self.label}: pid {pid} outlived `corral kill`: sending SIGKILL")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.used = False


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
        env = clean_env()
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
        seen = wait_answers(self.port, self.label, want)
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
    try:
        after = setup.wait_online(not_pids=before if r["reloads_failed"] == 0 else frozenset())
        r["replaced"] = not (after & before)
        r["after_error"] = None
    except Broken as e:  # reported with the results rather than ending the run
        r["replaced"] = False
        r["after_error"] = str(e)
    r["settle_s"], r["left"] = setup.wait_settled()
    return r


def measure(setups: list[Setup], wrk: Wrk, cfg: argparse.Namespace) -> dict:
    res: dict = {s.key: {"close": [], "keepalive": []} for s in setups}
    say(f"warm-up: {cfg.warmup}s per setup and mode")
    for s in setups:
        for close in (True, False):
            r = wrk.run(s.port, cfg.warmup, close)
            if r["failed"]:
                say(f"{s.label}: warm-up ({'close' if close else 'keep-alive'}) errors: "
                    f"{describe_errors(r)}")
    # Rounds across the setups, each round in another order, so that a change in the machine's
    # load spreads over every setup instead of landing on one.
    for n in range(cfg.runs):
        order = setups[n % len(setups):] + setups[:n % len(setups)]
        for s in order:
            for close, kind in ((True, "close"), (False, "keepalive")):
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
            rps = [r["rps"] for r in runs]
            row[kind] = {
                "median": statistics.median(rps),
                "spread": (max(rps) - min(rps)) / 2 / statistics.median(rps) * 100
                if statistics.median(rps) else 0.0,
                "failed": sum(r["failed"] for r in runs),
                "errors": [describe_errors(r) for r in runs if r["failed"]],
            }
            if isinstance(s, CorralSetup):
                served = sum(r["requests"] for r in runs)
                cpu = sum(r["master_cpu_ms"] for r in runs)
                row[kind]["master_ms_per_100k"] = cpu / served * 100_000 if served else None
        out[s.key] = row
    return out


# ---------------------------------------------------------------- report


def report(cfg, setups: list[Setup], res: dict, machine: dict, wrk: Wrk,
           problems: list[str]) -> str:
    summ = summarize(setups, res)
    base = summ[REUSEPORT]

    def rps_cell(cell: dict) -> str:
        text = fmt(cell["median"])
        if cfg.runs > 1:
            text += f" ±{cell['spread']:.0f}%"
        if cell["failed"]:
            text += f" ⚠ {cell['failed']:,} failed"
        return text

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
        rows.append(f"| {s.label} | {rps_cell(row['close'])} | "
                    f"{times(row['close']['median'], base['close']['median'])} | "
                    f"{rps_cell(row['keepalive'])} | "
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
        f"- Machine: {machine['nproc']} CPU(s) ({machine['cpu']}), Linux {machine['kernel']}, "
        f"load average {machine['load']} at the start, {machine['load_end']} at the end, "
        f"net.ipv4.tcp_tw_reuse={machine['tw_reuse']}",
        others_line(res, setups),
        f"- {machine['corral']}, {machine['wrk']}; worker: `{machine['hello']}` "
        f"(axum, one thread), {WORKERS} workers",
        f"- `wrk {' '.join(wrk.argv(0, cfg.duration, False)[1:-1])} http://127.0.0.1:PORT/`, "
        f"new connections with `-H 'Connection: close'`; {cfg.runs} run(s) per cell (median; "
        f"± is half the range), after a {cfg.warmup}s "
        f"warm-up; reloads: {RELOADS} consecutive `corral reload hello` starting "
        f"{RELOAD_LEAD}s into a {cfg.reload_duration}s wrk run",
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


def others_line(res: dict, setups: list[Setup]) -> str:
    pcts = [r["others_cpu_pct"] for s in setups for kind in ("close", "keepalive")
            for r in res[s.key][kind]]
    busy = [p for p in pcts if p >= 10]
    line = (f"- CPU taken by other programs on the machine during the {len(pcts)} wrk runs: "
            f"mean {statistics.mean(pcts):.0f}%, max {max(pcts):.0f}% of one core")
    if busy:
        line += (f" — **{len(busy)} run(s) shared the CPUs with other work (≥ 10%): the "
                 f"numbers are unreliable**")
    return line


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
    cmd = ["cargo", "build", "--release", "-p", "corral", "-p", "corral-worker", "--features",
           "corral-worker/tokio", "--bins", "--examples"]
    say(f"building: {' '.join(cmd)}")
    cargo = shutil.which("cargo")
    if not cargo:
        raise Broken("cargo not found: install Rust, or pass --no-build with built binaries")
    try:
        done = subprocess.run([cargo, *cmd[1:], "--message-format=json-render-diagnostics"],
                              cwd=str(REPO), stdout=subprocess.PIPE, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise Broken("cargo build took more than 30 minutes") from e
    if done.returncode != 0:
        raise Broken(f"cargo build failed with status {done.returncode}")
    found: dict[str, Path] = {}
    for line in done.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        target = msg.get("target", {})
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            if target.get("name") == "corral" and "bin" in target.get("kind", []):
                found["corral"] = Path(msg["executable"])
            if target.get("name") == "hello" and "example" in target.get("kind", []):
                found["hello"] = Path(msg["executable"])
    for name in ("corral", "hello"):
        if name not in found or not found[name].is_file():
            raise Broken(f"cargo build did not report a {name} executable")
    return found["corral"], found["hello"]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark corral's --lb modes against the workers alone, with wrk.")
    ap.add_argument("--quick", action="store_true",
                    help="one 2 s run per cell and shorter reload runs (about a minute)")
    ap.add_argument("--connections", type=int, default=16, help="wrk -c (default 16)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 5; quick: 2)")
    ap.add_argument("--runs", type=int, help="wrk runs per cell, median reported "
                    "(default 3; quick: 1)")
    ap.add_argument("--no-build", action="store_true",
                    help="use target/release/corral and target/release/examples/hello as built")
    ap.add_argument("--corral", type=Path, help="corral binary (implies no build of it)")
    ap.add_argument("--hello", type=Path, help="hello example binary")
    ap.add_argument("--output", type=Path, help="also write the Markdown report here")
    ap.add_argument("--json", type=Path, help="write every raw sample here as JSON")
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary CORRAL_HOME directories (daemon and worker logs)")
    cfg = ap.parse_args(argv)
    cfg.duration = cfg.duration or (2 if cfg.quick else 5)
    cfg.runs = cfg.runs or (1 if cfg.quick else 3)
    cfg.warmup = 1
    cfg.reload_duration = 3 if cfg.quick else 4
    cfg.wrk_timeout = 2
    if cfg.connections < 1 or cfg.duration < 1 or cfg.runs < 1:
        ap.error("--connections, --duration and --runs must be positive")
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    wrk_bin = shutil.which("wrk")
    if not wrk_bin:
        say("wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu), or put a "
            "wrk binary on PATH")
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
        wrk = Wrk(wrk_bin, 1, cfg.connections, cfg.wrk_timeout)
        wrk_version = subprocess.run([wrk_bin, "-v"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, timeout=10).stdout
        machine = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "nproc": os.cpu_count(),
            "cpu": cpu_model(),
            "kernel": platform.release(),
            "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "tw_reuse": read_text("/proc/sys/net/ipv4/tcp_tw_reuse"),
            "corral": run([str(corral_bin), "--version"], clean_env()).stdout.strip(),
            "wrk": " ".join(wrk_version.split()[:2]),
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
        machine["load_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        problems = collect_problems(setups, res, summarize(setups, res))
        text = report(cfg, setups, res, machine, wrk, problems)
        print(text, flush=True)
        if cfg.output:
            cfg.output.write_text(text)
        if cfg.json:
            cfg.json.write_text(json.dumps({"machine": machine, "results": res}, indent=2,
                                           default=str))
        return 0
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except Broken as e:
        say(f"error: {e}")
        for s in setups:
            if isinstance(s, CorralSetup) and s.used:
                tail = s.daemon_log()[-20:]
                if tail:
                    say(f"{s.label}: last lines of {s.home / 'daemon.log'}:\n  "
                        + "\n  ".join(tail))
        return 1
    finally:
        if setups or CHILDREN.procs:
            say("cleaning up: corral kill, and SIGKILL to every process group started here")
        for s in setups:
            s.shutdown()
        CHILDREN.end_all()
        if cfg.keep_temp:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
