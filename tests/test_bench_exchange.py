"""``prefork bench --request FILE --reply FILE`` and ``LoadGen(request=, reply=)``:
load for a server that answers rather than echoes, both implementations of
the loop, against real servers.

The servers: a line protocol that answers each line as it arrives (so a
message of several lines is answered in pieces, before all of it was
sent), the echo server (whose "reply" is the request itself, or too long),
and the two answering protocols of ``bench/peers/asyncio_echo.py`` that
``bench/compare.py`` measures, driven by the requests it sends them.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from prefork import _loadgen_common, _loadgen_py

from support import (
    Server,
    assert_one_line_error,
    handler_env,
    require_compiled,
    run,
    start_server,
)

pytestmark = pytest.mark.timeout(60)

PEERS = Path(__file__).resolve().parent.parent / "bench" / "peers"

LINES = '''
import asyncio


class Lines(asyncio.Protocol):
    """Answers every line with ">" and the line reversed, as each line arrives."""

    def connection_made(self, transport):
        self.transport = transport
        self.partial = b""

    def data_received(self, data):
        lines = (self.partial + data).split(b"\\n")
        self.partial = lines.pop()
        for line in lines:
            self.transport.write(b">" + line[::-1] + b"\\n")
'''

REQUEST = b"one\ntwo two\nthree three three\n"
REPLY = b">eno\n>owt owt\n>eerht eerht eerht\n"


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "python":
        return _loadgen_py
    return require_compiled("_loadgen")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    home = tmp_path_factory.mktemp("exchange")
    (home / "lines.py").write_text(LINES)
    started: dict[str, Server] = {}
    try:
        started["lines"] = start_server(
            "-w", "1", "-k", "event", "--handler", "lines:Lines", env=handler_env(home)
        )
        started["echo"] = start_server("-w", "1")
        yield started
    finally:
        for server in started.values():
            server.kill_all()


def finish(generator, limit: int) -> None:
    for _ in range(100):
        if generator.run(0.2, limit):
            return
    raise AssertionError("the run did not end")


def found(generator) -> dict[str, int]:
    return {kind: count for kind, count in generator.errors.items() if count}


@pytest.mark.parametrize(("mode", "connections", "depth"), [("stream", 3, 5), ("connect", 4, 1)])
def test_every_reply_is_counted_and_checked(impl, servers, mode, connections, depth):
    generator = impl.LoadGen(
        socket.AF_INET,
        servers["lines"].tcp(),
        mode,
        connections=connections,
        depth=depth,
        request=REQUEST,
        reply=REPLY,
    )
    try:
        finish(generator, 300)
        assert found(generator) == {}
        assert (generator.messages, generator.failed) == (300, 0)
        assert generator.size == len(REQUEST)
        assert (generator.request, generator.reply) == (REQUEST, REPLY)
        assert generator.bytes_sent == 300 * len(REQUEST)
        assert generator.bytes_received == 300 * len(REPLY)
    finally:
        generator.close()


def test_a_wrong_reply_fails_its_message(impl, servers):
    wrong = REPLY[:-2] + b"X\n"  # one byte differs in the last line
    generator = impl.LoadGen(
        socket.AF_INET, servers["lines"].tcp(), connections=2, depth=3, request=REQUEST, reply=wrong
    )
    try:
        finish(generator, 60)
        assert (generator.messages, generator.failed) == (0, 60)
        assert found(generator) == {"mismatch": 60}
    finally:
        generator.close()


def test_more_than_a_reply_per_message_is_excess(impl, servers):
    # The echo server answers 6 bytes to a request whose reply is 5: a message
    # begun owes 5, so the sixth byte is more than any message owes.
    generator = impl.LoadGen(
        socket.AF_INET, servers["echo"].tcp(), connections=1, request=b"hello\n", reply=b"hello"
    )
    try:
        finish(generator, 5)
        assert found(generator) == {"excess": 1}
        # The whole read is refused: its message fails and the connection closes.
        assert (generator.messages, generator.failed, generator.live) == (0, 1, 0)
    finally:
        generator.close()


def test_an_echo_server_answers_a_request_that_is_its_own_reply(impl, servers):
    # Large enough for partial sends and reads: the offsets wrap around both buffers.
    request = bytes(range(256)) * 1000
    generator = impl.LoadGen(
        socket.AF_INET,
        servers["echo"].tcp(),
        connections=2,
        depth=2,
        request=request,
        reply=request,
    )
    try:
        finish(generator, 20)
        assert found(generator) == {} and generator.messages == 20
        assert generator.bytes_received == 20 * len(request)
    finally:
        generator.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"request": b"x"}, ValueError, "both or neither"),
        ({"reply": b"x"}, ValueError, "both or neither"),
        ({"request": b"", "reply": b"x"}, ValueError, "a request must hold 1"),
        ({"request": b"x", "reply": b""}, ValueError, "a reply must hold 1"),
        (
            {"request": b"x" * (_loadgen_common.MAX_EXCHANGE + 1), "reply": b"x"},
            ValueError,
            "1,048,577",
        ),
        ({"request": "text", "reply": b"x"}, TypeError, "string"),
        ({"request": b"x", "reply": b"x", "mode": "datagram"}, ValueError, "datagrams are echoed"),
    ],
)
def test_bad_requests_and_replies_are_refused(impl, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        impl.LoadGen(socket.AF_INET, ("127.0.0.1", 7), **kwargs)


# -- the command ----------------------------------------------------------------------------


def files(tmp_path: Path, request: bytes, reply: bytes) -> tuple[str, str]:
    (tmp_path / "request").write_bytes(request)
    (tmp_path / "reply").write_bytes(reply)
    return str(tmp_path / "request"), str(tmp_path / "reply")


def test_the_command_checks_every_reply(servers, tmp_path):
    request, reply = files(tmp_path, REQUEST, REPLY)
    host, port = servers["lines"].tcp()
    result = run(
        "bench", f"{host}:{port}", "--request", request, "--reply", reply,
        "-c", "2", "-d", "3", "-n", "200", "--warmup", "0", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["exchange"] == "request-reply"
    assert (document["size"], document["reply_size"]) == (len(REQUEST), len(REPLY))
    assert (document["messages"], document["error_total"]) == (200, 0)
    assert document["bytes_received"] == 200 * len(REPLY)
    text = run(
        "bench", f"{host}:{port}", "--request", request, "--reply", reply,
        "-c", "1", "-n", "10", "--warmup", "0",
    )  # fmt: skip
    assert text.returncode == 0, text.stderr
    assert f"{len(REQUEST)}-byte requests, {len(REPLY)}-byte replies" in text.stdout
    assert "in replies" in text.stdout


def test_the_command_fails_on_wrong_replies(servers, tmp_path):
    request, reply = files(tmp_path, REQUEST, REPLY.upper())  # the same length, not the same bytes
    host, port = servers["lines"].tcp()
    result = run(
        "bench", f"{host}:{port}", "--request", request, "--reply", reply,
        "-c", "1", "-n", "5", "--warmup", "0",
    )  # fmt: skip
    assert_one_line_error(result, 1, "mismatch 5", "no message was answered")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--request", "{request}"], ["--request", "needs --reply"]),
        (["--reply", "{reply}"], ["--reply", "needs --request"]),
        (["--request", "{missing}", "--reply", "{reply}"], ["--request", "cannot read"]),
        (["--request", "{empty}", "--reply", "{reply}"], ["--request", "it is empty"]),
        (["--request", "{request}", "--reply", "{reply}", "-s", "10"], ["-s/--size"]),
        (["--request", "{request}", "--reply", "{reply}", "--udp"], ["--request", "datagrams"]),
    ],
)
def test_bad_request_options_are_one_line_usage_errors(tmp_path, args, needles):
    request, reply = files(tmp_path, REQUEST, REPLY)
    (tmp_path / "empty").write_bytes(b"")
    paths = {"request": request, "reply": reply, "empty": str(tmp_path / "empty")}
    paths["missing"] = str(tmp_path / "missing")
    argv = [arg.format(**paths) for arg in args]
    assert_one_line_error(run("bench", "127.0.0.1:7", *argv), 2, *needles)


# -- bench/compare.py's answering protocols, with the requests it sends them ----------------


@pytest.mark.parametrize("extensions", ["compiled", "pure"])
@pytest.mark.parametrize("name", ["UpperLines", "Resp"])
def test_the_compared_protocols_answer_what_compare_expects(impl, name, extensions):
    sys.path.insert(0, str(PEERS))
    try:
        import asyncio_echo
    finally:
        sys.path.remove(str(PEERS))
    env = handler_env(PEERS)
    if extensions == "pure":
        env["PREFORK_NO_EXTENSIONS"] = "1"
    server = start_server("-w", "1", "-k", "event", "--handler", f"asyncio_echo:{name}", env=env)
    try:
        for size, depth in ((128, 8), (1024, 1), (65536, 2)):
            request, reply = asyncio_echo.exchange(name, size)
            assert abs(len(request) - size) <= 4
            generator = impl.LoadGen(
                socket.AF_INET,
                server.tcp(),
                connections=3,
                depth=depth,
                request=request,
                reply=reply,
            )
            try:
                finish(generator, 60)
                assert found(generator) == {} and generator.messages == 60, size
            finally:
                generator.close()
    finally:
        server.kill_all()
