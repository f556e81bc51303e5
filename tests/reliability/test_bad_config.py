"""Bad configuration, table-driven over every ``prefork serve`` option and
every config-file key.

What a user is owed: a mistake is one line on stderr that names the option
(or the file and key) and the bad value, exit code 2, never a traceback, and
never a server that starts and then fails in its workers.

This extends tests/test_cli.py (whose tables cover -b, -w, -k, --handler,
--backlog 0, --graceful-timeout, --log-level and --unix-mode basics, and a
few config-file values) rather than repeating it. The environment errors the
brief lists are there already: a --user that does not exist
(tests/test_operations.py::test_bad_user_group_and_umask_are_one_line_usage_errors),
an unwritable pid file (tests/test_server.py::test_unwritable_pid_file_is_a_one_line_error),
a UNIX socket in a missing directory
(tests/test_cli.py::test_unix_socket_in_missing_directory_exits_1).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess

import pytest

from prefork.cli import build_parser
from prefork.settings import FILE_KEYS

from harness import timeout
from support import assert_one_line_error, prefork_command, run

pytestmark = timeout(60, 60)

# (arguments, words the one error line must contain)
CLI_CASES = [
    (["-b", ""], ["-b/--bind", "''"]),
    (["-c", ""], ["-c/--config"]),
    (["-w", "1.5"], ["-w/--workers", "'1.5'"]),
    (["-k", ""], ["-k/--worker-class", "''"]),
    (["--threads", "0"], ["--threads", "'0'"]),
    (["--threads", "many"], ["--threads", "'many'"]),
    (["--threads"], ["--threads", "expected one argument"]),
    (["--backlog", "lots"], ["--backlog", "'lots'"]),
    (["--backlog", "4294967296"], ["--backlog", "'4294967296'"]),
    (["--graceful-timeout", "-1"], ["--graceful-timeout", "'-1'"]),
    (["--graceful-timeout", "inf"], ["--graceful-timeout", "'inf'"]),
    (["--reuse-port=yes"], ["--reuse-port", "'yes'"]),
    (["--max-requests", "-1"], ["--max-requests", "'-1'"]),
    (["--max-requests", "1e3"], ["--max-requests", "'1e3'"]),
    (["--max-requests", "99999999999999999999"], ["--max-requests", "99999999999999999999"]),
    (["--max-requests-jitter", "-5"], ["--max-requests-jitter", "'-5'"]),
    (["--max-requests-jitter", "x"], ["--max-requests-jitter", "'x'"]),
    (["--max-connections", "0"], ["--max-connections", "'0'"]),
    (["--max-connections", "4294967296"], ["--max-connections", "'4294967296'"]),
    (["--max-buffer", "0"], ["--max-buffer", "'0'"]),
    (["--max-buffer", "1T"], ["--max-buffer", "'1T'"]),
    (["--max-buffer", "64KB"], ["--max-buffer", "'64KB'"]),
    (["--max-buffer=-1K"], ["--max-buffer", "'-1K'"]),
    (["--max-buffer", "17179869184G"], ["--max-buffer", "'17179869184G'"]),
    (["--idle-timeout", "-1"], ["--idle-timeout", "'-1'"]),
    (["--idle-timeout", "forever"], ["--idle-timeout", "'forever'"]),
    (["--idle-timeout", "1e400"], ["--idle-timeout", "'1e400'"]),
    (["--timeout", "-0.5"], ["--timeout", "'-0.5'"]),
    (["--timeout", "inf"], ["--timeout", "'inf'"]),
    (["--handler", ""], ["--handler", "''"]),
    (["--handler", "os:"], ["--handler", "'os:'"]),
    (["--handler", "1mod:x"], ["--handler", "'1mod:x'"]),
    (["--unix-mode", "rw"], ["--unix-mode", "'rw'"]),
    (["--unix-mode", "1777"], ["--unix-mode", "'1777'"]),
    (["--unix-mode", "777"], ["--unix-mode", "'777'"]),
    (["--pid", ""], ["--pid", "''"]),
    (["--log-file", ""], ["--log-file", "''"]),
    (["--log-level", ""], ["--log-level", "''"]),
    (["--metrics", "unix:/tmp/m.sock"], ["--metrics", "unix:/tmp/m.sock"]),
    (["--metrics", "localhost"], ["--metrics", "'localhost'"]),
    (["--metrics", "127.0.0.1:99999"], ["--metrics", "127.0.0.1:99999"]),
    (["--user", ""], ["--user", "''"]),
    (["--group", ""], ["--group", "''"]),
    (["--umask", ""], ["--umask", "''"]),
    (["--umask", "0o1000"], ["--umask", "'0o1000'"]),
    (["--threads", "99999"], ["--threads", "'99999'"]),
    (["--proxy-protocol=yes"], ["--proxy-protocol", "'yes'"]),
    (["--forwarded-allow-ips", "10.0.0.0/33"], ["--forwarded-allow-ips", "10.0.0.0/33"]),
    (["--forwarded-allow-ips", ""], ["--forwarded-allow-ips", "''"]),
    (["-b", "proxy:udp://127.0.0.1:0"], ["-b/--bind", "stream listeners"]),
    (["--loop", "fast"], ["--loop", "'fast'"]),
    (["--access-log", ""], ["--access-log", "''"]),
    (["--udp-rate", "x"], ["--udp-rate", "'x'"]),
    (["--udp-burst", "-1"], ["--udp-burst", "'-1'"]),
    (["--udp-rate-prefix", "99"], ["--udp-rate-prefix", "'99'"]),
    (["--udp-rate-table", "0"], ["--udp-rate-table", "'0'"]),
    (["--udp-allow-low-ports=yes"], ["--udp-allow-low-ports", "'yes'"]),
    (["--udp-public=yes"], ["--udp-public", "'yes'"]),
    (["--handler-type", "coroutine"], ["--handler-type", "'coroutine'"]),
    (["--max-conns-per-ip", "-1"], ["--max-conns-per-ip", "'-1'"]),
    (["--conn-rate-per-ip", "fast"], ["--conn-rate-per-ip", "'fast'"]),
    (["--conn-burst-per-ip", "0"], ["--conn-burst-per-ip", "'0'"]),
    (["--per-ip-table", "1000"], ["--per-ip-table", "'1000'"]),
    (["--certfile", ""], ["--certfile", "''"]),
    (["--keyfile", ""], ["--keyfile", "''"]),
    (["--ca-certs", ""], ["--ca-certs", "''"]),
    (["--verify-client", "always"], ["--verify-client", "'always'"]),
    (["--tls-min-version", "1.1"], ["--tls-min-version", "'1.1'"]),
    (["--ciphers", "no-such-cipher"], ["--ciphers", "'no-such-cipher'"]),
    (["--alpn", "h2,,x"], ["--alpn", "'h2,,x'"]),
    (["--sni", "example.com"], ["--sni", "'example.com'"]),
    (["--tls-handshake-timeout", "never"], ["--tls-handshake-timeout", "'never'"]),
    (["-b", "tls:udp://127.0.0.1:0"], ["-b/--bind", "no DTLS"]),
]


def serve_options() -> dict[str, argparse.Action]:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = commands.choices["serve"]
    return {
        action.option_strings[-1]: action
        for action in serve._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    }


def test_every_serve_option_has_a_bad_value_case():
    covered = {arg for args, _ in CLI_CASES for arg in args if arg.startswith("-")}
    covered = {arg.split("=")[0] for arg in covered}
    missing = [
        name for name, action in serve_options().items() if not covered & set(action.option_strings)
    ]
    assert not missing, f"options with no bad-value case: {missing}"


@pytest.mark.parametrize(
    ("args", "words"), CLI_CASES, ids=lambda v: " ".join(v) if v and v[0][0] == "-" else ""
)
def test_bad_option_value_is_one_line_exit_2(args, words):
    assert_one_line_error(run("serve", "-b", "127.0.0.1:0", "-w", "1", *args), 2, *words)


def test_absurd_thread_count_is_a_usage_error():
    command = prefork_command("serve", "-b", "127.0.0.1:0", "-w", "1", "-k", "thread")
    proc = subprocess.Popen(
        [*command, "--threads", "99999999999999999999"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        stderr = "still running after 5 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == 2 and "--threads" in stderr, stderr


# One bad value for every key a config file may hold (TOML text), and the
# key the error must name (the option's name, whichever spelling was used).
FILE_CASES = {
    "bind": ("bind = 5", "bind"),
    "workers": ("workers = true", "workers"),
    "worker-class": ('worker_class = "gevent"', "worker-class"),
    "threads": ("threads = 0", "threads"),
    "backlog": ("backlog = -1", "backlog"),
    "graceful-timeout": ('graceful-timeout = "soon"', "graceful-timeout"),
    "timeout": ("timeout = -1", "timeout"),
    "reuse-port": ("reuse_port = 1", "reuse-port"),
    "max-requests": ("max_requests = 1.5", "max-requests"),
    "max-requests-jitter": ('max_requests_jitter = "x"', "max-requests-jitter"),
    "max-connections": ("max_connections = 4294967296", "max-connections"),
    "max-buffer": ('max_buffer = "0"', "max-buffer"),
    "idle-timeout": ("idle_timeout = -3", "idle-timeout"),
    "handler": ('handler = "no such"', "handler"),
    "unix-mode": ('unix_mode = "777"', "unix-mode"),
    "log-level": ('log_level = "loud"', "log-level"),
    "pid": ("pid = [1]", "pid"),
    "metrics": ('metrics = "nohost"', "metrics"),
    "log-file": ("log_file = {path = 1}", "log-file"),
    "user": ('user = "no-such-user-here"', "user"),
    "group": ('group = "no-such-group-here"', "group"),
    "umask": ('umask = "abc"', "umask"),
    "proxy-protocol": ('proxy_protocol = "yes"', "proxy-protocol"),
    "forwarded-allow-ips": ("forwarded_allow_ips = [1]", "forwarded-allow-ips"),
    "loop": ('loop = "fast"', "loop"),
    "access-log": ("access_log = [1]", "access-log"),
    "udp-rate": ('udp_rate = "x"', "udp-rate"),
    "udp-burst": ("udp_burst = 0", "udp-burst"),
    "udp-rate-prefix": ('udp_rate_prefix = "99"', "udp-rate-prefix"),
    "udp-rate-table": ("udp_rate_table = 1", "udp-rate-table"),
    "udp-allow-low-ports": ('udp_allow_low_ports = "yes"', "udp-allow-low-ports"),
    "udp-public": ("udp_public = 1", "udp-public"),
    "handler-type": ('handler_type = "coroutine"', "handler-type"),
    "max-conns-per-ip": ("max_conns_per_ip = -1", "max-conns-per-ip"),
    "conn-rate-per-ip": ('conn_rate_per_ip = "fast"', "conn-rate-per-ip"),
    "conn-burst-per-ip": ("conn_burst_per_ip = 0", "conn-burst-per-ip"),
    "per-ip-table": ("per_ip_table = 1000", "per-ip-table"),
    "certfile": ("certfile = [1]", "certfile"),
    "keyfile": ('keyfile = ""', "keyfile"),
    "ca-certs": ("ca_certs = [1]", "ca-certs"),
    "verify-client": ('verify_client = "always"', "verify-client"),
    "tls-min-version": ('tls_min_version = "1.0"', "tls-min-version"),
    "ciphers": ('ciphers = "no-such-cipher"', "ciphers"),
    "alpn": ("alpn = [1]", "alpn"),
    "sni": ('sni = ["example.com"]', "sni"),
    "tls-handshake-timeout": ("tls_handshake_timeout = -1", "tls-handshake-timeout"),
}


def test_every_config_file_key_has_a_bad_value_case():
    assert set(FILE_CASES) == set(FILE_KEYS)


@pytest.mark.parametrize("key", sorted(FILE_CASES))
def test_bad_config_file_value_is_one_line_exit_2(tmp_path, key):
    text, name = FILE_CASES[key]
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    result = run("serve", "-c", str(config))
    assert_one_line_error(result, 2, str(config), name)


@pytest.mark.parametrize("text", ['config = "other.toml"', "[serve]\nworkers = 2", "Workers = 2"])
def test_keys_that_are_not_options_are_named(tmp_path, text):
    config = tmp_path / "bad.toml"
    config.write_text(text + "\n")
    assert_one_line_error(run("serve", "-c", str(config)), 2, str(config), "unknown key")


# -- the environment refuses: one line, exit 1 ------------------------------------


def test_pid_file_that_is_a_directory_is_one_line_exit_1(tmp_path):
    assert_one_line_error(run("serve", "--pid", str(tmp_path)), 1, "--pid", "cannot write")


def test_log_file_that_is_a_directory_is_one_line_exit_1(tmp_path):
    assert_one_line_error(run("serve", "--log-file", str(tmp_path)), 1, "--log-file")


def test_metrics_address_in_use_is_one_line_exit_1():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run("serve", "-b", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}")
    assert_one_line_error(result, 1, f"127.0.0.1:{port}", "address already in use")
