#!/usr/bin/env bash
# The agent facades, held to account by the clients agents really use: a live gateway (SQLite in a temp
# folder, the example policies and executors, its LLM upstream stood in for on loopback by
# scripts/upstream_standin.py, which streams as OpenAI does), keys made with `catraca keys create` (an
# analyst, an auditor and an admin, each for context work only), then
#   1. tests/sdk/openai_test.py with the official `openai` SDK on /v1: the models each key may use (the
#      analyst's has `assistant`, the auditor's not), a completion and a stream with include_usage (the
#      deltas make the completion's text, the last chunk carries the usage), the stand-in given the
#      executor's system prompt first and the client's max_tokens, refusals raised as the SDK's own
#      exceptions (403 NO_MATCHING_RULE, 401 AUTH_INVALID_KEY / AUTH_MISSING_KEY, 422
#      INPUT_SCHEMA_INVALID), and each call's trace read back with the auditor key (channel "openai",
#      DECISION allow or deny, ACTION_EXECUTED with the usage the client got);
#   2. tests/sdk/mcp_test.py with the official `mcp` SDK on /mcp (Streamable HTTP, stateless): the tools
#      each key may run (analyst, auditor, admin), echo called, licitacoes.collect refused as a tool
#      error naming NO_MATCHING_RULE and its trace (channel "mcp", DECISION deny in the trail), and a
#      client with an unknown key turned away with HTTP 401;
#   3. the gateway stopped, `catraca audit verify` passes and `catraca audit trace` shows the
#      completion's DECISION (ALLOW of assistant) and the refusal's (DENY, NO_MATCHING_RULE).
# Success prints `SDK TEST PASSED`; anything else `SDK TEST FAILED: <why>`, the log tails (key secrets
# redacted) and a non-zero exit.
#
#   bash scripts/sdk_test.sh
#   CATRACA_BIN=target/release/catraca SDK_VENV=/tmp/sdk-venv bash scripts/sdk_test.sh
#
# Prerequisites: curl, jq, python3 (with venv). The SDKs are installed at the pinned versions into
# SDK_VENV when missing or different (from PyPI).
#
# Environment:
#   CATRACA_BIN    gateway binary (default: cargo build --release --bin catraca)
#   SDK_VENV       Python virtual environment holding openai and mcp (default /tmp/catraca-ci-sdk)
#   KEEP=1         keep the work folder (database, trail, logs)
set -euo pipefail

OPENAI_VERSION=3.54.0
MCP_VERSION=2.3.0

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SDK_VENV=${SDK_VENV:-/tmp/catraca-ci-sdk}
# Paths given relative to where the script was started from stay so after the cd below.
case "$SDK_VENV" in /*) ;; *) SDK_VENV="$PWD/$SDK_VENV" ;; esac
if [ -n "${CATRACA_BIN:-}" ]; then
  case "$CATRACA_BIN" in /*) ;; */*) CATRACA_BIN="$PWD/$CATRACA_BIN" ;; esac
fi
cd "$ROOT"

WORK=""
PIDS=()
redact() { sed -E 's/(ck_[A-Za-z0-9]+_)[A-Za-z0-9_-]{8,}/\1<redacted>/g'; }
fail() {
  echo "SDK TEST FAILED: $*" | redact >&2
  for f in gateway.log standin.log keys.log verify.log trace.log; do
    { [ -n "$WORK" ] && [ -s "$WORK/$f" ]; } || continue
    echo "----- $f (last 30 lines)" >&2
    # Key secrets never reach the CI log.
    tail -n 30 "$WORK/$f" | redact >&2
  done
  exit 1
}
cleanup() {
  # `|| true`: a process that is already gone must not stop the clean-up (set -e).
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [ -n "$WORK" ]; then
    if [ "${KEEP:-0}" = 1 ]; then echo "sdk test: work folder kept in $WORK" >&2; else rm -rf "$WORK"; fi
  fi
}
trap cleanup EXIT

