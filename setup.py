"""The extension list, and nothing else: metadata lives in pyproject.toml.

The compiled module is built from prefork/_fastio.pyx through Cython when
both are there (a checkout), or else from the generated prefork/_fastio.c
that every sdist ships (so an sdist builds without Cython).
PREFORK_NO_EXTENSIONS=1 at install time skips the compiled module; otherwise
a failed build fails the install (no silent fallback).
"""

import os

from setuptools import Extension, setup
from setuptools.command.sdist import sdist

PYX = "prefork/_fastio.pyx"
C = "prefork/_fastio.c"


def fastio_extension(source):
    return Extension("prefork._fastio", [source], define_macros=[("_GNU_SOURCE", None)])


def cythonized():
    """The extension from the .pyx (its .c regenerated when older), or None
    without Cython or the .pyx."""
    try:
        from Cython.Build import cythonize
    except ImportError:
        return None
    if not os.path.exists(PYX):
        return None
    return cythonize([fastio_extension(PYX)], compiler_directives={"language_level": "3"})


def extensions():
    if os.environ.get("PREFORK_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    ext_modules = cythonized()
    if ext_modules is None and os.path.exists(C):
        ext_modules = [fastio_extension(C)]
    if ext_modules is None:
        raise SystemExit(
            f"prefork: cannot build the compiled module: {PYX} needs Cython and there is "
            f"no generated {C}; install Cython, or set PREFORK_NO_EXTENSIONS=1 for pure Python"
        )
    return ext_modules


class sdist_with_c(sdist):
    """An sdist always carries the generated C, whatever PREFORK_NO_EXTENSIONS says."""

    def run(self):
        if cythonized() is None and not os.path.exists(C):
            raise SystemExit(f"prefork: an sdist needs {C}: install Cython to generate it")
        super().run()


setup(ext_modules=extensions(), cmdclass={"sdist": sdist_with_c})
