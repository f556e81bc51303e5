"""Worker classes by the name ``-k`` takes."""

from __future__ import annotations

from prefork.server.workers.asyncio_worker import AsyncioWorker
from prefork.server.workers.base import Worker
from prefork.server.workers.event import EventWorker
from prefork.server.workers.sync import SyncWorker
from prefork.server.workers.thread import ThreadWorker

WORKER_CLASSES: dict[str, type[Worker]] = {
    "event": EventWorker,
    "sync": SyncWorker,
    "thread": ThreadWorker,
    "asyncio": AsyncioWorker,
}

__all__ = ["WORKER_CLASSES", "AsyncioWorker", "EventWorker", "SyncWorker", "ThreadWorker", "Worker"]
