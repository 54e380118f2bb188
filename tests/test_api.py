"""The HTTP API through its ASGI app: every endpoint, every class of bad input, equality with
the library's scores, auth, CORS, correlation ids and the model-unavailable path."""

from __future__ import annotations

import gc
import json
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from detector.api import ModelHolder, ModelUnavailable, create_app
from detector.batch import score_frames
from detector.config import ConfigError, Settings
from detector.features import FEATURE_NAMES, FEATURES, compute_features
from detector.model import ArtifactSet, ModelError
from detector.reasons import explain_dicts, top_reasons
from detector.schema import CLIENT_SCHEMA, INVOICE_SCHEMA, prepare_clients, prepare_invoices
from detector.telemetry import METRICS, JsonFormatter, correlation_from_headers
from tests.synthetic import make_steg

KEY = "k" * 24
# A client with electricity and gas, a meter added 6 years in; every served feature given.
FEATURES_BODY: dict[str, Any] = {
    "new_meter_after_years": 6.2,
    "region": 101,
    "elec_n_codes": 2,
    "elec_n_meters": 2,
    "code_207_share": 0.3,
    "latest_meter_cons_ratio": 0.4,
    "elec_cons_cv": 0.9,
    "code_mode": 203,
    "first_year": 2006.5,
    "elec_cons_std": 80.0,
    "creation_to_first_invoice_years": 2.3,
    "creation_year": 2004.2,
    "elec_cons_min": 0.0,
    "elec_remark_8_share": 0.25,
    "code_413_share": 0.0,
    "gap_max_days": 480,
    "client_catg": 11,
    "elec_status_abnormal_share": 0.0,
    "code_420_share": 0.0,
    "code_203_share": 0.5,
    "elec_cons_slope": -0.15,
    "elec_tier1_share": 0.9,
    "elec_n_invoices": 30,
    "elec_cons_median": 85.0,
    "irregular_period_share": 0.2,
    "tariff_10_share": 0.0,
    "status_5_share": 0.0,
    "elec_remark_6_share": 0.5,
    "remark_6_share": 0.5,
    "cons_max": 410.0,
    "gaz_cons_median": 40.0,
    "gaz_first_year": 2008.1,
    "cons_mean": 75.0,
    "gaz_cons_cv": 0.6,
    "meter_changes": 1,
    "gaz_remark_8_share": 0.1,
    "remark_8_share": 0.2,
    "tariff_9_share": 0.0,
    "district": 60,
    "n_invoices": 45,
}
assert list(FEATURES_BODY) == list(FEATURE_NAMES)


@pytest.fixture(scope="module")
def steg() -> tuple[pd.DataFrame, pd.DataFrame]:
    return make_steg(40, seed=7)


def history_body(
    invoices: pd.DataFrame, clients: pd.DataFrame, client_id: str, with_client: bool = True
) -> dict[str, Any]:
    rows = invoices[invoices["client_id"] == client_id].to_dict("records")
    body: dict[str, Any] = {"customer_id": client_id, "invoices": rows}
    if with_client:
        attrs = clients[clients["client_id"] == client_id].iloc[0]
        body["client"] = {
            "region": int(attrs["region"]),
            "creation_date": str(attrs["creation_date"]),
            "disrict": int(attrs["disrict"]),
            "client_catg": int(attrs["client_catg"]),
        }
    return body


def a_history(steg: tuple[pd.DataFrame, pd.DataFrame], k: int = 0) -> dict[str, Any]:
    """The raw-history body of the k-th client of a make_steg pair (at least two invoices)."""
    clients, invoices = steg
    body = history_body(invoices, clients, clients["client_id"].iloc[k])
    assert len(body["invoices"]) >= 2
    return body


def library(
    artifacts: ArtifactSet,
    invoices: pd.DataFrame,
    clients: pd.DataFrame | None,
    model: str | None = None,
) -> tuple[pd.Index, Any]:
    prepared = prepare_invoices(invoices)
    assert len(prepared.rejects) == 0
    features = compute_features(prepared.frame, prepare_clients(clients))
    return features.index, artifacts.score(features.to_numpy(dtype=np.float64), model)


