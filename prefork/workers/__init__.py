"""Worker classes by the name ``-k`` takes."""

from __future__ import annotations

from prefork.workers.base import Worker
from prefork.workers.event import EventWorker
from prefork.workers.sync import SyncWorker

WORKER_CLASSES: dict[str, type[Worker]] = {
    "event": EventWorker,
    "sync": SyncWorker,
}

__all__ = ["WORKER_CLASSES", "EventWorker", "SyncWorker", "Worker"]
