"""What the abuse limits cost: the event worker with and without them.

Two workloads, each against ``prefork serve -k event -w 1`` pinned to one
core, ``prefork bench`` on the other (as ``bench/compare.py`` runs them):

- ``connect``: every message on a new TCP connection (``--connect-per-request``),
  "off" without per-client limits, "on" with ``--max-conns-per-ip`` and
  ``--conn-rate-per-ip`` set far above what the load reaches, so every
  connection pays both checks and none is refused;
- ``udp``: UDP echo, "off" with ``--udp-rate 0``, "on" with a rate limit no
  datagram reaches. (The UDP loop guard is always on, in both: it has no switch.)

The figure is the server's CPU per message (its process tree's, over the
measured window; ``failed``: requests without an echo, all runs together).
Rounds are interleaved, the first of the pair alternating, and the on/off
ratio is taken within each round, then its median quoted.

    python bench/guards.py [--rounds 7] [--seconds 3] [--output FILE]
    python bench/guards.py --render FILE     (the table of a stored run, measuring nothing)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

import compare

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "runs" / "guards.json"
EVENT = ("-k", "event", "-w", "1")
NO_REFUSAL = ("--conn-burst-per-ip", "1000000")
CONFIGS = {
    "connect": {
        "off": (),
        "on": ("--max-conns-per-ip", "1000000", "--conn-rate-per-ip", "1e9", *NO_REFUSAL),
    },
    "udp": {
        "off": ("--udp-rate", "0"),
        "on": ("--udp-rate", "1e9", "--udp-burst", "1000000"),
    },
}
LOADS = {  # prefork bench options
    "connect": ("--connect-per-request", "-c", "8", "-s", "64"),
    "udp": ("-c", "50", "-s", "64"),
}
TITLES = {
    "connect": "a new TCP connection per 64 B message, 8 at once",
    "udp": "UDP echo, 50 x 64 B in flight",
}


def server(load: str, setting: str) -> compare.Server:
    argv = [*compare.prefork_argv(*EVENT, *CONFIGS[load][setting])]
    if load == "udp":
        argv += ["-b", "udp://127.0.0.1:{port}"]
    return compare.Server(f"{load}-{setting}", "event", tuple(argv), prefork=True)


def measure(load: str, setting: str, seconds: float, pin: compare.Pinning) -> dict[str, float]:
    """One run: messages/s and the server's CPU us per message."""
    with compare.Running(server(load, setting), 1, pin) as running:
        scheme = "udp://" if load == "udp" else ""
        address = f"{scheme}127.0.0.1:{running.port}"
        run_bench(address, load, 0.5, pin, None)  # warm-up
        result = run_bench(address, load, seconds, pin, running.proc.pid)
    messages = max(result["messages"], 1)
    return {
        "rate": result["messages_per_second"],
        "cpu_us": result["server_cpu_seconds"] / messages * 1e6,
        "failed": result["failed"],
    }


def run_bench(
    address: str, load: str, seconds: float, pin: compare.Pinning, pid: int | None
) -> dict[str, Any]:
    """``compare.bench`` with this workload's options in place of its own."""
    original = compare.bench_argv

    def argv(*args: Any, **kwargs: Any) -> list[str]:
        base = original(*args, **kwargs)
        cut = base.index("--marks") + 1  # its -c/-s/-d follow: ours instead
        return [*base[:cut], *LOADS[load], *base[cut + 6 :]]

    compare.bench_argv = argv
    try:
        workload = compare.Workload(load, TITLES[load], 8, 64)
        return compare.bench(address, workload, seconds, pin, server_pid=pid)
    finally:
        compare.bench_argv = original


def render(data: dict[str, Any]) -> str:
    lines = [
        f"{data['rounds']} interleaved rounds of {data['seconds']:g} s; medians; the ratio is "
        "the median of the rounds' own on/off ratios",
        "",
        f"{'workload':<52} {'off us/msg':>10} {'on us/msg':>10} {'on/off cpu':>10} {'cost':>6} "
        f"{'off msg/s':>10} {'on msg/s':>10} {'failed':>7}",
    ]
    for load, rounds in data["runs"].items():
        off = [r["off"] for r in rounds]
        on = [r["on"] for r in rounds]
        ratio = statistics.median(r["on"]["cpu_us"] / r["off"]["cpu_us"] for r in rounds)
        lines.append(
            f"{TITLES[load]:<52} {statistics.median(r['cpu_us'] for r in off):>10.2f} "
            f"{statistics.median(r['cpu_us'] for r in on):>10.2f} {ratio:>9.2f}x "
            f"{(ratio - 1) * 100:>+5.1f}% "
            f"{statistics.median(r['rate'] for r in off):>10,.0f} "
            f"{statistics.median(r['rate'] for r in on):>10,.0f} "
            f"{sum(r['failed'] for r in off + on):>7}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--render", type=Path, metavar="FILE")
    args = parser.parse_args()
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return
    pin = compare.pinning()
    runs: dict[str, list[dict[str, Any]]] = {load: [] for load in CONFIGS}
    for index in range(args.rounds):
        for load in CONFIGS:
            order = ["off", "on"] if index % 2 == 0 else ["on", "off"]
            pair = {setting: measure(load, setting, args.seconds, pin) for setting in order}
            runs[load].append(pair)
        print(f"round {index + 1}/{args.rounds} done", file=sys.stderr)
    data = {
        "script": "guards.py",
        "command": "python bench/guards.py " + " ".join(sys.argv[1:]),
        "machine": compare.machine(),
        "date": date.today().isoformat(),
        "rounds": args.rounds,
        "seconds": args.seconds,
        "runs": runs,
    }
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    print(render(data))


if __name__ == "__main__":
    main()
