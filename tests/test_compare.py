"""bench/compare.py, run for real on a small scale: it compiles the C peers,
starts real servers, loads them with ``prefork bench`` and writes its
results where it is told, keeping the rest of RESULTS.md. (The figures
themselves are not judged here: speed belongs to the benchmark, not to a
timed test.)"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

COMPARE = Path(__file__).resolve().parent.parent / "bench" / "compare.py"
BEGIN = "<!-- bench/compare.py: generated section begins -->"
END = "<!-- bench/compare.py: generated section ends -->"

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


def compare(tmp_path: Path, *args: str, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(COMPARE), "--output", str(tmp_path), "--build-dir"]
    argv += [str(tmp_path / "build"), *args]
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def leftovers(tmp_path: Path) -> list[str]:
    """Processes still running one of this run's servers."""
    found = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if str(tmp_path) in cmdline and pid != str(os.getpid()):
            found.append(cmdline)
    return found


@pytest.mark.timeout(150)
def test_a_small_comparison_writes_its_section_and_keeps_the_rest(tmp_path: Path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nA hand-written section that must stay.\n")
    done = compare(
        tmp_path, "--rounds", "1", "--seconds", "0.3", "--no-generator-check",
        "--servers", "c-epoll,prefork-event,c-prefork,prefork-sync",
        "--workloads", "latency,bulk",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert not leftovers(tmp_path)
    assert (tmp_path / "build" / "epoll_echo").exists()
    assert (tmp_path / "build" / "blocking_prefork").exists()
    text = results.read_text()
    assert text.startswith("# Benchmark results\n")
    assert "A hand-written section that must stay." in text
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    section = text[text.index(BEGIN) : text.index(END)]
    assert re.search(
        r"^Command: `python bench/compare.py .*--rounds 1 --seconds 0\.3 ", section, re.M
    )
    for title in ("1 x 1 KiB ping-pong", "4 x 64 KiB, 4 in flight"):
        assert title in section
    # Each server has a row per workload with figures, and each reference is 1.00x of itself.
    for name in ("c-epoll", "prefork-event", "c-prefork", "prefork-sync"):
        rows = re.findall(rf"^  {name} +([\d,]+) +[\d,]+\.\d ", section, re.MULTILINE)
        assert len(rows) == 2 and all(int(r.replace(",", "")) > 0 for r in rows), section
    for reference in ("c-epoll", "c-prefork"):
        assert re.search(rf"^  {reference} .* 1\.00x +1\.00x$", section, re.MULTILINE), section
    # Memory is measured where a server can hold 1,000 idle connections, not for sync.
    assert re.search(r"^  prefork-event +[\d,]+ bytes$", section, re.MULTILINE)
    assert not re.search(r"^  prefork-sync +[\d,]+ bytes$", section, re.MULTILINE)
    assert "failed runs" not in section
    raw = json.loads((tmp_path / "results.json").read_text())
    runs = {(run["workload"], run["server"]) for run in raw["runs"] if run["rate"] > 0}
    assert len(runs) == 8 and raw["failures"] == []
    # The stored results make the same report again, figure for figure.
    rendered = compare(tmp_path, "--render", str(tmp_path / "results.json"), timeout=30)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout.strip() in section
    assert "targets:" in rendered.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in done.stdout
    else:
        assert (tmp_path / "results.png").stat().st_size > 0

    # A second run replaces the section instead of adding one.
    again = compare(
        tmp_path, "--rounds", "1", "--seconds", "0.2", "--no-generator-check", "--no-memory",
        "--servers", "c-epoll", "--workloads", "latency",
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    text = results.read_text()
    assert text.count(BEGIN) == 1 and "A hand-written section that must stay." in text
    assert "4 x 64 KiB, 4 in flight" not in text  # the first run's bulk table is gone


@pytest.mark.timeout(120)
def test_servers_that_answer_are_sent_requests_and_checked_against_their_replies(tmp_path: Path):
    # The line protocol and the RESP store are not echoes: every message is
    # their exchange()'s request, and every reply byte is checked (a failed
    # check would fail the run and show under "failed runs").
    names = [
        "prefork-event-upper", "asyncio-upper", "prefork-event-resp", "asyncio-resp",
        "prefork-event-upper-stream", "asyncio-upper-stream",
    ]  # fmt: skip
    done = compare(
        tmp_path, "--rounds", "1", "--seconds", "0.3", "--no-generator-check", "--no-memory",
        "--servers", ",".join(names), "--workloads", "small,bulk",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert not leftovers(tmp_path)
    raw = json.loads((tmp_path / "results.json").read_text())
    assert raw["failures"] == []
    runs = {(run["workload"], run["server"]) for run in raw["runs"] if run["rate"] > 0}
    assert runs == {(load, name) for load in ("small", "bulk") for name in names}


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--servers", "nginx"], "unknown server 'nginx'"),
        (["--workloads", "huge"], "unknown workload 'huge'"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--baseline", "/nonexistent-tree"], "not a prefork checkout"),
    ],
)
def test_bad_choices_are_usage_errors(tmp_path: Path, args: list[str], needle: str):
    done = compare(tmp_path, *args, timeout=30)
    assert done.returncode == 2
    assert needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "RESULTS.md").exists()


def test_an_output_that_cannot_be_a_directory_is_a_usage_error(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = compare(tmp_path, "--output", str(blocker / "results"), timeout=30)
    assert done.returncode == 2
    assert "--output" in done.stderr and "Not a directory" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.timeout(60)
def test_bench_marks_the_measured_window_on_stderr(server_factory):
    """compare.py samples the server's CPU at these two lines, so the CPU per
    message covers the measured window only: both come, in order, once each,
    with the JSON result (whose seconds is that window) on stdout."""
    from prefork.tools.bench import WINDOW_CLOSES, WINDOW_OPENS

    from support import prefork_command

    server = server_factory("-w", "1", "-b", "127.0.0.1:0")
    done = subprocess.run(
        prefork_command("bench", server.addresses[0], "--json", "--marks", "-t", "0.3",
                        "--warmup", "0.1", "-c", "2"),
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines == [WINDOW_OPENS, WINDOW_CLOSES], done.stderr
    assert json.loads(done.stdout)["seconds"] >= 0.3


@pytest.mark.timeout(60)
def test_the_ab_table_pairs_each_prefork_server_with_its_baseline_copy(tmp_path: Path):
    """--baseline runs every chosen prefork server a second time from another
    checkout (here: this one), interleaved, and prints this/baseline ratios."""
    tree = Path(__file__).resolve().parent.parent
    done = compare(
        tmp_path, "--rounds", "1", "--seconds", "0.3", "--no-generator-check", "--no-memory",
        "--servers", "prefork-event", "--workloads", "latency", "--baseline", str(tree),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "A/B: this tree / the --baseline tree" in done.stdout
    row = re.search(r"latency\s+prefork-event\s+(\d+\.\d+)x\s+(\d+\.\d+)x", done.stdout)
    assert row, done.stdout
    assert not leftovers(tmp_path)


def test_protocol_cost_times_every_peer_class_alone() -> None:
    """bench/protocol_cost.py: each peer class answers its request on a
    transport that drops writes; one line per class, a figure per size."""
    script = COMPARE.parent / "protocol_cost.py"
    done = subprocess.run(
        [sys.executable, str(script), "--rounds", "1", "--count", "200"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()[1:]
    assert [line.split()[0] for line in lines] == ["Echo", "BufferedEcho", "UpperLines", "Resp"]
    for line in lines:
        figures = [float(cell) for cell in re.findall(r": +([0-9.]+)", line)]
        assert len(figures) == 3 and all(f > 0 for f in figures), line


def test_the_reachable_ratio_adds_a_class_s_own_cost_to_c_epoll_s(monkeypatch) -> None:
    """compare.reachable(): per round, (C epoll + the class on uvloop - the echo
    on uvloop) / the class on uvloop, and the median of those; none in bulk
    (C epoll is no floor there), none at depth > 1 for a class that may write
    more than once per read, none without the three servers measured."""
    monkeypatch.syspath_prepend(str(COMPARE.parent))
    import compare as bench_compare

    def run(cpu: float):
        return bench_compare.Run(1.0, 1.0, 1.0, 1.0, cpu, 1.0, 1.0)

    results = bench_compare.Results()
    for load in ("pingpong", "pipelined", "bulk"):
        results.runs[(load, "c-epoll")] = [run(3.0), run(3.0), None]
        results.runs[(load, "uvloop")] = [run(4.0), run(4.0), run(4.0)]
        results.runs[(load, "uvloop-resp")] = [run(10.0), run(9.0), run(10.0)]
        results.runs[(load, "uvloop-upper")] = [run(5.0), run(5.0), run(5.0)]
    loads = {w.name: w for w in bench_compare.WORKLOADS}
    reachable = bench_compare.reachable
    # Rounds: (3 + 6) / 10 and (3 + 5) / 9; the third has no C epoll figure.
    expected = (0.9 + 8 / 9) / 2
    assert reachable(results, loads["pingpong"], "Resp", "uvloop-resp") == pytest.approx(expected)
    assert reachable(results, loads["pipelined"], "Resp", "uvloop-resp") == pytest.approx(expected)
    assert reachable(results, loads["pingpong"], "Protocol", "uvloop") == pytest.approx(0.75)
    assert reachable(results, loads["pingpong"], "UpperLines", "uvloop-upper") == pytest.approx(0.8)
    assert reachable(results, loads["pipelined"], "UpperLines", "uvloop-upper") is None
    assert reachable(results, loads["bulk"], "Resp", "uvloop-resp") is None
    assert reachable(results, loads["small"], "Resp", "uvloop-resp") is None
