#!/usr/bin/env bash
# A full disk under load, and the gateway recovering from it without a restart: the database and the
# JSON Lines trail live on a small filesystem of their own (a tmpfs mounted for the test, so it needs
# root); load runs throughout; a filler file takes every free byte, then is removed. Checks:
#   * while the disk is full, requests are refused 503 AUDIT_UNAVAILABLE (fail closed, nothing runs
#     unaudited), every one of them answered (no dropped connection, no other 5xx), `/ready` says 503
#     naming the audit, `/health` stays 200;
#   * after the filler is removed, allowed requests get 200 again and `/ready` 200, with no restart;
#   * after a clean stop, `catraca audit verify` passes and the JSON Lines files hold exactly the
#     database's events (the files caught up with what was committed while they could not be written).
# With stderr closed (the gateway's log going nowhere), the same holds: no logging failure drops a request.
#
#   sudo bash scripts/disk_full.sh
#   CATRACA_BIN=target/release/catraca bash scripts/disk_full.sh
#
# Prints what it saw and `DISK FULL TEST PASSED`, or `DISK FULL TEST FAILED: <why>`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MB=${DISK_FULL_SIZE_MB:-64}
cd "$ROOT"
if [ "$(id -u)" != 0 ]; then
  echo "disk full test: needs root to mount a small filesystem" >&2
  exit 2
fi
if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi
BIN=$CATRACA_BIN

WORK=$(mktemp -d)
DISK="$WORK/disk"
mkdir -p "$DISK"
mount -t tmpfs -o "size=${SIZE_MB}m" catraca-disk-full "$DISK"
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  umount "$DISK" 2>/dev/null || umount -l "$DISK" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export CATRACA_LISTEN="127.0.0.1:$PORT"
export CATRACA_DATABASE_URL="sqlite://$DISK/catraca.db"
export CATRACA_AUDIT_DIR="$DISK/audit"
export CATRACA_MODE=staging CATRACA_INSTANCE_ID=disk-full CATRACA_LOG=warn
export CATRACA_POLICIES_DIR="$ROOT/policies" CATRACA_EXECUTORS_DIR="$ROOT/executors"

