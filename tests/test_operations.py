"""Operations: log files and USR1, privilege drop, umask, process titles,
inherited sockets (fd:// and systemd socket activation), sd_notify, and HUP
reading the configuration again. All through real processes."""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from prefork.server.watchdog import WATCHDOG_INTERVAL

from support import (
    Server,
    WakeupProbe,
    children_of,
    exchange,
    handler_env,
    launch,
    pid_alive,
    prefork_command,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
NOBODY = "nobody"


def run_prefork(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        prefork_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefork: error: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def echo(server: Server, payload: bytes = b"ping\n") -> bytes:
    with server.connect() as sock:
        return exchange(sock, payload, timeout=10)


# -- --log-file and USR1 -----------------------------------------------------


class FileLogServer:
    """A server that logs to a file: it is read for the start and the address."""

    def __init__(self, log_path, *args: str) -> None:
        self.log_path = log_path
        self.proc = subprocess.Popen(
            prefork_command("serve", "-b", "127.0.0.1:0", "--log-file", str(log_path), *args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )

    def text(self, path=None) -> str:
        try:
            with open(path or self.log_path) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def started(self) -> bool:
        return "master started" in self.text()

    def address(self) -> tuple[str, int]:
        for line in self.text().splitlines():
            if "listening on " in line:
                host, _, port = line.rsplit("listening on ", 1)[1].rpartition(":")
                return host, int(port)
        raise AssertionError(self.text())

    def kill_all(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)


@pytest.fixture
def file_log_server():
    # Not pytest's tmp_path: its directories are 0700, and a worker that has
    # dropped root must be able to reach the file to reopen it.
    directory = tempfile.mkdtemp(prefix="prefork-log-")
    os.chmod(directory, 0o755)
    started: list[FileLogServer] = []

    def factory(*args: str) -> FileLogServer:
        server = FileLogServer(Path(directory) / "prefork.log", *args)
        started.append(server)
        assert wait_until(server.started, 15), server.text()
        return server

    yield factory
    for server in started:
        server.kill_all()
    shutil.rmtree(directory)


def test_log_file_gets_the_log_and_usr1_reopens_it_in_master_and_workers(file_log_server):
    server = file_log_server("-w", "1", "--max-requests", "1")
    first = server.text()
    address = server.address()
    assert f"[{server.proc.pid}] [INFO] master started" in first
    rotated = server.log_path.with_suffix(".log.1")
    os.rename(server.log_path, rotated)  # what logrotate does
    server.proc.send_signal(signal.SIGUSR1)
    assert wait_until(lambda: "USR1: log file reopened" in server.text(), 10), server.text(rotated)
    # The worker reopened too: its own line (it recycles after one
    # connection) lands in the new file, under its pid.
    assert wait_until(lambda: len(children(server.proc.pid)) == 1, 10)
    worker = children(server.proc.pid)[0]
    with socket.create_connection(address, timeout=10) as sock:
        assert exchange(sock, b"rotate me", timeout=10) == b"rotate me"
    assert wait_until(lambda: f"[{worker}] [INFO] worker" in server.text(), 10), server.text()
    assert f"[{worker}] [INFO] worker" not in server.text(rotated)


def children(pid: int) -> list[int]:
    """Live children, zombies not counted."""
    return [p for p in children_of(pid) if pid_alive(p)]


def all_children_of(pid: int) -> list[int]:
    """Children, zombies included."""
    return children_of(pid)


def test_unwritable_log_file_is_a_one_line_error(tmp_path):
    result = run_prefork("serve", "--log-file", str(tmp_path / "missing" / "x.log"))
    assert_one_line_error(result, 1, "--log-file", "cannot open")


# -- --user, --group, --umask --------------------------------------------------


UID_HANDLER = """
import itertools
import os

class WhoAmI:
    def connection_made(self, transport):
        try:
            os.setuid(0)
            regained = "yes"
        except PermissionError:
            regained = "no"
        transport.write(f"{os.getuid()} {os.geteuid()} {os.getgid()} {regained}\\n".encode())
        transport.close()
    def data_received(self, data):
        pass
    def eof_received(self):
        return False
    def connection_lost(self, exc):
        pass
"""


@needs_root
def test_workers_run_as_user_and_group_with_no_way_back_to_root(server_factory, tmp_path):
    (tmp_path / "whoami_handler.py").write_text(UID_HANDLER)
    nobody = pwd.getpwnam(NOBODY)
    sock_path = tmp_path / "s.sock"
    server = server_factory(
        "-b",
        "127.0.0.1:0",
        "-b",
        f"unix:{sock_path}",
        "-w",
        "2",
        "--user",
        NOBODY,
        "--group",
        str(nobody.pw_gid),
        "--handler",
        "whoami_handler:WhoAmI",
        env=handler_env(tmp_path),
    )
    for pid in server.wait_workers(2):
        # A worker drops privileges while it boots, just after the fork.
        wait_until(lambda pid=pid: proc_status(pid)["Uid"].split()[0] != "0", 5)
        status = proc_status(pid)
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(nobody.pw_gid)] * 4, status["Gid"]
        assert "0" not in status["Groups"].split(), status["Groups"]
        assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert proc_status(server.pid)["Uid"].split()[0] == "0"  # the master keeps root
    with server.connect() as sock:
        reply = exchange(sock, b"", timeout=10).decode().split()
    assert reply == [str(nobody.pw_uid), str(nobody.pw_uid), str(nobody.pw_gid), "no"]
    # The UNIX socket is the workers' group's, mode 660.
    st = os.stat(sock_path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        nobody.pw_uid,
        nobody.pw_gid,
        0o660,
    )


@needs_root
def test_workers_that_dropped_root_still_die_with_the_master(server_factory):
    """Changing credentials clears PR_SET_PDEATHSIG: it must be set after."""
    server = server_factory("-w", "2", "--user", NOBODY)
    workers = server.wait_workers(2)
    os.kill(server.pid, signal.SIGKILL)
    server.wait(10)
    assert wait_until(lambda: not any(pid_alive(p) for p in workers), 3)


@needs_root
def test_log_file_is_handed_to_the_user_so_workers_can_reopen_it(file_log_server):
    server = file_log_server("-w", "1", "--user", NOBODY, "--max-requests", "1")
    nobody = pwd.getpwnam(NOBODY).pw_uid
    assert os.stat(server.log_path).st_uid == nobody
    address = server.address()
    rotated = server.log_path.with_suffix(".log.1")
    os.rename(server.log_path, rotated)
    server.proc.send_signal(signal.SIGUSR1)  # the master makes the new file: it is root's
    assert wait_until(lambda: "USR1: log file reopened" in server.text(), 10)
    assert os.stat(server.log_path).st_uid == nobody  # ... and hands it over
    assert wait_until(lambda: len(children(server.proc.pid)) == 1, 10)
    worker = children(server.proc.pid)[0]
    with socket.create_connection(address, timeout=10) as sock:
        assert exchange(sock, b"x", timeout=10) == b"x"
    # The worker (no longer root) reopened the new file and logs into it.
    assert wait_until(lambda: f"[{worker}] [INFO] worker" in server.text(), 10), server.text()


@needs_root
def test_user_without_group_hands_socket_and_log_file_to_the_login_group(file_log_server, tmp_path):
    """The workers run with the user's login group: the files they must open
    or let clients reach belong to it, not to the master's group (root)."""
    nobody = pwd.getpwnam(NOBODY)
    assert nobody.pw_gid != os.getgid(), "the test needs a login group other than root's"
    sock_path = tmp_path / "s.sock"
    server = file_log_server("-b", f"unix:{sock_path}", "-w", "1", "--user", NOBODY)
    st = os.stat(sock_path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        nobody.pw_uid,
        nobody.pw_gid,
        0o660,
    )
    log = os.stat(server.log_path)
    assert (log.st_uid, log.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert wait_until(lambda: len(children(server.proc.pid)) == 1, 10)
    worker = children(server.proc.pid)[0]
    assert wait_until(lambda: proc_status(worker)["Gid"].split()[0] != "0", 5)
    assert proc_status(worker)["Gid"].split() == [str(nobody.pw_gid)] * 4


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("--user", "no-such-user-here", ["--user", "no such user"]),
        ("--group", "no-such-group-here", ["--group", "no such group"]),
        ("--umask", "999", ["--umask", "octal"]),
    ],
)
def test_bad_user_group_and_umask_are_one_line_usage_errors(option, value, words):
    assert_one_line_error(run_prefork("serve", option, value), 2, *words)


def test_umask_applies_to_the_files_the_server_creates(server_factory, tmp_path):
    pid_file = tmp_path / "prefork.pid"
    server_factory("-w", "1", "--umask", "077", "--pid", str(pid_file))
    assert stat.S_IMODE(os.stat(pid_file).st_mode) == 0o600
    other = tmp_path / "other.pid"
    server_factory("-w", "1", "--umask", "022", "--pid", str(other))
    assert stat.S_IMODE(os.stat(other).st_mode) == 0o644


# -- process titles -------------------------------------------------------------


def test_process_titles_name_master_and_workers(server_factory):
    server = server_factory("-w", "2")
    workers = server.wait_workers(2)
    address = server.addresses[0]
    assert cmdline(server.pid) == f"prefork: master [echo {address}]"
    # A worker names itself as it boots, just after the fork.
    wait_until(lambda: all(cmdline(p).startswith("prefork: worker") for p in workers), 5)
    titles = sorted(cmdline(pid) for pid in workers)
    assert all(t.startswith("prefork: worker ") and t.endswith(f"[echo {address}]") for t in titles)
    assert len(set(titles)) == 2, titles


# -- inherited sockets ----------------------------------------------------------


@pytest.fixture
def listening_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_bind_fd_serves_an_inherited_listening_socket(server_factory, listening_socket):
    fd = listening_socket.fileno()
    server = server_factory("-b", f"fd://{fd}", "-w", "2", pass_fds=(fd,))
    port = listening_socket.getsockname()[1]
    assert server.addresses == [f"127.0.0.1:{port}"]
    listening_socket.close()  # the server's copy is the one that serves now
    for _ in range(4):
        assert echo(server) == b"ping\n"
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0


def test_bind_fd_serves_an_inherited_udp_socket(server_factory):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        fd = udp.fileno()
        server_factory("-b", f"fd://{fd}", "-w", "1", pass_fds=(fd,))
        address = udp.getsockname()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            client.sendto(b"datagram", address)
            assert client.recvfrom(100)[0] == b"datagram"


def test_bind_fd_refuses_what_is_not_a_listener(tmp_path):
    with socket.socket() as unbound:
        fd = unbound.fileno()
        result = subprocess.run(
            prefork_command("serve", "-b", f"fd://{fd}"),
            capture_output=True,
            text=True,
            timeout=20,
            pass_fds=(fd,),
        )
    assert_one_line_error(result, 1, f"fd://{fd}", "not a listening socket")
    with open(tmp_path / "file", "w") as f:
        result = subprocess.run(
            prefork_command("serve", "-b", f"fd://{f.fileno()}"),
            capture_output=True,
            text=True,
            timeout=20,
            pass_fds=(f.fileno(),),
        )
    assert_one_line_error(result, 1, "not a socket")
    assert_one_line_error(run_prefork("serve", "-b", "fd://77"), 1, "not an open descriptor")
    assert_one_line_error(run_prefork("serve", "-b", "fd://1"), 2, "fd://N")


ENV_HANDLER = """
import itertools
import os

class Env:
    def connection_made(self, transport):
        transport.write(repr(sorted(k for k in os.environ if k.startswith("LISTEN_"))).encode())
        transport.close()
    def data_received(self, data):
        pass
    def eof_received(self):
        return False
    def connection_lost(self, exc):
        pass
"""


def test_systemd_socket_activation(listening_socket, tmp_path):
    """LISTEN_FDS/LISTEN_PID as systemd sets them: descriptor 3 on, our pid."""
    (tmp_path / "env_handler.py").write_text(ENV_HANDLER)
    fd = listening_socket.fileno()

    def as_fd_3() -> None:
        os.dup2(fd, 3)

    # sh sets LISTEN_PID to its own pid, which exec hands on to prefork.
    script = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@"'
    argv = prefork_command("serve", "-w", "2", "--handler", "env_handler:Env")
    server = launch(
        ["sh", "-c", script, "sh", *argv],
        env=handler_env(tmp_path),
        preexec_fn=as_fd_3,
        pass_fds=(3,),
    )
    try:
        port = listening_socket.getsockname()[1]
        assert server.addresses == [f"127.0.0.1:{port}"], server.log
        listening_socket.close()
        server.wait_workers(2)
        # Served, and the variables are not handed on to what workers run.
        assert echo(server, b"") == b"[]"
    finally:
        server.kill_all()


# -- sd_notify ------------------------------------------------------------------


class NotifySocket:
    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[str] = []
        self.lock = threading.Lock()

    def wait_for(self, text: str, timeout: float = 10.0) -> list[str]:
        """Read until a message contains ``text``; return every message so far."""
        self.sock.settimeout(timeout)
        while not any(text in m for m in self.messages):
            self.messages.append(self.sock.recv(4096).decode())
        return self.messages

    def close(self) -> None:
        self.sock.close()


def test_sd_notify_ready_reloading_stopping(server_factory, tmp_path):
    path = str(tmp_path / "notify")
    notify = NotifySocket(path)
    try:
        env = dict(os.environ, NOTIFY_SOCKET=path)
        server = server_factory("-w", "1", env=env)
        ready = notify.wait_for("READY=1")[0].splitlines()
        assert "READY=1" in ready and f"MAINPID={server.pid}" in ready
        server.signal(signal.SIGHUP)
        messages = notify.wait_for("generation 1")
        reloading = messages[1].splitlines()
        assert reloading[0] == "RELOADING=1" and messages[2].startswith("READY=1"), messages
        assert reloading[1].startswith("MONOTONIC_USEC=")  # for Type=notify-reload
        usec = int(reloading[1].split("=")[1])
        assert abs(usec - time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000) < 10_000_000
        server.signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING=1")[-1].startswith("STOPPING=1")
        assert server.wait(15) == 0
    finally:
        notify.close()


def test_sd_notify_watchdog_and_abstract_socket(server_factory):
    """Under WatchdogSec= the master says WATCHDOG=1 often enough for systemd.

    systemd kills a service whose pings are further apart than WatchdogSec;
    the master promises one every half of it (sd_watchdog_enabled's advice),
    timed from the previous one. So each gap between two pings, as we see
    them, is at most that half plus two wake-ups (the master's when the ping
    is due, ours when it arrives) as long as the probe measured them, and
    below WatchdogSec in any case.
    """
    watchdog_sec = 0.4
    promised = watchdog_sec / 2
    name = f"prefork-test-{os.getpid()}-{threading.get_ident()}"
    notify = NotifySocket("\0" + name)
    arrivals: list[float] = []
    try:
        env = dict(os.environ, NOTIFY_SOCKET="@" + name, WATCHDOG_USEC=str(int(watchdog_sec * 1e6)))
        with WakeupProbe() as probe:
            server_factory("-w", "1", env=env)
            notify.wait_for("READY=1")
            notify.sock.settimeout(5 * watchdog_sec)  # a silent master fails here
            while len(arrivals) < 11:  # ten gaps, two seconds
                if "WATCHDOG=1" in notify.sock.recv(4096).decode():
                    arrivals.append(time.monotonic())
    finally:
        notify.close()
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    bound = promised + probe.allowance(2)
    print(f"\nwatchdog gaps {min(gaps):.4f}..{max(gaps):.4f}s, bound {bound:.4f}s ({probe})")
    assert max(gaps) <= bound, (gaps, bound, str(probe))
    assert max(gaps) < watchdog_sec, gaps


# -- HUP reads the configuration again -----------------------------------------


def test_hup_reads_the_config_file_again(server_factory, tmp_path):
    config = tmp_path / "prefork.toml"
    config.write_text('workers = 2\nworker-class = "event"\n')
    server = server_factory("-c", str(config))
    old = server.wait_workers(2)
    config.write_text('workers = 3\nworker-class = "sync"\nbacklog = 7\n')
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: len(set(server.workers()) - set(old)) == 3, 10), server.log
    assert wait_until(lambda: not set(server.workers()) & set(old), 10), server.log
    assert "changing backlog needs a restart" in server.log
    assert echo(server) == b"ping\n"  # still on the port it started with
    # A file that no longer parses: the log says why, the workers stay.
    current = server.workers()
    config.write_text("workers = = 3\n")
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "HUP: reload failed" in server.log, 10), server.log
    assert "invalid TOML" in server.log
    assert sorted(server.workers()) == sorted(current)
    assert echo(server) == b"ping\n"


