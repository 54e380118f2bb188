"""Issue 13, class 5 on the API side: bad records cost what good ones do (validation stops at
a record's first bad invoice row; objects with thousands of unknown keys are refused before
validation), and the budget of request bodies in work per instance (`BodyBudget`,
`PTD_MAX_INFLIGHT_BODY_BYTES`): arrival order, shrinking, refusal with 503 and Retry-After.
Memory measured from outside a real server: tests/test_api_memory.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from detector.api import create_app
from detector.config import ConfigError, Settings
from detector.limits import BodyBudget, BudgetFull
from detector.model import ArtifactSet
from detector.records import score_records
from tests.synthetic import make_steg
from tests.test_api import FEATURES_BODY, a_history, assert_error, history_body, post

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def steg() -> tuple[pd.DataFrame, pd.DataFrame]:
    return make_steg(12, seed=13)


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


# --- class 5: the budget of bodies in work -----------------------------------------------------


def test_inflight_budget_below_body_limit_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"PTD_MAX_INFLIGHT_BODY_BYTES=1000 .*PTD_MAX_BODY_BYTES"):
        Settings.from_env({"PTD_MAX_BODY_BYTES": "2000", "PTD_MAX_INFLIGHT_BODY_BYTES": "1000"})
    settings = Settings.from_env({})
    assert settings.max_inflight_body_bytes >= settings.max_body_bytes


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_budget_grants_in_arrival_order_and_shrinks() -> None:
    async def scenario() -> list[str]:
        budget = BodyBudget(100)
        order: list[str] = []
        gate = asyncio.Event()

        async def hold(name: str, size: int, shrink_to: int | None = None) -> None:
            async with budget.reserve(size, 5.0) as reservation:
                order.append(name)
                if shrink_to is not None:
                    reservation.shrink(shrink_to)
                await gate.wait()

        first = asyncio.create_task(hold("first", 60, shrink_to=10))
        await asyncio.sleep(0)
        assert budget.in_use == 10  # shrunk: 50 given back
        big = asyncio.create_task(hold("big", 95))
        await asyncio.sleep(0)
        small = asyncio.create_task(hold("small", 5))  # fits, but must not overtake "big"
        await asyncio.sleep(0.01)
        assert order == ["first"] and budget.in_use == 10
        gate.set()
        await asyncio.gather(first, big, small)
        assert budget.in_use == 0
        return order

    assert _run(scenario()) == ["first", "big", "small"]


def test_budget_refuses_after_the_wait_and_lets_the_next_one_in() -> None:
    async def scenario() -> None:
        budget = BodyBudget(100)
        release = asyncio.Event()

        async def holder() -> None:
            async with budget.reserve(80, 1.0):
                await release.wait()

        task = asyncio.create_task(holder())
        await asyncio.sleep(0)
        with pytest.raises(BudgetFull) as full:
            async with budget.reserve(50, 0.05):
                pass
        assert (full.value.wanted, full.value.in_use, full.value.capacity) == (50, 80, 100)
        async with budget.reserve(20, 0.05):  # the refused one left the queue
            assert budget.in_use == 100
        waiter = asyncio.create_task(_reserve_and_hold(budget, 50))
        await asyncio.sleep(0.01)
        waiter.cancel()  # a client gone while waiting: nothing stays reserved
        with pytest.raises(asyncio.CancelledError):
            await waiter
        release.set()
        await task
        assert budget.in_use == 0 and not budget._waiters

    _run(scenario())


async def _reserve_and_hold(budget: BodyBudget, size: int) -> None:
    async with budget.reserve(size, 5.0):
        await asyncio.sleep(10)


def test_a_full_budget_answers_503_json_with_retry_after(tiny_artifacts: ArtifactSet) -> None:
    """A body that is being received holds its room; another one waits `admission_wait`, then
    gets 503 `overloaded` with Retry-After; once the first is done, the next one is served."""
    settings = Settings(max_body_bytes=20_000, max_inflight_body_bytes=20_000)
    app = create_app(settings, lambda: tiny_artifacts, admission_wait=0.2)
    body = json.dumps({"customer_id": "c", "features": FEATURES_BODY}).encode()

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        proceed = asyncio.Event()

        async def slow_body() -> AsyncIterator[bytes]:  # chunked: reserves the whole limit
            yield body[:10]
            await proceed.wait()
            yield body[10:]

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            first = asyncio.create_task(
                http.post("/api/predict", content=slow_body(), headers=JSON)
            )
            await asyncio.sleep(0.05)
            refused = await http.post("/api/predict", content=body, headers=JSON)
            proceed.set()
            done = await first
            again = await http.post("/api/predict", content=body, headers=JSON)
        return refused, done, again

    refused, done, again = asyncio.run(scenario())
    assert_error(refused, 503, None, "overloaded")
    assert refused.headers["retry-after"] == "5"
    assert "20000" in refused.json()["error"]["message"]
    assert done.status_code == 200 and again.status_code == 200


# --- objects per byte: refused before parsing ---------------------------------------------------


def test_a_body_of_tiny_objects_is_refused_before_it_is_parsed(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records of `{"":0}` cost 31 to 40 bytes of memory per body byte once parsed; more objects
    than the bytes allow are a 400 and the parser never runs."""
    import pydantic_core

    import detector.api as api

    parsed: list[int] = []
    real = pydantic_core.from_json

    def counting(data: Any, **kwargs: Any) -> Any:
        parsed.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(pydantic_core, "from_json", counting)
    body = '{"records":[' + ",".join(['{"":0}'] * 20_000) + "]}"
    response = client.post("/api/predict_batch", content=body, headers=JSON)
    assert_error(response, 400, "body", "too_many_objects")
    assert "20,002 JSON objects or arrays" in response.json()["error"]["message"]
    assert parsed == []
    # At the edge: exactly as many as allowed is parsed (and then judged on its content).
    size = len(body)
    allowed = api.FREE_CONTAINERS + size // api.BYTES_PER_CONTAINER
    fits = '{"records":[' + ",".join(['{"":0}'] * (allowed - 1)) + "]}"
    fits += " " * (api.BYTES_PER_CONTAINER * allowed)  # whitespace: bytes, no objects
    response = client.post("/api/predict_batch", content=fits, headers=JSON)
    assert response.status_code != 400 or response.json()["error"]["code"] != "too_many_objects"
    assert parsed


def test_real_histories_are_far_from_the_objects_limit(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    """The densest real body: records of invoices with only their required fields, compact."""
    import detector.api as api
    from detector.schema import REQUIRED_INVOICE_COLUMNS

    required = [c for c in REQUIRED_INVOICE_COLUMNS if c != "client_id"]
    records = []
    clients, invoices = steg
    for client_id in clients["client_id"]:
        history = history_body(invoices, clients, client_id)
        history["invoices"] = [{key: row[key] for key in required} for row in history["invoices"]]
        records.append(history)
    body = json.dumps({"records": records * 50}, separators=(",", ":")).encode()
    containers = body.count(b"{") + body.count(b"[")
    assert len(body) / containers > 3 * api.BYTES_PER_CONTAINER
    response = client.post("/api/predict_batch", content=body, headers=JSON)
    assert response.status_code == 200, response.text
    assert response.json()["failed"] == 0
