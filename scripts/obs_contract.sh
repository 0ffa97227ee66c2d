#!/usr/bin/env bash
# Catraca observability contract (fail closed).
#
#   bash scripts/obs_contract.sh [--mode dev|staging]      (default dev)
#
# Starts, on loopback ports picked at random: a webhook receiver, Alertmanager, the gateway (SQLite in a
# temp dir), Prometheus (rendered from observability/prometheus/prometheus.yml); drives traffic through
# every gate (the LLM and PNCP upstreams are stood in for by the webhook receiver, on loopback); then
# asserts through the Prometheus HTTP API that the metric catalogue (names AND label sets) is exported
# and nothing outside it, every dashboard panel query returns data (a non-empty vector or matrix: a scalar
# or an empty result is not data), every alert rule is loaded and healthy, and that killing the gateway
# makes CatracaDown fire and reach the webhook.
# Any failed check stops the run: `OBS CONTRACT FAILED: <first failed check>` and a non-zero exit, after
# printing the tails of the evidence (logs, query responses, webhook payloads).
# Success prints `OBS CONTRACT PASSED (<n> checks)`.
#
# Prerequisites (Debian 12; promtool comes with prometheus, amtool with prometheus-alertmanager):
#   apt-get update && apt-get install -y --no-install-recommends \
#     prometheus prometheus-alertmanager jq curl docker-compose
# plus python3 (stdlib only) and cargo. Every one is required: a missing tool (docker-compose included)
# or a missing observability/prometheus/alerts_test.yml fails the contract, naming what is missing.
#
# Environment:
#   CATRACA_BIN          gateway binary to test (default: cargo build --release --bin catraca)
#   OBS_RULES_FILE       alert rules (default observability/prometheus/alerts.yml)
#   OBS_DASHBOARD_FILE   Grafana dashboard (default observability/grafana/dashboards/catraca.json)
#   OBS_CATALOGUE_FILE   expected metric catalogue, one `name{label,...}` a line (default: built in,
#                        print it with --print-catalogue)
#   OBS_KEEP_EVIDENCE=1  keep the evidence folder after a successful run (always kept on failure)
#   OBS_ALERT_TIMEOUT    seconds to wait for CatracaDown to fire (default 120)
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# ---- the metric catalogue (DESIGN.md "Metrics"): exact label names, ignoring job/instance ------------
CATALOGUE='
catraca_requests_total{route,method,status}
catraca_request_duration_seconds_bucket{route,le}
catraca_request_duration_seconds_sum{route}
catraca_request_duration_seconds_count{route}
catraca_gate_decisions_total{gate,decision,reason}
catraca_gate_duration_seconds_bucket{gate,le}
catraca_gate_duration_seconds_sum{gate}
catraca_gate_duration_seconds_count{gate}
catraca_executor_calls_total{executor,status}
catraca_executor_duration_seconds_bucket{executor,le}
catraca_executor_duration_seconds_sum{executor}
catraca_executor_duration_seconds_count{executor}
catraca_action_results_total{action,status}
catraca_llm_tokens_total{executor,kind}
catraca_collector_refusals_total{executor,reason}
catraca_collector_runs_total{executor,outcome}
catraca_audit_events_total{event_type}
catraca_audit_write_failures_total{}
catraca_checkpoints_total{}
catraca_witness_failures_total{}
catraca_audit_flush_duration_seconds_bucket{le}
catraca_audit_flush_duration_seconds_sum{}
catraca_audit_flush_duration_seconds_count{}
catraca_audit_queue_depth{}
catraca_rate_limiter_available{}
catraca_build_info{version}
'
# Gate decisions the traffic below must have produced (label matchers).
GATE_DECISIONS=(
  'gate="auth",decision="deny"'
  'gate="rate_limit",decision="deny"'
  'gate="input",decision="deny"'
  'gate="action_matrix",decision="deny"'
  'decision="allow"'
)

MODE=dev
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --mode) MODE=${2:-}; shift 2 || { echo "--mode needs a value" >&2; exit 2; } ;;
    --mode=*) MODE=${1#--mode=}; shift ;;
    --print-catalogue) printf '%s\n' "$CATALOGUE" | sed '/^$/d'; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$MODE" in dev|staging) ;; *) echo "--mode must be dev or staging, not '$MODE'" >&2; exit 2 ;; esac

PROM_CONFIG="$ROOT/observability/prometheus/prometheus.yml"
RULES_FILE=${OBS_RULES_FILE:-$ROOT/observability/prometheus/alerts.yml}
RULES_TEST="$ROOT/observability/prometheus/alerts_test.yml"
AM_TEMPLATE="$ROOT/observability/alertmanager/alertmanager.yml"
AM_RENDER="$ROOT/observability/alertmanager/render.sh"
DASHBOARD=${OBS_DASHBOARD_FILE:-$ROOT/observability/grafana/dashboards/catraca.json}
DATASOURCE="$ROOT/observability/grafana/provisioning/datasources/prometheus.yml"
WEBHOOK_PY="$ROOT/scripts/webhook_receiver.py"
ALERT_TIMEOUT=${OBS_ALERT_TIMEOUT:-120}

