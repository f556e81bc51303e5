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
            self.loop.add_reader(0, print)
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

    def do_pid(self, arg):
        self.reply(str(os.getpid()))
