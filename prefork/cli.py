"""The command line: ``prefork serve`` and ``prefork --version``.

Parsing turns text into a ``Config`` through the validators in
``prefork.config``; every user error leaves as one line on stderr and an exit
code (2 for usage), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from prefork import __version__, fastio
from prefork.config import (
    DEFAULT_BIND,
    Address,
    Config,
    parse_address,
    parse_choice,
    parse_handler,
    parse_int,
    parse_mode,
    parse_seconds,
    parse_size,
)
from prefork.errors import EXIT_USAGE, ConfigError, PreforkError
from prefork.handlers import BUILTIN, load_handler
from prefork.log import LEVELS, setup_logging
from prefork.scoreboard import MAX_SLOTS
from prefork.workers import WORKER_CLASSES

PROG = "prefork"


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}\n")


def version_text() -> str:
    return f"{PROG} {__version__} ({fastio.IMPLEMENTATION})"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A prefork TCP server with a Cython hot loop.")
    parser.add_argument("--version", action="version", version=version_text())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the server", description="Run the server.")
    serve.add_argument(
        "-b",
        "--bind",
        action="append",
        metavar="ADDR",
        default=None,
        help="HOST:PORT, [V6ADDR]:PORT, unix:PATH or udp://HOST:PORT; repeatable "
        f"(default {DEFAULT_BIND})",
    )
    serve.add_argument(
        "-w", "--workers", metavar="N", help="worker processes (default: the CPU count)"
    )
    serve.add_argument(
        "-k",
        "--worker-class",
        metavar="CLASS",
        default="event",
        help="event: an epoll loop per worker, many connections each (default); "
        "sync: one connection at a time per worker; thread: --threads connections at a time",
    )
    serve.add_argument(
        "--threads", metavar="T", default="1", help="threads per thread worker (default 1)"
    )
    serve.add_argument(
        "--backlog", metavar="N", default="2048", help="listen backlog (default 2048)"
    )
    serve.add_argument(
        "--graceful-timeout",
        metavar="S",
        default="30",
        help="seconds TERM waits for connections to finish (default 30)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="give each worker slot its own SO_REUSEPORT socket, kept by the master across "
        "respawns (TCP and UDP; UNIX sockets stay shared)",
    )
    serve.add_argument(
        "--max-requests",
        metavar="N",
        default="0",
        help="replace a worker after it has served N connections, with nothing dropped "
        "(default 0 = never)",
    )
    serve.add_argument(
        "--max-requests-jitter",
        metavar="J",
        default="0",
        help="add a random 0..J to --max-requests per worker (default 0)",
    )
    serve.add_argument(
        "--max-connections",
        metavar="N",
        default="1024",
        help="connections per event worker; at the cap new ones are left to the others "
        "(default 1024)",
    )
    serve.add_argument(
        "--max-buffer",
        metavar="BYTES",
        default="256K",
        help="bytes a connection may owe a peer that does not read; it is not read from "
        "meanwhile (default 256K)",
    )
    serve.add_argument(
        "--idle-timeout",
        metavar="S",
        default="300",
        help="close connections idle this many seconds, 0 = never (default 300)",
    )
    serve.add_argument(
        "--timeout",
        metavar="S",
        default="30",
        help="a worker silent this many seconds (stuck, not waiting on a client) gets its "
        "stack dumped to the log and is replaced; 0 = never (default 30)",
    )
    serve.add_argument(
        "--handler",
        metavar="NAME",
        default="echo",
        help=f"a built-in service ({', '.join(BUILTIN)}; default echo) or module:attr, "
        "a protocol class or a handle(sock, address) function",
    )
    serve.add_argument(
        "--unix-mode",
        metavar="MODE",
        default="660",
        help="permissions of UNIX sockets, octal (default 660)",
    )
    serve.add_argument("--pid", metavar="FILE", help="write the master's pid to FILE")
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve the scoreboard in the Prometheus text format at http://HOST:PORT/metrics",
    )
    serve.add_argument(
        "--log-level", metavar="LEVEL", default="info", help=f"{', '.join(LEVELS)} (default info)"
    )
    status = commands.add_parser(
        "status",
        help="show a running server's workers",
        description="Show a running server's workers, read from its --metrics endpoint.",
    )
    status.add_argument("address", metavar="HOST:PORT", help="the server's --metrics address")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Validate the text of every option (raises ConfigError)."""
    binds = tuple(parse_address(text) for text in args.bind) if args.bind else (DEFAULT_BIND,)
    extra = {}
    if args.workers is not None:
        extra["workers"] = parse_int(args.workers, "-w/--workers", minimum=1, maximum=MAX_SLOTS)
    return Config(
        binds=binds,
        worker_class=parse_choice(args.worker_class, "-k/--worker-class", tuple(WORKER_CLASSES)),
        backlog=parse_int(args.backlog, "--backlog", minimum=1),
        graceful_timeout=parse_seconds(args.graceful_timeout, "--graceful-timeout"),
        timeout=parse_seconds(args.timeout, "--timeout"),
        threads=parse_int(args.threads, "--threads", minimum=1),
        reuse_port=args.reuse_port,
        max_requests=parse_int(args.max_requests, "--max-requests", minimum=0),
        max_requests_jitter=parse_int(args.max_requests_jitter, "--max-requests-jitter", minimum=0),
        max_connections=parse_int(args.max_connections, "--max-connections", minimum=1),
        max_buffer=parse_size(args.max_buffer, "--max-buffer"),
        idle_timeout=parse_seconds(args.idle_timeout, "--idle-timeout"),
        handler=parse_handler(args.handler, "--handler", tuple(BUILTIN)),
        unix_mode=parse_mode(args.unix_mode, "--unix-mode"),
        log_level=parse_choice(args.log_level.lower(), "--log-level", LEVELS),
        pid_file=args.pid,
        metrics=parse_metrics_address(args.metrics),
        **extra,
    )


def parse_metrics_address(text: str | None) -> Address | None:
    if text is None:
        return None
    address = parse_address(text, "--metrics")
    if address.kind != "tcp":
        raise ConfigError(f"--metrics: expected HOST:PORT or [V6ADDR]:PORT, got {text!r}")
    return address


def serve(args: argparse.Namespace) -> int:
    from prefork.arbiter import Arbiter

    config = config_from_args(args)
    setup_logging(config.log_level)
    udp = [str(a) for a in config.binds if a.kind == "udp"]
    if udp and config.worker_class != "event":
        raise ConfigError(f"-b {udp[0]}: datagram listeners need the event worker (-k event)")
    handler = load_handler(config.handler)
    if udp and handler.builtin is None:
        raise ConfigError(f"-b {udp[0]}: datagram listeners serve the built-in handlers only")
    if config.worker_class == "event" and handler.handle is not None:
        raise ConfigError(
            f"--handler {config.handler} is a blocking handle(sock, address) function; "
            "the event worker runs protocol classes: use -k sync or -k thread"
        )
    return Arbiter(config, handler).run()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "status":
            from prefork.status import fetch, table

            print(table(fetch(args.address)))
            return 0
        return serve(args)
    except PreforkError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the master took over signals
        return 130


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
