"""Guards: CI must never silently test only the fallback."""

from __future__ import annotations

import os
import subprocess
import sys

from prefork import _fastio_py, fastio


def test_compiled_module_is_present_unless_disabled():
    if fastio.extensions_disabled():
        assert fastio.IMPLEMENTATION == "python"
        assert fastio.echo is _fastio_py.echo
    else:
        compiled = fastio.load_compiled()
        assert compiled is not None, "prefork._fastio is not built: run pip install -e ."
        assert fastio.IMPLEMENTATION == "cython"
        assert fastio.echo is compiled.echo


def test_compiled_and_spec_export_the_same_names():
    compiled = fastio.load_compiled()
    if compiled is None:
        assert fastio.extensions_disabled()
        return
    assert compiled.__all__ == _fastio_py.__all__
    for name in _fastio_py.__all__:
        assert callable(getattr(compiled, name))


def run_version(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("PREFORK_NO_EXTENSIONS", None)
    if env_value is not None:
        env["PREFORK_NO_EXTENSIONS"] = env_value
    out = subprocess.run(
        [sys.executable, "-m", "prefork", "--version"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def test_version_names_the_implementation():
    assert run_version("1").endswith("(python)")
    expected = "python" if fastio.load_compiled() is None else "cython"
    assert run_version(None).endswith(f"({expected})")
