"""Settings: every ``prefork serve`` option, once, in the table ``OPTIONS``.

A row says everything about one option: the ``Config`` field it sets, its
flags and metavar, the validator that turns its text into a typed value, its
default, its help, whether a HUP can change it, and the worker classes it
applies to. Everything else is derived from the table: the ``serve`` parser
(``prefork.cli``), the keys a ``-c`` file may hold (``FILE_KEYS``), what a HUP
keeps (``RESTART_ONLY``), ``Config``'s field defaults, the "(default ...)" in
the help, and the options table in README.md (``options_markdown``, or
``python -m prefork.settings --markdown``).

Each ``parse_*`` function turns the text a user typed into a typed value or
raises ``ConfigError`` naming the option and the bad value, so every bad input
becomes one line and exit code 2.

Rule: the server imports this module, so it imports nothing from
``prefork.server`` at the top; the few validators that check a name against a
server registry (worker classes, built-in handlers, scoreboard slots) import it
when they run.
"""

from __future__ import annotations

import argparse
import grp
import ipaddress
import os
import pwd
import re
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from prefork._fastio_common import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_BUFFER,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_RATE_PREFIX,
    RATE_WAYS,
)
from prefork.errors import ConfigError, PreforkError
from prefork.tls import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    SniCertificate,
    parse_alpn,
    parse_ciphers,
    parse_sni,
    parse_tls_version,
    parse_verify,
)

DEFAULT_PORT = 7007
MAX_THREADS = 4096  # per thread worker: each is a thread with its own stack
# The largest values the numbers can take where they end up: listen() and the
# compiled loop's connection cap are C ints; request counts and buffer sizes
# are 64-bit (max-requests plus its jitter must fit an unsigned long long).
C_INT_MAX = 2**31 - 1
SIZE_MAX = sys.maxsize
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


# nginx's name for the old master's pid file while a USR2 upgrade runs (the
# new master writes FILE): the server renames it, `prefork upgrade` reads it.
OLD_PID_SUFFIX = ".oldbin"


@dataclass(frozen=True)
class Address:
    """Where to listen: ``kind`` is ``tcp`` or ``udp`` (host, port), ``unix``
    (path), or ``fd`` (a listening socket inherited as descriptor ``fd``)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    proxy: bool = False  # connections start with a PROXY protocol header
    tls: bool = False  # TLS on this listener (after the PROXY header, if any)

    def __str__(self) -> str:
        if self.proxy:
            return f"proxy:{replace(self, proxy=False)}"
        if self.tls:
            return f"tls:{replace(self, tls=False)}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd://{self.fd}"
        scheme = "udp://" if self.kind == "udp" else ""
        if ":" in self.host:
            return f"{scheme}[{self.host}]:{self.port}"
        return f"{scheme}{self.host}:{self.port}"


DEFAULT_BIND = Address("tcp", "127.0.0.1", DEFAULT_PORT)


ADDRESS_FORMS = (
    "HOST:PORT (:PORT alone is 127.0.0.1), [V6ADDR]:PORT, unix:PATH, udp://HOST:PORT, "
    "fd://N, or proxy: and tls: before a stream address"
)


def parse_address(text: str, option: str = "-b/--bind") -> Address:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, ``unix:PATH``, ``fd://N``, or
    ``udp://`` and a host and port. A missing host (``:PORT``) is loopback,
    as in the default, never every interface."""
    bad = f"{option}: invalid address {text!r}"
    if text.startswith("proxy:"):
        inner = parse_address(text[len("proxy:") :], option)
        if inner.kind == "udp":
            raise ConfigError(f"{bad}: the PROXY protocol is for stream listeners")
        return replace(inner, proxy=True)
    if text.startswith("tls:"):
        inner = parse_address(text[len("tls:") :], option)
        if inner.kind == "udp":
            raise ConfigError(f"{bad}: TLS is for stream listeners (no DTLS)")
        return replace(inner, tls=True)
    if text.startswith("fd://"):
        number = text[len("fd://") :]
        if not number.isdigit() or int(number) < 3:
            raise ConfigError(f"{bad}: expected fd://N, an inherited descriptor N >= 3")
        return Address("fd", fd=int(number))
    if text.startswith("udp://"):
        try:
            inner = parse_address(text[len("udp://") :], option)
        except ConfigError:
            inner = Address("unix")
        if inner.kind != "tcp":
            raise ConfigError(f"{bad}: expected udp://HOST:PORT or udp://[V6ADDR]:PORT")
        return Address("udp", inner.host, inner.port)
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path or "\0" in path:
            raise ConfigError(f"{bad}: expected unix:PATH")
        return Address("unix", path=os.path.abspath(path))
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":") or not host:
            raise ConfigError(f"{bad}: expected [V6ADDR]:PORT")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigError(f"{bad}: expected {ADDRESS_FORMS}")
        host = host or DEFAULT_BIND.host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{bad}: port must be a number from 0 to 65535")
    return Address("tcp", host, int(port_text))


