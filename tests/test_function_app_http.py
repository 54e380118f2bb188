"""function_app.py's HTTP side: how it is indexed, and its user code called with real
`azure.functions.HttpRequest` objects, answering exactly as the in-process ASGI app does."""

from __future__ import annotations

import asyncio
import gzip
import importlib
import importlib.util
import json
import sys
import types
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from fastapi.testclient import TestClient

from detector.api import create_app
from detector.config import Settings
from detector.model import ArtifactSet
from tests.test_api import FEATURES_BODY

ENV = {"PTD_MODEL_SOURCE": "local", "PTD_API_KEYS": "", "PTD_CORS_ORIGINS": ""}


class Context:
    """What the Functions worker passes as `context` (the attributes AsgiRequest reads)."""

    def __init__(self) -> None:
        self.invocation_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
        self.function_name = "http_app_func"
        self.function_directory = str(Path(__file__).resolve().parent.parent)
        self.trace_context = types.SimpleNamespace(
            trace_parent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            trace_state="",
            attributes={},
        )
        self.retry_context = None
        self.thread_local_storage = types.SimpleNamespace(invocation_id=self.invocation_id)


@pytest.fixture(scope="module")
def function_app(
    tiny_artifacts_dir: Path, monkeypatch_module: pytest.MonkeyPatch
) -> Iterator[types.ModuleType]:
    """Import function_app with the tiny model, as the worker does at cold start."""
    for name, value in {**ENV, "PTD_MODEL_DIR": str(tiny_artifacts_dir)}.items():
        monkeypatch_module.setenv(name, value)
    if importlib.util.find_spec("detector.blob_batch") is None:
        # The blob module is another change in flight; only the HTTP side is tested here.
        stub = types.ModuleType("detector.blob_batch")
        stub.process_blob = lambda client, settings: None  # type: ignore[attr-defined]
        monkeypatch_module.setitem(sys.modules, "detector.blob_batch", stub)
    sys.modules.pop("function_app", None)
    module = importlib.import_module("function_app")
    yield module
    sys.modules.pop("function_app", None)


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def indexed(function_app: types.ModuleType) -> dict[str, Any]:
    """The functions as the worker indexes them (`get_functions` may run once per app)."""
    return {f.get_function_name(): f for f in function_app.app.get_functions()}


@pytest.fixture(scope="module")
def invoke(function_app: types.ModuleType, indexed: dict[str, Any]) -> Iterator[Any]:
    """Call the indexed HTTP function's user code on one event loop, as the worker does."""
    functions = indexed
    user_code = functions["http_app_func"].get_user_function()
    loop = asyncio.new_event_loop()

    def call(req: func.HttpRequest) -> func.HttpResponse:
        response: func.HttpResponse = loop.run_until_complete(user_code(req, Context()))
        return response

    yield call
    asgi_app = function_app.app
    if asgi_app.startup_task_done:
        loop.run_until_complete(asgi_app.middleware.notify_shutdown())
        asgi_app.startup_task_done = False  # nothing left for __del__ to shut down
    loop.close()


@pytest.fixture(scope="module")
def reference(tiny_artifacts_dir: Path, tiny_artifacts: ArtifactSet) -> Iterator[TestClient]:
    app = create_app(Settings(model_dir=tiny_artifacts_dir), lambda: tiny_artifacts)
    with TestClient(app, base_url="http://localhost") as client:
        yield client


def test_index_names_route_auth_and_methods(indexed: dict[str, Any]) -> None:
    functions = indexed
    assert "http_app_func" in functions and "score_batch_blob" in functions
    http = functions["http_app_func"]
    trigger = http.get_trigger()
    assert trigger.type == "httpTrigger"
    assert trigger.route == "/{*route}"
    assert trigger.auth_level == func.AuthLevel.FUNCTION
    methods = {str(m.value) if hasattr(m, "value") else str(m) for m in trigger.methods}
    assert {"GET", "POST", "OPTIONS"} <= methods
    raw = [json.loads(b) for b in http.get_raw_bindings()]
    assert raw[0]["authLevel"] == "FUNCTION" and raw[0]["route"] == "/{*route}"
    assert {b["type"] for b in raw} == {"httpTrigger", "http"}
    assert asyncio.iscoroutinefunction(http.get_user_function())


def _body(value: Any) -> bytes:
    return json.dumps(value).encode()


HISTORY_ROW = {
    "invoice_date": "2015-03-01",
    "tarif_type": 11,
    "counter_number": 12345,
    "counter_statue": 0,
    "counter_code": 203,
    "reading_remarque": 8,
    "consommation_level_1": 350,
    "consommation_level_2": 20.5,
    "consommation_level_3": 0,
    "consommation_level_4": 0,
    "months_number": 4,
    "counter_type": "ELEC",
}


REQUESTS: list[tuple[str, str, dict[str, str], bytes]] = [
    ("GET", "/api/health", {}, b""),
    ("GET", "/api/model_info", {}, b""),
    ("GET", "/api/features", {}, b""),
    ("GET", "/api/openapi.json", {}, b""),
    (
        "POST",
        "/api/predict",
        {"content-type": "application/json"},
        _body({"customer_id": "c1", "features": FEATURES_BODY}),
    ),
    (
        "POST",
        "/api/predict?model=logistic_regression",
        {"content-type": "application/json"},
        _body({"customer_id": "c1", "features": FEATURES_BODY}),
    ),
    (
        "POST",
        "/api/predict_batch",
        {"content-type": "application/json"},
        _body(
            {
                "records": [
                    {"customer_id": "a", "features": FEATURES_BODY},
                    {"customer_id": "b", "features": {**FEATURES_BODY, "elec_n_meters": -1}},
                    {
                        "customer_id": "c",
                        # counter_type left out: a record error, answered alike by both.
                        "invoices": [{k: v for k, v in HISTORY_ROW.items() if k != "counter_type"}],
                        "client": {"region": 101, "creation_date": "01/02/1999"},
                    },
                ]
            }
        ),
    ),
    ("POST", "/api/predict", {"content-type": "application/json"}, b'{"customer_id": NaN'),
    ("POST", "/api/predict", {"content-type": "text/plain"}, b"{}"),
    ("GET", "/api/nowhere", {}, b""),
]


