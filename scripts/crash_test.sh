#!/usr/bin/env bash
# Crash safety, shown: drive load, kill the gateway with SIGKILL mid-run, restart it, and check that
#   * requests were in flight at the kill (started before it, cut by it with no response),
#   * every request whose client received a response has its full event sequence, with the status the
#     client saw, and so does each request sent to the restarted gateway (which must answer them all),
#   * the JSON Lines files under CATRACA_AUDIT_DIR hold exactly the database's events (the same
#     (chain_id, seq, hash) list per chain, no duplicates, in seq order), the killed chain included: the
#     writer appends each batch before answering, and the restarted gateway brings the killed chain's
#     files level with the database before it opens its own chain,
#   * `catraca audit verify` passes across the restart (exit code 0), with the key chain and both
#     server chains in the database, and so does `catraca audit verify --file` of the files' folder;
#   * every chain is signed: a stopped chain's last checkpoint closes it, the killed chain's does not,
#     and checkpoints.ndjson holds the database's checkpoints.
#
#   bash scripts/crash_test.sh                      # defaults: 8 clients, kill after 1.5 s
#   CLIENTS=16 KILL_AFTER=3 bash scripts/crash_test.sh
#   KEEP=1 ...                                      # keep the work folder (database, trail, logs)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CLIENTS=${CLIENTS:-8}
KILL_AFTER=${KILL_AFTER:-1.5}
# Bounds: the load stops by itself after this many requests or seconds, whichever comes first.
MAX_REQUESTS=${MAX_REQUESTS:-20000}
MAX_SECONDS=${MAX_SECONDS:-8}
# Requests sent to the restarted gateway once the load is over (each must be answered).
AFTER_RESTART=${AFTER_RESTART:-6}

cd "$ROOT"
if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi
WORK=$(mktemp -d)
SERVER_PID=""
LOAD_PID=""
cleanup() {
  # `|| true`: a process that is already gone must not stop the clean-up (set -e).
  if [ -n "$SERVER_PID" ]; then kill -9 "$SERVER_PID" 2>/dev/null || true; fi
  if [ -n "$LOAD_PID" ]; then kill "$LOAD_PID" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "crash test: evidence kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
fail() { echo "CRASH TEST FAILED: $*" >&2; tail -n 20 "$WORK"/server*.log >&2 || true; exit 1; }

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export CATRACA_LISTEN="127.0.0.1:$PORT" CATRACA_DATABASE_URL="sqlite://$WORK/catraca.db"
export CATRACA_AUDIT_DIR="$WORK/audit" CATRACA_MODE=staging CATRACA_INSTANCE_ID=crash CATRACA_LOG=warn
export CATRACA_POLICIES_DIR="$ROOT/policies" CATRACA_EXECUTORS_DIR="$ROOT/executors"
# A third of the traffic has no key. Past the per-address budget such refusals would be throttled and
# written as REQUESTS_THROTTLED summaries (after the answer, so a kill may lose the last interval's count,
# as the README says); this test is about the full stories, so every refusal must be written in full.
printf 'auth_failures_per_minute = 100000000\n' >"$WORK/catraca.toml"
export CATRACA_CONFIG="$WORK/catraca.toml"

start() {
  "$CATRACA_BIN" serve 2>"$WORK/server$1.log" &
  SERVER_PID=$!
  for _ in $(seq 1 100); do
    curl -fsS "http://$CATRACA_LISTEN/ready" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "the gateway did not become ready"
}

"$CATRACA_BIN" migrate 2>/dev/null
KEY=$("$CATRACA_BIN" keys create --name crash --role admin --tier unlimited 2>/dev/null)
start 1

# The load: each client sends allowed and refused requests with its own trace ids, until the bounds say
# stop, and records every request: its trace id, the status it got (or `error:<what>` when it got no
# response) and when it started and ended (wall clock, to compare with the moment of the kill).
python3 - "$CATRACA_LISTEN" "$KEY" "$CLIENTS" "$MAX_REQUESTS" "$MAX_SECONDS" "$WORK/requests.tsv" <<'PY' &
import http.client, json, sys, threading, time
addr, key, clients, max_requests, max_seconds, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), sys.argv[6]
host, port = addr.split(":")
lock, results, counter = threading.Lock(), [], [0]
deadline = time.time() + max_seconds
bodies = [
    ({"X-API-Key": key}, {"action": "echo", "context_id": "work", "payload": {"message": "crash"}}),
    ({}, {"action": "echo", "context_id": "work", "payload": {"message": "no key"}}),
    ({"X-API-Key": key}, {"action": "licitacoes.summarize", "context_id": "partner", "payload": {"text": "t"}}),
]
def client(n):
    conn, i = None, 0
    while time.time() < deadline:
        with lock:
            if counter[0] >= max_requests: return
            counter[0] += 1
        headers, body = bodies[i % len(bodies)]
        trace = f"crash-{n:02d}-{i:07d}"
        i += 1
        started = time.time()
        try:
            conn = conn or http.client.HTTPConnection(host, int(port), timeout=5)
            conn.request("POST", "/process", json.dumps(body), {**headers, "X-Trace-Id": trace, "Content-Type": "application/json"})
            resp = conn.getresponse(); resp.read()
            with lock: results.append((trace, str(resp.status), started, time.time()))
        except Exception as e:
            with lock: results.append((trace, f"error:{type(e).__name__}", started, time.time()))
            conn = None
            time.sleep(0.05)  # the server is gone; keep trying until the bounds say stop
threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
[t.start() for t in threads]; [t.join() for t in threads]
with open(out, "w") as f:
    for trace, outcome, started, ended in results: f.write(f"{trace}\t{outcome}\t{started:.6f}\t{ended:.6f}\n")
PY
LOAD_PID=$!
sleep "$KILL_AFTER"
# The kill's window, taken just before and just after the signal (seconds since the epoch, UTC): a request
# that started before the window's end and ended after its start without a response was in flight when the
# gateway died. A fast gateway answers several requests while `date` runs, so one moment taken before the
# signal would miss the requests sent in between, which are the ones the kill cuts.
KILL_FROM=$(date +%s.%N)
kill -9 "$SERVER_PID"
KILL_TO=$(date +%s.%N)
wait "$SERVER_PID" 2>/dev/null || true
echo "crash test: SIGKILL sent to the gateway after ${KILL_AFTER}s of load" >&2
start 2
wait "$LOAD_PID" || fail "the load generator failed"
LOAD_PID=""

# The restarted gateway must answer: a few more requests, allowed and refused, each with its own trace.
python3 - "$CATRACA_LISTEN" "$KEY" "$AFTER_RESTART" "$WORK/after_restart.tsv" <<'PY' || fail "the restarted gateway did not answer every request sent to it"
import http.client, json, sys, time
addr, key, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
host, port = addr.split(":")
bodies = [
    ({"X-API-Key": key}, {"action": "echo", "context_id": "work", "payload": {"message": "after"}}),
    ({}, {"action": "echo", "context_id": "work", "payload": {"message": "no key"}}),
    ({"X-API-Key": key}, {"action": "licitacoes.summarize", "context_id": "partner", "payload": {"text": "t"}}),
]
failed = 0
with open(out, "w") as f:
    for i in range(n):
        headers, body = bodies[i % len(bodies)]
        trace = f"after-restart-{i:03d}"
        started = time.time()
        try:
            conn = http.client.HTTPConnection(host, int(port), timeout=10)
            conn.request("POST", "/process", json.dumps(body), {**headers, "X-Trace-Id": trace, "Content-Type": "application/json"})
            resp = conn.getresponse(); resp.read(); conn.close()
            outcome = str(resp.status)
        except Exception as e:
            outcome, failed = f"error:{type(e).__name__}", failed + 1
            print(f"  no response after the restart: {trace}: {e!r}", file=sys.stderr)
        f.write(f"{trace}\t{outcome}\t{started:.6f}\t{time.time():.6f}\n")
sys.exit(1 if failed or n < 1 else 0)
PY

