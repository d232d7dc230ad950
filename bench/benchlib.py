"""What the benchmark scripts of bench/ share (pm2_vs_corral.py, cluster.py, node_cluster.py):
process groups and their cleanup, bounded waits, free ports, HTTP probes, wrk, CPU time from
/proc, the corral and PM2 daemons in homes of their own, getting corral and PM2, the machine's
description and the report's formatting. Python 3 standard library only.

Every process a script starts goes through CHILDREN, in a process group of its own, so that the
script can end it and whatever it started on the way out. Nothing is ever killed by name: only
processes started here, or carrying one of the run's homes in their environment. All traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

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
import time
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

CLI_TIMEOUT = 60.0  # seconds any single CLI call may take
ANSWER_TIMEOUT = 20.0  # seconds a setup may take to answer HTTP
SETTLE_TIMEOUT = 20.0  # seconds the old workers of a reload may take to drain and exit


class Broken(Exception):
    """Something failed that makes the measurement meaningless."""


def say(message: str) -> None:
    """A progress line on stderr (stdout is for the report)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def bounded(seconds: float, step: float):
    """Yields until `seconds` have passed, at most seconds/step + 1000 times, sleeping `step`
    between iterations: every polling loop of the benchmarks goes through here."""
    end = time.monotonic() + seconds
    for _ in range(int(seconds / step) + 1000):
        if time.monotonic() > end:
            return
        yield
        time.sleep(step)


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP end the script through SystemExit, so that its cleanup runs."""

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)


# ---------------------------------------------------------------- processes


class Children:
    """Every process the script starts, each in a new session (so its own process group), so
    that all can be ended on the way out, whatever they started themselves."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        """subprocess.Popen in a new session, remembered until end() or forget()."""
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
        """end() for every process still remembered: the last step of every run."""
        for proc in list(self.procs):
            self.end(proc)


CHILDREN = Children()


def run(args: list[str], env: dict, timeout: float = CLI_TIMEOUT, check: bool = True,
        capture: bool = True, cwd: Path = BENCH) -> subprocess.CompletedProcess:
    """Runs a command in its own process group; on timeout the group gets SIGKILL. Without
    `capture`, its stdout goes to /dev/null; with `check`, a non-zero status is Broken."""
    proc = CHILDREN.popen(args, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, cwd=str(cwd))
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


def clean_env(prefixes: tuple[str, ...] = (), names: tuple[str, ...] = (),
              mark: str | None = None) -> dict:
    """This process's environment without the variables starting with one of `prefixes` or
    named in `names`, LANG set when missing, and `mark` (NAME=value) added."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes) and k not in names}
    env.setdefault("LANG", "C.UTF-8")
    if mark:
        name, _, value = mark.partition("=")
        env[name] = value
    return env


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (after the command name), None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    fields = proc_stat(pid)
    return fields is not None and fields[0] != "Z"


def cpu_ms(pid: int, who: str = "daemon") -> float:
    """utime + stime of a process, all its threads (fields 14 and 15 of /proc/<pid>/stat), ms.
    `who` names the process in the error when it is gone."""
    fields = proc_stat(pid)
    if fields is None:
        raise Broken(f"pid {pid} is gone (did the {who} die?)")
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15: index 0 is field 3
    return ticks * 1000.0 / os.sysconf("SC_CLK_TCK")


def pids_with_env(entry: str) -> list[int]:
    """Live processes whose environment holds exactly `entry` (e.g. `CORRAL_HOME=<dir>`): a
    daemon and every app it started, since apps inherit the daemon's environment."""
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


class OtherCpu:
    """CPU time taken by processes this run did not start (anything else on the machine) over an
    interval: two scans of /proc, processes told apart by the run's `mark` (NAME=value) in their
    environment. A process that both starts and ends within the interval is missed."""

    def __init__(self, mark: str) -> None:
        self.mark = mark
        self.ours: dict[tuple[int, str], bool] = {}  # (pid, start time) -> started by this run

    def snapshot(self) -> dict[tuple[int, str], int]:
        ticks = {}
        me = os.getpid()
        needle = self.mark.encode()
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