# ---- tools -------------------------------------------------------------------------------------------
for t in curl jq python3; do
  command -v "$t" >/dev/null 2>&1 || fail "'$t' not found on PATH (apt-get install -y --no-install-recommends $t)"
done

sdks_ok() {
  [ -x "$SDK_VENV/bin/python" ] &&
    "$SDK_VENV/bin/python" - "$OPENAI_VERSION" "$MCP_VERSION" 2>/dev/null <<'PY'
import sys
from importlib.metadata import version
sys.exit(0 if (version("openai"), version("mcp")) == (sys.argv[1], sys.argv[2]) else 1)
PY
}
if ! sdks_ok; then
  echo "sdk test: installing openai==$OPENAI_VERSION and mcp==$MCP_VERSION into $SDK_VENV"
  if [ ! -x "$SDK_VENV/bin/python" ]; then
    python3 -m venv "$SDK_VENV" ||
      fail "python3 -m venv $SDK_VENV failed (on Debian's python3: apt-get install python3-venv)"
  fi
  "$SDK_VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "openai==$OPENAI_VERSION" "mcp==$MCP_VERSION" ||
    fail "pip install openai==$OPENAI_VERSION mcp==$MCP_VERSION into $SDK_VENV failed"
  sdks_ok || fail "openai $OPENAI_VERSION and mcp $MCP_VERSION are still not both in $SDK_VENV"
fi
"$SDK_VENV/bin/python" -c 'import openai, mcp.client.streamable_http' ||
  fail "$SDK_VENV/bin/python cannot import openai and mcp"

if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi
[ -x "$CATRACA_BIN" ] || fail "the gateway binary $CATRACA_BIN is not executable"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/catraca-sdk.XXXXXX")
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

# ---- the upstream stand-in ---------------------------------------------------------------------------
STANDIN_PORT=$(free_port)
STANDIN="http://127.0.0.1:$STANDIN_PORT"
python3 scripts/upstream_standin.py --port "$STANDIN_PORT" --fixtures tests/fixtures/pncp 2>"$WORK/standin.log" &
PIDS+=("$!")
wait_ready "$STANDIN/health" "${PIDS[-1]}" || fail "the upstream stand-in did not start"

# ---- the gateway -------------------------------------------------------------------------------------
# The run decides the gateway's configuration: drop inherited CATRACA_* settings (but the binary).
while read -r v; do
  case "$v" in CATRACA_BIN) ;; CATRACA_* | OTEL_*) unset "$v" ;; esac
done < <(compgen -e)
PORT=$(free_port)
export CATRACA_LISTEN="127.0.0.1:$PORT"
export CATRACA_DATABASE_URL="sqlite://$WORK/catraca.db" CATRACA_AUDIT_DIR="$WORK/audit"
export CATRACA_MODE=staging CATRACA_INSTANCE_ID=sdk-test CATRACA_LOG=warn
export CATRACA_POLICIES_DIR="$ROOT/policies" CATRACA_EXECUTORS_DIR="$ROOT/executors"
export CATRACA_LLM_BASE_URL="$STANDIN/v1"
export CATRACA_PNCP_BASE_URL="$STANDIN/api/consulta"
BASE="http://$CATRACA_LISTEN"
# Every catraca command runs from the work folder, where no stray catraca.toml or .env is picked up.
catraca() { (cd "$WORK" && "$CATRACA_BIN" "$@"); }

catraca migrate 2>"$WORK/migrate.log" || fail "catraca migrate failed: $(tail -n 5 "$WORK/migrate.log")"

# create_key NAME ROLE: the key of a new key for context work (unlimited tier: the tests' bursts are not
# the rate gate's business), its other fields logged.
create_key() {
  local out
  out=$(catraca keys create --name "$1" --role "$2" --context work --tier unlimited --json 2>>"$WORK/keys.log") ||
    fail "catraca keys create --name $1 --role $2 --context work --tier unlimited --json failed"
  jq -e --arg r "$2" '.role == $r and (.key | test("^ck_[^_]+_.+$"))' <<<"$out" >/dev/null 2>&1 ||
    fail "catraca keys create $1: no JSON object with a key and role $2: $out"
  jq -c 'del(.key)' <<<"$out" >>"$WORK/keys.log"
  jq -r .key <<<"$out"
}
ANALYST_KEY=$(create_key sdk-analyst analyst)
AUDITOR_KEY=$(create_key sdk-auditor auditor)
ADMIN_KEY=$(create_key sdk-admin admin)

