"""Issue 13, class 9 on the API side: HEAD on every GET route, a trailing slash answered (never
redirected to the caller's Host), a UTF-8 BOM skipped, gzip and deflate bodies decoded within the
size limit (bombs stop at the limit), unsupported codings refused with 415, a refused CORS
preflight answered in JSON. Every input is generated here; each test asserts the status, the
error code and its location."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from detector.model import ArtifactSet
from tests.test_api import FEATURES_BODY, assert_error, post

JSON = {"content-type": "application/json"}


# --- class 9: HEAD -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/health",
        "/api/model_info",
        "/api/features",
        "/api/metrics",
        "/api/openapi.json",
        "/api/docs",
    ],
)
def test_head_answers_like_get_without_a_body(client: TestClient, path: str) -> None:
    get = client.get(path)
    head = client.head(path)
    assert get.status_code == head.status_code == 200
    assert head.content == b""
    if path != "/api/metrics":  # the metrics count the GET itself: the next body is longer
        assert head.headers["content-length"] == str(len(get.content))
    assert int(head.headers["content-length"]) > 0
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["x-content-type-options"] == "nosniff"


def test_head_where_get_is_refused(make_client: Callable[..., TestClient]) -> None:
    client = make_client(api_keys=("ops:" + "k" * 20,))
    assert client.head("/api/health").status_code == 200  # open for probes
    denied = client.head("/api/model_info")
    assert denied.status_code == 401 and denied.content == b""
    assert client.head("/api/predict").status_code == 405
    assert client.head("/api/nowhere").status_code == 404


def test_head_on_health_when_the_model_is_unavailable(
    make_client: Callable[..., TestClient],
) -> None:
    def broken() -> ArtifactSet:
        raise OSError("storage unreachable")

    head = make_client(loader=broken).head("/api/health")
    assert head.status_code == 503 and head.content == b""
    assert int(head.headers["retry-after"]) >= 1


# --- class 9: trailing slash ---------------------------------------------------------------------


def test_a_trailing_slash_is_answered_not_redirected(client: TestClient) -> None:
    plain = client.get("/api/health")
    for path in ("/api/health/", "/api/health//"):
        response = client.get(path, headers={"host": "evil.example"}, follow_redirects=False)
        assert response.status_code == 200
        assert "location" not in response.headers
        assert response.json() == plain.json()
    scored = post(client, "/api/predict/", {"customer_id": "c", "features": FEATURES_BODY})
    assert scored.status_code == 200
    missing = client.get("/api/nowhere/", headers={"host": "evil.example"}, follow_redirects=False)
    assert_error(missing, 404, "path", "not_found")
    assert "location" not in missing.headers


# --- class 9: the body: BOM and content codings --------------------------------------------------


@pytest.fixture(scope="module")
def predict_body() -> bytes:
    return json.dumps({"customer_id": "c-bom", "features": FEATURES_BODY}).encode()


def test_a_utf8_bom_is_skipped(client: TestClient, predict_body: bytes) -> None:
    plain = client.post("/api/predict", content=predict_body, headers=JSON).json()
    bom = client.post("/api/predict", content=b"\xef\xbb\xbf" + predict_body, headers=JSON)
    assert bom.status_code == 200 and bom.json() == plain
    batch = b'\xef\xbb\xbf{"records": [' + predict_body + b"]}"
    response = client.post("/api/predict_batch", content=batch, headers=JSON)
    assert response.json()["results"][0]["theft_probability"] == plain["theft_probability"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_utf16_is_refused_saying_so(client: TestClient, predict_body: bytes, encoding: str) -> None:
    text = predict_body.decode()
    data = text.encode(encoding) if encoding == "utf-16" else b"\xfe\xff" + text.encode(encoding)
    response = client.post("/api/predict", content=data, headers=JSON)
    assert_error(response, 400, "body", "invalid_json")
    assert "UTF-16" in response.json()["error"]["message"]


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


CODED: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("gzip", gzip.compress),
    ("GZIP", gzip.compress),
    ("x-gzip", gzip.compress),
    ("gzip, identity", gzip.compress),
    ("identity", lambda b: b),
    ("deflate", zlib.compress),
    ("deflate", _raw_deflate),
    ("gzip", lambda b: gzip.compress(b[:50]) + gzip.compress(b[50:])),  # two members
]


@pytest.mark.parametrize(("coding", "encode"), CODED)
def test_encoded_bodies_are_decoded(
    client: TestClient, predict_body: bytes, coding: str, encode: Callable[[bytes], bytes]
) -> None:
    plain = client.post("/api/predict", content=predict_body, headers=JSON).json()
    response = client.post(
        "/api/predict",
        content=encode(predict_body),
        headers={**JSON, "content-encoding": coding},
    )
    assert response.status_code == 200, response.text
    assert response.json() == plain


def test_an_encoded_body_may_be_streamed(client: TestClient, predict_body: bytes) -> None:
    data = gzip.compress(predict_body)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), 7):
            yield data[start : start + 7]

    response = client.post(
        "/api/predict", content=chunks(), headers={**JSON, "content-encoding": "gzip"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 200, response.text


def test_the_decoded_size_counts_against_the_limit(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(max_body_bytes=10_000)
    records = [{"customer_id": str(i), "features": FEATURES_BODY} for i in range(12)]
    data = json.dumps({"records": records}).encode()
    assert len(data) > 10_000 and len(gzip.compress(data)) < 10_000
    response = client.post(
        "/api/predict_batch",
        content=gzip.compress(data),
        headers={**JSON, "content-encoding": "gzip"},
    )
    assert_error(response, 413, "body", "body_too_large")
    assert "decoded" in response.json()["error"]["message"]
    fits = json.dumps({"records": records[:2]}).encode()
    response = client.post(
        "/api/predict_batch",
        content=gzip.compress(fits),
        headers={**JSON, "content-encoding": "gzip"},
    )
    assert response.status_code == 200


def test_a_gzip_bomb_stops_at_the_limit(make_client: Callable[..., TestClient]) -> None:
    """1 GB of zeros in ~1 MB of gzip: refused after inflating the limit, not the gigabyte."""
    client = make_client(max_body_bytes=1_000_000)
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    bomb = b"".join(packer.compress(block) for _ in range(1024)) + packer.flush()
    assert len(bomb) < 1_100_000
    started = time.perf_counter()
    response = client.post(
        "/api/predict", content=bomb, headers={**JSON, "content-encoding": "gzip"}
    )
    assert time.perf_counter() - started < 2.0
    assert_error(response, 413, "body", "body_too_large")


@pytest.mark.parametrize(
    ("coding", "data"),
    [
        ("gzip", b"this is not gzip at all"),
        # mtime=0: the header's time would make this id differ between pytest-xdist workers
        ("gzip", gzip.compress(b'{"customer_id": "c"}', mtime=0)[:-6]),  # truncated
        ("deflate", b"\x78\x9c garbage"),
        ("deflate", zlib.compress(b"{}") + b"trailing"),
    ],
    ids=["not-gzip", "truncated-gzip", "not-deflate", "deflate-trailing-bytes"],
)
def test_a_body_that_is_not_what_its_coding_says_is_400(
    client: TestClient, coding: str, data: bytes
) -> None:
    response = client.post(
        "/api/predict", content=data, headers={**JSON, "content-encoding": coding}
    )
    assert_error(response, 400, "body", "invalid_encoding")
    assert "malformed JSON" not in response.text


@pytest.mark.parametrize("coding", ["br", "zstd", "compress", "gzip, br", "gzip, gzip", "x" * 500])
def test_an_unsupported_coding_is_415(client: TestClient, predict_body: bytes, coding: str) -> None:
    response = client.post(
        "/api/predict", content=predict_body, headers={**JSON, "content-encoding": coding}
    )
    assert_error(response, 415, "header.content-encoding", "unsupported_encoding")
    assert response.headers["accept-encoding"] == "gzip, deflate"
    assert len(response.json()["error"]["message"]) < 200


# --- class 9: CORS -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "location"),
    [
        ({"origin": "https://evil.example"}, "header.origin"),
        ({"access-control-request-method": "DELETE"}, "header.access-control-request-method"),
        ({"access-control-request-headers": "x-evil"}, "header.access-control-request-headers"),
    ],
)
def test_a_refused_preflight_is_json(
    make_client: Callable[..., TestClient], headers: dict[str, str], location: str
) -> None:
    client = make_client(cors_origins=("https://billing.example",))
    preflight = {
        "origin": "https://billing.example",
        "access-control-request-method": "POST",
        **headers,
    }
    response = client.options("/api/predict", headers=preflight)
    assert_error(response, 400, location, "cors_refused")
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-correlation-id"]
    assert "access-control-allow-origin" not in response.headers or location != "header.origin"
    allowed = client.options(
        "/api/predict",
        headers={"origin": "https://billing.example", "access-control-request-method": "POST"},
    )
    assert allowed.status_code == 200


def test_no_input_of_this_module_leaks_a_traceback(client: TestClient, predict_body: bytes) -> None:
    """Every odd body and header of this module together: no 5xx, always the JSON error."""
    rng = np.random.default_rng(5)
    bodies = [rng.bytes(200), b"\xef\xbb\xbf", b"\xef\xbb\xbf\xef\xbb\xbf{}", gzip.compress(b"")]
    for data in bodies:
        for coding in (None, "gzip", "deflate", "br"):
            headers = {**JSON, **({"content-encoding": coding} if coding else {})}
            for path in ("/api/predict", "/api/predict_batch"):
                response = client.post(path, content=data, headers=headers)
                assert 400 <= response.status_code < 500, (data[:20], coding, response.text)
                assert response.json()["error"]["code"]
