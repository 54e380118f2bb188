"""Faults against Azurite: the service reports, recovers, and loses no result.

* The model store unreachable, or a model file tampered with, at cold start: /api/health and
  the scoring routes answer 503 with the reason; once the store is fixed the app loads the model
  on its own (ModelHolder's retry, here with a zero backoff) and serves.
* A batch file deleted while it is being read (chunked download): the run reports it and writes
  nothing for it; outputs of files scored before are untouched.
* A worker killed (SIGKILL) mid-batch, after results.csv is written and before summary.json:
  the blob delivered again is scored completely, with outputs identical to a clean run and no
  duplicate rows.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from detector.api import create_app
from detector.blob_batch import output_prefix, process_blob
from detector.config import Settings
from detector.model import ArtifactSet
from detector.store import ModelStore, blob_service_client, load_artifacts
from detector.telemetry import EVENT_MODEL_LOAD_FAILED
from tests.azurite import DEV_ACCOUNT_KEY, connection_string, free_port
from tests.logs import Records, attached
from tests.synthetic import make_steg

pytestmark = [pytest.mark.azurite, pytest.mark.xdist_group("azurite")]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def logs() -> Iterator[Records]:
    with attached(Records()) as handler:
        yield handler


def _store_settings(tmp_path: Path) -> Settings:
    return Settings(
        model_source="blob",
        model_container=f"models-{uuid.uuid4().hex[:12]}",
        model_cache_dir=tmp_path / "cache",
    )


def _app(settings: Settings, env: dict[str, str]) -> Any:
    # The real cold-start path (pointer, download, SHA-256 check, load) with the environment
    # read at each attempt; storage retries off and a short connect timeout keep the test quick.
    def loader() -> ArtifactSet:
        return load_artifacts(settings, dict(env), retry_total=0, connection_timeout=2)

    return create_app(settings, loader, retry_backoff=(0.0, 0.0))


def _predict_body(artifacts_dir: Path) -> dict[str, Any]:
    from detector.features import FEATURE_NAMES

    typical = ArtifactSet(artifacts_dir).typical
    return {
        "customer_id": "fault-1",
        "features": {n: float(v) for n, v in zip(FEATURE_NAMES, typical, strict=True)},
    }


# --- model store at cold start ---------------------------------------------------------------


def test_unreachable_model_store_reports_503_then_recovers(
    azurite: str, tmp_path: Path, tiny_artifacts_dir: Path, logs: Records
) -> None:
    settings = _store_settings(tmp_path)
    dead = free_port()  # nothing listens here
    env = {"STORAGE": connection_string(dead)}
    body = _predict_body(tiny_artifacts_dir)
    with TestClient(_app(settings, env), raise_server_exceptions=False) as client:
        health = client.get("/api/health")
        assert health.status_code == 503
        assert f"127.0.0.1:{dead}" in health.json()["reason"]
        assert int(health.headers["retry-after"]) >= 1
        scored = client.post("/api/predict", json=body)
        assert scored.status_code == 503
        assert scored.json()["error"]["code"] == "model_unavailable"

        # The store comes back (and has a model): the next request loads it and is served.
        env["STORAGE"] = azurite
        version = ModelStore.from_settings(settings, env).publish(tiny_artifacts_dir, activate=True)
        health = client.get("/api/health")
        assert health.status_code == 200, health.text
        assert health.json()["model_version"] == version
        assert client.post("/api/predict", json=body).status_code == 200
    failures = [r for r in logs.records if getattr(r, "event", None) == EVENT_MODEL_LOAD_FAILED]
    assert failures, "no model_load_failed event was logged"
    for record in logs.records:  # the connection string's key is never logged
        assert DEV_ACCOUNT_KEY not in record.getMessage()


def test_tampered_model_is_refused_until_restored(
    azurite: str, tmp_path: Path, tiny_artifacts_dir: Path
) -> None:
    settings = _store_settings(tmp_path)
    env = {"STORAGE": azurite}
    store = ModelStore.from_settings(settings, env)
    version = store.publish(tiny_artifacts_dir, activate=True)
    name = f"{version}/random_forest.npz"
    original = (tiny_artifacts_dir / "random_forest.npz").read_bytes()
    store.container.upload_blob(name, original[:-1] + bytes([original[-1] ^ 1]), overwrite=True)
    body = _predict_body(tiny_artifacts_dir)
    with TestClient(_app(settings, env), raise_server_exceptions=False) as client:
        health = client.get("/api/health")
        assert health.status_code == 503
        assert "random_forest.npz fails its checksum" in health.json()["reason"]
        assert client.post("/api/predict", json=body).status_code == 503
        store.container.upload_blob(name, original, overwrite=True)  # the operator restores it
        assert client.get("/api/health").status_code == 200
        assert client.post("/api/predict", json=body).status_code == 200


# --- batch files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export() -> bytes:
    """A billing export (invoice rows with client attributes), about 100 clients."""
    clients, rows = make_steg(100, seed=11)
    frame = rows.merge(clients.drop(columns="target"), on="client_id", how="left")
    return frame.to_csv(index=False).encode()


@pytest.fixture
def containers(azurite: str) -> dict[str, str]:
    env = {"STORAGE": azurite}
    service = blob_service_client(Settings(), env)
    for name in ("batch-in", "batch-out"):
        if not service.get_container_client(name).exists():
            service.create_container(name)
    return env


def _outputs(env: dict[str, str], prefix: str) -> dict[str, bytes]:
    out = blob_service_client(Settings(), env).get_container_client("batch-out")
    return {
        b.name[len(prefix) + 1 :]: out.download_blob(b.name).readall()
        for b in out.list_blobs(name_starts_with=prefix + "/")
    }


def _blob_client(env: dict[str, str], name: str, **options: Any) -> Any:
    from azure.storage.blob import BlobClient

    return BlobClient.from_connection_string(env["STORAGE"], "batch-in", name, **options)


def _upload(env: dict[str, str], name: str, data: bytes) -> None:
    _blob_client(env, name).upload_blob(data, overwrite=True)


def _results(data: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(data), dtype={"client_id": str}, keep_default_na=False)


def test_file_deleted_while_being_read_is_reported_and_earlier_results_stay(
    containers: dict[str, str], export: bytes, tiny_artifacts: ArtifactSet
) -> None:
    env = containers
    settings = Settings()
    earlier = f"faults/earlier-{uuid.uuid4().hex[:8]}.csv"
    _upload(env, earlier, export)
    done = process_blob(_blob_client(env, earlier), settings, tiny_artifacts, env)
    before = _outputs(env, output_prefix(earlier))
    assert {"results.csv", "summary.json"} <= set(before)

    name = f"faults/vanishing-{uuid.uuid4().hex[:8]}.csv"
    _upload(env, name, export)
    deleted: list[int] = []

    def delete_after_first_chunk(response: Any) -> None:
        http = response.http_response
        if http.request.method == "GET" and http.status_code == 206 and not deleted:
            deleted.append(1)
            _blob_client(env, name).delete_blob()

    chunk = 16 * 1024
    assert len(export) > 4 * chunk  # several chunks, so the deletion lands mid-read
    client = _blob_client(
        env,
        name,
        max_single_get_size=chunk,
        max_chunk_get_size=chunk,
        raw_response_hook=delete_after_first_chunk,
    )
    report = process_blob(client, settings, tiny_artifacts, env)
    assert deleted == [1]
    # Azurite answers the ETag-pinned range read of a deleted blob with 412 (condition failed),
    # which process_blob reports as "replaced"; Azure answers 404 ("deleted"). Either way the
    # run says the input changed while being read and scores nothing from a partial file.
    assert re.search(r"input blob was (deleted|replaced) while being read", report["skipped"])
    assert _outputs(env, output_prefix(name)) == {}  # nothing half-done is left behind
    assert _outputs(env, output_prefix(earlier)) == before  # earlier results are intact
    assert done["clients_scored"] > 0


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import detector.blob_batch as blob_batch
    from azure.storage.blob import BlobClient
    from detector.config import Settings
    from detector.model import ArtifactSet

    connection, name, artifacts = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    upload_json = blob_batch._upload_json

    def upload_then_die(container, blob_name, value, **conditions):
        if blob_name.endswith("/" + blob_batch.SUMMARY):
            # results.csv is written; the worker dies before the summary (the "done" marker).
            print("killing myself before", blob_name, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        upload_json(container, blob_name, value, **conditions)

    blob_batch._upload_json = upload_then_die
    client = BlobClient.from_connection_string(connection, "batch-in", name)
    blob_batch.process_blob(client, Settings(), ArtifactSet(artifacts), {"STORAGE": connection})
    print("finished without being killed", flush=True)
    """
)


