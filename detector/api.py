"""The HTTP app (FastAPI, ASGI): the same app under uvicorn locally and in Azure Functions.

Routes live under /api, as the Functions host routes them. This module is the HTTP side: error
bodies, the request body, the middleware, the model holder, the routes and the OpenAPI document;
what a record is and how records are validated and scored is `detector.records`. The request path
is built for speed and for hostile input:

* the body is read by us, with a size limit on Content-Length and on the streamed bytes, and
  parsed by pydantic-core's JSON parser with NaN/Infinity rejected;
* every record of a request, one or a whole batch, goes through one `records.score_records`
  call; a bad record gets its own error entry.

Every error is `{"error": {"code", "message", "location"}}`; nothing a caller sends produces a
500 or a traceback. The model is loaded once per process (at startup or on first need); when it
cannot be loaded, /api/health and the scoring routes answer 503 with the reason and the load is
retried with a backoff.
"""

from __future__ import annotations

import contextlib
import gc
import hmac
import logging
import math
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import pydantic_core
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from pydantic import TypeAdapter
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from detector.config import MODEL_NAMES, ConfigError, Settings
from detector.features import FEATURE_NAMES, FEATURES
from detector.identity import MODELS_READ, SCORES_READ, PrincipalReader
from detector.limits import BodyBudget, BudgetFull, RateLimiter, Reservation
from detector.model import ArtifactSet, ModelError
from detector.records import (
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    Prediction,
    PredictRequest,
    RecordError,
    format_location,
    join_location,
    score_records,
)
from detector.telemetry import (
    EVENT_MODEL_LOAD_FAILED,
    METRICS,
    PROMETHEUS_CONTENT_TYPE,
    REQUEST_LOGGER,
    audit,
    configure_logging,
    correlation_from_headers,
    correlation_id,
    log_event,
    prometheus_text,
    span,
)

API_VERSION = "1.0.0"
log = logging.getLogger("detector.api")
request_log = logging.getLogger(REQUEST_LOGGER)

# Per-request facts for the request log line (never customer data): set by the middleware,
# filled in by the auth dependency and the routes.
request_info: ContextVar[dict[str, Any] | None] = ContextVar("request_info", default=None)

ROUTES = (
    "/api/health",
    "/api/model_info",
    "/api/features",
    "/api/predict",
    "/api/predict_batch",
    "/api/metrics",
    "/api/openapi.json",
    "/api/docs",
)
SCORING_ROUTES = frozenset({"/api/predict", "/api/predict_batch"})
OPEN_ROUTES = frozenset({"/api/health", "/api/openapi.json", "/api/docs"})
# Above this many records a batch is validated and scored in a worker thread, off the event loop.
THREAD_THRESHOLD = 64
# A scoring request waits this long (seconds) for room among the bodies in work, then is refused
# with 503 and Retry-After (RETRY_AFTER_OVERLOADED seconds). A worst-case body takes ~2 s.
ADMISSION_WAIT_SECONDS = 30.0
RETRY_AFTER_OVERLOADED = 5


# --- errors ------------------------------------------------------------------------------------


