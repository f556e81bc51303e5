"""Logging: one line per event with time, pid and level, on stderr or in
``--log-file`` (reopened on USR1, so logrotate can move it away)."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

from prefork.errors import PreforkError

LOGGER_NAME = "prefork"
FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"


class _Formatter(logging.Formatter):
    """ISO 8601 time in UTC with milliseconds: 2026-11-23T09:33:57.712Z."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def _open_log_file(path: str) -> logging.FileHandler:
    try:
        return logging.FileHandler(path, mode="a", encoding="utf-8")
    except OSError as exc:
        raise PreforkError(f"--log-file {path}: cannot open: {exc.strerror}") from None


def setup_logging(level: str = "info", log_file: str | None = None) -> logging.Logger:
    """Configure and return the ``prefork`` logger. Raises PreforkError when
    ``log_file`` cannot be opened for appending."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    logger.propagate = False
    handler: logging.Handler
    if log_file is not None:
        handler = _open_log_file(os.path.abspath(log_file))
    elif logger.handlers and not isinstance(logger.handlers[0], logging.FileHandler):
        return logger
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(FORMAT))
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    return logger


def plural(count: int, noun: str) -> str:
    """``1 connection``, ``2 connections``: for log lines."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def log_stream() -> TextIO:
    """Where the log goes now: for faulthandler's stack dumps."""
    for handler in get_logger().handlers:
        if isinstance(handler, logging.FileHandler):
            if handler.stream is None:
                handler.stream = handler._open()
            return handler.stream
    return sys.stderr


def log_file_path() -> str | None:
    for handler in get_logger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def reopen_log_file() -> bool:
    """Close and reopen ``--log-file`` (USR1); False if it cannot be opened,
    in which case the old file stays in use."""
    for handler in get_logger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()  # an RLock: safe from a signal handler in this thread
            try:
                stream = handler._open()
            except OSError:
                return False
            else:
                old, handler.stream = handler.stream, stream
                if old is not None:
                    old.close()
            finally:
                handler.release()
    return True
