"""Bad input: one line on stderr, the right exit code, never a traceback."""

from __future__ import annotations

import ctypes
import os
import socket

import pytest

from support import assert_one_line_error, run

pytestmark = pytest.mark.timeout(60)

PR_CAPBSET_DROP = 24
CAP_NET_BIND_SERVICE = 10


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-w", "0"], "'0'"),
        (["-w", "-3"], "'-3'"),
        (["-w", "abc"], "'abc'"),
        (["-w", ""], "-w/--workers"),
        (["-b", "127.0.0.1:65536"], "127.0.0.1:65536"),
        (["-b", "127.0.0.1:-1"], "127.0.0.1:-1"),
        (["-b", "127.0.0.1:http"], "127.0.0.1:http"),
        (["-b", "127.0.0.1"], "'127.0.0.1'"),
        (["-b", "7007"], "'7007'"),
        (["-b", "::1:7007"], "'::1:7007'"),
        (["-b", "[::1]"], "'[::1]'"),
        (["-b", "[::1]:99999"], "[::1]:99999"),
        (["-b", "unix:"], "'unix:'"),
        (["--handler", "nope"], "'nope'"),
        (["-k", "gevent"], "'gevent'"),
        (["--backlog", "0"], "--backlog"),
        (["--graceful-timeout", "soon"], "'soon'"),
        (["--graceful-timeout", "nan"], "'nan'"),
        (["--log-level", "loud"], "'loud'"),
        (["--unix-mode", "666"], "'666'"),
        (["--unix-mode", "999"], "'999'"),
        (["--no-such-option"], "--no-such-option"),
        (["-b", "udp://127.0.0.1"], "'udp://127.0.0.1'"),
        (["-b", "udp://unix:/tmp/x"], "udp://unix:/tmp/x"),
        (["-k", "sync", "-b", "udp://127.0.0.1:0"], "-k event"),
        (["-k", "thread", "-b", "udp://127.0.0.1:0"], "-k event"),
        (["-b", "udp://127.0.0.1:0", "--handler", "examples.upper:Upper"], "built-in"),
        (["-w", "5000"], "'5000'"),
    ],
)
def test_usage_errors_exit_2_naming_the_value(args, needle):
    assert_one_line_error(run("serve", *args), 2, needle)


def test_no_command_is_a_usage_error():
    result = run()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_version_prints_version_and_implementation():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("prefork ")
    assert result.stdout.strip().endswith(("(cython)", "(python)"))


def test_help_lists_serve_options():
    result = run("serve", "--help")
    assert result.returncode == 0
    for option in (
        "--bind",
        "--workers",
        "--worker-class",
        "--backlog",
        "--graceful-timeout",
        "--handler",
        "--log-level",
    ):
        assert option in result.stdout


def test_address_in_use_exits_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("serve", "-b", f"127.0.0.1:{port}", "-w", "1")
    assert_one_line_error(result, 1, f"127.0.0.1:{port}", "address already in use")


def test_second_address_in_use_releases_the_first():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free_port = probe.getsockname()[1]
        result = run("serve", "-b", f"127.0.0.1:{free_port}", "-b", f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, "address already in use")
    with socket.socket() as again:  # the first listener was closed, not leaked
        again.bind(("127.0.0.1", free_port))


