"""Structured logs, the correlation id and in-process metrics.

Every log line is one JSON object. The request log of the HTTP app (`log_event`) carries its
fields twice on purpose: as the record's attributes (what `JsonFormatter` writes locally) and as
the message itself (what a foreign handler writes, e.g. the Azure Functions worker's), so the
line stays structured whoever formats it.

`METRICS` is a tiny registry (counters and histograms, thread-safe, in-process). Prometheus
exposition and OpenTelemetry export build on `Metrics.snapshot()`; Application Insights is set up
only when a connection string is configured, and its package is imported only then.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detector.config import Settings

LOGGER_NAME = "detector"
REQUEST_LOGGER = "detector.requests"

# The correlation id of the request (or blob) being handled; "" outside of one.
correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")

# Attributes every LogRecord has; anything else on a record came in through `extra=`.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys() | {"message", "asctime"}
)


def new_correlation_id() -> str:
    return uuid.uuid4().hex


def correlation_from_headers(x_correlation_id: str | None, traceparent: str | None) -> str:
    """The caller's id when it is safe to log, else the W3C trace id, else a new id."""
    if x_correlation_id and _SAFE_ID.match(x_correlation_id):
        return x_correlation_id
    if traceparent:
        match = _TRACEPARENT.match(traceparent.strip().lower())
        if match and match.group(1) != "0" * 32:
            return match.group(1)
    return new_correlation_id()


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, correlation id, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        else:
            entry["message"] = record.getMessage()
            for key, value in record.__dict__.items():
                if key not in _STANDARD_ATTRS and key not in entry:
                    entry[key] = value
        entry.setdefault("correlation_id", correlation_id.get() or None)
        if record.exc_info and record.levelno >= logging.ERROR:
            # The exception type and message only: no traceback with local values in the line.
            exc = record.exc_info[1]
            entry["exception"] = f"{type(exc).__name__}: {exc}" if exc else None
        return json.dumps(entry, default=str, separators=(",", ":"))


def log_event(logger: logging.Logger, level: int, fields: dict[str, Any]) -> None:
    """Log one structured line; `fields` must hold no customer data and no secret."""
    if logger.isEnabledFor(level):
        message = json.dumps(fields, default=str, separators=(",", ":"))
        logger.log(level, message, extra={"fields": fields})


_configured_lock = threading.Lock()
_configured: dict[str, bool] = {"logging": False, "azure_monitor": False}


def in_azure_functions() -> bool:
    return bool(os.environ.get("FUNCTIONS_WORKER_RUNTIME"))


def configure_logging(settings: Settings) -> None:
    """Idempotent. Locally: JSON lines on stderr for the `detector` loggers. In the Functions
    worker the host's handlers ship the records (our messages are JSON already). With an
    Application Insights connection string: OpenTelemetry export through azure-monitor."""
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    with _configured_lock:
        if not _configured["logging"]:
            _configured["logging"] = True
            if not in_azure_functions():
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(JsonFormatter())
                logger.addHandler(handler)
        if settings.appinsights_connection and not _configured["azure_monitor"]:
            _configured["azure_monitor"] = True
            _configure_azure_monitor(settings.appinsights_connection)


def _configure_azure_monitor(connection_string: str) -> None:
    try:
        from azure.monitor.opentelemetry import configure_azure_monitor
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        logging.getLogger(LOGGER_NAME).warning("azure-monitor-opentelemetry unavailable: %s", exc)
        return
    try:
        configure_azure_monitor(connection_string=connection_string, logger_name=LOGGER_NAME)
    except Exception as exc:  # a bad connection string must not stop the service
        logging.getLogger(LOGGER_NAME).warning(
            "Application Insights not configured: %s", type(exc).__name__
        )


# --- metrics -------------------------------------------------------------------------------

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str] | None) -> Labels:
    return tuple(sorted((labels or {}).items()))


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


class Metrics:
    """Counters and histograms by name and labels, kept in this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[str, dict[Labels, float]] = {}
        self.histograms: dict[str, dict[Labels, Histogram]] = {}

    def inc(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        key = _labels(labels)
        with self._lock:
            series = self.counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value

    def observe(
        self,
        name: str,
        value: float,
        labels: dict[str, str] | None = None,
        buckets: tuple[float, ...] = LATENCY_BUCKETS_MS,
    ) -> None:
        key = _labels(labels)
        with self._lock:
            series = self.histograms.setdefault(name, {})
            histogram = series.get(key)
            if histogram is None:
                histogram = series[key] = Histogram(buckets)
            histogram.observe(value)

    def counter_value(self, name: str, labels: dict[str, str] | None = None) -> float:
        with self._lock:
            return self.counters.get(name, {}).get(_labels(labels), 0.0)

    def snapshot(self) -> dict[str, Any]:
        """A copy: {"counters": {name: [{labels, value}]}, "histograms": {name: [...]}}."""
        with self._lock:
            return {
                "counters": {
                    name: [{"labels": dict(k), "value": v} for k, v in series.items()]
                    for name, series in self.counters.items()
                },
                "histograms": {
                    name: [
                        {
                            "labels": dict(k),
                            "buckets": list(h.buckets),
                            "counts": list(h.counts),
                            "sum": h.total,
                            "count": h.count,
                        }
                        for k, h in series.items()
                    ]
                    for name, series in self.histograms.items()
                },
            }

    def reset(self) -> None:
        with self._lock:
            self.counters.clear()
            self.histograms.clear()


METRICS = Metrics()