def test_worker_killed_mid_batch_then_redelivered_loses_and_duplicates_nothing(
    containers: dict[str, str],
    export: bytes,
    tiny_artifacts: ArtifactSet,
    tiny_artifacts_dir: Path,
) -> None:
    env = containers
    settings = Settings()
    stem = uuid.uuid4().hex[:8]
    clean, killed = f"faults/clean-{stem}.csv", f"faults/killed-{stem}.csv"
    _upload(env, clean, export)
    _upload(env, killed, export)
    reference = process_blob(_blob_client(env, clean), settings, tiny_artifacts, env)
    expected = _outputs(env, output_prefix(clean))

    child_env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, env["STORAGE"], killed, str(tiny_artifacts_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env,
        cwd=REPO,
    )
    assert run.returncode == -signal.SIGKILL, (run.returncode, run.stdout, run.stderr[-2000:])
    partial = _outputs(env, output_prefix(killed))
    assert "results.csv" in partial and "summary.json" not in partial  # died mid-batch

    # Event Grid delivers the blob again; this time the worker lives.
    summary = process_blob(_blob_client(env, killed), settings, tiny_artifacts, env)
    outputs = _outputs(env, output_prefix(killed))
    assert set(outputs) == set(expected)
    assert outputs["results.csv"] == expected["results.csv"]  # identical to a clean run
    if "rejects.csv" in expected:
        assert outputs["rejects.csv"] == expected["rejects.csv"]
    results = _results(outputs["results.csv"])
    assert not results["client_id"].duplicated().any()
    assert len(results) == summary["clients_scored"] == reference["clients_scored"]
    final = json.loads(outputs["summary.json"])
    assert final["input_etag"] == summary["input_etag"]
    # A third delivery finds the summary for this ETag and does nothing.
    again = process_blob(_blob_client(env, killed), settings, tiny_artifacts, env)
    assert again == final
    assert _outputs(env, output_prefix(killed)) == outputs


