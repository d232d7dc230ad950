#!/usr/bin/env python3
"""What corral's lifecycle policies cost and how fast they act, beside PM2 where PM2 has them.

1. Idle cost: 100 sleeping instances (10 apps x 10), each app with a memory limit and a cron
   schedule that does not fire during the run, one app watching a generated tree of 50,000
   files; the daemon's CPU and RSS over an idle minute. PM2 does the same from an ecosystem file.
2. File change -> reload start: a file under a watched directory is rewritten; the time until
   the first `watch` event of `corral events -f --json`, until the old process is gone and until
   the new one has started. PM2: the last two.
3. Health check fails -> a new process serving: a Python HTTP server that answers its pid starts
   failing its /health on request; the time until a new pid answers, in pieces. PM2 has no
   health checks.

Each part runs in a fresh temporary CORRAL_HOME (PM2_HOME), one daemon at a time, loopback only.
See bench/README.md. Python 3 standard library only (and bench/benchlib.py).

Exit status: 0 when every measurement ran (whether or not a target is met), 1 when something
broke, 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchlib.py, wherever the script is run from

from benchlib import (CHILDREN, CLI_TIMEOUT, Broken, DaemonHome, add_output_options,  # noqa: E402
                      add_pm2_options, alive, bounded, build_corral, clean_env, clean_up,
                      corral_ls, cpu_ms, exit_on_signals, free_port, http_get, install_pm2,
                      load_average, machine_info, pm2_jlist, pm2_version, publish, run, say,
                      times, verdict)
from benchlib import fmt as fmt_digits  # noqa: E402

ONLINE_TIMEOUT = 60.0  # seconds 100 instances may take to be online
EVENT_TIMEOUT = 15.0  # seconds a policy may take to act
SETTLE = 1.5  # seconds a new process runs before the next trial (past the 1 s min_uptime)

# A sleeper: writes its pid to $PIDFILE when set (atomically), then becomes `sleep`.
SLEEPER = """#!/bin/sh
if [ -n "$PIDFILE" ]; then echo $$ > "$PIDFILE.$$" && mv "$PIDFILE.$$" "$PIDFILE"; fi
exec sleep 86400
"""

# An HTTP server on 127.0.0.1:$PORT that answers its pid on every path but /health, which
# answers 503 while $FLAG_DIR/fail-<its pid> exists (so a new process is healthy), else 200.
# SO_REUSEPORT: the new process can bind while the old one is still there, whatever the order
# in which the manager starts and stops them.
HEALTH_SERVER = """import http.server, os, socket, socketserver
PORT = int(os.environ["PORT"])
FLAG = os.path.join(os.environ["FLAG_DIR"], "fail-%d" % os.getpid())
BODY = ("%d\\n" % os.getpid()).encode()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/health":
            code, body = (503, b"failing\\n") if os.path.exists(FLAG) else (200, b"ok\\n")
        else:
            code, body = 200, BODY
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.TCPServer):
    allow_reuse_address = True

    def server_bind(self):
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


print("serving on 127.0.0.1:%d as pid %d" % (PORT, os.getpid()), flush=True)
Server(("127.0.0.1", PORT), Handler).serve_forever()
"""


# ---------------------------------------------------------------- small helpers


def fmt(value: float | None, digits: int = 1) -> str:
    return fmt_digits(value, digits)


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def med_range(values: list[float], digits: int = 0) -> str:
    """`median (min–max)` of a list of ms, `n/a` when empty."""
    if not values:
        return "n/a"
    return (f"{fmt(statistics.median(values), digits)} ({fmt(min(values), digits)}–"
            f"{fmt(max(values), digits)})")


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    raise Broken(f"cannot read the RSS of pid {pid} (did the daemon die?)")


def threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def inotify_watches(pid: int) -> int:
    """Inotify watches the process holds: `inotify wd:` lines of its inotify fds' fdinfo."""
    count = 0
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return 0
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                count += sum(1 for line in f if line.startswith("inotify wd:"))
        except OSError:
            continue
    return count


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    return int(text) if text.strip().isdigit() and text.endswith("\n") else None


def bench_env() -> dict:
    return clean_env(names=("CORRAL_HOME", "PM2_HOME", "PORT", "PIDFILE", "FLAG_DIR"))


