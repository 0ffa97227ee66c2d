#!/usr/bin/env bash
# The operator console in a real browser: a live gateway (SQLite in a temp folder, the example policies
# and executors), keys made with `catraca keys create` (an auditor, an admin, an analyst in context
# work), one request the action matrix refuses (the analyst collecting tenders) and one it allows (the
# analyst's echo); then tests/browser/console_test.py drives Debian's headless Chromium through
# /console: sign-in refused and accepted, the refused request's trace, the decisions filtered on deny,
# the chains, the admin revoking the analyst key, the key kept in sessionStorage only, a #trace= deep
# link, and no Content-Security-Policy violation in the browser log. Afterwards:
#   - the revoked analyst key is refused by the gateway (401);
#   - a read made like the console's, with our own X-Trace-Id, is in the trail (DECISION allow);
#   - `catraca audit verify` passes, and the export holds the console's reads of /v1/audit/decisions
#     and the KEY_REVOKED event of the analyst key.
# Success prints `CONSOLE TEST PASSED`; anything else `CONSOLE TEST FAILED: <why>`, the log tails (key
# secrets redacted) and a non-zero exit. Screenshots (trace.png, decisions.png, chains.png, keys.png,
# failure.png on failure) go to SCREENSHOTS.
#
#   bash scripts/console_test.sh
#   CATRACA_BIN=target/release/catraca SCREENSHOTS=/tmp/shots bash scripts/console_test.sh
#
# Prerequisites: curl, jq, python3 (with venv), and Debian's Chromium and its driver:
#   apt-get install -y --no-install-recommends chromium chromium-driver
# Selenium is installed at the pinned version into CONSOLE_VENV when missing or different; it is given
# /usr/bin/chromedriver explicitly, so Selenium Manager never downloads a browser or a driver.
#
# Environment:
#   CATRACA_BIN    gateway binary (default: cargo build --release --bin catraca)
#   CONSOLE_VENV   Python virtual environment holding selenium (default /tmp/catraca-ci-console)
#   SCREENSHOTS    where the screenshots go (default target/console-screenshots)
#   KEEP=1         keep the work folder (database, trail, logs)
set -euo pipefail

SELENIUM_VERSION=4.51.0
CHROMIUM=/usr/bin/chromium
CHROMEDRIVER=/usr/bin/chromedriver

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CONSOLE_VENV=${CONSOLE_VENV:-/tmp/catraca-ci-console}
SCREENSHOTS=${SCREENSHOTS:-$ROOT/target/console-screenshots}
# Paths given relative to where the script was started from stay so after the cd below.
case "$SCREENSHOTS" in /*) ;; *) SCREENSHOTS="$PWD/$SCREENSHOTS" ;; esac
if [ -n "${CATRACA_BIN:-}" ]; then
  case "$CATRACA_BIN" in /*) ;; */*) CATRACA_BIN="$PWD/$CATRACA_BIN" ;; esac
fi
cd "$ROOT"

WORK=""
GATEWAY_PID=""
redact() { sed -E 's/(ck_[A-Za-z0-9]+_)[A-Za-z0-9_-]{8,}/\1<redacted>/g'; }
fail() {
  echo "CONSOLE TEST FAILED: $*" | redact >&2
  for f in "${WORK:-/nonexistent}"/gateway.log "${WORK:-/nonexistent}"/keys.log "${WORK:-/nonexistent}"/verify.log; do
    [ -s "$f" ] || continue
    echo "----- ${f##*/} (last 30 lines)" >&2
    # Key secrets never reach the CI log.
    tail -n 30 "$f" | redact >&2
  done
  exit 1
}
cleanup() {
  # `|| true`: a process that is already gone must not stop the clean-up (set -e).
  if [ -n "$GATEWAY_PID" ]; then kill "$GATEWAY_PID" 2>/dev/null || true; wait "$GATEWAY_PID" 2>/dev/null || true; fi
  if [ -n "$WORK" ]; then
    if [ "${KEEP:-0}" = 1 ]; then echo "console test: work folder kept in $WORK" >&2; else rm -rf "$WORK"; fi
  fi
}
trap cleanup EXIT

