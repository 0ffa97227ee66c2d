#!/usr/bin/env bash
# OpenTelemetry, held to account: a live gateway (SQLite in a temp folder, the example policies and
# executors, its LLM upstream stood in for on loopback by scripts/upstream_standin.py) exporting to a real
# OTLP/HTTP receiver on loopback (scripts/otlp_receiver.py, which decodes the protobufs with the official
# definitions from PyPI's opentelemetry-proto), with JSON logs. Then
#   1. an allowed summary sent with a W3C traceparent: a SERVER span "POST /process" under the caller's
#      trace id and span, with a child span per gate (auth, rate_limit, input, action_matrix), the two
#      audit commits (allow, outcome) and the executor; the LLM upstream received a traceparent of the
#      same trace naming the executor's span (and the PNCP upstream likewise for a collection);
#   2. a request refused at G1 under the client's own X-Trace-Id (not a W3C id): its spans carry that id
#      as catraca.trace_id, the auth gate's span says deny with the reason code, the denial's commit is
#      there and no executor ran;
#   3. the JSON log: every line is one JSON object, and the warning logged while serving request 1 (the
#      shared rate limiter is down and fails open, as configured) carries request 1's trace id;
#   4. with OTEL_EXPORTER_OTLP_ENDPOINT unset (the default) a gateway exports nothing.
# Success prints `OTLP TEST PASSED`; anything else `OTLP TEST FAILED: <why>` and the logs' tails.
#
#   bash scripts/otlp_test.sh
#   CATRACA_BIN=target/release/catraca OTLP_PYTHON=/tmp/venv/bin/python bash scripts/otlp_test.sh
#
# Environment:
#   CATRACA_BIN    gateway binary (default: cargo build --release --bin catraca)
#   OTLP_PYTHON    a python3 with opentelemetry-proto==$OTLP_PROTO_VERSION (default: a venv made in
#                  /tmp/catraca-ci-otlp when missing)
#   KEEP=1         keep the work folder (spans, logs, database)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OTLP_PROTO_VERSION=1.45.2
cd "$ROOT"

fail() {
  echo "OTLP TEST FAILED: $*" >&2
  for f in "${WORK:-/nonexistent}"/gateway.log "${WORK:-/nonexistent}"/receiver.log "${WORK:-/nonexistent}"/standin.log; do
    [ -s "$f" ] || continue
    echo "----- ${f##*/} (last 20 lines)" >&2
    tail -n 20 "$f" | sed -E 's/(ck_[A-Za-z0-9]+_)[A-Za-z0-9_-]{8,}/\1<redacted>/g' >&2
  done
  exit 1
}

command -v jq >/dev/null || fail "jq is missing"
command -v curl >/dev/null || fail "curl is missing"
if [ -z "${OTLP_PYTHON:-}" ]; then
  venv=/tmp/catraca-ci-otlp
  if ! "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('opentelemetry-proto') != '$OTLP_PROTO_VERSION')" 2>/dev/null; then
    python3 -m venv "$venv" || fail "python3 -m venv failed (Debian: apt-get install python3-venv)"
    "$venv/bin/pip" install -q "opentelemetry-proto==$OTLP_PROTO_VERSION" || fail "pip install opentelemetry-proto==$OTLP_PROTO_VERSION failed"
  fi
  OTLP_PYTHON="$venv/bin/python"
fi
"$OTLP_PYTHON" -c 'import opentelemetry.proto.collector.trace.v1.trace_service_pb2' ||
  fail "$OTLP_PYTHON cannot import opentelemetry-proto"
if [ -z "${CATRACA_BIN:-}" ]; then
  cargo build --release --bin catraca >&2
  CATRACA_BIN="$ROOT/target/release/catraca"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/catraca-otlp.XXXXXX")
