#!/usr/bin/env bash
# Builds corral and runs a demo cluster in a throw-away CORRAL_HOME: two Node.js workers behind
# one port that the master owns, a crash and its restart, a rolling reload under load, the logs,
# and a clean shutdown. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p corral
corral=$PWD/target/release/corral
export CORRAL_HOME
CORRAL_HOME=$(mktemp -d)/corral
trap '"$corral" kill >/dev/null 2>&1 || true; rm -rf "$(dirname "$CORRAL_HOME")"' EXIT

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

say corral start examples/hello/server.js --name hello -i 2 --listen 127.0.0.1:0
"$corral" start examples/hello/server.js --name hello -i 2 --listen 127.0.0.1:0
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
print(f"\n{url} is answered by both workers:")
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

say corral reload hello "   # while a client sends requests: one worker at a time, the new one up first"
python3 - "$address" "$corral" <<'PY'
import subprocess, sys, threading, time, urllib.request
url, corral = f"http://{sys.argv[1]}/", sys.argv[2]
done, ok, failed = threading.Event(), [0], [0]
def client():
    deadline = time.time() + 30
    while not done.is_set() and time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=5).read(); ok[0] += 1
        except OSError:
            failed[0] += 1
thread = threading.Thread(target=client); thread.start()
time.sleep(0.3)
subprocess.run([corral, "reload", "hello"], check=True, stdout=subprocess.DEVNULL)
time.sleep(0.3); done.set(); thread.join()
print(f"requests during the reload: {ok[0]} answered, {failed[0]} failed")
PY
"$corral" ls

say corral logs hello --lines 4
"$corral" logs hello --lines 4

say corral kill
"$corral" kill