def post(client: TestClient, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post(
        path,
        content=json.dumps(body),
        headers={"content-type": "application/json", **(headers or {})},
    )


def assert_error(response: Any, status: int, location: str | None, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"code", "message", "location"}
    assert error["location"] == location, error
    if code:
        assert error["code"] == code, error
    assert "Traceback" not in response.text


# --- endpoints -----------------------------------------------------------------------------------


def test_health_reports_model_version(client: TestClient, tiny_artifacts: ArtifactSet) -> None:
    response = client.get("/api/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"
    assert response.json()["model_version"] == tiny_artifacts.version
    assert len(response.headers["x-correlation-id"]) == 32
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"


def test_model_info(client: TestClient, tiny_artifacts: ArtifactSet) -> None:
    info = client.get("/api/model_info").json()
    assert info["model_version"] == tiny_artifacts.version
    assert info["trained_at"] == tiny_artifacts.training_results["trained_at"]
    assert info["default_model"] == "lightgbm"
    assert sorted(info["available_models"]) == ["lightgbm", "logistic_regression", "random_forest"]
    assert info["libraries"]["numpy"] == np.__version__
    for name, card in tiny_artifacts.cards.items():
        assert info["models"][name]["threshold"] == card.threshold
        holdout = tiny_artifacts.training_results["models"][name]["holdout"]
        assert info["models"][name]["metrics"]["holdout"] == holdout
        assert set(holdout) == {"full", "cut_12m", "cut_24m"}
        assert info["models"][name]["contributions"] == card.contributions


def test_features_endpoint(client: TestClient) -> None:
    body = client.get("/api/features").json()
    assert [f["name"] for f in body["features"]] == list(FEATURE_NAMES)
    for given_spec, spec in zip(body["features"], FEATURES, strict=True):
        assert {k: given_spec[k] for k in ("description", "unit", "min", "max")} == {
            "description": spec.description,
            "unit": spec.unit,
            "min": spec.min,
            "max": spec.max,
        }
    assert set(body["invoice_schema"]) == set(INVOICE_SCHEMA)
    for given_spec, spec in zip(body["features"], FEATURES, strict=True):
        assert (given_spec["kind"], given_spec["required"]) == (spec.kind, spec.required)
    assert body["invoice_schema"]["invoice_date"]["required"] is True
    assert body["invoice_schema"]["counter_type"]["required"] is True
    assert body["invoice_schema"]["old_index"]["required"] is False
    assert set(body["client_schema"]) == set(CLIENT_SCHEMA)


def test_openapi_and_docs(client: TestClient) -> None:
    schema = client.get("/api/openapi.json").json()
    for path in (
        "/api/health",
        "/api/model_info",
        "/api/features",
        "/api/predict",
        "/api/predict_batch",
    ):
        assert path in schema["paths"], path
    request = schema["paths"]["/api/predict"]["post"]["requestBody"]
    assert request["content"]["application/json"]["schema"]["$ref"].endswith("/PredictRequest")
    components = schema["components"]["schemas"]
    assert components["FeatureValues"]["properties"]["first_year"]["maximum"] == 2100
    assert components["FeatureValues"]["additionalProperties"] is False
    assert components["BatchRequest"]["properties"]["records"]["maxItems"] == 10_000
    docs = client.get("/api/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


# --- predictions equal the library's -------------------------------------------------------------


def test_predict_features_equals_library(client: TestClient, tiny_artifacts: ArtifactSet) -> None:
    response = post(client, "/api/predict", {"customer_id": "c-1", "features": FEATURES_BODY})
    assert response.status_code == 200, response.text
    out = response.json()
    row = np.array([[FEATURES_BODY[n] for n in FEATURE_NAMES]], dtype=np.float64)
    expected = tiny_artifacts.score(row)
    assert out["customer_id"] == "c-1"
    assert abs(out["theft_probability"] - expected.probability[0]) < 1e-9
    assert out["flagged"] == bool(expected.flagged[0])
    assert out["risk_level"] == expected.risk_level[0]
    assert out["model"] == "lightgbm"
    assert out["model_version"] == tiny_artifacts.version
    assert expected.contributions is not None
    reasons = top_reasons(expected.features[0], expected.contributions[0], tiny_artifacts.typical)
    assert out["reasons"] == [r.to_dict() for r in reasons]


def test_predict_history_equals_library(
    client: TestClient, tiny_artifacts: ArtifactSet, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    clients, invoices = steg
    ids, expected = library(tiny_artifacts, invoices, clients)
    for k, client_id in enumerate(ids[:8]):
        body = history_body(invoices, clients, client_id)
        response = post(client, "/api/predict", body)
        assert response.status_code == 200, response.text
        assert abs(response.json()["theft_probability"] - expected.probability[k]) < 1e-9


def test_predict_history_without_client_is_imputed(
    client: TestClient, tiny_artifacts: ArtifactSet, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    clients, invoices = steg
    client_id = clients["client_id"].iloc[3]
    only = invoices[invoices["client_id"] == client_id]
    _, expected = library(tiny_artifacts, only, None)
    response = post(client, "/api/predict", history_body(invoices, clients, client_id, False))
    assert abs(response.json()["theft_probability"] - expected.probability[0]) < 1e-9


def test_batch_of_histories_equals_batch_scoring(
    client: TestClient, tiny_artifacts: ArtifactSet, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    """The API and `ptd score`/the blob function give the same answers for the same invoices."""
    clients, invoices = steg
    ids = list(clients["client_id"])
    records = [history_body(invoices, clients, cid) for cid in ids]
    response = post(client, "/api/predict_batch", {"records": records})
    assert response.status_code == 200
    results = response.json()["results"]
    table = score_frames(invoices, tiny_artifacts, clients=clients.drop(columns="target"))
    expected = table.results.set_index("client_id")["theft_probability"]
    assert [r["customer_id"] for r in results] == ids
    for r in results:
        assert abs(r["theft_probability"] - expected[r["customer_id"]]) < 1e-6  # CSV rounds to 6


def test_batch_keeps_order_and_scores_around_bad_records(
    client: TestClient, tiny_artifacts: ArtifactSet, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    clients, invoices = steg
    good_history = history_body(invoices, clients, clients["client_id"].iloc[0])
    bad_history = history_body(invoices, clients, clients["client_id"].iloc[1])
    bad_history["invoices"][2]["consommation_level_2"] = -3
    records = [
        {"customer_id": "f0", "features": FEATURES_BODY},
        {"customer_id": "f1", "features": {**FEATURES_BODY, "first_year": 1e12}},
        "not a record",
        bad_history,
        good_history,
        {"customer_id": "f5", "features": {**FEATURES_BODY, "elec_n_meters": 3}},
        {"customer_id": "f6"},
    ]
    response = post(client, "/api/predict_batch", {"records": records})
    assert response.status_code == 200
    body = response.json()
    results = body["results"]
    assert [r["index"] for r in results] == list(range(len(records)))
    assert (body["scored"], body["failed"]) == (3, 4)
    errors = {r["index"]: r["error"]["location"] for r in results if "error" in r}
    assert errors == {
        1: "records[1].features.first_year",
        2: "records[2]",
        3: "records[3].invoices[2].consommation_level_2",
        6: "records[6].features",
    }
    assert results[3]["customer_id"] == bad_history["customer_id"]
    assert results[2]["customer_id"] is None
    row0 = np.array([[FEATURES_BODY[n] for n in FEATURE_NAMES]])
    row5 = row0.copy()
    row5[0, FEATURE_NAMES.index("elec_n_meters")] = 3
    expected = tiny_artifacts.score(np.vstack([row0, row5])).probability
    assert abs(results[0]["theft_probability"] - expected[0]) < 1e-9
    assert abs(results[5]["theft_probability"] - expected[1]) < 1e-9
    single = post(client, "/api/predict", good_history).json()
    assert results[4]["theft_probability"] == single["theft_probability"]


def test_batch_records_are_independent_even_with_same_customer_id(client: TestClient) -> None:
    records = [
        {"customer_id": "same", "features": FEATURES_BODY},
        {"customer_id": "same", "features": {**FEATURES_BODY, "elec_cons_slope": 5.0}},
    ]
    one = post(client, "/api/predict", records[1]).json()["theft_probability"]
    results = post(client, "/api/predict_batch", {"records": records}).json()["results"]
    assert results[1]["theft_probability"] == one


def test_optional_invoice_columns_in_one_record_do_not_reject_another(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    clients, invoices = steg
    a = history_body(invoices, clients, clients["client_id"].iloc[0])
    b = history_body(invoices, clients, clients["client_id"].iloc[1])
    for row in b["invoices"]:
        for column in ("old_index", "new_index", "counter_coefficient"):
            row.pop(column)
    results = post(client, "/api/predict_batch", {"records": [a, b]}).json()["results"]
    assert all("error" not in r for r in results), results


def test_model_query_parameter(client: TestClient, tiny_artifacts: ArtifactSet) -> None:
    body = {"customer_id": "c", "features": FEATURES_BODY}
    row = np.array([[FEATURES_BODY[n] for n in FEATURE_NAMES]], dtype=np.float64)
    for name in ("lightgbm", "logistic_regression", "random_forest"):
        out = post(client, f"/api/predict?model={name}", body).json()
        assert out["model"] == name
        expected = tiny_artifacts.score(row, name).probability[0]
        assert abs(out["theft_probability"] - expected) < 1e-9
    batch = post(client, "/api/predict_batch?model=logistic_regression", {"records": [body]})
    assert batch.json()["results"][0]["model"] == "logistic_regression"
    assert_error(post(client, "/api/predict?model=xgboost", body), 422, "query.model")


def test_bundled_model_served(tiny_artifacts_dir: Path, bundled: ArtifactSet) -> None:
    app = create_app(Settings(), lambda: bundled)
    with TestClient(app) as client:
        assert client.get("/api/health").json()["model_version"] == bundled.version
        out = post(client, "/api/predict", {"customer_id": "b", "features": FEATURES_BODY}).json()
    row = np.array([[FEATURES_BODY[n] for n in FEATURE_NAMES]], dtype=np.float64)
    assert abs(out["theft_probability"] - bundled.score(row).probability[0]) < 1e-9
    assert out["model_version"] == bundled.version


def test_startup_freezes_the_loaded_heap(tiny_artifacts: ArtifactSet) -> None:
    """Objects alive after startup leave the collector's generations (see the lifespan)."""
    gc.unfreeze()
    try:
        app = create_app(Settings(), lambda: tiny_artifacts)
        assert gc.get_freeze_count() == 0
        with TestClient(app) as client:
            assert client.get("/api/health").status_code == 200
            assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()


def test_batch_reasons_match_top_reasons(tiny_artifacts: ArtifactSet) -> None:
    rng = np.random.default_rng(3)
    rows = tiny_artifacts.typical * rng.uniform(0.2, 3.0, (200, len(FEATURE_NAMES)))
    scores = tiny_artifacts.score(rows)
    assert scores.contributions is not None
    fast = explain_dicts(scores.features, scores.contributions, tiny_artifacts.typical)
    for k in range(len(rows)):
        slow = top_reasons(scores.features[k], scores.contributions[k], tiny_artifacts.typical)
        assert fast[k] == [r.to_dict() for r in slow]


# --- bad input: one test per class ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [("region", "categorical code"), ("n_invoices", "count"), ("elec_n_meters", "count")],
)
def test_codes_and_counts_with_decimals_are_422(
    client: TestClient, name: str, message: str
) -> None:
    """`n_invoices: 1.5` was scored: no system counts half an invoice."""
    bad = {"customer_id": "c", "features": {**FEATURES_BODY, name: 1.5}}
    response = post(client, "/api/predict", bad)
    assert_error(response, 422, f"features.{name}", "invalid_value")
    assert f"a {message} must be a whole number" in response.json()["error"]["message"]
    whole = {"customer_id": "c", "features": {**FEATURES_BODY, name: 2.0}}
    assert post(client, "/api/predict", whole).status_code == 200


def test_wrong_type_is_422(client: TestClient) -> None:
    bad = {"customer_id": "c", "features": {**FEATURES_BODY, "first_year": "12"}}
    assert_error(post(client, "/api/predict", bad), 422, "features.first_year", "invalid_value")
    bad = {"customer_id": "c", "features": {**FEATURES_BODY, "elec_n_meters": True}}
    assert_error(post(client, "/api/predict", bad), 422, "features.elec_n_meters")
    assert_error(
        post(client, "/api/predict", {"customer_id": 5, "features": FEATURES_BODY}),
        422,
        "customer_id",
    )


def test_missing_field_is_422(client: TestClient) -> None:
    features = {k: v for k, v in FEATURES_BODY.items() if k != "first_year"}
    response = post(client, "/api/predict", {"customer_id": "c", "features": features})
    assert_error(response, 422, "features.first_year", "missing_field")
    assert_error(
        post(client, "/api/predict", {"features": FEATURES_BODY}),
        422,
        "customer_id",
        "missing_field",
    )


def test_unknown_fields_are_422_naming_the_field(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    body = {"customer_id": "c", "features": FEATURES_BODY, "note": "x"}
    assert_error(post(client, "/api/predict", body), 422, "note", "unknown_field")
    body = {"customer_id": "c", "features": {**FEATURES_BODY, "n_invoicez": 3}}
    assert_error(post(client, "/api/predict", body), 422, "features.n_invoicez", "unknown_field")
    clients, invoices = steg
    history = history_body(invoices, clients, clients["client_id"].iloc[0])
    history["invoices"][1]["tarif"] = 11
    assert_error(post(client, "/api/predict", history), 422, "invoices[1].tarif", "unknown_field")
    assert_error(post(client, "/api/predict_batch", {"records": [], "extra": 1}), 422, "extra")


def test_nan_and_infinity_are_rejected(client: TestClient) -> None:
    for literal in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps({"customer_id": "c", "features": FEATURES_BODY}).replace(
            '"elec_n_meters": 2', f'"elec_n_meters": {literal}'
        )
        assert literal in text
        response = client.post(
            "/api/predict", content=text, headers={"content-type": "application/json"}
        )
        assert_error(response, 422, "features.elec_n_meters", "invalid_value")
    records = [{"customer_id": "a", "features": FEATURES_BODY}] * 2
    text = json.dumps({"records": records}).replace('"elec_n_meters": 2', '"elec_n_meters": NaN')
    response = client.post(
        "/api/predict_batch", content=text, headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "records[0].features.elec_n_meters")
    text = json.dumps({"customer_id": "c", "features": FEATURES_BODY}).replace(
        '"elec_n_meters": 2', '"elec_n_meters": 1e999'
    )
    response = client.post(
        "/api/predict", content=text, headers={"content-type": "application/json"}
    )
    assert_error(response, 422, "features.elec_n_meters")
    response = client.post(
        "/api/predict", content=b'{"a": NaN', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "body", "invalid_json")


def test_absurd_magnitudes_are_422(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    for spec in FEATURES:
        for value in (spec.max * 10 + 1, spec.min - 1):
            body = {"customer_id": "c", "features": {**FEATURES_BODY, spec.name: value}}
            assert_error(post(client, "/api/predict", body), 422, f"features.{spec.name}")
    clients, invoices = steg
    history = history_body(invoices, clients, clients["client_id"].iloc[0])
    history["invoices"][0]["counter_code"] = 10**17
    assert_error(post(client, "/api/predict", history), 422, "invoices[0].counter_code")
    history["invoices"][0]["counter_code"] = 10**30  # beyond int64: refused by the schema
    assert_error(post(client, "/api/predict", history), 422, "invoices[0].counter_code")


def test_negative_consumption_is_422(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    clients, invoices = steg
    history = history_body(invoices, clients, clients["client_id"].iloc[0])
    history["invoices"][1]["consommation_level_1"] = -1.5
    response = post(client, "/api/predict", history)
    assert_error(response, 422, "invoices[1].consommation_level_1", "invalid_value")
    assert "negative consumption" in response.json()["error"]["message"]


def test_invalid_invoice_values_use_the_schema_rules(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    clients, invoices = steg
    history = history_body(invoices, clients, clients["client_id"].iloc[0])
    history["invoices"][0]["invoice_date"] = "31/12/2019"
    assert_error(post(client, "/api/predict", history), 422, "invoices[0].invoice_date")
    history = history_body(invoices, clients, clients["client_id"].iloc[0])
    history["invoices"][0]["counter_type"] = "WATER"
    assert_error(post(client, "/api/predict", history), 422, "invoices[0].counter_type")
    history = history_body(invoices, clients, clients["client_id"].iloc[0])
    history["client"]["region"] = 5_000_000
    assert_error(post(client, "/api/predict", history), 422, "client.region")
    history = history_body(invoices, clients, clients["client_id"].iloc[0])
    history["invoices"][0]["client_id"] = "someone-else"
    assert_error(post(client, "/api/predict", history), 422, "invoices[0].client_id")


def test_empty_history_is_422(client: TestClient) -> None:
    response = post(client, "/api/predict", {"customer_id": "c", "invoices": []})
    assert_error(response, 422, "invoices", "empty_history")
    assert_error(
        post(client, "/api/predict", {"customer_id": "   ", "features": FEATURES_BODY}),
        422,
        "customer_id",
    )


def test_too_many_invoices_is_413(
    make_client: Callable[..., TestClient], steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    client = make_client(max_invoices_per_customer=3)
    clients, invoices = steg
    history = history_body(invoices, clients, clients["client_id"].iloc[0])
    assert len(history["invoices"]) > 3
    assert_error(post(client, "/api/predict", history), 413, "invoices", "too_many_invoices")
    batch = post(client, "/api/predict_batch", {"records": [history]}).json()
    assert batch["results"][0]["error"]["location"] == "records[0].invoices"


def test_batch_over_limit_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_batch_records=2)
    records = [{"customer_id": str(i), "features": FEATURES_BODY} for i in range(3)]
    response = post(client, "/api/predict_batch", {"records": records})
    assert_error(response, 413, "records", "batch_too_large")
    assert post(client, "/api/predict_batch", {"records": records[:2]}).status_code == 200


def test_body_over_limit_is_413(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_body_bytes=1000)
    records = [{"customer_id": str(i), "features": FEATURES_BODY} for i in range(5)]
    payload = json.dumps({"records": records}).encode()
    response = client.post(
        "/api/predict_batch", content=payload, headers={"content-type": "application/json"}
    )
    assert_error(response, 413, "body", "body_too_large")

    def chunks() -> Iterator[bytes]:  # streamed: no Content-Length to trust
        for start in range(0, len(payload), 300):
            yield payload[start : start + 300]

    response = client.post(
        "/api/predict_batch", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body", "body_too_large")


def test_wrong_content_type_is_415(client: TestClient) -> None:
    body = json.dumps({"customer_id": "c", "features": FEATURES_BODY})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        response = client.post("/api/predict", content=body, headers=headers)
        assert_error(response, 415, "header.content-type", "unsupported_media_type")
    ok = client.post(
        "/api/predict", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200


def test_malformed_json_is_400(client: TestClient) -> None:
    for text in ('{"customer_id": "c", "features": {', "", "\xff\xfe", '{"a": 1} trailing'):
        response = client.post(
            "/api/predict",
            content=text.encode("latin-1"),
            headers={"content-type": "application/json"},
        )
        assert_error(response, 400, "body", "invalid_json")
    assert_error(post(client, "/api/predict", [1, 2]), 422, "body")
    assert_error(post(client, "/api/predict_batch", [1, 2]), 422, "body")
    assert_error(post(client, "/api/predict_batch", {"records": {"a": 1}}), 422, "records")


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert_error(client.get("/api/nothing"), 404, "path", "not_found")
    assert_error(client.get("/api/predict"), 405, "path", "method_not_allowed")


def test_unexpected_exception_is_json_500_without_traceback(
    make_client: Callable[..., TestClient], tiny_artifacts_dir: Path
) -> None:
    class Broken(ArtifactSet):
        def score(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("secret internal detail")

    client = make_client(loader=lambda: Broken(tiny_artifacts_dir))
    response = post(client, "/api/predict", {"customer_id": "c", "features": FEATURES_BODY})
    assert_error(response, 500, None, "internal_error")
    assert "secret internal detail" not in response.text
    assert response.headers["x-correlation-id"] in response.json()["error"]["message"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [*FEATURE_NAMES, "customer_id", "features", "invoices", "client", "records", "x"]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@hyp_settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=JSON, path=st.sampled_from(["/api/predict", "/api/predict_batch"]))
def test_no_json_input_produces_a_5xx(
    tiny_artifacts: ArtifactSet, tiny_artifacts_dir: Path, body: Any, path: str
) -> None:
    client = _shared_client(tiny_artifacts, tiny_artifacts_dir)
    response = post(client, path, body)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert "error" in response.json()


@hyp_settings(max_examples=100, deadline=None)
@given(
    features=st.fixed_dictionaries(
        {n: st.floats(allow_nan=False, allow_infinity=False, width=64) for n in FEATURE_NAMES}
    )
)
def test_any_feature_values_are_scored_or_refused_with_a_location(
    tiny_artifacts: ArtifactSet, tiny_artifacts_dir: Path, features: dict[str, float]
) -> None:
    client = _shared_client(tiny_artifacts, tiny_artifacts_dir)
    response = post(client, "/api/predict", {"customer_id": "h", "features": features})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert response.json()["error"]["location"].startswith("features.")
    else:
        assert 0.0 <= response.json()["theft_probability"] <= 1.0


_CLIENTS: dict[str, TestClient] = {}


def _shared_client(artifacts: ArtifactSet, directory: Path) -> TestClient:
    key = str(directory)
    if key not in _CLIENTS:
        app = create_app(Settings(model_dir=directory), lambda: artifacts)
        _CLIENTS[key] = TestClient(app, raise_server_exceptions=False)
    return _CLIENTS[key]


# --- model loading ------------------------------------------------------------------------------


def test_health_503_when_loader_fails_then_recovers(tiny_artifacts: ArtifactSet) -> None:
    calls: list[int] = []

    def loader() -> ArtifactSet:
        calls.append(1)
        if len(calls) == 1:
            raise ModelError("artifact random_forest.npz fails its checksum: refusing to load")
        return tiny_artifacts

    settings = Settings()
    app = create_app(settings, loader, retry_backoff=(0.0, 0.0))
    with TestClient(app) as client:  # lifespan: the cold-start load fails
        assert calls == [1]
        assert app.state.model_holder.artifacts is None
        response = client.get("/api/health")  # a zero backoff: this request retries
    assert len(calls) == 2
    assert response.status_code == 200
    assert response.json()["model_version"] == tiny_artifacts.version


def test_unavailable_model_answers_503_with_reason_and_backs_off(
    make_client: Callable[..., TestClient],
) -> None:
    calls: list[int] = []

    def loader() -> ArtifactSet:
        calls.append(1)
        raise ModelError("no model is active: current.json is missing")

    client = make_client(loader=loader)
    health = client.get("/api/health")
    assert health.status_code == 503
    assert health.json()["status"] == "unhealthy"
    assert "current.json is missing" in health.json()["reason"]
    response = post(client, "/api/predict", {"customer_id": "c", "features": FEATURES_BODY})
    assert_error(response, 503, None, "model_unavailable")
    assert "current.json is missing" in response.json()["error"]["message"]
    assert int(response.headers["retry-after"]) >= 1
    assert len(calls) == 1  # within the backoff: no reload per request


def test_model_holder_backoff_doubles_and_caps() -> None:
    now = [0.0]
    attempts: list[float] = []

    def loader() -> ArtifactSet:
        attempts.append(now[0])
        raise OSError("storage unreachable")

    holder = ModelHolder(loader, backoff=(2.0, 5.0), clock=lambda: now[0])
    for t in (0.0, 1.0, 2.0, 3.0, 6.0, 10.0, 11.0, 15.0):
        now[0] = t
        with pytest.raises(ModelUnavailable) as info:
            holder.load()
        assert "OSError: storage unreachable" in info.value.reason
    assert attempts == [0.0, 2.0, 6.0, 11.0]


# --- auth, CORS, correlation, logs ---------------------------------------------------------------


def test_api_keys(make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture) -> None:
    client = make_client(api_keys=(f"billing:{KEY}", f"field:{'f' * 20}"))
    body = {"customer_id": "CUSTOMER-SECRET-77", "features": FEATURES_BODY}
    assert_error(post(client, "/api/predict", body), 401, "header.x-api-key", "unauthorized")
    assert_error(
        post(client, "/api/predict", body, headers={"x-api-key": KEY + "x"}),
        401,
        "header.x-api-key",
    )
    assert client.get("/api/model_info").status_code == 401
    assert client.get("/api/health").status_code == 200  # open for probes
    with caplog.at_level(logging.INFO, logger="detector.requests"):
        ok = client.post(
            "/api/predict",
            content=json.dumps(body),
            headers={"content-type": "application/json", "x-api-key": KEY},
        )
    assert ok.status_code == 200
    fields = [r.fields for r in caplog.records if hasattr(r, "fields")]
    assert fields[-1]["caller"] == "billing"
    assert KEY not in caplog.text and "CUSTOMER-SECRET-77" not in caplog.text
    functions_key = client.get("/api/features", headers={"x-functions-key": "f" * 20})
    assert functions_key.status_code == 200
    schema = client.get("/api/openapi.json").json()
    assert schema["paths"]["/api/predict"]["post"]["security"] == [{"ApiKey": []}]


def test_no_keys_configured_means_no_local_auth(client: TestClient) -> None:
    assert client.get("/api/model_info").status_code == 200


def test_bad_api_key_setting_is_a_config_error(tiny_artifacts: ArtifactSet) -> None:
    with pytest.raises(ConfigError, match="PTD_API_KEYS"):
        create_app(Settings(api_keys=("no-separator",)), lambda: tiny_artifacts)


def test_cors_only_from_the_allowlist(make_client: Callable[..., TestClient]) -> None:
    closed = make_client()
    response = closed.get("/api/health", headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in response.headers
    client = make_client(cors_origins=("https://billing.example",))
    preflight = {
        "access-control-request-method": "POST",
        "access-control-request-headers": "content-type,x-api-key",
    }
    allowed = client.options(
        "/api/predict", headers={"origin": "https://billing.example", **preflight}
    )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://billing.example"
    denied = client.options("/api/predict", headers={"origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in denied.headers
    simple = client.get("/api/health", headers={"origin": "https://billing.example"})
    assert simple.headers["access-control-allow-origin"] == "https://billing.example"
    assert "x-correlation-id" in simple.headers["access-control-expose-headers"]


def test_correlation_id_echo_and_traceparent(client: TestClient) -> None:
    echoed = client.get("/api/health", headers={"x-correlation-id": "job-42.batch_7"})
    assert echoed.headers["x-correlation-id"] == "job-42.batch_7"
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = client.get("/api/health", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
    assert traced.headers["x-correlation-id"] == trace
    unsafe = client.get("/api/health", headers={"x-correlation-id": "a b\tc" + "x" * 200})
    assert len(unsafe.headers["x-correlation-id"]) == 32
    assert unsafe.headers["x-correlation-id"] != echoed.headers["x-correlation-id"]


def test_one_structured_log_line_per_request(
    client: TestClient, caplog: pytest.LogCaptureFixture, tiny_artifacts: ArtifactSet
) -> None:
    records = [{"customer_id": f"PRIVATE-{i}", "features": FEATURES_BODY} for i in range(3)]
    with caplog.at_level(logging.INFO, logger="detector.requests"):
        response = post(
            client,
            "/api/predict_batch",
            {"records": records},
            headers={"x-correlation-id": "corr-1"},
        )
    assert response.status_code == 200
    lines = [r for r in caplog.records if r.name == "detector.requests"]
    assert len(lines) == 1
    line = json.loads(JsonFormatter().format(lines[0]))
    assert line["event"] == "request"
    assert line["method"] == "POST" and line["path"] == "/api/predict_batch"
    assert line["status"] == 200 and line["correlation_id"] == "corr-1"
    assert line["customers"] == 3 and line["model_version"] == tiny_artifacts.version
    assert line["duration_ms"] > 0
    assert json.loads(lines[0].getMessage()) == lines[0].fields  # structured for any handler
    assert "PRIVATE-" not in caplog.text


def test_metrics_count_predictions(client: TestClient, tiny_artifacts: ArtifactSet) -> None:
    labels = {"model": "lightgbm", "model_version": tiny_artifacts.version}
    before = METRICS.counter_value("predictions_total", labels)
    records = [{"customer_id": str(i), "features": FEATURES_BODY} for i in range(4)]
    post(client, "/api/predict_batch", {"records": records})
    assert METRICS.counter_value("predictions_total", labels) == before + 4
    histograms = METRICS.snapshot()["histograms"]
    assert any(h["count"] > 0 for h in histograms["model_latency_ms"])


def test_correlation_from_headers_rules() -> None:
    assert correlation_from_headers("abc-1", None) == "abc-1"
    assert correlation_from_headers(None, "00-" + "0" * 32 + "-" + "1" * 16 + "-01") != "0" * 32
    made = correlation_from_headers("bad id\n", "garbage")
    assert len(made) == 32 and int(made, 16) >= 0


def test_records_module_imports_no_http_framework() -> None:
    """detector.records is the domain side of the API: validating and scoring records must not
    need FastAPI or Starlette (detector.api is the HTTP app)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    code = (
        "import sys, detector.records\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette'})\n"
        "print(','.join(loaded))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert run.stdout.strip() == "", f"detector.records imports {run.stdout.strip()}"
