"""Operations: /api/metrics (Prometheus), the rate limit, audit lines, OpenTelemetry options,
the alert event names, and no customer data or secret in any log line of a full cycle."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from detector import telemetry
from detector.config import Settings
from detector.features import FEATURES as FEATURE_SPECS
from detector.limits import RateLimiter
from detector.model import ArtifactSet, ModelError
from detector.telemetry import (
    AUDIT_LOGGER,
    EVENT_BATCH_FAILED,
    EVENT_MODEL_LOAD_FAILED,
    METRICS,
    JsonFormatter,
    Metrics,
    aad_client_id,
    azure_monitor_options,
    observe_blob_run,
    prometheus_text,
)
from tests.logs import attached

KEY = "opskey-" + "q7" * 10
OTHER_KEY = "opskey-" + "w3" * 10
# One valid value per feature, from the feature specs (follows renames of features).
FEATURES = {spec.name: float(min(max(1.0, spec.min), spec.max)) for spec in FEATURE_SPECS}
JSON = {"content-type": "application/json"}


class Capture(logging.Handler):
    """Every record of every logger, formatted as the service formats it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []
        self._json = JsonFormatter()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.lines.append(self._json.format(record))
        self.lines.append(record.getMessage())
        self.lines.append(repr(record.__dict__))


@pytest.fixture
def capture() -> Iterator[Capture]:
    with attached(Capture()) as handler:
        yield handler


def audit_lines(capture: Capture) -> list[dict[str, Any]]:
    return [
        dict(r.fields)  # type: ignore[attr-defined]
        for r in capture.records
        if r.name == AUDIT_LOGGER and isinstance(getattr(r, "fields", None), dict)
    ]


# --- /api/metrics ------------------------------------------------------------------------------


def test_metrics_endpoint_is_prometheus_text_behind_auth(
    make_client: Callable[..., TestClient], tiny_artifacts: ArtifactSet
) -> None:
    client = make_client(api_keys=(f"billing:{KEY}",))
    assert client.get("/api/metrics").status_code == 401
    body = {"customer_id": "m-1", "features": FEATURES}
    before = METRICS.counter_value(
        "predictions_total",
        {"model": tiny_artifacts.default_model, "model_version": tiny_artifacts.version},
    )
    assert client.post("/api/predict", json=body, headers={"x-api-key": KEY}).status_code == 200
    response = client.get("/api/metrics", headers={"x-api-key": KEY})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert "# TYPE ptd_predictions_total counter" in text
    assert "# TYPE ptd_model_latency_ms histogram" in text
    line = next(
        line
        for line in text.splitlines()
        if line.startswith("ptd_predictions_total{")
        and f'model_version="{tiny_artifacts.version}"' in line
        and f'model="{tiny_artifacts.default_model}"' in line
    )
    assert float(line.rsplit(" ", 1)[1]) == before + 1
    # Every sample line is `name{labels} value` with a number.
    number = r"(-?[0-9.]+(e[-+]?[0-9]+)?|[-+]Inf|NaN)"
    sample = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-z_]+="[^"]*",?)*\})? ' + number + "$")
    for line in text.splitlines():
        if not line.startswith("#"):
            assert sample.match(line), line


def test_prometheus_histograms_are_cumulative_and_labels_escaped() -> None:
    metrics = Metrics()
    metrics.observe("model_latency_ms", 3, {"model": 'a"b\\c'}, buckets=(1, 5))
    metrics.observe("model_latency_ms", 7, {"model": 'a"b\\c'}, buckets=(1, 5))
    metrics.inc("predictions_total", 2.5)
    text = prometheus_text(metrics.snapshot())
    assert 'ptd_model_latency_ms_bucket{model="a\\"b\\\\c",le="1"} 0' in text
    assert 'ptd_model_latency_ms_bucket{model="a\\"b\\\\c",le="5"} 1' in text
    assert 'ptd_model_latency_ms_bucket{model="a\\"b\\\\c",le="+Inf"} 2' in text
    assert 'ptd_model_latency_ms_count{model="a\\"b\\\\c"} 2' in text
    assert "ptd_predictions_total 2.5" in text


# --- rate limit --------------------------------------------------------------------------------


def test_token_bucket_refills_at_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(60, clock=lambda: now[0])  # one a second, bursts of 60
    assert all(limiter.check("a") == 0 for _ in range(60))
    assert limiter.check("a") == pytest.approx(1.0)
    assert limiter.check("b") == 0  # another caller has its own bucket
    now[0] = 0.5
    assert limiter.check("a") == pytest.approx(0.5)
    now[0] = 1.0
    assert limiter.check("a") == 0
    assert RateLimiter.retry_after(0.01) == "1"
    assert RateLimiter.retry_after(2.2) == "3"


