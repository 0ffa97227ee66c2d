#!/usr/bin/env bash
# The OpenAPI document, held to account: a live gateway (SQLite in a temp folder, the example policies
# and executors, its LLM and PNCP upstreams stood in for on loopback by scripts/upstream_standin.py),
# an admin key made with `catraca keys create`, then
#   1. every runnable action of the document's /process union, sent with its schema's first example in
#      the context ALLOWED_CONTEXT, must be answered 200 SUCCESS;
#   2. schemathesis runs against /openapi.json with that key and every check on (no 5xx, every status,
#      header, content type and body as documented, valid data accepted, invalid data refused, auth
#      enforced, 405 with Allow for undocumented methods), a bounded number of examples per operation;
#      any finding fails the run;
#   3. the gateway is still ready and `catraca audit verify` passes on what the run left.
# Success prints `SCHEMATHESIS PASSED`; anything else `SCHEMATHESIS FAILED: <why>`, the gateway's log
# tail and a non-zero exit.
#
#   bash scripts/schemathesis.sh
#   CATRACA_BIN=target/release/catraca MAX_EXAMPLES=100 SEED=7 bash scripts/schemathesis.sh
#
# Prerequisites: curl, python3, and schemathesis at the pinned version on PATH (or SCHEMATHESIS=path):
#   pip install schemathesis==4.32.5
#
# Environment:
#   CATRACA_BIN       gateway binary (default: cargo build --release --bin catraca)
#   SCHEMATHESIS      the schemathesis command (default: schemathesis)
#   MAX_EXAMPLES      generated cases per operation and phase (default 40; the run stays well under 5 min)
#   SEED              schemathesis's random seed (default 1, so CI is repeatable; vary it to explore)
#   ALLOWED_CONTEXT   context of the 200 check (default work: the example policy allows admins there)
#   KEEP=1            keep the work folder (database, trail, logs, report)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS=${SCHEMATHESIS:-schemathesis}
MAX_EXAMPLES=${MAX_EXAMPLES:-40}
SEED=${SEED:-1}
ALLOWED_CONTEXT=${ALLOWED_CONTEXT:-work}

cd "$ROOT"
fail() {
  echo "SCHEMATHESIS FAILED: $*" >&2
  for f in "${WORK:-/nonexistent}"/gateway.log "${WORK:-/nonexistent}"/standin.log; do
    [ -s "$f" ] || continue
    echo "----- ${f##*/} (last 30 lines)" >&2
    # Key secrets never reach the CI log.
    tail -n 30 "$f" | sed -E 's/(ck_[A-Za-z0-9]+_)[A-Za-z0-9_-]{8,}/\1<redacted>/g' >&2
  done
  exit 1
}

installed=$("$SCHEMATHESIS" --version 2>/dev/null | awk '{ print $NF }') ||
  fail "no $SCHEMATHESIS on PATH: pip install schemathesis==$SCHEMATHESIS_VERSION"
[ "$installed" = "$SCHEMATHESIS_VERSION" ] ||
  fail "schemathesis $installed found, $SCHEMATHESIS_VERSION expected: pip install schemathesis==$SCHEMATHESIS_VERSION"
if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/catraca-schemathesis.XXXXXX")
GATEWAY_PID=""
STANDIN_PID=""
cleanup() {
  # `|| true`: a process that is already gone must not stop the clean-up (set -e).
  if [ -n "$GATEWAY_PID" ]; then kill "$GATEWAY_PID" 2>/dev/null || true; wait "$GATEWAY_PID" 2>/dev/null || true; fi
  if [ -n "$STANDIN_PID" ]; then kill "$STANDIN_PID" 2>/dev/null || true; wait "$STANDIN_PID" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "schemathesis: work folder kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_ready URL PID: true once URL answers 200, false if PID dies or 30 s pass.
wait_ready() {
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

# ---- upstream stand-ins ------------------------------------------------------------------------------
STANDIN_PORT=$(free_port)
python3 scripts/upstream_standin.py --port "$STANDIN_PORT" --fixtures tests/fixtures/pncp \
  2>"$WORK/standin.log" &
STANDIN_PID=$!
wait_ready "http://127.0.0.1:$STANDIN_PORT/health" "$STANDIN_PID" || fail "the upstream stand-in did not start"

# ---- the gateway -------------------------------------------------------------------------------------
# The run decides the gateway's configuration: drop inherited CATRACA_* settings (but the binary).
while read -r v; do
  case "$v" in CATRACA_BIN) ;; CATRACA_*) unset "$v" ;; esac