def write_file(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def make_tree(root: Path, dirs: int, files: int) -> int:
    """`dirs` directories of `files` empty files each under `root`; returns the file count."""
    for d in range(dirs):
        sub = root / f"d{d:03d}"
        sub.mkdir(parents=True)
        for n in range(files):
            (sub / f"f{n:03d}.txt").touch()
    return dirs * files


# ---------------------------------------------------------------- the two managers


class Corral(DaemonHome):
    label = "corral"
    home_var = "CORRAL_HOME"

    def daemon_pid(self) -> int:
        try:
            return int((self.home / "daemon.pid").read_text().strip())
        except (OSError, ValueError) as e:
            raise Broken(f"corral: no daemon pid in {self.home / 'daemon.pid'}") from e

    def rows(self) -> list[dict]:
        return corral_ls(self.cli("ls", "--json").stdout, self.label)

    def start(self, script: Path, name: str, *opts: str, env: dict | None = None) -> None:
        args = ["start", str(script), "--name", name]
        for k, v in (env or {}).items():
            args += ["--env", f"{k}={v}"]
        self.cli(*args, *opts)

    def version(self) -> str:
        return run(self.argv("--version"), self.env).stdout.strip()

    def log_tail(self, lines: int = 15) -> list[str]:
        try:
            return (self.home / "daemon.log").read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return []

    def shutdown(self) -> None:
        pid = None
        try:
            pid = self.daemon_pid()
        except Broken:
            pass
        self.stop(pid, timeout=CLI_TIMEOUT)


class Pm2(DaemonHome):
    label = "PM2"
    home_var = "PM2_HOME"

    def daemon_pid(self) -> int:
        try:
            return int((self.home / "pm2.pid").read_text().strip())
        except (OSError, ValueError) as e:
            raise Broken(f"PM2: no daemon pid in {self.home / 'pm2.pid'}") from e

    def rows(self) -> list[dict]:
        out = []
        for r in pm2_jlist(self.cli("jlist").stdout, self.label):
            env = r.get("pm2_env") or {}
            out.append({"app": r.get("name"), "pid": r.get("pid"), "status": env.get("status"),
                        "restarts": env.get("restart_time")})
        return out

    def shutdown(self) -> None:
        pid = None
        try:
            pid = self.daemon_pid()
        except Broken:
            pass
        self.stop(pid, timeout=CLI_TIMEOUT)


def wait_online(mgr, count: int, seconds: float = ONLINE_TIMEOUT, app: str | None = None,
                not_pids: set[int] = frozenset()) -> list[dict]:
    """Waits until `count` rows (of `app`, when given) are online with a pid not in
    `not_pids`."""
    rows: list[dict] = []
    for _ in bounded(seconds, 0.25):
        rows = [r for r in mgr.rows() if app is None or r.get("app") == app]
        ok = [r for r in rows if r.get("status") == "online" and r.get("pid")
              and r["pid"] not in not_pids]
        if len(ok) >= count:
            return ok
    states = {}
    for r in rows:
        states[r.get("status")] = states.get(r.get("status"), 0) + 1
    raise Broken(f"{mgr.label}: not {count} instances online within {seconds:.0f}s: {states}")


class Events:
    """`corral events -f --json` read by a thread: every event with the perf_counter and wall
    times of its arrival here."""

    def __init__(self, mgr: Corral) -> None:
        self.proc = CHILDREN.popen(mgr.argv("events", "--lines", "0", "-f", "--json"),
                                   env=mgr.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, bufsize=1)
        self.events: list[dict] = []
        self.bad: list[str] = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            arrived = time.perf_counter()
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                with self.cond:
                    self.bad.append(line.rstrip())
                continue
            ev["_arrived"] = arrived
            with self.cond:
                self.events.append(ev)
                self.cond.notify_all()
        with self.cond:
            self.cond.notify_all()

    def last_seq(self) -> int:
        with self.cond:
            return max((e.get("seq", 0) for e in self.events), default=0)

    def since(self, seq: int) -> list[dict]:
        with self.cond:
            return [e for e in self.events if e.get("seq", 0) > seq]

    def wait(self, pred, after_seq: int, seconds: float = EVENT_TIMEOUT) -> dict | None:
        """The first event after `after_seq` matching `pred`, waiting up to `seconds`."""
        end = time.monotonic() + seconds
        with self.cond:
            for _ in range(100_000):
                for e in self.events:
                    if e.get("seq", 0) > after_seq and pred(e):
                        return e
                left = end - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self.cond.wait(min(left, 0.5))
        return None

    def close(self) -> None:
        CHILDREN.end(self.proc)


# ---------------------------------------------------------------- 1. idle cost


def sample_idle(pid: int, seconds: float, label: str) -> dict:
    """The daemon's CPU (utime + stime) and RSS over `seconds`, sampled every second."""
    say(f"{label}: idle for {seconds:.0f}s, sampling daemon pid {pid}")
    t0 = time.monotonic()
    c0 = cpu_ms(pid)
    rss = [rss_kib(pid)]
    per_second = []
    last_t, last_c = t0, c0
    for _ in bounded(seconds + 5, 1.0):
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        c = cpu_ms(pid)
        if now - last_t >= 0.5:
            per_second.append((c - last_c) / (now - last_t) / 10.0)  # % of one core
            last_t, last_c = now, c
        rss.append(rss_kib(pid))
    t1 = time.monotonic()
    c1 = cpu_ms(pid)
    rss.append(rss_kib(pid))
    return {
        "seconds": t1 - t0,
        "cpu_ms": c1 - c0,
        "cpu_pct": (c1 - c0) / (t1 - t0) / 10.0,
        "cpu_pct_max_1s": max(per_second) if per_second else None,
        "rss_mib_mean": statistics.mean(rss) / 1024,
        "rss_mib_max": max(rss) / 1024,
        "rss_mib_end": rss[-1] / 1024,
        "threads": threads(pid),
        "inotify_watches": inotify_watches(pid),
    }


def idle_layout(cfg, work: Path) -> dict:
    """The apps of part 1 (shared by both managers): names, crons, the tree."""
    tree = work / "tree"
    if not tree.exists():
        say(f"making a tree of {cfg.dirs} x {cfg.files} files in {tree}")
        make_tree(tree, cfg.dirs, cfg.files)
    sleeper = work / "sleeper.sh"
    if not sleeper.exists():
        write_file(sleeper, SLEEPER, 0o755)
    # Minute n past 04:00 on February 29: next in 2028, far from any run.
    apps = [{"name": f"s{n}", "cron": f"{n} 4 29 2 *" if n < cfg.cron_apps else None,
             "watch": n == 0} for n in range(cfg.apps)]
    return {"tree": tree, "sleeper": sleeper, "apps": apps}


def idle_corral(cfg, binary: Path, work: Path) -> dict:
    lay = idle_layout(cfg, work)
    mgr = Corral(binary, work / "idle-corral-home", bench_env(), cwd=work)
    cfg.managers.append(mgr)
    mgr.cli("ping")
    for app in lay["apps"]:
        opts = ["-i", str(cfg.instances), "--interpreter", "none",
                "--max-memory-restart", "1G"]
        if app["cron"]:
            opts += ["--cron-restart", app["cron"]]
        if app["watch"]:
            opts += ["--watch", str(lay["tree"]), "--watch-delay", "500ms"]
        mgr.start(lay["sleeper"], app["name"], *opts)
    total = cfg.apps * cfg.instances
    t0 = time.monotonic()
    wait_online(mgr, total)
    say(f"corral: {total} instances online after {time.monotonic() - t0:.1f}s; settling "
        f"{cfg.settle:.0f}s")
    describe = mgr.cli("describe", "s0", check=False).stdout
    time.sleep(cfg.settle)
    pid = mgr.daemon_pid()
    res = sample_idle(pid, cfg.idle, "corral")
    rows = mgr.rows()
    res["online_after"] = sum(1 for r in rows if r.get("status") == "online")
    res["restarts_after"] = sum(r.get("restarts") or 0 for r in rows)
    res["describe_s0"] = describe
    mgr.shutdown()
    return res


def idle_pm2(cfg, binary: Path, work: Path) -> dict:
    lay = idle_layout(cfg, work)
    apps = []
    for app in lay["apps"]:
        a = {"name": app["name"], "script": str(lay["sleeper"]), "interpreter": "none",
             "exec_mode": "fork", "instances": cfg.instances, "max_memory_restart": "1G",
             "cwd": str(work), "autorestart": True}
        if app["cron"]:
            a["cron_restart"] = app["cron"]
        if app["watch"]:
            a["watch"] = [str(lay["tree"])]
            a["watch_delay"] = 500
        apps.append(a)
    eco = write_file(work / "idle.ecosystem.config.js",
                     "module.exports = " + json.dumps({"apps": apps}, indent=2) + ";\n")
    mgr = Pm2(binary, work / "idle-pm2-home", bench_env(), cwd=work)
    cfg.managers.append(mgr)
    mgr.cli("ping")
    mgr.cli("start", str(eco), timeout=120)
    total = cfg.apps * cfg.instances
    t0 = time.monotonic()
    wait_online(mgr, total)
    say(f"PM2: {total} instances online after {time.monotonic() - t0:.1f}s; settling "
        f"{cfg.settle:.0f}s")
    time.sleep(cfg.settle)
    pid = mgr.daemon_pid()
    res = sample_idle(pid, cfg.idle, "PM2")
    rows = mgr.rows()
    res["online_after"] = sum(1 for r in rows if r.get("status") == "online")
    res["restarts_after"] = sum(r.get("restarts") or 0 for r in rows)
    mgr.shutdown()
    return res


def report_idle(cfg, c: dict | None, p: dict | None, pm2_note: str | None) -> list[str]:
    total = cfg.apps * cfg.instances
    out = [f"### 1. Idle cost: {total} instances ({cfg.apps} apps × {cfg.instances}), "
           f"{cfg.idle:.0f}s idle", "",
           f"Every app `--max-memory-restart 1G`; {cfg.cron_apps} app(s) with a cron schedule "
           f"that does not fire (`N 4 29 2 *`); app s0 watches {cfg.dirs * cfg.files:,} files "
           f"in {cfg.dirs} directories (`--watch-delay 500ms`). Apps: `sleeper.sh` (`exec sleep`), "
           f"`--interpreter none`. PM2: the same from an ecosystem file (`interpreter: none`, "
           f"`exec_mode: fork`, `max_memory_restart`, `cron_restart`, `watch`, `watch_delay`). "
           f"Daemon only; settled {cfg.settle:.0f}s after all were online.", ""]
    if c is None:
        return out + ["corral: not measured (see the error above).", ""]
    pv = p or {}
    na = "n/a"

    def pget(key, digits=1):
        return fmt(pv.get(key), digits) if p else na

    out += ["| metric | corral | PM2 | PM2 ÷ corral | target |",
            "| --- | ---: | ---: | ---: | --- |"]
    out.append(f"| daemon CPU, % of one core (utime+stime ÷ wall) | {fmt(c['cpu_pct'], 2)} | "
               f"{pget('cpu_pct', 2)} | {times(pv.get('cpu_pct'), c['cpu_pct'])} | "
               f"< 1%: {verdict(c['cpu_pct'] < 1.0)} |")
    out.append(f"| daemon CPU, busiest second (%) | {fmt(c['cpu_pct_max_1s'], 1)} | "
               f"{pget('cpu_pct_max_1s')} | — | — |")
    out.append(f"| daemon CPU over the idle time (ms) | {fmt(c['cpu_ms'], 0)} | "
               f"{pget('cpu_ms', 0)} | {times(pv.get('cpu_ms'), c['cpu_ms'])} | — |")
    out.append(f"| daemon RSS, mean / max (MiB) | {fmt(c['rss_mib_mean'])} / "
               f"{fmt(c['rss_mib_max'])} | {pget('rss_mib_mean')} / {pget('rss_mib_max')} | "
               f"{times(pv.get('rss_mib_max'), c['rss_mib_max'])} | < 12 MB (11.4 MiB): "
               f"{verdict(c['rss_mib_max'] * 1048576 < 12e6)} |")
    out.append(f"| daemon threads | {c['threads']} | {pv.get('threads', na)} | — | — |")
    out.append(f"| daemon inotify watches | {c['inotify_watches']:,} | "
               f"{fmt(pv.get('inotify_watches'), 0) if p else na} | — | — |")
    p_end = f"{pv.get('online_after')} / {pv.get('restarts_after')}" if p else na
    out.append(f"| online at the end / restarts during the run | {c['online_after']} / "
               f"{c['restarts_after']} | {p_end} | — | {total} / 0 |")
    out.append("")
    if pm2_note:
        out += [f"PM2: {pm2_note}", ""]
    return out


# ---------------------------------------------------------------- 2. file change -> reload


def watch_trials(cfg, mgr, work: Path, label: str, events: Events | None,
                 wdir: Path, pidfile: Path) -> dict:
    """cfg.watch_runs rewrites of a file under `wdir`, each timed until the first `watch` event
    (corral), the old pid gone and the new pid written to `pidfile`."""
    res = {"event_ms": [], "event_daemon_ms": [], "gone_ms": [], "new_ms": [], "trials": []}
    for _ in bounded(ONLINE_TIMEOUT, 0.05):
        if read_pid(pidfile):
            break
    time.sleep(cfg.watch_settle)  # the watcher is set up (PM2's chokidar scans first)
    for n in range(cfg.watch_runs):
        old = read_pid(pidfile)
        if not old or not alive(old):
            raise Broken(f"{label}: no live watched process before trial {n + 1} ({old})")
        seq = events.last_seq() if events else 0
        target = wdir / f"f{n % 10}.txt"
        wall0 = time.time()
        t0 = time.perf_counter()
        with open(target, "a") as f:
            f.write(f"change {n}\n")
        gone = new = None
        for _ in bounded(EVENT_TIMEOUT, 0.001):
            now = time.perf_counter()
            if gone is None and not alive(old):
                gone = now
            pid = read_pid(pidfile)
            if new is None and pid and pid != old:
                new = now
            if gone is not None and new is not None:
                break
        trial = {"file": target.name, "old_pid": old}
        if events:
            ev = events.wait(lambda e: e.get("cause") == "watch", seq, 1.0 if gone else
                             EVENT_TIMEOUT)
            if ev:
                trial["event_ms"] = (ev["_arrived"] - t0) * 1000
                res["event_ms"].append(trial["event_ms"])
                res["event_daemon_ms"].append(ev["at_ms"] - wall0 * 1000)
            trial["events"] = [{k: v for k, v in e.items() if not k.startswith("_")}
                               for e in events.since(seq)]
        if gone is not None:
            res["gone_ms"].append((gone - t0) * 1000)
        if new is not None:
            res["new_ms"].append((new - t0) * 1000)
        trial.update(gone_ms=None if gone is None else (gone - t0) * 1000,
                     new_ms=None if new is None else (new - t0) * 1000)
        res["trials"].append(trial)
        say(f"{label}: trial {n + 1}/{cfg.watch_runs}: event {fmt(trial.get('event_ms'), 0)} ms, "
            f"old gone {fmt(trial['gone_ms'], 0)} ms, new started {fmt(trial['new_ms'], 0)} ms")
        if new is None:
            say(f"{label}: no new process within {EVENT_TIMEOUT:.0f}s; stopping the trials")
            break
        time.sleep(SETTLE)
        # the next trial starts once the new process is online
        wait_online(mgr, 1, 20, app="w")
    return res


def watch_corral(cfg, binary: Path, work: Path) -> dict:
    wdir = work / "watch-corral"
    wdir.mkdir()
    for n in range(10):
        (wdir / f"f{n}.txt").write_text("x\n")
    sleeper = write_file(work / "sleeper.sh", SLEEPER, 0o755)
    pidfile = work / "watch-corral.pid"
    mgr = Corral(binary, work / "watch-corral-home", bench_env(), cwd=work)
    cfg.managers.append(mgr)
    mgr.cli("ping")
    events = Events(mgr)
    try:
        mgr.start(sleeper, "w", "--interpreter", "none", "--watch", str(wdir),
                  "--watch-delay", f"{cfg.watch_delay}ms", env={"PIDFILE": str(pidfile)})
        if not events.wait(lambda e: e.get("app") == "w", 0, EVENT_TIMEOUT):
            raise Broken("corral: `corral events -f --json` printed no event for the start")
        wait_online(mgr, 1, 20, app="w")
        res = watch_trials(cfg, mgr, work, "corral", events, wdir, pidfile)
        res["bad_lines"] = events.bad
        res["restarts"] = sum(r.get("restarts") or 0 for r in mgr.rows())
    finally:
        events.close()
    mgr.shutdown()
    return res


def watch_pm2(cfg, binary: Path, work: Path) -> dict:
    wdir = work / "watch-pm2"
    wdir.mkdir()
    for n in range(10):
        (wdir / f"f{n}.txt").write_text("x\n")
    sleeper = write_file(work / "sleeper.sh", SLEEPER, 0o755)
    pidfile = work / "watch-pm2.pid"
    eco = write_file(work / "watch.ecosystem.config.js", "module.exports = " + json.dumps({
        "apps": [{"name": "w", "script": str(sleeper), "interpreter": "none",
                  "exec_mode": "fork", "cwd": str(work), "watch": [str(wdir)],
                  "watch_delay": cfg.watch_delay, "env": {"PIDFILE": str(pidfile)}}]},
        indent=2) + ";\n")
    mgr = Pm2(binary, work / "watch-pm2-home", bench_env(), cwd=work)
    cfg.managers.append(mgr)
    mgr.cli("ping")
    mgr.cli("start", str(eco))
    wait_online(mgr, 1, 20, app="w")
    res = watch_trials(cfg, mgr, work, "PM2", None, wdir, pidfile)
    res["restarts"] = sum(r.get("restarts") or 0 for r in mgr.rows())
    mgr.shutdown()
    return res


def report_watch(cfg, c: dict | None, p: dict | None, pm2_note: str | None) -> list[str]:
    out = [f"### 2. File change → reload start (`--watch DIR --watch-delay {cfg.watch_delay}ms`)",
           "",
           f"A file of a watched directory of 10 files is appended to; the times run from the "
           f"write. They include the {cfg.watch_delay} ms watch delay (quiet time after the last "
           f"change). Median (min–max) of {cfg.watch_runs} in ms; the app is a sleeper that "
           f"writes its pid to a file outside the watched directory, polled every ms, as is the "
           f"old pid's liveness.", ""]
    if c is None:
        return out + ["corral: not measured (see the error above).", ""]
    pv = p or {}
    out += ["| metric | corral | PM2 | PM2 ÷ corral |", "| --- | ---: | ---: | ---: |"]
    out.append(f"| write → first `watch` event, at `corral events -f --json` (ms) | "
               f"{med_range(c['event_ms'])} | no events stream | — |")
    out.append(f"| write → the event's `at_ms` (daemon clock, ms) | "
               f"{med_range(c['event_daemon_ms'])} | — | — |")
    out.append(f"| write → old process gone (ms) | {med_range(c['gone_ms'])} | "
               f"{med_range(pv.get('gone_ms', [])) if p else 'n/a'} | "
               f"{times(med(pv.get('gone_ms', [])), med(c['gone_ms']))} |")
    out.append(f"| write → new process started (ms) | {med_range(c['new_ms'])} | "
               f"{med_range(pv.get('new_ms', [])) if p else 'n/a'} | "
               f"{times(med(pv.get('new_ms', [])), med(c['new_ms']))} |")
    p_count = f"{len(pv.get('new_ms', []))} / {pv.get('restarts')}" if p else "n/a"
    out.append(f"| trials with a reload / restarts counted | {len(c['new_ms'])} / "
               f"{c['restarts']} | {p_count} | — |")
    out.append("")
    if pm2_note:
        out += [f"PM2: {pm2_note}", ""]
    return out


# ---------------------------------------------------------------- 3. health check


def health_corral(cfg, binary: Path, work: Path) -> dict:
    server = write_file(work / "health_server.py", HEALTH_SERVER)
    flags = work / "flags"
    flags.mkdir(exist_ok=True)
    port = free_port()
    mgr = Corral(binary, work / "health-corral-home", bench_env(), cwd=work)
    cfg.managers.append(mgr)
    mgr.cli("ping")
    events = Events(mgr)
    res = {"port": port, "detect_ms": [], "gone_ms": [], "spawn_ms": [], "serve_ms": [],
           "trials": []}

    def answer_pid() -> int | None:
        got = http_get(port, 0.2, b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        if not got or b" 200 " not in got[0].split(b"\r\n")[0] + b" ":
            return None
        return int(got[1]) if got[1].strip().isdigit() else None

    try:
        mgr.start(server, "web", "--health", f"http://127.0.0.1:{port}/health",
                  "--health-interval", "500ms", "--health-timeout", "200ms",
                  "--health-failures", "2", env={"PORT": str(port), "FLAG_DIR": str(flags)})
        wait_online(mgr, 1, 20, app="web")
        for _ in bounded(20, 0.01):
            if answer_pid():
                break
        time.sleep(SETTLE)
        for n in range(cfg.health_runs):
            old = answer_pid()
            if not old:
                raise Broken(f"corral: the health app does not answer before trial {n + 1}")
            # A random phase against the probe schedule: the trials start at a fixed time
            # after the previous restart, so without it every flag lands at the same point of
            # the 500 ms interval.
            phase = random.uniform(0, 0.5)
            time.sleep(phase)
            seq = events.last_seq()
            flag = flags / f"fail-{old}"
            wall0 = time.time()
            t0 = time.perf_counter()
            flag.touch()
            gone = serve = None
            new_pid = None
            for _ in bounded(EVENT_TIMEOUT + 10, 0.005):
                now = time.perf_counter()
                if gone is None and not alive(old):
                    gone = now
                pid = answer_pid()
                if pid and pid != old:
                    serve, new_pid = time.perf_counter(), pid
                    break
            trial = {"old_pid": old, "new_pid": new_pid, "phase_ms": phase * 1000}
            ev = events.wait(lambda e: e.get("cause") == "health", seq, 1.0)
            if ev:
                res["detect_ms"].append(ev["at_ms"] - wall0 * 1000)
            trial["events"] = [{k: v for k, v in e.items() if not k.startswith("_")}
                               for e in events.since(seq)]
            spawned = [e for e in events.since(seq) if e.get("to") == "starting"]
            if spawned:
                res["spawn_ms"].append(spawned[0]["at_ms"] - wall0 * 1000)
            if gone is not None:
                res["gone_ms"].append((gone - t0) * 1000)
            if serve is not None:
                res["serve_ms"].append((serve - t0) * 1000)
            trial.update(serve_ms=None if serve is None else (serve - t0) * 1000,
                         detect_ms=None if not ev else ev["at_ms"] - wall0 * 1000)
            res["trials"].append(trial)
            say(f"corral: health trial {n + 1}/{cfg.health_runs}: `health` event at "
                f"{fmt(trial['detect_ms'], 0)} ms, new pid {new_pid} serving at "
                f"{fmt(trial['serve_ms'], 0)} ms")
            try:
                flag.unlink()
            except OSError:
                pass
            if serve is None:
                say("corral: no new pid answered; stopping the trials")
                break
            wait_online(mgr, 1, 20, app="web", not_pids={old})
            time.sleep(SETTLE)
        res["restarts"] = sum(r.get("restarts") or 0 for r in mgr.rows())
        res["bad_lines"] = events.bad
    finally:
        events.close()
    mgr.shutdown()
    return res


def report_health(cfg, c: dict | None) -> list[str]:
    out = ["### 3. Health check fails → a new process serving", "",
           "A Python HTTP server (fork mode, 1 instance, binds 127.0.0.1:$PORT itself with "
           "SO_REUSEPORT, answers its pid) under `--health http://127.0.0.1:PORT/health "
           "--health-interval 500ms --health-timeout 200ms --health-failures 2`. The flag file "
           "`fail-<pid>` makes that pid's /health answer 503; times from creating it, in ms, "
           f"median (min–max) of {cfg.health_runs}. Serving is polled with a new connection "
           "every ~5 ms. Each flag comes after a random 0–500 ms wait, so that it falls "
           "anywhere in the probe interval. Expected detection: between interval × (failures − 1) "
           "= 500 and interval × failures = 1000 ms, by when the first failing probe falls. PM2 "
           "has no health checks (nothing to compare).", ""]
    if c is None:
        return out + ["corral: not measured (see the error above).", ""]
    pieces = []
    if c["detect_ms"] and c["serve_ms"]:
        pieces = [s - d for s, d in zip(c["serve_ms"], c["detect_ms"])]
    out += ["| piece | corral |", "| --- | ---: |"]
    out.append(f"| flag → `health` event (`at_ms`): detection | {med_range(c['detect_ms'])} |")
    out.append(f"| flag → a new process `starting` (`at_ms`) | {med_range(c['spawn_ms'])} |")
    out.append(f"| flag → old pid gone | {med_range(c['gone_ms'])} |")
    out.append(f"| flag → first answer from a new pid | {med_range(c['serve_ms'])} |")
    out.append(f"| `health` event → new pid answers: restart | {med_range(pieces)} |")
    out.append(f"| trials replaced / restarts counted | {len(c['serve_ms'])} of "
               f"{cfg.health_runs} / {c['restarts']} |")
    out.append("")
    return out


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="corral's lifecycle policies: idle cost, watch "
                                 "and health-check reaction times, beside PM2.")
    ap.add_argument("--corral", type=Path,
                    help="corral binary to use (default: build it with cargo build --release)")
    add_pm2_options(ap)
    ap.add_argument("--no-pm2", action="store_true", help="corral only")
    ap.add_argument("--only", default="idle,watch,health",
                    help="parts to run, comma-separated: idle, watch, health (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="15 s idle, 3 watch trials, 2 health trials")
    ap.add_argument("--idle", type=float, help="seconds of idle sampling (default 60)")
    ap.add_argument("--settle", type=float, default=5.0,
                    help="seconds between all online and the idle sampling (default 5)")
    ap.add_argument("--apps", type=int, default=10, help="apps in part 1 (default 10)")
    ap.add_argument("--instances", type=int, default=10,
                    help="instances per app in part 1 (default 10)")
    ap.add_argument("--cron-apps", type=int, default=10,
                    help="apps of part 1 with a cron schedule (default 10)")
    ap.add_argument("--dirs", type=int, default=500, help="directories of the watched tree")
    ap.add_argument("--files", type=int, default=100, help="files per directory")
    ap.add_argument("--watch-runs", type=int, help="file changes timed (default 10)")
    ap.add_argument("--watch-delay", type=int, default=100, help="ms (default 100)")
    ap.add_argument("--watch-settle", type=float, default=2.0,
                    help="seconds between the watched app online and the first change")
    ap.add_argument("--health-runs", type=int, help="health failures timed (default 5)")
    add_output_options(ap)
    ap.add_argument("--keep-temp", action="store_true", help="keep the homes and the tree")
    cfg = ap.parse_args(argv)
    cfg.parts = {p.strip() for p in cfg.only.split(",") if p.strip()}
    if not cfg.parts <= {"idle", "watch", "health"}:
        ap.error("--only takes idle, watch, health")
    cfg.idle = cfg.idle if cfg.idle is not None else (15.0 if cfg.quick else 60.0)
    cfg.watch_runs = cfg.watch_runs or (3 if cfg.quick else 10)
    cfg.health_runs = cfg.health_runs or (2 if cfg.quick else 5)
    if cfg.idle <= 0 or min(cfg.apps, cfg.instances, cfg.dirs, cfg.files, cfg.watch_runs,
                            cfg.health_runs) < 1 or not 0 <= cfg.cron_apps <= cfg.apps:
        ap.error("counts and --idle must be positive, --cron-apps at most --apps")
    cfg.managers = []
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    exit_on_signals()
    work = Path(tempfile.mkdtemp(prefix="corral-lifecycle-"))
    results: dict = {}
    errors: list[str] = []
    pm2_note = None
    try:
        binary = (cfg.corral.resolve() if cfg.corral
                  else build_corral("install Rust or pass --corral <path>"))
        if not binary.is_file():
            raise Broken(f"no corral binary at {binary}")
        pm2_bin = None
        if cfg.no_pm2:
            pm2_note = "not run (`--no-pm2`)."
        elif "idle" in cfg.parts or "watch" in cfg.parts:
            try:
                found = (cfg.pm2.resolve() if cfg.pm2
                         else install_pm2(cfg.deps.resolve(), cfg.pm2_spec))
                if not found.is_file():
                    raise Broken(f"no pm2 executable at {found}")
                pm2_bin = found
            except Broken as e:
                pm2_note = f"not available: {e}"
                say(f"PM2 {pm2_note}")
        machine = machine_info()
        machine["corral"] = Corral(binary, work / "version-home", bench_env()).version()
        machine["pm2"] = pm2_version(pm2_bin) if pm2_bin else None
        say(f"machine: {machine}")

        parts = [("idle", "corral", idle_corral), ("idle", "PM2", idle_pm2),
                 ("watch", "corral", watch_corral), ("watch", "PM2", watch_pm2),
                 ("health", "corral", health_corral)]
        for part, who, fn in parts:
            if part not in cfg.parts or (who == "PM2" and pm2_bin is None):
                continue
            say(f"--- {part}: {who}")
            try:
                results[(part, who)] = fn(cfg, pm2_bin if who == "PM2" else binary, work)
            except (Broken, OSError) as e:
                errors.append(f"{part} ({who}): {e}")
                say(f"error in {part} ({who}): {e}")
                for m in cfg.managers:
                    if isinstance(m, Corral) and m.used:
                        tail = m.log_tail()
                        if tail:
                            say("daemon log:\n  " + "\n  ".join(tail))
                    m.shutdown()

        machine["load_end"] = load_average()
        lines = ["## corral lifecycle policies" + (" (quick run)" if cfg.quick else ""), "",
                 f"- Date: {machine['date']}",
                 f"- Machine: nproc {machine['nproc']} ({machine['cpu']}), Linux "
                 f"{machine['kernel']}, load average {machine['load']} at the start, "
                 f"{machine['load_end']} at the end",
                 f"- {machine['corral']}" + (f", PM2 {machine['pm2']}" if machine["pm2"] else ""),
                 f"- Command: `{' '.join(['python3', 'bench/lifecycle.py', *argv])}`", ""]
        if "idle" in cfg.parts:
            lines += report_idle(cfg, results.get(("idle", "corral")),
                                 results.get(("idle", "PM2")), pm2_note)
        if "watch" in cfg.parts:
            lines += report_watch(cfg, results.get(("watch", "corral")),
                                  results.get(("watch", "PM2")), pm2_note)
        if "health" in cfg.parts:
            lines += report_health(cfg, results.get(("health", "corral")))
        if errors:
            lines += ["Errors:", *[f"- {e}" for e in errors], ""]
        raw = {"machine": machine, "argv": argv,
               "results": {f"{part}/{who}": r for (part, who), r in results.items()},
               "errors": errors}
        publish("\n".join(lines), cfg.output, cfg.json, raw)
        return 1 if errors else 0
    except Broken as e:
        say(f"error: {e}")
        return 1
    finally:
        if any(m.used for m in cfg.managers) or CHILDREN.procs:
            say("cleaning up: stopping the daemons and every process started here")
        clean_up(cfg.managers, work, cfg.keep_temp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