# ---- tools -------------------------------------------------------------------------------------------
for t in curl jq python3; do
  command -v "$t" >/dev/null 2>&1 || fail "'$t' not found on PATH (apt-get install -y --no-install-recommends $t)"
done
{ [ -x "$CHROMIUM" ] && [ -x "$CHROMEDRIVER" ]; } ||
  fail "$CHROMIUM and $CHROMEDRIVER are required: apt-get install -y --no-install-recommends chromium chromium-driver"

selenium_ok() {
  [ -x "$CONSOLE_VENV/bin/python" ] &&
    [ "$("$CONSOLE_VENV/bin/python" -c 'import selenium; print(selenium.__version__)' 2>/dev/null)" = "$SELENIUM_VERSION" ]
}
if ! selenium_ok; then
  echo "console test: installing selenium==$SELENIUM_VERSION into $CONSOLE_VENV"
  if [ ! -x "$CONSOLE_VENV/bin/python" ]; then
    python3 -m venv "$CONSOLE_VENV" ||
      fail "python3 -m venv $CONSOLE_VENV failed (on Debian's python3: apt-get install python3-venv)"
  fi
  "$CONSOLE_VENV/bin/python" -m pip install -q --disable-pip-version-check "selenium==$SELENIUM_VERSION" ||
    fail "pip install selenium==$SELENIUM_VERSION into $CONSOLE_VENV failed"
  selenium_ok || fail "selenium $SELENIUM_VERSION is still not importable from $CONSOLE_VENV"
fi

if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi
[ -x "$CATRACA_BIN" ] || fail "the gateway binary $CATRACA_BIN is not executable"

# ---- the gateway -------------------------------------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/catraca-console.XXXXXX")
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

# The run decides the gateway's configuration: drop inherited CATRACA_* settings (but the binary).
while read -r v; do
  case "$v" in CATRACA_BIN) ;; CATRACA_*) unset "$v" ;; esac
done < <(compgen -e)
PORT=$(free_port)
export CATRACA_LISTEN="127.0.0.1:$PORT"
export CATRACA_DATABASE_URL="sqlite://$WORK/catraca.db" CATRACA_AUDIT_DIR="$WORK/audit"
export CATRACA_MODE=staging CATRACA_INSTANCE_ID=console-test CATRACA_LOG=warn
export CATRACA_POLICIES_DIR="$ROOT/policies" CATRACA_EXECUTORS_DIR="$ROOT/executors"
# Nothing here reaches an upstream (the one collect is refused before any executor); should one be
# called, it meets a closed loopback port.
export CATRACA_LLM_BASE_URL="http://127.0.0.1:9/v1"
export CATRACA_PNCP_BASE_URL="http://127.0.0.1:9/api/consulta"
BASE="http://$CATRACA_LISTEN"
# Every catraca command runs from the work folder, where no stray catraca.toml or .env is picked up.
catraca() { (cd "$WORK" && "$CATRACA_BIN" "$@"); }

catraca migrate 2>"$WORK/migrate.log" || fail "catraca migrate failed: $(tail -n 5 "$WORK/migrate.log")"

# create_key NAME ROLE [ARGS...]: one JSON object (key, key_id, ...) on stdout.
create_key() {
  local name=$1 role=$2 out; shift 2
  out=$(catraca keys create --name "$name" --role "$role" "$@" --json 2>>"$WORK/keys.log") ||
    fail "catraca keys create --name $name --role $role $* --json failed"
  jq -e --arg r "$role" '.role == $r and (.key | test("^ck_[^_]+_.+$")) and (.key_id | type == "string")' \
    <<<"$out" >/dev/null 2>&1 || fail "catraca keys create $name: no JSON object with key, key_id and role $role: $out"
  jq -c 'del(.key)' <<<"$out" >>"$WORK/keys.log"
  printf '%s' "$out"
}
# The console reads several routes at a time; unlimited tiers keep its readers clear of the rate limit.
AUDITOR_JSON=$(create_key console-auditor auditor --tier unlimited)
ADMIN_JSON=$(create_key console-admin admin --tier unlimited)
ANALYST_JSON=$(create_key console-analyst analyst --context work)
AUDITOR_KEY=$(jq -r .key <<<"$AUDITOR_JSON")
ADMIN_KEY=$(jq -r .key <<<"$ADMIN_JSON")
ANALYST_KEY=$(jq -r .key <<<"$ANALYST_JSON")
ANALYST_ID=$(jq -r .key_id <<<"$ANALYST_JSON")

