"""Protocols that use asyncio's loop: timers, tasks, queues, executors.

Each answers one command line per connection, so that a test can see what
asyncio did on the event worker's loop (and on -k asyncio's, the same code).
"""

import asyncio
import os
import time


class Commands(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        self.pending = []

    def data_received(self, data):
        command, _, arg = data.decode().strip().partition(" ")
        getattr(self, "do_" + command)(arg)

    def connection_lost(self, exc):
        for pending in self.pending:
            pending.cancel()

    def reply(self, text):
        self.transport.write(text.encode() + b"\n")

    # call_later: "ok" now, "late <lateness in ms>" after the delay
    def do_later(self, arg):
        delay = float(arg)
        due = self.loop.time() + delay
        self.reply("ok")
        self.pending.append(
            self.loop.call_later(
                delay, lambda: self.reply(f"late {(self.loop.time() - due) * 1e3:.3f}")
            )
        )

    # a task: asyncio.sleep, Queue, Event, Lock, gather, wait_for
    def do_task(self, arg):
        self.pending.append(self.loop.create_task(self.work(int(arg))))

    async def work(self, n):
        queue = asyncio.Queue()
        done = asyncio.Event()
        lock = asyncio.Lock()
        total = []

        async def producer():
            for i in range(n):
                await asyncio.sleep(0.001)
                await queue.put(i)
            done.set()

        async def consumer():
            while not (done.is_set() and queue.empty()):
                try:
                    item = await asyncio.wait_for(queue.get(), 1.0)
                except asyncio.TimeoutError:
                    continue
                async with lock:
                    total.append(item)

        await asyncio.gather(producer(), consumer())
        try:
            await asyncio.wait_for(asyncio.sleep(10), 0.01)
        except asyncio.TimeoutError:
            timed_out = True
        self.reply(f"sum {sum(total)} timed_out {timed_out} running {self.loop.is_running()}")

    # run_in_executor: a blocking call in a thread, its result back on the loop
    def do_executor(self, arg):
        future = self.loop.run_in_executor(None, lambda: (time.sleep(0.05), int(arg) * 2)[1])
        future.add_done_callback(lambda f: self.reply(f"executor {f.result()}"))

    # a task that writes FILE after a delay unless the connection goes first
    def do_unless_closed(self, arg):
        async def later():
            await asyncio.sleep(0.5)
            with open(arg, "w") as f:
                f.write("the task outlived its connection")

        self.pending.append(self.loop.create_task(later()))
        self.reply("ok")

    # a method the loop lacks: its NotImplementedError comes back
    def do_unsupported(self, arg):
        try:
            self.loop.connect_read_pipe(asyncio.Protocol, None)
        except NotImplementedError as exc:
            self.reply(f"NotImplementedError {exc}")

    # a callback that raises: logged, and the connection goes on
    def do_raise(self, arg):
        self.loop.call_soon(lambda: 1 / 0)
        self.loop.call_soon(lambda: self.reply("after"))

    # a timer that re-arms itself for ever, tied to no connection or task
    def do_forever(self, arg):
        def tick():
            self.loop.call_later(0.05, tick)

        tick()
        self.reply("ok")

    # outgoing connections on the same loop: "open HOST:PORT TEXT" sends TEXT
    # and a newline to a line server with asyncio.open_connection
    def do_open(self, arg):
        address, _, text = arg.partition(" ")
        self.pending.append(self.loop.create_task(self.open_and_ask(address, text)))

    async def open_and_ask(self, address, text):
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
        except OSError as exc:
            self.reply(f"error {type(exc).__name__}")
            return
        writer.write(text.encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        self.reply(f"got {line.decode().strip()} from {writer.get_extra_info('peername')[1]}")

    # "bulk HOST:PORT N": N bytes through an echo server and back, with drain()
    # (flow control: the transport pauses the writer past its high-water mark)
    def do_bulk(self, arg):
        address, _, size = arg.partition(" ")
        self.pending.append(self.loop.create_task(self.bulk(address, int(size))))

    async def bulk(self, address, size):
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        payload = os.urandom(size)

        async def send():
            for start in range(0, size, 65536):
                writer.write(payload[start : start + 65536])
                await writer.drain()
            writer.write_eof()

        sender = self.loop.create_task(send())
        echoed = await reader.read()  # until the echo server's end of file
        await sender
        writer.close()
        self.reply(f"bulk {len(echoed)} {echoed == payload}")

    # "proto HOST:PORT": loop.create_connection with a Protocol class
    def do_proto(self, arg):
        host, _, port = arg.rpartition(":")
        done = self.loop.create_future()
        commands = self

        class Client(asyncio.Protocol):
            def connection_made(self, transport):
                self.data = b""
                transport.write(b"proto\n")

            def data_received(self, data):
                self.data += data

            def eof_received(self):
                return False  # close

            def connection_lost(self, exc):
                done.set_result(self.data)

        async def run():
            transport, _ = await commands.loop.create_connection(Client, host, int(port))
            transport.write_eof()  # the line server answers, then sees our end
            data = await done
            commands.reply(f"proto {data.decode().strip()}")

        self.pending.append(self.loop.create_task(run()))

    # "sock HOST:PORT": the loop's sock_* coroutines on a socket of our own
    def do_sock(self, arg):
        host, _, port = arg.rpartition(":")

        async def run():
            import socket

            with socket.socket() as sock:
                sock.setblocking(False)
                await self.loop.sock_connect(sock, (host, int(port)))
                await self.loop.sock_sendall(sock, b"sock api\n")
                data = b""
                while not data.endswith(b"\n"):
                    data += await self.loop.sock_recv(sock, 100)
            self.reply(f"sock {data.decode().strip()}")

        self.pending.append(self.loop.create_task(run()))

    def do_pid(self, arg):
        self.reply(str(os.getpid()))
