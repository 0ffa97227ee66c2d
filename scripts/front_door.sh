#!/usr/bin/env bash
# Replays what an unauthenticated stranger tried against the front door, against a release build, and
# prints one line per attack with what came back. Run it on two builds to compare them.
#
#   bash scripts/front_door.sh                       # builds target/release/catraca
#   CATRACA_BIN=/path/to/catraca bash scripts/front_door.sh
#
# Attacks: (1) 64 connections for 5 s with a real key id and random secrets; (2) 10 s of random
# well-formed keys; (3) 200 slow or silent connections, and a legitimate client's latency meanwhile;
# (4) a shared limiter that accepts connections and never answers; (5) duplicate JSON keys, wrong media
# types and a path with invalid UTF-8. Needs python3 and curl.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi
BIN=$CATRACA_BIN
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  # Gateways are started in subshells, so their pids are kept in files.
  for f in "$WORK"/*/pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  sleep 0.5
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start NAME [VAR=VALUE...]: a gateway with its own database; prints its port and pid.
start() {
  local name=$1; shift
  local port; port=$(free_port)
  mkdir -p "$WORK/$name"
  env CATRACA_LISTEN="127.0.0.1:$port" CATRACA_DATABASE_URL="sqlite://$WORK/$name/catraca.db" \
    CATRACA_AUDIT_DIR="$WORK/$name/audit" CATRACA_MODE=staging CATRACA_INSTANCE_ID="$name" CATRACA_LOG=error \
    CATRACA_POLICIES_DIR="$ROOT/policies" CATRACA_EXECUTORS_DIR="$ROOT/executors" "$@" \
    sh -c '"$0" migrate >/dev/null 2>&1 && "$0" keys create --name probe --role admin --tier "$1" --json' "$BIN" "${TIER:-unlimited}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])' >"$WORK/$name/key"
  env CATRACA_LISTEN="127.0.0.1:$port" CATRACA_DATABASE_URL="sqlite://$WORK/$name/catraca.db" \
    CATRACA_AUDIT_DIR="$WORK/$name/audit" CATRACA_MODE=staging CATRACA_INSTANCE_ID="$name" CATRACA_LOG=error \
    CATRACA_POLICIES_DIR="$ROOT/policies" CATRACA_EXECUTORS_DIR="$ROOT/executors" "$@" \
    "$BIN" serve 2>"$WORK/$name/server.log" &
  echo $! >"$WORK/$name/pid"
  for _ in $(seq 1 100); do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/health" 2>/dev/null && break
    sleep 0.1
  done
  echo "$port $!"
}

read -r PORT PID < <(start main)
SILENT=$(free_port)
python3 -c '
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(1024); held = []
while True:
    held.append(s.accept()[0])
' "$SILENT" &
PIDS+=($!)
# A limited tier: an unlimited key never asks the limiter.
read -r RPORT RPID < <(TIER=standard start redis CATRACA_REDIS_URL="redis://127.0.0.1:$SILENT")

python3 - "$PORT" "$PID" "$WORK/main" "$RPORT" "$(cat "$WORK/redis/key")" "$(cat "$WORK/main/key")" <<'PY'
import http.client, os, random, socket, statistics, sys, threading, time

port, pid, data, rport, rkey, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
key_id = key.split("_")[1]
echo = '{"action":"echo","context_id":"work","payload":{"message":"probe"}}'

def rss_mb():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

def storage_mb():
    total = 0
    for root, _, files in os.walk(data):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6

def flood(n_conns, seconds, make_key, p=port):
    counts, lock, end = {}, threading.Lock(), time.monotonic() + seconds
    def worker():
        conn = http.client.HTTPConnection("127.0.0.1", p, timeout=30)
        while time.monotonic() < end:
            try:
                conn.request("POST", "/process", echo, {"Content-Type": "application/json", "X-API-Key": make_key()})
                r = conn.getresponse(); r.read(); s = r.status
            except Exception:
                conn.close(); conn = http.client.HTTPConnection("127.0.0.1", p, timeout=30); s = "error"
            with lock:
                counts[s] = counts.get(s, 0) + 1
    ts = [threading.Thread(target=worker) for _ in range(n_conns)]
    for t in ts: t.start()
    peak = 0
    while any(t.is_alive() for t in ts):
        peak = max(peak, rss_mb()); time.sleep(0.1)
    return counts, peak

print(f"idle RSS {rss_mb():.1f} MB")
# (1) real key id, random secrets
counts, peak = flood(64, 5, lambda: "ck_%s_%064x" % (key_id, random.getrandbits(256)))
time.sleep(5)
print(f"(1) key-id flood 64 conns 5 s: {counts}; peak RSS {peak:.1f} MB, 5 s later {rss_mb():.1f} MB "
      f"(401s = argon2 runs: {counts.get(401, 0)})")
# (2) random well-formed keys
before = storage_mb()
counts, peak = flood(16, 10, lambda: "ck_%016x_%064x" % (random.getrandbits(64), random.getrandbits(256)))
time.sleep(11)  # one throttle summary interval
print(f"(2) random keys 16 conns 10 s: {counts}; audit storage +{storage_mb() - before:.2f} MB")
# (3) slow and silent connections, a legitimate client meanwhile
socks = []
for i in range(200):
    s = socket.create_connection(("127.0.0.1", port)); socks.append(s)
stop = time.monotonic() + 25
def dribble():
    n = 0
    while time.monotonic() < stop:
        for s in socks[:100]:
            try: s.send(b"GET /health HTTP/1.1\r\nX: "[n % 20:n % 20 + 1] or b"a")
            except OSError: pass
        n += 1; time.sleep(1)
threading.Thread(target=dribble, daemon=True).start()
lat = []
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
while time.monotonic() < stop:
    t0 = time.monotonic()
    try:
        conn.request("GET", "/health"); r = conn.getresponse(); r.read(); lat.append(time.monotonic() - t0)
    except Exception:
        conn.close(); conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30); lat.append(float("inf"))
    time.sleep(0.2)
open_after = 0
for s in socks:
    s.setblocking(False)
    try:
        open_after += s.recv(4096, socket.MSG_PEEK) != b""
    except BlockingIOError:
        open_after += 1
    except OSError:
        pass
lat.sort()
print(f"(3) 200 slow/silent connections: {open_after} still open after 25 s; legitimate /health p50 "
      f"{lat[len(lat)//2]*1000:.1f} ms, max {lat[-1]*1000:.1f} ms over {len(lat)} requests")
for s in socks: s.close()
# (4) a limiter that never answers
times, codes = [], {}
c = http.client.HTTPConnection("127.0.0.1", rport, timeout=30)
for _ in range(22):
    t0 = time.monotonic()
    c.request("POST", "/process", echo, {"Content-Type": "application/json", "X-API-Key": rkey})
    r = c.getresponse(); r.read(); times.append(time.monotonic() - t0); codes[r.status] = codes.get(r.status, 0) + 1
c.request("GET", "/ready"); r = c.getresponse(); ready = (r.status, r.read().decode()[:160])
print(f"(4) hanging Redis: {codes}; request 3..22 mean {statistics.mean(times[2:])*1000:.1f} ms, "
      f"max {max(times[2:])*1000:.1f} ms; /ready {ready}")
# (5) input
def raw(body, ctype, path="/process"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = {"X-API-Key": key}
    if ctype: h["Content-Type"] = ctype
    c.request("POST", path, body, h); r = c.getresponse()
    return r.status, r.getheader("content-type"), r.read()[:100]
print("(5) duplicate action:", raw('{"action":"echo","action":"licitacoes.collect","context_id":"work","payload":{}}', "application/json"))
print("(5) text/plain:", raw(echo, "text/plain")[:2], " image/png:", raw(echo, "image/png")[:2])
s = socket.create_connection(("127.0.0.1", port)); s.send(b"GET /v1/audit/traces/%FF%FE HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
resp = s.recv(4096).decode("latin1"); s.close()
print("(5) invalid UTF-8 path:", resp.split("\r\n")[0], "|", next((l for l in resp.split("\r\n") if l.lower().startswith("content-type")), "no content-type"))
PY
