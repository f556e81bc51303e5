"""A real asyncio protocol package, unchanged: aiosmtpd's SMTP server
protocol (a StreamReaderProtocol: tasks, timers, asyncio.wait_for, streams),
served by prefork as a protocol factory, for tests/test_real_packages.py."""

import sys

from aiosmtpd.smtp import SMTP


class Collect:
    """An aiosmtpd handler: logs each message it accepts (our log is stderr)."""

    async def handle_DATA(self, server, session, envelope):
        rcpts = ",".join(envelope.rcpt_tos)
        print(
            f"mail from {envelope.mail_from} to {rcpts}: {len(envelope.content)} bytes",
            file=sys.stderr,
            flush=True,
        )
        return "250 Message accepted for delivery"


def smtp():
    """One SMTP protocol per connection, as aiosmtpd's Controller makes them."""
    return SMTP(Collect(), hostname="prefork.test")
