"""Fixtures: both hot-loop implementations, and real ``prefork serve`` processes.

Servers run as real processes in their own session (process group); every
fixture kills its whole group on teardown, so no test leaves a process or a
port behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from prefork import _fastio_py

from support import Server, require_compiled, start_server

RELIABILITY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reliability")


def pytest_configure(config: pytest.Config) -> None:
    """Run under a shell's background job (``cmd &``), this process inherits
    SIGINT ignored, and so would every program a test starts: Python then
    installs no KeyboardInterrupt handler, and the tests of what Ctrl-C does
    time out. A handled signal is reset to the default on exec, so handling
    SIGINT here gives the children the default a terminal gives them."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/reliability/ carries the ``reliability`` marker."""
    for item in items:
        if str(item.path).startswith(RELIABILITY_DIR + os.sep):
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    """Each hot-loop test runs once per implementation."""
    if request.param == "python":
        return _fastio_py
    return require_compiled("_fastio")


@pytest.fixture
def server_factory() -> Iterator:
    started: list[Server] = []

    def factory(*args: str, **options) -> Server:
        server = start_server(*args, **options)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.kill_all()


# -- TLS certificates, made by openssl for the session ------------------------------


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_cert(dirpath: Path, name: str, cn: str, ca: str | None, san: str = "") -> None:
    """``name``.pem and ``name``.key: signed by ``ca`` (its .pem/.key), or a CA itself."""
    key = f"{name}.key"
    openssl(
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        key,
        cwd=dirpath,
    )
    if ca is None:
        openssl(
            "req", "-x509", "-new", "-key", key, "-out", f"{name}.pem", "-days", "30",
            "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=dirpath,
        )  # fmt: skip
        return
    openssl("req", "-new", "-key", key, "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=dirpath)
    ext = dirpath / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "30", "-extfile", ext.name, cwd=dirpath,
    )  # fmt: skip


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    """A CA; server certificates for localhost (two: rotation) and for
    other.test; a client certificate; all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed (apt-get install openssl)")
    d = tmp_path_factory.mktemp("certs")
    make_cert(d, "ca", "prefork test CA", None)
    make_cert(d, "server", "localhost", "ca", "DNS:localhost,IP:127.0.0.1")
    make_cert(d, "server2", "localhost", "ca", "DNS:localhost,IP:127.0.0.1")
    make_cert(d, "other", "other.test", "ca", "DNS:other.test")
    make_cert(d, "client", "a client", "ca")
    return d
