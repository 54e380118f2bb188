"""`ptd serve` bounds request heads (issue 13, class 9): a real server on 127.0.0.1, raw
sockets. An oversized head is refused with 431 and the API's JSON error as soon as the limit is
passed, while other connections keep being served; heads within the limit, and bodies of any
size up to the body limit, are not affected."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from benchmarks.memory import ptd_serve
from detector.cli import main
from detector.serve import DEFAULT_MAX_HEADER_BYTES
from tests.test_api import FEATURES_BODY


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with ptd_serve() as (port, _):
        yield port


def exchange(port: int, head: bytes, body: bytes = b"", chunk: int = 0) -> tuple[int, bytes]:
    """Send a request (the head in pieces of `chunk` bytes if given); status and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        data = head + body
        try:
            if chunk:
                for start in range(0, len(data), chunk):
                    sock.sendall(data[start : start + chunk])
            else:
                sock.sendall(data)
        except OSError:  # the server closed the connection while we were still sending
            pass
        return read_response(sock)


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
        head, _, rest = received.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            rest += piece
    except ConnectionResetError:
        head, _, rest = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, rest


def get(path: str, extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra + b"\r\n"


def test_an_oversized_header_is_refused_at_once_while_others_are_served(port: int) -> None:
    latencies: list[float] = []
    statuses: list[int] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            status, _ = exchange(port, get("/api/health"))
            latencies.append(time.perf_counter() - started)
            statuses.append(status)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.1)
        started = time.perf_counter()
        huge = get("/api/health", b"x-big: " + b"a" * (40 * 1024 * 1024) + b"\r\n")
        status, body = exchange(port, huge, chunk=1 << 20)
        refused_in = time.perf_counter() - started
        time.sleep(0.1)
    finally:
        stop.set()
        prober.join()
    assert status == 431
    error = json.loads(body)["error"]
    assert error == {
        "code": "header_too_large",
        "message": f"the request line and headers exceed {DEFAULT_MAX_HEADER_BYTES} bytes",
        "location": "header",
    }
    assert refused_in < 2.0
    assert statuses and set(statuses) == {200}
    assert max(latencies) < 0.5, max(latencies)


def test_a_head_sent_in_small_pieces_is_counted_across_them(port: int) -> None:
    huge = get("/api/health", b"x-big: " + b"a" * (2 * DEFAULT_MAX_HEADER_BYTES) + b"\r\n")
    assert exchange(port, huge, chunk=1000)[0] == 431


def test_many_small_headers_count_too(port: int) -> None:
    headers = b"".join(f"x-h{i}: {i}\r\n".encode() for i in range(10_000))
    assert len(headers) > DEFAULT_MAX_HEADER_BYTES
    assert exchange(port, get("/api/health", headers))[0] == 431


def test_a_long_url_counts_too(port: int) -> None:
    path = "/api/health?q=" + "a" * DEFAULT_MAX_HEADER_BYTES
    assert exchange(port, get(path))[0] == 431