# --- no customer data and no secret in any log line ----------------------------------------------

SECRET_PREFIX = "CUSTSECRET"
API_KEY = "live-key-" + "Zq8" * 8
WRONG_KEY = "wrong-key-" + "Pp4" * 8
MARKER_VALUE = 123.456789  # a feature value that must never reach a log line


def test_no_customer_data_or_secret_in_any_log_line(
    containers: dict[str, str], tiny_artifacts: ArtifactSet, tiny_artifacts_dir: Path, logs: Records
) -> None:
    from detector.telemetry import JsonFormatter, observe_blob_run

    clients, rows = make_steg(30, seed=3)
    ids = {cid: f"{SECRET_PREFIX}{i:05d}" for i, cid in enumerate(clients["client_id"])}
    clients["client_id"] = clients["client_id"].map(ids)
    rows["client_id"] = rows["client_id"].map(ids)
    secret_ids = sorted(ids.values())

    settings = Settings(model_dir=tiny_artifacts_dir, api_keys=(f"billing:{API_KEY}",))
    features = _predict_body(tiny_artifacts_dir)["features"]
    features["cons_max"] = MARKER_VALUE  # a numeric feature: any value in range is valid
    history_rows = json.loads(
        rows[rows["client_id"] == secret_ids[1]].drop(columns="client_id").to_json(orient="records")
    )
    key = {"x-api-key": API_KEY}
    with TestClient(
        create_app(settings, lambda: tiny_artifacts), raise_server_exceptions=False
    ) as client:
        ok = client.post(
            "/api/predict", json={"customer_id": secret_ids[0], "features": features}, headers=key
        )
        assert ok.status_code == 200
        history = {"customer_id": secret_ids[1], "invoices": history_rows}
        assert client.post("/api/predict", json=history, headers=key).status_code == 200
        batch = {
            "records": [
                {"customer_id": secret_ids[2], "features": features},
                {"customer_id": secret_ids[3], "features": {**features, "elec_n_meters": "x"}},
                {"customer_id": secret_ids[4], "invoices": [{"client_id": secret_ids[5]}]},
            ]
        }
        answer = client.post("/api/predict_batch", json=batch, headers=key)
        assert answer.status_code == 200
        assert answer.json()["failed"] == 2
        # Errors: wrong key, malformed JSON, invalid values, over the history limit.
        wrong = {"x-api-key": WRONG_KEY}
        body = {"customer_id": secret_ids[6], "features": features}
        assert client.post("/api/predict", json=body, headers=wrong).status_code == 401
        broken = f'{{"customer_id": "{secret_ids[7]}", "features": {{'.encode()
        headers = {**key, "content-type": "application/json"}
        assert client.post("/api/predict", content=broken, headers=headers).status_code == 400
        bad = {"customer_id": secret_ids[8], "features": {**features, "region": secret_ids[8]}}
        assert client.post("/api/predict", json=bad, headers=key).status_code == 422
        many = {"customer_id": secret_ids[9], "invoices": history_rows * 2000}
        assert client.post("/api/predict", json=many, headers=key).status_code == 413
        assert client.get("/api/metrics", headers=key).status_code == 200

    # A blob run through the function's path (trace, audit), with a rejected row.
    frame = rows.merge(clients.drop(columns="target"), on="client_id", how="left")
    frame.loc[frame.index[0], "counter_statue"] = "garbage-" + secret_ids[10]
    name = f"faults/private-{uuid.uuid4().hex[:8]}.csv"
    _upload(containers, name, frame.to_csv(index=False).encode())
    summary = observe_blob_run(
        name,
        lambda: process_blob(
            _blob_client(containers, name), Settings(), tiny_artifacts, containers
        ),
    )
    assert summary["clients_scored"] > 0

    formatter = JsonFormatter()
    lines = []
    for record in logs.records:
        lines.append(formatter.format(record))
        lines.append(record.getMessage())
        lines.append(repr(record.__dict__))
    assert any('"event":"audit"' in line for line in lines)
    forbidden = [*secret_ids, SECRET_PREFIX, API_KEY, WRONG_KEY, DEV_ACCOUNT_KEY, str(MARKER_VALUE)]
    leaks = [(value, line[:200]) for line in lines for value in forbidden if value in line]
    assert not leaks, leaks[:5]