@pytest.mark.parametrize(("method", "path", "headers", "body"), REQUESTS)
def test_function_answers_as_the_asgi_app(
    invoke: Any,
    reference: TestClient,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
) -> None:
    headers = {**headers, "x-correlation-id": "same-id-1"}
    request = func.HttpRequest(
        method=method, url=f"http://localhost{path}", headers=headers, body=body
    )
    response = invoke(request)
    expected = reference.request(method, path, headers=headers, content=body)
    assert response.status_code == expected.status_code, response.get_body()[:300]
    assert json.loads(response.get_body()) == expected.json()
    assert response.headers["x-correlation-id"] == "same-id-1"
    for name in ("content-type", "x-content-type-options", "cache-control"):
        assert response.headers[name] == expected.headers[name]


def test_function_uses_the_host_trace_context(invoke: Any) -> None:
    request = func.HttpRequest(method="GET", url="http://localhost/api/health", body=b"")
    response = invoke(request)
    assert response.status_code == 200
    assert response.headers["x-correlation-id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert json.loads(response.get_body())["status"] == "ok"


# --- issue 13 through the Functions entry point --------------------------------------------------


def _call(
    invoke: Any, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> func.HttpResponse:
    request = func.HttpRequest(
        method=method, url=f"http://localhost{path}", headers=headers or {}, body=body
    )
    response: func.HttpResponse = invoke(request)
    return response


def _error(response: func.HttpResponse) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(response.get_body())["error"]
    return error


@pytest.mark.parametrize(
    "date", ["9999-12-31", "0001-01-01", "1000-01-01", "3016-01-01", "today", "2100-01-01"]
)
def test_function_refuses_placeholder_dates_naming_the_field(invoke: Any, date: str) -> None:
    rows = [HISTORY_ROW, {**HISTORY_ROW, "invoice_date": date}]
    single = _call(
        invoke,
        "POST",
        "/api/predict",
        _body({"customer_id": "c", "invoices": rows}),
        {"content-type": "application/json"},
    )
    assert single.status_code == 422
    assert _error(single)["location"] == "invoices[1].invoice_date"
    assert _error(single)["code"] == "invalid_value"
    batch = _call(
        invoke,
        "POST",
        "/api/predict_batch",
        _body(
            {
                "records": [
                    {"customer_id": "a", "invoices": [HISTORY_ROW]},
                    {"customer_id": "b", "invoices": rows},
                ]
            }
        ),
        {"content-type": "application/json"},
    )
    results = json.loads(batch.get_body())["results"]
    assert "theft_probability" in results[0]
    assert results[1]["error"]["location"] == "records[1].invoices[1].invoice_date"


def test_function_answers_head_like_get_without_a_body(invoke: Any) -> None:
    get = _call(invoke, "GET", "/api/health")
    head = _call(invoke, "HEAD", "/api/health")
    assert head.status_code == get.status_code == 200
    assert head.get_body() == b""
    assert head.headers["content-length"] == str(len(get.get_body()))
    assert head.headers["content-type"] == get.headers["content-type"]


def test_function_answers_a_trailing_slash_without_redirect(invoke: Any) -> None:
    response = _call(invoke, "GET", "/api/health/", headers={"host": "evil.example"})
    assert response.status_code == 200
    assert "location" not in response.headers
    assert json.loads(response.get_body())["status"] == "ok"


@pytest.mark.parametrize(
    ("headers", "transform"),
    [
        ({}, lambda b: b"\xef\xbb\xbf" + b),
        ({"content-encoding": "gzip"}, gzip.compress),
        ({"content-encoding": "deflate"}, zlib.compress),
    ],
)
def test_function_reads_bom_and_encoded_bodies(
    invoke: Any, reference: TestClient, headers: dict[str, str], transform: Any
) -> None:
    body = _body({"customer_id": "c1", "features": FEATURES_BODY})
    expected = reference.post(
        "/api/predict", content=body, headers={"content-type": "application/json"}
    ).json()
    response = _call(
        invoke,
        "POST",
        "/api/predict",
        transform(body),
        {"content-type": "application/json", **headers},
    )
    assert response.status_code == 200, response.get_body()[:300]
    assert json.loads(response.get_body()) == expected


def test_function_refuses_unknown_codings_and_bombs(invoke: Any) -> None:
    body = _body({"customer_id": "c1", "features": FEATURES_BODY})
    br = _call(
        invoke,
        "POST",
        "/api/predict",
        body,
        {"content-type": "application/json", "content-encoding": "br"},
    )
    assert br.status_code == 415
    assert _error(br)["location"] == "header.content-encoding"
    assert br.headers["accept-encoding"] == "gzip, deflate"
    limit = Settings.from_env().max_body_bytes
    bomb = gzip.compress(bytes(limit + 1), 9)
    assert len(bomb) < limit // 100
    refused = _call(
        invoke,
        "POST",
        "/api/predict",
        bomb,
        {"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert refused.status_code == 413
    assert _error(refused)["code"] == "body_too_large"
