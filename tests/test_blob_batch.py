"""The blob-triggered batch, called through function_app.py against Azurite, and score_file.

The trigger's user code gets what the Functions host gives it: the host sends "model binding
data" (connection name, container, blob name) and `azurefunctions-extensions-bindings-blob`'s
converter turns it into a client. `host_blob_client` runs that same converter
(`BlobClientConverter.decode`), which builds an `azure.storage.blob.BlobClient` (the SDK type)
from the `STORAGE` setting, so the tests pass exactly the object the real host would.
"""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest

import detector.batch as batch
from detector.batch import READ_COLUMNS, score_file, score_frames
from detector.blob_batch import output_prefix
from detector.config import Settings
from detector.model import ArtifactSet
from detector.schema import InputError
from detector.tables import read_table
from tests.synthetic import make_steg

pytestmark = [pytest.mark.azurite, pytest.mark.xdist_group("azurite")]


# -- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def invoices() -> pd.DataFrame:
    """Invoice rows with the client attributes as extra columns (a typical export)."""
    clients, rows = make_steg(120, seed=7)
    return rows.merge(clients.drop(columns="target"), on="client_id", how="left")


class _ModelBindingData:
    """The fields of the worker's ModelBindingData message for a blob trigger."""

    def __init__(self, container: str, blob: str, connection: str = "STORAGE") -> None:
        self.version = "1.0"
        self.source = "AzureStorageBlobs"
        self.content_type = "application/json"
        self.content = json.dumps(
            {"Connection": connection, "ContainerName": container, "BlobName": blob}
        ).encode()


def host_blob_client(container: str, blob: str) -> Any:
    from azure.storage.blob import BlobClient as SdkBlobClient
    from azurefunctions.extensions.base import Datum
    from azurefunctions.extensions.bindings.blob import BlobClient, BlobClientConverter

    client = BlobClientConverter.decode(
        Datum(_ModelBindingData(container, blob), "model_binding_data"),
        trigger_metadata={},
        pytype=BlobClient,
    )
    assert isinstance(client, SdkBlobClient)
    return client


def _user_function(module: ModuleType) -> Any:
    return module.indexed["score_batch_blob"].get_user_function()


def _service() -> Any:
    from detector.store import blob_service_client

    return blob_service_client(Settings())


def _upload(name: str, data: bytes) -> None:
    _service().get_container_client("batch-in").upload_blob(name, data, overwrite=True)


def _outputs(prefix: str) -> dict[str, bytes]:
    out = _service().get_container_client("batch-out")
    return {
        blob.name[len(prefix) + 1 :]: out.download_blob(blob.name).readall()
        for blob in out.list_blobs(name_starts_with=prefix + "/")
    }


def _run(module: ModuleType, name: str) -> None:
    result = _user_function(module)(host_blob_client("batch-in", name))
    assert result is None  # the trigger returns nothing; outputs are blobs


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def _unique(stem: str, suffix: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"


def _results(data: bytes) -> pd.DataFrame:
    frame = pd.read_csv(io.BytesIO(data), dtype={"client_id": str}, keep_default_na=False)
    return frame.sort_values("client_id").reset_index(drop=True)


def _expected(frame: pd.DataFrame, artifacts: ArtifactSet) -> pd.DataFrame:
    result = score_frames(frame, artifacts).results
    return result.sort_values("client_id").reset_index(drop=True)


# -- the index ------------------------------------------------------------------------------------
def test_index_shows_the_blob_trigger(app_module: ModuleType) -> None:
    functions = app_module.indexed
    bindings = [json.loads(b) for b in functions["score_batch_blob"].get_raw_bindings()]
    assert bindings == [
        {
            "direction": "IN",
            "type": "blobTrigger",
            "name": "client",
            "path": "batch-in/{name}",
            "connection": "STORAGE",
            "source": "EventGrid",
        }
    ]
    import azurefunctions.extensions.bindings.blob as blob

    annotations = functions["score_batch_blob"].get_user_function().__annotations__
    assert annotations["client"] in (blob.BlobClient, "blob.BlobClient")


# -- good files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_good_file_scores_every_client(
    app_module: ModuleType, invoices: pd.DataFrame, tiny_artifacts: ArtifactSet, suffix: str
) -> None:
    name = _unique("exports/good", suffix)
    _upload(name, _csv(invoices) if suffix == ".csv" else _parquet(invoices))
    _run(app_module, name)
    outputs = _outputs(output_prefix(name))
    assert set(outputs) == {"results.csv", "summary.json"}
    results = _results(outputs["results.csv"])
    expected = _expected(invoices, tiny_artifacts)
    assert list(results["client_id"]) == list(expected["client_id"])
    assert np.allclose(results["theft_probability"], expected["theft_probability"], atol=1e-6)
    assert list(results["flagged"]) == list(expected["flagged"])
    assert list(results.columns) == list(batch.RESULT_COLUMNS)
    summary = json.loads(outputs["summary.json"])
    assert summary["input_blob"] == name
    assert summary["input_etag"]
    assert summary["input_rows"] == len(invoices)
    assert summary["clients_scored"] == invoices["client_id"].nunique()
    assert summary["rows_rejected"] == 0
    assert summary["model_version"] == tiny_artifacts.version
    assert summary["flagged_rate"] == pytest.approx(results["flagged"].mean(), abs=1e-5)
    assert {"download", "upload", "features", "scoring", "total"} <= set(summary["seconds"])


