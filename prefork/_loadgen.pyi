# Stub for the compiled module; mirrors prefork/_loadgen_py.py (the specification).
import ssl
from typing import Any

# What the module compiled in, by prefork._loadgen_common's names (checked at import).
COMPILED_FACTS: dict[str, object]

def bucket_index(ns: int) -> int: ...

class LoadGen:
    family: int
    address: Any
    mode: str
    connections: int
    size: int
    depth: int
    timeout: float
    messages: int
    failed: int
    bytes_sent: int
    bytes_received: int
    connections_opened: int
    latency_min: int
    latency_max: int
    latency_total: int
    in_flight: int
    live: int
    tls: ssl.SSLContext | None
    server_hostname: str | None
    request: bytes | None
    reply: bytes | None
    def __init__(
        self,
        family: int,
        address: Any,
        mode: str = "stream",
        *,
        connections: int = 50,
        size: int = 1024,
        depth: int = 1,
        timeout: float = 2.0,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        request: bytes | None = None,
        reply: bytes | None = None,
    ) -> None: ...
    def reset(self) -> None: ...
    @property
    def errors(self) -> dict[str, int]: ...
    def histogram(self) -> list[int]: ...
    def run(self, seconds: float, limit: int = 0) -> bool: ...
    def close(self) -> None: ...
