#!/usr/bin/env bash
# Throughput of governed /process (echo, durable audit on) and of two refusals (401 without a key, 400
# for an unknown action) against /health, same load generator, same concurrency and duration, in the
# same run. Prints req/s, p50, p99 for each, their ratios to /health, the latency of /process at half
# its saturated rate (each connection paced), the gateway's resident memory at saturation and at its
# peak, the audit bytes each allowed request left (database and JSON Lines files), and the gateway's CPU
# time per request by thread (steadier than req/s where other work shares the machine) and how busy,
# idle and stolen (by a virtual machine's host) the machine's CPU was during the runs; then stops the
# gateway and verifies the trail the runs left (`audit verify`), failing if it is not intact.
#
# A virtual machine's speed drifts from minute to minute, and the long /health and /process runs lie
# tens of seconds apart: on one idle-looking host the same build's one ratio ranged over ±15 %. So the
# bench also runs PAIRS short pairs (/health then /process, PAIR_DURATION each, default 5 pairs of 3 s)
# and prints each pair's ratio and their median, which such drift moves less.
#
#   bash scripts/bench.sh                 # defaults: 32 connections, 2 threads, 10 s each, SQLite
#   bash scripts/bench.sh --postgres      # PostgreSQL at CATRACA_BENCH_POSTGRES_URL (default
#                                         # postgres://postgres@127.0.0.1:5432/test), a fresh database
#   CONNECTIONS=64 DURATION=20s bash scripts/bench.sh
#   CATRACA_BIN=/path/to/catraca bash scripts/bench.sh   # measure another build
#   CATRACA_BENCH_SQLITE=/path/to/catraca.db bash scripts/bench.sh   # an existing (seeded) database
#
# Needs wrk (Debian package `wrk`; installed here when running as root) and python3.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BACKEND=sqlite
case "${1:-}" in
  --postgres) BACKEND=postgres ;;
  "") ;;
  *) echo "usage: $0 [--postgres]" >&2; exit 2 ;;
esac
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-2}
DURATION=${DURATION:-10s}
PAIRS=${PAIRS:-5}
PAIR_DURATION=${PAIR_DURATION:-3s}

if ! command -v wrk >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk) >/dev/null
  else
    echo "bench: wrk is missing (apt-get install wrk)" >&2
    exit 1
  fi
fi

cd "$ROOT"
if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi
BIN=$CATRACA_BIN

WORK=$(mktemp -d)
SERVER_PID=""
PG_ADMIN=${CATRACA_BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
PG_DB=catraca_bench_$$
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
  [ "$BACKEND" = postgres ] && psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB" >/dev/null 2>&1
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
export CATRACA_LISTEN="127.0.0.1:$PORT"
if [ "$BACKEND" = postgres ]; then
  psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_DB" >/dev/null
  export CATRACA_DATABASE_URL="${PG_ADMIN%/*}/$PG_DB"
else
  DB_FILE=${CATRACA_BENCH_SQLITE:-$WORK/catraca.db}
  export CATRACA_DATABASE_URL="sqlite://$DB_FILE"
fi
# The refusal runs come from one address: without a large budget the 401s would be throttled after 30
# and summarised, and the bench would measure the throttle instead of a governed refusal.
printf 'auth_failures_per_minute = 1000000000\n' >"$WORK/catraca.toml"
export CATRACA_CONFIG="$WORK/catraca.toml"
export CATRACA_AUDIT_DIR="$WORK/audit"
export CATRACA_MODE=staging
export CATRACA_INSTANCE_ID=bench
export CATRACA_LOG=warn
export CATRACA_POLICIES_DIR="$ROOT/policies"
export CATRACA_EXECUTORS_DIR="$ROOT/executors"

"$BIN" migrate 2>/dev/null
KEY=$("$BIN" keys create --name bench --role admin --tier unlimited --json |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])')
"$BIN" serve 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 1 100); do
  curl -fsS "http://$CATRACA_LISTEN/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://$CATRACA_LISTEN/ready" >/dev/null || { cat "$WORK/server.log" >&2; exit 1; }

