"""An atheris (libFuzzer) target for prefork's hot loop: a differential fuzzer.

Each input is decoded into one call, made on the compiled module and on the
pure-Python twin alike, and the two outcomes must be identical (the same
return value, or the same exception type and errno), and right:

- EventLoop(...) with arbitrary service names, limits, patterns and stats
  buffers: accepted or refused identically;
- echo / discard / sendall / chargen over a real socket pair with an
  arbitrary payload, buffer size and peer behaviour (half-close, close
  first, reset-like close with unread data).

Run it (bounded in time; corpus and crashes in the current directory):

    pip install atheris
    python tests/reliability/fuzz_fastio.py -max_total_time=60

Under AddressSanitizer (the compiled module built with -fsanitize=address in
a scratch directory, atheris' ASan runtime preloaded; how and why in the
script):

    bash tests/reliability/fuzz-asan.sh 300

Coverage guidance comes from the instrumented Python twin: atheris cannot
instrument a gcc-built extension (that needs clang's -fsanitize=fuzzer-no-link),
so the compiled side is checked by the differential comparison and by ASan.

tests/reliability/test_fuzz.py runs it for a few seconds in the suite.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import socket
import sys

import atheris

with atheris.instrument_imports():
    from prefork import _fastio_py

SERVICES = ["echo", "discard", "chargen", "daytime", "protocol", "", "ECHO", "echo\0"]


def load_compiled():
    path = os.environ.get("PREFORK_FUZZ_COMPILED")
    if not path:
        from prefork import _fastio

        return _fastio
    spec = importlib.util.spec_from_file_location("prefork._fastio", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["prefork._fastio"] = module
    spec.loader.exec_module(module)
    return module


COMPILED = load_compiled()


def outcome(call):
    try:
        return ("ok", call())
    except Exception as exc:
        return ("raised", type(exc).__name__, getattr(exc, "errno", None))


def fuzz_event_loop(fdp: atheris.FuzzedDataProvider) -> None:
    service = SERVICES[fdp.ConsumeIntInRange(0, len(SERVICES) - 1)]
    kwargs = {
        "max_connections": fdp.ConsumeIntInRange(-2, 1 << 16),
        "max_buffer": fdp.ConsumeIntInRange(-2, 1 << 20),
        "idle_timeout": fdp.ConsumeRegularFloat(),
        "pattern": fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)),
        "max_accepts": fdp.ConsumeIntInRange(0, 1 << 20),
    }
    stats_size = fdp.ConsumeIntInRange(-1, 64)
    if fdp.ConsumeBool():
        kwargs["protocol_factory"] = object
    results = []
    for module in (COMPILED, _fastio_py):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            listener.setblocking(False)
            stats = None if stats_size < 0 else bytearray(stats_size)

            def make(module=module, listener=listener, stats=stats):
                loop = module.EventLoop([listener], service, stats=stats, **kwargs)
                loop.run(0)
                loop.close()
                return None

            results.append(outcome(make))
    assert results[0] == results[1], (service, kwargs, stats_size, results)


def fuzz_blocking_call(fdp: atheris.FuzzedDataProvider) -> None:
    name = ["echo", "discard", "sendall", "chargen"][fdp.ConsumeIntInRange(0, 3)]
    size = fdp.ConsumeIntInRange(0, 70_000)
    payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32_768))
    peer = fdp.ConsumeIntInRange(0, 2)  # 0 half-closes, 1 closes first, 2 closes unread
    results = []
    for module in (COMPILED, _fastio_py):
        client, server = socket.socketpair()
        client.settimeout(5)
        server.settimeout(None)
        try:
            if name == "sendall":
                if peer == 1:
                    client.close()
                result = outcome(lambda m=module, s=server: m.sendall(s, payload))
                received = b""
                if peer != 1:
                    server.shutdown(socket.SHUT_WR)
                    received = _read_all(client)
            elif name == "chargen":
                client.close()  # the peer is gone: chargen must end normally
                result = outcome(lambda m=module, s=server: m.chargen(s, payload or b"x"))
                received = b""
            else:
                client.sendall(payload)
                reader = None
                if peer == 0:
                    client.shutdown(socket.SHUT_WR)
                    # Read while the call runs: with a tiny buffer every echoed
                    # byte is a message of its own, and a few hundred of them
                    # fill the socket's buffer (the call would wait on us).
                    reader = concurrent.futures.ThreadPoolExecutor(1)
                    reading = reader.submit(_read_all, client)
                else:
                    client.close()
                func = getattr(module, name)
                result = outcome(lambda f=func, s=server: f(s, bytearray(size)))
                received = b""
                if reader is not None:
                    server.shutdown(socket.SHUT_WR)
                    received = reading.result(timeout=10)
                    reader.shutdown()
            if result[0] == "ok" and name == "chargen":
                result = ("ok", result[1][0])  # bytes out depend on the kernel
            results.append((result, received))
        finally:
            client.close()
            server.close()
    assert results[0] == results[1], (name, size, len(payload), peer, results)
    (result, received), _ = results
    if result[0] == "ok" and name == "echo" and peer == 0:
        assert received == payload and result[1] == (len(payload), len(payload))


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        fuzz_event_loop(fdp)
    else:
        fuzz_blocking_call(fdp)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
