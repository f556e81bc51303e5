# Stub for the compiled module; mirrors prefork/_fastio_py.py (the specification).
from collections.abc import Callable, Iterable
from typing import Any

# What the module compiled in, by prefork._fastio_common's names (checked at import).
COMPILED_FACTS: dict[str, object]

def accept(listener: Any) -> int | None: ...
def echo(conn: Any, buffer: Any) -> tuple[int, int]: ...
def discard(conn: Any, buffer: Any) -> tuple[int, int]: ...
def chargen(conn: Any, pattern: Any) -> tuple[int, int]: ...
def sendall(conn: Any, data: Any) -> int: ...

class Transport:
    def write(self, data: Any) -> None: ...
    def close(self) -> None: ...
    def is_closing(self) -> bool: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...

class EventLoop:
    service: str
    max_connections: int
    max_buffer: int
    max_accepts: int
    idle_timeout: float
    accepted: int
    bytes_in: int
    bytes_out: int
    idle_closed: int
    max_buffer_closed: int
    handler_errors: int
    proxy_rejected: int
    access_log_dropped: int
    resource_errors: int
    datagrams: int
    udp_refused_loop: int
    udp_refused_source: int
    udp_refused_rate: int
    udp_rate_evictions: int
    def __init__(
        self,
        listeners: Iterable[Any],
        service: str,
        *,
        wakeup_fd: int = -1,
        max_connections: int = 1024,
        max_buffer: int = 262144,
        idle_timeout: float = 300.0,
        pattern: Any = b"",
        protocol_factory: Callable[[], Any] | None = None,
        datagram_sockets: Iterable[Any] = (),
        max_accepts: int = 0,
        stats: Any = None,
        proxy_listeners: Iterable[Any] = (),
        proxy_trusted: Callable[[Any], bool] | None = None,
        access_log: Any = -1,
        udp_allow_low_ports: bool = False,
        udp_loop_ports: Iterable[int] = (),
        udp_rate: float = 0.0,
        udp_burst: int = 1,
        udp_rate_prefix: tuple[int, int] = (24, 56),
        udp_rate_table: Any = None,
    ) -> None: ...
    @property
    def active(self) -> int: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def recycled(self) -> bool: ...
    @property
    def udp_refused_from(self) -> dict[str, str]: ...
    def drain(self) -> None: ...
    def return_soon(self) -> None: ...
    def stop_accepting(self) -> None: ...
    def close(self) -> None: ...
    def run(self, timeout: float) -> None: ...