def test_features_table_is_accepted(
    app_module: ModuleType, invoices: pd.DataFrame, tiny_artifacts: ArtifactSet
) -> None:
    from detector.features import FEATURE_NAMES, compute_features
    from detector.schema import prepare_clients, prepare_invoices

    attrs = invoices[["client_id", "region", "creation_date"]].drop_duplicates("client_id")
    features = compute_features(prepare_invoices(invoices).frame, prepare_clients(attrs))
    table = features.reset_index()[["client_id", *FEATURE_NAMES]]
    name = _unique("features", ".parquet")
    _upload(name, _parquet(table))
    _run(app_module, name)
    summary = json.loads(_outputs(output_prefix(name))["summary.json"])
    assert summary["input_kind"] == "features"
    assert summary["clients_scored"] == len(table)


# -- bad rows, bad files --------------------------------------------------------------------------
def test_bad_rows_are_listed_and_no_client_is_lost(
    app_module: ModuleType, invoices: pd.DataFrame, tiny_artifacts: ArtifactSet
) -> None:
    frame = invoices.copy()
    frame["consommation_level_1"] = frame["consommation_level_1"].astype(object)
    frame.loc[3, "consommation_level_1"] = "lots"
    frame.loc[10, "invoice_date"] = "31/02/2020"
    frame.loc[11, "client_id"] = ""
    # A client whose only invoice is bad is rejected, not silently dropped.
    lonely = frame.iloc[[0]].copy()
    lonely["client_id"] = "lonely"
    lonely["months_number"] = -1
    frame = pd.concat([frame, lonely], ignore_index=True)
    name = _unique("bad-rows", ".csv")
    _upload(name, _csv(frame))
    _run(app_module, name)
    outputs = _outputs(output_prefix(name))
    assert set(outputs) == {"results.csv", "rejects.csv", "summary.json"}
    rejects = pd.read_csv(io.BytesIO(outputs["rejects.csv"]), dtype={"client_id": str})
    rejects = rejects.fillna("")
    by_row = {int(r.row): r.reason for r in rejects.itertuples() if r.source == "invoices"}
    assert by_row[3].startswith("invalid consommation_level_1")
    assert by_row[10].startswith("invalid invoice_date")
    assert by_row[11] == "missing client_id"
    assert by_row[len(frame) - 1].startswith("invalid months_number")
    results = _results(outputs["results.csv"])
    ids = {str(i).strip() for i in frame["client_id"]} - {""}
    assert ids == (set(results["client_id"]) | set(rejects["client_id"])) - {""}
    assert "lonely" not in set(results["client_id"])
    summary = json.loads(outputs["summary.json"])
    assert summary["rows_rejected"] == len(rejects)
    assert summary["clients_rejected"] == 1
    assert summary["outputs"]["rejects"].endswith("/rejects.csv")


