#!/usr/bin/env python3
"""Node.js cluster benchmark: the same Node hello app, 2 workers, behind three cluster primaries:
corral (`corral start hello.js -i 2`), Node's own cluster module (apps/node_primary.js) and PM2's
cluster mode (`pm2 start hello.js -i 2`), loaded with wrk on loopback.

Measures requests/s with a new connection per request and with keep-alive, the primary's CPU
time per 100k connections, and failed requests during 10 consecutive rolling reloads under
load, then prints a Markdown table with the project's targets. See bench/README.md.
Python 3 standard library only; needs node, wrk (`apt-get install -y wrk`), cargo (unless
`--corral`/`--no-build`) and npm (to install PM2 locally the first time, unless `--pm2`).

Exit status: 0 when every measurement ran (whether or not a target is met, and even when
requests failed: those are in the table), 1 when something broke (a build failed, a primary
would not start, a worker never answered, wrk printed nothing usable), 2 on bad options.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import select
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
APPS = HERE / "apps"
HELLO = APPS / "hello.js"
NODE_PRIMARY = APPS / "node_primary.js"

CLI_TIMEOUT = 60.0  # seconds any single CLI call may take
ANSWER_TIMEOUT = 20.0  # seconds a setup may take to answer HTTP
RELOAD_TIMEOUT = 30.0  # seconds one rolling reload may take
SETTLE_TIMEOUT = 20.0  # seconds the old workers of a reload may take to drain and exit
RELOADS = 10  # consecutive rolling reloads under load
RELOAD_LEAD = 0.5  # seconds wrk runs before the first reload
RELOAD_TAIL = 1.0  # seconds wrk runs after the last reload returned
RELOAD_WRK_MAX = 240  # wrk's -d for the reload runs (it gets SIGINT once the reloads are done)
RELOAD_BUDGET = 200.0  # no reload is started this many seconds after the reload run began
WORKERS = 2

CORRAL, NODE, PM2 = "corral", "node", "pm2"

# Daemon log lines a healthy corral run writes; every other line is reported.
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
        """`proc` exited and was reaped (the daemons the CLIs start make sessions of their own,
        and are ended through their homes)."""
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
                          stderr=subprocess.PIPE, text=True, cwd=str(HERE))
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
    """utime + stime of a process, all its threads (fields 14 and 15 of /proc/<pid>/stat), ms."""
    fields = proc_stat(pid)
    if fields is None:
        raise Broken(f"pid {pid} is gone (did the primary die?)")
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15: index 0 is field 3
    return ticks * 1000.0 / os.sysconf("SC_CLK_TCK")


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


def clean_env() -> dict:
    """The environment without anything that would make node think it is a cluster worker or
    runs under a process manager (or point corral or PM2 at someone else's home), with this
    run's mark."""
    drop = ("CORRAL_", "PM2_", "LISTEN_", "NOTIFY_SOCKET", "NODE_APP_INSTANCE", "NODE_UNIQUE_ID",
            "NODE_CHANNEL_", "NODE_CLUSTER_SCHED_POLICY", "NODE_CLUSTER_BENCH_RUN")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(drop) and k not in ("PORT", "WORKERS")}
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