def test_hup_keeps_ttin_adjustments_when_the_count_did_not_change(server_factory):
    server = server_factory("-w", "1")
    server.wait_workers(1)
    server.signal(signal.SIGTTIN)
    server.wait_workers(2)
    server.signal(signal.SIGHUP)
    assert wait_until(lambda: "generation 1 started" in server.log, 10)
    server.wait_workers(2)


# -- PID 1 ----------------------------------------------------------------------

ORPHAN_HANDLER = """
import itertools
import os
import time

class Orphan:
    def connection_made(self, transport):
        child = os.fork()
        if child == 0:  # leave a grandchild behind: it is re-parented to PID 1
            if os.fork() == 0:
                os.closerange(3, 4096)  # not the client's connection: it must end now
                time.sleep(3.0)
            os._exit(0)
        os.waitpid(child, 0)
        transport.write(b"orphaned\\n")
        transport.close()
    def data_received(self, data):
        pass
    def eof_received(self):
        return False
    def connection_lost(self, exc):
        pass
"""


def state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def pid_in_namespace(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    raise AssertionError("no NSpid line")


@pytest.mark.skipif(os.geteuid() != 0, reason="a PID namespace needs root")
def test_master_as_pid_1_reaps_orphans(tmp_path):
    """In a container the master is PID 1: orphans become its children."""
    (tmp_path / "orphan_handler.py").write_text(ORPHAN_HANDLER)
    argv = prefork_command("serve", "-w", "1", "-k", "sync", "--handler", "orphan_handler:Orphan")
    command = ["unshare", "--pid", "--fork", "--mount-proc", *argv, "-b", "127.0.0.1:0"]
    server = launch(command, env=handler_env(tmp_path))
    try:
        master = children(server.pid)[0]  # unshare's child
        assert pid_in_namespace(master) == 1
        assert wait_until(lambda: len(children(master)) == 1, 10)
        worker = children(master)[0]
        assert echo(server, b"") == b"orphaned\n"
        # The grandchild is the master's child now, for the 3 s it lives...
        assert wait_until(lambda: len(all_children_of(master)) == 2, 2.5), all_children_of(master)
        # ... and once it exits the master reaps it: no zombie stays.
        assert wait_until(lambda: all_children_of(master) == [worker], 5), [
            (p, state_of(p)) for p in all_children_of(master)
        ]
    finally:
        server.kill_all()


def test_a_reloaded_worker_that_does_not_finish_is_killed_after_graceful_timeout(
    server_factory,
):
    """HUP with --graceful-timeout 1: an old worker held by a connection that
    never ends is killed 1 s after the master told it to stop.

    Not before (strict: the master starts the clock when it handles the HUP,
    after we sent it). Not later than 1 s plus what the same reload costs
    when the old worker has nothing to finish (measured first: the master
    wakes, forks the new generation, TERMs the old worker, which exits and
    is reaped), plus one turn of the master's loop (it looks at the
    deadlines every WATCHDOG_INTERVAL with --timeout on, the default), our
    polling interval, and two wake-ups (the master's at that turn, ours
    polling) as long as the probe measured them.
    """
    graceful = 1.0
    poll = 0.01
    server = server_factory(
        "-w", "1", "--graceful-timeout", str(graceful), "--idle-timeout", "0"
    )  # fmt: skip
    (first,) = server.wait_workers(1)
    with WakeupProbe() as probe:
        hup_at = time.monotonic()
        server.signal(signal.SIGHUP)  # nothing to finish: the old worker leaves at once
        assert wait_until(lambda: not pid_alive(first), 10, poll), server.log
        unhurried = time.monotonic() - hup_at
        (old,) = server.wait_workers(1)
        assert old != first
        with server.connect() as held:  # an idle connection keeps the old worker busy
            held.sendall(b"x")
            assert held.recv(1) == b"x"
            hup_at = time.monotonic()
            server.signal(signal.SIGHUP)
            assert wait_until(lambda: not pid_alive(old), 10, poll), server.log
            took = time.monotonic() - hup_at
    bound = graceful + unhurried + WATCHDOG_INTERVAL + poll + probe.allowance(2)
    print(f"\nkilled after {took:.4f}s (unhurried {unhurried:.4f}s), bound {bound:.4f}s ({probe})")
    assert took >= graceful, f"killed after {took:.3f}s"
    assert took <= bound, (took, bound, unhurried, str(probe))
    assert "still finishing after --graceful-timeout 1s: killing it" in server.log
