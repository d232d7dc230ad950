#!/usr/bin/env bash
# Builds corral and runs a demo cluster in a throw-away CORRAL_HOME: two workers (the Rust hello
# example, on corral-worker) behind one port that the master owns and hands connections from,
# round robin; a crash and its restart; a rolling reload under load, with new and with keep-alive
# connections; the logs; and a clean shutdown. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p corral -p corral-worker --features corral-worker/tokio --bins --examples
corral=$PWD/target/release/corral
export CORRAL_HOME
CORRAL_HOME=$(mktemp -d)/corral
trap '"$corral" kill >/dev/null 2>&1 || true; rm -rf "$(dirname "$CORRAL_HOME")"' EXIT

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

say corral start target/release/examples/hello --name hello -i 2 --listen 127.0.0.1:0
"$corral" start target/release/examples/hello --name hello -i 2 --listen 127.0.0.1:0
address=$("$corral" ls --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['listen'][0])")

python3 - "$address" <<'PY'
import sys, time, urllib.request
url = f"http://{sys.argv[1]}/"
seen, deadline = {}, time.time() + 10
while len(seen) < 2 and time.time() < deadline:
    try:
        text = urllib.request.urlopen(url, timeout=1).read().decode().strip()
        seen[text.split("(pid ")[1]] = text
    except OSError:
        time.sleep(0.05)
print(f"\n{url} is answered by both workers, in turn:")
for text in seen.values():
    print("  " + text)
PY

say corral ls
"$corral" ls

pid=$("$corral" ls --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['pid'])")
say kill -9 "$pid" "   # a worker crashes: the port stays open, corral starts a new worker"
kill -9 "$pid"
python3 -c "import time; time.sleep(0.3)"
"$corral" ls

say corral reload hello "   # while clients send requests: one worker at a time, the new one up first"
python3 - "$address" "$corral" <<'PY'
import http.client, subprocess, sys, threading, time
host, port = sys.argv[1].rsplit(":", 1)
corral = sys.argv[2]
done = threading.Event()
counts = {"new connections": [0, 0], "keep-alive": [0, 0]}
def client(kind):
    tally = counts[kind]
    conn = None
    deadline = time.time() + 30
    while not done.is_set() and time.time() < deadline:
        try:
            if conn is None or kind == "new connections":
                conn = http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("GET", "/", headers={} if kind == "keep-alive" else {"Connection": "close"})
            conn.getresponse().read()
            tally[0] += 1
        except (OSError, http.client.HTTPException):
            tally[1] += 1
            conn = None
threads = [threading.Thread(target=client, args=(kind,)) for kind in counts]
for thread in threads:
    thread.start()
time.sleep(0.3)
for _ in range(3):
    subprocess.run([corral, "reload", "hello"], check=True, stdout=subprocess.DEVNULL)
time.sleep(0.3)
done.set()
for thread in threads:
    thread.join()
for kind, (ok, failed) in counts.items():
    print(f"requests during 3 reloads, {kind}: {ok} answered, {failed} failed")
PY
"$corral" ls

say corral logs hello --lines 4
"$corral" logs hello --lines 4

say corral kill
"$corral" kill