def test_heads_within_the_limit_and_large_bodies_are_served(port: int) -> None:
    big_header = b"x-fine: " + b"a" * (DEFAULT_MAX_HEADER_BYTES - 2048) + b"\r\n"
    assert exchange(port, get("/api/health", big_header))[0] == 200
    records = [{"customer_id": str(i), "features": FEATURES_BODY} for i in range(400)]
    body = json.dumps({"records": records}).encode()
    assert len(body) > 4 * DEFAULT_MAX_HEADER_BYTES
    head = (
        "POST /api/predict_batch HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    status, answer = exchange(port, head, body)
    assert status == 200 and json.loads(answer)["scored"] == 400


def test_the_count_starts_again_for_each_request_of_a_connection(port: int) -> None:
    """Keep-alive: heads of a few kB each, many of them on one connection, never add up."""
    header = b"x-pad: " + b"a" * 8000 + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        for _ in range(3 * DEFAULT_MAX_HEADER_BYTES // 8000):
            sock.sendall(get("/api/health", header))
            assert read_response(sock)[0] == 200
        sock.sendall(get("/api/health", b"x-big: " + b"a" * DEFAULT_MAX_HEADER_BYTES + b"\r\n"))
        assert read_response(sock)[0] == 431


def test_the_limit_is_an_option_of_ptd_serve() -> None:
    with ptd_serve(args=("--max-header-bytes", "4096")) as (port, _):
        fine = b"x-a: " + b"a" * 3000 + b"\r\n"
        assert exchange(port, get("/api/health", fine))[0] == 200
        over = b"x-a: " + b"a" * 5000 + b"\r\n"
        assert exchange(port, get("/api/health", over))[0] == 431
    with pytest.raises(SystemExit):
        main(["serve", "--max-header-bytes", "ten"])
    assert main(["serve", "--max-header-bytes", "100"]) == 2


# --- issue 17: no caller-controlled header decides the limit -------------------------------------


def _features_with(port: int, forwarded: str, principal: str = "") -> int:
    extra = f"x-forwarded-for: {forwarded}\r\n".encode()
    if principal:
        extra += f"x-ms-client-principal: {principal}\r\n".encode()
    return exchange(port, get("/api/features", extra))[0]


def test_rotating_x_forwarded_for_over_loopback_does_not_reset_the_limit() -> None:
    from detector.identity import encode_principal

    # uvicorn alone would believe X-Forwarded-For from 127.0.0.1 (FORWARDED_ALLOW_IPS default),
    # and even set in the environment it is not believed without --forwarded-allow-ips; nor is
    # a platform principal (no platform in front of ptd serve), whatever the environment says.
    env = {
        "PTD_RATE_LIMIT_PER_MINUTE": "2",
        "FORWARDED_ALLOW_IPS": "*",
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "WEBSITE_SKU": "FlexConsumption",
        "WEBSITE_AUTH_ENABLED": "true",
    }
    principal = encode_principal([("appid", "forged-app")])
    with ptd_serve(env=env) as (port, _):
        # Without a principal: 401 if the platform's headers were believed, 200 if not.
        plain = _features_with(port, "203.0.113.250")
        # A fresh address each time: 200s all along if X-Forwarded-For named the client; a
        # bucket of the forged app's own if the principal did (a 200 after the plain one).
        forged = [_features_with(port, f"203.0.113.{i}", principal) for i in range(2)]
    assert [plain, *forged] == [200, 200, 429]


def test_a_named_proxy_is_believed() -> None:
    with ptd_serve(
        env={"PTD_RATE_LIMIT_PER_MINUTE": "1"}, args=("--forwarded-allow-ips", "127.0.0.1")
    ) as (port, _):
        # Behind a real proxy each client has its own address, so its own bucket.
        assert [_features_with(port, f"203.0.113.{i}") for i in range(3)] == [200, 200, 200]
        assert _features_with(port, "203.0.113.0") == 429


def test_ptd_serve_is_never_the_functions_host(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A shell may carry the Functions variables (copied from local.settings.json): `ptd serve`
    still names keyless callers `anonymous` (no host checked a function key) and trusts no
    platform principal."""
    from fastapi.testclient import TestClient

    from detector import serve

    for name, value in {
        "FUNCTIONS_WORKER_RUNTIME": "python",
        "WEBSITE_SKU": "FlexConsumption",
        "WEBSITE_AUTH_ENABLED": "true",
        "PTD_MODEL_SOURCE": "local",
    }.items():
        monkeypatch.setenv(name, value)
    app = serve.app_factory()
    assert not app.state.settings.functions_host and not app.state.settings.platform_auth
    with TestClient(app) as client, caplog.at_level(logging.INFO, logger="detector"):
        body = {"customer_id": "serve-1", "features": FEATURES_BODY}
        assert client.post("/api/predict", json=body).status_code == 200
    audits = [r.fields for r in caplog.records if r.name == "detector.audit"]
    assert [a["caller"] for a in audits] == ["anonymous"]
