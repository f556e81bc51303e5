"""The servers an asyncio or uvloop user would write: echoes, and three that answer.

python asyncio_echo.py asyncio|uvloop PORT [NAME]   (Echo by default; NAME is one below)

Echo is the Protocol API's echo; BufferedEcho the BufferedProtocol API's
(reads land in the protocol's own buffer); TimerEcho an Echo that re-arms an
idle timer (``call_later``) on every message, as a protocol with a timeout
does. UpperLines answers every line with the line upper-cased; Resp is a
small key-value store speaking Redis's RESP (SET, GET, DEL, PING), its
parser in Python. upper_stream is UpperLines written with asyncio's
streams (``async def handle(reader, writer)``, served by
``asyncio.start_server``). prefork serves the same classes and handler
(``--handler asyncio_echo:NAME``). ``exchange(NAME, SIZE)`` is the request of
about SIZE bytes a load generator sends the three that answer, and their reply.
"""

import asyncio
import sys


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class BufferedEcho(asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray(65536)
        self.view = memoryview(self.buffer)

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        # A copy: a transport may keep what it could not send yet, and the
        # next read lands in this same buffer.
        self.transport.write(self.buffer[:nbytes])


class TimerEcho(asyncio.Protocol):
    IDLE = 60.0  # seconds without a message before the connection is closed

    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.timer = self.loop.call_later(self.IDLE, transport.close)

    def data_received(self, data):
        self.timer.cancel()
        self.timer = self.loop.call_later(self.IDLE, self.transport.close)
        self.transport.write(data)

    def connection_lost(self, exc):
        self.timer.cancel()


class UpperLines(asyncio.Protocol):
    MAX_LINE = 65536  # a longer line closes the connection: the buffer is bounded

    def connection_made(self, transport):
        self.transport = transport
        self.partial = b""

    def data_received(self, data):
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            self.line_received(line)
        if len(self.partial) > self.MAX_LINE:
            self.transport.close()

    def line_received(self, line):
        self.transport.write(line.upper() + b"\n")


async def upper_stream(reader, writer):
    """UpperLines with streams: a line in, the line upper-cased out."""
    try:
        while line := await reader.readuntil(b"\n"):
            writer.write(line.upper())
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass  # the end of input, or a line past the reader's limit (64 KiB)
    writer.close()


class RespError(Exception):
    pass


class Resp(asyncio.Protocol):
    """SET key value, GET key, DEL key..., PING: a RESP array of bulk strings
    per command, answered in RESP; pipelined commands are answered together."""

    MAX_BUFFER = 1 << 20  # an unfinished command longer than this closes the connection
    store = {}  # one per process, shared by its connections

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data):
        buffer = self.buffer
        buffer += data
        replies = []
        position = 0
        try:
            while True:
                command, position = self.parse(buffer, position)
                if command is None:
                    break
                replies.append(self.execute(command))
        except RespError as exc:
            replies.append(b"-ERR " + str(exc).encode() + b"\r\n")
            self.transport.write(b"".join(replies))
            self.transport.close()
            return
        del buffer[:position]
        if replies:
            self.transport.write(b"".join(replies))
        if len(buffer) > self.MAX_BUFFER:
            self.transport.close()

    @staticmethod
    def parse(buffer, position):
        """The command that starts at ``position`` and where the next one
        starts, or (None, position) while it is incomplete."""
        end = buffer.find(b"\r\n", position)
        if end < 0:
            return None, position
        if buffer[position : position + 1] != b"*":
            raise RespError("expected an array of bulk strings")
        count = int(buffer[position + 1 : end])
        cursor = end + 2
        command = []
        for _ in range(count):
            end = buffer.find(b"\r\n", cursor)
            if end < 0:
                return None, position
            if buffer[cursor : cursor + 1] != b"$":
                raise RespError("expected a bulk string")
            length = int(buffer[cursor + 1 : end])
            start = end + 2
            if len(buffer) < start + length + 2:
                return None, position
            command.append(bytes(buffer[start : start + length]))
            cursor = start + length + 2
        return command, cursor

    def execute(self, command):
        name = command[0].upper() if command else b""
        if name == b"GET" and len(command) == 2:
            value = self.store.get(command[1])
            if value is None:
                return b"$-1\r\n"
            return b"$%d\r\n%b\r\n" % (len(value), value)
        if name == b"SET" and len(command) == 3:
            self.store[command[1]] = command[2]
            return b"+OK\r\n"
        if name == b"DEL" and len(command) >= 2:
            removed = sum(self.store.pop(key, None) is not None for key in command[1:])
            return b":%d\r\n" % removed
        if name == b"PING" and len(command) == 1:
            return b"+PONG\r\n"
        return b"-ERR unknown command or wrong number of arguments\r\n"


def resp_command(*parts):
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%b\r\n" % (len(p), p) for p in parts)


def exchange(name, size):
    """(request, reply) for the server class ``name``: a request of about
    ``size`` bytes (at least a few dozen) and what the server answers it with."""
    text = b"the quick brown fox jumps over the lazy dog 0123456789 "
    if name in ("UpperLines", "upper_stream"):  # one line per message
        line = (text * (size // len(text) + 1))[: max(size - 1, 1)] + b"\n"
        return line, line.upper()
    if name == "Resp":  # a SET and a GET of the same key, pipelined
        overhead = len(resp_command(b"SET", b"key:1", b"")) + len(resp_command(b"GET", b"key:1"))
        value = (text * (size // len(text) + 1))[: max(size - overhead - 4, 8)]
        request = resp_command(b"SET", b"key:1", value) + resp_command(b"GET", b"key:1")
        return request, b"+OK\r\n$%d\r\n%b\r\n" % (len(value), value)
    raise ValueError(f"{name} echoes: it has no request and reply")


async def main(port: int, protocol: type) -> None:
    loop = asyncio.get_running_loop()
    if asyncio.iscoroutinefunction(protocol):  # a stream handler
        server = await asyncio.start_server(protocol, "127.0.0.1", port, backlog=2048)
    else:
        server = await loop.create_server(protocol, "127.0.0.1", port, backlog=2048)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "uvloop":
        import uvloop

        uvloop.install()
    name = sys.argv[3] if len(sys.argv) > 3 else "Echo"
    asyncio.run(main(int(sys.argv[2]), globals()[name]))