cat >"$WORK/process.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"action":"echo","context_id":"work","payload":{"message":"benchmark"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = os.getenv("CATRACA_BENCH_KEY")
LUA

# /process paced: each connection waits CATRACA_BENCH_DELAY_MS between requests (wrk's delay()), so
# that all of them together ask for a chosen rate.
cat >"$WORK/paced.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"action":"echo","context_id":"work","payload":{"message":"benchmark"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = os.getenv("CATRACA_BENCH_KEY")
local pause = tonumber(os.getenv("CATRACA_BENCH_DELAY_MS"))
function delay()
  return pause
end
LUA

cat >"$WORK/nokey.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"action":"echo","context_id":"work","payload":{"message":"benchmark"}}'
wrk.headers["Content-Type"] = "application/json"
LUA
cat >"$WORK/unknown.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"action":"no.such.action","context_id":"work","payload":{}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-API-Key"] = os.getenv("CATRACA_BENCH_KEY")
LUA

# Bytes the audit trail holds now: the database (its files, or PostgreSQL's size of it) and the JSON
# Lines files.
db_bytes() {
  if [ "$BACKEND" = postgres ]; then
    psql "$CATRACA_DATABASE_URL" -Atc "SELECT pg_database_size(current_database())"
  else
    du -cb "$DB_FILE"* | tail -1 | cut -f1
  fi
}
file_bytes() { du -sb "$WORK/audit" 2>/dev/null | cut -f1 || echo 0; }
# Rotated parts are compressed in the background; measure once none is left uncompressed.
compressed() {
  for _ in $(seq 1 300); do
    compgen -G "$WORK/audit/audit.*.[0-9][0-9][0-9][0-9].jsonl" >/dev/null || return 0
    sleep 0.1
  done
}

