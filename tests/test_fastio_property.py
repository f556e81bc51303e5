"""Differential property test: the compiled loop and its spec agree on everything.

Hypothesis picks message sizes, the client's send chunking, the server's
buffer size (its recv chunking) and what the peer does; both implementations
run the same scenario over real sockets and must report the same results,
byte counts and exceptions.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prefork import _fastio_py

from support import require_compiled, tcp_pair

pytestmark = pytest.mark.timeout(300)

SCENARIOS = ["normal", "closed_early", "reset", "bad_fd", "not_socket", "empty_buffer"]


def outcome(call):
    """What a caller can observe: the return value, or the exception's kind."""
    try:
        return ("ok", call())
    except Exception as exc:
        return ("raised", type(exc).__name__, getattr(exc, "errno", None))


def run_normal(func, payload: bytes, chunk: int, bufsize: int):
    client, server = socket.socketpair()
    client.settimeout(30)
    result: dict = {}

    def serve() -> None:
        result["outcome"] = outcome(lambda: func(server, bytearray(bufsize)))
        server.shutdown(socket.SHUT_WR)

    def send() -> None:
        for start in range(0, len(payload), chunk):
            client.sendall(payload[start : start + chunk])
        client.shutdown(socket.SHUT_WR)

    threads = [threading.Thread(target=serve), threading.Thread(target=send)]
    for thread in threads:
        thread.start()
    received = bytearray()
    while data := client.recv(65536):
        received += data
    for thread in threads:
        thread.join(30)
    client.close()
    server.close()
    return result["outcome"], bytes(received)


def run_closed_early(func, payload: bytes, bufsize: int):
    """The peer sent its data and closed without reading any echo."""
    client, server = socket.socketpair()
    client.sendall(payload)
    client.close()
    with server:
        return outcome(lambda: func(server, bytearray(bufsize)))


def run_reset(func, payload: bytes, bufsize: int):
    """The peer sent its data and reset the connection (SO_LINGER 0)."""
    client, server = tcp_pair()
    client.sendall(payload)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    with server:
        select.select([server], [], [], 5)  # the reset has arrived
        return outcome(lambda: func(server, bytearray(bufsize)))


def run_bad_descriptor(func, kind: str, bufsize: int):
    r, w = os.pipe()
    if kind == "bad_fd":
        os.close(r)
        os.close(w)
        return outcome(lambda: func(r, bytearray(bufsize)))
    try:
        return outcome(lambda: func(r, bytearray(bufsize)))
    finally:
        os.close(r)
        os.close(w)


def run_scenario(module, name: str, scenario: str, messages: list[int], chunk: int, bufsize: int):
    func = getattr(module, name)
    payload = b"".join(os.urandom(size) for size in messages)
    if scenario == "normal":
        observed, received = run_normal(func, payload, chunk, bufsize)
        expected = payload if name == "echo" else b""
        return observed, received == expected
    if scenario == "closed_early":
        return run_closed_early(func, payload, bufsize)
    if scenario == "reset":
        return run_reset(func, payload, bufsize)
    if scenario == "empty_buffer":
        with socket.socket() as sock:
            return outcome(lambda: func(sock, bytearray(0)))
    return run_bad_descriptor(func, scenario, bufsize)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(["echo", "discard"]),
    scenario=st.sampled_from(SCENARIOS),
    messages=st.lists(st.integers(0, 20_000), max_size=5),
    chunk=st.integers(1, 70_000),
    bufsize=st.integers(1, 70_000),
)
def test_compiled_and_spec_agree(name, scenario, messages, chunk, bufsize):
    compiled = require_compiled("_fastio")
    spec = run_scenario(_fastio_py, name, scenario, messages, chunk, bufsize)
    fast = run_scenario(compiled, name, scenario, messages, chunk, bufsize)
    assert fast == spec
    if scenario == "normal":
        total = sum(messages)
        expected_counts = (total, total) if name == "echo" else (total, 0)
        assert spec == (("ok", expected_counts), True)