# ---------------------------------------------------------------- network


def free_port() -> int:
    """A port the kernel says is free on 127.0.0.1 (bound to port 0, read back, closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# HTTP/1.0: hello.js's answer then comes whole, not chunked, and the connection ends.
GET_HTTP10 = b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"


def http_get(port: int, timeout: float, request: bytes = GET_HTTP10) -> tuple[bytes, bytes] | None:
    """Sends `request` to 127.0.0.1:port on a new connection and reads the answer (8 KiB at
    most) until the server closes: (head, body), None when the connection failed."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(request)
            data = b""
            while len(data) < 8192:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def hello_js_pid(port: int, timeout: float = 0.5) -> int | None:
    """GET / on 127.0.0.1:port: the pid in apps/hello.js's x-pid header when it answered
    `hello`, else None."""
    answer = http_get(port, timeout)
    if answer is None:
        return None
    head, body = answer
    lines = head.split(b"\r\n")
    if not lines[0].startswith(b"HTTP/1.") or b" 200" not in lines[0] or body != b"hello\n":
        return None
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"x-pid" and value.strip().isdigit():
            return int(value.strip())
    return None


def wait_answers(probe: Callable[[int], int | None], port: int, label: str,
                 want_pids: set[int] | None = None) -> set[int]:
    """Polls `probe(port)` (a pid, or None when nothing good answered) with new connections
    until something answers; with `want_pids`, until each of them has answered. Returns the
    pids seen."""
    seen: set[int] = set()
    for _ in bounded(ANSWER_TIMEOUT, 0.005):
        pid = probe(port)
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


def find_wrk() -> str | None:
    """The wrk on PATH; when there is none, says how to get one."""
    wrk = shutil.which("wrk")
    if not wrk:
        say("wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu), or put a "
            "wrk binary on PATH")
    return wrk


