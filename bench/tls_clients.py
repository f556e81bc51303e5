"""The TLS load generators side by side: ``prefork bench --tls`` (its compiled
loop drives OpenSSL) and the C client ``peers/tls_pingpong.c`` that
``bench/tls.py`` measures every server with, each loading the same prefork
event worker over TLS.

The server is pinned to one core, the client to the other, as
``bench/compare.py`` runs them; the workloads are ``bench/tls.py``'s (TLS
1.3, AES-GCM, no session resumption). The figures: messages/s and the
client's own CPU per message (``prefork bench``'s over its measured window,
as its JSON reports it; the C client's over its run, from the children's
rusage). The clients alternate within each round, and each round's ratios
to the C client are taken within the round, then their medians quoted.

    python bench/tls_clients.py [--rounds 9] [--seconds 3] [--output FILE]
    python bench/tls_clients.py --render FILE     (the table of a stored run)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import compare
import tls

DEFAULT_OUTPUT = tls.HERE / "runs" / "tls_clients.json"
REFERENCE = "c-tls-pingpong"
CLIENTS = (REFERENCE, "prefork-bench")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_c(port: int, load: str, seconds: float, pin: compare.Pinning) -> dict[str, float]:
    (conns, size, per_request), _ = tls.WORKLOADS[load]
    argv = [*pin.client, str(tls.build_c("tls_pingpong")), "127.0.0.1", str(port)]
    argv += [str(conns), str(size)]
    extra = ["--connect-per-request"] if per_request else []
    subprocess.run([*argv, "0.5", *extra], check=True, capture_output=True)  # warm-up
    before = children_cpu()
    out = subprocess.run([*argv, str(seconds), *extra], check=True, capture_output=True, text=True)
    cpu = children_cpu() - before
    result = json.loads(out.stdout)
    messages = max(result["messages"], 1)
    return {
        "rate": result["messages"] / result["seconds"],
        "cpu_us": cpu / messages * 1e6,
        "errors": result["errors"],
    }


def measure_prefork(port: int, load: str, seconds: float, pin: compare.Pinning) -> dict[str, float]:
    (conns, size, per_request), _ = tls.WORKLOADS[load]
    argv = [*pin.client, compare.PYTHON, "-m", "prefork", "bench", f"127.0.0.1:{port}", "--tls"]
    argv += ["--insecure", "-c", str(conns), "-s", str(size), "-t", str(seconds)]
    argv += ["--warmup", "0.5", "--json", *(["--connect-per-request"] if per_request else [])]
    out = subprocess.run(argv, capture_output=True, text=True)  # exit 1 on errors: counted
    result = json.loads(out.stdout)
    return {
        "rate": result["messages_per_second"],
        "cpu_us": result["cpu_us_per_message"] or 0.0,
        "errors": result["error_total"],
    }


def render(data: dict[str, Any]) -> str:
    lines = [
        f"{data['rounds']} rounds of {data['seconds']:g} s against prefork's event worker "
        f"over TLS; medians; the ratios are the medians of each round's own ratio to "
        f"{REFERENCE}",
    ]
    for load, rounds in data["runs"].items():
        lines += ["", tls.WORKLOADS[load][1], f"{'client':<16} {'msg/s':>10} {'us/msg':>8} "
                  f"{'rate/ref':>9} {'cpu/ref':>8} {'errors':>6}"]  # fmt: skip
        paired = [r for r in rounds if r[REFERENCE]["rate"] > 0 and r[REFERENCE]["cpu_us"] > 0]
        for name in CLIENTS:
            runs = [r[name] for r in rounds]
            rate = statistics.median(r[name]["rate"] / r[REFERENCE]["rate"] for r in paired)
            cpu = statistics.median(r[name]["cpu_us"] / r[REFERENCE]["cpu_us"] for r in paired)
            lines.append(
                f"{name:<16} {statistics.median(x['rate'] for x in runs):>10,.0f} "
                f"{statistics.median(x['cpu_us'] for x in runs):>8.2f} {rate:>8.2f}x {cpu:>7.2f}x "
                f"{sum(x['errors'] for x in runs):>6}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--render", type=Path, metavar="FILE")
    args = parser.parse_args()
    if args.render is not None:
        print(render(json.loads(args.render.read_text())))
        return
    pin = compare.pinning()
    measures = {REFERENCE: measure_c, "prefork-bench": measure_prefork}
    runs: dict[str, list[dict[str, Any]]] = {load: [] for load in tls.WORKLOADS}
    with tempfile.TemporaryDirectory() as directory:
        cert, key = tls.certificate(Path(directory))
        (server,) = [s for s in tls.servers(cert, key) if s.name == "prefork-event"]
        with compare.Running(server, 1, pin) as running:
            for index in range(args.rounds):
                order = CLIENTS if index % 2 == 0 else CLIENTS[::-1]
                for load in tls.WORKLOADS:
                    runs[load].append(
                        {name: measures[name](running.port, load, args.seconds, pin)
                         for name in order}
                    )  # fmt: skip
                print(f"round {index + 1}/{args.rounds} done", file=sys.stderr)
    data = {
        "script": "tls_clients.py",
        "command": "python bench/tls_clients.py " + " ".join(sys.argv[1:]),
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