# The contract decides the gateway's configuration: drop inherited CATRACA_* settings (but the binary
# path and the log filter).
while read -r v; do
  case "$v" in CATRACA_BIN|CATRACA_LOG) ;; CATRACA_*) unset "$v" ;; esac
done < <(compgen -e)

EV=$(mktemp -d "${TMPDIR:-/tmp}/catraca-obs.XXXXXX")
mkdir -p "$EV/http" "$EV/queries"
declare -A PIDS=()
CHECKS=0
FAILED_CHECK=""
PASSED=0
HN=0
body_last=""

# ---- bookkeeping --------------------------------------------------------------------------------------
log() { printf '[obs %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
ok() { CHECKS=$((CHECKS + 1)); printf '  ok %3d  %s\n' "$CHECKS" "$1"; }
fail() {
  FAILED_CHECK=$1
  printf '  FAIL     %s\n' "$1" >&2
  [[ $# -gt 1 ]] && printf '%s\n' "${@:2}" | redact | sed 's/^/           /' >&2
  exit 1
}
on_err() { [[ -n "$FAILED_CHECK" ]] || FAILED_CHECK="unexpected error at line $1: $2"; }
trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR
trap 'FAILED_CHECK=${FAILED_CHECK:-"interrupted by a signal"}; exit 130' INT TERM

stop_proc() {
  local name=$1 pid=${PIDS[$1]:-} i
  [[ -n "$pid" ]] || return 0
  unset "PIDS[$name]"
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# API key secrets (ck_<id>_<secret>, e.g. the dev-mode bootstrap key the gateway prints once) never
# reach the CI log.
redact() { sed -E 's/(ck_[A-Za-z0-9]+_)[A-Za-z0-9_-]{8,}/\1<redacted>/g'; }
print_evidence() {
  local f
  echo "================ evidence: $EV ================"
  for f in "$EV"/*.log "$EV"/webhook.jsonl; do
    [[ -s "$f" ]] || continue
    echo "----- ${f#"$EV"/} (last 40 lines)"
    tail -n 40 "$f" | redact
  done
  if compgen -G "$EV/queries/*.json" >/dev/null; then
    echo "----- last Prometheus queries and responses"
    # shellcheck disable=SC2012
    for f in $(ls -1 "$EV"/queries/*.json | tail -n 4); do echo "## ${f#"$EV"/}"; head -c 1500 "$f" | redact; echo; done
  fi
  if compgen -G "$EV/http/*" >/dev/null; then
    echo "----- last HTTP response bodies"
    # shellcheck disable=SC2010,SC2012
    for f in $(ls -1 "$EV"/http/* | grep -v '\.headers$' | tail -n 3); do echo "## ${f#"$EV"/}"; head -c 1500 "$f" | redact; echo; done
  fi
  echo "================ end of evidence ================"
}

on_exit() {
  local rc=$?
  set +e
  trap - ERR
  for name in "${!PIDS[@]}"; do stop_proc "$name"; done
  if [[ $rc -eq 0 && $PASSED -eq 1 ]]; then
    if [[ "${OBS_KEEP_EVIDENCE:-0}" == 1 ]]; then echo "evidence kept in $EV"; else rm -rf "$EV"; fi
    echo "OBS CONTRACT PASSED ($CHECKS checks)"
    exit 0
  fi
  [[ $rc -ne 0 ]] || rc=1
  print_evidence >&2
  echo "OBS CONTRACT FAILED: ${FAILED_CHECK:-unknown (exit status $rc)}" >&2
  exit "$rc"
}
trap on_exit EXIT

start_bg() { # NAME COMMAND...: run in the background, output to $EV/NAME.log
  local name=$1; shift
  "$@" >"$EV/$name.log" 2>&1 &
  PIDS[$name]=$!
}
alive() { [[ -n "${PIDS[$1]:-}" ]] && kill -0 "${PIDS[$1]}" 2>/dev/null; }

# wait_for SECONDS PROC_NAME|- COMMAND...: retry COMMAND every second until it succeeds; fail fast if
# the named background process died.
wait_for() {
  local timeout=$1 proc=$2; shift 2
  local deadline=$((SECONDS + timeout))
  while true; do
    if "$@"; then return 0; fi
    if [[ "$proc" != - ]] && ! alive "$proc"; then return 2; fi
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}

http_ok() { curl -fsS -o /dev/null --max-time 2 "$1" 2>/dev/null; }

# Prometheus instant query; prints the JSON response, also kept as evidence (named by time, so that
# it works in pipelines and command substitutions too).
pq() {
  local out
  out="$EV/queries/$(date +%s%N)-$BASHPID.json"
  printf '%s\n' "{\"query\":$(jq -Rn --arg q "$1" '$q')}" >"$out"
  curl -sS --max-time 10 --get --data-urlencode "query=$1" "$PROM/api/v1/query" >>"$out" 2>>"$EV/curl.log" || true
  sed 1d "$out"
}
# True when the query returns data: a non-empty vector or matrix. A scalar (`scalar(...)`, a number
# literal) or an empty result is not data.
pq_nonempty() {
  pq "$1" | jq -e '.status == "success" and (.data.resultType == "vector" or .data.resultType == "matrix")
      and (.data.result | length) > 0' >/dev/null 2>&1
}

sed_repl() { printf '%s' "$1" | sed -e 's/[\\&#]/\\&/g'; }

# ---- 1. tools -------------------------------------------------------------------------------------------
log "mode=$MODE root=$ROOT evidence=$EV"
AM_BIN=""
for c in prometheus-alertmanager alertmanager; do
  if command -v "$c" >/dev/null 2>&1; then AM_BIN=$(command -v "$c"); break; fi
done
for t in prometheus promtool amtool docker-compose jq curl python3 awk; do
  command -v "$t" >/dev/null 2>&1 || fail "tool installed: $t" \
    "'$t' not found in PATH: apt-get install -y --no-install-recommends prometheus prometheus-alertmanager docker-compose jq curl python3"
done
[[ -n "$AM_BIN" ]] || fail "tool installed: alertmanager" \
  "neither 'prometheus-alertmanager' (Debian) nor 'alertmanager' found: apt-get install -y prometheus-alertmanager"
ok "tools present (prometheus, promtool, $(basename "$AM_BIN"), amtool, docker-compose, jq, curl, python3)"

# ---- 2. static checks -----------------------------------------------------------------------------------
promtool check config "$PROM_CONFIG" >"$EV/promtool-config.log" 2>&1 ||
  fail "promtool check config ${PROM_CONFIG#"$ROOT"/}" "$(cat "$EV/promtool-config.log")"
ok "promtool check config ${PROM_CONFIG#"$ROOT"/}"

[[ -f "$RULES_FILE" ]] || fail "promtool check rules $RULES_FILE" "no such file"
RULES_ABS=$(cd "$(dirname "$RULES_FILE")" && pwd)/$(basename "$RULES_FILE")
promtool check rules "$RULES_ABS" >"$EV/promtool-rules.log" 2>&1 ||
  fail "promtool check rules ${RULES_ABS#"$ROOT"/}" "$(cat "$EV/promtool-rules.log")"
ok "promtool check rules ${RULES_ABS#"$ROOT"/}"

[[ -f "$RULES_TEST" ]] || fail "alert rule unit tests present: ${RULES_TEST#"$ROOT"/}" \
  "no such file: the rule unit tests are part of the contract, they are never skipped"
sed -E "s#^([[:space:]]*-[[:space:]]*)['\"]?alerts\.yml['\"]?[[:space:]]*\$#\1$(sed_repl "$RULES_ABS")#" \
  "$RULES_TEST" >"$EV/alerts_test.yml"
promtool test rules "$EV/alerts_test.yml" >"$EV/promtool-test.log" 2>&1 ||
  fail "promtool test rules (${RULES_TEST#"$ROOT"/} against ${RULES_ABS#"$ROOT"/})" \
    "$(tail -n 30 "$EV/promtool-test.log")"
ok "promtool test rules (every alert fires on a bad series, stays quiet on a healthy one)"

ALERT_NAMES=$(sed -nE "s/^[[:space:]]*-?[[:space:]]*alert:[[:space:]]*['\"]?([A-Za-z_:][A-Za-z0-9_:]*).*/\1/p" "$RULES_ABS")
for a in CatracaDown HighLatencyP95 HighErrorRate HighDenyRate AuditWriteFailures AuditQueueSaturated RateLimiterDown CollectorRunsFailing; do
  grep -qx "$a" <<<"$ALERT_NAMES" || fail "alert rule defined: $a" "alert names found in $RULES_ABS: ${ALERT_NAMES//$'\n'/ }"
done
ok "alert rules defined: ${ALERT_NAMES//$'\n'/ }"

# Every alert carries severity, summary and runbook.
for a in $ALERT_NAMES; do
  block=$(awk -v a="$a" '
    $0 ~ "alert:[[:space:]]*[\"'\'']?" a "[\"'\'']?[[:space:]]*$" {on=1; print; next}
    on && /^[[:space:]]*-[[:space:]]*(alert|record):/ {on=0}
    on {print}' "$RULES_ABS")
  for k in 'severity:[[:space:]]*(critical|warning)' 'summary:' 'runbook:'; do
    grep -Eq "$k" <<<"$block" || fail "alert $a has $k" "$block"
  done
done
ok "every alert has labels.severity (critical|warning), annotations.summary and annotations.runbook"

# Alertmanager: render the template with a dummy URL and validate.
if ! { CATRACA_ALERT_WEBHOOK_URL=http://127.0.0.1:9/static-check \
      sh "$AM_RENDER" "$AM_TEMPLATE" "$EV/alertmanager-static.yml" >"$EV/amtool.log" 2>&1 &&
    amtool check-config "$EV/alertmanager-static.yml" >>"$EV/amtool.log" 2>&1; }; then
  fail "alertmanager config renders and validates (render.sh + amtool check-config)" "$(cat "$EV/amtool.log")"
fi
for r in critical warning; do
  grep -Eq "^[[:space:]]*-[[:space:]]*name:[[:space:]]*${r}[[:space:]]*\$" "$AM_TEMPLATE" ||
    fail "alertmanager has a '$r' receiver"
done
ok "alertmanager config renders and validates, receivers critical and warning"

jq -e '.panels | length > 0' "$DASHBOARD" >/dev/null 2>&1 ||
  fail "dashboard JSON well-formed with panels: $DASHBOARD"
jq '[.. | objects | select(has("gridPos") and .type != "row")
     | {title, exprs: [(.targets // [])[] | .expr // "" | select(. != "")]}]' "$DASHBOARD" >"$EV/panels.json"
bad=$(jq -r '.[] | select(.exprs | length == 0) | .title' "$EV/panels.json" | head -n1)
[[ -z "$bad" ]] || fail "dashboard panel '$bad' has a query"
ok "dashboard JSON well-formed, $(jq length "$EV/panels.json") panels, each with a query"

DS_UID=$(sed -nE "s/^[[:space:]]*uid:[[:space:]]*['\"]?([^'\" ]+).*/\1/p" "$DATASOURCE" | head -n1)
bad=$(jq -r --arg u "$DS_UID" '[.. | objects | select(has("datasource")) | .datasource
       | select(type == "object" and .uid != $u) | .uid] | unique | join(",")' "$DASHBOARD")
[[ -n "$DS_UID" && -z "$bad" ]] ||
  fail "dashboard datasource uid matches provisioning ('$DS_UID')" "other uids in the dashboard: $bad"
ok "dashboard datasource uid matches the provisioned datasource ($DS_UID)"

for set in "docker-compose.yml" "docker-compose.yml docker-compose.metrics.yml" \
           "docker-compose.yml docker-compose.metrics.yml docker-compose.grafana.yml" \
           "docker-compose.yml docker-compose.fleet.yml"; do
  args=(); for f in $set; do args+=(-f "$ROOT/$f"); done
  (cd "$ROOT" && POSTGRES_PASSWORD=contract CATRACA_ALERT_WEBHOOK_URL=http://127.0.0.1:9/x \
    GRAFANA_ADMIN_PASSWORD=contract CATRACA_TLS_PEM=/dev/null CATRACA_AUDIT_KEY_FILE=/dev/null docker-compose "${args[@]}" config -q) \
    >"$EV/compose.log" 2>&1 || fail "docker-compose config: $set" "$(cat "$EV/compose.log")"
done
ok "compose files validate (base, +metrics, +grafana, +fleet)"

# ---- 3. the gateway binary ------------------------------------------------------------------------------
if [[ -n "${CATRACA_BIN:-}" ]]; then
  BIN=$CATRACA_BIN
else
  log "building the gateway: cargo build --release --bin catraca (log: $EV/cargo-build.log)"
  (cd "$ROOT" && cargo build --release --bin catraca) >"$EV/cargo-build.log" 2>&1 ||
    fail "gateway binary builds (cargo build --release --bin catraca)" "$(tail -n 30 "$EV/cargo-build.log")"
  BIN="$ROOT/target/release/catraca"
fi
[[ -x "$BIN" ]] || fail "gateway binary is executable: $BIN"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
ok "gateway binary: ${BIN#"$ROOT"/}"

# ---- 4. processes ---------------------------------------------------------------------------------------
read -r GW_PORT PROM_PORT AM_PORT HOOK_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(4)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))
for s in ss:
    s.close()')
GW="http://127.0.0.1:$GW_PORT"; PROM="http://127.0.0.1:$PROM_PORT"
AM="http://127.0.0.1:$AM_PORT"; HOOK="http://127.0.0.1:$HOOK_PORT"
log "ports: gateway=$GW_PORT prometheus=$PROM_PORT alertmanager=$AM_PORT webhook=$HOOK_PORT"

: >"$EV/webhook.jsonl"
start_bg webhook python3 "$WEBHOOK_PY" --port "$HOOK_PORT" --out "$EV/webhook.jsonl"
wait_for 15 webhook http_ok "$HOOK/health" || fail "webhook receiver starts on $HOOK"
ok "webhook receiver listening ($HOOK)"

if ! { CATRACA_ALERT_WEBHOOK_URL="$HOOK/alerts/critical" CATRACA_ALERT_WEBHOOK_URL_WARNING="$HOOK/alerts/warning" \
      sh "$AM_RENDER" "$AM_TEMPLATE" "$EV/alertmanager.yml" >"$EV/amtool-runtime.log" 2>&1 &&
    amtool check-config "$EV/alertmanager.yml" >>"$EV/amtool-runtime.log" 2>&1; }; then
  fail "alertmanager runtime config renders" "$(cat "$EV/amtool-runtime.log")"
fi
mkdir -p "$EV/alertmanager-data"
start_bg alertmanager "$AM_BIN" --config.file="$EV/alertmanager.yml" --storage.path="$EV/alertmanager-data" \
  --web.listen-address="127.0.0.1:$AM_PORT" --cluster.listen-address=
wait_for 30 alertmanager http_ok "$AM/-/ready" || fail "alertmanager starts on $AM"
ok "alertmanager ready ($AM)"

GW_ENV=(
  CATRACA_LISTEN="127.0.0.1:$GW_PORT"
  CATRACA_DATABASE_URL="sqlite://$EV/catraca.db"
  CATRACA_AUDIT_DIR="$EV/audit"
  CATRACA_MODE="$MODE"
  CATRACA_POLICIES_DIR="$ROOT/policies"
  CATRACA_EXECUTORS_DIR="$ROOT/executors"
  CATRACA_INSTANCE_ID=obs-contract
  CATRACA_LLM_BASE_URL="$HOOK/v1"
  CATRACA_PNCP_BASE_URL="$HOOK/pncp"
  CATRACA_LOG="${CATRACA_LOG:-info}"
)
# Run from the evidence folder so that no stray catraca.toml or .env of the work tree is picked up.
cd "$EV"
start_bg gateway env "${GW_ENV[@]}" "$BIN" serve
rc=0; wait_for 30 gateway http_ok "$GW/ready" || rc=$?
[[ $rc -eq 0 ]] || fail "gateway GET /ready is 200 within 30s" \
  "$([[ $rc -eq 2 ]] && echo "the gateway process exited" || echo "timed out")"
ok "gateway ready ($GW, mode $MODE)"

create_key() { # VAR NAME ROLE [TIER]: the new key's secret into VAR
  local var=$1 args=(keys create --name "$2" --role "$3" --json) out
  [[ -z "${4:-}" ]] || args+=(--tier "$4")
  if ! out=$(cd "$EV" && env "${GW_ENV[@]}" "$BIN" "${args[@]}" 2>>"$EV/keys.log"); then
    fail "keys create --name $2 --role $3${4:+ --tier $4} --json" "$(tail -n 10 "$EV/keys.log")"
  fi
  jq -e --arg n "$2" --arg r "$3" 'has("key_id") and .name == $n and .role == $r and has("tier") and has("contexts")
      and (.key | test("^ck_.+_.+$"))' <<<"$out" >/dev/null 2>&1 ||
    fail "keys create $2: one JSON object with key (ck_<id>_<secret>), key_id, name, role, tier, contexts" \
      "$(sed -E 's/ck_[A-Za-z0-9]+_[A-Za-z0-9_-]+/ck_<redacted>/g' <<<"$out")"
  printf -v "$var" '%s' "$(jq -r .key <<<"$out")"
  jq -c 'del(.key)' <<<"$out" >>"$EV/keys.log"
}
create_key ADMIN_KEY obs-admin admin unlimited
create_key ANALYST_KEY obs-analyst analyst
create_key STD_KEY obs-std admin standard
ok "keys created with the CLI while the server runs (admin/unlimited, analyst, admin/standard)"

# Prometheus: the committed config, rendered for loopback.
sed -E -e "s#catraca:8000#127.0.0.1:$GW_PORT#" -e "s#alertmanager:9093#127.0.0.1:$AM_PORT#" \
  -e "s#^([[:space:]]*-[[:space:]]*)['\"]?alerts\.yml['\"]?[[:space:]]*\$#\1$(sed_repl "$RULES_ABS")#" \
  "$PROM_CONFIG" >"$EV/prometheus.yml"
{ grep -q "127.0.0.1:$GW_PORT" "$EV/prometheus.yml" && grep -q "127.0.0.1:$AM_PORT" "$EV/prometheus.yml" &&
  grep -qF "$RULES_ABS" "$EV/prometheus.yml" && ! grep -Eq 'catraca:8000|alertmanager:9093' "$EV/prometheus.yml" &&
  promtool check config "$EV/prometheus.yml" >"$EV/promtool-runtime.log" 2>&1; } ||
  fail "prometheus config renders for loopback (targets catraca:8000, alertmanager:9093, rule file alerts.yml)" \
    "$(cat "$EV/prometheus.yml" "$EV/promtool-runtime.log" 2>/dev/null)"
mkdir -p "$EV/prometheus-data"
start_bg prometheus prometheus --config.file="$EV/prometheus.yml" --storage.tsdb.path="$EV/prometheus-data" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --storage.tsdb.retention.time=1h
wait_for 30 prometheus http_ok "$PROM/-/ready" || fail "prometheus starts on $PROM"
ok "prometheus ready ($PROM), scraping 127.0.0.1:$GW_PORT every 5s"

# ---- 5. traffic -----------------------------------------------------------------------------------------
# expect ROUND NAME CODE METHOD PATH [curl args...]
expect() {
  local round=$1 name=$2 code=$3 method=$4 path=$5; shift 5
  HN=$((HN + 1))
  local body got
  body="$EV/http/$(printf '%03d' "$HN")-r$round-$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.-' '_' | cut -c1-50)"
  body_last=$body
  got=$(curl -sS -o "$body" -D "$body.headers" -w '%{http_code}' --max-time 15 -X "$method" "$@" "$GW$path" \
    2>>"$EV/curl.log") || got="curl error"
  printf 'round %s  %-48s %s %s -> %s\n' "$round" "$name" "$method" "$path" "$got" >>"$EV/http.log"
  [[ "$got" == "$code" ]] || fail "HTTP $name: $method $path expected $code, got $got" "$(head -c 600 "$body" 2>/dev/null)"
}
J=(-H 'Content-Type: application/json')
ECHO='{"action":"echo","context_id":"work","payload":{"message":"hi"}}'
COLLECT='{"action":"licitacoes.collect","context_id":"work","payload":{"source":"pncp","endpoint":"publicacao","data_inicial":"2026-01-01","data_final":"2026-01-02","modalidade":6}}'
SUMMARIZE='{"action":"licitacoes.summarize","context_id":"work","payload":{"text":"Aquisição de papel A4 para a secretaria."}}'

pncp_hits() { curl -fsS --max-time 2 "$HOOK/hits" 2>/dev/null | jq -r '.pncp' 2>/dev/null; }
pncp_hits_above() { local n; n=$(pncp_hits) && [[ "$n" =~ ^[0-9]+$ ]] && ((n > $1)); }

# A collector run whose PNCP page the stand-in holds keeps the run's lock; a second run of the same
# query meanwhile is refused (502, naming the run in progress, counted as reason="busy"); released, the
# first run ends as an empty complete run (200).
collector_busy() {
  local r=$1 query hits0 held code
  # A query of its own per round: the collector caches pages, and a cached page never reaches the stand-in.
  query=$(jq -c --arg d "2026-02-0$r" '.payload.data_inicial = $d | .payload.data_final = $d' <<<"$COLLECT")
  hits0=$(pncp_hits) || fail "the PNCP stand-in answers GET $HOOK/hits"
  HN=$((HN + 1))
  held="$EV/http/$(printf '%03d' "$HN")-r$r-collector_held_run"
  curl -sS -o "$held" -w '%{http_code}' --max-time 60 -X POST "${J[@]}" -H "X-API-Key: $ADMIN_KEY" \
    --data-binary "$query" "$GW/process" >"$held.code" 2>>"$EV/curl.log" &
  PIDS[held-collect]=$!
  wait_for 30 held-collect pncp_hits_above "$hits0" ||
    fail "collector: a licitacoes.collect run reaches the PNCP stand-in (CATRACA_PNCP_BASE_URL=$HOOK/pncp)" \
      "$(head -c 600 "$held" 2>/dev/null)"
  expect "$r" "collector busy: the same query while a run holds it" 502 POST /process "${J[@]}" \
    -H "X-API-Key: $ADMIN_KEY" --data-binary "$query"
  grep -q 'in progress' "$body_last" || fail "collector busy: the refusal names the run in progress" "$(head -c 600 "$body_last")"
  curl -fsS --max-time 5 -X POST "$HOOK/pncp/release" >/dev/null 2>>"$EV/curl.log" ||
    fail "the PNCP stand-in releases the held page (POST $HOOK/pncp/release)"
  wait "${PIDS[held-collect]}" || true
  unset 'PIDS[held-collect]'
  code=$(cat "$held.code" 2>/dev/null || true)
  printf 'round %s  %-48s %s %s -> %s\n' "$r" "collector: the held run, released" POST /process "$code" >>"$EV/http.log"
  [[ "$code" == 200 ]] || fail "collector: the held run ends 200 once released, got '$code'" "$(head -c 600 "$held")"
}

drive_traffic() {
  local r=$1 n got codes
  expect "$r" "allowed: admin echo" 200 POST /process "${J[@]}" -H "X-API-Key: $ADMIN_KEY" --data-binary "$ECHO"
  jq -e '.status == "SUCCESS" and .action == "echo" and (.trace_id | type == "string")' "$body_last" >/dev/null 2>&1 ||
    fail "HTTP allowed: admin echo returns an ActionResult (status SUCCESS, action, trace_id)" "$(head -c 600 "$body_last")"
  grep -qi '^x-trace-id:' "$body_last.headers" || fail "HTTP allowed: admin echo has an X-Trace-Id header"
  expect "$r" "allowed: admin summarize (LLM stand-in)" 200 POST /process "${J[@]}" -H "X-API-Key: $ADMIN_KEY" \
    --data-binary "$SUMMARIZE"
  collector_busy "$r"
  expect "$r" "auth: no key" 401 POST /process "${J[@]}" --data-binary "$ECHO"
  expect "$r" "auth: wrong key" 401 POST /process "${J[@]}" -H 'X-API-Key: ck_nosuchkey_xxxxxxxxxxxxxxxx' --data-binary "$ECHO"
  expect "$r" "input: malformed JSON" 400 POST /process "${J[@]}" -H "X-API-Key: $ADMIN_KEY" --data-binary '{not json'
  expect "$r" "input: unknown action" 400 POST /process "${J[@]}" -H "X-API-Key: $ADMIN_KEY" \
    --data-binary '{"action":"nope","context_id":"work","payload":{}}'
  expect "$r" "input: schema invalid" 422 POST /process "${J[@]}" -H "X-API-Key: $ADMIN_KEY" \
    --data-binary '{"action":"echo","context_id":"work","payload":{"message":42}}'
  expect "$r" "action matrix: analyst licitacoes.collect" 403 POST /process "${J[@]}" -H "X-API-Key: $ANALYST_KEY" \
    --data-binary "$COLLECT"
  codes=""
  for ((n = 0; n < 40; n++)); do
    got=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 5 -X POST "${J[@]}" -H "X-API-Key: $STD_KEY" \
      --data-binary "$ECHO" "$GW/process" 2>>"$EV/curl.log") || got=000
    codes+="$got "
  done
  printf 'round %s  %-48s -> %s\n' "$r" "rate limit: 40 quick standard-tier requests" "$codes" >>"$EV/http.log"
  [[ " $codes" == *" 429 "* ]] || fail "HTTP rate limit: 40 quick requests with the standard-tier key get a 429" "codes: $codes"
  [[ $r -ne 1 || " $codes" == *" 200 "* ]] || fail "HTTP rate limit: the standard-tier key is allowed at first" "codes: $codes"
  expect "$r" "executor timeout: echo delay_ms 3000" 504 POST /process "${J[@]}" -H "X-API-Key: $ADMIN_KEY" \
    --data-binary '{"action":"echo","context_id":"work","payload":{"message":"slow","delay_ms":3000}}'
  expect "$r" "GET /health" 200 GET /health
  jq -e '.status == "ok"' "$body_last" >/dev/null 2>&1 || fail "GET /health body has status ok" "$(head -c 300 "$body_last")"
  expect "$r" "GET /ready" 200 GET /ready
  expect "$r" "GET /openapi.json" 200 GET /openapi.json
  jq -e 'has("openapi") and has("paths")' "$body_last" >/dev/null 2>&1 ||
    fail "GET /openapi.json is an OpenAPI document" "$(head -c 300 "$body_last")"
  expect "$r" "GET /metrics" 200 GET /metrics
  cp "$body_last" "$EV/metrics-round$r.txt"
}

log "traffic round 1"
drive_traffic 1
ok "round 1: every gate answered with its contract status (200, 401, 400, 422, 403, 429, 502, 504)"

if grep -Eq '^up([{ ])' "$EV/metrics-round1.txt"; then fail "the gateway exports no 'up' metric (Prometheus owns it)"; fi
grep -q '^catraca_build_info' "$EV/metrics-round1.txt" || fail "GET /metrics exposes catraca_build_info"
ok "GET /metrics: Prometheus text with catraca_* series and no 'up' of its own"

# Wait for a scrape that saw round 1 (the 504 is its last /process request) before round 2, so that
# rate() over [1m] has two samples of every series.
wait_for 30 prometheus pq_nonempty 'catraca_requests_total{status="504"}' ||
  fail "prometheus scraped round 1 within 30s (catraca_requests_total{status=\"504\"})"
ok "prometheus scraped round 1 (catraca_requests_total{status=\"504\"} present)"
log "traffic round 2"
drive_traffic 2
ok "round 2: same statuses again"

# ---- 6. assertions through the Prometheus API ----------------------------------------------------------
up_is_1() { [[ $(pq 'up{job="catraca"} == 1' | jq -r '.data.result | length' 2>/dev/null) -ge 1 ]]; }
wait_for 20 prometheus up_is_1 || fail 'target catraca is up (up{job="catraca"} == 1)'
ok 'target catraca up (up{job="catraca"} == 1)'

am_discovered() {
  curl -sS --max-time 5 "$PROM/api/v1/alertmanagers" 2>/dev/null |
    jq -e --arg u "127.0.0.1:$AM_PORT" '[.data.activeAlertmanagers[].url | select(contains($u))] | length > 0' >/dev/null 2>&1
}
wait_for 20 prometheus am_discovered || fail "prometheus sends alerts to alertmanager 127.0.0.1:$AM_PORT"
ok "prometheus sends alerts to alertmanager ($AM)"

if [[ -n "${OBS_CATALOGUE_FILE:-}" ]]; then CAT_TEXT=$(cat "$OBS_CATALOGUE_FILE"); else CAT_TEXT=$CATALOGUE; fi
label_sets() { # METRIC -> the distinct label-name sets (without job/instance), one per line
  { pq "$1" | jq -r '.data.result[]?.metric | del(.__name__, .job, .instance) | "{" + (keys | join(",")) + "}"' 2>/dev/null || true; } | sort -u
}
check_metric() {
  local name=$1 want=$2 got
  got=$(label_sets "$name")
  [[ -n "$got" && "$got" == "$want" ]]
}
n_metrics=0
while read -r line; do
  line=${line%%#*}; line=${line//[[:space:]]/}
  [[ -n "$line" ]] || continue
  [[ "$line" =~ ^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([a-zA-Z0-9_,]*)\}$ ]] || fail "metric catalogue line is name{labels}: $line"
  name=${BASH_REMATCH[1]}
  want="{$(tr ',' '\n' <<<"${BASH_REMATCH[2]}" | sed '/^$/d' | sort | paste -sd, -)}"
  if ! wait_for 15 prometheus check_metric "$name" "$want"; then
    got=$(label_sets "$name")
    fail "metric catalogue: $line" "$( [[ -z "$got" ]] && echo "no series named $name in Prometheus" ||
      echo "label sets seen (without job/instance): $(paste -sd' ' <<<"$got"); expected: $want")"
  fi
  n_metrics=$((n_metrics + 1))
done <<<"$CAT_TEXT"
ok "metric catalogue: all $n_metrics names present with exactly their label sets"

extra=$(pq 'count by (__name__) ({__name__=~"catraca_.+", job="catraca"})' | { jq -r '.data.result[]?.metric.__name__' 2>/dev/null || true; } | sort)
extra=$(comm -23 <(printf '%s\n' "$extra") <(sed -nE 's/^[[:space:]]*([a-zA-Z_:][a-zA-Z0-9_:]*)\{.*/\1/p' <<<"$CAT_TEXT" | sort))
[[ -z "$extra" ]] || fail "every exported catraca_* metric is in the catalogue" \
  "exported but not catalogued: ${extra//$'\n'/ } (add each with its label set to CATALOGUE in this script)"
ok "no catraca_* metric exported outside the catalogue"

for m in "${GATE_DECISIONS[@]}"; do
  pq_nonempty "sum(catraca_gate_decisions_total{$m}) > 0" ||
    fail "gate decisions seen: catraca_gate_decisions_total{$m} > 0"
done
ok "gate decisions seen: auth/rate_limit/input/action_matrix deny, and allow"
for s in 200 401 400 422 403 429 502 504; do
  pq_nonempty "sum(catraca_requests_total{status=\"$s\"}) > 0" ||
    fail "catraca_requests_total{status=\"$s\"} counted"
done
ok "catraca_requests_total counted every status driven (200 401 400 422 403 429 502 504)"
pq 'sum by (kind) (catraca_llm_tokens_total{executor="summarizer"}) > 0' |
  jq -e '.data.resultType == "vector" and ([.data.result[].metric.kind] | sort) == ["completion", "prompt"]' >/dev/null 2>&1 ||
  fail 'catraca_llm_tokens_total{executor="summarizer"} counted prompt and completion tokens'
pq_nonempty 'catraca_collector_refusals_total{executor="pncp",reason="busy"} > 0' ||
  fail 'catraca_collector_refusals_total{executor="pncp",reason="busy"} counted the refused second run'
ok "summarizer tokens (prompt, completion) and the collector's busy refusal counted"

# Every dashboard panel query returns data (Grafana interval macros → 1m).
jq -c '[.[] | .title as $t | .exprs[] | {title: $t, expr: .}]' "$EV/panels.json" >"$EV/panel-queries.json"
nq=$(jq length "$EV/panel-queries.json")
panel_all_nonempty() {
  local i expr
  for ((i = 0; i < nq; i++)); do
    # shellcheck disable=SC2016  # literal Grafana macros
    expr=$(jq -r ".[$i].expr" "$EV/panel-queries.json" | sed -e 's/\$__rate_interval/1m/g' -e 's/\$__interval/1m/g' -e 's/\$__range/5m/g')
    pq_nonempty "$expr" || { FIRST_EMPTY=$i; FIRST_EMPTY_EXPR=$expr; return 1; }
  done
}
FIRST_EMPTY=-1
FIRST_EMPTY_EXPR=""
if ! wait_for 60 prometheus panel_all_nonempty; then
  got=$(pq "$FIRST_EMPTY_EXPR" | jq -r '.data as $d | "resultType \($d.resultType // "none"): "
      + (if $d.resultType == "vector" or $d.resultType == "matrix" then "\($d.result | length) series"
         else "\($d.result | tojson)" end)' 2>/dev/null || echo "no answer")
  fail "dashboard panel '$(jq -r ".[$FIRST_EMPTY].title" "$EV/panel-queries.json")' returns data: $(jq -r ".[$FIRST_EMPTY].expr" "$EV/panel-queries.json")" \
    "the query returned $got; only a non-empty vector or matrix is data (see the last query response in the evidence)"
fi
ok "dashboard: all $nq panel queries return data"

rules_loaded() {
  local a json
  json=$(curl -sS --max-time 5 "$PROM/api/v1/rules?type=alert" 2>/dev/null) || return 1
  printf '%s\n' "$json" >"$EV/queries/rules.json"
  for a in $ALERT_NAMES; do
    jq -e --arg a "$a" '[.data.groups[].rules[] | select(.type == "alerting" and .name == $a and .health == "ok")]
      | length == 1' <<<"$json" >/dev/null 2>&1 || { FIRST_RULE=$a; return 1; }
  done
}
FIRST_RULE=""
wait_for 20 prometheus rules_loaded ||
  fail "alert rule loaded and evaluating without error: $FIRST_RULE" \
    "$(jq -c --arg a "$FIRST_RULE" '[.data.groups[].rules[] | select(.name == $a)]' "$EV/queries/rules.json" 2>/dev/null)"
ok "alert rules loaded and healthy in Prometheus: ${ALERT_NAMES//$'\n'/ }"

# ---- 7. kill the gateway: CatracaDown must fire and reach the webhook ------------------------------------
log "stopping the gateway; waiting for CatracaDown (for: 30s, timeout ${ALERT_TIMEOUT}s)"
stop_proc gateway
t0=$SECONDS
wait_for "$ALERT_TIMEOUT" prometheus pq_nonempty 'ALERTS{alertname="CatracaDown",alertstate="firing",job="catraca"}' ||
  fail "CatracaDown firing in Prometheus within ${ALERT_TIMEOUT}s of stopping the gateway"
ok "CatracaDown firing in Prometheus after $((SECONDS - t0))s"
hook_has_down() {
  jq -es '[.[] | select(.receiver == "critical") | .alerts[]?
           | select(.labels.alertname == "CatracaDown" and .status == "firing" and .labels.severity == "critical")]
          | length > 0' "$EV/webhook.jsonl" >/dev/null 2>&1
}
wait_for 60 webhook hook_has_down ||
  fail "CatracaDown delivered to the webhook by the critical receiver within 60s" \
    "webhook payloads: $(wc -l <"$EV/webhook.jsonl") (see webhook.jsonl)"
ok "CatracaDown delivered by Alertmanager to the webhook (receiver critical) after $((SECONDS - t0))s"

PASSED=1
