"""The thread worker: T threads per process, each serving one connection.

Every thread runs the sync worker's accept loop; the hot loop releases the
GIL for the whole connection, so T connections are served at once without a
GIL convoy. Only the main thread handles signals (the others block them);
on TERM it writes to a stop pipe that every thread polls, so all of them
let go of the listeners at once, then waits for their connections to end.
"""

from __future__ import annotations

import os
import select
import signal
import threading

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

    def run(self) -> None:
        stop_r, self.stop_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if not self.alive:  # TERM arrived while booting
            os.write(self.stop_w, b"x")
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
        for thread in threads:  # graceful: each finishes its connection
            thread.join()

    def thread_main(self, stop_r: int) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _THREAD_BLOCKED)
        try:
            self.accept_loop(stop_r, drain=False)
            self.serve_held()
        except Exception:
            self.log.exception("worker thread failed")

    def stop_accepting(self) -> None:
        super().stop_accepting()  # take the queued ones first: threads serve them on the way out
        if self.stop_w >= 0:
            os.write(self.stop_w, b"x")  # wakes every thread's poll at once
