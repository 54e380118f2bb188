"""Attach a handler to the root logger at DEBUG for a test, and restore everything after;
`Records`, a handler that keeps what it sees."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

H = TypeVar("H", bound=logging.Handler)


@contextmanager
def attached(handler: H) -> Iterator[H]:
    loggers = [logging.getLogger(), logging.getLogger("detector")]
    levels = [logger.level for logger in loggers]
    loggers[0].addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        loggers[0].removeHandler(handler)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class Records(logging.Handler):
    """Keeps every record; `events(name)` gives the structured fields of one event."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for record in self.records:
            fields = getattr(record, "fields", None)
            if isinstance(fields, dict) and fields.get("event") == name:
                found.append(fields)
        return found
