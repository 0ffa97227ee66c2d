#!/usr/bin/env bash
# Soak: mixed traffic against a release build for a fixed time, then three verdicts:
#   * memory flat: the peak RSS of the last window is within 10 % of the first window's peak
#     (windows are a minute each for the full run; a tenth of the run for short ones);
#   * no 5xx: not one response of the run was a server error;
#   * the trail intact: `catraca audit verify` passes after a clean stop.
# Traffic, all at once: allowed echo requests at a steady rate (each must get 200, though its address is
# throttled by the flood below), refused ones (unknown action, schema, action matrix, a repeated key), a flood of random well-formed keys from one address (throttled, so summarised), and
# slow clients (headers at a byte a second, silent sockets) that the header timeout must close.
#
#   bash scripts/soak.sh                  # 10 minutes
#   SOAK_SECONDS=90 bash scripts/soak.sh  # the short version CI runs
#   CATRACA_BIN=target/release/catraca    # reuse a built binary
#
# Needs python3 and curl. Prints one line per window and `SOAK PASSED` or `SOAK FAILED: <why>`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_TOTAL=${SOAK_SECONDS:-600}
ALLOWED_RPS=${SOAK_ALLOWED_RPS:-150}
REFUSED_RPS=${SOAK_REFUSED_RPS:-50}
SLOW_CLIENTS=${SOAK_SLOW_CLIENTS:-60}

cd "$ROOT"
if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi
BIN=$CATRACA_BIN

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  [ -n "${SOAK_KEEP:-}" ] && echo "soak: evidence kept in $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export CATRACA_LISTEN="127.0.0.1:$PORT"
export CATRACA_DATABASE_URL="sqlite://$WORK/catraca.db"
export CATRACA_AUDIT_DIR="$WORK/audit"
export CATRACA_MODE=staging
export CATRACA_INSTANCE_ID=soak
export CATRACA_LOG=warn
export CATRACA_POLICIES_DIR="$ROOT/policies"
export CATRACA_EXECUTORS_DIR="$ROOT/executors"
# Short HTTP timeouts so the slow clients are closed many times over during the run.
cat >"$WORK/catraca.toml" <<TOML
http_header_timeout_secs = 5
http_idle_timeout_secs = 15
TOML
export CATRACA_CONFIG="$WORK/catraca.toml"

"$BIN" migrate 2>/dev/null
key() { "$BIN" keys create --name "$1" --role "$2" --tier unlimited --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'; }
ADMIN=$(key soak-admin admin)
ANALYST=$(key soak-analyst analyst)
"$BIN" serve 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 100); do
  curl -fsS "http://$CATRACA_LISTEN/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://$CATRACA_LISTEN/ready" >/dev/null || { cat "$WORK/server.log" >&2; exit 1; }

set +e
python3 - "$PORT" "$SERVER_PID" "$SECONDS_TOTAL" "$ALLOWED_RPS" "$REFUSED_RPS" "$SLOW_CLIENTS" \
  "$ADMIN" "$ANALYST" <<'PY'
import collections, http.client, json, os, random, socket, sys, threading, time

port, pid, total = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
allowed_rps, refused_rps, slow_clients = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
admin, analyst = sys.argv[7], sys.argv[8]
deadline = time.monotonic() + total
statuses = collections.Counter()
lock = threading.Lock()
slow_closed = [0]

def count(kind, status):
    with lock:
        statuses[(kind, status)] += 1

