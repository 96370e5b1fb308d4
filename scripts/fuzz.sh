#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for a bounded time and prints, per target, the
# executions and the crashes found (artifacts are kept in fuzz/artifacts/TARGET/).
#
#   scripts/fuzz.sh [SECONDS]      # default 60 s per target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). The toolchain here is stable;
# cargo-fuzz's `-Zsanitizer=address` needs nightly features, which
# RUSTC_BOOTSTRAP=1 unlocks on a stable compiler for this build only.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-60}"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || { echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 2; }
cargo fuzz build -O >/dev/null 2>&1 || cargo fuzz build -O
# Valid frames, signatures and deltas to start from (plain build, no sanitizer).
cargo run -q --release --bin seeds --target-dir target/seeds
targets=$(cargo fuzz list | grep -vx seeds)
status=0
printf '%-18s %12s %8s\n' target executions crashes
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  dict=()
  [ -f "dicts/$t.dict" ] && dict=("-dict=dicts/$t.dict")
  log="artifacts/$t/last-run.log"
  # -timeout: one input running over 10 s is a hang (fast_rsync's endless loop
  # on a zero block size was one); -rss_limit_mb: an allocation a peer controls.
  cargo fuzz run -O "$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${dict[@]}" >"$log" 2>&1 || true
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  crashes=$(find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | wc -l)
  printf '%-18s %12s %8s\n' "$t" "${execs:-?}" "$crashes"
  if [ "$crashes" -gt 0 ]; then
    status=1
    find "artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' -o -name 'leak-*' \) | sed 's/^/  /'
  fi
done
exit $status
