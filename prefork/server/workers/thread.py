"""The thread worker: T threads per process, each serving one connection.

Every thread runs the sync worker's accept loop; the hot loop releases the
GIL for the whole connection, so T connections are served at once without a
GIL convoy. Only the main thread handles signals (the others block them);
its TERM handler only records, like every worker's but the sync one's: the
main thread never serves a connection, so its loop wakes at once, takes what
is queued on the listeners, closes them and writes to a stop pipe that every
thread polls. The threads then serve what was taken (``held``) and end, and
the main thread waits for them.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from types import FrameType

from prefork.server.workers.base import Worker
from prefork.server.workers.sync import SyncWorker

_THREAD_BLOCKED = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGCHLD,
    signal.SIGTTIN,
    signal.SIGTTOU,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
}


class ThreadWorker(SyncWorker):
    stop_w = -1
    beats_per_connection = False
    serves_in_signal_thread = False

    def run(self) -> None:
        stop_r, self.stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        threads = [
            threading.Thread(target=self.thread_main, args=(stop_r,), name=f"conn-{i}")
            for i in range(self.config.threads)
        ]
        for thread in threads:
            thread.start()
        while self.alive and any(t.is_alive() for t in threads):
            self.notify()
            select.select([self.wakeup_r], [], [], self.tick)
            self.drain_wakeup()
            if not self.parent_alive():
                self.log.warning("master is gone; worker exiting")
                return
        if self.stopping:  # TERM, even while booting
            self.stop_accepting()
        for thread in threads:  # graceful: each finishes its connection
            thread.join()

    def handle_term(self, signum: int, frame: FrameType | None) -> None:
        Worker.handle_term(self, signum, frame)  # only record: run() acts

    def thread_main(self, stop_r: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _THREAD_BLOCKED)
        try:
            self.accept_loop(stop_r, drain=False)
            # Serve what was queued, once it has all been taken: the stop
            # pipe is written after that (TERM, or a thread recycling).
            select.select([stop_r], [], [])
            self.serve_held()
        except Exception:
            self.log.exception("worker thread failed")

    def stop_accepting(self) -> None:
        """Take what is queued, close the listeners, wake every thread."""
        super().stop_accepting()  # takes the queued ones first: threads serve them
        os.write(self.stop_w, b"x")  # wakes every thread's poll at once