(cd "$WORK" && exec "$CATRACA_BIN" serve) >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
wait_ready "$BASE/ready" "$GATEWAY_PID" || fail "the gateway did not become ready on $BASE"
echo "sdk test: gateway on $BASE, LLM upstream stand-in on $STANDIN"

# ---- the SDKs ----------------------------------------------------------------------------------------
# The keys reach the tests through their environment, not their command line (visible to ps).
export SDK_BASE_URL="$BASE" SDK_STANDIN_URL="$STANDIN" SDK_POLICIES_DIR="$ROOT/policies"
export SDK_TRACES_FILE="$WORK/traces.json" PYTHONDONTWRITEBYTECODE=1
SDK_ANALYST_KEY=$ANALYST_KEY SDK_AUDITOR_KEY=$AUDITOR_KEY \
  timeout 300 "$SDK_VENV/bin/python" tests/sdk/openai_test.py ||
  fail "tests/sdk/openai_test.py failed (above)"
SDK_ANALYST_KEY=$ANALYST_KEY SDK_AUDITOR_KEY=$AUDITOR_KEY SDK_ADMIN_KEY=$ADMIN_KEY \
  timeout 300 "$SDK_VENV/bin/python" tests/sdk/mcp_test.py ||
  fail "tests/sdk/mcp_test.py failed (above)"
CHAT_TRACE=$(jq -r '.completion // empty' "$WORK/traces.json" 2>/dev/null) || true
REFUSED_TRACE=$(jq -r '.refused // empty' "$WORK/traces.json" 2>/dev/null) || true
{ [ -n "$CHAT_TRACE" ] && [ -n "$REFUSED_TRACE" ]; } ||
  fail "tests/sdk/openai_test.py left no completion and refused trace ids in $WORK/traces.json"

# ---- the trail, from the command line ----------------------------------------------------------------
curl -fsS -o /dev/null --max-time 5 "$BASE/ready" || fail "the gateway is not ready after the run"
kill "$GATEWAY_PID" 2>/dev/null || true
wait "$GATEWAY_PID" 2>/dev/null || true
catraca audit verify >"$WORK/verify.log" 2>&1 || fail "catraca audit verify: $(tail -n 5 "$WORK/verify.log")"
echo "sdk test: catraca audit verify passed"
catraca audit trace "$CHAT_TRACE" >"$WORK/trace.log" 2>&1 || fail "catraca audit trace $CHAT_TRACE failed"
grep -Eq 'DECISION +ALLOW by [a-z_]+ +action assistant ' "$WORK/trace.log" ||
  fail "catraca audit trace $CHAT_TRACE shows no DECISION ALLOW of action assistant"
grep -q 'ACTION_EXECUTED' "$WORK/trace.log" || fail "catraca audit trace $CHAT_TRACE shows no ACTION_EXECUTED"
redact <"$WORK/trace.log"
catraca audit trace "$REFUSED_TRACE" >"$WORK/trace.log" 2>&1 || fail "catraca audit trace $REFUSED_TRACE failed"
grep -Eq 'DECISION +DENY by action_matrix +action assistant ' "$WORK/trace.log" ||
  fail "catraca audit trace $REFUSED_TRACE shows no DECISION DENY of action assistant by the action matrix"
grep -Eq 'reasons: ([A-Z_]+, )*NO_MATCHING_RULE' "$WORK/trace.log" ||
  fail "catraca audit trace $REFUSED_TRACE does not give NO_MATCHING_RULE as the reason"
echo "sdk test: catraca audit trace shows the completion allowed and the auditor's request refused"
echo "SDK TEST PASSED"