def parse_int(text: str, option: str, minimum: int, maximum: int | None = None) -> int:
    """A whole number from ``minimum`` to ``maximum`` (if given)."""
    try:
        value = int(text, 10)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ConfigError(f"{option}: expected a whole number {bounds}, got {text!r}")
    return value


def parse_seconds(text: str, option: str) -> float:
    """A non-negative, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{option}: expected a number of seconds >= 0, got {text!r}")
    return value


_SIZE_SUFFIXES = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str, option: str, maximum: int | None = None) -> int:
    """A byte count >= 1 (and <= ``maximum``), optionally with a K, M or G
    suffix (powers of 1024)."""
    number, suffix = text, ""
    if text[-1:].lower() in _SIZE_SUFFIXES:
        number, suffix = text[:-1], text[-1:].lower()
    if not number.isdigit() or int(number) < 1:
        raise ConfigError(f"{option}: expected a size in bytes such as 65536 or 256K, got {text!r}")
    value = int(number) * _SIZE_SUFFIXES[suffix]
    if maximum is not None and value > maximum:
        raise ConfigError(f"{option}: expected a size of at most {maximum} bytes, got {text!r}")
    return value


_IDENTIFIER_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\Z")


def parse_handler(text: str, option: str, builtins: tuple[str, ...]) -> str:
    """A built-in name or ``module:attr`` (both dotted Python names)."""
    if text in builtins:
        return text
    module, sep, attr = text.partition(":")
    if not sep or not _IDENTIFIER_PATH.match(module) or not _IDENTIFIER_PATH.match(attr):
        raise ConfigError(
            f"{option}: unknown handler {text!r} (built-ins: {', '.join(builtins)}; "
            "or module:attr for your own)"
        )
    return text


def parse_choice(text: str, option: str, choices: tuple[str, ...]) -> str:
    if text not in choices:
        raise ConfigError(f"{option}: unknown value {text!r} (choose from {', '.join(choices)})")
    return text


def parse_path(text: str, option: str) -> str:
    """A file name: not empty (an empty one would silently mean no file)."""
    if not text or "\0" in text:
        raise ConfigError(f"{option}: expected a file name, got {text!r}")
    return text


def parse_umask(text: str, option: str) -> int:
    """An octal umask such as 022 or 0o027."""
    digits = text[2:] if text.lower().startswith("0o") else text
    try:
        value = int(digits, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise ConfigError(f"{option}: expected an octal umask such as 022, got {text!r}")
    return value


def parse_mode(text: str, option: str) -> int:
    """An octal permission mode that does not make the socket world-writable."""
    try:
        value = int(text, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o777:
        raise ConfigError(f"{option}: expected an octal mode such as 660, got {text!r}")
    if value & 0o002:
        raise ConfigError(f"{option}: {text!r} would let any user connect; use e.g. 660")
    return value


def parse_user(text: str, option: str = "--user") -> int:
    """A user name or numeric uid that exists on this machine."""
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ConfigError(f"{option}: no such user {text!r}") from None


def parse_group(text: str, option: str = "--group") -> int:
    """A group name or numeric gid that exists on this machine."""
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"{option}: no such group {text!r}") from None


def check_can_switch(uid: int | None, gid: int | None) -> None:
    """Fail early, in the master, if the workers will not be allowed to switch
    to ``--user``/``--group`` (``prefork.server.privileges`` switches)."""
    if os.geteuid() == 0:
        return
    if (uid is not None and uid != os.geteuid()) or (gid is not None and gid != os.getegid()):
        raise PreforkError("--user/--group: switching to another user needs root")


def parse_allowed(text: str, option: str = "--forwarded-allow-ips") -> tuple[str, ...]:
    """A comma-separated list of addresses or networks, or ``*``."""
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise ConfigError(f"{option}: expected addresses or networks, got {text!r}")
    for item in items:
        if item == "*":
            continue
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{option}: not an address or network: {item!r}") from None
    return items


# The built-ins that answer a datagram with more than it brought: chargen up
# to 512 bytes, daytime about 30, even for an empty one (US-CERT TA14-017A
# puts chargen's amplification at 359).
UDP_AMPLIFIERS = ("chargen", "daytime")


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` (an address or a name) is loopback only: a name is
    loopback when every address it resolves to is."""
    try:
        addresses = [ipaddress.ip_address(host.split("%", 1)[0])]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        except OSError:
            return False  # the bind will say why
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    mapped = [getattr(a, "ipv4_mapped", None) or a for a in addresses]
    return bool(mapped) and all(a.is_loopback for a in mapped)


