#!/usr/bin/env bash
# Runs every cargo fuzz target in fuzz/ for SECONDS each (default 60), starting from the committed seed
# corpus in fuzz/seeds/<target> (new inputs go to fuzz/corpus/<target>, kept between runs), and fails if
# any target crashes, times out or runs out of memory, naming the input that did it and how to replay it.
#
#   bash scripts/fuzz.sh [SECONDS]
#   FUZZ_TARGETS="envelope jsonl_line" bash scripts/fuzz.sh 600   # only these targets
#
# Installs cargo-fuzz when missing. Works on the stable toolchain: the targets are built without a
# sanitizer (`--sanitizer none`; the crate forbids unsafe code, and AddressSanitizer would need a
# nightly compiler), with the coverage instrumentation, debug assertions and overflow checks that
# cargo fuzz always adds.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never

EACH=${1:-60}
case "$EACH" in '' | *[!0-9]* | 0) echo "usage: $0 [SECONDS], a whole number above 0" >&2; exit 2 ;; esac
FUZZ=(--sanitizer none)
# Seconds one input may take before it counts as a failure (a hang is a denial of service at the front
# door). Every target handles an input in well under a millisecond; 10 s leaves room for a loaded machine.
INPUT_TIMEOUT=10

die() { printf '\nFUZZ FAILED: %s\n' "$*" >&2; exit 1; }

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  nice -n 10 cargo install --locked cargo-fuzz
fi

echo "==> building the fuzz targets"
nice -n 10 cargo fuzz build "${FUZZ[@]}"

mapfile -t targets < <(cargo fuzz list)
if [ -n "${FUZZ_TARGETS:-}" ]; then read -r -a targets <<<"$FUZZ_TARGETS"; fi
[ ${#targets[@]} -gt 0 ] || die "cargo fuzz list names no target"

failed=()
for t in "${targets[@]}"; do
  echo "==> $t: ${EACH} s"
  corpus=fuzz/corpus/$t seeds=fuzz/seeds/$t artifacts=fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  [ -d "$seeds" ] || die "no seed corpus for $t in $seeds"
  before=$(find "$artifacts" -type f | sort)
  log=$(mktemp)
  status=0
  # The first corpus folder takes what the fuzzer finds; the seeds are only read.
  nice -n 10 cargo fuzz run "${FUZZ[@]}" "$t" "$corpus" "$seeds" -- \
    -max_total_time="$EACH" -timeout="$INPUT_TIMEOUT" -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" | sed "s/^/$t /" || true
  found=$(comm -13 <(printf '%s\n' "$before") <(find "$artifacts" -type f | sort) | sed '/^$/d')
  if [ "$status" -ne 0 ] || [ -n "$found" ]; then
    tail -n 60 "$log" >&2
    for a in $found; do
      printf '\n%s: input that failed: %s\n  replay: cargo fuzz run %s %s %s\n' \
        "$t" "$a" "${FUZZ[*]}" "$t" "$a" >&2
    done
    [ -n "$found" ] || printf '\n%s: cargo fuzz run exited with %s and left no input behind\n' "$t" "$status" >&2
    failed+=("$t")
  fi
  rm -f "$log"
done

[ ${#failed[@]} -eq 0 ] || die "${failed[*]}"
echo "==> no crash in ${#targets[@]} targets, ${EACH} s each"