def _drop_bind_service_capability() -> None:
    """Run as root without CAP_NET_BIND_SERVICE: low ports are refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_on_low_port_exits_1():
    with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
        unprivileged_start = int(f.read())
    assert unprivileged_start > 80, "this machine lets anyone bind port 80"
    preexec = _drop_bind_service_capability if os.geteuid() == 0 else None
    result = run("serve", "-b", "127.0.0.1:80", "-w", "1", preexec_fn=preexec)
    assert_one_line_error(result, 1, "127.0.0.1:80", "permission denied")


def test_unix_socket_in_missing_directory_exits_1(tmp_path):
    path = tmp_path / "missing" / "prefork.sock"
    assert_one_line_error(run("serve", "-b", f"unix:{path}"), 1, str(path), "does not exist")


def test_unix_path_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("data")
    assert_one_line_error(run("serve", "-b", f"unix:{path}"), 1, "not a socket")
    assert path.read_text() == "data"


def test_unresolvable_host_exits_1():
    assert_one_line_error(run("serve", "-b", "no-such-host.invalid:7007"), 1, "cannot resolve")


def test_config_file_sets_options_and_the_command_line_wins(tmp_path, server_factory):
    config = tmp_path / "prefork.toml"
    config.write_text(
        'bind = ["127.0.0.1:0", "[::1]:0"]\n'
        "workers = 3\n"
        'worker_class = "sync"\n'
        'handler = "discard"\n'
        "reuse-port = true\n"
    )
    server = server_factory("-c", str(config), "-w", "2", any_port=False)  # -w wins
    assert server.addresses[0].startswith("127.0.0.1:") and server.addresses[1].startswith("[::1]:")
    assert "2 sync worker(s), handler discard" in server.log
    with server.connect() as sock:
        sock.sendall(b"dropped")
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("workers = 0\n", ["workers", "'0'"]),
        ("no_such_key = 1\n", ["unknown key 'no_such_key'"]),
        ("workers = [1, 2]\n", ["workers", "expected a string or a number"]),
        ('bind = "127.0.0.1:99999"\n', ["bind", "127.0.0.1:99999"]),
        ('reuse_port = "yes"\n', ["reuse-port", "true or false"]),
        ("this is = not toml\n", ["invalid TOML"]),
        ('handler = "nope"\n', ["handler", "'nope'"]),
    ],
)
def test_bad_config_file_values_are_one_line_usage_errors(tmp_path, text, needles):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    assert_one_line_error(run("serve", "-c", str(config)), 2, str(config), *needles)


def test_missing_config_file_is_a_usage_error(tmp_path):
    missing = tmp_path / "nope.toml"
    assert_one_line_error(run("serve", "-c", str(missing)), 2, str(missing), "cannot read")


# -- addresses: the forms, and who holds a port ------------------------------------


def test_a_port_alone_binds_loopback(server_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_factory("-b", f":{port}", "-w", "1")
    assert server.addresses == [f"127.0.0.1:{port}"]
    with server.connect() as sock:
        sock.sendall(b"hi")
        assert sock.recv(2) == b"hi"


def test_a_bad_address_and_the_help_name_every_form():
    result = run("serve", "-b", "nowhere")
    assert_one_line_error(result, 2, "'nowhere'", "[V6ADDR]:PORT", "unix:PATH", "udp://")
    assert_one_line_error(result, 2, "fd://N", "proxy:")
    help_text = " ".join(run("serve", "--help").stdout.split())
    for form in ("udp://HOST:PORT", "fd://N", "proxy:ADDR", ":PORT alone", "IPv6 only"):
        assert form in help_text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_address_given_twice_is_named(tmp_path):
    port = free_port()
    result = run("serve", "-b", f"127.0.0.1:{port}", "-b", f"127.0.0.1:{port}", "-w", "1")
    assert_one_line_error(result, 1, f"-b 127.0.0.1:{port}: address already in use (given twice)")
    path = tmp_path / "s.sock"
    result = run("serve", "-b", f"unix:{path}", "-b", f"unix:{path}", "-w", "1")
    assert_one_line_error(result, 1, f"-b unix:{path}: address already in use (given twice)")


def test_a_busy_metrics_port_is_named_as_metrics():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("serve", "-b", "127.0.0.1:0", "-w", "1", "--metrics", f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"--metrics 127.0.0.1:{port}: address already in use")


def test_a_bind_on_the_metrics_address_says_so():
    port = free_port()
    result = run("serve", "-b", f"127.0.0.1:{port}", "-w", "1", "--metrics", f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"-b 127.0.0.1:{port}: address already in use", "--metrics")


NOT_A_PROTOCOL = """
class Echo:
    def __init__(self, sock, address):
        sock.sendall(sock.recv(100))
"""


def test_the_event_worker_refusal_says_what_the_handler_is(tmp_path):
    from support import handler_env

    (tmp_path / "classy.py").write_text(NOT_A_PROTOCOL)
    result = run(
        "serve", "-b", "127.0.0.1:0", "--handler", "classy:Echo", env=handler_env(tmp_path)
    )
    assert_one_line_error(result, 2, "a class without data_received (Echo)", "-k sync")
    assert "function" not in result.stderr
