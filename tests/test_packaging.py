"""Packaging: what ``python -m build`` makes, installed where nothing else is; the linters.

The sdist and the wheel are built once for the module from a copy of the
source tree (so the checkout gets no build/ or egg-info), then the wheel is
installed with its dependencies (from the package index) into a fresh venv
without the system's packages, and the installed ``prefork`` serves and answers. The
sdist must carry the generated C and build from it without Cython.

These tests run in the normal suite once: the CI run with
PREFORK_NO_EXTENSIONS=1 (the pure-Python loop) skips them.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

import prefork
from prefork import fastio

from support import STARTUP_TIMEOUT, Server, _read_lines, exchange

ROOT = Path(__file__).resolve().parent.parent
NAME = f"prefork-{prefork.__version__}"
SO_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

pytestmark = [
    pytest.mark.packaging,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        fastio.extensions_disabled(),
        reason="PREFORK_NO_EXTENSIONS=1 tests the pure-Python loop; packaging and lint "
        "checks run once, in the suite run with the compiled module",
    ),
]

# What a copy of the source tree leaves out: build products and caches.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    "*.so",
    "_fastio.c",
    "_fastio.html",
    "_loadgen.c",
    "_loadgen.html",
    ".*_cache",
    ".hypothesis",
    ".benchmarks",
)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without what would make a child import the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PYTHONHOME", "PREFORK_NO_EXTENSIONS", "VIRTUAL_ENV")
    }
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def check(argv: list[str | Path], cwd: Path, timeout: float = 240, **extra: str) -> str:
    """Run a command to completion; fail with its output unless it exits 0."""
    result = subprocess.run(
        [str(a) for a in argv],
        cwd=cwd,
        env=clean_env(**extra),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding the sdist and the wheel built from it."""
    if importlib.util.find_spec("build") is None:
        pytest.skip("the build package is not installed (pip install build, or the test extra)")
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    out = tmp / "dist"
    check([sys.executable, "-m", "build", "--outdir", out, source], cwd=tmp)
    return out


def only(directory: Path, pattern: str) -> Path:
    matches = sorted(directory.glob(pattern))
    assert len(matches) == 1, matches
    return matches[0]


