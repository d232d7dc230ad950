#!/usr/bin/env python3
"""Side-by-side benchmark of corral and PM2 running the same node app.

Measures daemon memory, `ls` latency, start-to-first-answer, restart after `kill -9`, and log
throughput under an output flood, then prints a Markdown table with the project's targets.
See bench/README.md. Python 3 standard library only (and bench/benchlib.py).

Exit status: 0 when every measurement ran (whether or not a target is met), 1 when something
broke (a daemon would not start, an app never answered, ...), 2 on bad options.
"""

from __future__ import annotations

import argparse
import os
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

from benchlib import (ANSWER_TIMEOUT, CHILDREN, CLI_TIMEOUT, Broken, DaemonHome,  # noqa: E402
                      add_output_options, add_pm2_options, bounded, build_corral, clean_env,
                      clean_up, corral_ls, exit_on_signals, free_port, hello_js_pid, install_pm2,
                      machine_info, node_version, pm2_jlist, pm2_version, publish, run, say,
                      verdict)
from benchlib import fmt as fmt_digits  # noqa: E402

APPS = HERE / "apps"
HELLO = APPS / "hello.js"
FLOOD = APPS / "flood.js"

LINE_BYTES = 100  # every line flood.js writes is exactly this long, newline included
FILLER = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" * 2)[:88]

FLOOD_TIMEOUT = 120.0  # seconds a flood may take to land in its log
STABLE_UPTIME = 1.6  # seconds an instance runs before it is killed (past a 1 s min_uptime)
PROBE_TIMEOUT = 0.25  # seconds one HTTP probe of an app may take


# ---------------------------------------------------------------- statistics and formatting


def percentile(values: list[float], p: float) -> float:
    """Linear interpolation between closest ranks (p in 0..100)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(samples: list[float]) -> dict:
    return {
        "median": statistics.median(samples) if samples else float("nan"),
        "p90": percentile(samples, 90),
        "min": min(samples) if samples else float("nan"),
        "max": max(samples) if samples else float("nan"),
        "n": len(samples),
        "samples": samples,
    }


def fmt(value: float) -> str:
    """Every number of this report has one decimal."""
    return fmt_digits(value, 1)


def ratio(pm2: float, corral: float) -> str:
    if not corral or corral != corral or pm2 != pm2:
        return "n/a"
    r = pm2 / corral
    return f"{r:,.1f}×" if r >= 1 else f"{r:,.2f}×"


# ---------------------------------------------------------------- network probes


def wait_answer(port: int, t0: float, seconds: float = ANSWER_TIMEOUT, not_pid: int | None = None,
                proc: subprocess.Popen | None = None) -> tuple[float, int]:
    """Polls until hello.js answers on `port` from a pid other than `not_pid`. Returns the seconds
    since `t0` and the answering pid."""
    for _ in bounded(seconds, 0.001):
        pid = hello_js_pid(port, PROBE_TIMEOUT)
        if pid is not None and (not_pid is None or pid != not_pid):
            return time.perf_counter() - t0, pid
        if proc is not None and proc.poll() not in (None, 0):
            raise Broken(f"{' '.join(map(str, proc.args))} exited with status {proc.returncode}")
    raise Broken(f"nothing answered on 127.0.0.1:{port} within {seconds:.0f}s")


# ---------------------------------------------------------------- processes


def rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    raise Broken(f"cannot read the RSS of pid {pid} (is the daemon running?)")


def bench_env() -> dict:
    """The environment without a home or a PORT of the caller's."""
    return clean_env(names=("CORRAL_HOME", "PM2_HOME", "PORT"))


# ---------------------------------------------------------------- the two process managers