class ApiError(Exception):
    """A request the API refuses: HTTP status, a stable code, a message and where."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        location: str | None = None,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.location = location
        self.details = details
        self.headers = headers


def error_body(
    code: str, message: str, location: str | None, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message, "location": location}
    if details:
        error["details"] = details
    return {"error": error}


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """JSON serialised by pydantic-core (fast; NaN would become null, never invalid JSON)."""
    return Response(
        pydantic_core.to_json(content),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _error_response(exc: ApiError) -> Response:
    info = request_info.get()
    if info is not None:
        info["error"] = exc.code
    return json_response(
        error_body(exc.code, exc.message, exc.location, exc.details), exc.status, exc.headers
    )


# --- the model, loaded once ----------------------------------------------------------------


class ModelUnavailable(Exception):
    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def _register_drift_gauges(holder: ModelHolder) -> None:
    """`feature_psi{feature}` and `features_drifted`: this instance's last scored clients
    against the training distribution (detector.drift.RollingDrift), read when metrics are."""

    def read(which: str) -> list[tuple[dict[str, str], float]]:
        artifacts = holder.artifacts
        if artifacts is None:
            return []
        report = artifacts.rolling_drift.report()
        version = {"model_version": artifacts.version}
        if which == "features_drifted":
            return (
                [(version, float(len(report.get("drifted", []))))] if "features" in report else []
            )
        return [
            ({"feature": name, **version}, float(entry["psi"]))
            for name, entry in report.get("features", {}).items()
        ]

    METRICS.gauge("feature_psi", lambda: read("feature_psi"))
    METRICS.gauge("features_drifted", lambda: read("features_drifted"))


class ModelHolder:
    """Loads the artifact set once; on failure keeps the reason and retries with a backoff."""

    def __init__(
        self,
        loader: Callable[[], ArtifactSet],
        backoff: tuple[float, float] = (2.0, 60.0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loader = loader
        self._backoff = backoff
        self._clock = clock
        self._lock = threading.Lock()
        self.artifacts: ArtifactSet | None = None
        self.reason = "model not loaded yet"
        self.attempts = 0
        self.load_seconds: float | None = None
        self._delay = backoff[0]
        self._next_attempt = 0.0

    def _raise_unavailable(self) -> None:
        wait = max(0.0, self._next_attempt - self._clock())
        raise ModelUnavailable(self.reason, wait)

    def load(self) -> ArtifactSet:
        """The artifacts, loading them if due; raises ModelUnavailable with the reason."""
        if self.artifacts is not None:
            return self.artifacts
        with self._lock:
            if self.artifacts is not None:
                return self.artifacts
            if self.attempts and self._clock() < self._next_attempt:
                self._raise_unavailable()
            self.attempts += 1
            started = time.perf_counter()
            try:
                artifacts = self._loader()
            except Exception as exc:  # ModelError, storage and config errors alike
                self.reason = (
                    str(exc) if isinstance(exc, ModelError) else (f"{type(exc).__name__}: {exc}")
                )
                self._next_attempt = self._clock() + self._delay
                self._delay = min(self._delay * 2, self._backoff[1])
                METRICS.inc("model_load_failures_total")
                log_event(
                    log,
                    logging.ERROR,
                    {
                        "event": EVENT_MODEL_LOAD_FAILED,
                        "message": f"model load failed (attempt {self.attempts}): {self.reason}",
                        "attempt": self.attempts,
                        "reason": self.reason,
                        "retry_in_seconds": round(self._next_attempt - self._clock(), 3),
                    },
                )
                self._raise_unavailable()
            self.load_seconds = time.perf_counter() - started
            self.artifacts = artifacts
            self.reason = ""
            METRICS.observe("model_load_seconds", self.load_seconds, buckets=(0.1, 1, 5, 30))
            log.info(
                "model %s loaded in %.2f s (models: %s)",
                artifacts.version,
                self.load_seconds,
                ", ".join(artifacts.model_names),
            )
            return artifacts

    async def get(self) -> ArtifactSet:
        if self.artifacts is not None:
            return self.artifacts
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.load)


def default_loader(settings: Settings) -> Callable[[], ArtifactSet]:
    """The process-wide model (`detector.store.shared_artifacts`): the HTTP app and the blob
    trigger of one worker share one download and one loaded set. Imported lazily."""

    def load() -> ArtifactSet:
        from detector.store import shared_artifacts

        return shared_artifacts(settings)

    return load


# --- request plumbing --------------------------------------------------------------------------


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


# Content codings a request body may carry (RFC 9110 §8.4.1): "x-gzip" is "gzip" (§8.4.1.3);
# "deflate" is the zlib format (§8.4.1.2), though some clients send raw deflate: both are read.
CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
ACCEPTED_CODINGS = "gzip, deflate"
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class BodyPlan:
    """What the headers say of a body: its content coding (None: identity) and declared length."""

    __slots__ = ("coding", "declared")

    def __init__(self, coding: str | None, declared: int | None) -> None:
        self.coding = coding
        self.declared = declared

    def reserve(self, limit: int) -> int:
        """Bytes to reserve before reading: the declared size when it is the size that will be
        parsed, else the limit (chunked or encoded: the decoded size is known only once read)."""
        if self.coding is None and self.declared is not None:
            return min(self.declared, limit)
        return limit


def body_plan(request: Request, limit: int) -> BodyPlan:
    """Check the body's headers before anything is read.

    415 unless the media type is JSON; 415 for a content coding other than gzip, deflate or
    identity (with `Accept-Encoding` listing those, RFC 9110 §12.5.3); 400 for a Content-Length
    that is not a number; 413 when Content-Length is over `limit` (the encoded size counts as well
    as the decoded one). The headers are read in one pass over the raw list (a missing header
    costs an exception in Starlette's `Headers.get`); repeated Content-Encoding fields are one
    list (RFC 9110 §5.3)."""
    content_type: str | None = None
    declared: str | None = None
    encodings: list[str] = []
    for raw_name, raw_value in request.scope["headers"]:
        name = raw_name.lower()
        if name == b"content-type":
            if content_type is None:
                content_type = raw_value.decode("latin-1")
        elif name == b"content-length":
            if declared is None:
                declared = raw_value.decode("latin-1")
        elif name == b"content-encoding":
            encodings.append(raw_value.decode("latin-1"))
    if not _is_json(content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as application/json",
            "header.content-type",
        )
    coding = _content_coding(", ".join(encodings)) if encodings else None
    length = None
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            raise ApiError(
                400, "invalid_header", "Content-Length is not a number", "header.content-length"
            ) from None
        if length > limit:
            raise ApiError(
                413,
                "body_too_large",
                f"body of {length} bytes exceeds the limit of {limit} bytes",
                "body",
            )
    return BodyPlan(coding, length)


def _content_coding(header: str | None) -> str | None:
    """The one content coding of the body, None for identity; 415 for anything else."""
    if header is None:
        return None
    names = [c.strip().lower() for c in header.split(",")]
    codings = [c for c in names if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in CODINGS:
        return CODINGS[codings[0]]
    unknown = next((c for c in codings if c not in CODINGS), None)
    message = (
        f"content-encoding {unknown[:32]!r} is not supported; send the body as is, or "
        f"encoded with one of: {ACCEPTED_CODINGS}"
        if unknown is not None
        else f"a body encoded more than once ({header[:64]!r}) is not supported; encode it once "
        f"with one of: {ACCEPTED_CODINGS}"
    )
    raise ApiError(
        415,
        "unsupported_encoding",
        message,
        "header.content-encoding",
        headers={"accept-encoding": ACCEPTED_CODINGS},
    )


class _Inflater:
    """Streaming gzip/deflate decoding that never produces more than `limit` bytes.

    Each input chunk is inflated with `max_length` set to what the limit still allows, so a
    bomb (a few kB that inflate to gigabytes) stops one byte past the limit, in bounded memory.
    Concatenated gzip members (RFC 1952 §2.2) are all read."""

    def __init__(self, coding: str, limit: int) -> None:
        self.coding = coding
        self.limit = limit
        self.size = 0
        self._inflater: Any = None
        self._started = False

    def _new(self, data: bytes) -> Any:
        if self.coding == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # zlib format when the first two bytes are a zlib header (RFC 1950 §2.2), else raw.
        zlib_header = len(data) >= 2 and data[0] & 0x0F == 8 and (data[0] << 8 | data[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        while data:
            if self._inflater is None:
                self._inflater = self._new(data)
                self._started = True
            piece = self._inflater.decompress(data, self.limit - self.size + 1)
            self.size += len(piece)
            if self.size > self.limit:
                raise ApiError(
                    413,
                    "body_too_large",
                    f"the {self.coding}-decoded body exceeds the limit of {self.limit} bytes",
                    "body",
                )
            out.append(piece)
            if self._inflater.eof:
                data = self._inflater.unused_data
                if data and self.coding != "gzip":
                    raise zlib.error("data after the end of the compressed stream")
                self._inflater = None if data else self._inflater
            else:
                data = self._inflater.unconsumed_tail
        return out

    def finish(self) -> None:
        if self._started and (self._inflater is None or not self._inflater.eof):
            raise zlib.error("the compressed stream is truncated")


async def read_body(request: Request, plan: BodyPlan, limit: int) -> bytes:
    """The body, decoded, at most `limit` bytes (413 past it, on the bytes received and on the
    decoded bytes, counted as they stream); 400 `invalid_encoding` when it is not what its
    Content-Encoding says."""
    inflater = _Inflater(plan.coding, limit) if plan.coding else None
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413, "body_too_large", f"body exceeds the limit of {limit} bytes", "body"
                )
            if inflater is None:
                chunks.append(chunk)
            else:
                chunks.extend(inflater.feed(chunk))
        if inflater is not None:
            inflater.finish()
    except zlib.error as exc:
        raise ApiError(
            400,
            "invalid_encoding",
            f"the body is not valid {plan.coding} data (Content-Encoding: {plan.coding}): {exc}",
            "body",
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# Parsed JSON costs memory by its objects: a Python dict is 64 to 200 bytes, for as little as 3
# bytes of `{}`. A real body holds one object or array per 100 bytes or more (an invoice row
# with its required fields alone is about 230 bytes), so a body with more than one per
# BYTES_PER_CONTAINER bytes (past the first FREE_CONTAINERS) is refused before it is parsed:
# records of `{"":0}` had cost 31 to 40 bytes of memory per body byte.
BYTES_PER_CONTAINER = 32
FREE_CONTAINERS = 4096


def parse_json(body: bytes) -> Any:
    """The body as JSON: 400 when empty or malformed, 422 naming a NaN/Infinity literal.

    A leading UTF-8 byte order mark is skipped (RFC 8259 §8.1: a parser MAY ignore it); a
    UTF-16 one is refused with a message saying so (JSON on the wire is UTF-8, §8.1). A body
    with more objects and arrays than FREE_CONTAINERS + len(body) / BYTES_PER_CONTAINER (`{`
    and `[` counted as bytes, inside strings too: an overcount only for text no real body
    holds) is refused, 400 `too_many_objects`, before anything is built from it."""
    containers = body.count(b"{") + body.count(b"[")
    allowed = FREE_CONTAINERS + len(body) // BYTES_PER_CONTAINER
    if containers > allowed:
        raise ApiError(
            400,
            "too_many_objects",
            f"{len(body):,} bytes hold {containers:,} JSON objects or arrays (at most "
            f"{allowed:,}: {FREE_CONTAINERS:,} and one per {BYTES_PER_CONTAINER} bytes; a "
            "real invoice row is over 200 bytes)",
            "body",
        )
    if body.startswith(UTF8_BOM):
        body = body[len(UTF8_BOM) :]
    elif body.startswith(UTF16_BOMS):
        raise ApiError(
            400,
            "invalid_json",
            "the body is UTF-16 (it starts with a UTF-16 byte order mark); send JSON as UTF-8",
            "body",
        )
    if not body.strip():
        raise ApiError(400, "invalid_json", "the body is empty; send a JSON object", "body")
    try:
        return pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        error = ApiError(400, "invalid_json", f"malformed JSON: {exc}", "body")
    try:  # only NaN/Infinity literals wrong? then say where
        lenient = pydantic_core.from_json(body, allow_inf_nan=True)
    except ValueError:
        raise error from None
    location = _non_finite(lenient, "")
    if location is None:
        raise error
    raise ApiError(
        422, "invalid_value", "NaN and Infinity are not numbers; send a finite value", location
    )


def _non_finite(value: Any, location: str) -> str | None:
    """Location of the first NaN/Infinity in parsed JSON (depth-first), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return location or "body"
    if isinstance(value, dict):
        items: Iterable[tuple[str, Any]] = (
            (join_location(location, str(k)), v) for k, v in value.items()
        )
    elif isinstance(value, list):
        items = ((f"{location}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for child_location, child in items:
        found = _non_finite(child, child_location)
        if found is not None:
            return found
    return None


def _peer_address(request: Request) -> str | None:
    """The socket peer, as the server saw it (under `ptd serve`, a forwarded address only from a
    proxy named by `--forwarded-allow-ips`); None behind the Functions host, which passes none.
    Never a header the caller writes: rotating `X-Forwarded-For` must not buy a fresh limit."""
    if request.client is not None and request.client.host:
        return request.client.host
    return None


def _parse_keys(entries: tuple[str, ...]) -> list[tuple[str, bytes]]:
    keys = []
    for n, entry in enumerate(entries):
        name, sep, key = entry.partition(":")
        if not sep or not name.strip() or len(key.strip()) < 16:
            raise ConfigError(
                f"setting PTD_API_KEYS entry {n + 1} must be 'name:key' with a key of at least "
                "16 characters"
            )
        keys.append((name.strip(), key.strip().encode()))
    return keys


class RequestContextMiddleware:
    """Outermost: correlation id, one log line per request, security headers, no 500 leaks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        traceparent = headers.get("traceparent")
        trace_context = scope.get("azure_functions.trace_context")
        if not traceparent and trace_context is not None:
            traceparent = getattr(trace_context, "trace_parent", None)
        cid = correlation_from_headers(headers.get("x-correlation-id"), traceparent)
        method = scope.get("method")
        path: str = scope.get("path", "")
        if len(path) > 1 and path.endswith("/"):
            # /api/health/ is /api/health: answered here, never redirected (a redirect would
            # be built from the Host header the caller sent).
            path = path.rstrip("/") or "/"
            raw_path = scope.get("raw_path")
            scope = {**scope, "path": path}
            if isinstance(raw_path, bytes):
                scope["raw_path"] = raw_path.rstrip(b"/") or b"/"
        head = method == "HEAD"
        if head:
            # HEAD is GET without the body (RFC 9110 §9.3.2): the same status and headers,
            # Content-Length included, on every GET route; 405 where GET is 405.
            scope = {**scope, "method": "GET"}
        info: dict[str, Any] = {"caller": None}
        cid_token = correlation_id.set(cid)
        info_token = request_info.set(info)
        state = {"status": 500, "started": False}
        is_docs = path == "/api/docs"

        async def send_with_headers(message: Message) -> None:
            if head and message["type"] == "http.response.body":
                message = {**message, "body": b""}
            if message["type"] == "http.response.start":
                state["started"] = True
                state["status"] = message["status"]
                out = MutableHeaders(scope=message)
                out["x-correlation-id"] = cid
                out.setdefault("x-content-type-options", "nosniff")
                out.setdefault("cache-control", "no-store")
                out.setdefault("x-frame-options", "DENY")
                out.setdefault("referrer-policy", "no-referrer")
                if not is_docs:
                    out.setdefault(
                        "content-security-policy", "default-src 'none'; frame-ancestors 'none'"
                    )
            await send(message)

        try:
            with span(f"{method} {path if path in ROUTES else 'other'}"):
                await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            info["error"] = "internal_error"
            log.error("unhandled %s on %s %s", type(exc).__name__, method, path, exc_info=exc)
            if not state["started"]:
                response = json_response(
                    error_body(
                        "internal_error",
                        f"unexpected error; quote correlation id {cid} when reporting it",
                        None,
                    ),
                    500,
                )
                await response(scope, receive, send_with_headers)
        finally:
            duration_ms = (time.perf_counter() - started) * 1000
            status = int(state["status"])
            route = path if path in ROUTES else "other"
            fields: dict[str, Any] = {
                "event": "request",
                "method": method,
                "path": route,
                "status": status,
                "duration_ms": round(duration_ms, 3),
                "correlation_id": cid,
                **info,
            }
            log_event(request_log, logging.WARNING if status >= 500 else logging.INFO, fields)
            if route in SCORING_ROUTES and method == "POST":
                audit(
                    route.removeprefix("/api/"),
                    caller=info.get("caller") or "unauthenticated",
                    customers=int(info.get("customers") or 0),
                    model_version=info.get("model_version"),
                    outcome="ok" if status < 400 else str(info.get("error") or f"http_{status}"),
                    status=status,
                    model=info.get("model"),
                    failed=info.get("failed"),
                )
            labels = {"path": route, "status": str(status)}
            METRICS.inc("http_requests_total", 1, labels)
            METRICS.observe("http_request_duration_ms", duration_ms, {"path": route})
            request_info.reset(info_token)
            correlation_id.reset(cid_token)


# What Starlette's preflight refusal names, and the request header it refers to.
CORS_REFUSAL_LOCATIONS = {
    "origin": "header.origin",
    "method": "header.access-control-request-method",
    "headers": "header.access-control-request-headers",
    "private-network": "header.access-control-request-private-network",
}


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, with a refused preflight answered like every other error: JSON naming
    the request header that was refused (Starlette answers it in plain text)."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = bytes(response.body).decode("ascii", "replace").removeprefix("Disallowed CORS ")
        first = refused.split(",", 1)[0].strip()
        headers = {
            k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")
        }
        return _error_response(
            ApiError(
                response.status_code,
                "cors_refused",
                f"CORS preflight refused: {refused} not allowed (PTD_CORS_ORIGINS lists the "
                "allowed origins)",
                CORS_REFUSAL_LOCATIONS.get(first, "header.origin"),
                headers=headers,
            )
        )


# --- the app -----------------------------------------------------------------------------------


def _log_auth_mode(settings: Settings, has_keys: bool) -> None:
    """One line at start saying who the app believes, and a warning for each setting that the
    mode makes ineffective: a setting that silently does nothing is a setting misread."""
    if settings.platform_auth:
        log.info(
            "built-in authentication detected: callers are the platform's verified principals%s",
            f"; app roles required: {', '.join(settings.required_roles)}"
            if settings.required_roles
            else "",
        )
        if has_keys:
            log.warning("PTD_API_KEYS is ignored: built-in authentication names the callers")
        return
    if settings.required_roles:
        log.warning(
            "PTD_REQUIRED_ROLES is ignored: built-in authentication is not on for this process "
            "(WEBSITE_AUTH_ENABLED, WEBSITE_SKU=FlexConsumption under the Functions host)"
        )
    if not settings.require_function_key:
        log.warning(
            "PTD_REQUIRE_FUNCTION_KEY=false is ignored: built-in authentication is not on, so "
            "the function key stays required"
        )


def create_app(
    settings: Settings | None = None,
    artifacts_loader: Callable[[], ArtifactSet] | None = None,
    *,
    retry_backoff: tuple[float, float] = (2.0, 60.0),
    admission_wait: float = ADMISSION_WAIT_SECONDS,
) -> FastAPI:
    """The HTTP app. `artifacts_loader` replaces `detector.store.load_artifacts` (tests);
    `admission_wait` is how long, in seconds, a scoring request waits for room in the budget of
    bodies in work (`PTD_MAX_INFLIGHT_BODY_BYTES`) before it is refused with 503."""
    settings = settings or Settings.from_env()
    configure_logging(settings)
    keys = _parse_keys(settings.api_keys)
    budget = BodyBudget(max(settings.max_inflight_body_bytes, settings.max_body_bytes))
    limiter = (
        RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
    )
    # Who calls when the app has no keys of its own: in Azure the host checked a function key.
    keyless_caller = "function-key" if settings.functions_host else "anonymous"
    # Built-in authentication on: the platform's headers name the caller (detector.identity).
    principals = PrincipalReader() if settings.platform_auth else None
    _log_auth_mode(settings, bool(keys))
    required_roles = frozenset(settings.required_roles)
    holder = ModelHolder(artifacts_loader or default_loader(settings), retry_backoff)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with contextlib.suppress(ModelUnavailable):
            await holder.get()  # cold start: load now; a failure is kept and retried later
        # Startup's objects (modules, the app) live as long as the process: freezing them keeps
        # the collector's full passes from rescanning them while a large batch allocates; that
        # rescanning was ~20% of a 10,000-record batch (docs/BENCHMARKS.md).
        gc.freeze()
        yield

    app = FastAPI(
        title="Power theft detection API",
        version=API_VERSION,
        description=(
            "Scores electricity customers for theft from their billing history. "
            'Errors are `{"error": {"code", "message", "location"}}`.'
        ),
        docs_url="/api/docs",
        redoc_url=None,
        redirect_slashes=False,  # RequestContextMiddleware answers /api/health/ itself
        openapi_url="/api/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.model_holder = holder
    _register_drift_gauges(holder)

    async def require_key(request: Request, role: str) -> None:
        """Who calls, or 401/403. With built-in authentication on (Azure, detected from the
        platform's variables): the verified caller in the platform's headers, 401 without one,
        403 without the route's app role when `PTD_REQUIRED_ROLES` lists it. Else the local API
        key's name (`PTD_API_KEYS`), else the caller the host vouched for (`function-key` in
        Azure) or `anonymous` (locally). Then the caller's rate limit (not for a 401)."""
        info = request_info.get()
        if principals is not None:
            verified, why = principals.inspect(request.scope["headers"])
            if verified is None:
                if info is not None:
                    info["auth_failure"] = why  # a fixed phrase: never the header's content
                raise ApiError(
                    401,
                    "unauthorized",
                    f"no verified caller ({why}): send an Entra ID access token for this API "
                    "in Authorization: Bearer",
                    "header.authorization",
                )
            if info is not None:
                info["caller"] = verified.name
            rate_limit(f"caller:{verified.name}")
            if role in required_roles and role not in verified.roles:
                raise ApiError(
                    403,
                    "forbidden",
                    f"caller {verified.name} lacks the app role {role} this route needs; an "
                    "administrator assigns it to the client application "
                    "(docs/DEPLOYMENT_GUIDE.md)",
                    "header.authorization",
                )
            return
        if not keys:
            if info is not None:
                info["caller"] = keyless_caller
            # The socket peer locally; behind the Functions host there is none, and every
            # caller shares one bucket per instance (the host cannot say which key was used).
            peer = _peer_address(request)
            rate_limit(f"address:{peer}" if peer else f"caller:{keyless_caller}")
            return
        supplied = request.headers.get("x-api-key") or request.headers.get("x-functions-key")
        if not supplied:
            raise ApiError(
                401, "unauthorized", "missing API key: send it in x-api-key", "header.x-api-key"
            )
        supplied_bytes = supplied.encode("utf-8", "surrogateescape")
        caller = None
        for name, key in keys:
            if hmac.compare_digest(supplied_bytes, key):
                caller = name
        if caller is None:
            raise ApiError(401, "unauthorized", "invalid API key", "header.x-api-key")
        if info is not None:
            info["caller"] = caller
        rate_limit(f"key:{caller}")

    def rate_limit(bucket: str) -> None:
        if limiter is None:
            return
        wait = limiter.check(bucket)
        if wait > 0:
            METRICS.inc("rate_limited_total")
            raise ApiError(
                429,
                "rate_limited",
                f"more than {settings.rate_limit_per_minute} requests a minute from this caller; "
                "retry after the number of seconds in Retry-After",
                None,
                headers={"retry-after": RateLimiter.retry_after(wait)},
            )

    async def artifacts_or_503() -> ArtifactSet:
        try:
            return await holder.get()
        except ModelUnavailable as exc:
            raise ApiError(
                503,
                "model_unavailable",
                f"model not available: {exc.reason}",
                None,
                headers={"retry-after": str(max(1, math.ceil(exc.retry_after)))},
            ) from None

    async def admit(plan: BodyPlan) -> Reservation:
        """Room for this body among the bodies in work (`BodyBudget`), to release when the
        request is done; 503 `overloaded` with Retry-After when there is none within
        `admission_wait`."""
        try:
            return await budget.acquire(plan.reserve(settings.max_body_bytes), admission_wait)
        except BudgetFull as full:
            METRICS.inc("requests_overloaded_total")
            raise ApiError(
                503,
                "overloaded",
                f"this instance is working on {full.in_use} bytes of request bodies and this one "
                f"may need {full.wanted} (at most {full.capacity} at once); retry after the "
                "number of seconds in Retry-After",
                None,
                headers={"retry-after": str(RETRY_AFTER_OVERLOADED)},
            ) from None

    @asynccontextmanager
    async def json_body(request: Request) -> AsyncIterator[Any]:
        """The request's JSON body, read within the body budget (`admit`): the room stays
        reserved until the block ends, while the body and what is built from it are in memory.
        """
        plan = body_plan(request, settings.max_body_bytes)
        reservation = await admit(plan)
        try:
            raw = await read_body(request, plan, settings.max_body_bytes)
            reservation.shrink(len(raw))  # chunked or encoded: now the size is known
            body = parse_json(raw)
            del raw
            yield body
        finally:
            reservation.release()

    def chosen_model(artifacts: ArtifactSet, request: Request) -> str:
        # Query parsed here, not by FastAPI's dependency machinery: that costs ~0.5 ms a call.
        name = request.query_params.get("model")
        if name is not None and name not in MODEL_NAMES:
            raise ApiError(
                422,
                "invalid_value",
                f"model must be one of {', '.join(MODEL_NAMES)}",
                "query.model",
            )
        chosen = name or artifacts.default_model
        if chosen not in artifacts.models:
            raise ApiError(
                422,
                "unknown_model",
                f"model {chosen!r} is not in this artifact set; available: "
                f"{', '.join(artifacts.model_names)}",
                "query.model",
            )
        return chosen

    @app.get(
        "/api/health",
        tags=["service"],
        responses={503: _error_ref("the model is not available (body: status, reason, error)")},
    )
    async def health() -> Response:
        try:
            artifacts = await holder.get()
        except ModelUnavailable as exc:
            info = request_info.get()
            if info is not None:
                info["error"] = "model_unavailable"
            return json_response(
                {
                    "status": "unhealthy",
                    "reason": exc.reason,
                    "error": error_body("model_unavailable", exc.reason, None)["error"],
                },
                503,
                {"retry-after": str(max(1, math.ceil(exc.retry_after)))},
            )
        return json_response(
            {
                "status": "ok",
                "model_version": artifacts.version,
                "models": list(artifacts.model_names),
                "default_model": artifacts.default_model,
            }
        )

    @app.get(
        "/api/metrics",
        tags=["service"],
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            401: _error_ref(UNAUTHORIZED_DESCRIPTION),
            403: _error_ref(FORBIDDEN_DESCRIPTION),
            429: _error_ref("over the per-caller rate limit"),
        },
    )
    async def metrics(request: Request) -> Response:
        await require_key(request, MODELS_READ)
        return Response(prometheus_text(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/api/model_info", tags=["model"], responses=_PROTECTED_GET)
    async def model_info(request: Request) -> Response:
        await require_key(request, MODELS_READ)
        artifacts = await artifacts_or_503()
        manifest = artifacts.manifest
        results = artifacts.training_results
        models = {}
        for name, card in artifacts.cards.items():
            entry = dict(results.get("models", {}).get(name, {}))
            models[name] = {
                "kind": card.kind,
                "contributions": card.contributions,
                "training_views": entry.get("training_views"),
                "threshold": card.threshold,
                "threshold_method": card.threshold_method,
                "risk_cutoffs": dict(
                    zip(("elevated", "high", "critical"), card.risk_cutoffs, strict=True)
                ),
                "params": entry.get("params"),
                "metrics": {
                    "holdout": entry.get("holdout"),
                    "cross_validation": entry.get("cross_validation"),
                },
            }
        return json_response(
            {
                "model_version": artifacts.version,
                "trained_at": results.get("trained_at") or manifest.get("created_at"),
                "default_model": artifacts.default_model,
                "available_models": list(artifacts.model_names),
                "models": models,
                "libraries": manifest.get("libraries", {}),
                "training_data": results.get("data"),
                "split": results.get("split"),
                "feature_names": list(FEATURE_NAMES),
            }
        )

    @app.get("/api/features", tags=["model"], responses=_PROTECTED_GET)
    async def features(request: Request) -> Response:
        await require_key(request, MODELS_READ)
        from detector.schema import CLIENT_SCHEMA, INVOICE_SCHEMA, REQUIRED_INVOICE_COLUMNS

        return json_response(
            {
                "features": [
                    {
                        "name": s.name,
                        "description": s.description,
                        "unit": s.unit,
                        "min": s.min,
                        "max": s.max,
                        "source": s.source,
                        "kind": s.kind,
                        "required": s.required,
                    }
                    for s in FEATURES
                ],
                "invoice_schema": {
                    name: {**spec, "required": name in REQUIRED_INVOICE_COLUMNS}
                    for name, spec in INVOICE_SCHEMA.items()
                },
                "client_schema": CLIENT_SCHEMA,
                "limits": {
                    "max_batch_records": settings.max_batch_records,
                    "max_invoices_per_customer": settings.max_invoices_per_customer,
                    "max_body_bytes": settings.max_body_bytes,
                },
            }
        )

    def _body_schema(name: str) -> dict[str, Any]:
        return {
            "parameters": [
                {
                    "name": "model",
                    "in": "query",
                    "required": False,
                    "description": "the model to score with; default: the artifact set's default",
                    "schema": {"type": "string", "enum": list(MODEL_NAMES)},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}
                },
            },
            "responses": {
                "400": _error_ref(
                    "malformed JSON, or a body that is not what its Content-Encoding says"
                ),
                "401": _error_ref(UNAUTHORIZED_DESCRIPTION),
                "403": _error_ref(FORBIDDEN_DESCRIPTION),
                "413": _error_ref("body (decoded), batch or history over its limit"),
                "415": _error_ref(
                    "the body is not application/json, or its content coding is not gzip, "
                    "deflate or identity"
                ),
                "422": _error_ref("invalid input; location names the field"),
                "429": _error_ref("over the per-caller rate limit; see Retry-After"),
                "503": _error_ref(
                    "the model is not available, or the instance is busy with other large "
                    "bodies (overloaded); see Retry-After"
                ),
            },
        }

    @app.post(
        "/api/predict",
        tags=["scoring"],
        openapi_extra=_body_schema("PredictRequest"),
        responses={200: {"content": {"application/json": {"schema": _ref("Prediction")}}}},
    )
    async def predict(request: Request) -> Response:
        await require_key(request, SCORES_READ)
        artifacts = await artifacts_or_503()
        name = chosen_model(artifacts, request)
        async with json_body(request) as body:
            outcome = score_records([body], artifacts, name, settings, lambda i: "")
        info = request_info.get()
        if info is not None:
            info.update(customers=1, model=name, model_version=artifacts.version)
        item = outcome.items[0]
        if isinstance(item, RecordError):
            status = 413 if item.code == "too_many_invoices" else 422
            if item.code == "invalid_type":
                item.location = "body"
            raise ApiError(
                status,
                item.code,
                item.message,
                item.location,
                item.details if len(item.details) > 1 else None,
            )
        return json_response(item)

    @app.post(
        "/api/predict_batch",
        tags=["scoring"],
        openapi_extra=_body_schema("BatchRequest"),
        responses={200: {"content": {"application/json": {"schema": _ref("BatchResponse")}}}},
    )
    async def predict_batch(request: Request) -> Response:
        await require_key(request, SCORES_READ)
        artifacts = await artifacts_or_503()
        name = chosen_model(artifacts, request)
        async with json_body(request) as body:
            return await score_batch(body, artifacts, name)

    async def score_batch(body: Any, artifacts: ArtifactSet, name: str) -> Response:
        if not isinstance(body, dict):
            raise ApiError(422, "invalid_type", 'the body must be {"records": [...]}', "body")
        unknown = sorted(set(body) - {"records"})
        if unknown:
            raise ApiError(422, "unknown_field", f"unknown field {unknown[0]!r}", unknown[0])
        records = body.get("records")
        if not isinstance(records, list):
            raise ApiError(
                422,
                "missing_field" if records is None else "invalid_type",
                "records must be a list of predict bodies",
                "records",
            )
        if len(records) > settings.max_batch_records:
            raise ApiError(
                413,
                "batch_too_large",
                f"{len(records)} records; the limit is {settings.max_batch_records}",
                "records",
            )
        info = request_info.get()
        if info is not None:
            info.update(customers=len(records), model=name, model_version=artifacts.version)

        def run() -> bytes:
            outcome = score_records(records, artifacts, name, settings, lambda i: f"records[{i}]")
            results: list[dict[str, Any]] = []
            for i, item in enumerate(outcome.items):
                if isinstance(item, RecordError):
                    raw = records[i]
                    cid = raw.get("customer_id") if isinstance(raw, dict) else None
                    results.append(
                        {
                            "index": i,
                            "customer_id": cid if isinstance(cid, str) else None,
                            "error": item.body(),
                        }
                    )
                else:
                    results.append({"index": i, **item})
            failed = len(records) - outcome.scored
            METRICS.inc("batch_records_rejected_total", failed, {"source": "api"})
            if info is not None:
                info.update(failed=failed)
            return pydantic_core.to_json(
                {
                    "results": results,
                    "model": name,
                    "model_version": artifacts.version,
                    "scored": outcome.scored,
                    "failed": failed,
                }
            )

        if len(records) > THREAD_THRESHOLD:
            import anyio.to_thread

            content = await anyio.to_thread.run_sync(run)
        else:
            content = run()
        return Response(content, media_type="application/json")

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)  # type narrowing  # nosec B101
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)  # type narrowing  # nosec B101
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(
            ApiError(
                exc.status_code,
                code,
                str(exc.detail),
                "path",
                headers=dict(exc.headers) if exc.headers else None,
            )
        )

    async def validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # type narrowing  # nosec B101
        errors = list(exc.errors())
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        location = format_location(first.get("loc", ()))
        return _error_response(ApiError(422, "invalid_value", str(first.get("msg")), location))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)

    if settings.cors_origins:
        app.add_middleware(
            JsonCORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=[
                "authorization",
                "content-type",
                "x-api-key",
                "x-functions-key",
                "x-correlation-id",
                "traceparent",
            ],
            expose_headers=["x-correlation-id"],
            max_age=600,
        )
    app.add_middleware(RequestContextMiddleware)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, adapter in _SCHEMA_TYPES.items():
            generated = TypeAdapter(adapter).json_schema(
                ref_template="#/components/schemas/{model}"
            )
            components.update(generated.pop("$defs", {}))
            components[name] = generated
        components["BatchRequest"]["properties"]["records"]["maxItems"] = settings.max_batch_records
        scheme: dict[str, Any] | None = None
        if settings.platform_auth:
            scheme = {"EntraId": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
        elif keys:
            scheme = {"ApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}}
        if scheme is not None:
            schema["components"]["securitySchemes"] = scheme
            for path, item in schema["paths"].items():
                if path not in OPEN_ROUTES:
                    for operation in item.values():
                        operation["security"] = [{name: []} for name in scheme]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


_SCHEMA_TYPES: dict[str, Any] = {
    "PredictRequest": PredictRequest,
    "BatchRequest": BatchRequest,
    "Prediction": Prediction,
    "BatchResponse": BatchResponse,
    "ErrorResponse": ErrorResponse,
}


UNAUTHORIZED_DESCRIPTION = (
    "missing or invalid API key, or (built-in authentication on) no verified caller"
)
FORBIDDEN_DESCRIPTION = "the verified caller lacks the app role of the route (PTD_REQUIRED_ROLES)"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error_ref(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("ErrorResponse")}},
    }


_PROTECTED_GET: dict[int | str, dict[str, Any]] = {
    401: _error_ref(UNAUTHORIZED_DESCRIPTION),
    403: _error_ref(FORBIDDEN_DESCRIPTION),
    429: _error_ref("over the per-caller rate limit; see Retry-After"),
    503: _error_ref("the model is not available"),
}


__all__ = ["ApiError", "ModelHolder", "create_app"]
