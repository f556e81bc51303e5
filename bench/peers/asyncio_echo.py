"""The echo servers an asyncio or uvloop user would write.

python asyncio_echo.py asyncio|uvloop PORT [Echo|BufferedEcho|TimerEcho]

Echo is the Protocol API's echo; BufferedEcho the BufferedProtocol API's
(reads land in the protocol's own buffer); TimerEcho an Echo that re-arms an
idle timer (``call_later``) on every message, as a protocol with a timeout
does. prefork serves the same classes (``--handler asyncio_echo:CLASS``).
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


async def main(port: int, protocol: type) -> None:
    loop = asyncio.get_running_loop()
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