class Manager(DaemonHome):
    """What the benchmark needs from a process manager, over its CLI."""

    no_restart_flags: list[str] = []

    def __init__(self, home: Path, binary: Path) -> None:
        super().__init__(binary, home, bench_env())

    def port_env(self, port: int | None) -> dict:
        """The CLI's environment, with PORT when `port` is set."""
        env = dict(self.env)
        if port is not None:
            env["PORT"] = str(port)
        return env

    def spawn_cli(self, *args: str, port: int | None = None) -> subprocess.Popen:
        """Starts a CLI command without waiting for it (to time what happens meanwhile)."""
        self.used = True
        return CHILDREN.popen(self.argv(*args), env=self.port_env(port), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              cwd=str(HERE))

    def start_args(self, name: str, script: Path, port: int | None, extra: list[str],
                   app_args: list[str]) -> list[str]:
        raise NotImplementedError

    def start(self, name: str, script: Path, port: int | None = None, extra: list[str] = (),
              app_args: list[str] = ()) -> None:
        self.cli(*self.start_args(name, script, port, list(extra), list(app_args)),
                 env=self.port_env(port))

    def spawn_start(self, name: str, script: Path, port: int | None = None,
                    extra: list[str] = (), app_args: list[str] = ()) -> subprocess.Popen:
        return self.spawn_cli(*self.start_args(name, script, port, list(extra), list(app_args)),
                              port=port)

    def ensure_daemon(self) -> None:
        self.cli("ping")

    def ls_argv(self) -> list[str]:
        return self.argv("ls")

    def instances(self) -> dict[str, dict]:
        """name -> {pid, status} for every app (one instance each here)."""
        raise NotImplementedError

    def delete(self, target: str) -> None:
        self.cli("delete", target)

    def pid_file(self) -> Path:
        raise NotImplementedError

    def daemon_pid(self) -> int:
        try:
            return int(self.pid_file().read_text().strip())
        except (OSError, ValueError) as e:
            raise Broken(f"{self.label}: cannot read the daemon pid from {self.pid_file()}") from e

    def out_log(self, name: str) -> Path:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Stops the daemon and its apps; never raises."""
        self.stop(None, timeout=CLI_TIMEOUT)


class Corral(Manager):
    label = "corral"
    home_var = "CORRAL_HOME"
    no_restart_flags = ["--no-autorestart", "--log-max-size", "0"]

    def start_args(self, name, script, port, extra, app_args):
        args = ["start", str(script), "--name", name]
        if port is not None:
            args += ["--env", f"PORT={port}"]
        args += extra
        if app_args:
            args += ["--", *app_args]
        return args

    def instances(self) -> dict[str, dict]:
        rows = corral_ls(self.cli("ls", "--json").stdout, self.label)
        return {r["app"]: {"pid": r.get("pid"), "status": r.get("status"),
                           "uptime_ms": r.get("uptime_ms")} for r in rows}

    def pid_file(self) -> Path:
        return self.home / "daemon.pid"

    def out_log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}-0-out.log"

    def version(self) -> str:
        return run(self.argv("--version"), self.env).stdout.strip()


class Pm2(Manager):
    label = "PM2"
    home_var = "PM2_HOME"
    no_restart_flags = ["--no-autorestart"]

    def start_args(self, name, script, port, extra, app_args):
        # PM2 hands the CLI's environment (PORT included) to the app.
        args = ["start", str(script), "--name", name, *extra]
        if app_args:
            args += ["--", *app_args]
        return args

    def instances(self) -> dict[str, dict]:
        rows = pm2_jlist(self.cli("jlist").stdout, self.label)
        now_ms = time.time() * 1000
        result = {}
        for r in rows:
            env = r.get("pm2_env") or {}
            up = env.get("pm_uptime")
            result[r.get("name")] = {"pid": r.get("pid"), "status": env.get("status"),
                                     "uptime_ms": now_ms - up if up else None}
        return result

    def pid_file(self) -> Path:
        return self.home / "pm2.pid"

    def out_log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}-out.log"


# ---------------------------------------------------------------- measurements


def time_cli(argv: list[str], env: dict, runs: int) -> list[float]:
    """Wall time in ms of whole CLI processes, after one unmeasured warm-up run."""
    run(argv, env, capture=False)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run(argv, env, capture=False)
        samples.append((time.perf_counter() - t0) * 1000)
    return samples


def wait_all_answer(ports: list[int], seconds: float = ANSWER_TIMEOUT) -> None:
    pending = set(ports)
    for _ in bounded(seconds, 0.02):
        pending = {p for p in pending if hello_js_pid(p, PROBE_TIMEOUT) is None}
        if not pending:
            return
    raise Broken(f"apps on ports {sorted(pending)} did not answer within {seconds:.0f}s")


def wait_stable(mgr: Manager, name: str, since: float) -> int:
    """Waits until `name` has run STABLE_UPTIME seconds (counted from `since`, when it first
    answered) and its manager calls it online. Returns its pid."""
    rest = since + STABLE_UPTIME - time.perf_counter()
    if rest > 0:
        time.sleep(rest)
    for _ in bounded(15, 0.1):
        info = mgr.instances().get(name)
        if info and info["status"] == "online" and info["pid"]:
            return int(info["pid"])
    raise Broken(f"{mgr.label}: '{name}' did not become online: {mgr.instances().get(name)}")


def measure_start_to_answer(mgr: Manager, runs: int) -> list[float]:
    samples = []
    for n in range(runs):
        name = f"s{n}"
        port = free_port()
        t0 = time.perf_counter()
        cli = mgr.spawn_start(name, HELLO, port)
        elapsed, _ = wait_answer(port, t0, proc=cli)
        try:
            _, err = cli.communicate(timeout=CLI_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise Broken(f"{mgr.label} start did not return") from e
        if cli.returncode != 0:
            raise Broken(f"{mgr.label} start exited with {cli.returncode}: {err.strip()}")
        samples.append(elapsed * 1000)
        mgr.delete(name)
    return samples


def measure_restart(mgr: Manager, runs: int) -> tuple[list[float], list[int]]:
    name = "r"
    port = free_port()
    mgr.start(name, HELLO, port)
    t0 = time.perf_counter()
    _, pid = wait_answer(port, t0)
    answered = time.perf_counter()
    samples, pids = [], [pid]
    for _ in range(runs):
        listed = wait_stable(mgr, name, answered)
        if listed != pid:
            raise Broken(f"{mgr.label} lists pid {listed} for '{name}' but pid {pid} answers")
        os.kill(pid, signal.SIGKILL)
        t0 = time.perf_counter()
        elapsed, pid = wait_answer(port, t0, not_pid=pid)
        answered = time.perf_counter()
        samples.append(elapsed * 1000)
        pids.append(pid)
    mgr.delete(name)
    return samples, pids


def node_start_baseline(runs: int) -> list[float]:
    """`node hello.js` started directly, to its first answer; the first run is a warm-up."""
    samples = []
    for _ in range(runs + 1):
        port = free_port()
        env = bench_env()
        env["PORT"] = str(port)
        t0 = time.perf_counter()
        proc = CHILDREN.popen(["node", str(HELLO)], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(HERE))
        try:
            elapsed, _ = wait_answer(port, t0, proc=proc)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        samples.append(elapsed * 1000)
    return samples[1:]


def check_lines(path: Path, total: int) -> dict:
    """Reads back a flood log: lines lost, duplicated, and garbled (not a flood.js line)."""
    seen = bytearray(total)
    garbled = duplicated = 0
    size = 0
    try:
        f = open(path, "rb")
    except OSError:
        return {"lost": total, "duplicated": 0, "garbled": 0, "bytes": 0}
    with f:
        for line in f:
            size += len(line)
            if (len(line) != LINE_BYTES or line[10:11] != b" " or not line[:10].isdigit()
                    or line[11:99] != FILLER or line[99:] != b"\n"):
                garbled += 1
                continue
            n = int(line[:10])
            if n >= total:
                garbled += 1
            elif seen[n]:
                duplicated += 1
            else:
                seen[n] = 1
    return {"lost": total - seen.count(1), "duplicated": duplicated, "garbled": garbled,
            "bytes": size}


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def flood_direct(lines: int, work: Path) -> dict:
    out = work / "direct-flood.log"
    env = bench_env()
    with open(out, "wb") as sink:
        t0 = time.perf_counter()
        proc = CHILDREN.popen(["node", str(FLOOD), str(lines)], env=env, stdin=subprocess.DEVNULL,
                              stdout=sink, stderr=subprocess.PIPE, cwd=str(HERE))
        try:
            _, err = proc.communicate(timeout=FLOOD_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise Broken(f"node flood.js > file took more than {FLOOD_TIMEOUT:.0f}s") from e
        elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise Broken(f"node flood.js exited with {proc.returncode}: {err.decode(errors='replace')}")
    result = check_lines(out, lines)
    out.unlink()
    result.update(seconds=elapsed, mb_per_s=lines * LINE_BYTES / 1e6 / elapsed, complete=True)
    return result


def flood_managed(mgr: Manager, lines: int, run_no: int) -> dict:
    """Starts flood.js under `mgr` (no autorestart) and waits until its log holds every byte, or
    the program is stopped and the log has not grown for a second, or FLOOD_TIMEOUT."""
    name = f"flood{run_no}"
    log = mgr.out_log(name)
    expected = lines * LINE_BYTES
    daemon = mgr.daemon_pid()
    peak = rss_mib(daemon)
    t0 = time.perf_counter()
    cli = mgr.spawn_start(name, FLOOD, extra=mgr.no_restart_flags, app_args=[str(lines)])
    done_at = None
    last_size, last_growth = -1, time.perf_counter()
    next_rss = next_status = t0
    stopped = False
    for _ in bounded(FLOOD_TIMEOUT, 0.005):
        size = file_size(log)
        now = time.perf_counter()
        if size >= expected:
            done_at = now
            break
        if size != last_size:
            last_size, last_growth = size, now
        if now >= next_rss:
            try:
                peak = max(peak, rss_mib(daemon))
            except Broken:
                pass
            next_rss = now + 0.1
        if cli.poll() is not None and cli.returncode != 0:
            raise Broken(f"{mgr.label} start of the flood exited with {cli.returncode}: "
                         f"{cli.stderr.read().strip()}")
        # Ask for the status only once output has paused: a `pm2 jlist` costs CPU the flood
        # would otherwise get.
        if now >= next_status and now - last_growth > 0.5 and cli.poll() is not None:
            info = mgr.instances().get(name) or {}
            stopped = info.get("status") in ("stopped", "errored", "exited")
            next_status = time.perf_counter() + 0.5
        if stopped and now - last_growth > 1.0:
            done_at = last_growth  # the program is gone and nothing more arrives
            break
    complete = done_at is not None and file_size(log) >= expected
    if done_at is None:
        done_at = time.perf_counter()
        say(f"{mgr.label}: the flood log holds {file_size(log):,} of {expected:,} bytes after "
            f"{FLOOD_TIMEOUT:.0f}s")
    elapsed = done_at - t0
    try:
        cli.communicate(timeout=CLI_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise Broken(f"{mgr.label} start of the flood did not return") from e
    try:
        peak = max(peak, rss_mib(daemon))
    except Broken:
        pass
    # Let the program finish before reading (with every byte in the log it is about to exit).
    for _ in bounded(30, 0.1):
        info = mgr.instances().get(name) or {}
        if info.get("status") in ("stopped", "errored", "exited"):
            break
    result = check_lines(log, lines)
    mgr.delete(name)
    try:
        log.unlink()
    except OSError:
        pass
    result.update(seconds=elapsed, complete=complete, peak_rss_mib=peak,
                  mb_per_s=result["bytes"] / 1e6 / elapsed if complete
                  else min(result["bytes"], expected) / 1e6 / elapsed)
    return result


def bench_manager(mgr: Manager, cfg: argparse.Namespace) -> dict:
    res: dict = {}
    say(f"{mgr.label}: starting the daemon")
    mgr.ensure_daemon()
    pid = mgr.daemon_pid()
    time.sleep(cfg.settle)
    res["rss_idle_mib"] = rss_mib(pid)
    say(f"{mgr.label}: daemon pid {pid}, idle RSS {res['rss_idle_mib']:.1f} MiB")

    say(f"{mgr.label}: `ls` x{cfg.ls_runs} with no app")
    res["ls_empty_ms"] = summary(time_cli(mgr.ls_argv(), mgr.env, cfg.ls_runs))

    say(f"{mgr.label}: starting 10 hello apps h0..h9")
    ports = []
    for n in range(10):
        port = free_port()
        ports.append(port)
        mgr.start(f"h{n}", HELLO, port)
    wait_all_answer(ports)
    time.sleep(cfg.settle)
    if mgr.daemon_pid() != pid:
        raise Broken(f"{mgr.label}: the daemon changed pid")
    res["rss_10_mib"] = rss_mib(pid)
    say(f"{mgr.label}: RSS with 10 apps {res['rss_10_mib']:.1f} MiB")
    say(f"{mgr.label}: `ls` x{cfg.ls_runs} with 10 apps")
    res["ls_10_ms"] = summary(time_cli(mgr.ls_argv(), mgr.env, cfg.ls_runs))
    mgr.delete("all")

    say(f"{mgr.label}: start -> first HTTP answer x{cfg.start_runs}")
    res["start_ms"] = summary(measure_start_to_answer(mgr, cfg.start_runs))

    say(f"{mgr.label}: kill -9 -> HTTP answer again x{cfg.restart_runs}")
    samples, pids = measure_restart(mgr, cfg.restart_runs)
    res["restart_ms"] = summary(samples)
    res["restart_pids"] = pids

    floods = []
    for n in range(cfg.flood_runs):
        say(f"{mgr.label}: log flood {n + 1}/{cfg.flood_runs} ({cfg.flood_lines:,} lines)")
        floods.append(flood_managed(mgr, cfg.flood_lines, n))
        f = floods[-1]
        say(f"{mgr.label}:   {f['mb_per_s']:.1f} MB/s, lost {f['lost']:,}, "
            f"dup {f['duplicated']:,}, garbled {f['garbled']:,}, "
            f"peak RSS {f['peak_rss_mib']:.1f} MiB")
    res["flood"] = floods
    say(f"{mgr.label}: stopping the daemon")
    mgr.shutdown()
    return res


# ---------------------------------------------------------------- report


def report(cfg, c: dict, p: dict, base: dict, machine: dict) -> str:
    rows = []

    def add(metric, cv, pv, r, target):
        rows.append(f"| {metric} | {cv} | {pv} | {r} | {target} |")

    for key, what in (("rss_idle_mib", "Daemon RSS, idle (MiB)"),
                      ("rss_10_mib", "Daemon RSS, 10 hello apps (MiB)")):
        ok = c[key] <= p[key] / 10
        add(what, fmt(c[key]), fmt(p[key]), ratio(p[key], c[key]),
            f"corral ≤ PM2 / 10: {verdict(ok)}")
    for key, what in (("ls_empty_ms", "`ls` wall time, no app (ms), median / p90"),
                      ("ls_10_ms", "`ls` wall time, 10 apps (ms), median / p90")):
        cm, pm = c[key]["median"], p[key]["median"]
        add(what, f"{fmt(cm)} / {fmt(c[key]['p90'])}", f"{fmt(pm)} / {fmt(p[key]['p90'])}",
            ratio(pm, cm), f"corral ≤ PM2 / 30: {verdict(cm <= pm / 30)}")
    node = base["node_start_ms"]["median"]
    add("`start` → app answers HTTP (ms), median / p90",
        f"{fmt(c['start_ms']['median'])} / {fmt(c['start_ms']['p90'])}",
        f"{fmt(p['start_ms']['median'])} / {fmt(p['start_ms']['p90'])}",
        ratio(p["start_ms"]["median"], c["start_ms"]["median"]),
        f"— (node alone: {fmt(node)})")
    cr = c["restart_ms"]["median"]
    add("`kill -9` → app answers again (ms), median / p90",
        f"{fmt(cr)} / {fmt(c['restart_ms']['p90'])}",
        f"{fmt(p['restart_ms']['median'])} / {fmt(p['restart_ms']['p90'])}",
        ratio(p["restart_ms"]["median"], cr),
        f"corral ≤ node start + 10 = {fmt(node + 10)}: {verdict(cr <= node + 10)}")
    direct = base["flood_direct"]
    direct_mbs = statistics.median(f["mb_per_s"] for f in direct)
    cmbs = statistics.median(f["mb_per_s"] for f in c["flood"])
    pmbs = statistics.median(f["mb_per_s"] for f in p["flood"])
    add(f"Log flood, {cfg.flood_lines:,} lines × {LINE_BYTES} B (MB/s), median of "
        f"{cfg.flood_runs}", fmt(cmbs), fmt(pmbs), ratio(pmbs, cmbs),
        f"corral ≥ 0.8 × direct = {fmt(0.8 * direct_mbs)}: {verdict(cmbs >= 0.8 * direct_mbs)}")
    clost = sum(f["lost"] for f in c["flood"])
    plost = sum(f["lost"] for f in p["flood"])
    cbad = sum(f["duplicated"] + f["garbled"] for f in c["flood"])
    pbad = sum(f["duplicated"] + f["garbled"] for f in p["flood"])
    total = cfg.flood_lines * cfg.flood_runs
    add(f"Log flood, lines lost (of {total:,}) / duplicated or garbled",
        f"{clost:,} / {cbad:,}", f"{plost:,} / {pbad:,}", "—",
        f"corral 0 lost: {verdict(clost == 0 and cbad == 0)}")
    cpeak = max(f["peak_rss_mib"] for f in c["flood"])
    ppeak = max(f["peak_rss_mib"] for f in p["flood"])
    add("Daemon peak RSS during the flood (MiB)", fmt(cpeak), fmt(ppeak), ratio(ppeak, cpeak),
        "—")

    lines = [
        f"## corral vs PM2 ({'quick' if cfg.quick else 'full'} run)",
        "",
        f"- Date: {machine['date']}",
        f"- Machine: {machine['nproc']} CPU(s) ({machine['cpu']}), Linux {machine['kernel']}, "
        f"{machine['mem_gib']:.0f} GiB RAM, load average {machine['load']} at the start",
        f"- node {machine['node']}, PM2 {machine['pm2']}, {machine['corral']}",
        "",
        "Ratio = PM2 ÷ corral (above 1: PM2 uses more memory or time; for MB/s, below 1 means "
        "corral is faster).",
        "",
        "| metric | corral | PM2 | ratio (PM2 ÷ corral) | target |",
        "| --- | ---: | ---: | ---: | --- |",
        *rows,
        "",
        "Baselines without a process manager:",
        f"- `node hello.js` to its first HTTP answer: median {fmt(node)} ms, "
        f"p90 {fmt(base['node_start_ms']['p90'])} ms ({base['node_start_ms']['n']} runs)",
        f"- `node flood.js > file`: median {fmt(direct_mbs)} MB/s "
        f"({len(direct)} run(s), lost {sum(f['lost'] for f in direct):,})",
        "",
        f"Repetitions: `ls` {cfg.ls_runs}, start {cfg.start_runs}, restart {cfg.restart_runs}, "
        f"flood {cfg.flood_runs}.",
    ]
    incomplete = [m for m, r in (("corral", c), ("PM2", p))
                  if any(not f["complete"] for f in r["flood"])]
    if incomplete:
        lines.append(f"Flood logs incomplete for: {', '.join(incomplete)} (MB/s counts the bytes "
                     f"that arrived).")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Benchmark corral against PM2 on the same node app.")
    ap.add_argument("--quick", action="store_true",
                    help="fewer repetitions and a smaller flood (about a minute)")
    ap.add_argument("--corral", type=Path,
                    help="corral binary to use (default: build it with cargo build --release)")
    add_pm2_options(ap)
    ap.add_argument("--flood-lines", type=int, help="lines per flood (default 2,000,000; "
                    "quick: 200,000)")
    add_output_options(ap)
    ap.add_argument("--keep-temp", action="store_true",
                    help="keep the temporary PM2_HOME and CORRAL_HOME directories")
    cfg = ap.parse_args(argv)
    if cfg.quick:
        cfg.ls_runs, cfg.start_runs, cfg.restart_runs, cfg.flood_runs = 10, 3, 3, 1
        cfg.settle = 1.0
        cfg.flood_lines = cfg.flood_lines or 200_000
    else:
        cfg.ls_runs, cfg.start_runs, cfg.restart_runs, cfg.flood_runs = 30, 5, 5, 3
        cfg.settle = 3.0
        cfg.flood_lines = cfg.flood_lines or 2_000_000
    if cfg.flood_lines <= 0:
        ap.error("--flood-lines must be positive")
    return cfg


def main(argv: list[str]) -> int:
    cfg = parse_args(argv)
    exit_on_signals()
    if not shutil.which("node"):
        say("node not found")
        return 1
    work = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    managers: list[Manager] = []
    try:
        corral_bin = (cfg.corral.resolve() if cfg.corral
                      else build_corral("install Rust or pass --corral <path>"))
        if not corral_bin.is_file():
            raise Broken(f"no corral binary at {corral_bin}")
        pm2_bin = cfg.pm2.resolve() if cfg.pm2 else install_pm2(cfg.deps.resolve(), cfg.pm2_spec)
        corral = Corral(work / "corral-home", corral_bin)
        pm2 = Pm2(work / "pm2-home", pm2_bin)
        managers = [corral, pm2]
        machine = {
            **machine_info(),
            "mem_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "node": node_version(bench_env()),
            "pm2": pm2_version(pm2_bin),
            "corral": corral.version(),
        }
        say(f"machine: {machine}")

        say("baseline: node hello.js run directly")
        base = {"node_start_ms": summary(node_start_baseline(cfg.start_runs))}
        base["flood_direct"] = []
        for n in range(cfg.flood_runs):
            say(f"baseline: node flood.js > file, {n + 1}/{cfg.flood_runs}")
            base["flood_direct"].append(flood_direct(cfg.flood_lines, work))
            say(f"baseline:   {base['flood_direct'][-1]['mb_per_s']:.1f} MB/s")

        results = {}
        for mgr in managers:  # one daemon at a time, so neither disturbs the other
            results[mgr.label] = bench_manager(mgr, cfg)

        publish(report(cfg, results["corral"], results["PM2"], base, machine), cfg.output,
                cfg.json, {"machine": machine, "baseline": base, "corral": results["corral"],
                           "pm2": results["PM2"]})
        return 0
    except Broken as e:
        say(f"error: {e}")
        return 1
    finally:
        if any(m.used for m in managers) or CHILDREN.procs:
            say("cleaning up: stopping the daemons and every process started here")
        clean_up(managers, work, cfg.keep_temp)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
