#!/usr/bin/env bash
# Runs one harness on the instrumented build of fuzz/build.sh:
#
#     fuzz/run.sh framing|ring [libFuzzer options...]
#
# e.g. `fuzz/run.sh framing -max_total_time=3600`.  New inputs go to BUILD_DIR/corpus/NAME
# (kept between runs, so a long run resumes where the last stopped), crashes to
# BUILD_DIR/crashes/.  BUILD_DIR is FUZZ_BUILD_DIR or build/fuzz.  Given input files, e.g.
# a crash, it runs just those: `fuzz/run.sh framing build/fuzz/crashes/framing-crash-...`.
set -euo pipefail
cd "$(dirname "$0")/.."

name=${1:?usage: fuzz/run.sh framing|ring [libFuzzer options...]}
shift
BUILD_DIR=$(realpath -m "${FUZZ_BUILD_DIR:-build/fuzz}")
harness=$PWD/fuzz/fuzz_$name.py
[ -f "$harness" ] || { echo "fuzz/run.sh: no harness $harness" >&2; exit 2; }
python=$BUILD_DIR/venv/bin/python
[ -x "$python" ] || { echo "fuzz/run.sh: run fuzz/build.sh first" >&2; exit 2; }

runtime=$("$python" -c 'import atheris; print(atheris.path())')/asan_with_fuzzer.so
corpus=$BUILD_DIR/corpus/$name
mkdir -p "$corpus" "$BUILD_DIR/crashes"
# CPython itself leaks by design at exit, so LeakSanitizer would report it on every run;
# PYTHONMALLOC=malloc puts every Python object under AddressSanitizer's eye too.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}
export PYTHONMALLOC=malloc
arguments=()
inputs=("$corpus")
for argument in "$@"; do
    if [ -f "$argument" ]; then
        argument=$(realpath "$argument")
        inputs=()
    fi
    arguments+=("$argument")
done
cd "$BUILD_DIR/src"
LD_PRELOAD=$runtime PYTHONPATH=$BUILD_DIR/src exec "$python" "$harness" \
    -artifact_prefix="$BUILD_DIR/crashes/$name-" "${arguments[@]}" "${inputs[@]}"
