"""User handlers: protocol classes and handle(sock, address), through real servers."""

from __future__ import annotations

import socket
import time

import pytest

from support import (
    TESTS_DIR,
    WORKER_CLASS_ARGS,
    assert_one_line_error,
    exchange,
    handler_env,
    run,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=list(WORKER_CLASS_ARGS))
def worker_class(request):
    return WORKER_CLASS_ARGS[request.param]


def test_upper_protocol_on_every_worker_class(server_factory, worker_class):
    server = server_factory("-w", "2", *worker_class, "--handler", "examples.upper:Upper")
    with server.connect() as sock:
        assert exchange(sock, b"hello, world\n" * 1000) == b"HELLO, WORLD\n" * 1000


@pytest.mark.parametrize("k", [["-k", "sync"], ["-k", "thread", "--threads", "2"]])
def test_upper_blocking_handle(server_factory, k):
    server = server_factory("-w", "1", *k, "--handler", "examples.upper:handle")
    with server.connect() as sock:
        assert exchange(sock, b"abc" * 50_000) == b"ABC" * 50_000


def test_blocking_handle_is_refused_by_the_event_worker():
    result = run("serve", "-k", "event", "--handler", "examples.upper:handle")
    assert_one_line_error(result, 2, "examples.upper:handle", "-k sync")


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        assert chunk, "connection closed"
        data += chunk
    return data


def test_chat_room(server_factory):
    server = server_factory("-w", "1", "--handler", "examples.chat:Chat")
    with server.connect() as alice, server.connect() as bob:
        alice_name = read_line(alice).split()[-1]
        bob_name = read_line(bob).split()[-1]
        assert read_line(alice) == b"* " + bob_name + b" joined\n"
        alice.sendall(b"/nick alice\n")
        assert read_line(bob) == b"* " + alice_name + b" is now alice\n"
        alice.sendall(b"hi bob\r\n")
        assert read_line(bob) == b"<alice> hi bob\n"
        bob.sendall(b"hi al")
        bob.sendall(b"ice\n")
        assert read_line(alice) == b"<" + bob_name + b"> hi alice\n"
        bob.sendall(b"x" * 5000 + b"\n")  # too long: bob is sent away
        assert read_line(bob) == b"* line too long; bye\n"
        assert bob.recv(10) == b""
        assert read_line(alice) == b"* " + bob_name + b" left\n"


@pytest.mark.parametrize(
    ("k", "handler"),
    [
        (["-k", "event"], "handlers.faulty:RaiseOnBoom"),
        (["-k", "sync"], "handlers.faulty:RaiseOnBoom"),
        (["-k", "thread", "--threads", "2"], "handlers.faulty:handle_boom"),
    ],
)
def test_a_handler_that_raises_closes_only_its_connection(server_factory, k, handler):
    server = server_factory("-w", "1", *k, "--handler", handler, env=_tests_on_path())
    workers = server.wait_workers(1)
    concurrent = k[1] != "sync"  # a sync worker serves one connection at a time
    good = server.connect() if concurrent else None
    if good is not None:
        good.sendall(b"fine")
        assert good.recv(4) == b"fine"
    with server.connect() as bad:
        bad_address = bad.getsockname()
        bad.sendall(b"boom")
        bad.settimeout(10)
        assert bad.recv(10) == b""
    if good is None:
        good = server.connect()
    with good:
        good.sendall(b"still fine")
        assert good.recv(10) == b"still fine"
    assert wait_until(lambda: "RuntimeError: boom requested" in server.log, 5), server.log
    # The log names the client whose connection failed.
    assert f"handler failed; connection from {bad_address} closed" in server.log
    assert server.workers() == workers


@pytest.mark.parametrize(
    ("k", "handler"),
    [
        (["-k", "event"], "handlers.faulty:Peer"),
        (["-k", "sync"], "handlers.faulty:Peer"),
        (["-k", "sync"], "handlers.faulty:peer_handle"),
        (["-k", "thread", "--threads", "3"], "handlers.faulty:peer_handle"),
    ],
)
def test_handlers_see_the_client_address(server_factory, k, handler):
    server = server_factory("-w", "1", *k, "--handler", handler, env=_tests_on_path())
    for _ in range(5):  # also: a handler that closes its own socket leaves the worker sound
        with server.connect() as sock:
            reply = exchange(sock, b"")
            assert reply == repr(sock.getsockname()).encode()
    time.sleep(0.2)
    assert "Traceback" not in server.log


@pytest.mark.parametrize(
    ("k", "handler"),
    [
        (["-k", "event"], "handlers.socket_options:NoDelay"),
        (["-k", "asyncio"], "handlers.socket_options:NoDelay"),
        (["-k", "sync"], "handlers.socket_options:no_delay_handle"),
        (["-k", "thread", "--threads", "2"], "handlers.socket_options:no_delay_handle"),
    ],
)
def test_connections_do_not_wait_for_nagle(server_factory, k, handler):
    """TCP_NODELAY on every accepted connection, as asyncio and uvloop set
    it: a reply's last short segment is not held for the peer's delayed ACK."""
    server = server_factory("-w", "1", *k, "--handler", handler, env=_tests_on_path())
    with server.connect() as sock:
        assert exchange(sock, b"") == b"1"


