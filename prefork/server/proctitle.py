"""Process titles, as ``ps`` and ``top`` show them: ``prefork: master [...]``,
``prefork: worker N [...]``."""

from __future__ import annotations

from setproctitle import setproctitle


def set_title(title: str) -> None:
    setproctitle(f"prefork: {title}")
