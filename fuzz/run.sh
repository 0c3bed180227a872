#!/usr/bin/env bash
# Runs each fuzz target for SECONDS from a copy of its checked-in corpus.
# Usage: fuzz/run.sh SECONDS TARGET...  (make fuzz)
set -uo pipefail
cd "$(dirname "$0")/.."
seconds=$1
shift
cleanup() {
  # The frontend targets start a filterd on a temporary export (rkfuzz-*).
  pkill -f '[f]ilterd --root .*/rkfuzz-' 2>/dev/null
  rm -rf "${TMPDIR:-/tmp}"/rkfuzz-*
}
trap cleanup EXIT
for t in "$@"; do
  rm -rf "fuzz/corpus-work/$t" && mkdir -p "fuzz/corpus-work/$t"
  cp "fuzz/corpus/$t"/* "fuzz/corpus-work/$t/"
  cargo fuzz run --fuzz-dir fuzz -s none -O "$t" "fuzz/corpus-work/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 || exit 1
done
