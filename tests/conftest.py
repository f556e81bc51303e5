"""Fixtures: both hot-loop implementations, and real ``prefork serve`` processes.

Servers run as real processes in their own session (process group); every
fixture kills its whole group on teardown, so no test leaves a process or a
port behind.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
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
