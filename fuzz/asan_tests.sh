#!/usr/bin/env bash
# Runs the whole test suite on an AddressSanitizer build of fastsock:
#
#     fuzz/asan_tests.sh [pytest arguments...]      (default: the whole suite, -q)
#
# Installs the checkout with clang and -fsanitize=address into BUILD_DIR/venv (default
# build/asan, which git ignores; Python 3.11 or ASAN_PYTHON), the way CI installs it with
# gcc, then runs pytest from the checkout with clang's ASan runtime preloaded into Python.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=$(realpath -m "${ASAN_BUILD_DIR:-build/asan}")
PYTHON=${ASAN_PYTHON:-$(command -v python3.11)}
CLANG=$(command -v clang || true)
if [ -z "$CLANG" ]; then
    echo "fuzz/asan_tests.sh: clang not found (Debian: apt-get install clang)" >&2
    exit 1
fi
runtime=$("$CLANG" -print-file-name=libclang_rt.asan-x86_64.so)
if [ ! -f "$runtime" ]; then
    echo "fuzz/asan_tests.sh: no ASan runtime at $runtime (Debian: libclang-rt-14-dev)" >&2
    exit 1
fi

rm -rf "$BUILD_DIR/venv"
"$PYTHON" -m venv "$BUILD_DIR/venv"
sanitize="-fsanitize=address -fno-omit-frame-pointer -g"
CC="$CLANG" LDSHARED="$CLANG -shared" CFLAGS="$sanitize" LDFLAGS="$sanitize" \
    "$BUILD_DIR/venv/bin/pip" install -q --no-cache-dir '.[test]'

# detect_leaks=0: CPython frees not everything at exit by design, and LeakSanitizer would
# report that in every process, forked children included.  PYTHONMALLOC=malloc hands every
# Python object to ASan's allocator, so an overrun of a bytes object the extensions fill
# is caught too, not only of the memory they allocate themselves.  Reports go to files,
# printed at the end, rather than to a stderr that pytest may capture and drop.
reports=$BUILD_DIR/reports
rm -rf "$reports"
mkdir -p "$reports"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:abort_on_error=1}:log_path=$reports/asan
export PYTHONMALLOC=malloc
status=0
LD_PRELOAD=$runtime "$BUILD_DIR/venv/bin/pytest" "${@:--q}" || status=$?
if [ -n "$(ls -A "$reports")" ]; then
    echo "AddressSanitizer reports in $reports:" >&2
    cat "$reports"/* >&2
    status=1
else
    echo "no AddressSanitizer report"
fi
exit "$status"
