"""What reading the verified caller costs a request (issue 17): `python -m benchmarks.identity`.

Three measurements, each a median of interleaved runs (`measure_interleaved`):

* the reader alone, on the headers Easy Auth sets for a client-credentials token: a header value
  already seen (the cache: one client sends the same token for up to an hour) and a new one
  (base64 + JSON decode of the claims);
* `POST /api/predict` in process (the ASGI app called directly, no socket, the bundled model),
  with built-in authentication off and on, the same body; the difference is the request-path
  cost of the identity check (reader, role check, log field).

Prints one JSON object (`predict_ratio_p50`: auth on / auth off); asserts nothing about time.
Not part of `make bench` (docs/BENCHMARKS.md): the figures are in docs/OPERATIONS.md, "Callers".
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import platform
from typing import Any

from benchmarks.common import feature_rows, features_body, measure_interleaved
from detector.api import create_app
from detector.config import BUNDLED_MODEL_DIR, Settings
from detector.identity import KNOWN_ROLES, SCORES_READ, PrincipalReader, encode_principal
from detector.model import ArtifactSet

APP_ID = "3f1c2b7e-6a4d-4c1e-9b2a-0d5e8f7a6c11"


def principal_headers(app_id: str) -> list[tuple[bytes, bytes]]:
    claims = [
        ("aud", "api://5f0c0b5e-0000-4000-8000-000000000001"),
        ("iss", "https://sts.windows.net/72f988bf-0000-4000-8000-000000000000/"),
        ("appid", app_id),
        ("appidacr", "1"),
        ("oid", "9d2e0c4b-0000-4000-8000-000000000002"),
        ("sub", "9d2e0c4b-0000-4000-8000-000000000002"),
        ("tid", "72f988bf-0000-4000-8000-000000000000"),
        ("idtyp", "app"),
        ("roles", SCORES_READ),
    ]
    return [
        (b"x-ms-client-principal", encode_principal(claims).encode()),
        (b"x-ms-client-principal-id", b"9d2e0c4b-0000-4000-8000-000000000002"),
        (b"x-ms-client-principal-idp", b"aad"),
    ]


class Driver:
    """Calls an ASGI app with one request and collects the status."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()

    def call(self, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/api/predict",
            "raw_path": b"/api/predict",
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 7071),
        }
        sent = {"status": 0}

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]

        self.loop.run_until_complete(self.app(scope, receive, send))
        return sent["status"]


def measure(reader_runs: int = 20_000, predict_runs: int = 3000) -> dict[str, Any]:
    """The figures, as `main` prints them: the defaults are the documented run, small counts
    the smoke test (tests/test_benchmarks_smoke.py)."""
    import logging

    logging.getLogger("detector").setLevel(logging.WARNING)  # logging is not what is measured
    reader = PrincipalReader()
    seen = principal_headers(APP_ID)
    reader.caller(seen)
    warmup = min(200, reader_runs)
    fresh = [
        principal_headers(f"{n:08d}-0000-4000-8000-000000000000")
        for n in range(reader_runs + warmup)
    ]
    reader_stats = measure_interleaved(
        {
            "cached": lambda k: reader.caller(seen),
            "new token": lambda k: PrincipalReader().caller(fresh[k]),
        },
        runs=reader_runs,
        warmup=warmup,
    )
    artifacts = ArtifactSet(BUNDLED_MODEL_DIR)
    base = Settings(log_level="WARNING")
    apps = {
        "auth off": Driver(create_app(base, lambda: artifacts)),
        "auth on": Driver(
            create_app(
                dataclasses.replace(base, platform_auth=True, required_roles=KNOWN_ROLES),
                lambda: artifacts,
            )
        ),
    }
    rows, _ = feature_rows(1, None)
    body = json.dumps(features_body(rows[0], "bench-1")).encode()
    for name, driver in apps.items():
        status = driver.call(seen if name == "auth on" else [], body)
        assert status == 200, (name, status)
    predict_stats = measure_interleaved(
        {
            "auth off": lambda k: apps["auth off"].call([], body),
            "auth on": lambda k: apps["auth on"].call(seen, body),
        },
        runs=predict_runs,
        warmup=min(200, predict_runs),
    )
    for driver in apps.values():
        driver.loop.close()
    us = 1e6
    off, on = predict_stats["auth off"], predict_stats["auth on"]
    return {
        "python": platform.python_version(),
        "reader_us": {k: round(v.p50 * us, 2) for k, v in reader_stats.items()},
        "predict_in_process_us": {
            k: {"p50": round(v.p50 * us, 1), "p99": round(v.p99 * us, 1)}
            for k, v in predict_stats.items()
        },
        "predict_overhead_us_p50": round((on.p50 - off.p50) * us, 1),
        "predict_ratio_p50": round(on.p50 / off.p50, 3),
    }


def main() -> None:
    print(json.dumps(measure(), indent=2))


if __name__ == "__main__":
    main()
