"""The command line: ``prefork serve`` and ``prefork --version``.

Parsing turns text into a ``Config`` through the validators in
``prefork.settings``; every user error leaves as one line on stderr and an exit
code (2 for usage), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, NoReturn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from prefork import __version__, fastio
from prefork.errors import EXIT_USAGE, ConfigError, PreforkError
from prefork.proxy import parse_allowed
from prefork.server.handlers import BUILTIN, check_fit, load_handler
from prefork.server.log import LEVELS, setup_logging
from prefork.server.privileges import check_can_switch, parse_group, parse_user
from prefork.server.scoreboard import MAX_SLOTS
from prefork.server.workers import WORKER_CLASSES
from prefork.settings import (
    DEFAULT_BIND,
    Address,
    Config,
    parse_address,
    parse_choice,
    parse_handler,
    parse_int,
    parse_mode,
    parse_path,
    parse_seconds,
    parse_size,
    parse_umask,
)
from prefork.tools import bench

PROG = "prefork"
MAX_THREADS = 4096  # per thread worker: each is a thread with its own stack
# The largest values the numbers can take where they end up: listen() and the
# compiled loop's connection cap are C ints; request counts and buffer sizes
# are 64-bit (max-requests plus its jitter must fit an unsigned long long).
C_INT_MAX = 2**31 - 1
SIZE_MAX = sys.maxsize


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
        "-c",
        "--config",
        metavar="FILE",
        help="a TOML file with the same keys as the long options (bind, workers, "
        "worker-class, ...); options given on the command line win",
    )
    serve.add_argument(
        "-w", "--workers", metavar="N", help="worker processes (default: the CPU count)"
    )
    serve.add_argument(
        "-k",
        "--worker-class",
        metavar="CLASS",
        default=None,
        help="event: an epoll loop per worker, many connections each (default); "
        "sync: one connection at a time per worker; thread: --threads connections at a time",
    )
    serve.add_argument(
        "--threads", metavar="T", default=None, help="threads per thread worker (default 1)"
    )
    serve.add_argument("--backlog", metavar="N", default=None, help="listen backlog (default 2048)")
    serve.add_argument(
        "--graceful-timeout",
        metavar="S",
        default=None,
        help="seconds TERM waits for connections to finish (default 30)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        default=None,
        help="give each worker slot its own SO_REUSEPORT socket, kept by the master across "
        "respawns (TCP and UDP; UNIX sockets stay shared)",
    )
    serve.add_argument(
        "--max-requests",
        metavar="N",
        default=None,
        help="replace a worker after it has served N connections, with nothing dropped "
        "(default 0 = never)",
    )
    serve.add_argument(
        "--max-requests-jitter",
        metavar="J",
        default=None,
        help="add a random 0..J to --max-requests per worker (default 0)",
    )
    serve.add_argument(
        "--max-connections",
        metavar="N",
        default=None,
        help="connections per event worker; at the cap new ones are left to the others "
        "(default 1024)",
    )
    serve.add_argument(
        "--max-buffer",
        metavar="BYTES",
        default=None,
        help="bytes a connection may owe a peer that does not read; it is not read from "
        "meanwhile (default 256K)",
    )
    serve.add_argument(
        "--idle-timeout",
        metavar="S",
        default=None,
        help="close connections idle this many seconds, 0 = never (default 300)",
    )
    serve.add_argument(
        "--timeout",
        metavar="S",
        default=None,
        help="a worker silent this many seconds (stuck, not waiting on a client) gets its "
        "stack dumped to the log and is replaced; 0 = never (default 30)",
    )
    serve.add_argument(
        "--handler",
        metavar="NAME",
        default=None,
        help=f"a built-in service ({', '.join(BUILTIN)}; default echo) or module:attr, "
        "a protocol class or a handle(sock, address) function",
    )
    serve.add_argument(
        "--unix-mode",
        metavar="MODE",
        default=None,
        help="permissions of UNIX sockets, octal (default 660)",
    )
    serve.add_argument(
        "--proxy-protocol",
        action="store_true",
        default=None,
        help="every TCP and UNIX listener expects a PROXY protocol v1 or v2 header (one "
        "listener alone: -b proxy:HOST:PORT)",
    )
    serve.add_argument(
        "--forwarded-allow-ips",
        metavar="LIST",
        default=None,
        help="addresses or networks allowed to send a PROXY header, comma-separated, * for "
        "any (default 127.0.0.1,::1)",
    )
    serve.add_argument("--pid", metavar="FILE", help="write the master's pid to FILE")
    serve.add_argument(
        "--log-file",
        metavar="FILE",
        help="append the log to FILE instead of stderr; USR1 reopens it (for logrotate)",
    )
    serve.add_argument(
        "--user",
        metavar="USER",
        help="workers switch to USER (name or uid) after binding, with USER's groups",
    )
    serve.add_argument(
        "--group",
        metavar="GROUP",
        help="workers switch to GROUP (name or gid) after binding (default: USER's group)",
    )
    serve.add_argument(
        "--umask", metavar="MASK", help="the processes' umask, octal (default: inherited)"
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve the scoreboard in the Prometheus text format at http://HOST:PORT/metrics",
    )
    serve.add_argument(
        "--log-level", metavar="LEVEL", default=None, help=f"{', '.join(LEVELS)} (default info)"
    )
    status = commands.add_parser(
        "status",
        help="show a running server's workers",
        description="Show a running server's workers, read from its --metrics endpoint.",
    )
    status.add_argument("address", metavar="HOST:PORT", help="the server's --metrics address")
    client = commands.add_parser(
        "client",
        help="send lines to a server and print the replies",
        description="Send each line of standard input (or -e TEXT) to a server and print "
        "what comes back.",
    )
    client.add_argument(
        "address", metavar="ADDRESS", help="HOST:PORT, [V6ADDR]:PORT, unix:PATH or udp://HOST:PORT"
    )
    client.add_argument(
        "-u", "--udp", action="store_true", help="datagrams: the same as udp://HOST:PORT"
    )
    client.add_argument(
        "-e", "--send", metavar="TEXT", help="send TEXT and a newline, print the reply, exit"
    )
    client.add_argument(
        "-n", "--no-newline", action="store_true", help="with -e: send TEXT without a newline"
    )
    client.add_argument(
        "--timeout",
        metavar="S",
        default="5",
        help="seconds to connect, and to wait for the replies after the end of input "
        "(default 5; 0 = no limit)",
    )
    bench.add_parser(commands)
    return parser


# Text defaults of the options, parsed like what a user types.
OPTION_DEFAULTS = {
    "worker-class": "event",
    "threads": "1",
    "backlog": "2048",
    "graceful-timeout": "30",
    "timeout": "30",
    "max-requests": "0",
    "max-requests-jitter": "0",
    "max-connections": "1024",
    "max-buffer": "256K",
    "idle-timeout": "300",
    "handler": "echo",
    "unix-mode": "660",
    "log-level": "info",
    "forwarded-allow-ips": "127.0.0.1,::1",
}
# What a -c file may set: every serve option but -c itself.
_OPTIONAL = ("pid", "metrics", "log-file", "user", "group", "umask")  # default None
FILE_KEYS = frozenset(
    {*OPTION_DEFAULTS, *_OPTIONAL, "bind", "workers", "reuse-port", "proxy-protocol"}
)
_SHORT = {"bind": "-b/", "workers": "-w/", "worker-class": "-k/"}


def read_config_file(path: str) -> dict[str, Any]:
    """The keys of a TOML config file, by option name (``_`` or ``-``)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"-c {path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"-c {path}: invalid TOML: {exc}") from None
    values = {}
    for key, value in data.items():
        name = key.replace("_", "-")
        if name not in FILE_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}")
        values[name] = value
    return values


