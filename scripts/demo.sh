#!/usr/bin/env bash
# Builds corral and runs a small demo in a throw-away CORRAL_HOME: two instances of an HTTP app,
# a crash and its restart, the logs, and a clean shutdown. Leaves nothing running.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p corral
corral=$PWD/target/release/corral
export CORRAL_HOME
CORRAL_HOME=$(mktemp -d)/corral
trap '"$corral" kill >/dev/null 2>&1 || true; rm -rf "$(dirname "$CORRAL_HOME")"' EXIT

# Two consecutive free loopback ports, chosen by the kernel.
base=$(python3 - <<'PY'
import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); port = a.getsockname()[1]
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", port + 1)); print(port); break
    except OSError:
        pass
    finally:
        a.close(); b.close()
PY
)

say() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }
answer() { # waits (bounded) until 127.0.0.1:$1 answers, then prints the answer
  for _ in $(seq 1 200); do
    if out=$(python3 -c "import urllib.request,sys; print(urllib.request.urlopen('http://127.0.0.1:$1/', timeout=1).read().decode(), end='')" 2>/dev/null); then
      printf '%s\n' "$out"; return 0
    fi
    python3 -c "import time; time.sleep(0.05)"
  done
  echo "127.0.0.1:$1 did not answer" >&2; return 1
}

say corral start examples/hello/server.js --name hello -i 2 --env PORT_BASE="$base"
"$corral" start examples/hello/server.js --name hello -i 2 --env PORT_BASE="$base"
answer "$base"; answer $((base + 1))

say corral ls
"$corral" ls

pid=$("$corral" ls --json | python3 -c "import json,sys; print(json.load(sys.stdin)[0]['pid'])")
say kill -9 "$pid"   "(instance 0 crashes; corral restarts it)"
kill -9 "$pid"
answer "$base"
"$corral" ls

say corral logs hello --lines 5
"$corral" logs hello --lines 5

say corral kill
"$corral" kill