def post(conn, key, body):
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    conn.request("POST", "/process", body, headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status

def paced(kind, rps, make):
    """Sends make() requests at about rps a second on keep-alive connections."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    gap, due = 1.0 / rps, time.monotonic()
    while time.monotonic() < deadline:
        key, body = make()
        try:
            count(kind, post(conn, key, body))
        except (OSError, http.client.HTTPException):
            count(kind, "connection error")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        due += gap
        time.sleep(max(0.0, due - time.monotonic()))

echo = json.dumps({"action": "echo", "context_id": "work", "payload": {"message": "soak"}})
refusals = [
    (admin, json.dumps({"action": "nope", "context_id": "work", "payload": {}})),
    (admin, json.dumps({"action": "echo", "context_id": "work", "payload": {"message": 42}})),
    (analyst, json.dumps({"action": "licitacoes.collect", "context_id": "work", "payload": {}})),
    (admin, '{"action":"echo","action":"echo","context_id":"work"}'),
]

def garbage():
    return "ck_%016x_%064x" % (random.getrandbits(64), random.getrandbits(256)), echo

def slow_client():
    """Headers at a byte a second, or nothing at all; counts how often the server hangs up."""
    request = b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 64 + b"\r\n\r\n"
    while time.monotonic() < deadline:
        s = socket.create_connection(("127.0.0.1", port))
        silent = random.random() < 0.5
        try:
            for b in ([] if silent else request):
                s.send(bytes([b]))
                time.sleep(1)
                if time.monotonic() > deadline:
                    break
            s.settimeout(max(1.0, deadline - time.monotonic()))
            if s.recv(1024) == b"":
                with lock:
                    slow_closed[0] += 1
        except OSError:
            with lock:
                slow_closed[0] += 1
        finally:
            s.close()

# Each legitimate key is used once before the flood starts, as a real client would have used its key
# before an attacker shared its address: a key this gateway has verified passes an address throttled by
# strangers, a key first seen from a throttled address does not (it could be one more guess).
# Both keys are verified at the same moment, so the argon2 pool holds its two buffers (the documented
# fixed bound: argon2_concurrency x 19 MiB) before the first window; otherwise the second buffer would
# appear whenever two cached keys first expire together (about 60 s in) and read as growth.
warm_statuses = []
def warm_up(key):
    warm = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    warm_statuses.append(post(warm, key, echo))
    warm.close()
warmers = [threading.Thread(target=warm_up, args=(key,)) for key in (admin, analyst)]
for t in warmers:
    t.start()
for t in warmers:
    t.join()
if warm_statuses != [200, 200]:
    print(f"SOAK FAILED: warm-up requests answered {warm_statuses}")
    sys.exit(1)

threads = [threading.Thread(target=paced, args=("allowed", allowed_rps / 2, lambda: (admin, echo))) for _ in range(2)]
threads.append(threading.Thread(target=paced, args=("refused", refused_rps, lambda: random.choice(refusals))))
threads.append(threading.Thread(target=paced, args=("garbage", 400, garbage)))
threads += [threading.Thread(target=slow_client) for _ in range(slow_clients)]
for t in threads:
    t.daemon = True
    t.start()

def rss_kb():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

window = 60 if total >= 600 else max(5, total // 10)
peaks, peak, started = [], 0, time.monotonic()
while time.monotonic() < deadline:
    time.sleep(1)
    peak = max(peak, rss_kb())
    if time.monotonic() - started >= window * (len(peaks) + 1):
        peaks.append(peak)
        with lock:
            seen = dict(statuses)
        print(f"soak: window {len(peaks):2d}  peak RSS {peak / 1024:6.1f} MB  responses {sum(seen.values())}  slow closed {slow_closed[0]}", flush=True)
        peak = 0
for t in threads[:4]:
    t.join(timeout=35)

by_status = collections.Counter()
for (kind, status), n in statuses.items():
    by_status[status] += n
print("soak: responses by kind and status:", json.dumps({f"{k}:{s}": n for (k, s), n in sorted(statuses.items(), key=str)}))
failures = []
if any(isinstance(s, int) and s >= 500 for s in by_status):
    failures.append(f"server errors: { {s: n for s, n in by_status.items() if isinstance(s, int) and s >= 500} }")
if by_status.get("connection error"):
    failures.append(f"{by_status['connection error']} connection errors on legitimate traffic")
wrong_allowed = {s: n for (k, s), n in statuses.items() if k == "allowed" and s != 200}
if wrong_allowed or statuses.get(("allowed", 200), 0) == 0:
    failures.append(f"allowed requests not answered 200: {wrong_allowed}")
wrong_refused = {s: n for (k, s), n in statuses.items() if k == "refused" and s not in (400, 403, 422)}
if wrong_refused:
    failures.append(f"refused requests answered other than 400/403/422: {wrong_refused}")
if statuses.get(("garbage", 429), 0) == 0:
    failures.append("the random-key flood never met 429")
if slow_clients and slow_closed[0] == 0:
    failures.append("no slow client was ever closed by the server")
if len(peaks) >= 2 and peaks[-1] > peaks[0] * 1.10:
    failures.append(f"memory grew: last window peak {peaks[-1] / 1024:.1f} MB > first {peaks[0] / 1024:.1f} MB + 10 %")
print(f"soak: first window peak {peaks[0] / 1024:.1f} MB, last {peaks[-1] / 1024:.1f} MB" if peaks else "soak: no full window")
if failures:
    print("SOAK FAILED: " + "; ".join(failures))
    sys.exit(1)
PY
TRAFFIC=$?
set -e
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""
DB_BYTES=$(du -cb "$WORK"/catraca.db* | tail -1 | cut -f1)
FILE_BYTES=$(du -sb "$WORK/audit" | cut -f1)
echo "soak: audit storage after the run: database $((DB_BYTES / 1024)) KiB, JSON Lines $((FILE_BYTES / 1024)) KiB"
if ! "$BIN" audit verify --quiet; then
  echo "SOAK FAILED: audit verify did not pass"
  exit 1
fi
[ "$TRAFFIC" -eq 0 ] || exit 1
echo "SOAK PASSED"
