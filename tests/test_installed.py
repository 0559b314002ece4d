"""The suite tests the built, installed fastsock, not the source tree beside it nor a stale
install: the installed sources match the repository byte for byte, and every Cython
module is there compiled.

Developers iterating in place set FASTSOCK_ALLOW_SOURCE_TREE=1 to skip these checks; CI
never does.
"""

import importlib
import importlib.machinery
import os
from pathlib import Path

import pytest

REPO_PACKAGE = Path(__file__).resolve().parents[1] / "fastsock"
SOURCE_SUFFIXES = {".py", ".pyx", ".pxd", ".pyi", ".h"}
EXTENSION_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)
CYTHON_MODULES = sorted(
    ".".join(path.relative_to(REPO_PACKAGE).with_suffix("").parts)
    for path in REPO_PACKAGE.rglob("*.pyx")
)

pytestmark = pytest.mark.skipif(
    os.environ.get("FASTSOCK_ALLOW_SOURCE_TREE") == "1",
    reason="FASTSOCK_ALLOW_SOURCE_TREE=1: testing the source tree in place, not an install",
)


@pytest.fixture
def installed_package():
    """The directory of the fastsock package that `import fastsock` finds."""
    fastsock = importlib.import_module("fastsock")
    return Path(fastsock.__file__).resolve().parent


def repo_sources():
    return sorted(
        path.relative_to(REPO_PACKAGE)
        for path in REPO_PACKAGE.rglob("*")
        if path.suffix in SOURCE_SUFFIXES and "__pycache__" not in path.parts
    )


def test_fastsock_is_imported_from_an_install_not_the_repository(installed_package):
    assert not installed_package.is_relative_to(REPO_PACKAGE), (
        f"fastsock was imported from the source tree {installed_package}: install it "
        "(pip install .) and run pytest, not python -m pytest, from the repository root"
    )


def test_installed_sources_match_the_repository(installed_package):
    sources = repo_sources()
    assert sources, f"no fastsock sources found under {REPO_PACKAGE}"
    stale = {"missing": [], "differing": []}
    for path in sources:
        installed = installed_package / path
        if not installed.is_file():
            stale["missing"].append(str(path))
        elif installed.read_bytes() != (REPO_PACKAGE / path).read_bytes():
            stale["differing"].append(str(path))
    assert stale == {"missing": [], "differing": []}, (
        f"the install at {installed_package} is stale or incomplete: reinstall fastsock"
    )


def test_the_install_holds_no_module_the_repository_has_dropped(installed_package):
    # A module moved or removed (fastsock/benchmark.py went to fastsock/bench/) must not
    # linger: a wheel built from a stale build/ directory still ships it.
    sources = {str(path) for path in repo_sources()}
    extra = sorted(
        str(path.relative_to(installed_package))
        for path in installed_package.rglob("*")
        if (path.suffix in SOURCE_SUFFIXES or path.name.endswith(EXTENSION_SUFFIXES))
        and "__pycache__" not in path.parts
        and str(path.relative_to(installed_package)) not in sources
        and not (
            path.name.endswith(EXTENSION_SUFFIXES) and compiled_from_repo(path, installed_package)
        )
    )
    assert extra == [], f"the install at {installed_package} holds dropped files: reinstall"


def compiled_from_repo(path, installed_package):
    """Whether the extension module ``path`` is built from a .pyx of the repository."""
    stem = path.name.split(".")[0]
    return (REPO_PACKAGE / path.parent.relative_to(installed_package) / f"{stem}.pyx").is_file()


def test_the_repository_has_cython_modules():
    assert CYTHON_MODULES, f"no .pyx under {REPO_PACKAGE}: fastsock's compiled core is missing"


@pytest.mark.parametrize("module_name", CYTHON_MODULES)
def test_cython_module_is_installed_compiled(installed_package, module_name):
    module = importlib.import_module(f"fastsock.{module_name}")
    assert isinstance(module.__spec__.loader, importlib.machinery.ExtensionFileLoader), (
        f"fastsock.{module_name} was not imported as a compiled extension: {module.__file__}"
    )
    module_file = Path(module.__file__).resolve()
    assert module_file.parent == installed_package.joinpath(*module_name.split(".")[:-1])
    assert module_file.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
