"""Bugs planted in the twin (``prefork/_fastio_py.py``), one at a time, with
the test expected to catch each: ``tests/test_mutations.py`` plants each in a
copy of the package and runs that test against the copy, which must fail
(and pass without the bug).

A snippet must occur exactly once in the twin, so that when the source moves
the check breaks loudly instead of planting nothing. The bugs are planted in
the twin only, the readable specification; the compiled loop's same paths
are held to the same behaviour by the same tests, which run it too (the
``impl`` fixture) and compare the two.
"""

from __future__ import annotations

from dataclasses import dataclass

SHORT = "tests/test_short_sends.py::"
TRANSPORT = "tests/test_transport.py::"


@dataclass(frozen=True)
class Mutation:
    name: str  # what the bug does
    snippet: str  # exact source text of the twin, found exactly once
    replacement: str
    catcher: str  # the test node id (from the repository root) that must fail


MUTATIONS = (
    Mutation(
        "echo-swallows-a-reset",
        "            n = _recv_into(sock, view)\n"
        "            if n == 0:\n"
        "                return nin, nout\n",
        "            try:\n"
        "                n = _recv_into(sock, view)\n"
        "            except ConnectionResetError:\n"
        "                n = 0\n"
        "            if n == 0:\n"
        "                return nin, nout\n",
        "tests/test_fastio.py::test_peer_reset_raises_connection_reset[python]",
    ),
    Mutation(
        "echo-sends-once",
        "_send_all(sock, view[:n])",
        "_send(sock, view[:n])",
        SHORT + "test_blocking_echo_through_short_sends[python-unix]",
    ),
    Mutation(
        "sendall-sends-once",
        "        _send_all(sock, view)\n    return len(view)\n",
        "        _send(sock, view)\n    return len(view)\n",
        SHORT + "test_blocking_sendall_through_short_sends[python-tcp]",
    ),
    Mutation(
        "chargen-restarts-after-a-short-send",
        "offset = (offset + n) % size",
        "offset = 0",
        SHORT + "test_blocking_chargen_carries_on_after_short_sends[python-unix]",
    ),
    Mutation(
        "loop-chargen-restarts-after-a-short-send",
        "conn.offset = (conn.offset + sent) % len(self._pattern)",
        "conn.offset = 0",
        SHORT + "test_event_loop_chargen_carries_on_after_short_sends[python]",
    ),
    Mutation(
        "loop-drops-the-rest-of-a-write",
        "            self._keep(conn, data[sent:])\n",
        "            pass\n",
        SHORT + "test_event_loop_echo_through_short_sends[python]",
    ),
    Mutation(
        "loop-flush-not-counted",
        "        self.bytes_out += sent\n"
        "        conn.nout += sent\n        del conn.pending[:sent]\n",
        "        conn.nout += sent\n        del conn.pending[:sent]\n",
        SHORT + "test_event_loop_echo_through_short_sends[python]",
    ),
    Mutation(
        "loop-write-not-counted",
        "            self.bytes_out += sent\n"
        "            conn.nout += sent\n        if sent < len(data):\n",
        "            conn.nout += sent\n        if sent < len(data):\n",
        SHORT + "test_event_loop_protocol_writes_through_short_sends[python-bytearray]",
    ),
    Mutation(
        "proxy-hand-over-drops-what-followed-the-header",
        "        if rest and conn.fd in self._conns and conn.reading:\n"
        "            self._received(conn, rest)\n",
        "",
        SHORT + "test_event_loop_proxy_hand_over_through_short_sends[python]",
    ),
    Mutation(
        "dropped-datagram-reply-counted",
        "                self.bytes_out += sock.sendto(reply, sender)\n",
        "                self.bytes_out += len(reply)\n"
        "                sock.sendto(reply, sender)\n",
        SHORT + "test_event_loop_datagram_replies_to_a_full_peer_are_dropped[python]",
    ),
    Mutation(
        "writes-in-a-read-not-counted",
        "        self.bytes_out += sent\n        conn.nout += sent\n        rest = ",
        "        conn.nout += sent\n        rest = ",
        SHORT + "test_event_loop_protocol_writes_through_short_sends[python-bytes]",
    ),
    Mutation(
        "writes-in-a-read-drop-what-the-kernel-did-not-take",
        "            self._keep(conn, memoryview(rest))\n",
        "            pass\n",
        TRANSPORT + "test_writes_the_kernel_cannot_take_at_once_are_owed_and_pause_the_protocol"
        "[python-observed-at-the-bounds]",
    ),
    Mutation(
        "writes-in-a-read-never-pause-the-protocol",
        "                conn.write_paused = True\n"
        '                self._flow_control(conn, "pause_writing")\n\n    def _flow_control',
        "                pass\n\n    def _flow_control",
        TRANSPORT + "test_writes_the_kernel_cannot_take_at_once_are_owed_and_pause_the_protocol"
        "[python-observed-at-the-bounds]",
    ),
    Mutation(
        "abort-drops-the-writes-of-the-read",
        "            self._uncork(closing=True)",
        "            pass",
        TRANSPORT
        + "test_what_a_protocol_writes_in_a_read_is_delivered_as_by_asyncio[python-abort]",
    ),
    Mutation(
        "close-before-the-writes-of-the-read",
        "    def close(self) -> None:\n        self._uncork()\n",
        "    def close(self) -> None:\n",
        TRANSPORT + "test_writes_the_kernel_cannot_take_at_once_are_owed_and_pause_the_protocol"
        "[python-closed-at-once-at-the-bounds]",
    ),
    Mutation(
        "write-eof-before-the-writes-of-the-read",
        "    def write_eof(self) -> None:\n        self._uncork()\n",
        "    def write_eof(self) -> None:\n",
        TRANSPORT + "test_what_a_protocol_writes_in_a_read_is_delivered_as_by_asyncio"
        "[python-write_eof]",
    ),
    Mutation(
        "writes-in-a-read-sent-one-by-one",
        "            and len(loop._corked) < CORK_CHUNKS\n",
        "            and len(loop._corked) < 1\n",
        TRANSPORT + "test_the_writes_a_protocol_makes_in_one_read_leave_in_one_segment"
        "[python-Lines]",
    ),
    Mutation(
        "held-writes-stay-held-when-the-callbacks-are-done",
        "        if not on:\n            self._uncork()\n",
        "        if not on:\n            pass\n",
        TRANSPORT + "test_what_callbacks_write_is_held_and_leaves_in_one_segment[python]",
    ),
    Mutation(
        "held-writes-go-to-the-next-connection-written-to",
        "            loop._uncork()\n            conn, loop = self._conn, self._loop\n"
        "            if loop is not None and conn is not None and not conn.eof:\n",
        "            conn, loop = self._conn, self._loop\n"
        "            if loop is not None and conn is not None and not conn.eof:\n",
        TRANSPORT + "test_held_writes_to_two_connections_keep_their_order[python]",
    ),
    Mutation(
        "a-run-leaves-held-writes-held",
        "        if self._holding:  # reads hold their own writes: what is held leaves first\n"
        "            self.hold_writes(False)\n",
        "",
        TRANSPORT + "test_held_writes_to_two_connections_keep_their_order[python]",
    ),
    Mutation(
        "no-send-again-after-a-short-send",
        "    if sent == 0 or sent == len(data):  # the usual case: one call\n        return sent\n",
        "    return sent\n",
        SHORT + "test_a_short_send_is_followed_at_once_by_another[python]",
    ),
)
