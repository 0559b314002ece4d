"""CPython's own socketserver tests, from the running interpreter's stdlib, run against
fastsock with nothing changed but the import.

The unmodified suite runs the same way first, as a control: it proves that the copy, the
subprocess and the parsing of its report work, so that a fastsock failure is fastsock's.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

# Tests in CPython's test_socketserver.py, by version: a change there must be looked at,
# not silently absorbed.
EXPECTED_TEST_COUNTS = {(3, 10): 27, (3, 11): 27, (3, 12): 27, (3, 13): 27}
SUBPROCESS_TIMEOUT = 300

STDLIB_IMPORT = "import socketserver\n"
FASTSOCK_IMPORT = "import fastsock as socketserver\n"
ANY_SOCKETSERVER_IMPORT = re.compile(r"^\s*(import|from)\s+socketserver\b", re.MULTILINE)

pytestmark = pytest.mark.watchdog(SUBPROCESS_TIMEOUT + 60)


def stdlib_suite_source():
    try:
        import test
    except ImportError:
        pytest.fail("this interpreter lacks the stdlib `test` package that holds the suite")
    return (Path(test.__file__).parent / "test_socketserver.py").read_text(encoding="utf-8")


def with_fastsock_import(source):
    lines = source.splitlines(keepends=True)
    replaced = [FASTSOCK_IMPORT if line == STDLIB_IMPORT else line for line in lines]
    assert sum(line == STDLIB_IMPORT for line in lines) == 1, "expected one `import socketserver`"
    patched = "".join(replaced)
    assert not ANY_SOCKETSERVER_IMPORT.search(patched), "the suite imports socketserver twice"
    return patched


def run_suite(source, directory):
    """Run `source` as module test_socketserver with unittest in a fresh interpreter whose
    working directory is `directory`; return (exit status, unittest's report)."""
    (directory / "test_socketserver.py").write_text(source, encoding="utf-8")
    completed = subprocess.run(
        [sys.executable, "-m", "unittest", "-v", "test_socketserver"],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    return completed.returncode, completed.stdout + completed.stderr


def assert_suite_passed(returncode, report):
    ran = re.findall(r"^Ran (\d+) tests? in ", report, re.MULTILINE)
    assert ran, f"no unittest summary in the report:\n{report}"
    expected = EXPECTED_TEST_COUNTS.get(sys.version_info[:2])
    if expected is not None:
        assert int(ran[-1]) == expected, report
    # "OK" alone: no test skipped, none an expected failure.
    assert report.rstrip().splitlines()[-1] == "OK", report
    assert returncode == 0, report
    return int(ran[-1])


def test_stdlib_suite_passes_unmodified(tmp_path):
    assert_suite_passed(*run_suite(stdlib_suite_source(), tmp_path))


def test_stdlib_suite_passes_against_fastsock(tmp_path):
    source = stdlib_suite_source()
    control_dir, fastsock_dir = tmp_path / "control", tmp_path / "fastsock"
    control_dir.mkdir()
    fastsock_dir.mkdir()

    # The child interpreter must import the very fastsock this process tests.
    import fastsock

    probe = subprocess.run(
        [sys.executable, "-c", "import fastsock; print(fastsock.__file__)"],
        cwd=fastsock_dir,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )
    assert Path(probe.stdout.strip()).resolve() == Path(fastsock.__file__).resolve(), probe.stderr

    tests_run = assert_suite_passed(*run_suite(with_fastsock_import(source), fastsock_dir))
    assert tests_run == assert_suite_passed(*run_suite(source, control_dir))