class _Options:
    """Each option's text and the label to name it by in an error: from the
    command line if given, else from the config file, else the default."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.path = args.config
        if args.config is not None and not args.config:
            raise ConfigError("-c/--config: expected a file name, got ''")
        self.file = read_config_file(args.config) if args.config else {}

    def get(self, name: str) -> tuple[Any, str]:
        given = getattr(self.args, name.replace("-", "_"))
        if given is not None:
            return given, f"{_SHORT.get(name, '')}--{name}"
        if name in self.file:
            return self.file[name], f"{self.path}: {name}"
        return OPTION_DEFAULTS.get(name), f"{_SHORT.get(name, '')}--{name}"

    def flag(self, name: str) -> bool:
        value, label = self.get(name)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{label}: expected true or false, got {value!r}")
        return bool(value)

    def text(self, name: str) -> str:
        value, label = self.get(name)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{label}: expected a string or a number, got {value!r}")
        return str(value)

    def __call__(self, name: str, parse: Any, *extra: Any, **options: Any) -> Any:
        _, label = self.get(name)
        return parse(self.text(name), label, *extra, **options)


def config_from_args(args: argparse.Namespace) -> Config:
    """Validate the text of every option (raises ConfigError)."""
    opt = _Options(args)
    bind, bind_label = opt.get("bind")
    if isinstance(bind, str):
        bind = [bind]
    if bind is not None and not (isinstance(bind, list) and all(isinstance(b, str) for b in bind)):
        raise ConfigError(f"{bind_label}: expected an address or a list of addresses")
    binds = tuple(parse_address(text, bind_label) for text in bind) if bind else (DEFAULT_BIND,)
    extra = {}
    if opt.get("workers")[0] is not None:
        extra["workers"] = opt("workers", parse_int, minimum=1, maximum=MAX_SLOTS)
    reuse_port = opt.flag("reuse-port")
    proxy_protocol = opt.flag("proxy-protocol")
    allowed, allowed_label = opt.get("forwarded-allow-ips")
    if isinstance(allowed, list) and all(isinstance(item, str) for item in allowed):
        allowed = ",".join(allowed)  # a TOML list of addresses
    elif not isinstance(allowed, str):
        raise ConfigError(f"{allowed_label}: expected addresses or networks, got {allowed!r}")
    given = {name for name in _OPTIONAL if opt.get(name)[0] is not None}
    pid_file = opt("pid", parse_path) if "pid" in given else None
    log_file = opt("log-file", parse_path) if "log-file" in given else None
    metrics = (
        parse_metrics_address(opt.text("metrics"), opt.get("metrics")[1])
        if "metrics" in given
        else None
    )
    return Config(
        binds=binds,
        worker_class=opt("worker-class", parse_choice, tuple(WORKER_CLASSES)),
        backlog=opt("backlog", parse_int, minimum=1, maximum=C_INT_MAX),
        graceful_timeout=opt("graceful-timeout", parse_seconds),
        timeout=opt("timeout", parse_seconds),
        threads=opt("threads", parse_int, minimum=1, maximum=MAX_THREADS),
        reuse_port=reuse_port,
        proxy_protocol=proxy_protocol,
        forwarded_allow_ips=parse_allowed(allowed, allowed_label),
        max_requests=opt("max-requests", parse_int, minimum=0, maximum=SIZE_MAX),
        max_requests_jitter=opt("max-requests-jitter", parse_int, minimum=0, maximum=SIZE_MAX),
        max_connections=opt("max-connections", parse_int, minimum=1, maximum=C_INT_MAX),
        max_buffer=opt("max-buffer", parse_size, SIZE_MAX),
        idle_timeout=opt("idle-timeout", parse_seconds),
        handler=opt("handler", parse_handler, tuple(BUILTIN)),
        unix_mode=opt("unix-mode", parse_mode),
        log_level=parse_choice(opt.text("log-level").lower(), opt.get("log-level")[1], LEVELS),
        pid_file=pid_file,
        metrics=metrics,
        log_file=log_file,
        user=opt("user", parse_user) if "user" in given else None,
        group=opt("group", parse_group) if "group" in given else None,
        umask=opt("umask", parse_umask) if "umask" in given else None,
        **extra,
    )


def parse_metrics_address(text: str, option: str = "--metrics") -> Address:
    address = parse_address(text, option)
    if address.kind != "tcp":
        raise ConfigError(f"{option}: expected HOST:PORT or [V6ADDR]:PORT, got {text!r}")
    return address


def serve(args: argparse.Namespace) -> int:
    from prefork.server.arbiter import Arbiter
    from prefork.server.systemd import inherited_fds

    config = config_from_args(args)
    setup_logging(config.log_level, config.log_file)
    check_can_switch(config.user, config.group)
    # systemd socket activation: its sockets take the place of --bind.
    activated = tuple(Address("fd", fd=fd) for fd in inherited_fds())
    if activated:
        config = dataclasses.replace(config, binds=activated)
    udp = [str(a) for a in config.binds if a.kind == "udp"]
    handler = load_handler(config.handler)
    check_fit(handler, config.worker_class, udp[0] if udp else None)

    def reload_config() -> Config:
        """HUP: the command line and the -c file, read again."""
        fresh = config_from_args(args)
        return dataclasses.replace(fresh, binds=activated) if activated else fresh

    return Arbiter(config, handler, reload_config).run()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "client":
            from prefork.tools import client

            timeout = parse_seconds(args.timeout, "--timeout") or None
            return client.run(args.address, args.udp, args.send, not args.no_newline, timeout)
        if args.command == "bench":
            return bench.run(args)
        if args.command == "status":
            from prefork.tools.status import fetch, table

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