PIDS=()
cleanup() {
  # `|| true`: a process that is already gone must not stop the clean-up (set -e).
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [ "${KEEP:-0}" = 1 ]; then echo "otlp: work folder kept in $WORK" >&2; else rm -rf "$WORK"; fi
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

# ---- the receiver and the upstream stand-in ----------------------------------------------------------
RECEIVER_PORT=$(free_port)
SPANS="$WORK/spans.jsonl"
touch "$SPANS"
"$OTLP_PYTHON" scripts/otlp_receiver.py --port "$RECEIVER_PORT" --out "$SPANS" 2>"$WORK/receiver.log" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$RECEIVER_PORT/health" "${PIDS[-1]}" || fail "the OTLP receiver did not start"
STANDIN_PORT=$(free_port)
python3 scripts/upstream_standin.py --port "$STANDIN_PORT" --fixtures tests/fixtures/pncp 2>"$WORK/standin.log" &
PIDS+=($!)
wait_ready "http://127.0.0.1:$STANDIN_PORT/health" "${PIDS[-1]}" || fail "the upstream stand-in did not start"

# ---- the gateway -------------------------------------------------------------------------------------
while read -r v; do
  case "$v" in CATRACA_BIN) ;; CATRACA_* | OTEL_*) unset "$v" ;; esac
done < <(compgen -e)
# A shared rate limiter where nothing listens, failing open: every request is served and logs a warning
# while it is served, which is the log line step 3 looks for.
cat >"$WORK/catraca.toml" <<'TOML'
rate_limit_fail_open = true
TOML
PORT=$(free_port)
export CATRACA_CONFIG="$WORK/catraca.toml" CATRACA_LISTEN="127.0.0.1:$PORT"
export CATRACA_DATABASE_URL="sqlite://$WORK/catraca.db" CATRACA_AUDIT_DIR="$WORK/audit"
export CATRACA_MODE=staging CATRACA_INSTANCE_ID=otlp-test CATRACA_LOG=warn CATRACA_LOG_FORMAT=json
export CATRACA_POLICIES_DIR="$ROOT/policies" CATRACA_EXECUTORS_DIR="$ROOT/executors"
export CATRACA_LLM_BASE_URL="http://127.0.0.1:$STANDIN_PORT/v1"
export CATRACA_PNCP_BASE_URL="http://127.0.0.1:$STANDIN_PORT/api/consulta"
export CATRACA_REDIS_URL="redis://127.0.0.1:$(free_port)"
BASE="http://$CATRACA_LISTEN"

"$CATRACA_BIN" migrate 2>"$WORK/migrate.log" || fail "catraca migrate failed: $(tail -n 5 "$WORK/migrate.log")"
KEY=$("$CATRACA_BIN" keys create --name otlp --role analyst --context work 2>"$WORK/keys.log") ||
  fail "catraca keys create failed: $(tail -n 5 "$WORK/keys.log")"
OPERATOR_KEY=$("$CATRACA_BIN" keys create --name otlp-operator --role operator --context work 2>>"$WORK/keys.log") ||
  fail "catraca keys create failed: $(tail -n 5 "$WORK/keys.log")"
OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$RECEIVER_PORT" OTEL_BSP_SCHEDULE_DELAY=100 \
  "$CATRACA_BIN" serve >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
wait_ready "$BASE/ready" "$GATEWAY_PID" || fail "the gateway did not become ready"
echo "otlp: gateway on $BASE exporting to 127.0.0.1:$RECEIVER_PORT"

# ---- the requests ------------------------------------------------------------------------------------
TRACE=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
CALLER=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
summary='{"action":"licitacoes.summarize","context_id":"work","payload":{"text":"Aquisição de material de expediente para as escolas municipais.","title":"Prefeitura Municipal de Exemplo"}}'
status=$(curl -sS -o "$WORK/allowed.json" -w '%{http_code}' "$BASE/process" -H "X-API-Key: $KEY" \
  -H 'Content-Type: application/json' -H "traceparent: 00-$TRACE-$CALLER-01" -d "$summary")