def _tests_on_path() -> dict[str, str]:
    return handler_env(TESTS_DIR)


@pytest.mark.parametrize(
    ("handler", "code", "needles"),
    [
        ("nosuchmodule:Thing", 3, ["cannot import nosuchmodule", "ModuleNotFoundError"]),
        ("examples.upper:Nope", 3, ["has no attribute 'Nope'"]),
        ("handlers.broken_import:X", 3, ["broken on purpose"]),
        ("handlers.faulty:not_callable", 3, ["expected a protocol class"]),
        ("not a handler", 2, ["'not a handler'"]),
        ("mod:", 2, ["'mod:'"]),
    ],
)
def test_handler_load_errors_are_one_line(handler, code, needles):
    import subprocess

    from support import prefork_command

    result = subprocess.run(
        prefork_command("serve", "-b", "127.0.0.1:0", "--handler", handler),
        capture_output=True,
        text=True,
        timeout=30,
        env=_tests_on_path(),
        stdin=subprocess.DEVNULL,
    )
    assert_one_line_error(result, code, *needles)


@pytest.mark.parametrize("k", [["-k", "sync"], ["-k", "thread"]])
def test_socketserver_request_handlers_run_as_socketserver_runs_them(server_factory, k):
    server = server_factory(
        "-w", "1", *k, "--handler", "handlers.socketserver_kinds:Lifecycle", env=_tests_on_path()
    )
    with server.connect() as sock:
        # Everything until the end of file: finish() ran, then the sending side shut.
        assert exchange(sock, b"hi") == b"hi setup,handle True True True finish"
    server = server_factory(
        "-w", "1", *k, "--handler", "handlers.socketserver_kinds:Upper", env=_tests_on_path()
    )
    with server.connect() as sock:
        assert exchange(sock, b"one\ntwo\n") == b"ONE\nTWO\n"
    assert "Traceback" not in server.log


def test_a_request_handler_is_refused_by_the_event_worker():
    done = run(
        "serve", "-k", "event", "--handler", "handlers.socketserver_kinds:Upper",
        env=_tests_on_path(),
    )  # fmt: skip
    assert_one_line_error(done, 2, "socketserver request handler", "-k sync")


# -- --handler-type: when detection guesses wrong -------------------------------------


def test_handler_type_handle_runs_a_handle_whose_parameters_have_defaults(server_factory):
    spec = "handlers.asyncio_kinds:handle_with_defaults"
    server = server_factory(
        "-w", "1", "-k", "sync", "--handler", spec, "--handler-type", "handle",
        env=_tests_on_path(),
    )  # fmt: skip
    with server.connect() as sock:
        assert exchange(sock, b"abc" * 1000) == b"ABC" * 1000
    # Detected, it passes for a protocol factory: the event worker would take it.
    detected = run("check", "-k", "event", "--handler", spec, env=_tests_on_path())
    assert detected.returncode == 0, detected.stderr  # taken for a protocol factory


@pytest.mark.parametrize("k", ["event", "asyncio"])
def test_handler_type_stream_runs_a_wrapper_returning_a_coroutine(server_factory, k):
    spec = "handlers.asyncio_kinds:stream_by_wrapper"
    refused = run("serve", "-k", k, "--handler", spec, env=_tests_on_path())
    assert_one_line_error(refused, 2, spec)  # detected: a blocking handle(sock, address)
    server = server_factory(
        "-w", "1", "-k", k, "--handler", spec, "--handler-type", "stream", env=_tests_on_path()
    )
    with server.connect() as sock:
        assert exchange(sock, b"one\ntwo\n" * 1000) == b"ONE\nTWO\n" * 1000


@pytest.mark.parametrize(
    ("handler", "handler_type", "needles"),
    [
        ("examples.upper:handle", "request-handler", ["not a socketserver.BaseRequestHandler"]),
        ("echo", "protocol", ["--handler-type protocol", "built-in"]),
        ("handlers.faulty:not_callable", "stream", ["cannot be called"]),
        ("examples.upper:Upper", "coroutine", ["--handler-type", "'coroutine'"]),
    ],
)
def test_a_handler_type_that_cannot_be_is_one_line_and_exit_2(handler, handler_type, needles):
    for command in ("serve", "check"):
        result = run(
            command, "-b", "127.0.0.1:0", "-k", "sync", "--handler", handler,
            "--handler-type", handler_type, env=_tests_on_path(),
        )  # fmt: skip
        assert_one_line_error(result, 2, *needles)