(cd "$WORK" && exec "$CATRACA_BIN" serve) 2>"$WORK/gateway.log" &
GATEWAY_PID=$!
wait_ready "$BASE/ready" "$GATEWAY_PID" || fail "the gateway did not become ready on $BASE"
echo "console test: gateway on $BASE"

curl -fsS -o "$WORK/console.html" -D "$WORK/console.headers" --max-time 5 "$BASE/console" ||
  fail "GET /console is not 200"
grep -qi '^content-security-policy:' "$WORK/console.headers" || fail "GET /console has no Content-Security-Policy header"

# ---- the trail the console will show -----------------------------------------------------------------
# post_process KEY BODY NAME: the status code; body and headers in $WORK/NAME.{json,headers}.
post_process() {
  curl -sS -o "$WORK/$3.json" -D "$WORK/$3.headers" -w '%{http_code}' --max-time 15 -X POST \
    -H 'Content-Type: application/json' -H "Authorization: Bearer $1" --data-binary "$2" "$BASE/process" ||
    echo "curl error"
}
header_of() { tr -d '\r' <"$1" | awk -v h="$2" 'tolower($1) == tolower(h ":") { print $2; exit }'; }

# policies/catraca.toml: analysts summarise but do not collect; no rule allows them
# licitacoes.collect, so the action matrix refuses it (default deny).
COLLECT='{"action":"licitacoes.collect","context_id":"work","payload":{"source":"pncp","endpoint":"publicacao","data_inicial":"2026-01-01","data_final":"2026-01-02","modalidade":6}}'
code=$(post_process "$ANALYST_KEY" "$COLLECT" denied)
[ "$code" = 403 ] || fail "the analyst's licitacoes.collect was answered $code, 403 expected: $(head -c 400 "$WORK/denied.json")"
jq -e '.gate == "action_matrix" and (.reason_codes | length > 0)' "$WORK/denied.json" >/dev/null 2>&1 ||
  fail "the 403 does not name the action_matrix gate and a reason code: $(head -c 400 "$WORK/denied.json")"
DENIED_TRACE=$(header_of "$WORK/denied.headers" X-Trace-Id)
[ -n "$DENIED_TRACE" ] || fail "the 403 has no X-Trace-Id header"
echo "console test: refused request $DENIED_TRACE ($(jq -r '.reason_codes | join(",")' "$WORK/denied.json"))"

ECHO='{"action":"echo","context_id":"work","payload":{"message":"console test"}}'
code=$(post_process "$ANALYST_KEY" "$ECHO" allowed)
[ "$code" = 200 ] || fail "the analyst's echo was answered $code, 200 expected: $(head -c 400 "$WORK/allowed.json")"
jq -e '.status == "SUCCESS"' "$WORK/allowed.json" >/dev/null 2>&1 ||
  fail "the analyst's echo is not a SUCCESS: $(head -c 400 "$WORK/allowed.json")"