@pytest.mark.parametrize(
    ("suffix", "content", "message"),
    [
        (".csv", b"", "empty"),
        (".parquet", b"", "empty"),
        (".csv", bytes(range(256)) * 64, "cannot read|neither"),
        (".parquet", b"PAR1 this is not parquet at all", "cannot read as parquet"),
        (".csv", b"name,amount\nalice,3\n", "neither invoice rows nor a features table"),
        (".csv", b"client_id,invoice_date\n", "missing required column"),
        (".dat", b"\x00\x01\x02garbage", "neither CSV nor Parquet"),
    ],
)
def test_unusable_file_gets_an_error_report_and_no_retry(
    app_module: ModuleType, suffix: str, content: bytes, message: str
) -> None:
    name = _unique("bad-file", suffix)
    _upload(name, content)
    _run(app_module, name)  # returns normally: the host does not retry a file that cannot work
    outputs = _outputs(output_prefix(name))
    assert set(outputs) == {"error.json"}
    report = json.loads(outputs["error.json"])
    assert report["input_blob"] == name and report["input_etag"]
    import re

    assert re.search(message, report["error"]), report["error"]
    assert "/tmp" not in report["error"]  # names the blob, not the worker's temp file


def test_header_only_file_is_an_error(app_module: ModuleType, invoices: pd.DataFrame) -> None:
    name = _unique("header-only", ".csv")
    _upload(name, _csv(invoices.iloc[:0]))
    _run(app_module, name)
    report = json.loads(_outputs(output_prefix(name))["error.json"])
    assert "no data rows" in report["error"]


# -- at-least-once delivery -----------------------------------------------------------------------
def test_redelivery_gives_the_same_outputs_and_no_duplicates(
    app_module: ModuleType, invoices: pd.DataFrame
) -> None:
    name = _unique("again", ".parquet")
    _upload(name, _parquet(invoices.iloc[:500]))
    _run(app_module, name)
    prefix = output_prefix(name)
    first = _outputs(prefix)
    _run(app_module, name)  # Event Grid delivers the same event again: nothing is redone
    assert _outputs(prefix) == first
    # A worker that died after writing results but before the summary: redone, same results.
    out = _service().get_container_client("batch-out")
    out.delete_blob(f"{prefix}/summary.json")
    _run(app_module, name)
    again = _outputs(prefix)
    assert set(again) == set(first)
    assert again["results.csv"] == first["results.csv"]
    a, b = json.loads(first["summary.json"]), json.loads(again["summary.json"])
    for volatile in ("seconds", "processed_at"):
        a.pop(volatile), b.pop(volatile)
    assert a == b


def test_replaced_blob_is_scored_again_and_stale_outputs_go(
    app_module: ModuleType, invoices: pd.DataFrame
) -> None:
    name = _unique("replaced", ".csv")
    _upload(name, b"garbage\x00\x00")
    _run(app_module, name)
    assert set(_outputs(output_prefix(name))) == {"error.json"}
    _upload(name, _csv(invoices.iloc[:300]))  # a new ETag: a new version of the export
    _run(app_module, name)
    outputs = _outputs(output_prefix(name))
    assert set(outputs) == {"results.csv", "summary.json"}


def test_deleted_blob_is_skipped(app_module: ModuleType, invoices: pd.DataFrame) -> None:
    name = _unique("deleted", ".csv")
    _upload(name, _csv(invoices.iloc[:100]))
    client = host_blob_client("batch-in", name)
    client.delete_blob()
    _user_function(app_module)(client)
    assert _outputs(output_prefix(name)) == {}


def test_output_prefix_is_the_whole_blob_name() -> None:
    assert output_prefix("export.csv") == "export.csv"
    assert output_prefix("utility/2026/11/export.v2.parquet") == "utility/2026/11/export.v2.parquet"
    assert output_prefix("no-suffix") == "no-suffix"
    names = ["same/x.csv", "same/x.parquet", "same/x.txt", "same/x", "same/x.csv.gz"]
    assert len({output_prefix(n) for n in names}) == len(names)


