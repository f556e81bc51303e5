"""The command line: ``prefork serve`` and ``prefork --version``.

The ``serve`` parser is built from the settings table
(``prefork.settings.OPTIONS``) and turns text into a ``Config`` through its
validators; every user error leaves as one line on stderr and an exit
code (2 for usage), never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import ssl
import sys
from typing import Any, NoReturn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from prefork import __version__, fastio
from prefork.errors import EXIT_USAGE, ConfigError, PreforkError
from prefork.server.access_log import check_access_log
from prefork.server.handlers import LoadedHandler, check_fit, load_handler
from prefork.server.log import setup_logging
from prefork.settings import (
    CONFIG_FILE,
    FILE_KEYS,
    OPTIONS,
    Address,
    Config,
    Option,
    check_can_switch,
    check_udp_exposure,
    parse_seconds,
    with_tls_binds,
)
from prefork.tls import check_tls_fit, check_tls_options, context_of
from prefork.tools import bench, client, status

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
    add_serve_options(serve)
    check = commands.add_parser(
        "check",
        help="check a configuration without starting",
        description="Check serve's options (or a -c file) and import the handler, as serve "
        "would, without binding anything: exit 0, or one line and exit 2 (a bad setting) "
        "or 3 (the handler does not load).",
    )
    add_serve_options(check)
    for name, what in (
        ("reload", "HUP: a new generation of workers, settings and handler read again"),
        ("stop", "TERM (or QUIT with --fast) and wait until the master is gone"),
        ("upgrade", "USR2, wait for the new master, WINCH and TERM the old one"),
    ):
        command = commands.add_parser(
            name,
            help=f"signal the master a pid file names: {what}",
            description=f"Signal the master that --pid FILE names: {what}. A missing, "
            "stale or foreign pid file is reported (exit 1) and nothing is sent.",
        )
        command.add_argument("--pid", metavar="FILE", required=True, help="the master's pid file")
        if name != "reload":
            command.add_argument(
                "--timeout",
                metavar="S",
                default="60",
                help="seconds to wait for each step (default 60)",
            )
        if name == "stop":
            command.add_argument("--fast", action="store_true", help="QUIT: close connections now")
    status.add_parser(commands)
    client.add_parser(commands)
    bench.add_parser(commands)
    return parser


def add_option(parser: argparse.ArgumentParser, option: Option) -> None:
    """One row of the settings table as an argument: text, kept as given
    (None when absent) for ``config_from_args`` to validate."""
    help_text = option.help_text().replace("%", "%%")
    if option.switch:
        parser.add_argument(
            *option.flags, dest=option.key, action="store_true", default=None, help=help_text
        )
    else:
        parser.add_argument(
            *option.flags,
            dest=option.key,
            action="append" if option.repeat else "store",
            metavar=option.metavar,
            default=None,
            help=help_text,
        )


def add_serve_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s arguments: -c, then every row of ``prefork.settings.OPTIONS``."""
    add_option(serve, CONFIG_FILE)
    for option in OPTIONS:
        add_option(serve, option)


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


def config_from_args(args: argparse.Namespace) -> Config:
    """Validate every option given (raises ConfigError): from the command
    line if there, else from the -c file; ``Config`` holds the defaults."""
    path = args.config
    if path is not None:
        CONFIG_FILE.read(path, CONFIG_FILE.label)
    file = read_config_file(path) if path else {}
    values = {}
    for option in OPTIONS:
        given = getattr(args, option.key)
        if given is not None:
            values[option.key] = option.read(given, option.label)
        elif option.name in file:
            values[option.key] = option.read(file[option.name], f"{path}: {option.name}")
    return with_tls_binds(Config(**values))


def udp_hosts(config: Config) -> list[tuple[str, str]]:
    """Each udp:// address's name and host (fd:// sockets are checked once
    bound: their address is known then)."""
    return [(str(a), a.host) for a in config.binds if a.kind == "udp"]


def validate(config: Config) -> tuple[LoadedHandler, ssl.SSLContext | None]:
    """What ``serve`` checks of its addresses before binding them (``check``
    runs it alone): the handler loads and fits the worker class and the
    listeners, UDP exposure, the TLS options, and the TLS files load and
    fit. Returns the handler and the TLS context; raises PreforkError."""
    handler = load_handler(config.handler, config.handler_type)
    udp = [str(a) for a in config.binds if a.kind == "udp"]
    tcp = [str(a) for a in config.binds if a.kind in ("tcp", "unix")]
    check_fit(handler, config.worker_class, udp[0] if udp else None, tcp[0] if tcp else None)
    check_udp_exposure(config.handler, config.udp_public, udp_hosts(config))
    check_tls_options(config)
    secured = next((str(a) for a in config.binds if a.tls), None)
    check_tls_fit(
        config.worker_class,
        secured,
        udp[0] if udp else None,
        handler.builtin is not None,
        bool(config.sni),
    )
    return handler, context_of(config)


def check(args: argparse.Namespace) -> int:
    """``prefork check``: what ``serve`` validates before binding, and no more."""
    config = config_from_args(args)
    check_access_log(config.access_log)
    check_can_switch(config.user, config.group)
    validate(config)
    binds = " ".join(str(a) for a in config.binds)
    print(
        f"configuration OK: {config.workers} {config.worker_class} worker(s), "
        f"handler {config.handler}, on {binds}"
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    from prefork.server.arbiter import Arbiter
    from prefork.server.systemd import inherited_fds
    from prefork.server.upgrade import ACTIVATED_ENV, activated_binds

    config = config_from_args(args)
    setup_logging(config.log_level, config.log_file)
    check_access_log(config.access_log)
    check_can_switch(config.user, config.group)
    # systemd socket activation: its sockets take the place of --bind (and
    # after a USR2 upgrade, those the socket-activated master handed over).
    activated = tuple(Address("fd", fd=fd) for fd in inherited_fds()) or activated_binds()
    if activated:
        config = with_tls_binds(dataclasses.replace(config, binds=activated))
        os.environ[ACTIVATED_ENV] = str(len(activated))  # for a USR2's new master
    handler, tls = validate(config)  # before binding: a bad file changes nothing

    def reload_config() -> Config:
        """HUP: the command line and the -c file, read again."""
        fresh = config_from_args(args)
        if not activated:
            return fresh
        return with_tls_binds(dataclasses.replace(fresh, binds=activated))

    return Arbiter(config, handler, reload_config, tls).run()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_usage(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "client":
            return client.run(args)
        if args.command == "bench":
            return bench.run(args)
        if args.command == "check":
            return check(args)
        if args.command in ("reload", "stop", "upgrade"):
            from prefork.tools import control

            if args.command == "reload":
                return control.reload(args.pid)
            timeout = parse_seconds(args.timeout, "--timeout") or 60.0
            if args.command == "stop":
                return control.stop(args.pid, args.fast, timeout)
            return control.upgrade(args.pid, timeout)
        if args.command == "status":
            return status.run(args)
        return serve(args)
    except PreforkError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the master took over signals
        return 130


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