# A graceful stop flushes the restarted gateway's JSON Lines file; then read the trail.
kill -TERM "$SERVER_PID"
for _ in $(seq 1 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
kill -0 "$SERVER_PID" 2>/dev/null && fail "the restarted gateway did not stop within 10 s of SIGTERM"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
"$CATRACA_BIN" audit export --since 2000-01-01 >"$WORK/trail.jsonl"

python3 - "$WORK/requests.tsv" "$WORK/after_restart.tsv" "$WORK/trail.jsonl" "$KILL_FROM" "$KILL_TO" <<'PY' || fail "requests in flight at the kill, or their audit stories (see above)"
import json, sys, collections
def rows(path):
    return [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
load, after = rows(sys.argv[1]), rows(sys.argv[2])
kill_from, kill_to = float(sys.argv[4]), float(sys.argv[5])
events = collections.defaultdict(list)
for line in open(sys.argv[3]):
    e = json.loads(line)
    if e.get("trace_id"): events[e["trace_id"]].append(e)
allowed = ["REQUEST_START", "DECISION", "EXECUTOR_SELECTED", "ACTION_EXECUTED", "REQUEST_END"]
denied = ["REQUEST_START", "DECISION", "REQUEST_END"]
def story_problems(answered):
    bad = []
    for trace, status in answered:
        evs = sorted(events.get(trace, []), key=lambda e: (e["chain_id"], e["seq"]))
        want = allowed if status == 200 else denied
        if [e["event_type"] for e in evs] != want or evs[-1].get("status") != status:
            bad.append((trace, status, [e["event_type"] for e in evs]))
    return bad
ok = True
answered = [(t, int(o)) for t, o, _, _ in load if not o.startswith("error:")]
in_flight = [t for t, o, s, e in load if o.startswith("error:") and float(s) < kill_to and float(e) >= kill_from]
by_status = collections.Counter(s for _, s in answered)
bad = story_problems(answered)
print(f"crash test: {len(load)} requests sent by the load, {len(answered)} answered ({dict(sorted(by_status.items()))}); "
      f"{len(answered) - len(bad)} with their full event sequence and status")
print(f"crash test: {len(in_flight)} requests in flight at the kill (started before it, cut by it with no response)")
if not answered:
    print("  no request of the load was answered", file=sys.stderr); ok = False
if not in_flight:
    print("  no request was in flight at the kill: the kill did not happen under load", file=sys.stderr); ok = False
after_answered = [(t, int(o)) for t, o, _, _ in after if not o.startswith("error:")]
after_bad = story_problems(after_answered)
print(f"crash test: {len(after_answered)} of {len(after)} requests after the restart answered "
      f"({dict(sorted(collections.Counter(s for _, s in after_answered).items()))}), "
      f"{len(after_answered) - len(after_bad)} with their full event sequence and status")
if not after or len(after_answered) != len(after) or 200 not in {s for _, s in after_answered}:
    print("  the restarted gateway did not answer every request (one allowed at least)", file=sys.stderr); ok = False
unanswered = [t for t in events if t.startswith("crash-") and t not in {t for t, _ in answered}]
partial = [t for t in unanswered if events[t][-1]["event_type"] != "REQUEST_END"]
print(f"crash test: {len(unanswered)} requests recorded but never answered (cut by the kill or the bound), "
      f"{len(partial)} of them stopped mid-story as expected of a crash")
for b in (bad + after_bad)[:10]: print("  missing:", b, file=sys.stderr)
sys.exit(0 if ok and not bad and not after_bad else 1)
PY

# The JSON Lines files against the database, as ordered lists of (chain_id, seq, hash) per chain: the
# files in name order (daily rotation) and each line in file order, the database by seq. Every chain must
# match exactly (a missing event, a duplicate, a gap or an out-of-order line is a difference), the chain
# cut by SIGKILL too. How many of its events the restart copied from the database is printed (read from
# the restarted gateway's log).
python3 - "$WORK/catraca.db" "$WORK/audit" "$WORK/server2.log" <<'PY' || fail "the JSON Lines files do not hold exactly the database's events"
import collections, gzip, json, os, re, sqlite3, zlib, sys
db, folder, log = sys.argv[1], sys.argv[2], sys.argv[3]
con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
# The audit_events view inflates packed runs with the sqlite3 shell's sqlar_uncompress; here, zlib.
con.create_function("sqlar_uncompress", 2, lambda d, n: d if len(d) == n else zlib.decompress(d))
in_db = collections.defaultdict(list)
for chain, seq, digest in con.execute("SELECT chain_id, seq, hash FROM audit_events ORDER BY chain_id, seq"):
    in_db[chain].append((seq, digest))
# Live files and rotated parts, compressed or not (a part is removed once its .gz is in place).
names = sorted(n for n in os.listdir(folder) if n.endswith((".jsonl", ".jsonl.gz"))) if os.path.isdir(folder) else []
names = [n for n in names if not (n.endswith(".jsonl") and n + ".gz" in names)]
in_files = collections.defaultdict(list)
for name in names:
    with (gzip.open if name.endswith(".gz") else open)(os.path.join(folder, name), "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                e = json.loads(line)
                in_files[e["chain_id"]].append((e["seq"], e["hash"]))
total_db, total_files = sum(map(len, in_db.values())), sum(map(len, in_files.values()))
print(f"crash test: {total_files} events in {len(names)} JSON Lines file(s), {total_db} in the database, "
      f"{len(in_db)} chains")
plain = re.sub(r"\x1b\[[0-9;]*m", "", open(log, errors="replace").read())
copied = sum(int(m) for line in plain.splitlines() if "brought level" in line
             for m in re.findall(r"events=(\d+)", line))
print(f"crash test: the restart copied {copied} event(s) of the killed chain from the database to its files")
ok = bool(in_db)
for chain in sorted(set(in_db) | set(in_files)):
    want, got = in_db.get(chain, []), in_files.get(chain, [])
    if got == want:
        continue
    ok = False
    dup = len(got) - len(set(got))
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    print(f"  chain {chain}: {len(got)} events in the files, {len(want)} in the database, {dup} duplicated "
          f"in the files; first difference at position {first}: files {got[first:first + 1]}, "
          f"database {want[first:first + 1]}", file=sys.stderr)
sys.exit(0 if ok else 1)
PY

# Exit code 0 means intact (README, Auditing); the summary line is shown, not parsed.
VERIFY=$("$CATRACA_BIN" audit verify --quiet) || fail "audit verify after the restart (exit code $?): $VERIFY"
echo "crash test: $VERIFY"
# The folder on its own: the killed chain and the ones after it, followed across the files.
VERIFY=$("$CATRACA_BIN" audit verify --quiet --file "$WORK/audit") ||
  fail "audit verify of the JSON Lines folder after the restart (exit code $?): $VERIFY"
echo "crash test: $VERIFY"
# And the gateway's own comparison of the database with the folder (the check above, done by catraca).
VERIFY=$("$CATRACA_BIN" audit verify --quiet --against-files "$WORK/audit") ||
  fail "audit verify --against-files after the restart (exit code $?): $VERIFY"
echo "crash test: $VERIFY"
CHAINS=$(python3 -c 'import sqlite3, zlib, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
con.create_function("sqlar_uncompress", 2, lambda d, n: d if len(d) == n else zlib.decompress(d))
print(con.execute("SELECT COUNT(DISTINCT chain_id) FROM audit_events").fetchone()[0])' "$WORK/catraca.db")
[ "$CHAINS" -ge 3 ] || fail "expected the key chain and two server chains in the database, found $CHAINS"
# Signed checkpoints (the verify above held every chain to them, with the key staging made beside the
# audit folder): a stopped chain's last one closes it and covers all of it; the killed chain's do not
# close it, and cover all but at most its last second; the folder's checkpoints.ndjson holds the same notes.
python3 - "$WORK/catraca.db" "$WORK/audit/checkpoints.ndjson" <<'PY' || fail "signed checkpoints after the crash (see above)"
import json, sqlite3, zlib, sys
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
con.create_function("sqlar_uncompress", 2, lambda d, n: d if len(d) == n else zlib.decompress(d))
events = dict(con.execute("SELECT chain_id, MAX(seq) FROM audit_events GROUP BY chain_id"))
rows = con.execute("SELECT chain_id, size, note FROM audit_checkpoints ORDER BY chain_id, size, id").fetchall()
last = {}
for chain, size, note in rows:
    last[chain] = (size, "\nclosed\n" in note)
closed = {c: v for c, v in last.items() if v[1]}
open_ = {c: v for c, v in last.items() if not v[1]}
ok = set(last) == set(events)
ok &= all(size == events[c] for c, (size, _) in closed.items())
ok &= len(open_) == 1 and all(0 < size <= events[c] for c, (size, _) in open_.items())
with open(sys.argv[2]) as f:
    notes = [json.loads(line)["note"] for line in f if line.strip()]
ok &= sorted(notes) == sorted(n for _, _, n in rows)
for c, (size, is_closed) in sorted(last.items()):
    print(f"crash test: chain {c}: {events.get(c)} events, last checkpoint {size}{' (closed)' if is_closed else ' (killed: not closed)'}")
print(f"crash test: {len(rows)} signed checkpoints in the database, {len(notes)} in checkpoints.ndjson")
sys.exit(0 if ok else 1)
PY
echo "CRASH TEST PASSED"
