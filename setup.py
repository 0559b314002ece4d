"""Builds fastsock's Cython extension modules.

Every ``.pyx`` under ``fastsock/`` becomes one extension module, named by its path
(``fastsock/bench/_loadgen.pyx``: ``fastsock.bench._loadgen``), compiled against fastsock's C
headers in ``fastsock/include/`` (declared for Cython in ``fastsock/_native.pxd``) with
``-Wall -Wextra``, which the generated code and the headers pass without a warning.
``FASTSOCK_DEBUG=1`` at build time makes a debug build: Cython's bounds, wrap-around and
initialization checks on, C asserts on, no optimization, debug symbols.
"""

import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent
INCLUDE = Path("fastsock", "include")
HEADERS = sorted(str(header.relative_to(HERE)) for header in (HERE / INCLUDE).glob("*.h"))
DEBUG = os.environ.get("FASTSOCK_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": not DEBUG,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}
macros = [] if DEBUG else [("NDEBUG", "1")]
# Python's own CFLAGS define NDEBUG, which would keep asserts off in a debug build too.
undefined_macros = ["NDEBUG"] if DEBUG else []
extra_compile_args = ["-Wall", "-Wextra"] + (["-O0", "-g"] if DEBUG else ["-O3"])

extensions = [
    Extension(
        ".".join(pyx.relative_to(HERE).with_suffix("").parts),
        [str(pyx.relative_to(HERE))],
        include_dirs=[str(INCLUDE)],
        depends=HEADERS,
        define_macros=macros,
        undef_macros=undefined_macros,
        extra_compile_args=extra_compile_args,
    )
    for pyx in sorted((HERE / "fastsock").rglob("*.pyx"))
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, quiet=True))
