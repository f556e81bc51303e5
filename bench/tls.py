"""TLS: prefork's event worker (OpenSSL driven from the compiled loop) next to
the C reference with OpenSSL (``peers/tls_epoll_echo.c``, the same state
machine) and uvloop and asyncio with an ``ssl=`` context.

Every server is pinned to one core, the load generator (``peers/tls_pingpong.c``,
C and OpenSSL, the same client for every server; ``prefork bench --tls`` is
prefork's own) to the other, as
``bench/compare.py`` runs them. Workloads (TLS 1.3, OpenSSL's default suite,
AES-GCM): 50 connections ping-ponging 1 KiB, 4 ping-ponging 64 KiB, and a new
connection per 64 B message (a full handshake each, no resumption: handshakes
per second). The figures: messages/s and the server's CPU per message (its
process tree's, over the generator's run). Rounds are interleaved and the
servers' order rotates; each round's ratios to the C reference are taken
within the round, then their medians quoted.

    python bench/tls.py [--rounds 9] [--seconds 3] [--output FILE]
    python bench/tls.py --render FILE     (the table of a stored run)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import compare

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "runs" / "tls.json"
WORKLOADS = {  # name: (connections, size, connect per request), title
    "pingpong-1k": ((50, 1024, False), "50 x 1 KiB ping-pong"),
    "bulk-64k": ((4, 65536, False), "4 x 64 KiB ping-pong"),
    "handshakes": ((4, 64, True), "a new connection per 64 B message (handshakes/s)"),
}
REFERENCE = "c-tls-epoll"


def build_c(name: str) -> Path:
    """``peers/NAME.c`` linked with OpenSSL, into compare's build directory."""
    compare.BUILD.mkdir(exist_ok=True)
    target, source = compare.BUILD / name, compare.PEERS / f"{name}.c"
    if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
        cmd = ["cc", "-O2", "-Wall", "-o", str(target), str(source), "-lssl", "-lcrypto"]
        subprocess.run(cmd, check=True)
    return target


def certificate(directory: Path) -> tuple[str, str]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=bench"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


def servers(cert: str, key: str) -> list[compare.Server]:
    tls = ("--certfile", cert, "--keyfile", key)
    echo = str(compare.PEERS / "asyncio_tls_echo.py")
    return [
        compare.Server(REFERENCE, "event", (str(build_c("tls_epoll_echo")), "{port}", cert, key)),
        compare.Server(
            "prefork-event", "event", compare.prefork_argv(*compare.EVENT_ARGS, *tls), prefork=True
        ),
        compare.Server(
            "uvloop-ssl",
            "event",
            (compare.PYTHON, echo, "uvloop", "{port}", cert, key),
            needs="uvloop",
        ),  # fmt: skip
        compare.Server(
            "asyncio-ssl", "event", (compare.PYTHON, echo, "asyncio", "{port}", cert, key)
        ),
    ]


def measure(
    server: compare.Server, load: str, seconds: float, pin: compare.Pinning
) -> dict[str, float]:
    (conns, size, per_request), _ = WORKLOADS[load]
    client = str(build_c("tls_pingpong"))
    with compare.Running(server, 1, pin) as running:
        argv = [*pin.client, client, "127.0.0.1", str(running.port), str(conns), str(size)]
        extra = ["--connect-per-request"] if per_request else []
        subprocess.run([*argv, "0.5", *extra], check=True, capture_output=True)  # warm-up
        before = compare.tree_cpu(running.proc.pid)
        out = subprocess.run(
            [*argv, str(seconds), *extra], check=True, capture_output=True, text=True
        )
        cpu = compare.tree_cpu(running.proc.pid) - before
    result = json.loads(out.stdout)
    messages = max(result["messages"], 1)
    return {
        "rate": result["messages"] / result["seconds"],
        "cpu_us": cpu / messages * 1e6,
        "errors": result["errors"],
    }


def importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        print(f"note: {module} is not installed: its server is left out", file=sys.stderr)
        return False
    return True


def render(data: dict[str, Any]) -> str:
    lines = [
        f"{data['rounds']} interleaved rounds of {data['seconds']:g} s; medians; the ratios "
        f"are the medians of each round's own ratio to {REFERENCE}",
    ]
    for load, rounds in data["runs"].items():
        lines += ["", WORKLOADS[load][1], f"{'server':<16} {'msg/s':>10} {'us/msg':>8} "
                  f"{'rate/ref':>9} {'cpu/ref':>8} {'errors':>6}"]  # fmt: skip
        # A round whose reference failed (no echo) has no ratios; it is counted below.
        paired = [r for r in rounds if r[REFERENCE]["rate"] > 0 and not r[REFERENCE]["errors"]]
        for name in rounds[0]:
            runs = [r[name] for r in rounds]
            rate = statistics.median(r[name]["rate"] / r[REFERENCE]["rate"] for r in paired)
            cpu = statistics.median(r[name]["cpu_us"] / r[REFERENCE]["cpu_us"] for r in paired)
            lines.append(
                f"{name:<16} {statistics.median(x['rate'] for x in runs):>10,.0f} "
                f"{statistics.median(x['cpu_us'] for x in runs):>8.2f} {rate:>8.2f}x {cpu:>7.2f}x "
                f"{sum(x['errors'] for x in runs):>6}"
            )
        if len(paired) < len(rounds):
            lines.append(
                f"({len(rounds) - len(paired)} round(s) without ratios: the reference failed)"
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
    with tempfile.TemporaryDirectory() as directory:
        cert, key = certificate(Path(directory))
        chosen = [s for s in servers(cert, key) if s.needs is None or importable(s.needs)]
        runs: dict[str, list[dict[str, Any]]] = {load: [] for load in WORKLOADS}
        for index in range(args.rounds):
            order = chosen[index % len(chosen) :] + chosen[: index % len(chosen)]
            for load in WORKLOADS:
                runs[load].append({s.name: measure(s, load, args.seconds, pin) for s in order})
            print(f"round {index + 1}/{args.rounds} done", file=sys.stderr)
    data = {
        "script": "tls.py",
        "command": "python bench/tls.py " + " ".join(sys.argv[1:]),
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