# CPU time of each of the gateway's threads so far, one "name ticks" line each (utime + stime, in clock
# ticks), taken before and after a run to tell where its CPU went.
cpu_ticks() {
  local t
  for t in /proc/"$SERVER_PID"/task/*; do
    awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "$t/stat" 2>/dev/null | sed "s/^/$(tr ' ' _ <"$t/comm") /"
  done
}
# The whole machine's CPU time by state (the first line of /proc/stat), before and after a run: a
# virtual machine's "steal" (time its host gave to others) and idle time explain runs that disagree.
run() { # name, extra wrk args...
  local name=$1; shift
  cpu_ticks >"$WORK/$name.cpu0"
  head -1 /proc/stat >"$WORK/$name.stat0"
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$@" >"$WORK/$name.txt"
  head -1 /proc/stat >"$WORK/$name.stat1"
  cpu_ticks >"$WORK/$name.cpu1"
}
# A short warm-up so both runs start with a hot cache (argon2 once, SQLite pages, allocator).
wrk -t1 -c4 -d2s "http://$CATRACA_LISTEN/health" >/dev/null
CATRACA_BENCH_KEY=$KEY wrk -t1 -c4 -d2s -s "$WORK/process.lua" "http://$CATRACA_LISTEN/process" >/dev/null
run health "http://$CATRACA_LISTEN/health"
DB0=$(db_bytes) FILES0=$(file_bytes)
rss_kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$SERVER_PID/status"; }
# Resident memory sampled in the middle of the saturated /process run.
( sleep "$(( ${DURATION%s} / 2 ))"; rss_kib VmRSS >"$WORK/rss_saturated" ) &
SAMPLER=$!
CATRACA_BENCH_KEY=$KEY run process -s "$WORK/process.lua" "http://$CATRACA_LISTEN/process"
wait "$SAMPLER"
sleep 1 # the last group commit reaches the files
compressed
DB1=$(db_bytes) FILES1=$(file_bytes)
# Half the saturated rate: a connection sends a request, waits for its answer, then pauses, so the rate
# is CONNECTIONS / (pause + latency). A short paced run measures the latency; the pause is then chosen
# so that all connections together ask for half the saturated rate.
rate_of() { python3 -c "import re; print(re.search(r'Requests/sec:\s+([\d.]+)', open('$1').read()).group(1))"; }
HALF=$(python3 -c "print($(rate_of "$WORK/process.txt") / 2)")
FIRST_MS=$(python3 -c "print(max(1, round($CONNECTIONS / $HALF * 1000)))")
CATRACA_BENCH_KEY=$KEY CATRACA_BENCH_DELAY_MS=$FIRST_MS wrk -t"$THREADS" -c"$CONNECTIONS" -d3s \
  -s "$WORK/paced.lua" "http://$CATRACA_LISTEN/process" >"$WORK/calibrate.txt"
HALF_DELAY_MS=$(python3 -c "
latency_ms = $CONNECTIONS / $(rate_of "$WORK/calibrate.txt") * 1000 - $FIRST_MS
print(max(1, round($CONNECTIONS / $HALF * 1000 - latency_ms)))")
CATRACA_BENCH_KEY=$KEY CATRACA_BENCH_DELAY_MS=$HALF_DELAY_MS run half -s "$WORK/paced.lua" "http://$CATRACA_LISTEN/process"
run nokey -s "$WORK/nokey.lua" "http://$CATRACA_LISTEN/process"
CATRACA_BENCH_KEY=$KEY run unknown -s "$WORK/unknown.lua" "http://$CATRACA_LISTEN/process"
# Short pairs, each /process run right after its /health run (after the bytes were measured: they only
# add to the trail that `audit verify` reads at the end).
for i in $(seq 1 "$PAIRS"); do
  wrk -t"$THREADS" -c"$CONNECTIONS" -d"$PAIR_DURATION" --latency "http://$CATRACA_LISTEN/health" >"$WORK/pair$i.health.txt"
  CATRACA_BENCH_KEY=$KEY wrk -t"$THREADS" -c"$CONNECTIONS" -d"$PAIR_DURATION" --latency -s "$WORK/process.lua" \
    "http://$CATRACA_LISTEN/process" >"$WORK/pair$i.process.txt"
done

RSS_PEAK=$(rss_kib VmHWM)
EVENTS=$(curl -fsS "http://$CATRACA_LISTEN/metrics" | awk '/^catraca_audit_events_total/ {s += $2} END {print s}')
FLUSHES=$(curl -fsS "http://$CATRACA_LISTEN/metrics" | awk '/^catraca_audit_flush_duration_seconds_count/ {print $2}')

python3 - "$WORK" "$CONNECTIONS" "$THREADS" "$DURATION" "$EVENTS" "$FLUSHES" "$BACKEND" \
  "$((DB1 - DB0))" "$((FILES1 - FILES0))" "$(cat "$WORK/rss_saturated")" "$RSS_PEAK" "$(getconf CLK_TCK)" \
  "$PAIRS" "$PAIR_DURATION" <<'PY'
import collections, re, statistics, sys
work, conns, threads, duration, events, flushes, backend, db_grew, files_grew, rss, rss_peak, hz, pairs, pair_duration = sys.argv[1:]

def to_ms(v):
    n, unit = float(re.match(r"[\d.]+", v).group()), re.sub(r"[\d.]+", "", v)
    return n * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

def parse(name):
    text = open(f"{work}/{name}.txt").read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    p50 = to_ms(re.search(r"\n\s+50%\s+(\S+)", text).group(1))
    p99 = to_ms(re.search(r"\n\s+99%\s+(\S+)", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    total = int(re.search(r"(\d+) requests in", text).group(1))
    return rps, p50, p99, int(bad.group(1)) if bad else 0, errors.group(0) if errors else "", total

h, p, k, u = parse("health"), parse("process"), parse("nokey"), parse("unknown")
print(f"wrk -t{threads} -c{conns} -d{duration} on 127.0.0.1 (server and load generator share the machine), {backend}")
print(f"{'run':<22} {'req/s':>10} {'p50 ms':>9} {'p99 ms':>9} {'requests':>10} {'non-2xx':>8} {'vs /health':>10}")
for name, r in (("/health", h), ("/process echo", p), ("401 no key", k), ("400 unknown action", u)):
    print(f"{name:<22} {r[0]:>10.0f} {r[1]:>9.2f} {r[2]:>9.2f} {r[5]:>10} {r[3]:>8} {r[0] / h[0]:>9.3f}x {r[4]}")
half = parse("half")
print(f"{'/process at half rate':<22} {half[0]:>10.0f} {half[1]:>9.2f} {half[2]:>9.2f} {half[5]:>10} {half[3]:>8} "
      f"{half[0] / h[0]:>9.3f}x (paced to half of {p[0]:.0f} req/s)")
print(f"ratio /process : /health throughput = {p[0] / h[0]:.2f}x (issue target >= 0.25x, aim 0.50x); "
      f"refusals {k[0] / h[0]:.2f}x and {u[0] / h[0]:.2f}x (target >= 0.35x)")
print(f"/process p99 at half rate: {half[2]:.2f} ms (target <= 5 ms)")
pair_runs = [(parse(f"pair{i}.health"), parse(f"pair{i}.process")) for i in range(1, int(pairs) + 1)]
if pair_runs:
    ratios = [pp[0] / ph[0] for ph, pp in pair_runs]
    print(f"/process : /health in {pairs} pairs of {pair_duration} runs, one right after the other: "
          f"{' '.join(f'{r:.3f}x' for r in ratios)}; median {statistics.median(ratios):.3f}x")

def cpu_per_request(name, requests):
    """Microseconds of the gateway's CPU per request of a run, by thread (tokio's workers, the audit
    writer, the files' compressor, ...): steadier from run to run than req/s on a shared machine."""
    def ticks(suffix):
        spent = collections.Counter()
        for line in open(f"{work}/{name}.{suffix}"):
            thread, n = line.rsplit(maxsplit=1)
            spent[thread] += int(n)
        return spent
    spent = ticks("cpu1")
    spent.subtract(ticks("cpu0"))
    per = {t: n / int(hz) / requests * 1e6 for t, n in spent.items() if n > 0}
    threads = ", ".join(f"{t} {us:.0f}" for t, us in sorted(per.items(), key=lambda kv: -kv[1]))
    return sum(per.values()), threads

for name, label, r in (("health", "/health", h), ("process", "/process echo", p), ("nokey", "401 no key", k)):
    total, threads = cpu_per_request(name, r[5])
    print(f"gateway CPU per request, {label}: {total:.0f} us ({threads})")

def machine(name):
    """Shares of the machine's CPU time during a run: busy (user, system, interrupts), idle and waiting
    for the disk, and stolen by the host of a virtual machine."""
    before, after = ([int(v) for v in open(f"{work}/{name}.{s}").read().split()[1:9]] for s in ("stat0", "stat1"))
    user, nice, system, idle, iowait, irq, softirq, steal = (b - a for a, b in zip(before, after))
    total = max(user + nice + system + idle + iowait + irq + softirq + steal, 1)
    return (f"busy {(user + nice + system + irq + softirq) / total:.0%}, idle {(idle + iowait) / total:.0%}, "
            f"stolen {steal / total:.0%}")

print("machine CPU during the runs (gateway and load generator together): " + "; ".join(
    f"{label} {machine(name)}" for name, label in (("health", "/health"), ("process", "/process"), ("half", "half rate"))))
print(f"gateway resident memory: {int(rss) / 1024:.1f} MiB at saturation, {int(rss_peak) / 1024:.1f} MiB at its peak "
      f"(target < 100 MB)")
db, files = int(db_grew), int(files_grew)
print(f"audit bytes per allowed request: {db / p[5]:.0f} in the database + {files / p[5]:.0f} in the "
      f"JSON Lines files = {(db + files) / p[5]:.0f}")
print(f"audit: {events} events durably written in {flushes} group commits "
      f"({float(events) / max(float(flushes), 1):.1f} events per commit)")
if p[3] or h[3] or half[3] or any(ph[3] or pp[3] for ph, pp in pair_runs):
    print("bench: some responses were not 2xx", file=sys.stderr)
    sys.exit(1)
PY

# The trail the runs left must verify: the gateway stops (closing its chain), then `audit verify` reads
# every event back and checks its hash, its chain and the signed checkpoints.
kill "$SERVER_PID" && wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=""
if ! "$BIN" audit verify 2>"$WORK/verify.log"; then
  cat "$WORK/verify.log" >&2
  echo "bench: audit verify did not find the trail intact" >&2
  exit 1
fi