[ "$status" = 200 ] || fail "the summary was answered $status: $(cat "$WORK/allowed.json")"
[ "$(jq -r .trace_id "$WORK/allowed.json")" = "$TRACE" ] || fail "the answer's trace id is not the traceparent's"
COLLECT_TRACE=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
collect='{"action":"licitacoes.collect","context_id":"work","payload":{"source":"pncp","endpoint":"publicacao","data_inicial":"2026-01-01","data_final":"2026-01-02","modalidade":6}}'
status=$(curl -sS -o "$WORK/collect.json" -w '%{http_code}' "$BASE/process" -H "X-API-Key: $OPERATOR_KEY" \
  -H 'Content-Type: application/json' -H "traceparent: 00-$COLLECT_TRACE-$CALLER-01" -d "$collect")
[ "$status" = 200 ] || fail "the collection was answered $status: $(cat "$WORK/collect.json")"
REFUSED=otlp-refused-0001
status=$(curl -sS -o "$WORK/refused.json" -w '%{http_code}' "$BASE/process" -H "X-API-Key: ck_0000000000000000_nope" \
  -H 'Content-Type: application/json' -H "X-Trace-Id: $REFUSED" -d "$summary")
[ "$status" = 401 ] || fail "the unknown key was answered $status: $(cat "$WORK/refused.json")"

# ---- 1 and 2: the spans ------------------------------------------------------------------------------
for _ in $(seq 1 100); do
  [ "$(jq -s --arg t "$TRACE" '[.[] | select(.trace_id == $t and .kind == "SERVER")] | length' "$SPANS")" -ge 1 ] &&
    [ "$(jq -s --arg r "$REFUSED" '[.[] | select(.attributes["catraca.trace_id"] == $r)] | length' "$SPANS")" -ge 1 ] && break
  sleep 0.1
done
HITS=$(curl -fsS "http://127.0.0.1:$STANDIN_PORT/hits")
"$OTLP_PYTHON" - "$SPANS" "$TRACE" "$CALLER" "$REFUSED" "$HITS" "$COLLECT_TRACE" <<'PY' || fail "the spans are not as they should be (above)"
import hashlib, json, sys
spans_file, trace, caller, refused, hits, collect_trace = sys.argv[1:]
spans = [json.loads(line) for line in open(spans_file)]
problems = []
def check(ok, what):
    if not ok:
        problems.append(what)

mine = [s for s in spans if s["trace_id"] == trace]
roots = [s for s in mine if s["kind"] == "SERVER"]
check(len(roots) == 1, f"one SERVER span for trace {trace}, got {len(roots)}")
if roots:
    root = roots[0]
    check(root["name"] == "POST /process", f"root span name {root['name']!r}")
    check(root["parent_span_id"] == caller, f"root's parent {root['parent_span_id']!r}, the caller's span is {caller}")
    check(root["attributes"].get("http.response.status_code") == 200, f"root status attribute {root['attributes']}")
    check(root["resource"].get("service.name") == "catraca", f"resource {root['resource']}")
    children = [s for s in mine if s["parent_span_id"] == root["span_id"]]
    names = sorted(s["name"] for s in children)
    want = sorted(["gate auth", "gate rate_limit", "gate input", "gate action_matrix",
                   "audit commit", "audit commit", "executor summarizer"])
    check(names == want, f"children of the request span: {names}, expected {want}")
    for s in children:
        check(root["start"] <= s["start"] <= s["end"] <= root["end"], f"{s['name']} lies outside the request span")
        if s["name"].startswith("gate "):
            check(s["attributes"].get("catraca.verdict") == "allow", f"{s['name']}: {s['attributes']}")
    moments = sorted(s["attributes"].get("catraca.audit.moment") for s in children if s["name"] == "audit commit")
    check(moments == ["allow", "outcome"], f"audit commits {moments}")
    executor = [s for s in children if s["name"] == "executor summarizer"]
    if executor:
        sent = json.loads(hits)["traceparents"]["llm"]
        want_tp = f"00-{trace}-{executor[0]['span_id']}-01"
        check(want_tp in sent, f"the LLM upstream got traceparents {sent}, expected {want_tp}")