class Wrk:
    """wrk runs against 127.0.0.1:<port>/, each in a process group of its own."""

    def __init__(self, binary: str, threads: int, connections: int, timeout: int,
                 env: dict) -> None:
        self.binary = binary
        self.threads = threads
        self.connections = connections
        self.timeout = timeout
        self.env = env

    def argv(self, port: int, seconds: int, close: bool) -> list[str]:
        """wrk's command line; `close` sends `Connection: close` (a new connection per
        request)."""
        args = [self.binary, f"-t{self.threads}", f"-c{self.connections}", f"-d{seconds}s",
                f"--timeout={self.timeout}s"]
        if close:
            args += ["-H", "Connection: close"]
        return args + [f"http://127.0.0.1:{port}/"]

    def describe(self, seconds: int, runs: int, warmup: int) -> str:
        """The start of the report's line on the load: wrk's command, the runs, the warm-up."""
        return (f"- `wrk {' '.join(self.argv(0, seconds, False)[1:-1])} http://127.0.0.1:PORT/`, "
                f"new connections with `-H 'Connection: close'`; {runs} run(s) per cell (median; "
                f"± is half the range), after a {warmup}s warm-up")

    def version(self) -> str:
        """`wrk <version>`, from the first words of `wrk -v`."""
        out = subprocess.run([self.binary, "-v"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, timeout=10).stdout
        return " ".join(out.split()[:2])

    def start(self, port: int, seconds: int, close: bool) -> subprocess.Popen:
        """Starts a run without waiting for it (see finish() and stop())."""
        return CHILDREN.popen(self.argv(port, seconds, close), env=self.env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)

    def finish(self, proc: subprocess.Popen, seconds: float) -> dict:
        """Waits for a run started `seconds` long and parses what it printed."""
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
        """A whole run, parsed (see parse_wrk())."""
        return self.finish(self.start(port, seconds, close), seconds)


def parse_wrk(out: str, status: int) -> dict:
    """Requests, seconds, requests/s and errors from wrk's output."""
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
    """wrk's errors in words, `none` when there were none."""
    parts = [f"{r[k]:,} {k}" for k in ("connect", "read", "write", "timeout") if r[k]]
    if r["non2xx"]:
        parts.append(f"{r['non2xx']:,} non-2xx")
    return ", ".join(parts) or "none"


def warm_up(setups: list, wrk: Wrk, seconds: int) -> None:
    """A short wrk run on each setup (`.port`, `.label`), with and without keep-alive."""
    say(f"warm-up: {seconds}s per setup and mode")
    for s in setups:
        for close in (True, False):
            r = wrk.run(s.port, seconds, close)
            if r["failed"]:
                say(f"{s.label}: warm-up ({'close' if close else 'keep-alive'}) errors: "
                    f"{describe_errors(r)}")


def rounds(setups: list, runs: int):
    """Yields (round, setup, close, kind) for every throughput run: rounds across the setups,
    each round in another order, so that a change in the machine's load spreads over every setup
    instead of landing on one."""
    for n in range(runs):
        for s in setups[n % len(setups):] + setups[:n % len(setups)]:
            for close, kind in ((True, "close"), (False, "keepalive")):
                yield n, s, close, kind


# ---------------------------------------------------------------- reloads


def wait_workers(label: str, workers: Callable[[], set[int]], count: int,
                 not_pids: set[int] = frozenset()) -> set[int]:
    """Waits until `workers()` (the pids online) gives `count` pids, none of them in
    `not_pids`."""
    pids: set[int] = set()
    for _ in bounded(ANSWER_TIMEOUT, 0.05):
        pids = workers()
        if len(pids) == count and not pids & not_pids:
            return pids
    raise Broken(f"{label}: not {count} fresh workers online within "
                 f"{ANSWER_TIMEOUT:.0f}s: {sorted(pids)} (before: {sorted(not_pids)})")


def wait_drained(processes: Callable[[], list[int]], most: int) -> tuple[float, int]:
    """Waits until `processes()` lists at most `most` pids (the old workers drained). Returns
    the seconds it took and the number of processes left."""
    t0 = time.monotonic()
    left = processes()
    for _ in bounded(SETTLE_TIMEOUT, 0.05):
        left = processes()
        if len(left) <= most:
            break
    return time.monotonic() - t0, len(left)


def check_replaced(setup, before: set[int], r: dict) -> None:
    """After reloads under load: records in `r` whether fresh workers replaced all of `before`
    (`replaced`, `after_error`) and how long the old ones took to go (`settle_s`, `left`), from
    the setup's wait_online() and wait_settled(). Problems are recorded, not raised."""
    try:
        after = setup.wait_online(not_pids=before if r["reloads_failed"] == 0 else frozenset())
        r["replaced"] = not (after & before)
        r["after_error"] = None
    except Broken as e:  # reported with the results rather than ending the run
        r["replaced"] = False
        r["after_error"] = str(e)
    r["settle_s"], r["left"] = setup.wait_settled()


# ---------------------------------------------------------------- corral and PM2 daemons


class DaemonHome:
    """A process manager's daemon (corral or PM2) with a home of its own (`home_var`, in a
    temporary directory), driven through its CLI. Every process with that home in its
    environment is the daemon or one of its apps: that is how stop() finds what is left.
    Subclasses set `label` and `home_var`."""

    label = ""
    home_var = ""

    def __init__(self, binary: Path, home: Path, env: dict, cwd: Path = BENCH) -> None:
        self.binary = binary
        self.home = home
        self.env = dict(env)
        self.env[self.home_var] = str(home)
        self.cwd = cwd
        self.used = False

    def argv(self, *args: str) -> list[str]:
        """The CLI's command line for `args`."""
        return [str(self.binary), *args]

    def cli(self, *args: str, check: bool = True, timeout: float = CLI_TIMEOUT,
            capture: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        """Runs the CLI with the home's environment (or `env`) and marks the home used."""
        self.used = True
        return run(self.argv(*args), env or self.env, timeout=timeout, check=check,
                   capture=capture, cwd=self.cwd)

    def processes(self) -> list[int]:
        """The daemon and its apps: every live process with the home in its environment."""
        return pids_with_env(f"{self.home_var}={self.home}")

    def stop(self, daemon_pid: int | None, timeout: float = 30.0) -> None:
        """The CLI's `kill`, then 5 s for the daemon and its apps to go (`pm2 kill` may return a
        little before its daemon has exited), then SIGKILL for what is left: the daemon's process
        group and the daemon first, so that it restarts nothing. Never raises."""
        if not self.used:
            return
        try:
            done = run(self.argv("kill"), self.env, timeout=timeout, check=False, cwd=self.cwd)
            if done.returncode != 0:
                say(f"{self.label}: `{self.binary.name} kill` exited with {done.returncode}: "
                    f"{done.stderr.strip()}")
        except Broken as e:
            say(f"{self.label}: {e}")
        leftovers = self.processes()
        for _ in bounded(5, 0.05):
            if not leftovers:
                break
            leftovers = self.processes()
        if daemon_pid is not None and daemon_pid in leftovers:
            say(f"{self.label}: the daemon (pid {daemon_pid}) outlived `kill` by 5 s: SIGKILL "
                f"to its process group")
            leftovers.remove(daemon_pid)
            for kill in (os.killpg, os.kill):
                try:
                    kill(daemon_pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for pid in leftovers:
            say(f"{self.label}: pid {pid} outlived `kill` by 5 s: sending SIGKILL")
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.used = False


def corral_ls(out: str, label: str) -> list[dict]:
    """The rows `corral ls --json` printed."""
    try:
        return json.loads(out)
    except json.JSONDecodeError as e:
        raise Broken(f"{label}: `corral ls --json` printed something else than JSON: "
                     f"{out[:300]!r}") from e


def pm2_jlist(out: str, label: str) -> list[dict]:
    """The list `pm2 jlist` printed: its last line that parses as a JSON list."""
    for line in reversed(out.splitlines()):
        if line.startswith("["):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise Broken(f"{label}: `pm2 jlist` printed no JSON list: {out[:300]!r}")


# Daemon log lines a healthy run of cluster.py or node_cluster.py writes; every other line is
# reported. The first two count the reloads and the drained workers.
EXPECTED_LOG = [re.compile(p) for p in (
    r"reloading app 'hello': \d+ instance\(s\), one at a time$",
    r"draining pid \d+ of instance \d+ exited with code 0$",
    r"app 'hello' listens on ",
    r"^corral daemon \S+ \(pid \d+\) listening on ",
    r"^starting app 'hello': \d+ instance\(s\) of ",
    r"^daemon exits$",
    r"stopping every app before exiting$",
)]


class CorralHome(DaemonHome):
    """A corral daemon whose one app is `hello` (cluster.py, node_cluster.py)."""

    home_var = "CORRAL_HOME"

    def instances(self) -> list[dict]:
        """hello's rows of `corral ls --json`."""
        return [r for r in corral_ls(self.cli("ls", "--json").stdout, self.label)
                if r.get("app") == "hello"]

    def daemon_log(self) -> list[str]:
        """The lines of the daemon's own log (none when there is no log yet)."""
        try:
            return (self.home / "daemon.log").read_text(errors="replace").splitlines()
        except OSError:
            return []

    def unexpected_log(self) -> list[str]:
        """The daemon's log lines that match none of EXPECTED_LOG."""
        out = []
        for line in self.daemon_log():
            text = line.split(" ", 1)[1] if re.match(r"^\d{4}-\d\d-\d\dT\S+ ", line) else line
            if not any(p.search(text) for p in EXPECTED_LOG):
                out.append(line)
        return out


def say_daemon_logs(setups: list) -> None:
    """After an error: the last lines of the log of every corral daemon that ran."""
    for s in setups:
        if isinstance(s, CorralHome) and s.used:
            tail = s.daemon_log()[-20:]
            if tail:
                say(f"{s.label}: last lines of {s.home / 'daemon.log'}:\n  " + "\n  ".join(tail))


def clean_up(setups: list, work: Path, keep: bool) -> None:
    """The end of every run, whatever happened: each setup's shutdown() (its daemon's `kill`),
    SIGKILL to every process group started here, and the temporary directory removed unless
    `keep`."""
    for s in setups:
        s.shutdown()
    CHILDREN.end_all()
    if keep:
        say(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------- getting the programs


def cargo_build(args: list[str], wanted: dict[str, str], no_cargo: str) -> dict[str, Path]:
    """`cargo <args>` in the repository; the executables it built, by target name, for each
    `name: kind` of `wanted` (kind: bin or example). `no_cargo` says what to do without cargo."""
    cargo = shutil.which("cargo")
    if not cargo:
        raise Broken(f"cargo not found: {no_cargo}")
    try:
        done = subprocess.run([cargo, *args, "--message-format=json-render-diagnostics"],
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
        name = target.get("name")
        if (msg.get("reason") == "compiler-artifact" and msg.get("executable")
                and name in wanted and wanted[name] in target.get("kind", [])):
            found[name] = Path(msg["executable"])
    for name in wanted:
        if name not in found or not found[name].is_file():
            raise Broken(f"cargo build did not report a {name} executable")
    return found


def build_corral(no_cargo: str) -> Path:
    """target/release/corral, from `cargo build --release -p corral`."""
    say("building corral: cargo build --release -p corral")
    return cargo_build(["build", "--release", "-p", "corral"], {"corral": "bin"},
                       no_cargo)["corral"]


def install_pm2(prefix: Path, spec: str) -> Path:
    """PM2 from `npm install --prefix <prefix>` (bench/.deps by default, shared by the scripts),
    installed the first time only. Nothing is installed globally."""
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
    """The version in the package.json of the PM2 that `binary` belongs to."""
    package = binary.resolve().parent.parent / "package.json"
    try:
        return json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def node_version(env: dict) -> str:
    """`node --version`, `unknown` when it fails."""
    try:
        return run(["node", "--version"], env, timeout=30).stdout.strip()
    except (Broken, OSError):
        return "unknown"


# ---------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def read_text(path: str) -> str:
    """A small file's stripped content (a sysctl under /proc/sys), `?` when unreadable."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "?"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, as the report shows them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_info() -> dict:
    """What every report says about the machine: date, CPUs, kernel, load average."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "load": load_average(),
    }


def machine_line(machine: dict) -> str:
    """The report's `- Machine:` line for the wrk benchmarks (load at the start and the end)."""
    return (f"- Machine: {machine['nproc']} CPU(s) ({machine['cpu']}), Linux "
            f"{machine['kernel']}, load average {machine['load']} at the start, "
            f"{machine['load_end']} at the end, net.ipv4.tcp_tw_reuse={machine['tw_reuse']}")


# ---------------------------------------------------------------- statistics and formatting


def fmt(value: float | None, digits: int = 0) -> str:
    """A number with thousands separators, `n/a` for None and NaN."""
    if value is None or value != value:  # None or NaN
        return "n/a"
    return f"{value:,.{digits}f}"


def times(value: float | None, base: float | None) -> str:
    """value ÷ base as `1.23×`, `n/a` when either is missing or zero."""
    if not value or not base or value != value or base != base:
        return "n/a"
    return f"{value / base:.2f}×"


def verdict(ok: bool) -> str:
    """A target's outcome in the report."""
    return "**met**" if ok else "**missed**"


def per_100k(ms: float, requests: int) -> float | None:
    """CPU milliseconds per 100k requests, None without requests."""
    return ms / requests * 100_000 if requests else None


def rps_summary(runs: list[dict]) -> dict:
    """The wrk runs of one cell: median requests/s, spread (half the range, in % of the
    median), failed requests, and each failing run's errors in words."""
    rps = [r["rps"] for r in runs]
    med = statistics.median(rps)
    return {
        "median": med,
        "spread": (max(rps) - min(rps)) / 2 / med * 100 if med else 0.0,
        "failed": sum(r["failed"] for r in runs),
        "errors": [describe_errors(r) for r in runs if r["failed"]],
    }


def rps_cell(cell: dict, runs: int) -> str:
    """A requests/s cell of the table, from rps_summary()."""
    text = fmt(cell["median"])
    if runs > 1:
        text += f" ±{cell['spread']:.0f}%"
    if cell["failed"]:
        text += f" ⚠ {cell['failed']:,} failed"
    return text


def others_line(res: dict, setups: list) -> str:
    """The report's line on the CPU other programs took during the throughput runs."""
    pcts = [r["others_cpu_pct"] for s in setups for kind in ("close", "keepalive")
            for r in res[s.key][kind]]
    busy = [p for p in pcts if p >= 10]
    line = (f"- CPU taken by other programs on the machine during the {len(pcts)} wrk runs: "
            f"mean {statistics.mean(pcts):.0f}%, max {max(pcts):.0f}% of one core")
    if busy:
        line += (f" — **{len(busy)} run(s) shared the CPUs with other work (≥ 10%): the "
                 f"numbers are unreliable**")
    return line


def publish(text: str, output: Path | None, json_path: Path | None, raw: dict) -> None:
    """Prints the report; also writes it to `output`, and `raw` as JSON to `json_path`."""
    print(text, flush=True)
    if output:
        output.write_text(text)
    if json_path:
        json_path.write_text(json.dumps(raw, indent=2, default=str))


# ---------------------------------------------------------------- options


def add_wrk_options(ap) -> None:
    """--connections, --duration and --runs (cluster.py, node_cluster.py); see wrk_defaults()."""
    ap.add_argument("--connections", type=int, default=16, help="wrk -c (default 16)")
    ap.add_argument("--duration", type=int, help="seconds per wrk run (default 5; quick: 2)")
    ap.add_argument("--runs", type=int, help="wrk runs per cell, median reported "
                    "(default 3; quick: 1)")


def wrk_defaults(ap, cfg) -> None:
    """Fills in the wrk options' defaults (quick or not) and checks them."""
    cfg.duration = cfg.duration or (2 if cfg.quick else 5)
    cfg.runs = cfg.runs or (1 if cfg.quick else 3)
    cfg.warmup = 1
    cfg.wrk_timeout = 2
    if cfg.connections < 1 or cfg.duration < 1 or cfg.runs < 1:
        ap.error("--connections, --duration and --runs must be positive")


def add_pm2_options(ap) -> None:
    """--pm2, --deps and --pm2-spec: which PM2 to use, or where to install it (install_pm2())."""
    ap.add_argument("--pm2", type=Path, help="pm2 executable to use (default: install one)")
    ap.add_argument("--deps", type=Path, default=BENCH / ".deps",
                    help="npm prefix where PM2 is installed when missing (default: bench/.deps)")
    ap.add_argument("--pm2-spec", default="pm2",
                    help="npm package spec to install (default: pm2, e.g. pm2@6)")


def add_output_options(ap) -> None:
    """--output and --json (see publish())."""
    ap.add_argument("--output", type=Path, help="also write the Markdown report here")
    ap.add_argument("--json", type=Path, help="write every raw sample here as JSON")
