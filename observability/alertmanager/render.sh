#!/bin/sh
# Render the Alertmanager template: replace ${CATRACA_ALERT_WEBHOOK_URL} and
# ${CATRACA_ALERT_WEBHOOK_URL_WARNING} literally with the environment's values.
# Usage: CATRACA_ALERT_WEBHOOK_URL=https://... render.sh TEMPLATE OUTPUT
# POSIX sh + awk only (runs in the busybox-based prom/alertmanager image and on the CI host).
set -eu
if [ "$#" -ne 2 ]; then
  echo "usage: CATRACA_ALERT_WEBHOOK_URL=URL [CATRACA_ALERT_WEBHOOK_URL_WARNING=URL] $0 TEMPLATE OUTPUT" >&2
  exit 2
fi
: "${CATRACA_ALERT_WEBHOOK_URL:?CATRACA_ALERT_WEBHOOK_URL must be set to the critical alerts webhook URL}"
CATRACA_ALERT_WEBHOOK_URL_WARNING="${CATRACA_ALERT_WEBHOOK_URL_WARNING:-$CATRACA_ALERT_WEBHOOK_URL}"
export CATRACA_ALERT_WEBHOOK_URL CATRACA_ALERT_WEBHOOK_URL_WARNING
for u in "$CATRACA_ALERT_WEBHOOK_URL" "$CATRACA_ALERT_WEBHOOK_URL_WARNING"; do
  case "$u" in
    http://*|https://*) ;;
    *) echo "render.sh: webhook URL must start with http:// or https://" >&2; exit 1 ;;
  esac
  case "$u" in
    *"'"*|*' '*) echo "render.sh: webhook URL must not contain quotes or spaces" >&2; exit 1 ;;
  esac
done
awk '
  function subst(line, name, value,   p, out, i) {
    p = "${" name "}"; out = ""
    while ((i = index(line, p)) > 0) { out = out substr(line, 1, i - 1) value; line = substr(line, i + length(p)) }
    return out line
  }
  /^[ \t]*#/ { print; next }   # comments keep their placeholders (the URL may carry a token)
  {
    $0 = subst($0, "CATRACA_ALERT_WEBHOOK_URL_WARNING", ENVIRON["CATRACA_ALERT_WEBHOOK_URL_WARNING"])
    $0 = subst($0, "CATRACA_ALERT_WEBHOOK_URL", ENVIRON["CATRACA_ALERT_WEBHOOK_URL"])
    print
  }
' "$1" > "$2.tmp"
# Only comment lines may still mention a placeholder.
# shellcheck disable=SC2016  # a literal ${CATRACA_ placeholder
if grep -v '^[[:space:]]*#' "$2.tmp" | grep -q '\${CATRACA_'; then
  echo "render.sh: unreplaced placeholder left in $2" >&2
  rm -f "$2.tmp"; exit 1
fi
mv "$2.tmp" "$2"
