"""The extension list, and nothing else: metadata lives in pyproject.toml.

PREFORK_NO_EXTENSIONS=1 at install time skips the compiled module; otherwise a
failed build fails the install (no silent fallback).
"""

import os

from setuptools import Extension, setup

ext_modules = []
if os.environ.get("PREFORK_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    ext_modules = cythonize(
        [
            Extension(
                "prefork._fastio",
                ["prefork/_fastio.pyx"],
                define_macros=[("_GNU_SOURCE", None)],
            )
        ],
        compiler_directives={"language_level": "3"},
    )

setup(ext_modules=ext_modules)
