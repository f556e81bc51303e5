"""``prefork check`` and ``prefork reload|stop --pid FILE`` against real masters.

A control command must find the master through its pid file and never signal
blindly: a missing, stale or foreign file is one line and exit 1.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from support import assert_one_line_error, run, wait_until

pytestmark = pytest.mark.timeout(120)


def test_check_accepts_a_good_configuration_without_binding():
    done = run("check", "-w", "3", "-b", "127.0.0.1:1", "--handler", "daytime")
    assert done.returncode == 0, done.stderr
    # Port 1 needs root to bind and is never bound here: only checked.
    assert done.stdout.strip() == (
        "configuration OK: 3 event worker(s), handler daytime, on 127.0.0.1:1"
    )


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["-w", "0"], 2, "-w/--workers"),
        (["--handler", "no_such_module:Thing"], 3, "cannot import no_such_module"),
        (["-c", "/nonexistent.toml"], 2, "cannot read"),
    ],
)
def test_check_refuses_a_bad_configuration_in_one_line(args, code, says):
    assert_one_line_error(run("check", *args), code, says)


def test_reload_and_stop_signal_the_master_the_pid_file_names(server_factory, tmp_path):
    pid_file = tmp_path / "master.pid"
    server = server_factory("-w", "1", "--pid", str(pid_file))
    server.wait_workers(1)
    done = run("reload", "--pid", str(pid_file))
    assert done.returncode == 0, done.stderr
    assert f"sent HUP to master {server.pid}" in done.stdout
    assert wait_until(lambda: "generation 1 started" in server.log, 30), server.log
    done = run("stop", "--pid", str(pid_file), "--timeout", "30", timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"master {server.pid} stopped" in done.stdout
    assert server.wait(5) == 0
    assert not pid_file.exists()


def test_a_missing_stale_or_foreign_pid_file_is_reported_and_nothing_sent(tmp_path):
    missing = tmp_path / "missing.pid"
    assert_one_line_error(run("reload", "--pid", str(missing)), 1, "cannot read")

    # A process that is not a prefork master: it must not get the signal.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        foreign = tmp_path / "foreign.pid"
        foreign.write_text(f"{bystander.pid}\n")
        for command in (["reload"], ["stop"], ["upgrade"]):
            done = run(*command, "--pid", str(foreign))
            assert_one_line_error(done, 1, "is not a prefork master; nothing sent")
        assert bystander.poll() is None  # it got nothing (a TERM or HUP would end it)
    finally:
        bystander.kill()
        bystander.wait()
    stale = tmp_path / "stale.pid"
    stale.write_text(f"{bystander.pid}\n")  # reaped: no such process now
    assert_one_line_error(run("stop", "--pid", str(stale)), 1, "stale")
