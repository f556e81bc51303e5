"""Settings: a frozen dataclass, and the one place option text is validated.

Each ``parse_*`` function turns the text a user typed into a typed value or
raises ``ConfigError`` naming the option and the bad value, so every bad input
becomes one line and exit code 2.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace

from prefork.errors import ConfigError

DEFAULT_PORT = 7007


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

    def __str__(self) -> str:
        if self.proxy:
            return f"proxy:{replace(self, proxy=False)}"
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "fd":
            return f"fd://{self.fd}"
        scheme = "udp://" if self.kind == "udp" else ""
        if ":" in self.host:
            return f"{scheme}[{self.host}]:{self.port}"
        return f"{scheme}{self.host}:{self.port}"


DEFAULT_BIND = Address("tcp", "127.0.0.1", DEFAULT_PORT)


def _default_workers() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Config:
    binds: tuple[Address, ...] = (DEFAULT_BIND,)
    workers: int = field(default_factory=_default_workers)
    worker_class: str = "event"
    threads: int = 1  # per thread worker
    backlog: int = 2048
    graceful_timeout: float = 30.0
    timeout: float = 30.0  # a worker silent this long is dumped and killed; 0 = never
    reuse_port: bool = False  # one SO_REUSEPORT socket per worker slot
    max_requests: int = 0  # connections a worker serves before it is replaced; 0 = never
    max_requests_jitter: int = 0  # plus a random 0..jitter, so workers do not all go at once
    max_connections: int = 1024  # per event worker
    max_buffer: int = 256 * 1024  # bytes a connection may owe its peer
    idle_timeout: float = 300.0  # seconds; 0 = never
    handler: str = "echo"
    log_level: str = "info"
    pid_file: str | None = None
    metrics: Address | None = None  # where the master serves /metrics
    unix_mode: int = 0o660
    log_file: str | None = None  # None: stderr
    user: int | None = None  # workers switch to this uid after binding
    group: int | None = None  # ... and this gid (default: the user's)
    umask: int | None = None  # the master's and workers' umask; None: inherited
    proxy_protocol: bool = False  # every stream listener expects a PROXY header
    forwarded_allow_ips: tuple[str, ...] = ("127.0.0.1", "::1")  # who may send one


def parse_address(text: str, option: str = "-b/--bind") -> Address:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, ``unix:PATH``, ``fd://N``, or
    ``udp://`` and a host and port."""
    bad = f"{option}: invalid address {text!r}"
    if text.startswith("proxy:"):
        inner = parse_address(text[len("proxy:") :], option)
        if inner.kind == "udp":
            raise ConfigError(f"{bad}: the PROXY protocol is for stream listeners")
        return replace(inner, proxy=True)
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
        if not sep or not host or ":" in host:
            raise ConfigError(f"{bad}: expected HOST:PORT, [V6ADDR]:PORT or unix:PATH")
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