"$BIN" migrate 2>/dev/null
KEY=$("$BIN" keys create --name disk-full --role admin --tier unlimited --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
# stderr closed: every line the gateway logs (and it logs each failed batch) fails to be written.
"$BIN" serve 2>&- &
SERVER_PID=$!
for _ in $(seq 1 100); do
  curl -fsS "http://$CATRACA_LISTEN/ready" >/dev/null 2>&1 && break
  sleep 0.1
done

set +e
python3 - "$PORT" "$KEY" "$DISK" <<'PY'
import collections, http.client, json, os, sys, threading, time

port, key, disk = int(sys.argv[1]), sys.argv[2], sys.argv[3]
body = json.dumps({"action": "echo", "context_id": "work", "payload": {"message": "disk"}})
phase = ["before"]
seen = collections.Counter()
errors = []
lock = threading.Lock()
stop = threading.Event()

def get(path):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", path)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data

def load():
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while not stop.is_set():
        try:
            conn.request("POST", "/process", body, {"Content-Type": "application/json", "X-API-Key": key})
            r = conn.getresponse()
            data = r.read()
            status = r.status
            code = None
            if status != 200:
                code = (json.loads(data).get("reason_codes") or ["?"])[0]
            with lock:
                seen[(phase[0], status, code)] += 1
        except (OSError, http.client.HTTPException, ValueError) as e:
            with lock:
                errors.append(f"{phase[0]}: {e!r}")
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        time.sleep(0.01)

threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
for t in threads:
    t.start()
time.sleep(2)

# Fill the disk: write until the filesystem refuses (requests may fail from the first filled byte on).
with lock:
    phase[0] = "full"
filler = os.path.join(disk, "filler")
with open(filler, "wb") as f:
    try:
        while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
    except OSError:
        pass
full_started = time.monotonic()
time.sleep(4)
ready_full, ready_body = get("/ready")
health_full, _ = get("/health")

os.remove(filler)
with lock:
    phase[0] = "freed"
freed_at = time.monotonic()
# Allowed again without a restart: the first 200 after freeing, within 30 s.
recovered = None
while time.monotonic() - freed_at < 30:
    with lock:
        if seen[("freed", 200, None)] > 0:
            recovered = time.monotonic() - freed_at
            break
    time.sleep(0.05)
time.sleep(2)
ready_after, ready_after_body = get("/ready")
stop.set()
for t in threads:
    t.join(timeout=35)

print("disk full test: responses by phase, status and reason:",
      json.dumps({f"{p}:{s}:{c}": n for (p, s, c), n in sorted(seen.items(), key=str)}))
print(f"disk full test: while full /ready {ready_full} {ready_body.decode()[:160]}, /health {health_full}")
print(f"disk full test: after freeing, first 200 after {recovered if recovered is None else round(recovered, 2)} s; /ready {ready_after}")
failures = []
if not seen[("full", 503, "AUDIT_UNAVAILABLE")]:
    failures.append("no request was refused 503 AUDIT_UNAVAILABLE while the disk was full")
# Before the filler every request is allowed; from then on, allowed or refused for the audit only.
expected = {"before": [(200, None)], "full": [(200, None), (503, "AUDIT_UNAVAILABLE")],
            "freed": [(200, None), (503, "AUDIT_UNAVAILABLE")]}
odd = {f"{p}:{s}:{c}": n for (p, s, c), n in seen.items() if (s, c) not in expected[p]}
if odd:
    failures.append(f"answers other than 200 or 503 AUDIT_UNAVAILABLE: {odd}")
if errors:
    failures.append(f"{len(errors)} requests got no answer: {errors[:3]}")
if ready_full != 503 or b"audit" not in ready_body:
    failures.append(f"/ready answered {ready_full} while the disk was full")
if health_full != 200:
    failures.append(f"/health answered {health_full} while the disk was full")
if recovered is None:
    failures.append("no request was allowed again within 30 s of freeing the disk")
if ready_after != 200:
    failures.append(f"/ready answered {ready_after} after the disk was freed: {ready_after_body.decode()[:200]}")
if failures:
    print("DISK FULL TEST FAILED: " + "; ".join(failures))
    sys.exit(1)
PY
TRAFFIC=$?
set -e
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
SERVER_PID=""
if ! "$BIN" audit verify --quiet; then
  echo "DISK FULL TEST FAILED: audit verify did not pass"
  exit 1
fi
python3 - "$DISK/catraca.db" "$DISK/audit" <<'PY' || { echo "DISK FULL TEST FAILED: the JSON Lines files differ from the database"; exit 1; }
import collections, gzip, json, os, sqlite3, zlib, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
# The audit_events view inflates packed runs with the sqlite3 shell's sqlar_uncompress; here, zlib.
con.create_function("sqlar_uncompress", 2, lambda d, n: d if len(d) == n else zlib.decompress(d))
db = collections.defaultdict(list)
for chain, seq, digest in con.execute("SELECT chain_id, seq, hash FROM audit_events ORDER BY chain_id, seq"):
    db[chain].append((seq, digest))
files = collections.defaultdict(list)
names = sorted(n for n in os.listdir(sys.argv[2]) if n.endswith((".jsonl", ".jsonl.gz")))
for name in names:
    if not (name.endswith(".jsonl") and name + ".gz" in names):
        for line in (gzip.open if name.endswith(".gz") else open)(os.path.join(sys.argv[2], name), "rt", encoding="utf-8"):
            e = json.loads(line)
            files[e["chain_id"]].append((e["seq"], e["hash"]))
bad = [c for c in set(db) | set(files) if db[c] != files[c]]
print(f"disk full test: {sum(map(len, db.values()))} events in the database, {sum(map(len, files.values()))} in the files")
for c in bad:
    print(f"  chain {c}: {len(files[c])} in the files, {len(db[c])} in the database", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
[ "$TRAFFIC" -eq 0 ] || exit 1
echo "DISK FULL TEST PASSED"
