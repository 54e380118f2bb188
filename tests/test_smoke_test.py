"""scripts/smoke_test.py, the deploy workflow's post-deploy smoke test, run against stand-ins.

* The HTTP checks run against `ptd serve` on 127.0.0.1 (the same ASGI app as in Azure) with
  the bundled model: health, then one golden prediction compared with `ptd score`.
* The batch check runs against Azurite; the test plays the Event Grid blob trigger by calling
  `detector.blob_batch.process_blob` (the code `score_batch_blob` runs) for each new blob in
  `batch-in`. A trigger that never fires, a file it refuses and a wrong score must each fail.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from scripts import smoke_test
from scripts.smoke_test import Expected, SmokeFailure
from tests.azurite import accepts, free_port

GOLDEN = smoke_test.GOLDEN


@pytest.fixture(scope="module")
def expected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Expected]:
    return smoke_test.expected_scores(GOLDEN, tmp_path_factory.mktemp("golden"))


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "detector", "serve", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not accepts(port):
            assert process.poll() is None, "ptd serve exited"
            assert time.monotonic() < deadline, "ptd serve did not listen"
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_golden_file_covers_several_clients(expected: dict[str, Expected]) -> None:
    assert len(expected) >= 3
    versions = {e.model_version for e in expected.values()}
    assert len(versions) == 1 and versions != {""}
    assert all(0.0 <= e.probability <= 1.0 for e in expected.values())


def test_predict_body_types_the_invoices() -> None:
    body = smoke_test.predict_body(GOLDEN, "smoke-1")
    assert body["customer_id"] == "smoke-1"
    first = body["invoices"][0]
    assert isinstance(first["counter_statue"], str) and isinstance(first["invoice_date"], str)
    assert isinstance(first["consommation_level_1"], int)
    with pytest.raises(SmokeFailure, match="no invoice"):
        smoke_test.predict_body(GOLDEN, "nobody")


def test_http_check_passes_against_the_app(server: str, expected: dict[str, Expected]) -> None:
    version = smoke_test.check_http(server, "any-key", GOLDEN, expected, attempts=2, wait=0)
    assert version == next(iter(expected.values())).model_version


def test_http_check_fails_on_a_wrong_score(server: str, expected: dict[str, Expected]) -> None:
    first = sorted(expected)[0]
    wrong = dict(expected)
    wrong[first] = replace(expected[first], probability=expected[first].probability + 0.01)
    with pytest.raises(SmokeFailure, match=f"{first}: scored"):
        smoke_test.check_http(server, "k", GOLDEN, wrong, attempts=1, wait=0)


def test_http_check_fails_on_another_model_version(
    server: str, expected: dict[str, Expected]
) -> None:
    other = {k: replace(v, model_version="19990101-0000000000") for k, v in expected.items()}
    with pytest.raises(SmokeFailure, match="the app serves model"):
        smoke_test.check_http(server, "k", GOLDEN, other, attempts=1, wait=0)


def test_http_check_waits_for_health_then_gives_up(expected: dict[str, Expected]) -> None:
    slept: list[float] = []
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    with pytest.raises(SmokeFailure, match="never answered 200"):
        smoke_test.check_http(url, "k", GOLDEN, expected, attempts=3, wait=7, sleep=slept.append)
    assert slept == [7, 7, 7]


# --- the blob trigger path, with Azurite --------------------------------------------------------


@pytest.fixture
def storage(azurite: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from detector.config import Settings
    from detector.store import blob_service_client

    monkeypatch.setenv("STORAGE", azurite)
    monkeypatch.delenv("PTD_MODEL_SOURCE", raising=False)
    service = blob_service_client(Settings.from_env())
    suffix = str(free_port())
    names = (f"in{suffix}", f"out{suffix}")
    for name in names:
        service.create_container(name)
    monkeypatch.setenv("PTD_BATCH_IN_CONTAINER", names[0])
    monkeypatch.setenv("PTD_BATCH_OUT_CONTAINER", names[1])
    yield service, names
    for name in names:
        service.delete_container(name)


class FakeTrigger:
    """Plays Event Grid + score_batch_blob: process_blob for each new blob in batch-in."""

    def __init__(self, service: Any, batch_in: str) -> None:
        from detector.config import Settings

        self.service, self.batch_in = service, batch_in
        self.settings = Settings.from_env()
        self.stop = threading.Event()
        self.seen: set[str] = set()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        from detector.blob_batch import process_blob

        container = self.service.get_container_client(self.batch_in)
        while not self.stop.is_set():
            for blob in container.list_blobs():
                if blob.name not in self.seen:
                    self.seen.add(blob.name)
                    process_blob(container.get_blob_client(blob.name), self.settings)
            time.sleep(0.1)

    def __enter__(self) -> FakeTrigger:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


@pytest.mark.azurite
@pytest.mark.xdist_group("azurite")
def test_batch_check_passes_when_the_trigger_scores_the_golden_file(
    storage: Any, expected: dict[str, Expected]
) -> None:
    service, (batch_in, batch_out) = storage
    with FakeTrigger(service, batch_in) as trigger:
        smoke_test.check_batch(
            service, batch_in, batch_out, GOLDEN, expected, "run-1", timeout=120, poll=0.2
        )
    assert trigger.seen == {"smoke/run-1/golden_invoices.csv"}
    # Cleaned up: neither the input nor the outputs stay behind.
    assert not list(service.get_container_client(batch_in).list_blobs())
    assert not list(service.get_container_client(batch_out).list_blobs())


@pytest.mark.azurite
@pytest.mark.xdist_group("azurite")
def test_batch_check_fails_on_a_wrong_score(storage: Any, expected: dict[str, Expected]) -> None:
    service, (batch_in, batch_out) = storage
    last = sorted(expected)[-1]
    wrong = dict(expected)
    wrong[last] = replace(expected[last], flagged=not expected[last].flagged)
    with FakeTrigger(service, batch_in), pytest.raises(SmokeFailure, match=f"{last}: scored"):
        smoke_test.check_batch(
            service, batch_in, batch_out, GOLDEN, wrong, "run-2", timeout=120, poll=0.2
        )


@pytest.mark.azurite
@pytest.mark.xdist_group("azurite")
def test_batch_check_fails_when_nothing_is_delivered(
    storage: Any, expected: dict[str, Expected]
) -> None:
    service, (batch_in, batch_out) = storage
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(SmokeFailure, match="not delivered to score_batch_blob"):
        smoke_test.check_batch(
            service,
            batch_in,
            batch_out,
            GOLDEN,
            expected,
            "run-3",
            timeout=60,
            poll=10,
            sleep=sleep,
            clock=lambda: now[0],
        )
    assert now[0] == 60
    assert not list(service.get_container_client(batch_in).list_blobs()), "input removed"


@pytest.mark.azurite
@pytest.mark.xdist_group("azurite")
def test_batch_check_fails_on_an_unusable_file(
    storage: Any, expected: dict[str, Expected], tmp_path: Path
) -> None:
    service, (batch_in, batch_out) = storage
    empty = tmp_path / "golden_invoices.csv"
    empty.write_text("")
    with FakeTrigger(service, batch_in), pytest.raises(SmokeFailure, match="could not use"):
        smoke_test.check_batch(
            service, batch_in, batch_out, empty, expected, "run-4", timeout=120, poll=0.2
        )


def test_main_needs_the_function_key(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    monkeypatch.delenv("SMOKE_FUNCTION_KEY", raising=False)
    assert smoke_test.main(["--app-url", "http://127.0.0.1:1", "--run-id", "x"]) == 1
    assert "::error::smoke test failed: set SMOKE_FUNCTION_KEY" in capsys.readouterr().out
