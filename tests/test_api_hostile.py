"""Issue 13, class 5 on the API side: bad records cost what good ones do (validation stops at
a record's first bad invoice row; objects with thousands of unknown keys are refused before
validation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from detector.config import Settings
from detector.model import ArtifactSet
from detector.records import score_records
from tests.synthetic import make_steg
from tests.test_api import FEATURES_BODY, assert_error, history_body, post


@pytest.fixture(scope="module")
def steg() -> tuple[pd.DataFrame, pd.DataFrame]:
    return make_steg(12, seed=13)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


def a_history(steg: tuple[pd.DataFrame, pd.DataFrame], k: int = 0) -> dict[str, Any]:
    clients, invoices = steg
    body = history_body(invoices, clients, clients["client_id"].iloc[k])
    assert len(body["invoices"]) >= 2
    return body


# --- class 5: bad records cost what good ones do ------------------------------------------------


def test_records_of_empty_invoice_objects_fail_fast(tiny_artifacts: ArtifactSet) -> None:
    """The case of issue 13: 100 records of 2,000 `{}` (took 7 s and hundreds of MB)."""
    records = [{"customer_id": "e", "invoices": [{}] * 2000} for _ in range(100)]
    started = time.perf_counter()
    outcome = score_records(
        records, tiny_artifacts, "lightgbm", Settings(), lambda i: f"records[{i}]"
    )
    assert time.perf_counter() - started < 2.0
    assert outcome.scored == 0
    for i, item in enumerate(outcome.items):
        assert not isinstance(item, dict)
        assert item.code == "missing_field"
        assert item.location == f"records[{i}].invoices[0].invoice_date"
        assert 1 < len(item.details) <= 20  # one row's errors: the first bad row stops it
        assert {d["location"].split(".")[1] for d in item.details} == {"invoices[0]"}


@pytest.mark.parametrize(
    ("where", "location"),
    [
        ("record", "k0"),
        ("features", "features.k0"),
        ("client", "client.k0"),
        ("invoice", "invoices[1].k0"),
    ],
)
def test_objects_with_thousands_of_unknown_keys_are_refused_at_once(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame], where: str, location: str
) -> None:
    junk = {f"k{i}": 0 for i in range(100_000)}
    if where == "features":
        body: dict[str, Any] = {"customer_id": "c", "features": {**junk, **FEATURES_BODY}}
    else:
        body = a_history(steg)
        if where == "record":
            body = {**junk, **body}
        elif where == "client":
            body["client"] = {**junk, **body["client"]}
        else:
            body["invoices"][1] = {**junk, **body["invoices"][1]}
    started = time.perf_counter()
    response = post(client, "/api/predict", body)
    assert time.perf_counter() - started < 5.0
    assert_error(response, 422, location, "unknown_field")
    assert response.json()["error"]["message"] == "unknown field 'k0'"


def test_a_few_unknown_keys_are_all_listed(client: TestClient) -> None:
    features = {**FEATURES_BODY, "typo_a": 1, "typo_b": 2}
    response = post(client, "/api/predict", {"customer_id": "c", "features": features})
    assert_error(response, 422, "features.typo_a", "unknown_field")
    details = [d["location"] for d in response.json()["error"]["details"]]
    assert details == ["features.typo_a", "features.typo_b"]


def test_in_a_batch_the_guard_fails_only_that_record(client: TestClient) -> None:
    junk = {f"k{i}": 0 for i in range(5_000)}
    records = [
        {"customer_id": "a", "features": FEATURES_BODY},
        {"customer_id": "b", "features": {**FEATURES_BODY, **junk}},
    ]
    body = post(client, "/api/predict_batch", {"records": records}).json()
    assert body["results"][1]["error"]["location"] == "records[1].features.k0"
    assert (body["scored"], body["failed"]) == (1, 1)
