"""Logging: one line per event with time, pid and level, on stderr."""

from __future__ import annotations

import logging
import sys
import time

LOGGER_NAME = "prefork"
LEVELS = ("debug", "info", "warning", "error", "critical")


class _Formatter(logging.Formatter):
    """ISO 8601 time in UTC with milliseconds: 2026-11-23T09:33:57.712Z."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def setup_logging(level: str = "info") -> logging.Logger:
    """Configure and return the ``prefork`` logger (idempotent)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    logger.propagate = False
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(message)s"))
        logger.addHandler(handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)
