"""The atheris target (fuzz_fastio.py) runs for a few seconds in the suite:
the compiled module and the twin must agree on every input it makes.
Longer runs, and the AddressSanitizer build, are commands in fuzz_fastio.py.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from prefork import fastio

from harness import SOAK, scaled, timeout

HERE = os.path.dirname(os.path.abspath(__file__))
SECONDS = scaled(5, 120)


def needs_atheris_and_compiled() -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install atheris; wheels for CPython <= 3.11)")
    if fastio.load_compiled() is None:
        pytest.skip("prefork._fastio is not built: nothing to compare the twin against")


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
