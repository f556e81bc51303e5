"""asyncio code written by others runs unchanged: a real protocol package
from PyPI (aiosmtpd's SMTP server, in the test extra) driven by its real
client (the standard library's smtplib), on the event worker (both hot-loop
implementations: CI runs the suite again with PREFORK_NO_EXTENSIONS=1) and
on -k asyncio."""

from __future__ import annotations

import smtplib
import threading

import pytest

from support import TESTS_DIR, handler_env, wait_until

pytestmark = pytest.mark.timeout(90)

pytest.importorskip("aiosmtpd", reason="aiosmtpd is in the test extra: pip install -e '.[test]'")

CLASSES = {
    "event": ["-k", "event"],
    "asyncio": ["-k", "asyncio", "--loop", "asyncio"],
    "uvloop": ["-k", "asyncio", "--loop", "uvloop"],
}


@pytest.fixture(params=list(CLASSES))
def smtp_server(request, server_factory):
    if request.param == "uvloop":
        pytest.importorskip("uvloop", reason="--loop uvloop needs uvloop (in the test extra)")
    return server_factory(
        "-w", "2", *CLASSES[request.param], "--handler", "handlers.smtp_server:smtp",
        env=handler_env(TESTS_DIR),
    )  # fmt: skip


def send(server, sender: str, count: int) -> list[dict]:
    """One SMTP session: EHLO, ``count`` messages, QUIT; each refusal dict."""
    host, port = server.tcp()
    with smtplib.SMTP(host, port, timeout=20) as client:
        code, banner = client.ehlo()
        assert code == 250 and banner.startswith(b"prefork.test"), banner
        body = "\r\n".join(["x" * 70] * 70)  # SMTP lines are at most 1,000 bytes
        rcpts = ["a@example.org", "b@example.org"]
        return [client.sendmail(sender, rcpts, f"Subject: {i}\r\n\r\n{body}") for i in range(count)]


def test_aiosmtpd_serves_smtplib_unchanged(smtp_server):
    assert send(smtp_server, "one@example.com", 3) == [{}, {}, {}]
    line = "mail from one@example.com to a@example.org,b@example.org"
    assert wait_until(lambda: smtp_server.log.count(line) == 3, 10), smtp_server.log


def test_concurrent_smtp_sessions_over_two_workers(smtp_server):
    failures: list[BaseException] = []

    def session(n: int) -> None:
        try:
            assert send(smtp_server, f"s{n}@example.com", 2) == [{}, {}]
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=session, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    assert wait_until(lambda: smtp_server.log.count("mail from s") == 16, 10), smtp_server.log
    assert "Traceback" not in smtp_server.log


@pytest.mark.parametrize("kind", ["event", "asyncio"])
def test_aiosmtpd_over_tls_serves_smtplib_smtp_ssl(server_factory, certs, kind):
    """Implicit TLS (SMTPS): aiosmtpd's protocol, unchanged, behind prefork's
    TLS; the standard library's SMTP_SSL verifies the certificate."""
    import ssl

    server = server_factory(
        "-w", "1", "-k", kind, "--handler", "handlers.smtp_server:smtp",
        "--certfile", str(certs / "server.pem"), "--keyfile", str(certs / "server.key"),
        env=handler_env(TESTS_DIR),
    )  # fmt: skip
    host, port = server.tcp()
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    with smtplib.SMTP_SSL("localhost", port, timeout=20, context=context) as client:
        code, banner = client.ehlo()
        assert code == 250 and banner.startswith(b"prefork.test"), banner
        assert client.sendmail("tls@example.com", ["a@example.org"], "Subject: s\r\n\r\nhi") == {}
    line = "mail from tls@example.com to a@example.org"
    assert wait_until(lambda: line in server.log, 10), server.log