def test_token_buckets_are_bounded() -> None:
    limiter = RateLimiter(1, clock=lambda: 0.0, max_buckets=3)
    for key in ("a", "b", "c", "d"):
        assert limiter.check(key) == 0
    assert len(limiter._buckets) == 3
    assert limiter.check("a") == 0  # evicted, so full again


def test_rate_limit_answers_429_with_retry_after_per_caller(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(api_keys=(f"billing:{KEY}", f"field:{OTHER_KEY}"), rate_limit_per_minute=3)
    body = {"customer_id": "r-1", "features": FEATURES}
    codes = [
        client.post("/api/predict", json=body, headers={"x-api-key": KEY}).status_code
        for _ in range(3)
    ]
    assert codes == [200, 200, 200]
    limited = client.post("/api/predict", json=body, headers={"x-api-key": KEY})
    assert limited.status_code == 429
    assert limited.json()["error"]["code"] == "rate_limited"
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-content-type-options"] == "nosniff"
    # Another caller is not affected, health is exempt, a wrong key is 401 (not counted).
    assert (
        client.post("/api/predict", json=body, headers={"x-api-key": OTHER_KEY}).status_code == 200
    )
    assert all(client.get("/api/health").status_code == 200 for _ in range(10))
    assert client.get("/api/features", headers={"x-api-key": "x" * 20}).status_code == 401


def test_rate_limit_without_keys_is_by_client_address(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(rate_limit_per_minute=1)
    assert client.get("/api/features").status_code == 200
    assert client.get("/api/model_info").status_code == 429
    assert client.get("/api/health").status_code == 200


def test_no_rate_limit_by_default(make_client: Callable[..., TestClient]) -> None:
    client = make_client()
    assert all(client.get("/api/features").status_code == 200 for _ in range(30))


# --- limits: each answered with a clear 413/422 --------------------------------------------------


def test_each_limit_is_configurable_and_clear(make_client: Callable[..., TestClient]) -> None:
    history = {"customer_id": "h-1", "invoices": [{"invoice_date": "2020-01-01"}] * 4}
    client = make_client(max_invoices_per_customer=3, max_batch_records=2, max_body_bytes=4000)
    response = client.post("/api/predict", json=history)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_invoices"
    assert response.json()["error"]["location"] == "invoices"
    batch = {"records": [{"customer_id": str(i), "features": FEATURES} for i in range(3)]}
    response = client.post("/api/predict_batch", json=batch)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "batch_too_large"
    assert "limit is 2" in response.json()["error"]["message"]
    big = b'{"customer_id": "x", "features": {}, "pad": "' + b"a" * 5000 + b'"}'
    response = client.post("/api/predict", content=big, headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    # Within every limit: the batch answer has a per-record 422-like error, not a 500.
    ok = client.post("/api/predict_batch", json={"records": [{"customer_id": "1"}]})
    assert ok.status_code == 200
    assert ok.json()["results"][0]["error"]["code"] == "missing_field"
    assert client.post("/api/predict", json={"customer_id": "1"}).status_code == 422


# --- audit -------------------------------------------------------------------------------------


def test_every_scoring_call_has_one_audit_line(
    make_client: Callable[..., TestClient], capture: Capture, tiny_artifacts: ArtifactSet
) -> None:
    client = make_client(api_keys=(f"billing:{KEY}",))
    headers = {"x-api-key": KEY, "x-correlation-id": "audit-test-1"}
    batch = {
        "records": [
            {"customer_id": "a-1", "features": FEATURES},
            {"customer_id": "a-2", "features": {}},
        ]
    }
    assert client.post("/api/predict_batch", json=batch, headers=headers).status_code == 200
    assert client.post("/api/predict", json={}, headers={"x-api-key": KEY}).status_code == 422
    assert client.post("/api/predict", json={"customer_id": "a"}).status_code == 401
    assert client.get("/api/features", headers={"x-api-key": KEY}).status_code == 200
    lines = audit_lines(capture)
    assert len(lines) == 3  # scoring calls only; /api/features is not audited
    first, second, third = lines
    assert first["kind"] == "predict_batch"
    assert first["caller"] == "billing"
    assert first["customers"] == 2
    assert first["failed"] == 1
    assert first["model_version"] == tiny_artifacts.version
    assert first["outcome"] == "ok"
    assert first["correlation_id"] == "audit-test-1"
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", first["at"])
    assert second["kind"] == "predict"
    assert second["outcome"] == "missing_field"
    assert second["status"] == 422
    assert third["caller"] == "unauthenticated"
    assert third["outcome"] == "unauthorized"


def test_keyless_caller_is_named_without_a_key(
    make_client: Callable[..., TestClient],
    capture: Capture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings.from_env({"FUNCTIONS_WORKER_RUNTIME": "python"}).functions_host
    client = make_client(functions_host=True)
    body = {"customer_id": "f-1", "features": FEATURES}
    assert client.post("/api/predict", json=body).status_code == 200
    assert audit_lines(capture)[-1]["caller"] == "function-key"


# --- OpenTelemetry -----------------------------------------------------------------------------


def test_aad_authentication_string() -> None:
    assert aad_client_id("ClientId=abc-123;Authorization=AAD") == "abc-123"
    assert aad_client_id("Authorization=AAD") == ""
    assert aad_client_id("") is None
    assert aad_client_id("ClientId=abc") is None


def test_azure_monitor_options_use_the_managed_identity() -> None:
    from azure.identity import ManagedIdentityCredential

    connection = "InstrumentationKey=00000000-0000-0000-0000-000000000000"
    options = azure_monitor_options(connection, "ClientId=abc-123;Authorization=AAD")
    assert options["connection_string"] == connection
    assert options["logger_name"] == "detector"
    assert isinstance(options["credential"], ManagedIdentityCredential)
    assert "credential" not in azure_monitor_options(connection, "")


def test_azure_monitor_is_configured_only_with_a_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(telemetry, "_configured", {"logging": True, "azure_monitor": False})
    monkeypatch.setattr(telemetry, "_configure_azure_monitor", lambda c, a="": calls.append((c, a)))
    monkeypatch.setenv("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "Authorization=AAD")
    telemetry.configure_logging(Settings())
    assert calls == []
    telemetry.configure_logging(Settings(appinsights_connection="InstrumentationKey=x"))
    telemetry.configure_logging(Settings(appinsights_connection="InstrumentationKey=x"))
    assert calls == [("InstrumentationKey=x", "Authorization=AAD")]


def test_metrics_are_mirrored_to_opentelemetry_instruments() -> None:
    class Instrument:
        def __init__(self, name: str) -> None:
            self.name = name
            self.values: list[tuple[float, dict[str, str]]] = []

        def add(self, value: float, attributes: dict[str, str]) -> None:
            self.values.append((value, attributes))

        record = add

    class Meter:
        def __init__(self) -> None:
            self.made: dict[str, Instrument] = {}

        def create_counter(self, name: str, unit: str = "") -> Instrument:
            return self.made.setdefault(name, Instrument(name))

        create_histogram = create_counter

    metrics, meter = Metrics(), Meter()
    metrics.inc("predictions_total", 3, {"model": "rf"})
    metrics.enable_otel(meter)
    metrics.inc("predictions_total", 2, {"model": "rf", "model_version": "v1"})
    metrics.observe("model_latency_ms", 4.5, {"model": "rf"})
    assert meter.made["predictions_total"].values == [(2, {"model": "rf", "model_version": "v1"})]
    assert meter.made["model_latency_ms"].values == [(4.5, {"model": "rf"})]
    assert metrics.counter_value("predictions_total", {"model": "rf"}) == 3


def test_span_is_free_without_opentelemetry() -> None:
    assert telemetry._tracer == []
    with telemetry.span("x", a=1):
        pass


# --- alert events --------------------------------------------------------------------------------


def test_model_load_failure_logs_the_alert_event(
    make_client: Callable[..., TestClient], capture: Capture
) -> None:
    def broken() -> ArtifactSet:
        raise ModelError("manifest checksum mismatch for forest.npz")

    client = make_client(loader=broken)
    assert client.get("/api/health").status_code == 503
    events = [getattr(r, "event", None) for r in capture.records]
    assert EVENT_MODEL_LOAD_FAILED in events
    record = next(
        r for r in capture.records if getattr(r, "event", None) == EVENT_MODEL_LOAD_FAILED
    )
    assert record.levelno == logging.ERROR
    # The alert query matches `message contains "model_load_failed"` or customDimensions.event.
    assert EVENT_MODEL_LOAD_FAILED in record.getMessage()
    assert "checksum mismatch" in record.getMessage()


def test_failed_blob_run_logs_batch_failed_audits_and_reraises(capture: Capture) -> None:
    def run() -> dict[str, Any]:
        raise ModelError("no model is active")

    with pytest.raises(ModelError):
        observe_blob_run("exports/may.csv", run)
    unusable = observe_blob_run("exports/bad.csv", lambda: {"error": "no rows", "input_etag": "e"})
    assert unusable["error"] == "no rows"
    failed = [r for r in capture.records if getattr(r, "event", None) == EVENT_BATCH_FAILED]
    assert len(failed) == 2
    assert all(EVENT_BATCH_FAILED in r.getMessage() for r in failed)
    audits = audit_lines(capture)
    assert [a["outcome"] for a in audits] == ["failed", "unusable_file"]
    assert audits[0]["caller"] == "blob-trigger"
    assert (
        audits[0]["correlation_id"] and audits[0]["correlation_id"] != audits[1]["correlation_id"]
    )
    assert telemetry.correlation_id.get() == ""