collector = [s for s in spans if s["trace_id"] == collect_trace and s["name"] == "executor pncp"]
check(len(collector) == 1, f"one executor span for the collection, got {len(collector)}")
if collector:
    sent = json.loads(hits)["traceparents"]["pncp"]
    want_tp = f"00-{collect_trace}-{collector[0]['span_id']}-01"
    check(sent and all(t == want_tp for t in sent), f"the PNCP upstream got traceparents {sent}, expected {want_tp}")

theirs = [s for s in spans if s["attributes"].get("catraca.trace_id") == refused]
check(len(theirs) == 1, f"one span carries catraca.trace_id={refused}, got {len(theirs)}")
if theirs:
    root = theirs[0]
    expected = hashlib.sha256(refused.encode()).hexdigest()[:32]
    check(root["trace_id"] == expected, f"the refused request's trace id {root['trace_id']}, expected {expected}")
    check(root["parent_span_id"] == "", "a request without traceparent has no parent")
    kids = [s for s in spans if s["parent_span_id"] == root["span_id"]]
    names = sorted(s["name"] for s in kids)
    check(names == ["audit commit", "gate auth"], f"children of the refused request: {names}")
    auth = [s for s in kids if s["name"] == "gate auth"]
    if auth:
        a = auth[0]["attributes"]
        check(a.get("catraca.verdict") == "deny" and a.get("catraca.reason_codes") == "AUTH_INVALID_KEY", f"gate auth: {a}")

for p in problems:
    print("  -", p)
if not problems:
    print(f"otlp: {len(spans)} spans; trace {trace}: request span under the caller's, 7 children; refused request under its derived trace id")
sys.exit(1 if problems else 0)
PY

# ---- 3: the JSON log ---------------------------------------------------------------------------------
jq -e . "$WORK/gateway.log" >/dev/null 2>&1 || fail "the log is not one JSON object per line"
[ "$(jq -s --arg t "$TRACE" '[.[] | select((.span.trace_id // .spans[0].trace_id // .trace_id) == $t)] | length' "$WORK/gateway.log")" -ge 1 ] ||
  fail "no log line carries trace id $TRACE"
echo "otlp: the JSON log carries trace $TRACE"

# ---- 4: off by default -------------------------------------------------------------------------------
kill -TERM "$GATEWAY_PID"
wait "$GATEWAY_PID" || fail "the gateway did not stop cleanly"
before=$(wc -l <"$SPANS")
PORT=$(free_port)
export CATRACA_LISTEN="127.0.0.1:$PORT"
BASE="http://$CATRACA_LISTEN"
"$CATRACA_BIN" serve >"$WORK/gateway.out" 2>"$WORK/gateway.log" &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
wait_ready "$BASE/ready" "$GATEWAY_PID" || fail "the gateway without OTLP did not become ready"
status=$(curl -sS -o /dev/null -w '%{http_code}' "$BASE/process" -H "X-API-Key: $KEY" \
  -H 'Content-Type: application/json' -d "$summary")
[ "$status" = 200 ] || fail "the summary without OTLP was answered $status"
kill -TERM "$GATEWAY_PID"
wait "$GATEWAY_PID" || fail "the gateway without OTLP did not stop cleanly"
[ "$(wc -l <"$SPANS")" = "$before" ] || fail "a gateway without OTEL_EXPORTER_OTLP_ENDPOINT exported spans"
[ "$(jq -r '.traceparents.llm | length' <<<"$(curl -fsS "http://127.0.0.1:$STANDIN_PORT/hits")")" = 1 ] ||
  fail "a gateway that does not trace sent traceparent upstream"

echo "OTLP TEST PASSED"
