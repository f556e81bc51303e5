"""The extension list, and nothing else: metadata lives in pyproject.toml.

Each compiled module (prefork/_fastio, the server's hot loop, and
prefork/_loadgen, the load generator's) is built from its .pyx through
Cython when both are there (a checkout), or else from the generated .c that
every sdist ships (so an sdist builds without Cython).
PREFORK_NO_EXTENSIONS=1 at install time skips the compiled modules; otherwise
a failed build fails the install (no silent fallback).
"""

import os

from setuptools import Extension, setup
from setuptools.command.sdist import sdist

MODULES = ("_fastio", "_loadgen")
PYX = [f"prefork/{name}.pyx" for name in MODULES]
C = [f"prefork/{name}.c" for name in MODULES]


# Both loops drive OpenSSL themselves for TLS (prefork/_openssl.pxd): the hot
# loop as a server, the load generator as a client. They link the libssl
# Python's ssl module uses (headers: libssl-dev on Debian).
LIBRARIES = {"_fastio": ["ssl", "crypto"], "_loadgen": ["ssl", "crypto"]}


def extension(name, source):
    return Extension(
        f"prefork.{name}",
        [source],
        define_macros=[("_GNU_SOURCE", None)],
        libraries=LIBRARIES.get(name, []),
    )


def cythonized():
    """The extensions from the .pyx files (each .c regenerated when older), or
    None without Cython or the .pyx files."""
    try:
        from Cython.Build import cythonize
    except ImportError:
        return None
    if not all(os.path.exists(pyx) for pyx in PYX):
        return None
    return cythonize(
        [extension(name, f"prefork/{name}.pyx") for name in MODULES],
        compiler_directives={"language_level": "3"},
    )


def generated_c_exists():
    return all(os.path.exists(c) for c in C)


def openssl_headers() -> bool:
    """Whether the C compiler finds OpenSSL's headers (the hot loop includes them)."""
    import shutil
    import subprocess
    import sysconfig

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return True  # let the build say what is missing
    probe = subprocess.run(
        [compiler, "-E", "-x", "c", "-"],
        input=b"#include <openssl/ssl.h>\n",
        capture_output=True,
    )
    return probe.returncode == 0


def extensions():
    if os.environ.get("PREFORK_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    if not openssl_headers():
        raise SystemExit(
            "prefork: the compiled hot loop drives OpenSSL itself and needs its headers: "
            "install them (Debian/Ubuntu: apt-get install libssl-dev), or set "
            "PREFORK_NO_EXTENSIONS=1 for pure Python"
        )
    ext_modules = cythonized()
    if ext_modules is None and generated_c_exists():
        ext_modules = [extension(name, f"prefork/{name}.c") for name in MODULES]
    if ext_modules is None:
        raise SystemExit(
            f"prefork: cannot build the compiled modules: compiling {', '.join(PYX)} needs "
            f"Cython and the generated {', '.join(C)} are missing; install Cython, or set "
            "PREFORK_NO_EXTENSIONS=1 for pure Python"
        )
    return ext_modules


class sdist_with_c(sdist):
    """An sdist always carries the generated C, whatever PREFORK_NO_EXTENSIONS says."""

    def run(self):
        if cythonized() is None and not generated_c_exists():
            raise SystemExit(
                f"prefork: an sdist needs {', '.join(C)}: install Cython to generate them"
            )
        super().run()


setup(ext_modules=extensions(), cmdclass={"sdist": sdist_with_c})