# -- large files: streaming equals in-memory ------------------------------------------------------
def _replicated(invoices: pd.DataFrame, copies: int) -> pd.DataFrame:
    parts = []
    for k in range(copies):
        part = invoices.copy()
        part["client_id"] = part["client_id"] + f"-{k}"
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def test_large_file_streams_in_partitions_with_the_same_results(
    app_module: ModuleType,
    invoices: pd.DataFrame,
    tiny_artifacts: ArtifactSet,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    frame = _replicated(invoices, 40)  # ~70k rows, 4,800 clients
    frame.loc[12_345, "consommation_level_2"] = -1.0
    monkeypatch.setattr(batch, "CHUNK_ROWS", 9_000)
    monkeypatch.setattr(batch, "PARTITION_ROWS", 15_000)
    name = _unique("large", ".parquet")
    _upload(name, _parquet(frame))
    _run(app_module, name)
    outputs = _outputs(output_prefix(name))
    summary = json.loads(outputs["summary.json"])
    assert summary["partitions"] > 3
    assert summary["input_rows"] == len(frame)
    results = _results(outputs["results.csv"])
    assert not results["client_id"].duplicated().any()
    expected = _expected(frame, tiny_artifacts)
    assert list(results["client_id"]) == list(expected["client_id"])
    assert np.allclose(results["theft_probability"], expected["theft_probability"], atol=1e-6)
    rejects = pd.read_csv(io.BytesIO(outputs["rejects.csv"]))
    assert list(rejects["row"]) == [12_345]  # the row number in the file, not in a partition


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_score_file_equals_score_frames_with_clients_file(
    tmp_path: Path,
    tiny_artifacts: ArtifactSet,
    monkeypatch: pytest.MonkeyPatch,
    fmt: str,
) -> None:
    clients, rows = make_steg(200, seed=11)
    rows = rows.astype({"consommation_level_1": object})
    rows.loc[[4, 900, 2000], "consommation_level_1"] = ["x", -5, None]
    rows.loc[77, "client_id"] = f"  {rows.loc[77, 'client_id']} "  # same client, spaced id
    clients.loc[5, "region"] = -1
    clients = pd.concat([clients, clients.iloc[[8]]], ignore_index=True)  # a duplicate
    invoices_path, clients_path = tmp_path / f"inv.{fmt}", tmp_path / "clients.csv"
    if fmt == "csv":
        rows.to_csv(invoices_path, index=False)
    else:
        rows.astype({"consommation_level_1": str}).to_parquet(invoices_path, index=False)
    clients.to_csv(clients_path, index=False)
    monkeypatch.setattr(batch, "CHUNK_ROWS", 700)
    monkeypatch.setattr(batch, "PARTITION_ROWS", 500)
    monkeypatch.setattr(batch, "CSV_BYTES_PER_ROW", 20)

    got = score_file(invoices_path, tiny_artifacts, tmp_path / "out.csv", clients_path=clients_path)
    table = read_table(invoices_path, READ_COLUMNS)
    ref = score_frames(table, tiny_artifacts, clients=read_table(clients_path))
    assert got.summary["partitions"] > 3
    results = _results(got.results_path.read_bytes())
    expected = ref.results.sort_values("client_id").reset_index(drop=True)
    assert list(results["client_id"]) == list(expected["client_id"])
    assert np.array_equal(results["theft_probability"].to_numpy(), expected["theft_probability"])
    assert list(results["reasons"]) == list(expected["reasons"])
    assert got.rejects_path is not None
    rejects = pd.read_csv(got.rejects_path, dtype={"client_id": str}, keep_default_na=False)
    key = ["source", "row"]
    rejects = rejects.sort_values(key).reset_index(drop=True)
    ref_rejects = ref.rejects.sort_values(key).reset_index(drop=True)
    assert rejects.astype(str).to_dict("records") == ref_rejects.astype(str).to_dict("records")
    for field in ("clients_scored", "clients_flagged", "rows_rejected", "clients_rejected"):
        assert got.summary[field] == ref.summary[field], field
    assert got.summary["rows_rejected_by_reason"] == dict(
        sorted(ref.summary["rows_rejected_by_reason"].items())
    )


def test_score_file_refuses_unusable_files(tmp_path: Path, tiny_artifacts: ArtifactSet) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        score_file(empty, tiny_artifacts, tmp_path / "out.csv")
    with pytest.raises(InputError, match="no such file"):
        score_file(tmp_path / "missing.csv", tiny_artifacts, tmp_path / "out.csv")


@pytest.mark.slow
@pytest.mark.shared
def test_whole_shared_file_through_the_trigger(app_module: ModuleType, shared_data: Path) -> None:
    """3.6 M invoice rows through Azurite and the trigger (about a minute)."""
    name = _unique("steg-all", ".parquet")
    container = _service().get_container_client("batch-in")
    with (shared_data / "invoices_train.parquet").open("rb") as handle:
        container.upload_blob(name, handle, overwrite=True, max_concurrency=2)
    _run(app_module, name)
    summary = json.loads(_outputs(output_prefix(name))["summary.json"])
    assert summary["input_rows"] == 3_577_316
    assert summary["clients_scored"] + summary["clients_rejected"] > 100_000
    assert summary["seconds"]["total"] < 120
