"""Structured logs, the correlation id and in-process metrics.

Every log line is one JSON object. The request log of the HTTP app (`log_event`) carries its
fields twice on purpose: as the record's attributes (what `JsonFormatter` writes locally) and as
the message itself (what a foreign handler writes, e.g. the Azure Functions worker's), so the
line stays structured whoever formats it.

`METRICS` is a tiny registry (counters and histograms, thread-safe, in-process), exposed in the
Prometheus text format by `prometheus_text` (GET /api/metrics). Application Insights is set up
only when a connection string is configured, and its package is imported only then: then every
`METRICS.inc`/`observe` is also recorded on an OpenTelemetry instrument of the same name, and
`span()` opens a trace span carrying the correlation id. Without it, `span()` costs nothing.

The audit trail (`audit`, logger `detector.audit`) is one line per scoring call and per batch file:
who (a key name or identity, never a key), when, how many customers, model version, outcome and
correlation id. No customer id, no feature value and no secret is ever passed to a log call.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import math
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from detector.config import Settings

LOGGER_NAME = "detector"
REQUEST_LOGGER = "detector.requests"
AUDIT_LOGGER = "detector.audit"
# Event names the alert rules in infra/modules/alerts.bicep query (tests/test_infra.py checks).
EVENT_BATCH_FAILED = "batch_failed"
EVENT_BATCH_DRIFT = "batch_drift"  # a scored batch file whose features drifted (PSI)
EVENT_MODEL_LOAD_FAILED = "model_load_failed"

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
        # `event` also as its own attribute: Application Insights customDimensions["event"].
        extra = {"fields": fields, "event": fields.get("event")}
        logger.log(level, message, extra=extra)


def audit(
    kind: str,
    *,
    caller: str,
    customers: int,
    model_version: str | None,
    outcome: str,
    **details: Any,
) -> None:
    """The audit line of one scoring call or batch file (no customer data, no secret)."""
    fields: dict[str, Any] = {
        "event": "audit",
        "kind": kind,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "caller": caller,
        "customers": customers,
        "model_version": model_version,
        "outcome": outcome,
        "correlation_id": correlation_id.get() or None,
        **details,
    }
    log_event(logging.getLogger(AUDIT_LOGGER), logging.INFO, fields)


_configured_lock = threading.Lock()
_configured: dict[str, bool] = {"logging": False, "azure_monitor": False}


def worker_exports_telemetry(environ: dict[str, str] | None = None) -> bool:
    """True when the Azure Functions Python worker configures Azure Monitor itself: app setting
    PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY=true (infra/modules/function-app.bicep). The worker
    then calls `configure_azure_monitor` at start, before it imports function_app.py, with the
    logger PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME; a second call from the app would attach a
    second exporter to the same records (every log line twice) and instrument the libraries
    again. The worker does not guard against that double set-up (azure-functions-python-worker
    pull request 1621), so the app does not configure it then and only uses the worker's
    providers (`enable_otel`)."""
    env = os.environ if environ is None else environ
    flag = env.get("PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY", "").strip().lower()
    return bool(env.get("FUNCTIONS_WORKER_RUNTIME")) and flag == "true"


def configure_logging(settings: Settings) -> None:
    """Idempotent. Locally: JSON lines on stderr for the `detector` loggers. In the Functions
    worker the host's handlers ship the records (our messages are JSON already). With an
    Application Insights connection string: OpenTelemetry export through azure-monitor, set up
    here unless the Functions worker sets it up itself (`worker_exports_telemetry`)."""
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    with _configured_lock:
        if not _configured["logging"]:
            _configured["logging"] = True
            if not settings.functions_host:
                handler = logging.StreamHandler(sys.stderr)
                handler.setFormatter(JsonFormatter())
                logger.addHandler(handler)
        if settings.appinsights_connection and not _configured["azure_monitor"]:
            _configured["azure_monitor"] = True
            if worker_exports_telemetry():
                # The worker's OpenTelemetry providers export; ours would export every record
                # again. The OpenTelemetry API hands out proxies until a provider is set, so
                # metrics and spans reach the worker's providers whenever they are ready.
                enable_otel()
            else:
                _configure_azure_monitor(
                    settings.appinsights_connection,
                    os.environ.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", ""),
                )


def aad_client_id(authentication_string: str) -> str | None:
    """`ClientId=<id>;Authorization=AAD` -> "<id>" ("" for a system-assigned identity);
    None when the string does not ask for Entra ID (AAD) authentication."""
    parts = {}
    for item in authentication_string.split(";"):
        key, sep, value = item.partition("=")
        if sep:
            parts[key.strip().lower()] = value.strip()
    if parts.get("authorization", "").upper() != "AAD":
        return None
    return parts.get("clientid", "")


def azure_monitor_options(connection_string: str, authentication_string: str) -> dict[str, Any]:
    """Keyword arguments of `configure_azure_monitor`: the connection, our logger, and a
    ManagedIdentityCredential when APPLICATIONINSIGHTS_AUTHENTICATION_STRING says AAD (the
    resource has local authentication off: ingestion needs the identity's Entra ID token)."""
    options: dict[str, Any] = {"connection_string": connection_string, "logger_name": LOGGER_NAME}
    client_id = aad_client_id(authentication_string)
    if client_id is not None:
        from azure.identity import ManagedIdentityCredential

        options["credential"] = ManagedIdentityCredential(client_id=client_id or None)
    return options


def _configure_azure_monitor(connection_string: str, authentication_string: str = "") -> None:
    logger = logging.getLogger(LOGGER_NAME)
    try:
        from azure.monitor.opentelemetry import configure_azure_monitor
    except ImportError as exc:  # pragma: no cover - it is in requirements.txt
        logger.warning("azure-monitor-opentelemetry unavailable: %s", exc)
        return
    try:
        configure_azure_monitor(**azure_monitor_options(connection_string, authentication_string))
        enable_otel()
    except Exception as exc:  # a bad connection string must not stop the service
        logger.warning("Application Insights not configured: %s", type(exc).__name__)


# --- tracing -------------------------------------------------------------------------------

_tracer: list[Any] = []  # the OpenTelemetry tracer once enabled; empty = tracing off


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A trace span with the correlation id when OpenTelemetry is on; nothing otherwise."""
    if not _tracer:
        yield
        return
    attrs = {k: v for k, v in attributes.items() if isinstance(v, str | int | float | bool)}
    attrs.setdefault("correlation_id", correlation_id.get())
    with _tracer[0].start_as_current_span(name, attributes=attrs):
        yield


def observe_blob_run(blob_name: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one blob-triggered batch under its own correlation id and trace span; log the audit
    line, and the `batch_failed` event (an alert rule queries it) when the run raises or the
    file could not be used. `run` returns the report `blob_batch.process_blob` returns."""
    logger = logging.getLogger("detector.blob")
    token = correlation_id.set(new_correlation_id())
    try:
        with span("blob score_batch_blob", input_blob=blob_name):
            report = run()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        reason = f"{type(exc).__name__}: {first}"
        log_event(
            logger,
            logging.ERROR,
            {"event": EVENT_BATCH_FAILED, "input_blob": blob_name, "reason": reason},
        )
        audit(
            "batch_file",
            caller="blob-trigger",
            customers=0,
            model_version=None,
            outcome="failed",
            input_blob=blob_name,
            error=type(exc).__name__,
        )
        correlation_id.reset(token)
        raise
    if "error" in report:
        outcome = "unusable_file"
        log_event(
            logger,
            logging.ERROR,
            {"event": EVENT_BATCH_FAILED, "input_blob": blob_name, "reason": "file unusable"},
        )
    elif "skipped" in report:
        outcome = "skipped"
    else:
        outcome = "ok"
        drifted = (report.get("drift") or {}).get("drifted") or []
        if drifted:  # an alert rule queries this event (infra/modules/alerts.bicep)
            psi = report["drift"]["features"]
            log_event(
                logger,
                logging.WARNING,
                {
                    "event": EVENT_BATCH_DRIFT,
                    "input_blob": blob_name,
                    "drifted": drifted,
                    "psi": {name: psi[name]["psi"] for name in drifted},
                    "model_version": report.get("model_version"),
                },
            )
    audit(
        "batch_file",
        caller="blob-trigger",
        customers=int(report.get("clients_scored") or 0),
        model_version=report.get("model_version"),
        outcome=outcome,
        input_blob=blob_name,
        input_etag=report.get("input_etag"),
        rows_rejected=report.get("rows_rejected"),
        flagged=report.get("clients_flagged"),
    )
    correlation_id.reset(token)
    return report


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
        # Gauges are read when asked: name -> a function giving (labels, value) pairs.
        self.gauges: dict[str, Callable[[], list[tuple[dict[str, str], float]]]] = {}
        self._meter: Any = None  # an OpenTelemetry Meter once enabled
        self._instruments: dict[str, Any] = {}

    def enable_otel(self, meter: Any) -> None:
        """Also record every value on OpenTelemetry instruments (same names and labels)."""
        with self._lock:
            self._meter = meter
            self._instruments.clear()
            gauges = list(self.gauges)
        for name in gauges:
            self._observe_gauge(name)

    def gauge(self, name: str, read: Callable[[], list[tuple[dict[str, str], float]]]) -> None:
        """Register (or replace) a gauge whose values `read` gives when metrics are read:
        in /api/metrics, and by OpenTelemetry's periodic export (an observable gauge)."""
        with self._lock:
            new = name not in self.gauges
            self.gauges[name] = read
        if new and self._meter is not None:
            self._observe_gauge(name)

    def _observe_gauge(self, name: str) -> None:
        from opentelemetry.metrics import Observation

        def callback(options: Any) -> list[Any]:
            read = self.gauges.get(name)
            return [Observation(value, labels) for labels, value in (read() if read else [])]

        self._meter.create_observable_gauge(name, callbacks=[callback])

    def _instrument(self, kind: str, name: str) -> Any:
        instrument = self._instruments.get(name)
        if instrument is None:
            unit = "ms" if name.endswith("_ms") else "s" if name.endswith("_seconds") else "1"
            create = (
                self._meter.create_counter if kind == "counter" else self._meter.create_histogram
            )
            instrument = self._instruments[name] = create(name, unit=unit)
        return instrument

    def inc(self, name: str, value: float = 1.0, labels: dict[str, str] | None = None) -> None:
        key = _labels(labels)
        with self._lock:
            series = self.counters.setdefault(name, {})
            series[key] = series.get(key, 0.0) + value
            if self._meter is not None and value >= 0:
                self._instrument("counter", name).add(value, dict(key))

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
            if self._meter is not None:
                self._instrument("histogram", name).record(value, dict(key))

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
            } | {"gauges": self._read_gauges()}

    def _read_gauges(self) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for name, read in list(self.gauges.items()):
            try:
                values = read()
            except Exception:  # a gauge must never break /api/metrics
                logging.getLogger(LOGGER_NAME).debug("gauge %s could not be read", name)
                continue
            out[name] = [{"labels": dict(labels), "value": value} for labels, value in values]
        return out

    def reset(self) -> None:
        with self._lock:
            self.counters.clear()
            self.histograms.clear()
            self.gauges.clear()