def check_udp_exposure(handler: str, udp_public: bool, udp: list[tuple[str, str]]) -> None:
    """Refuse (ConfigError: exit 2) to serve a UDP amplifier on any of
    ``udp`` ((name, host) of each UDP listener) that is not loopback, unless
    ``udp_public`` says the operator means it."""
    if handler not in UDP_AMPLIFIERS or udp_public:
        return
    for name, host in udp:
        if not is_loopback_host(host):
            raise ConfigError(
                f"-b {name}: UDP {handler} answers anyone, even an empty datagram, at the "
                "address it claims to come from, so on a non-loopback address it amplifies "
                "attacks on others; bind it to loopback, or add --udp-public if you mean it"
            )


# --udp-rate when it is not given: replies per second per source prefix for
# the amplifiers, none for echo and discard.
DEFAULT_UDP_RATE = 10.0
MAX_RATE_TABLE = 1 << 24  # entries: 384 MiB of shared memory


def parse_rate(text: str, option: str = "--udp-rate") -> float:
    """``N`` or ``N/s``: per second, 0 = no limit."""
    number = text[:-2] if text.endswith("/s") else text
    try:
        rate = float(number)
    except ValueError:
        rate = -1.0
    if not 0 <= rate <= 1e9:
        raise ConfigError(f"{option}: expected a rate per second such as 10/s, got {text!r}")
    return rate


def parse_prefixes(text: str, option: str = "--udp-rate-prefix") -> tuple[int, int]:
    """``V4,V6``: the prefix lengths a rate limit counts by."""
    parts = text.split(",")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        prefix4, prefix6 = (int(part) for part in parts)
        if 1 <= prefix4 <= 32 and 1 <= prefix6 <= 64:
            return prefix4, prefix6
    raise ConfigError(
        f"{option}: expected V4,V6 prefix lengths (1-32,1-64) such as 24,56, got {text!r}"
    )


def parse_table_size(text: str, option: str = "--udp-rate-table") -> int:
    size = parse_int(text, option, minimum=16 * RATE_WAYS, maximum=MAX_RATE_TABLE)
    if size & (size - 1):
        raise ConfigError(f"{option}: expected a power of two such as 16384, got {text!r}")
    return size


def udp_rate_of(config: Config) -> float:
    """The UDP rate limit a server runs with: --udp-rate, or by default
    DEFAULT_UDP_RATE for the amplifiers and none for the others."""
    if config.udp_rate is not None:
        return config.udp_rate
    return DEFAULT_UDP_RATE if config.handler in UDP_AMPLIFIERS else 0.0


def parse_metrics_address(text: str, option: str = "--metrics") -> Address:
    """A TCP ``HOST:PORT`` or ``[V6ADDR]:PORT``."""
    address = parse_address(text, option)
    if address.kind != "tcp":
        raise ConfigError(f"{option}: expected HOST:PORT or [V6ADDR]:PORT, got {text!r}")
    return address


def parse_workers(text: str, option: str) -> int:
    """A worker count: each worker needs a scoreboard slot."""
    from prefork.server.scoreboard import MAX_SLOTS

    return parse_int(text, option, minimum=1, maximum=MAX_SLOTS)


# --handler-type: "auto", or one of prefork.server.handlers.KINDS but "built-in".
HANDLER_TYPES = (
    "auto",
    "protocol",
    "protocol-factory",
    "stream",
    "request-handler",
    "handle",
    "datagram",
)


def parse_worker_class(text: str, option: str) -> str:
    """A name in the registry of worker classes."""
    from prefork.server.workers import WORKER_CLASSES

    return parse_choice(text, option, tuple(WORKER_CLASSES))


def parse_handler_name(text: str, option: str) -> str:
    """A built-in handler's name, or module:attr (imported later, by the CLI)."""
    from prefork.server.handlers import BUILTIN

    return parse_handler(text, option, tuple(BUILTIN))


LOOPS = ("auto", "asyncio", "uvloop")


def parse_loop(text: str, option: str) -> str:
    """A loop name; ``uvloop`` must be importable (the check imports it, once,
    in the master: the workers share it)."""
    name = parse_choice(text, option, LOOPS)
    if name == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError as exc:
            raise ConfigError(
                f"{option} uvloop: uvloop cannot be imported ({exc}); install it with "
                "pip install 'prefork[uvloop]', or use --loop asyncio"
            ) from None
    return name


def parse_log_level(text: str, option: str) -> str:
    """A level name, in any case."""
    return parse_choice(text.lower(), option, LOG_LEVELS)


def default_workers() -> int:
    return os.cpu_count() or 1


# -- how help shows a default: text that parses back to it -----------------------


