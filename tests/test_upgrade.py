"""USR2 upgrades the master in place, WINCH retires the old one's workers,
HUP rolls back: real masters, real signals, under a connect/echo/close load.

What a user is owed: not one connection lost from USR2 to the old master's
exit, for every worker class, with and without --reuse-port; the pid file
naming whoever serves (FILE.oldbin the old master meanwhile); a new master
that cannot start leaves the old one serving and says why.
"""

from __future__ import annotations

import os
import signal
import socket
import textwrap

import pytest

from support import (
    WORKER_CLASS_ARGS,
    ConnectEchoLoad,
    children_of,
    exchange,
    handler_env,
    launch,
    prefork_command,
    run,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)

CASES = {
    **WORKER_CLASS_ARGS,
    "event-reuse-port": ["-k", "event", "--reuse-port"],
    "sync-reuse-port": ["-k", "sync", "--reuse-port"],
}
STEP = 30  # seconds any one step may take on a busy machine


def title(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def workers_of(master: int) -> list[int]:
    """The master's children that are workers (not a new master it started)."""
    return [pid for pid in children_of(master) if title(pid).startswith(b"prefork: worker")]


def read_pid(path) -> int:
    return int(path.read_text().strip())


def upgrade(server, pid_file) -> int:
    """USR2, then wait until the new master says ready and has workers."""
    old = server.pid
    server.signal(signal.SIGUSR2)
    assert wait_until(lambda: "ready; WINCH" in server.log, STEP), server.log[-2000:]
    new = read_pid(pid_file)
    assert new != old and read_pid(pid_file.with_name(pid_file.name + ".oldbin")) == old
    assert wait_until(lambda: len(workers_of(new)) >= 1, STEP), server.log[-2000:]
    return new


def retire_old(server) -> None:
    """WINCH the old master and wait until its workers are gone."""
    server.signal(signal.SIGWINCH)
    assert wait_until(lambda: not workers_of(server.pid), STEP), server.log[-2000:]


@pytest.mark.parametrize("case", list(CASES))
def test_usr2_winch_term_loses_no_connection(server_factory, tmp_path, case):
    pid_file = tmp_path / "master.pid"
    server = server_factory("-w", "2", *CASES[case], "--pid", str(pid_file))
    server.wait_workers(2)
    old = server.pid
    with ConnectEchoLoad(server) as load:
        wait_until(lambda: sum(load.done) >= 20, STEP)
        new = upgrade(server, pid_file)
        before = sum(load.done)  # both masters' workers serve now
        wait_until(lambda: sum(load.done) >= before + 20, STEP)
        retire_old(server)
        server.signal(signal.SIGTERM)
        assert server.wait(STEP) == 0
        before = sum(load.done)  # the new master alone
        wait_until(lambda: sum(load.done) >= before + 20, STEP)
    assert not load.failures, (load.failures[:5], server.log[-3000:])
    assert sum(load.done) >= 60, load.done
    assert read_pid(pid_file) == new and not (tmp_path / "master.pid.oldbin").exists()
    assert f"the sockets stay with master {new}" in server.log
    assert len(workers_of(new)) == 2
    with server.connect() as sock:
        assert exchange(sock, b"after the upgrade") == b"after the upgrade"
    assert f"[{old}]" in server.log and "Traceback" not in server.log


def test_a_rollback_loses_no_connection(server_factory, tmp_path):
    """USR2, WINCH the old master, then HUP it (its workers come back) and
    TERM the new one: the old master serves alone again and has its file."""
    pid_file = tmp_path / "master.pid"
    server = server_factory("-w", "2", "--pid", str(pid_file))
    server.wait_workers(2)
    with ConnectEchoLoad(server) as load:
        wait_until(lambda: sum(load.done) >= 20, STEP)
        new = upgrade(server, pid_file)
        retire_old(server)
        server.signal(signal.SIGHUP)
        assert wait_until(lambda: len(workers_of(server.pid)) == 2, STEP), server.log[-2000:]
        os.kill(new, signal.SIGTERM)
        assert wait_until(lambda: "this master serves alone" in server.log, STEP), server.log
        before = sum(load.done)
        wait_until(lambda: sum(load.done) >= before + 20, STEP)
    assert not load.failures, (load.failures[:5], server.log[-3000:])
    assert read_pid(pid_file) == server.pid
    assert not (tmp_path / "master.pid.oldbin").exists()
    assert f"the sockets stay with master {server.pid}" in server.log  # the new one's stop
    with server.connect() as sock:
        assert exchange(sock, b"rolled back") == b"rolled back"


def test_a_broken_release_leaves_the_old_master_serving(server_factory, tmp_path):
    module = tmp_path / "release.py"
    module.write_text(
        textwrap.dedent(
            """
            import asyncio

            class Echo(asyncio.Protocol):
                def connection_made(self, transport):
                    self.transport = transport

                def data_received(self, data):
                    self.transport.write(data)
            """
        )
    )
    pid_file = tmp_path / "master.pid"
    server = server_factory(
        "-w", "1", "--handler", "release:Echo", "--pid", str(pid_file), env=handler_env(tmp_path)
    )
    server.wait_workers(1)
    module.write_text("raise RuntimeError('this release is broken')\n")
    server.signal(signal.SIGUSR2)
    assert wait_until(lambda: "before it was ready" in server.log, STEP), server.log
    assert "this release is broken" in server.log  # the new master's one line says why
    assert f"this master ({server.pid}) keeps serving" in server.log
    assert read_pid(pid_file) == server.pid
    assert not (tmp_path / "master.pid.oldbin").exists()
    with server.connect() as sock:
        assert exchange(sock, b"still here") == b"still here"
    assert "Traceback" not in server.log


def test_a_second_usr2_during_an_upgrade_is_refused(server_factory, tmp_path):
    pid_file = tmp_path / "master.pid"
    server = server_factory("-w", "1", "--pid", str(pid_file))
    server.wait_workers(1)
    new = upgrade(server, pid_file)
    server.signal(signal.SIGUSR2)
    assert wait_until(lambda: "an upgrade is under way" in server.log, STEP), server.log
    os.kill(new, signal.SIGUSR2)  # the new master refuses too while the old one runs
    assert wait_until(lambda: "which this one upgrades, is still running" in server.log, STEP)
    assert read_pid(pid_file) == new
    assert (
        len([pid for pid in children_of(server.pid) if title(pid).startswith(b"prefork: master")])
        == 1
    )


def test_the_new_master_tells_systemd_its_pid(server_factory, tmp_path):
    path = str(tmp_path / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(STEP)
    try:
        env = dict(os.environ, NOTIFY_SOCKET=path)
        pid_file = tmp_path / "master.pid"
        server = server_factory("-w", "1", "--pid", str(pid_file), env=env)
        messages = [notify.recv(4096).decode()]
        assert f"MAINPID={server.pid}" in messages[0].splitlines()
        new = upgrade(server, pid_file)
        while f"MAINPID={new}" not in messages[-1]:
            messages.append(notify.recv(4096).decode())
        assert "READY=1" in messages[-1].splitlines(), messages
    finally:
        notify.close()


def test_prefork_upgrade_runs_the_whole_sequence(server_factory, tmp_path):
    pid_file = tmp_path / "master.pid"
    server = server_factory("-w", "2", "--pid", str(pid_file))
    server.wait_workers(2)
    old = server.pid
    with ConnectEchoLoad(server) as load:
        wait_until(lambda: sum(load.done) >= 20, STEP)
        done = run("upgrade", "--pid", str(pid_file), "--timeout", str(STEP), timeout=4 * STEP)
        assert done.returncode == 0, done.stdout + done.stderr
        assert server.wait(STEP) == 0  # the old master is gone
        new = read_pid(pid_file)
        before = sum(load.done)
        wait_until(lambda: sum(load.done) >= before + 20, STEP)
    assert not load.failures, (load.failures[:5], server.log[-3000:])
    assert new != old and f"master {old} stopped; master {new} serves" in done.stdout
    assert len(workers_of(new)) == 2


def test_a_socket_activated_master_hands_systemds_socket_on(tmp_path):
    """LISTEN_FDS as systemd sets them (see test_operations): the new master
    serves systemd's socket, not the command line's default address."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    port = listening.getsockname()[1]
    pid_file = tmp_path / "master.pid"

    def as_fd_3() -> None:
        os.dup2(listening.fileno(), 3)

    script = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
    argv = prefork_command("serve", "-w", "1", "--pid", str(pid_file))
    server = launch(["sh", "-c", script, "sh", *argv], preexec_fn=as_fd_3, pass_fds=(3,))
    try:
        listening.close()  # systemd's copy is now only the server's
        server.wait_workers(1)
        new = upgrade(server, pid_file)
        retire_old(server)
        server.signal(signal.SIGTERM)
        assert server.wait(STEP) == 0
        assert server.addresses == [f"127.0.0.1:{port}"] * 2, server.log  # both masters
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            assert exchange(sock, b"activated") == b"activated"
        assert len(workers_of(new)) == 1
    finally:
        server.kill_all()