done < <(compgen -e)
# The example executors, but for the echo executor's timeout drill: a payload's `delay_ms` past its
# timeout is a 504 by design, and "no 5xx" is what this run checks.
cp -R executors "$WORK/executors"
sed -i 's/^max_delay_ms = .*/max_delay_ms = 0/' "$WORK/executors/echo.toml"
grep -q '^max_delay_ms = 0$' "$WORK/executors/echo.toml" || fail "could not turn off the echo timeout drill"
# schemathesis sends invalid keys on purpose (the ignored_auth check); the per-address limit on failed
# keys would then answer 429 to the valid key as well, so it is raised out of the way.
cat >"$WORK/catraca.toml" <<'TOML'
auth_failures_per_minute = 1000000
TOML
PORT=$(free_port)
export CATRACA_CONFIG="$WORK/catraca.toml" CATRACA_LISTEN="127.0.0.1:$PORT"
export CATRACA_DATABASE_URL="sqlite://$WORK/catraca.db" CATRACA_AUDIT_DIR="$WORK/audit"
export CATRACA_MODE=staging CATRACA_INSTANCE_ID=schemathesis CATRACA_LOG=warn
export CATRACA_POLICIES_DIR="$ROOT/policies" CATRACA_EXECUTORS_DIR="$WORK/executors"
export CATRACA_LLM_BASE_URL="http://127.0.0.1:$STANDIN_PORT/v1"
export CATRACA_PNCP_BASE_URL="http://127.0.0.1:$STANDIN_PORT/api/consulta"
BASE="http://$CATRACA_LISTEN"

"$CATRACA_BIN" migrate 2>"$WORK/migrate.log" || fail "catraca migrate failed: $(tail -n 5 "$WORK/migrate.log")"
KEY=$("$CATRACA_BIN" keys create --name schemathesis --role admin --tier unlimited 2>"$WORK/keys.log") ||
  fail "catraca keys create failed: $(tail -n 5 "$WORK/keys.log")"
"$CATRACA_BIN" serve 2>"$WORK/gateway.log" &
GATEWAY_PID=$!
wait_ready "$BASE/ready" "$GATEWAY_PID" || fail "the gateway did not become ready"
echo "schemathesis: gateway on $BASE, upstream stand-ins on 127.0.0.1:$STANDIN_PORT"

# ---- 1. every runnable action answers 200 with its example --------------------------------------------
python3 - "$BASE" "$KEY" "$ALLOWED_CONTEXT" <<'PY' || fail "an action of the document was not answered 200 with its example"
import json, sys, urllib.error, urllib.request
base, key, context = sys.argv[1:4]
doc = json.load(urllib.request.urlopen(f"{base}/openapi.json", timeout=30))
schemas = doc["components"]["schemas"]
failed = []
for branch in schemas["ProcessBody"]["oneOf"]:
    name = branch["$ref"].rsplit("/", 1)[1]
    action = schemas[name]["properties"]["action"]["const"]
    payload_ref = schemas[name]["properties"]["payload"].get("$ref")
    examples = schemas[payload_ref.rsplit("/", 1)[1]].get("examples") if payload_ref else [{}]
    if not examples:
        failed.append(f"{action}: its payload schema has no `examples`, so nothing says what to send")
        continue
    body = json.dumps({"action": action, "context_id": context, "payload": examples[0]}).encode()
    req = urllib.request.Request(f"{base}/process", data=body, method="POST",
                                 headers={"Content-Type": "application/json", "X-API-Key": key})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, answer = resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        status, answer = e.code, e.read().decode(errors="replace")[:300]
    ok = status == 200 and isinstance(answer, dict) and answer.get("status") == "SUCCESS"
    print(f"  {'ok' if ok else 'FAIL'}  {action}: {status}")
    if not ok:
        failed.append(f"{action}: {status} {answer}")
for line in failed:
    print(f"    {line}", file=sys.stderr)
sys.exit(1 if failed else 0)
PY

# ---- 2. schemathesis, every check on -----------------------------------------------------------------
# One worker: the collector refuses a second run of the same query while one is in progress.
# The kill-switch routes (/v1/executors/{name}/disable|enable) are left out: with an admin key they
# would switch the very executors the run exercises off; tests/api/switches.rs covers them.
# No example database, so each run starts from SEED alone; run from the work folder, where schemathesis
# and hypothesis leave their caches instead of in the checkout. The admin key may act in every context,
# so the OpenAI facade needs one named (X-Catraca-Context) as an agent's client would configure it; the
# other routes ignore the header.
(cd "$WORK" && "$SCHEMATHESIS" run "$BASE/openapi.json" \
  --header "X-API-Key: $KEY" \
  --header "X-Catraca-Context: $ALLOWED_CONTEXT" \
  --checks all \
  --exclude-path-regex '^/v1/executors/' \
  --max-examples "$MAX_EXAMPLES" \
  --seed "$SEED" \
  --workers 1 \
  --request-timeout 120 \
  --generation-database none \
  --report junit --report-dir "$WORK/report" \
  --no-color) ||
  fail "schemathesis reported findings (seed $SEED; rerun with SEED=$SEED to reproduce)"

# ---- 3. the gateway survived, its trail is intact ------------------------------------------------------
curl -fsS -o /dev/null --max-time 5 "$BASE/ready" || fail "the gateway is not ready after the run"
kill "$GATEWAY_PID" && wait "$GATEWAY_PID" 2>/dev/null || true
GATEWAY_PID=""
"$CATRACA_BIN" audit verify >"$WORK/verify.log" 2>&1 || fail "catraca audit verify: $(tail -n 5 "$WORK/verify.log")"
echo "SCHEMATHESIS PASSED"