def show_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(show_value(item) for item in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def show_octal(value: int) -> str:
    return f"{value:03o}"


def show_size(value: int) -> str:
    for suffix in ("G", "M", "K"):
        unit = _SIZE_SUFFIXES[suffix.lower()]
        if value % unit == 0:
            return f"{value // unit}{suffix}"
    return str(value)


# -- the table ------------------------------------------------------------------

Parser = Callable[[str, str], Any]


@dataclass(frozen=True)
class Option:
    """One ``prefork serve`` option: a row of ``OPTIONS``."""

    key: str  # the Config field it sets
    flags: tuple[str, ...]  # the last is the long name, which is also the -c file's key
    help: str  # what it does; the notes and "(default ...)" are added from the fields below
    parse: Parser | None = None  # (text, label) -> value, or ConfigError; None: a switch
    metavar: str | None = None  # None for a switch
    default: Any = None  # None: not set
    default_factory: Callable[[], Any] | None = None  # a default computed at start
    default_text: str | None = None  # how help shows a default the value cannot show
    show: Callable[[Any], str] = show_value  # the default as text that parses back to it
    restart_only: bool = False  # bound to sockets or files made at start: HUP keeps it
    worker_classes: tuple[str, ...] = ()  # the -k classes it applies to; () = all
    repeat: bool = False  # repeatable; a -c file gives a list
    comma_list: bool = False  # comma-separated; a -c file may give a list

    @property
    def name(self) -> str:
        """The long name without its dashes: the -c file's key."""
        return self.flags[-1].lstrip("-")

    @property
    def label(self) -> str:
        """How an error names it when it came from the command line."""
        return "/".join(self.flags)

    @property
    def switch(self) -> bool:
        return self.parse is None

    def shown_default(self) -> str | None:
        """The default as help shows it, or None for a switch or no default."""
        if self.default_text is not None:
            return self.default_text
        if self.switch or self.default is None:
            return None
        return self.show(self.default)

    def notes(self) -> list[str]:
        """What the help adds after the text: worker classes and HUP."""
        notes = []
        if self.worker_classes:
            notes.append(f"{' and '.join(self.worker_classes)} workers only")
        if self.restart_only:
            notes.append("a HUP cannot change it")
        return notes

    def help_text(self) -> str:
        """The help, its notes and its default: what ``serve --help`` shows."""
        notes = self.notes()
        shown = self.shown_default()
        if shown is not None:
            notes.append(f"default: {shown}")
        return f"{self.help} ({'; '.join(notes)})" if notes else self.help

    def read(self, value: object, label: str) -> Any:
        """The typed value of what was given: text from the command line (a
        list of texts when repeated, True for a switch), or any TOML value from
        a -c file. Raises ConfigError naming ``label``."""
        if self.parse is None:
            if not isinstance(value, bool):
                raise ConfigError(f"{label}: expected true or false, got {value!r}")
            return value
        if self.repeat or self.comma_list:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
                raise ConfigError(f"{label}: expected a string or a list of strings, got {value!r}")
            if self.comma_list:
                return self.parse(",".join(items), label)
            return tuple(self.parse(item, label) for item in items) if items else self.default
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{label}: expected a string or a number, got {value!r}")
        return self.parse(str(value), label)


# -c/--config is not a setting but names the file that holds them.
CONFIG_FILE = Option(
    key="config",
    flags=("-c", "--config"),
    metavar="FILE",
    parse=parse_path,
    help="a TOML file with the same keys as the long options (bind = [...], workers = 4, "
    'worker-class = "event", ...; "_" or "-"); the command line wins over the file, the file '
    "over the defaults; a HUP reads it again",
)

OPTIONS: tuple[Option, ...] = (
    Option(
        key="binds",
        flags=("-b", "--bind"),
        metavar="ADDR",
        parse=parse_address,
        default=(DEFAULT_BIND,),
        repeat=True,
        restart_only=True,
        help="HOST:PORT (:PORT alone means 127.0.0.1:PORT), [V6ADDR]:PORT (IPv6 only: "
        "[::]:PORT takes no IPv4 client; add -b 0.0.0.0:PORT for those), unix:PATH, "
        "udp://HOST:PORT, or fd://N (a socket inherited as descriptor N); proxy:ADDR expects "
        "a PROXY protocol header on that listener; repeat for several. Port 0 picks a free "
        "port. Under systemd socket activation the inherited sockets replace --bind",
    ),
    Option(
        key="workers",
        flags=("-w", "--workers"),
        metavar="N",
        parse=parse_workers,
        default_factory=default_workers,
        default_text="the number of CPUs",
        help="worker processes",
    ),
    Option(
        key="worker_class",
        flags=("-k", "--worker-class"),
        metavar="CLASS",
        parse=parse_worker_class,
        default="event",
        help="event: one epoll loop per worker, many connections each; "
        "sync: one connection at a time per worker; "
        "thread: --threads connections at a time per worker; "
        "asyncio: a standard asyncio (or uvloop) loop per worker, for code that needs all "
        "of asyncio",
    ),
    Option(
        key="threads",
        flags=("--threads",),
        metavar="T",
        parse=partial(parse_int, minimum=1, maximum=MAX_THREADS),
        default=1,
        worker_classes=("thread",),
        help="threads per worker, each serving one connection at a time",
    ),
    Option(
        key="loop",
        flags=("--loop",),
        metavar="LOOP",
        parse=parse_loop,
        default="auto",
        worker_classes=("asyncio",),
        help="the event loop each worker runs: asyncio, uvloop, or auto (uvloop when it is "
        "installed)",
    ),
    Option(
        key="backlog",
        flags=("--backlog",),
        metavar="N",
        parse=partial(parse_int, minimum=1, maximum=C_INT_MAX),
        default=2048,
        restart_only=True,
        help="listen backlog; the kernel caps it at somaxconn",
    ),
    Option(
        key="graceful_timeout",
        flags=("--graceful-timeout",),
        metavar="S",
        parse=parse_seconds,
        default=30.0,
        help="seconds a TERM waits for open connections to finish",
    ),
    Option(
        key="reuse_port",
        flags=("--reuse-port",),
        default=False,
        restart_only=True,
        help="one SO_REUSEPORT socket per worker slot instead of one shared socket (TCP and "
        "UDP; UNIX sockets stay shared): the kernel spreads connections by hash, no wake-up "
        "contention; the master keeps each slot's socket, so a respawned worker inherits its "
        "queue; after TTOU the retired slot's socket stops taking new connections, its worker "
        "takes what is queued, then it is closed",
    ),
    Option(
        key="max_requests",
        flags=("--max-requests",),
        metavar="N",
        parse=partial(parse_int, minimum=0, maximum=SIZE_MAX),
        default=0,
        help="replace a worker after it has served N connections, 0 = never; it stops "
        "accepting, finishes what it has, exits, and is replaced, with nothing dropped",
    ),
    Option(
        key="max_requests_jitter",
        flags=("--max-requests-jitter",),
        metavar="J",
        parse=partial(parse_int, minimum=0, maximum=SIZE_MAX),
        default=0,
        help="add a random 0..J to --max-requests per worker, so they are not all replaced at once",
    ),
    Option(
        key="max_connections",
        flags=("--max-connections",),
        metavar="N",
        parse=partial(parse_int, minimum=1, maximum=C_INT_MAX),
        default=DEFAULT_MAX_CONNECTIONS,
        worker_classes=("event", "asyncio"),
        help="connections a worker serves at once; at the cap it stops accepting and leaves "
        "new connections in the backlog for the others",
    ),
    Option(
        key="max_buffer",
        flags=("--max-buffer",),
        metavar="BYTES",
        parse=partial(parse_size, maximum=SIZE_MAX),
        default=DEFAULT_MAX_BUFFER,
        show=show_size,
        worker_classes=("event", "asyncio"),
        help="what a connection may owe a peer that does not read (K, M or G for KiB, MiB, "
        "GiB); it is not read from while it owes anything (backpressure), and a protocol "
        "that writes more than this to a non-reader is cut off; under -k asyncio it is the "
        "transports' high-water mark: reading pauses and the protocol gets pause_writing",
    ),
    Option(
        key="idle_timeout",
        flags=("--idle-timeout",),
        metavar="S",
        parse=parse_seconds,
        default=DEFAULT_IDLE_TIMEOUT,
        worker_classes=("event", "asyncio"),
        help="close connections with no byte read or written for S seconds, 0 = never",
    ),
    Option(
        key="timeout",
        flags=("--timeout",),
        metavar="S",
        parse=parse_seconds,
        default=30.0,
        help="a worker silent for S seconds (stuck: its loop stopped beating; a wait for a "
        "client is not silence) gets every thread's Python stack dumped to the log "
        "(faulthandler), is killed and replaced; 0 = never. In sync workers a user handle() "
        "is timed from the connection's start",
    ),
    Option(
        key="handler",
        flags=("--handler",),
        metavar="NAME",
        parse=parse_handler_name,
        default="echo",
        help="echo (RFC 862), discard (863), chargen (864), daytime (867), or module:attr for "
        "your own: an asyncio protocol class or factory, an async def handle(reader, writer), "
        "a socketserver request handler class or a blocking handle(sock, address); which one "
        "is detected (see --handler-type)",
    ),
    Option(
        key="handler_type",
        flags=("--handler-type",),
        metavar="TYPE",
        parse=partial(parse_choice, choices=HANDLER_TYPES),
        default="auto",
        help="what --handler module:attr is, when detection guesses wrong: protocol (a "
        "protocol class), protocol-factory (called with no argument per connection, returns "
        "a protocol), stream (async def handle(reader, writer)), request-handler (a "
        "socketserver.BaseRequestHandler subclass), handle (a blocking handle(sock, "
        "address)), datagram (an asyncio.DatagramProtocol class), or auto",
    ),
    Option(
        key="unix_mode",
        flags=("--unix-mode",),
        metavar="MODE",
        parse=parse_mode,
        default=0o660,
        show=show_octal,
        restart_only=True,
        help="permissions of UNIX sockets, octal; never o+w",
    ),
    Option(
        key="proxy_protocol",
        flags=("--proxy-protocol",),
        default=False,
        help="every TCP and UNIX listener expects a PROXY protocol header (v1 or v2, "
        "detected) before any byte reaches the handler, and handlers see the client's "
        "address; one listener alone: -b proxy:HOST:PORT",
    ),
    Option(
        key="forwarded_allow_ips",
        flags=("--forwarded-allow-ips",),
        metavar="LIST",
        parse=parse_allowed,
        default=("127.0.0.1", "::1"),
        comma_list=True,
        help="who may send that header: addresses or networks, comma-separated, or * for "
        "any; other peers are closed and logged",
    ),
    Option(
        key="certfile",
        flags=("--certfile",),
        metavar="FILE",
        parse=parse_path,
        help="TLS: the server's certificate chain (PEM), and its key unless --keyfile names "
        "it; TLS on every TCP and UNIX listener, or only on those given as -b tls:ADDR (after "
        "the PROXY header on a proxy:tls: listener); a HUP reads the files again",
    ),
    Option(
        key="keyfile",
        flags=("--keyfile",),
        metavar="FILE",
        parse=parse_path,
        default_text="in --certfile",
        help="TLS: the certificate's private key (PEM)",
    ),
    Option(
        key="ca_certs",
        flags=("--ca-certs",),
        metavar="FILE",
        parse=parse_path,
        help="TLS: the CAs (PEM) that sign the client certificates --verify-client checks",
    ),
    Option(
        key="verify_client",
        flags=("--verify-client",),
        metavar="MODE",
        parse=parse_verify,
        default="none",
        help="TLS client certificates: none (not asked for), optional (checked if sent), "
        "required (a client without a valid one is refused in the handshake)",
    ),
    Option(
        key="tls_min_version",
        flags=("--tls-min-version",),
        metavar="V",
        parse=parse_tls_version,
        default="1.2",
        help="the oldest TLS version a client may use: 1.2 or 1.3",
    ),
    Option(
        key="ciphers",
        flags=("--ciphers",),
        metavar="LIST",
        parse=parse_ciphers,
        default_text="OpenSSL's",
        help="TLS 1.2 cipher suites, an OpenSSL cipher list (TLS 1.3 keeps OpenSSL's suites)",
    ),
    Option(
        key="alpn",
        flags=("--alpn",),
        metavar="PROTOS",
        parse=parse_alpn,
        default_text="none",
        comma_list=True,
        help="TLS ALPN protocol names the server accepts, most preferred first, "
        "comma-separated (a handler reads the choice with "
        "get_extra_info('selected_alpn_protocol'))",
    ),
    Option(
        key="sni",
        flags=("--sni",),
        metavar="NAME=CERT[,KEY]",
        parse=parse_sni,
        default_text="none",
        repeat=True,
        help="TLS: the certificate (and key) for clients that ask for server name NAME "
        "(*.DOMAIN: one label in front of DOMAIN); other names get --certfile's; repeatable",
    ),
    Option(
        key="tls_handshake_timeout",
        flags=("--tls-handshake-timeout",),
        metavar="S",
        parse=parse_seconds,
        default=DEFAULT_HANDSHAKE_TIMEOUT,
        help="seconds a client has to finish its TLS handshake (after its PROXY header); "
        "then it is closed",
    ),
    Option(
        key="max_conns_per_ip",
        flags=("--max-conns-per-ip",),
        metavar="N",
        parse=partial(parse_int, minimum=0, maximum=C_INT_MAX),
        default=0,
        help="connections one client address may hold open at once, across all workers, "
        "0 = no limit; the client is the PROXY header's source behind a trusted balancer; "
        "a connection over it is closed before any byte is served, counted and logged "
        "(turning it on needs a restart: its table is made at start)",
    ),
    Option(
        key="conn_rate_per_ip",
        flags=("--conn-rate-per-ip",),
        metavar="N[/s]",
        parse=parse_rate,
        default=0.0,
        help="new connections per second one client address may open (an IPv6 client: its "
        "/64), 0 = no limit; a token bucket of --conn-burst-per-ip shared by all workers; "
        "a connection over it is closed before any byte is served, counted and logged "
        "(turning it on needs a restart)",
    ),
    Option(
        key="conn_burst_per_ip",
        flags=("--conn-burst-per-ip",),
        metavar="N",
        parse=partial(parse_int, minimum=1, maximum=C_INT_MAX),
        default=10,
        help="new connections one client address may open at once, above --conn-rate-per-ip",
    ),
    Option(
        key="per_ip_table",
        flags=("--per-ip-table",),
        metavar="N",
        parse=parse_table_size,
        default=4096,
        restart_only=True,
        help="client addresses each worker's --max-conns-per-ip table, and the "
        "--conn-rate-per-ip table, hold (a power of two, 24 bytes each, in memory shared "
        "by the workers); when one is full a client still counted or limited is pushed "
        "out, counted and logged: raise it then",
    ),
    Option(
        key="udp_allow_low_ports",
        flags=("--udp-allow-low-ports",),
        default=False,
        worker_classes=("event", "asyncio"),
        help="answer UDP datagrams from source ports below 1024, which are refused by "
        "default (the system services live there: a reply to echo or chargen starts a "
        "packet loop); datagrams from a port this server serves UDP on, or from a "
        "broadcast, multicast or unspecified address, stay refused",
    ),
    Option(
        key="udp_rate",
        flags=("--udp-rate",),
        metavar="N[/s]",
        parse=parse_rate,
        default_text=f"{DEFAULT_UDP_RATE:g}/s for chargen and daytime, 0 for echo and discard",
        worker_classes=("event", "asyncio"),
        help="UDP replies per second to one source prefix (see --udp-rate-prefix), 0 = no "
        "limit; a token bucket of --udp-burst, shared by all workers; datagrams over it "
        "get no reply and are counted",
    ),
    Option(
        key="udp_burst",
        flags=("--udp-burst",),
        metavar="N",
        parse=partial(parse_int, minimum=1, maximum=C_INT_MAX),
        default=20,
        worker_classes=("event", "asyncio"),
        help="UDP replies one source prefix may get at once, above --udp-rate",
    ),
    Option(
        key="udp_rate_prefix",
        flags=("--udp-rate-prefix",),
        metavar="V4,V6",
        parse=parse_prefixes,
        default=DEFAULT_RATE_PREFIX,
        show=lambda value: f"{value[0]},{value[1]}",
        worker_classes=("event", "asyncio"),
        help="the IPv4 and IPv6 prefix lengths --udp-rate counts by: one bucket per /24 "
        "and per /56 by default",
    ),
    Option(
        key="udp_rate_table",
        flags=("--udp-rate-table",),
        metavar="N",
        parse=parse_table_size,
        default=16384,
        restart_only=True,
        worker_classes=("event", "asyncio"),
        help="source prefixes the --udp-rate table holds (a power of two, 24 bytes each, in "
        "memory shared by the workers); when it is full, a prefix still limited is pushed "
        "out, counted and logged: raise it then",
    ),
    Option(
        key="udp_public",
        flags=("--udp-public",),
        default=False,
        help="serve UDP chargen or daytime on an address that is not loopback; without it "
        "such a start (or a HUP to such a handler) is refused, because they answer a tiny "
        "datagram with a larger one to whatever address it claims: a reflector for attacks "
        "on others (see the security section of docs/deployment.md)",
    ),
    Option(  # during a USR2 upgrade the old master's file is FILE + OLD_PID_SUFFIX
        key="pid_file",
        flags=("--pid",),
        metavar="FILE",
        parse=parse_path,
        restart_only=True,
        help="write the master's pid to FILE, removed on exit",
    ),
    Option(
        key="metrics",
        flags=("--metrics",),
        metavar="HOST:PORT",
        parse=parse_metrics_address,
        restart_only=True,
        help=(
            "serve the scoreboard in the Prometheus text format at http://HOST:PORT/metrics"
            " and a status page for browsers at http://HOST:PORT/"
        ),
    ),
    Option(
        key="log_level",
        flags=("--log-level",),
        metavar="LEVEL",
        parse=parse_log_level,
        default="info",
        help=", ".join(LOG_LEVELS),
    ),
    Option(
        key="log_file",
        flags=("--log-file",),
        metavar="FILE",
        parse=parse_path,
        help="append the log to FILE instead of stderr; USR1 reopens it (for logrotate)",
    ),
    Option(
        key="access_log",
        flags=("--access-log",),
        metavar="FILE",
        parse=parse_path,
        help="append one line per connection to FILE (- for stdout) when it ends: time, client "
        "(the PROXY source when there is one), worker pid, duration, bytes in and out, how it "
        "ended (format in docs/deployment.md); lines the file cannot take at once are dropped "
        "and counted, never waited for; USR1 reopens it",
    ),
    Option(
        key="user",
        flags=("--user",),
        metavar="USER",
        parse=parse_user,
        help="workers switch to USER (name or uid), with USER's groups, after the master has "
        "bound the listeners; the master keeps its identity",
    ),
    Option(
        key="group",
        flags=("--group",),
        metavar="GROUP",
        parse=parse_group,
        default_text="USER's login group",
        help="workers switch to GROUP (name or gid)",
    ),
    Option(
        key="umask",
        flags=("--umask",),
        metavar="MASK",
        parse=parse_umask,
        show=show_octal,
        default_text="inherited",
        help="the processes' umask, octal",
    ),
)

OPTIONS_BY_KEY = {option.key: option for option in OPTIONS}
# What a -c file may set: every option by its long name.
FILE_KEYS = frozenset(option.name for option in OPTIONS)
# Settings a HUP cannot change: they belong to sockets and files made at start.
RESTART_ONLY: tuple[str, ...] = tuple(option.key for option in OPTIONS if option.restart_only)


def _default(key: str) -> Any:
    """The default of ``Config.<key>``, from its row in ``OPTIONS``."""
    option = OPTIONS_BY_KEY[key]
    if option.default_factory is not None:
        return field(default_factory=option.default_factory)
    return option.default


@dataclass(frozen=True)
class Config:
    """The settings a server runs with; each field is the row of ``OPTIONS``
    with that key, which says what it means and holds its default."""

    binds: tuple[Address, ...] = _default("binds")
    workers: int = _default("workers")
    worker_class: str = _default("worker_class")
    threads: int = _default("threads")
    loop: str = _default("loop")
    backlog: int = _default("backlog")
    graceful_timeout: float = _default("graceful_timeout")
    reuse_port: bool = _default("reuse_port")
    max_requests: int = _default("max_requests")
    max_requests_jitter: int = _default("max_requests_jitter")
    max_connections: int = _default("max_connections")
    max_buffer: int = _default("max_buffer")
    idle_timeout: float = _default("idle_timeout")
    timeout: float = _default("timeout")
    handler: str = _default("handler")
    handler_type: str = _default("handler_type")
    unix_mode: int = _default("unix_mode")
    proxy_protocol: bool = _default("proxy_protocol")
    forwarded_allow_ips: tuple[str, ...] = _default("forwarded_allow_ips")
    certfile: str | None = _default("certfile")
    keyfile: str | None = _default("keyfile")
    ca_certs: str | None = _default("ca_certs")
    verify_client: str = _default("verify_client")
    tls_min_version: str = _default("tls_min_version")
    ciphers: str | None = _default("ciphers")
    alpn: tuple[str, ...] | None = _default("alpn")
    sni: tuple[SniCertificate, ...] | None = _default("sni")
    tls_handshake_timeout: float = _default("tls_handshake_timeout")
    max_conns_per_ip: int = _default("max_conns_per_ip")
    conn_rate_per_ip: float = _default("conn_rate_per_ip")
    conn_burst_per_ip: int = _default("conn_burst_per_ip")
    per_ip_table: int = _default("per_ip_table")
    udp_allow_low_ports: bool = _default("udp_allow_low_ports")
    udp_rate: float | None = _default("udp_rate")
    udp_burst: int = _default("udp_burst")
    udp_rate_prefix: tuple[int, int] = _default("udp_rate_prefix")
    udp_rate_table: int = _default("udp_rate_table")
    udp_public: bool = _default("udp_public")
    pid_file: str | None = _default("pid_file")
    metrics: Address | None = _default("metrics")
    log_level: str = _default("log_level")
    log_file: str | None = _default("log_file")
    access_log: str | None = _default("access_log")
    user: int | None = _default("user")
    group: int | None = _default("group")
    umask: int | None = _default("umask")


def with_tls_binds(config: Config) -> Config:
    """``--certfile`` with no ``tls:`` address puts TLS on every stream
    listener (an fd:// socket that turns out to be UDP is left plain)."""
    if config.certfile is None or any(address.tls for address in config.binds):
        return config
    binds = tuple(replace(a, tls=a.kind != "udp") for a in config.binds)
    return replace(config, binds=binds)


# -- the options table in README.md ----------------------------------------------


def _markdown_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("*", "\\*").replace("|", "\\|")


def options_markdown() -> str:
    """The README's table of ``prefork serve`` options, made from ``OPTIONS``."""
    lines = [
        "<!-- made from prefork/settings.py by: python -m prefork.settings --markdown -->",
        "Options of `prefork serve`. The long names are also the keys of a `-c` file.",
        "",
        "| option | default | what it does |",
        "|---|---|---|",
    ]
    for option in (CONFIG_FILE, *OPTIONS):
        names = ", ".join(f"`{flag}`" for flag in option.flags)
        if option.metavar is not None:
            names = names[:-1] + f" {option.metavar}`"
        shown = option.shown_default()
        if shown is None:
            default = "off" if option.switch else ""
        elif option.default_text is not None:
            default = _markdown_text(shown)
        else:
            default = f"`{shown}`"
        notes = option.notes()
        text = f"{option.help} ({'; '.join(notes)})" if notes else option.help
        lines.append(f"| {names} | {default} | {_markdown_text(text)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prefork.settings", description="Print the table of serve options."
    )
    parser.add_argument("--markdown", action="store_true", help="as README.md's Markdown table")
    args = parser.parse_args(argv)
    if not args.markdown:
        parser.print_usage(sys.stderr)
        return 2
    sys.stdout.write(options_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
