"""The atheris target (fuzz_fastio.py) runs for a few seconds in the suite:
the compiled module and the twin must agree on every input it makes.
Longer runs, and the AddressSanitizer build, are commands in fuzz_fastio.py.

atheris is in the test extra wherever it has wheels (Linux on x86-64): there
a missing atheris fails the test, as a missing compiled module does outside
PREFORK_NO_EXTENSIONS=1, since the differential fuzz would silently not run.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import subprocess
import sys

import pytest

from harness import SOAK, scaled, timeout
from support import require_compiled

HERE = os.path.dirname(os.path.abspath(__file__))
SECONDS = scaled(5, 120)
# Where the test extra installs atheris (pyproject.toml's markers).
ATHERIS_WHEELS = sys.platform == "linux" and platform.machine() == "x86_64"


def needs_atheris_and_compiled() -> None:
    require_compiled("_fastio")  # skips under PREFORK_NO_EXTENSIONS=1 only
    if importlib.util.find_spec("atheris") is None:
        if ATHERIS_WHEELS:
            pytest.fail("atheris is not installed; the test extra has it: pip install -e .[test]")
        pytest.skip(f"atheris has no wheel for {sys.platform} on {platform.machine()}")


@timeout(60, 300)
def test_fuzz_target_finds_no_disagreement(tmp_path):
    needs_atheris_and_compiled()
    result = subprocess.run(
        [sys.executable, os.path.join(HERE, "fuzz_fastio.py"), str(tmp_path)]
        + [f"-max_total_time={SECONDS}", "-timeout=10"],
        capture_output=True,
        text=True,
        timeout=SECONDS + 50,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Done" in result.stderr, result.stderr[-2000:]


@pytest.mark.skipif(not SOAK, reason="soak only (PREFORK_SOAK=1): builds an ASan module")
@timeout(600, 600)
def test_fuzz_target_under_address_sanitizer(tmp_path):
    needs_atheris_and_compiled()
    env = dict(os.environ, PREFORK_ASAN_DIR=str(tmp_path))
    result = subprocess.run(
        ["bash", os.path.join(HERE, "fuzz-asan.sh"), str(SECONDS)],
        capture_output=True,
        text=True,
        timeout=SECONDS + 300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "AddressSanitizer" not in result.stderr, result.stderr[-4000:]