@pytest.fixture(scope="module")
def sdist(dist: Path) -> Path:
    return only(dist, f"{NAME}.tar.gz")


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    return only(dist, f"{NAME}-*.whl")


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no system site-packages) with the wheel installed."""
    home = tmp_path_factory.mktemp("venv")
    check([sys.executable, "-m", "venv", home / "venv"], cwd=home)
    bin_dir = home / "venv" / "bin"
    check([bin_dir / "pip", "install", "-q", wheel], cwd=home)
    return bin_dir


def test_sdist_carries_the_sources_and_the_generated_c(sdist: Path):
    with tarfile.open(sdist) as archive:
        names = set(archive.getnames())
    for path in (
        "prefork/_fastio.c",
        "prefork/_fastio.pyx",
        "prefork/_posix.pxd",
        "prefork/_openssl.pxd",
        "prefork/_fastio.pyi",
        "prefork/_loadgen.c",
        "prefork/_loadgen.pyx",
        "prefork/_loadgen.pyi",
        "prefork/_loadgen_py.py",
        "prefork/_fastio_common.py",
        "prefork/_loadgen_common.py",
        "prefork/py.typed",
        "prefork/tools/client.py",
        "prefork/tools/bench.py",
        "setup.py",
        "pyproject.toml",
        "MANIFEST.in",
        "README.md",
        "tests/conftest.py",
    ):
        assert f"{NAME}/{path}" in names, path
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_wheel_carries_the_compiled_module_and_the_types(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"{NAME}.dist-info/METADATA").decode()
    assert {f"prefork/_fastio{SO_SUFFIX}", f"prefork/_loadgen{SO_SUFFIX}"} <= names
    assert {"prefork/py.typed", "prefork/_fastio.pyi", "prefork/server/workers/event.py"} <= names
    assert {"prefork/_loadgen.pyi", "prefork/_loadgen_py.py", "prefork/tools/bench.py"} <= names
    # What the compiled modules import at load time.
    assert {"prefork/_fastio_common.py", "prefork/_loadgen_common.py", "prefork/proxy.py"} <= names
    # The C is for building, in the sdist.
    assert not {"prefork/_fastio.c", "prefork/_loadgen.c"} & names
    assert f"\nVersion: {prefork.__version__}\n" in metadata  # from prefork/__init__.py
    assert f"{NAME}.dist-info/entry_points.txt" in names


def test_installed_wheel_reports_the_compiled_loop(venv: Path, tmp_path: Path):
    out = check([venv / "prefork", "--version"], cwd=tmp_path)
    assert out == f"prefork {prefork.__version__} (cython)\n"
    where = check(
        [venv / "python", "-c", "import prefork._fastio as m, sys; print(m.__file__, sys.prefix)"],
        cwd=tmp_path,
    )
    module, prefix = where.split()
    assert module.startswith(prefix) and Path(prefix) == venv.parent  # not the checkout
    chosen = check(
        [venv / "python", "-c", "import prefork.loadgen as m; print(m.IMPLEMENTATION)"], tmp_path
    )
    assert chosen == "cython\n"


def test_installed_wheel_serves_and_its_client_talks(venv: Path, tmp_path: Path):
    proc = subprocess.Popen(
        [venv / "prefork", "serve", "-w", "1", "-b", "127.0.0.1:0"],
        cwd=tmp_path,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    server = Server(proc)
    ready = threading.Event()
    server._reader = threading.Thread(target=_read_lines, args=(server, ready), daemon=True)
    server._reader.start()
    try:
        assert ready.wait(STARTUP_TIMEOUT) and proc.poll() is None, server.log
        with server.connect() as sock:
            assert exchange(sock, b"hello from the wheel\n") == b"hello from the wheel\n"
        reply = check([venv / "prefork", "client", "-e", "hi", server.addresses[0]], cwd=tmp_path)
        assert reply == "hi\n"
        load = [venv / "prefork", "bench", server.addresses[0], "-n", "100", "--warmup", "0"]
        report = check([*load, "-c", "2"], cwd=tmp_path)
        assert report.splitlines()[-1].split() == ["errors", "none"]
    finally:
        server.kill_all()


@pytest.fixture(scope="module")
def unpacked(sdist: Path, venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist unpacked, for building with the venv's Python (no Cython there)."""
    probe = subprocess.run(
        [venv / "python", "-c", "import setuptools; import Cython"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "No module named 'setuptools'" in probe.stderr:
        pytest.skip("the venv has no setuptools (Python 3.12+ venvs ship pip only)")
    assert "No module named 'Cython'" in probe.stderr, probe.stderr
    target = tmp_path_factory.mktemp("sdist")
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):  # 3.10.12+, 3.11.4+
            archive.extractall(target, filter="data")
        else:  # pragma: no cover
            archive.extractall(target)
    return target / NAME


def build_ext(venv: Path, source: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [venv / "python", "setup.py", "build_ext", "--inplace"],
        cwd=source,
        env=clean_env(**extra),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_sdist_builds_from_the_generated_c_without_cython(venv: Path, unpacked: Path):
    result = build_ext(venv, unpacked)
    assert result.returncode == 0, result.stderr
    built = unpacked / "prefork" / f"_fastio{SO_SUFFIX}"
    assert built.exists()
    assert (unpacked / "prefork" / f"_loadgen{SO_SUFFIX}").exists()
    out = check([venv / "python", "-c", "import prefork._fastio as m; print(m.__file__)"], unpacked)
    assert Path(out.strip()) == built


def test_a_failed_compile_fails_the_build(venv: Path, unpacked: Path, tmp_path: Path):
    broken = tmp_path / NAME
    shutil.copytree(unpacked, broken, ignore=shutil.ignore_patterns("build", "*.so"))
    c_file = broken / "prefork" / "_fastio.c"
    c_file.write_text("#error broken on purpose\n" + c_file.read_text())
    result = build_ext(venv, broken)
    assert result.returncode != 0
    assert "broken on purpose" in result.stdout + result.stderr
    assert not list(broken.glob("prefork/*.so"))


def test_without_cython_or_c_the_build_says_why(venv: Path, unpacked: Path, tmp_path: Path):
    bare = tmp_path / NAME
    shutil.copytree(unpacked, bare, ignore=shutil.ignore_patterns("build", "*.so", "*.c"))
    result = build_ext(venv, bare)
    assert result.returncode != 0
    assert "needs Cython" in result.stderr and "PREFORK_NO_EXTENSIONS=1" in result.stderr
    result = build_ext(venv, bare, PREFORK_NO_EXTENSIONS="1")  # the one opt-out
    assert result.returncode == 0, result.stderr
    assert not list(bare.glob("prefork/*.so"))


# -- linters --------------------------------------------------------------------


def require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install {module}, or the test extra)")


def test_mypy_strict_is_clean(tmp_path: Path):
    require("mypy")
    # The files to check come from pyproject.toml's [tool.mypy]; the cache goes to tmp.
    out = check(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", tmp_path / "cache"], cwd=ROOT
    )
    assert "Success" in out


def test_ruff_check_and_format_are_clean():
    require("ruff")
    check([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, timeout=120)
    check(
        [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
        cwd=ROOT,
        timeout=120,
    )