def hello_pid(port: int, timeout: float = 0.5) -> int | None:
    """GET / on 127.0.0.1:port with a new connection: the pid in hello.js's x-pid header when it
    answered `hello`, else None."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            # HTTP/1.0: hello.js's answer then comes whole, not chunked, and the connection ends.
            s.sendall(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while len(data) < 8192:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.") or b" 200" not in lines[0] or body != b"hello\n":
        return None
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"x-pid" and value.strip().isdigit():
            return int(value.strip())
    return None


def wait_answers(port: int, label: str, want_pids: set[int]) -> set[int]:
    """Polls with new connections until each of `want_pids` has answered on `port` (the
    primaries hand connections out in turn). Returns the pids seen."""
    seen: set[int] = set()
    for _ in bounded(ANSWER_TIMEOUT, 0.005):
        pid = hello_pid(port)
        if pid is not None:
            seen.add(pid)
            if want_pids <= seen:
                return seen
    if not seen:
        raise Broken(f"{label}: nothing answered on 127.0.0.1:{port} within "
                     f"{ANSWER_TIMEOUT:.0f}s")
    raise Broken(f"{label}: only pid(s) {sorted(seen)} answered on 127.0.0.1:{port}, "
                 f"expected {sorted(want_pids)}")


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

    def finish(self, proc: subprocess.Popen, seconds: float) -> dict:
        try:
            out, _ = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired as e:
            CHILDREN.end(proc)
            raise Broken(f"wrk did not finish {seconds + 30:.0f}s after its start") from e
        CHILDREN.forget(proc)
        return parse_wrk(out, proc.returncode)

    def stop(self, proc: subprocess.Popen) -> dict:
        """Ends a wrk run early: on SIGINT wrk stops and prints its statistics as usual."""
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        return self.finish(proc, 0)

    def run(self, port: int, seconds: int, close: bool) -> dict:
        return self.finish(self.start(port, seconds, close), seconds)


def parse_wrk(out: str, status: int) -> dict:
    m_req, m_rps = WRK_REQUESTS.search(out), WRK_RPS.search(out)
    if status != 0 or not m_req or not m_rps:
        raise Broken(f"wrk exited with status {status} and printed:\n{out.strip()[-2000:]}")
    m_sock, m_non = WRK_SOCKET.search(out), WRK_NON2XX.search(out)
    connect, read, write, timeout = (int(x) for x in m_sock.groups()) if m_sock else (0, 0, 0, 0)
    non2xx = int(m_non.group(1)) if m_non else 0
    unit = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[m_req.group(3)]
    return {
        "requests": int(m_req.group(1)),
        "seconds": float(m_req.group(2)) * unit,
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
        pids: set[int] = set()
        for _ in bounded(ANSWER_TIMEOUT, 0.05):
            pids = self.workers()
            if len(pids) == WORKERS and not pids & not_pids:
                return pids
        raise Broken(f"{self.label}: not {WORKERS} fresh workers online within "
                     f"{ANSWER_TIMEOUT:.0f}s: {sorted(pids)} (before: {sorted(not_pids)})")

    def wait_settled(self) -> tuple[float, int]:
        """Waits until only WORKERS worker processes are left (the old ones drained). Returns
        the seconds it took and the number of worker processes left."""
        t0 = time.monotonic()
        left = self.worker_processes()
        for _ in bounded(SETTLE_TIMEOUT, 0.05):
            left = self.worker_processes()
            if len(left) <= WORKERS:
                break
        return time.monotonic() - t0, len(left)

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


def end_home(label: str, marker: str, daemon_pid: int | None) -> None:
    """After a daemon's `kill` command: gives the daemon and its apps (every process with the
    home in its environment) 5 s to go, as `pm2 kill` may return a little before its daemon has
    exited, then SIGKILLs what is left, the daemon first. Never raises."""
    leftovers = pids_with_env(marker)
    for _ in bounded(5, 0.05):
        if not leftovers:
            return
        leftovers = pids_with_env(marker)
    if daemon_pid in leftovers:
        leftovers.remove(daemon_pid)
        leftovers.insert(0, daemon_pid)
    for pid in leftovers:
        say(f"{label}: pid {pid}{' (the daemon)' if pid == daemon_pid else ''} outlived the "
            f"daemon's `kill` by 5 s: sending SIGKILL")
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class CorralSetup(Setup):
    """`corral start hello.js -i 2 --name hello --env PORT=<port>` in a home of its own: corral
    is the cluster primary of the unmodified app."""

    key = CORRAL
    label = "corral"

    def __init__(self, corral: Path, home: Path) -> None:
        self.corral = corral
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
        self.cli("ping")
        self.primary_pid = read_pid_file(self.home / "daemon.pid", self.label)
        self.port = free_port()
        self.cli("start", str(HELLO), "--name", "hello", "-i", str(WORKERS),
                 "--env", f"PORT={self.port}")
        wait_answers(self.port, self.label, self.wait_online())

    def workers(self) -> set[int]:
        return {r["pid"] for r in self.instances() if r.get("status") == "online" and r.get("pid")}

    def worker_processes(self) -> list[int]:
        return [p for p in pids_with_env(f"CORRAL_HOME={self.home}") if p != self.primary_pid]

    def reload(self) -> dict:
        t0 = time.monotonic()
        try:
            done = self.cli("reload", "hello", check=False, timeout=RELOAD_TIMEOUT)
            return {"status": done.returncode, "seconds": time.monotonic() - t0,
                    "detail": done.stderr.strip()}
        except Broken as e:  # it hung: keep going, so that it shows in the table
            return {"status": None, "seconds": time.monotonic() - t0, "detail": str(e)}

    def crashes(self) -> int | None:
        return sum(r.get("restarts", 0) or 0 for r in self.instances())

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
        end_home(self.label, f"CORRAL_HOME={self.home}", self.primary_pid)
        self.used = False


class NodeSetup(Setup):
    """`node apps/node_primary.js apps/hello.js`: Node's own cluster module as the primary,
    default scheduling (round robin on Linux). SIGUSR2 asks it for a rolling reload, and it says
    `reloaded <n> <pids>` on stdout once that is done."""

    key = NODE
    label = "Node's primary"

    def __init__(self, work: Path) -> None:
        self.err_path = work / "node-primary.err"
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.current: set[int] = set()
        self.reloads = 0
        self.died: list[str] = []

    def start(self) -> None:
        self.port = free_port()
        env = clean_env()
        env["PORT"] = str(self.port)
        env["WORKERS"] = str(WORKERS)
        with open(self.err_path, "wb") as err:
            self.proc = CHILDREN.popen(["node", str(NODE_PRIMARY), str(HELLO)], env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=err, cwd=str(HERE))
        self.primary_pid = self.proc.pid
        line = self.wait_line("ready", ANSWER_TIMEOUT)
        if line is None:
            raise Broken(f"{self.label}: no `ready` line within {ANSWER_TIMEOUT:.0f}s; "
                         f"stderr: {self.stderr_tail()}")
        wait_answers(self.port, self.label, self.current)

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


class Pm2Setup(Setup):
    """`pm2 start hello.js -i 2 --name hello` (cluster mode: PM2's God daemon is the primary,
    through Node's cluster module) in a PM2_HOME of its own; PORT comes from the CLI's
    environment, which PM2 hands to the app."""

    key = PM2
    label = "PM2"

    def __init__(self, pm2: Path, home: Path) -> None:
        self.pm2 = pm2
        self.home = home
        self.env = clean_env()
        self.env["PM2_HOME"] = str(home)
        self.used = False

    def cli(self, *args: str, check: bool = True,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess:
        self.used = True
        return run([str(self.pm2), *args], self.env, timeout=timeout, check=check)

    def instances(self) -> list[dict]:
        out = self.cli("jlist").stdout
        for line in reversed(out.splitlines()):
            if line.startswith("["):
                try:
                    return [r for r in json.loads(line) if r.get("name") == "hello"]
                except json.JSONDecodeError:
                    continue
        raise Broken(f"{self.label}: `pm2 jlist` printed no JSON list: {out[:300]!r}")

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.cli("ping")
        self.primary_pid = read_pid_file(self.home / "pm2.pid", self.label)
        self.port = free_port()
        self.env["PORT"] = str(self.port)
        self.cli("start", str(HELLO), "--name", "hello", "-i", str(WORKERS))
        wait_answers(self.port, self.label, self.wait_online())

    def workers(self) -> set[int]:
        return {r["pid"] for r in self.instances()
                if (r.get("pm2_env") or {}).get("status") == "online" and r.get("pid")}

    def worker_processes(self) -> list[int]:
        return [p for p in pids_with_env(f"PM2_HOME={self.home}") if p != self.primary_pid]

    def reload(self) -> dict:
        t0 = time.monotonic()
        try:
            done = self.cli("reload", "hello", check=False, timeout=RELOAD_TIMEOUT)
            return {"status": done.returncode, "seconds": time.monotonic() - t0,
                    "detail": (done.stderr or "").strip()[-500:]}
        except Broken as e:
            return {"status": None, "seconds": time.monotonic() - t0, "detail": str(e)}

    def diagnostics(self, broken: bool, failed: bool) -> list[str]:
        if not broken:  # its log has 6 lines per worker replaced: only when something broke
            return []
        try:
            lines = (self.home / "pm2.log").read_text(errors="replace").splitlines()[-30:]
        except OSError:
            lines = ["(no pm2.log)"]
        return [f"{self.label}: last lines of pm2.log:\n"
                + "\n".join(f"    {line}" for line in lines)]

    def shutdown(self) -> None:
        """`pm2 kill`, then SIGKILL for whatever is left; never raises."""
        if not self.used:
            return
        try:
            run([str(self.pm2), "kill"], self.env, timeout=30, check=False)
        except Broken as e:
            say(f"{self.label}: {e}")
        end_home(self.label, f"PM2_HOME={self.home}", self.primary_pid)
        self.used = False


# ---------------------------------------------------------------- measurements


def throughput_round(setup: Setup, wrk: Wrk, seconds: int, close: bool) -> dict:
    """One wrk run; the CPU time the primary, the workers and wrk took over it; and the CPU
    time other programs on the machine took meanwhile."""
    workers = {p: cpu_ms_or_none(p) for p in setup.worker_processes()}
    others = OTHERS.snapshot()
    t0 = time.monotonic()
    before = cpu_ms(setup.primary_pid)
    wrk0 = children_cpu_ms()
    idle0, total0 = cpu_times()
    r = wrk.run(setup.port, seconds, close)
    idle1, total1 = cpu_times()
    r["idle_pct"] = (idle1 - idle0) / max(total1 - total0, 1) * 100.0
    r["wrk_cpu_ms"] = children_cpu_ms() - wrk0
    r["primary_cpu_ms"] = cpu_ms(setup.primary_pid) - before
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
    cpu0 = cpu_ms(setup.primary_pid)
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
    r["primary_cpu_ms"] = cpu_ms(setup.primary_pid) - cpu0
    r["wall_s"] = time.monotonic() - t0
    r["reloads"] = reloads
    r["reloads_s"] = reloads_s
    r["reloads_failed"] = sum(1 for x in reloads if x["status"] != 0) + RELOADS - len(reloads)
    r["covered"] = covered
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
            rps = [r["rps"] for r in runs]
            med = statistics.median(rps)
            served = sum(r["requests"] for r in runs)
            cpu = sum(r["primary_cpu_ms"] for r in runs)
            per_100k = {f"{who}_ms_per_100k": sum(r[f"{who}_cpu_ms"] for r in runs) / served
                        * 100_000 if served else None for who in ("workers", "wrk")}
            row[kind] = {
                "median": med,
                "spread": (max(rps) - min(rps)) / 2 / med * 100 if med else 0.0,
                "failed": sum(r["failed"] for r in runs),
                "errors": [describe_errors(r) for r in runs if r["failed"]],
                "primary_ms_per_100k": cpu / served * 100_000 if served else None,
                **per_100k,
                "idle_pct": statistics.mean(r["idle_pct"] for r in runs),
            }
        out[s.key] = row
    return out


# ---------------------------------------------------------------- report


def report(cfg, setups: list[Setup], res: dict, machine: dict, wrk: Wrk,
           problems: list[str]) -> str:
    summ = summarize(setups, res)
    base = summ[NODE]

    def rps_cell(cell: dict) -> str:
        text = fmt(cell["median"])
        if cfg.runs > 1:
            text += f" ±{cell['spread']:.0f}%"
        if cell["failed"]:
            text += f" ⚠ {cell['failed']:,} failed"
        return text

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
        rows.append(f"| {s.label} | {rps_cell(row['close'])} | "
                    f"{times(row['close']['median'], base['close']['median'])} | "
                    f"{rps_cell(row['keepalive'])} | "
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
        f"- Machine: {machine['nproc']} CPU(s) ({machine['cpu']}), Linux {machine['kernel']}, "
        f"load average {machine['load']} at the start, {machine['load_end']} at the end, "
        f"net.ipv4.tcp_tw_reuse={machine['tw_reuse']}",
        others_line(res, setups),
        f"- node {machine['node']}, PM2 {machine['pm2']}, {machine['corral']}, "
        f"{machine['wrk']}; app: `bench/apps/hello.js` (unchanged), {WORKERS} workers in every "
        f"setup; Node's primary: `bench/apps/node_primary.js` (cluster module, default "
        f"scheduling: round robin)",
        f"- `wrk {' '.join(wrk.argv(0, cfg.duration, False)[1:-1])} http://127.0.0.1:PORT/`, "
        f"new connections with `-H 'Connection: close'`; {cfg.runs} run(s) per cell (median; "
        f"± is half the range), after a {cfg.warmup}s warm-up, setups interleaved in rounds; "
        f"reloads: {RELOADS} consecutive rolling reloads (`corral reload hello`, SIGUSR2 to "
        f"Node's primary, `pm2 reload hello`), each waited for, under wrk started "
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


def build_corral() -> Path:
    say("building corral: cargo build --release -p corral")
    cargo = shutil.which("cargo")
    if not cargo:
        raise Broken("cargo not found: install Rust, or pass --corral PATH / --no-build")
    try:
        done = subprocess.run([cargo, "build", "--release", "-p", "corral",
                               "--message-format=json-render-diagnostics"],
                              cwd=str(REPO), stdout=subprocess.PIPE, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise Broken("cargo build took more than 30 minutes") from e
    if done.returncode != 0:
        raise Broken(f"cargo build failed with status {done.returncode}")
    binary = None
    for line in done.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        target = msg.get("target", {})
        if (msg.get("reason") == "compiler-artifact" and msg.get("executable")
                and target.get("name") == "corral" and "bin" in target.get("kind", [])):
            binary = Path(msg["executable"])
    if binary is None or not binary.is_file():
        raise Broken("cargo build did not report a corral executable")
    return binary


def install_pm2(prefix: Path, spec: str) -> Path:
    """PM2 from `npm install --prefix <prefix>` (bench/.deps by default, shared with
    pm2_vs_corral.py), installed the first time only. Nothing is installed globally."""
    binary = prefix / "node_modules" / ".bin" / "pm2"
    if binary.exists():
        say(f"using the PM2 already installed in {prefix}")
        return binary
    npm = shutil.which("npm")
    if not npm:
        raise Broken("npm not found: install node and npm, or pass --pm2 <path>")
    prefix.mkdir(parents=True, exist_ok=True)
    say(f"installing {spec} with npm into {prefix}")
    try:
        done = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                               spec], stdin=subprocess.DEVNULL, stdout=sys.stderr,
                              timeout=900)
    except subprocess.TimeoutExpired as e:
        raise Broken("npm install took more than 15 minutes") from e
    if done.returncode != 0 or not binary.exists():
        raise Broken(f"npm install {spec} failed (status {done.returncode})")
    return binary


def pm2_version(binary: Path) -> str:
    package = binary.resolve().parent.parent / "package.json"
    try:
        return json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"


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
        description="Benchmark corral as a Node.js cluster primary against Node's own primary "
                    "and PM2's cluster mode, with wrk.")
    ap.add_argument("--quick", action="store_true",
                    help="one 2 s run per cell (about a minute)")
    ap.add_argument("--connections", type=int, default=16, help="wrk -c (default 16)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 5; quick: 2)")
    ap.add_argument("--runs", type=int, help="wrk runs per cell, median reported "
                    "(default 3; quick: 1)")
    ap.add_argument("--no-build", action="store_true",
                    help="use target/release/corral as it is")
    ap.add_argument("--corral", type=Path, help="corral binary (implies no build)")
    ap.add_argument("--pm2", type=Path, help="pm2 executable to use (default: install one)")
    ap.add_argument("--deps", type=Path, default=HERE / ".deps",
                    help="npm prefix where PM2 is installed when missing (default: bench/.deps)")
    ap.add_argument("--pm2-spec", default="pm2",
                    help="npm package spec to install (default: pm2, e.g. pm2@6)")
    ap.add_argument("--output", type=Path, help="also write the Markdown report here")
    ap.add_argument("--json", type=Path, help="write every raw sample here as JSON")
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary CORRAL_HOME and PM2_HOME (logs included)")
    cfg = ap.parse_args(argv)
    cfg.duration = cfg.duration or (2 if cfg.quick else 5)
    cfg.runs = cfg.runs or (1 if cfg.quick else 3)
    cfg.warmup = 1
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
            corral_bin = build_corral()
        corral_bin = corral_bin.resolve()
        if not corral_bin.is_file():
            raise Broken(f"no corral binary at {corral_bin}")
        pm2_bin = cfg.pm2.resolve() if cfg.pm2 else install_pm2(cfg.deps.resolve(), cfg.pm2_spec)
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
            "node": run(["node", "--version"], clean_env()).stdout.strip(),
            "pm2": pm2_version(pm2_bin),
            "corral": run([str(corral_bin), "--version"], clean_env()).stdout.strip(),
            "wrk": " ".join(wrk_version.split()[:2]),
        }
        say(f"machine: {machine}")

        setups = [CorralSetup(corral_bin, work / "corral-home"), NodeSetup(work),
                  Pm2Setup(pm2_bin, work / "pm2-home")]
        # All three run at once (idle when not measured), so that the runs can go round.
        for s in setups:
            s.start()
            say(f"{s.label}: serving on 127.0.0.1:{s.port}, primary pid {s.primary_pid}, "
                f"workers {sorted(s.workers())}")

        res = measure(setups, wrk, cfg)

        for s in setups:
            res[s.key]["crashes"] = s.crashes()
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
            say("cleaning up: corral kill, pm2 kill, and SIGKILL to every process group started "
                "here")
        for s in setups:
            s.shutdown()
        CHILDREN.end_all()
        if cfg.keep_temp:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
