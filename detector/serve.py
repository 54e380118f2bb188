"""`ptd serve`: the app under uvicorn (one process), with a bound on the size of request heads.

uvicorn's httptools protocol puts no limit on a request line and its headers, and httptools
builds each header by concatenating the pieces as they arrive: one 80 MB header took seconds of
CPU on the event loop, during which every other request waited. `BoundedHttpToolsProtocol`
counts the bytes of each request head as they are received and, past `max_header_bytes`
(uvicorn's `h11_max_incomplete_event_size`, the same limit its h11 protocol applies), answers
431 Request Header Fields Too Large (RFC 6585 §5) with the API's JSON error and closes the
connection, having parsed at most the limit. Without httptools, uvicorn's h11 protocol applies
the same limit itself (and answers 431 in plain text).

The limit is checked once per received chunk, which costs a comparison per read (measured: no
change of /api/predict's latency, docs/OPERATIONS.md). Only the head of a request is counted,
never its body. Azure does not run this: there the Functions host (Kestrel) bounds headers.

Forwarded headers: uvicorn by default believes `X-Forwarded-For` from 127.0.0.1 (its
`forwarded_allow_ips`), so any local caller could name itself another address and get a fresh
rate-limit allowance per request. `ptd serve` believes them only from the proxies given with
`--forwarded-allow-ips` (a real reverse proxy's address); otherwise the caller's address is the
socket peer. It never trusts the platform's identity headers (`X-MS-CLIENT-PRINCIPAL*`): there is
no platform in front of it (`app_factory`).
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from detector.telemetry import METRICS, REQUEST_LOGGER, correlation_from_headers, log_event

if TYPE_CHECKING:
    import asyncio

# 64 KiB: twice Kestrel's default for all headers (32 KiB, the Functions host's limit), eight
# times nginx's default buffer for a header line (8 KiB); a request with cookies and a bearer
# token is a few KiB.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
log = logging.getLogger(REQUEST_LOGGER)


def refusal(limit: int, default_headers: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """The 431 response, in the API's error format, closing the connection."""
    cid = correlation_from_headers(None, None)
    body = json.dumps(
        {
            "error": {
                "code": "header_too_large",
                "message": f"the request line and headers exceed {limit} bytes",
                "location": "header",
            }
        },
        separators=(",", ":"),
    ).encode()
    lines = [b"HTTP/1.1 431 Request Header Fields Too Large"]
    lines += [name + b": " + value for name, value in default_headers or []]
    lines += [
        b"content-type: application/json",
        b"content-length: " + str(len(body)).encode(),
        b"connection: close",
        b"x-correlation-id: " + cid.encode(),
        b"x-content-type-options: nosniff",
        b"cache-control: no-store",
    ]
    log_event(
        log,
        logging.INFO,
        {
            "event": "request",
            "method": None,
            "path": "other",
            "status": 431,
            "correlation_id": cid,
            "error": "header_too_large",
        },
    )
    METRICS.inc("http_requests_total", 1, {"path": "other", "status": "431"})
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def bounded_protocol() -> type[asyncio.Protocol] | None:
    """uvicorn's httptools protocol with the head limit, or None when httptools is absent."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is in requirements-dev.txt
        return None

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        """HttpToolsProtocol that refuses a request head over `max_header_bytes` with 431.

        Bytes count from the end of a request (or the start of the connection) until the
        parser reports the end of the next head. A chunk that would take the count over the
        limit is fed only up to the limit first: past it, unless that completed the head, the
        request is refused; so at most the limit of a head is ever parsed. The chunk in which
        a pipelined request ends is not counted (where the next head starts in it is unknown):
        a pipelined head gets up to one socket read (256 KiB) more."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.max_header_bytes = (
                self.config.h11_max_incomplete_event_size or DEFAULT_MAX_HEADER_BYTES
            )
            self._head_bytes = 0
            self._in_head = True
            self._messages = 0
            self._refused = False

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True
            self._messages += 1

        def data_received(self, data: bytes) -> None:
            if self._in_head and self._head_bytes + len(data) > self.max_header_bytes:
                self._over_limit(data)
                return
            self._feed(data)

        def _feed(self, data: bytes) -> None:
            in_head, messages = self._in_head, self._messages
            super().data_received(data)
            if in_head and self._in_head and self._messages == messages:
                self._head_bytes += len(data)

        def _over_limit(self, data: bytes) -> None:
            """Feed `data` while the head stays within the limit; refuse it past the limit."""
            while (
                not self._refused
                and self._in_head
                and self._head_bytes + len(data) > self.max_header_bytes
            ):
                allowed = self.max_header_bytes - self._head_bytes
                messages = self._messages
                self._feed(data[:allowed])
                if self.transport.is_closing():  # a parse error was answered with 400
                    return
                if self._in_head and self._messages == messages:
                    self._refuse()
                data = data[allowed:]
            if data and not self._refused:
                self._feed(data)

        def _refuse(self) -> None:
            self._refused = True
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(
                    refusal(self.max_header_bytes, self.server_state.default_headers)
                )
            self.transport.close()

    return BoundedHttpToolsProtocol


def app_factory() -> Any:
    """`detector.api:create_app` from the environment's settings, outside the Functions host
    whatever the environment says (a shell may carry FUNCTIONS_WORKER_RUNTIME from
    local.settings.json): logs on stderr, keyless callers `anonymous`, and the platform's
    identity headers never trusted (nothing strips caller-sent copies)."""
    import dataclasses

    from detector.api import create_app
    from detector.config import Settings

    return create_app(
        dataclasses.replace(Settings.from_env(), platform_auth=False, functions_host=False)
    )


def run(
    host: str,
    port: int,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    forwarded_allow_ips: str = "",
) -> None:
    """Serve `app_factory()` until interrupted. `forwarded_allow_ips`: comma-separated addresses
    or networks of the proxies whose `X-Forwarded-For`/`-Proto` are believed (uvicorn's option);
    empty: none, whatever the environment's `FORWARDED_ALLOW_IPS` says."""
    import uvicorn

    protocol = bounded_protocol()
    trusted = [item.strip() for item in forwarded_allow_ips.split(",") if item.strip()]
    uvicorn.run(
        "detector.serve:app_factory",
        factory=True,
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or [],
        host=host,
        port=port,
        log_level="warning",
        access_log=False,  # the app logs one structured line per request itself
        http=protocol or "h11",
        h11_max_incomplete_event_size=max_header_bytes,
    )