# ---- the browser -------------------------------------------------------------------------------------
mkdir -p "$SCREENSHOTS"
rm -f "$SCREENSHOTS"/*.png
# The keys reach the test through its environment, not its command line (visible to ps).
CONSOLE_AUDITOR_KEY=$AUDITOR_KEY CONSOLE_ADMIN_KEY=$ADMIN_KEY SE_OFFLINE=true \
  timeout 300 "$CONSOLE_VENV/bin/python" "$ROOT/tests/browser/console_test.py" \
  --base-url "$BASE" --analyst-key-id "$ANALYST_ID" --denied-trace "$DENIED_TRACE" --screenshots "$SCREENSHOTS" ||
  fail "the browser test failed (screenshots in $SCREENSHOTS)"

# ---- what the console did, seen from the gateway -----------------------------------------------------
# A revocation reaches every gateway's key cache within a bound (about 100 ms by default): up to 2 s here.
for _ in $(seq 1 20); do
  code=$(post_process "$ANALYST_KEY" "$ECHO" after-revoke)
  [ "$code" != 200 ] && break
  sleep 0.1
done
[ "$code" = 401 ] || fail "the analyst key revoked in the console still answers $code, 401 expected"
jq -e '.reason_codes | index("AUTH_KEY_REVOKED")' "$WORK/after-revoke.json" >/dev/null 2>&1 ||
  fail "the revoked analyst key is refused without AUTH_KEY_REVOKED: $(head -c 400 "$WORK/after-revoke.json")"

# A read like the console's, under a trace id of our own, is in the trail.
CHECK_TRACE=console-audit-check-0001
code=$(curl -sS -o "$WORK/check.json" -D "$WORK/check.headers" -w '%{http_code}' --max-time 10 \
  -H "Authorization: Bearer $AUDITOR_KEY" -H "X-Trace-Id: $CHECK_TRACE" "$BASE/v1/audit/chains") || code="curl error"
[ "$code" = 200 ] || fail "GET /v1/audit/chains with the auditor key: $code"
[ "$(header_of "$WORK/check.headers" X-Trace-Id)" = "$CHECK_TRACE" ] || fail "the gateway did not keep our X-Trace-Id $CHECK_TRACE"
audited=0
for _ in $(seq 1 50); do
  code=$(curl -sS -o "$WORK/check-trace.json" -w '%{http_code}' --max-time 10 \
    -H "Authorization: Bearer $AUDITOR_KEY" "$BASE/v1/audit/traces/$CHECK_TRACE") || code="curl error"
  if [ "$code" = 200 ]; then audited=1; break; fi
  [ "$code" = 404 ] || fail "GET /v1/audit/traces/$CHECK_TRACE: $code $(head -c 300 "$WORK/check-trace.json")"
  sleep 0.1
done
[ "$audited" = 1 ] || fail "the read under trace $CHECK_TRACE is not in the trail after 5 s"
jq -e '[.events[] | select(.event_type == "DECISION" and .effect == "allow")] | length == 1' "$WORK/check-trace.json" >/dev/null ||
  fail "the trace of the read has no DECISION allow: $(head -c 600 "$WORK/check-trace.json")"
jq -e '[.events[] | select(.event_type == "REQUEST_START" and .route == "/v1/audit/chains")] | length == 1' "$WORK/check-trace.json" >/dev/null ||
  fail "the trace of the read has no REQUEST_START for /v1/audit/chains: $(head -c 600 "$WORK/check-trace.json")"

# ---- the trail is intact and holds the console's reads and change -------------------------------------
curl -fsS -o /dev/null --max-time 5 "$BASE/ready" || fail "the gateway is not ready after the run"
kill "$GATEWAY_PID" 2>/dev/null || true
wait "$GATEWAY_PID" 2>/dev/null || true
GATEWAY_PID=""
catraca audit verify >"$WORK/verify.log" 2>&1 || fail "catraca audit verify: $(tail -n 5 "$WORK/verify.log")"
catraca audit export --since 2000-01-01 --format jsonl >"$WORK/export.jsonl" 2>"$WORK/export.log" ||
  fail "catraca audit export failed: $(tail -n 5 "$WORK/export.log")"
reads=$(jq -s '[.[] | select(.event_type == "REQUEST_START" and .route == "/v1/audit/decisions")] | length' "$WORK/export.jsonl") ||
  fail "the export is not JSON Lines"
[ "$reads" -ge 1 ] || fail "no REQUEST_START with route /v1/audit/decisions in the trail: the console's reads were not audited"
revoked=$(jq -s --arg id "$ANALYST_ID" '[.[] | select(.event_type == "KEY_REVOKED" and .key_id == $id)] | length' "$WORK/export.jsonl")
[ "$revoked" -ge 1 ] || fail "no KEY_REVOKED event for the analyst key $ANALYST_ID in the trail"
echo "console test: trail verified; $reads audited read(s) of /v1/audit/decisions, the revocation recorded"
echo "CONSOLE TEST PASSED"