METRICS = Metrics()


def enable_otel() -> None:
    """Switch on the OpenTelemetry side of `METRICS` and `span` (after the SDK is configured)."""
    from opentelemetry import metrics, trace

    METRICS.enable_otel(metrics.get_meter(LOGGER_NAME))
    _tracer[:] = [trace.get_tracer(LOGGER_NAME)]


# --- Prometheus exposition -------------------------------------------------------------------

_HELP = {
    "predictions_total": "Customers scored, by model and model version.",
    "predictions_flagged_total": "Customers flagged (probability at or above the threshold).",
    "model_latency_ms": "Time in the model per scoring call, milliseconds.",
    "model_load_seconds": "Time to load (download, verify, deserialise) the model set.",
    "model_load_failures_total": "Failed attempts to load the model set.",
    "batch_files_total": "Batch files handled, by outcome.",
    "batch_rows_scored_total": "Input rows of batch files scored.",
    "batch_rows_rejected_total": "Batch rows or records rejected, by source (api, blob).",
    "http_requests_total": "HTTP requests, by route and status.",
    "http_request_duration_ms": "HTTP request duration, milliseconds.",
    "rate_limited_total": "Requests answered 429 by the per-instance rate limit.",
    "feature_psi": "PSI of each feature over this instance's last 10,000 scored clients.",
    "features_drifted": "Features whose PSI is over the threshold (0.25) in that window.",
    "requests_overloaded_total": "Requests answered 503: no room among the bodies in work.",
}
PROMETHEUS_PREFIX = "ptd_"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(labels: dict[str, str], extra: tuple[str, str] | None = None) -> str:
    items = [*sorted(labels.items()), *([extra] if extra else [])]
    if not items:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in items) + "}"


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def prometheus_text(snapshot: dict[str, Any] | None = None) -> str:
    """The registry in the Prometheus text exposition format (version 0.0.4)."""
    snap = snapshot if snapshot is not None else METRICS.snapshot()
    lines: list[str] = []
    for name in sorted(snap["counters"]):
        full = PROMETHEUS_PREFIX + name
        lines.append(f"# HELP {full} {_HELP.get(name, name)}")
        lines.append(f"# TYPE {full} counter")
        for entry in snap["counters"][name]:
            lines.append(f"{full}{_label_text(entry['labels'])} {_number(entry['value'])}")
    for name in sorted(snap.get("gauges", {})):
        full = PROMETHEUS_PREFIX + name
        lines.append(f"# HELP {full} {_HELP.get(name, name)}")
        lines.append(f"# TYPE {full} gauge")
        for entry in snap["gauges"][name]:
            lines.append(f"{full}{_label_text(entry['labels'])} {_number(entry['value'])}")
    for name in sorted(snap["histograms"]):
        full = PROMETHEUS_PREFIX + name
        lines.append(f"# HELP {full} {_HELP.get(name, name)}")
        lines.append(f"# TYPE {full} histogram")
        for entry in snap["histograms"][name]:
            labels = entry["labels"]
            cumulative = 0
            for bound, count in zip([*entry["buckets"], math.inf], entry["counts"], strict=True):
                cumulative += count
                le = "+Inf" if bound == math.inf else _number(float(bound))
                lines.append(f"{full}_bucket{_label_text(labels, ('le', le))} {cumulative}")
            lines.append(f"{full}_sum{_label_text(labels)} {_number(entry['sum'])}")
            lines.append(f"{full}_count{_label_text(labels)} {entry['count']}")
    return "\n".join(lines) + "\n"
