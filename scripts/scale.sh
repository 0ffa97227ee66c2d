#!/usr/bin/env bash
# The trail's scale figures: a store already holding 100 000 keys and 10 000 000 audit events.
#
#   1. governed /process on an empty store (scripts/bench.sh);
#   2. `catraca seed` fills a fresh SQLite store through the audit writer's own code (not HTTP);
#   3. `catraca audit trace` of a seeded request, timed (median of 5, the command's whole run);
#   4. `catraca audit verify` of the whole store, events per second;
#   5. governed /process again, on the seeded store, and its ratio to step 1.
#
#   bash scripts/scale.sh                                  # 100 000 keys, 10 000 000 events (~9 GB)
#   SCALE_KEYS=2000 SCALE_EVENTS=200000 bash scripts/scale.sh   # a quick run
#
# Needs what scripts/bench.sh needs, and free disk for the store (about 0.9 KB per event).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
KEYS=${SCALE_KEYS:-100000}
EVENTS=${SCALE_EVENTS:-10000000}
cd "$ROOT"
if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi
export CATRACA_BIN

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export CATRACA_DATABASE_URL="sqlite://$WORK/catraca.db"
export CATRACA_AUDIT_DIR="$WORK/audit"
export CATRACA_INSTANCE_ID=scale
export CATRACA_LOG=warn
export CATRACA_POLICIES_DIR="$ROOT/policies"
export CATRACA_EXECUTORS_DIR="$ROOT/executors"

echo "== 1. /process on an empty store"
(unset CATRACA_DATABASE_URL CATRACA_AUDIT_DIR; bash scripts/bench.sh) | tee "$WORK/empty.txt"

echo "== 2. seeding $KEYS keys and $EVENTS events"
"$CATRACA_BIN" seed --keys "$KEYS" --events "$EVENTS" 2>"$WORK/seed.log" | tee "$WORK/seed.json"
du -h "$WORK"/catraca.db* | tail -3

echo "== 3. audit trace of a seeded request"
TRACE=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["sample_trace_id"])' "$WORK/seed.json")
python3 - "$CATRACA_BIN" "$TRACE" <<'PY' | tee "$WORK/trace.txt"
import statistics, subprocess, sys, time
binary, trace = sys.argv[1], sys.argv[2]
times = []
for _ in range(5):
    started = time.perf_counter()
    out = subprocess.run([binary, "audit", "trace", trace, "--json"], capture_output=True, check=True)
    times.append((time.perf_counter() - started) * 1000)
events = out.stdout.count(b'"event_id"')
print(f"audit trace {trace}: {events} events, median {statistics.median(times):.1f} ms "
      f"(min {min(times):.1f}, max {max(times):.1f}; the whole command, start-up included)")
PY

echo "== 4. audit verify"
"$CATRACA_BIN" audit verify --quiet | tee "$WORK/verify.txt"

echo "== 5. /process on the seeded store"
# The bench's gateway signs with the key that signed the seeded checkpoints (made beside the audit folder
# by step 2), so that the bench's closing `audit verify` finds them genuine.
(unset CATRACA_AUDIT_DIR; export CATRACA_AUDIT_SIGNING_KEY="$WORK/audit-signing.key"
  CATRACA_BENCH_SQLITE="$WORK/catraca.db" bash scripts/bench.sh) | tee "$WORK/seeded.txt"

python3 - "$WORK" <<'PY'
import re, sys
work = sys.argv[1]
def rps(name):
    return float(re.search(r"/process echo\s+(\d+)", open(f"{work}/{name}.txt").read()).group(1))
def ratio(name):
    return float(re.search(r"/process echo(?:\s+\S+){5}\s+([\d.]+)x", open(f"{work}/{name}.txt").read()).group(1))
empty, seeded = rps("empty"), rps("seeded")
def pairs_median(name):
    return float(re.search(r"pairs of .*; median ([\d.]+)x", open(f"{work}/{name}.txt").read()).group(1))
print(f"scale: /process {seeded:.0f} req/s on the seeded store vs {empty:.0f} on an empty one = "
      f"{seeded / empty:.2f}x (vs /health: {ratio('seeded'):.3f}x vs {ratio('empty'):.3f}x)")
median_empty, median_seeded = pairs_median("empty"), pairs_median("seeded")
print(f"scale: /process : /health, median of the bench's short pairs: {median_seeded:.3f}x on the "
      f"seeded store vs {median_empty:.3f}x on an empty one = "
      f"{median_seeded / median_empty:.2f}x (steadier where the host's speed drifts)")
print("scale: " + open(f"{work}/verify.txt").read().strip())
print("scale: " + open(f"{work}/trace.txt").read().strip())
PY
