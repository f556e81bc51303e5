"""--pid: a live server's file is never taken over; a dead one's is."""

from __future__ import annotations

import signal
import subprocess

import pytest

from support import assert_one_line_error, exchange, run, wait_until

pytestmark = pytest.mark.timeout(90)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait(10)
    return proc.pid


def test_a_second_server_refuses_a_live_servers_pid_file(server_factory, tmp_path):
    pid_file = tmp_path / "echo.pid"
    first = server_factory("-w", "1", "--pid", str(pid_file))
    assert pid_file.read_text() == f"{first.pid}\n"
    result = run("serve", "-b", "127.0.0.1:0", "-w", "1", "--pid", str(pid_file))
    assert_one_line_error(result, 1, f"already running as pid {first.pid} (from {pid_file})")
    # The first server keeps its file, and serves on.
    assert pid_file.read_text() == f"{first.pid}\n"
    with first.connect() as sock:
        assert exchange(sock, b"still here", timeout=10) == b"still here"
    first.signal(signal.SIGTERM)
    assert first.wait(30) == 0
    assert not pid_file.exists()


def test_a_dead_servers_pid_file_is_taken_over(server_factory, tmp_path):
    pid_file = tmp_path / "echo.pid"
    pid_file.write_text(f"{dead_pid()}\n")
    server = server_factory("-w", "1", "--pid", str(pid_file))
    assert pid_file.read_text() == f"{server.pid}\n"
    server.signal(signal.SIGTERM)
    assert server.wait(30) == 0
    assert not pid_file.exists()


def test_a_pid_reused_by_another_program_is_stale(server_factory, tmp_path):
    """After a crash and a reboot the pid may name anything: only a prefork
    process counts as running."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        pid_file = tmp_path / "echo.pid"
        pid_file.write_text(f"{other.pid}\n")
        server = server_factory("-w", "1", "--pid", str(pid_file))
        assert wait_until(lambda: pid_file.read_text() == f"{server.pid}\n", 5)
    finally:
        other.kill()
        other.wait(10)


@pytest.mark.parametrize("content", ["", "garbage\n", "-1\n"])
def test_an_unreadable_pid_file_is_taken_over(server_factory, tmp_path, content):
    pid_file = tmp_path / "echo.pid"
    pid_file.write_text(content)
    server = server_factory("-w", "1", "--pid", str(pid_file))
    assert pid_file.read_text() == f"{server.pid}\n"
