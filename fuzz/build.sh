#!/usr/bin/env bash
# Builds an instrumented copy of fastsock for fuzzing, away from the checkout's own build:
#
#     fuzz/build.sh
#
# into BUILD_DIR: FUZZ_BUILD_DIR, or else build/fuzz (which git ignores).  BUILD_DIR/venv is
# a Python 3.13 venv with atheris; BUILD_DIR/src a copy of setup.py, tests/compare.py (what
# the harnesses compare) and fastsock/, whose extension modules clang built with
# -fsanitize=address,fuzzer-no-link, so libFuzzer sees their edges and AddressSanitizer
# their memory accesses.  FASTSOCK_DEBUG=1
# passes through to setup.py for a debug build (asserts and Cython's checks on, -O0).
# fuzz/run.sh runs the harnesses on that build.
set -euo pipefail
cd "$(dirname "$0")/.."

BUILD_DIR=$(realpath -m "${FUZZ_BUILD_DIR:-build/fuzz}")
PYTHON_VERSION=3.13
# 3.1.0 is the newest atheris with a wheel for 3.13; its wheel carries asan_with_fuzzer.so.
ATHERIS=atheris==3.1.0

source .ci/find_python.sh

CLANG=$(command -v clang || true)
if [ -z "$CLANG" ]; then
    echo "fuzz/build.sh: clang not found (Debian: apt-get install clang)" >&2
    exit 1
fi

mkdir -p "$BUILD_DIR"
if [ ! -x "$BUILD_DIR/venv/bin/python" ]; then
    "$(find_python "$PYTHON_VERSION")" -m venv "$BUILD_DIR/venv"
fi
"$BUILD_DIR/venv/bin/pip" install -q "$ATHERIS" 'Cython>=3.0,<4' 'setuptools>=64'

# A fresh copy each time: no stale .c or .so from an earlier build survives a change.
rm -rf "$BUILD_DIR/src"
mkdir -p "$BUILD_DIR/src/tests"
cp -r setup.py fastsock "$BUILD_DIR/src/"
cp tests/compare.py "$BUILD_DIR/src/tests/"
find "$BUILD_DIR/src/fastsock" \( -name '*.so' -o -name '*.c' -o -name __pycache__ \) \
    -exec rm -rf {} +

sanitize="-fsanitize=address,fuzzer-no-link -fno-omit-frame-pointer -g"
(
    cd "$BUILD_DIR/src"
    CC="$CLANG" LDSHARED="$CLANG -shared" CFLAGS="$sanitize" LDFLAGS="$sanitize" \
        "$BUILD_DIR/venv/bin/python" setup.py -q build_ext --inplace
)

# An extension that clang built without the instrumentation would fuzz blind, so check.
for module in "$BUILD_DIR"/src/fastsock/_framing*.so "$BUILD_DIR"/src/fastsock/_ring*.so; do
    symbols=$(nm -D --undefined-only "$module")
    if ! grep -q __sanitizer_cov_8bit_counters_init <<<"$symbols" \
        || ! grep -q __asan_report <<<"$symbols"; then
        echo "fuzz/build.sh: $module lacks the sanitizer instrumentation" >&2
        exit 1
    fi
done
echo "instrumented build in $BUILD_DIR/src, atheris in $BUILD_DIR/venv"
