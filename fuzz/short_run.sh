#!/usr/bin/env bash
# The short fuzzing run that CI makes (fuzz/README.md): both harnesses on a fresh
# instrumented build, each from an empty corpus with a fixed seed and a fixed number of
# executions, so that a run takes about the same time and fails only on a finding.
#
#     fuzz/short_run.sh           (builds into FUZZ_BUILD_DIR, default build/fuzz-short)
set -euo pipefail
cd "$(dirname "$0")/.."

export FUZZ_BUILD_DIR
FUZZ_BUILD_DIR=$(realpath -m "${FUZZ_BUILD_DIR:-build/fuzz-short}")
# The reference's dicts and sets then iterate alike in every run.
export PYTHONHASHSEED=0
SEED=1
RUNS_FRAMING=25000
RUNS_RING=40000

fuzz/build.sh
rm -rf "$FUZZ_BUILD_DIR/corpus"

# With address space randomization off, the pointers that the compiled code compares (and
# libFuzzer records for its mutations) are the same in every run, which makes runs vary
# less; they still differ a little (fuzz/README.md).
no_aslr=(setarch "$(uname -m)" -R)
"${no_aslr[@]}" true 2>/dev/null || no_aslr=()

run_target() {
    local name=$1 runs=$2 log=$FUZZ_BUILD_DIR/$1.log start=$SECONDS
    if "${no_aslr[@]}" fuzz/run.sh "$name" -seed="$SEED" -runs="$runs" -print_final_stats=1 >"$log" 2>&1; then
        echo "fuzz $name: $(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n 1) in $((SECONDS - start)) s"
    else
        echo "fuzz $name: FAILED, input saved in $FUZZ_BUILD_DIR/crashes/; the end of $log:" >&2
        tail -n 80 "$log" >&2
        return 1
    fi
}

status=0
run_target framing "$RUNS_FRAMING" || status=1
run_target ring "$RUNS_RING" || status=1
exit "$status"
