"""Behind a real load balancer: HAProxy in front of two prefork instances with
``send-proxy-v2``. Handlers must see the real client addresses, and draining
one instance with TERM under load must cost no connection.

HAProxy comes from the distribution's packages (``.ci/run`` installs it); the
test is skipped, saying so, where it is not installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import threading
import time

import pytest

from support import handler_env, running_haproxy

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed"),
]

WHO_HANDLER = """
class Who:
    '''Says which client address it was given, then echoes.'''
    def connection_made(self, transport):
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        transport.write(f"{host} {port}\\n".encode())
    def data_received(self, data):
        self.transport.write(data)
    def eof_received(self):
        return False
    def connection_lost(self, exc):
        pass
"""

HAPROXY_CONFIG = """
global
    maxconn 2000

defaults
    mode tcp
    timeout connect 2s
    timeout client 20s
    timeout server 20s
    retries 3
    option redispatch

frontend echo
    bind 127.0.0.1:{front}
    default_backend prefork

backend prefork
    balance roundrobin
    default-server {server_options}
    server a 127.0.0.1:{a}
    server b 127.0.0.1:{b}
"""
# How HAProxy reaches each instance: a PROXY v2 header first, health-checked.
PROXY_SERVER = "send-proxy-v2 check inter 100ms fall 1 rise 1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def balanced(server_factory, tmp_path):
    """Two prefork instances behind HAProxy: (front port, instance a, instance b)."""
    (tmp_path / "who_handler.py").write_text(WHO_HANDLER)
    env = handler_env(tmp_path)
    instances = [
        server_factory(
            "-b", "proxy:127.0.0.1:0", "-w", "2", "--handler", "who_handler:Who", env=env
        )
        for _ in range(2)
    ]
    front = free_port()
    config = tmp_path / "haproxy.cfg"
    ports = [instance.tcp()[1] for instance in instances]
    config.write_text(
        HAPROXY_CONFIG.format(front=front, a=ports[0], b=ports[1], server_options=PROXY_SERVER)
    )
    with running_haproxy(config, front):
        yield front, instances[0], instances[1]


def echo_through(front: int, client_ip: str, payload: bytes) -> tuple[str, bytes]:
    """One connection from ``client_ip``: (what the handler saw, the echo)."""
    with socket.socket() as sock:
        sock.settimeout(10)
        sock.bind((client_ip, 0))
        sock.connect(("127.0.0.1", front))
        me = "{} {}".format(*sock.getsockname())
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    seen, _, echo = data.partition(b"\n")
    assert seen.decode() == me, (seen, me)
    return me, echo


def test_handlers_see_the_real_client_addresses(balanced):
    front, a, b = balanced
    for i in range(2, 12):  # clients from 127.0.0.2 to 127.0.0.11
        payload = os.urandom(100 + i)
        _, echo = echo_through(front, f"127.0.0.{i}", payload)
        assert echo == payload


def drain_under_load(front: int, instance, clients: int) -> tuple[int, dict[str, int], list[str]]:
    """``clients`` threads echo through HAProxy's ``front`` for 6 s (at most
    2,000 each, each from its own 127.0.0.x); once a quarter of those echoes
    are served (or after 4 s, on a slow machine) ``instance`` gets TERM and
    must exit 0, with the rest of the load still to come: a fixed delay let
    a fast machine finish the whole load before the TERM. Returns the echoes
    served before the TERM, the ok/failed counts, and the errors seen."""
    started = time.monotonic()
    stop_at = started + 6.0
    quarter = clients * 2000 // 4
    results = {"ok": 0, "failed": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        count = 0
        while time.monotonic() < stop_at and count < 2000:
            count += 1
            payload = b"%d:%d:" % (n, count) + os.urandom(64)
            try:
                _, echo = echo_through(front, f"127.0.0.{2 + n}", payload)
                ok = echo == payload
            except (OSError, AssertionError) as exc:
                ok = False
                with lock:
                    errors.append(repr(exc))
            with lock:
                results["ok" if ok else "failed"] += 1

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for thread in threads:
        thread.start()
    while results["ok"] < quarter and time.monotonic() < started + 4.0:
        time.sleep(0.005)
    served_before = results["ok"]
    instance.signal(signal.SIGTERM)  # drain it mid-load
    assert instance.wait(30) == 0
    for thread in threads:
        thread.join(30)
    return served_before, results, errors


def test_draining_one_instance_under_load_loses_nothing(balanced):
    front, a, b = balanced
    served_before, results, errors = drain_under_load(front, a, 6)
    assert served_before > 0 and results["ok"] > served_before
    assert results["failed"] == 0, (results, errors[:5])
    assert "TERM: graceful stop" in a.log
    # Both instances served part of the load (their workers' exit lines say
    # how much), and b ran throughout.
    assert "exited" not in b.log
    b.signal(signal.SIGTERM)
    assert b.wait(30) == 0
    for instance in (a, b):
        assert served(instance) > 0, instance.log
    # Every echo was served by one of them (health checks are connections too).
    assert served(a) + served(b) >= results["ok"]


def served(instance) -> int:
    """Connections the instance's workers said they served, as they exited."""
    return sum(
        int(line.split("exited: ")[1].split()[0])
        for line in instance.log.splitlines()
        if "exited: " in line
    )
