"""Real exports and hostile input through the blob trigger (function_app.py, Azurite).

Issue 13, the blob side:

* transfer integrity (class 1): a gzip-encoded export above the SDK's 32 MiB single-GET size is
  read whole and scores exactly like the same data uploaded plain; `.csv.gz` and `.parquet.gz`
  uploaded as they are, too; a read that comes up short, or whose bytes do not match the blob's
  Content-MD5, is refused with an exception (the host retries, then poisons) and the
  `batch_failed` event, never scored; an over-limit, corrupt or otherwise encoded file gets
  error.json;
* outputs that never collide or go stale (class 7): `x.csv`, `x.parquet`, `x.txt`, `x` and
  `x.csv.gz` each get their own folder; a run of an older version of a file never ends on top
  of the run of its newer version, however the two interleave;
* unusable files fail cleanly (class 8, blob side): a name too long (or too deep) for its
  outputs gets error.json in a short hashed folder; a Parquet file with list client ids gets
  error.json.

Every test drives the trigger's user function with the `BlobClient` the Functions host builds
(`host_blob_client`), as tests/test_blob_batch.py does.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest

import detector.blob_batch as blob_batch
from detector.blob_batch import LONG_NAMES, TransferError, output_prefix
from detector.config import Settings
from tests.logs import Records, attached
from tests.synthetic import make_steg
from tests.test_blob_batch import _csv, _parquet, _results, host_blob_client

pytestmark = [pytest.mark.azurite, pytest.mark.xdist_group("azurite")]
MiB = 1024 * 1024
SINGLE_GET = 32 * MiB  # the SDK's max_single_get_size: larger blobs are read in ranges


# -- fixtures and helpers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def invoices() -> pd.DataFrame:
    """A small export: invoice rows with the client attributes as extra columns."""
    clients, rows = make_steg(80, seed=21)
    return rows.merge(clients.drop(columns="target"), on="client_id", how="left")


def _service() -> Any:
    from detector.store import blob_service_client

    return blob_service_client(Settings())


def _upload(name: str, data: bytes, **options: Any) -> str:
    client = _service().get_container_client("batch-in").get_blob_client(name)
    client.upload_blob(data, overwrite=True, max_concurrency=2, **options)
    return str(client.get_blob_properties().etag)


def _outputs(prefix: str) -> dict[str, bytes]:
    out = _service().get_container_client("batch-out")
    return {
        blob.name[len(prefix) + 1 :]: out.download_blob(blob.name).readall()
        for blob in out.list_blobs(name_starts_with=prefix + "/")
        if "/" not in blob.name[len(prefix) + 1 :]  # this input's files, not a deeper input's
    }


def _trigger(module: ModuleType) -> Callable[[Any], None]:
    function: Callable[[Any], None] = module.indexed["score_batch_blob"].get_user_function()
    return function


def _run(module: ModuleType, name: str) -> None:
    assert _trigger(module)(host_blob_client("batch-in", name)) is None


def _unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:8]}"


def _summary(name: str) -> dict[str, Any]:
    outputs = _outputs(output_prefix(name))
    assert "summary.json" in outputs, sorted(outputs)
    value: dict[str, Any] = json.loads(outputs["summary.json"])
    return value


def _error(name: str) -> str:
    outputs = _outputs(output_prefix(name))
    assert set(outputs) == {"error.json"}, sorted(outputs)
    report = json.loads(outputs["error.json"])
    assert report["input_blob"] == name and report["input_etag"]
    return str(report["error"])


def _without_run_details(summary: dict[str, Any]) -> dict[str, Any]:
    """What must be equal between two runs of the same rows stored differently."""
    volatile = {"seconds", "processed_at", "input_blob", "input_etag", "input_bytes"}
    volatile |= {"outputs", "output_folder", "input_gzip", "input_decompressed_bytes"}
    volatile |= {"input_content_encoding", "input_decoded_bytes"}
    volatile |= {"input_content_md5_checked", "input_format"}
    return {k: v for k, v in summary.items() if k not in volatile}


# -- class 1: the gzip-encoded export above 32 MiB ------------------------------------------------
def big_export(n_clients: int = 40_000, seed: int = 13) -> pd.DataFrame:
    """About 1.3 M invoice rows of `n_clients` clients in the STEG schema (vectorised), in no
    particular order and with meter indexes as varied as real ones: about 118 MB of CSV that
    gzip brings down to about 41 MB, above the SDK's 32 MiB single GET."""
    rng = np.random.default_rng(seed)
    per_client = rng.integers(20, 46, n_clients)  # 32.5 invoices a client on average
    client = np.repeat(np.arange(n_clients), per_client)
    k = np.arange(len(client)) - np.repeat(np.cumsum(per_client) - per_client, per_client)
    start = np.datetime64("2005-01-01") + rng.integers(0, 2000, n_clients).astype("timedelta64[D]")
    dates = start[client] + (k * 120).astype("timedelta64[D]")
    consumption = rng.gamma(2.0, 200.0, len(client)).round().astype(np.int64)
    elec = rng.random(len(client)) < 0.75
    index = rng.integers(0, 100_000_000, len(client))
    ids = np.char.add(
        "client_", np.char.zfill(rng.choice(10**12, n_clients, replace=False).astype(str), 12)
    )
    frame = pd.DataFrame(
        {
            "client_id": ids[client],
            "invoice_date": np.datetime_as_string(dates, unit="D"),
            "tarif_type": np.where(elec, 11, 40),
            "counter_number": rng.integers(1000, 9_999_999, n_clients)[client],
            "counter_statue": np.where(rng.random(len(client)) < 0.03, "1", "0"),
            "counter_code": np.where(elec, 203, 5),
            "reading_remarque": rng.choice([6, 8, 9], len(client)),
            "counter_coefficient": 1,
            "consommation_level_1": np.minimum(consumption, 400),
            "consommation_level_2": np.maximum(consumption - 400, 0),
            "consommation_level_3": 0,
            "consommation_level_4": 0,
            "old_index": index,
            "new_index": index + consumption,
            "months_number": 4,
            "counter_type": np.where(elec, "ELEC", "GAZ"),
            "region": rng.choice([101, 103, 107, 301], n_clients)[client],
        }
    )
    return frame.iloc[rng.permutation(len(frame))].reset_index(drop=True)


@pytest.fixture(scope="module")
def big_csv() -> bytes:
    return big_export().to_csv(index=False).encode()


@pytest.fixture(scope="module")
def big_gzip(big_csv: bytes) -> bytes:
    return gzip.compress(big_csv, compresslevel=6)


def test_gzip_encoded_export_above_32_mib_is_read_whole(
    app_module: ModuleType, big_csv: bytes, big_gzip: bytes
) -> None:
    from azure.storage.blob import ContentSettings

    rows = big_csv.count(b"\n") - 1
    assert rows > 1_200_000 and len(big_gzip) > SINGLE_GET  # the case: ranged reads of gzip
    plain = _unique("big/plain") + ".csv"
    encoded = _unique("big/encoded") + ".csv"
    _upload(plain, big_csv)
    _upload(
        encoded,
        big_gzip,
        content_settings=ContentSettings(content_type="text/csv", content_encoding="gzip"),
    )
    _run(app_module, plain)
    _run(app_module, encoded)

    want, got = _summary(plain), _summary(encoded)
    assert got["input_rows"] == want["input_rows"] == rows  # every row, not three quarters
    assert got["clients_scored"] + got["clients_rejected"] == 40_000
    assert got["input_gzip"] is True and got["input_decompressed_bytes"] == len(big_csv)
    assert got["input_bytes"] == len(big_gzip) and got["input_content_md5_checked"] is True
    assert want["input_gzip"] is False
    assert _without_run_details(got) == _without_run_details(want)
    results = _outputs(output_prefix(encoded))["results.csv"]
    assert (
        results == _outputs(output_prefix(plain))["results.csv"]
    )  # the same scores, byte for byte


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_gzip_files_uploaded_as_they_are_score_like_the_plain_file(
    app_module: ModuleType, invoices: pd.DataFrame, fmt: str
) -> None:
    data = _csv(invoices) if fmt == "csv" else _parquet(invoices)
    stem = _unique("gz/export")
    plain, packed = f"{stem}.{fmt}", f"{stem}.{fmt}.gz"
    _upload(plain, data)
    _upload(packed, gzip.compress(data))  # no Content-Encoding: recognised by its magic bytes
    _run(app_module, plain)
    _run(app_module, packed)
    want, got = _summary(plain), _summary(packed)
    assert got["input_gzip"] is True and got["input_format"] == fmt
    assert got["input_rows"] == len(invoices)
    assert _without_run_details(got) == _without_run_details(want)
    results = _outputs(output_prefix(packed))["results.csv"]
    assert results == _outputs(output_prefix(plain))["results.csv"]


def _tamper(monkeypatch: pytest.MonkeyPatch, change: Callable[[bytes], bytes]) -> list[int]:
    """Change what the SDK hands over for each response body (what a faulty transport, or the
    SDK's own decompression of a ranged gzip read, does); returns a list counting the calls."""
    import azure.storage.blob._download as download

    real = download.process_content
    calls: list[int] = []

    def tampered(*args: Any, **kwargs: Any) -> bytes:
        calls.append(1)
        return change(real(*args, **kwargs))

    monkeypatch.setattr(download, "process_content", tampered)
    return calls


@pytest.mark.parametrize(
    ("case", "change", "message"),
    [
        ("short", lambda data: data[:-100], r"read \d+ bytes .* but the blob holds \d+"),
        ("long", lambda data: data + b"\n", r"read \d+ bytes .* but the blob holds \d+"),
        (
            "corrupt",
            lambda data: data[:50] + bytes([data[50] ^ 0x20]) + data[51:],
            "do not match the blob's Content-MD5",
        ),
    ],
)
def test_a_read_that_does_not_add_up_is_refused_and_retried_not_scored(
    app_module: ModuleType,
    invoices: pd.DataFrame,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    change: Callable[[bytes], bytes],
    message: str,
) -> None:
    name = _unique(f"transfer/{case}") + ".csv"
    _upload(name, _csv(invoices))
    calls = _tamper(monkeypatch, change)
    with attached(Records()) as logs, pytest.raises(TransferError, match=message):
        _run(app_module, name)
    assert calls, "the download did not go through the SDK's response handling"
    assert _outputs(output_prefix(name)) == {}  # nothing scored, nothing written
    failed = logs.events("batch_failed")
    assert [f["input_blob"] for f in failed] == [name]
    assert failed[0]["reason"].startswith("TransferError: batch input ")
    monkeypatch.undo()  # the next delivery of the event, over a sound transport, scores it
    _run(app_module, name)
    assert _summary(name)["input_rows"] == len(invoices)


def test_transfer_error_in_a_ranged_download(
    app_module: ModuleType, invoices: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check when the blob is read in several ranges (as every blob above 32 MiB is)."""
    from azure.storage.blob import BlobClient

    name = _unique("transfer/ranged") + ".csv"
    data = _csv(invoices)
    _upload(name, data)
    chunk = 16 * 1024
    assert len(data) > 4 * chunk
    seen: list[int] = []

    def drop_in_third_range(body: bytes) -> bytes:
        seen.append(len(body))
        return body[:-1] if len(seen) == 3 else body

    _tamper(monkeypatch, drop_in_third_range)
    client = BlobClient.from_connection_string(
        os.environ["STORAGE"],
        "batch-in",
        name,
        max_single_get_size=chunk,
        max_chunk_get_size=chunk,
    )
    with pytest.raises(TransferError):
        _trigger(app_module)(client)
    assert len(seen) > 3
    assert _outputs(output_prefix(name)) == {}


def _bomb(inflated: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    member = compressor.compress(b"0" * (16 * MiB)) + compressor.flush()
    return member * (inflated // (16 * MiB))


def test_gzip_over_the_limit_or_damaged_or_foreign_gets_error_json(
    app_module: ModuleType, invoices: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.storage.blob import ContentSettings

    limit = 64 * MiB
    monkeypatch.setattr(
        app_module,
        "settings",
        dataclasses.replace(app_module.settings, max_decompressed_bytes=limit),
    )
    data = _csv(invoices)
    cases = {
        "bomb.csv.gz": (_bomb(1024 * MiB), {}),  # 1 GiB from 1 MB
        "truncated.csv.gz": (gzip.compress(data)[:-20], {}),
        "labelled.csv": (data, {"content_encoding": "gzip"}),  # says gzip, is not
        "brotli.csv": (data, {"content_encoding": "br"}),
    }
    expected = {
        "bomb.csv.gz": f"bomb.csv.gz: decompresses to more than {limit} bytes; "
        "the limit is PTD_MAX_DECOMPRESSED_BYTES",
        "truncated.csv.gz": "truncated.csv.gz: the gzip stream is truncated",
        "labelled.csv": "labelled.csv: not a gzip stream",
        "brotli.csv": "brotli.csv: stored with Content-Encoding br; only gzip",
    }
    folder = _unique("gzbad")
    for base, (content, settings) in cases.items():
        name = f"{folder}/{base}"
        _upload(name, content, content_settings=ContentSettings(**settings))
        _run(app_module, name)  # returns normally: an unusable file is not retried
        assert _error(name).startswith(expected[base]), (base, _error(name))


# -- class 7: outputs that never collide or go stale ----------------------------------------------
def _one_client(invoices: pd.DataFrame, client_id: str) -> pd.DataFrame:
    frame = invoices[invoices["client_id"] == invoices["client_id"].iloc[0]].copy()
    frame["client_id"] = client_id
    return frame


def test_inputs_differing_only_in_suffix_keep_their_own_outputs(
    app_module: ModuleType, invoices: pd.DataFrame
) -> None:
    folder = _unique("same")
    files = {
        f"{folder}/x.csv": _csv(_one_client(invoices, "A1")),
        f"{folder}/x.parquet": _parquet(_one_client(invoices, "B1")),
        f"{folder}/x.txt": _csv(_one_client(invoices, "C1")),
        f"{folder}/x": _csv(_one_client(invoices, "D1")),
        f"{folder}/x.csv.gz": gzip.compress(_csv(_one_client(invoices, "E1"))),
    }
    for name, data in files.items():
        _upload(name, data)
        _run(app_module, name)
    prefixes = {output_prefix(name) for name in files}
    assert len(prefixes) == len(files)
    for name in files:
        assert output_prefix(name) == name
        outputs = _outputs(name)
        assert set(outputs) == {"results.csv", "summary.json"}, (name, sorted(outputs))
        client = {"x.csv": "A1", "x.parquet": "B1", "x.txt": "C1", "x": "D1", "x.csv.gz": "E1"}
        assert list(_results(outputs["results.csv"])["client_id"]) == [client[Path(name).name]]
        assert json.loads(outputs["summary.json"])["input_blob"] == name


class Interleave:
    """Two versions of one input: v1's run is paused at a chosen point while v2 is uploaded and
    scored, then v1's run goes on. Afterwards v2's outputs must be the ones in batch-out."""

    def __init__(self, module: ModuleType, invoices: pd.DataFrame) -> None:
        self.module = module
        self.name = _unique("race/export") + ".csv"
        self.v1 = _csv(_one_client(invoices, "OLD-1"))
        self.v2 = _csv(pd.concat([_one_client(invoices, "NEW-1"), _one_client(invoices, "NEW-2")]))
        self.v2_report: dict[str, Any] = {}
        self.fired = False

    def run_v2(self) -> None:
        self.fired = True
        try:
            _upload(self.name, self.v2)
            self.v2_report = self._process()
        except BaseException as exc:  # seen by assert_v2_on_top, also from a thread
            self.v2_report = {"raised": repr(exc)}
            raise

    def _process(self) -> dict[str, Any]:
        from detector.telemetry import observe_blob_run

        client = host_blob_client("batch-in", self.name)
        return observe_blob_run(
            self.name, lambda: blob_batch.process_blob(client, self.module.settings)
        )

    def run_v1(self) -> dict[str, Any]:
        _upload(self.name, self.v1)
        return self._process()

    def assert_v2_on_top(self, v1_report: dict[str, Any]) -> None:
        assert self.fired
        assert "skipped" in v1_report and "before its outputs were written" in v1_report["skipped"]
        outputs = _outputs(self.name)
        assert set(outputs) == {"results.csv", "summary.json"}, sorted(outputs)
        assert list(_results(outputs["results.csv"])["client_id"]) == ["NEW-1", "NEW-2"]
        summary = json.loads(outputs["summary.json"])
        current = _service().get_container_client("batch-in").get_blob_client(self.name)
        assert summary["input_etag"] == current.get_blob_properties().etag
        assert summary["input_etag"] == self.v2_report["input_etag"] != v1_report["input_etag"]
        assert summary["clients_scored"] == 2


def test_v2_scored_while_v1_scores_then_v1_finishes_v2_remains(
    app_module: ModuleType, invoices: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    race = Interleave(app_module, invoices)
    real_score = blob_batch.score_file

    def score_then_v2(*args: Any, **kwargs: Any) -> Any:
        result = real_score(*args, **kwargs)
        if not race.fired:  # v1 has scored; before it writes, v2 arrives and is done
            race.run_v2()
        return result

    monkeypatch.setattr(blob_batch, "score_file", score_then_v2)
    race.assert_v2_on_top(race.run_v1())


@pytest.mark.parametrize("output", ["results.csv", "summary.json"])
def test_v2_written_between_v1_check_and_v1_write_stays_on_top(
    app_module: ModuleType, invoices: pd.DataFrame, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    """v1 observed the output and found its input current; then v2 is uploaded and completely
    processed; then v1's write (conditional on what it observed) must be refused."""
    race = Interleave(app_module, invoices)
    upload_file, upload_json = blob_batch._upload_file, blob_batch._upload_json

    def v2_first(real: Callable[..., None]) -> Callable[..., None]:
        def upload(container: Any, name: str, *args: Any, **conditions: Any) -> None:
            if name.endswith("/" + output) and not race.fired:
                assert conditions, "an output write without a condition"
                race.run_v2()
            real(container, name, *args, **conditions)

        return upload

    monkeypatch.setattr(blob_batch, "_upload_file", v2_first(upload_file))
    monkeypatch.setattr(blob_batch, "_upload_json", v2_first(upload_json))
    race.assert_v2_on_top(race.run_v1())


def test_newer_run_overwrites_what_the_older_wrote_in_between(
    app_module: ModuleType, invoices: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other order: v2 observes results.csv, then v1 (still allowed: it checked before v2
    was uploaded) writes it; v2's conditional write is refused, and v2 observes again and wins."""
    race = Interleave(app_module, invoices)
    upload_file = blob_batch._upload_file
    v2_ready, v1_wrote = threading.Event(), threading.Event()
    v2_thread: list[threading.Thread] = []
    attempts: dict[str, int] = {"v2": 0}

    def upload(container: Any, name: str, *args: Any, **conditions: Any) -> None:
        is_results = name.endswith("/results.csv")
        if threading.current_thread() in v2_thread and is_results:
            attempts["v2"] += 1
            if attempts["v2"] == 1:  # v2 has observed and checked: let v1 write first
                v2_ready.set()
                assert v1_wrote.wait(60)
        elif is_results and not race.fired:
            thread = threading.Thread(target=race.run_v2)
            v2_thread.append(thread)
            thread.start()
            assert v2_ready.wait(120)
            try:
                upload_file(container, name, *args, **conditions)  # v1's write goes through
            finally:
                v1_wrote.set()
            return
        upload_file(container, name, *args, **conditions)

    monkeypatch.setattr(blob_batch, "_upload_file", upload)
    v1_report = race.run_v1()
    v2_thread[0].join(120)
    assert attempts["v2"] >= 2  # v2's first write was refused and retried
    race.assert_v2_on_top(v1_report)


def test_late_event_of_an_old_version_changes_nothing(
    app_module: ModuleType, invoices: pd.DataFrame
) -> None:
    name = _unique("late/export") + ".csv"
    _upload(name, _csv(_one_client(invoices, "OLD-1")))
    _upload(name, _csv(_one_client(invoices, "NEW-1")))
    _run(app_module, name)
    before = _outputs(name)
    _run(app_module, name)  # the first upload's event, delivered late
    assert _outputs(name) == before


# -- class 8: unusable names ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", ["long", "deep"])
def test_name_too_long_for_its_outputs_gets_error_json_in_a_hashed_folder(
    app_module: ModuleType, invoices: pd.DataFrame, shape: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    if shape == "long":  # 1,015 characters: a valid blob name, but not with "/summary.json"
        name = f"long-{tag}/" + "n" * (1015 - 5 - len(tag) - 1 - 4) + ".csv"
        assert len(name) == 1015
    else:  # 254 path segments: valid, but its outputs would have 255
        name = f"deep-{tag}/" + "d/" * 252 + "x.csv"
        assert name.count("/") + 1 == 254
    _upload(name, _csv(invoices))
    _run(app_module, name)  # returns normally: the host does not retry it
    folder = f"{LONG_NAMES}/{hashlib.sha256(name.encode()).hexdigest()}"
    assert output_prefix(name) == folder
    report = json.loads(_outputs(folder)["error.json"])
    assert set(_outputs(folder)) == {"error.json"}
    assert report["input_blob"] == name and report["output_folder"] == folder
    word = "characters long" if shape == "long" else "path segments"
    assert f"the blob name {'is' if shape == 'long' else 'has'}" in report["error"]
    assert word in report["error"]
    out = _service().get_container_client("batch-out")
    assert not list(out.list_blobs(name_starts_with=name))  # nothing under the name itself
    _run(app_module, name)  # a redelivery finds the report and does nothing
    assert json.loads(_outputs(folder)["error.json"]) == report


def test_names_that_fit_keep_their_own_folder() -> None:
    fits = "f/" + "n" * (1024 - len("/summary.json") - 2)
    assert output_prefix(fits) == fits
    assert output_prefix(fits + "x").startswith(f"{LONG_NAMES}/")
    assert output_prefix("/".join(["d"] * 253)) == "/".join(["d"] * 253)
    assert output_prefix("/".join(["d"] * 254)).startswith(f"{LONG_NAMES}/")
    # Characters outside the Basic Multilingual Plane count twice (UTF-16), as Azure counts.
    emoji = "\U0001f600" * 505  # 1,010 code units + 13 for "/summary.json"
    assert output_prefix(emoji) == emoji
    assert output_prefix(emoji + "\U0001f600").startswith(f"{LONG_NAMES}/")  # 1,012 + 13


def _list_id_parquet(invoices: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(invoices.head(40), preserve_index=False)
    ids = pa.array([[i % 7] for i in range(table.num_rows)])
    table = table.set_column(table.schema.get_field_index("client_id"), "client_id", ids)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def test_parquet_with_list_client_ids_gets_error_json(
    app_module: ModuleType, invoices: pd.DataFrame
) -> None:
    name = _unique("listids/export") + ".parquet"
    _upload(name, _list_id_parquet(invoices))
    _run(app_module, name)
    assert "'client_id' holds list<" in _error(name)


def test_an_upload_under_the_reserved_prefix_cannot_overwrite_a_long_names_report(
    app_module: ModuleType, invoices: pd.DataFrame
) -> None:
    long_name = _unique("reserved/") + "n" * 1015 + ".csv"
    _upload(long_name, _csv(invoices))
    _run(app_module, long_name)
    folder = output_prefix(long_name)
    report = json.loads(_outputs(folder)["error.json"])
    # Before, this upload's results replaced the report above (and the long name's
    # redelivery replaced them in turn).
    intruder = folder  # batch-in/_long-names/<sha256 of the long name>
    _upload(intruder, _csv(invoices))
    _run(app_module, intruder)
    assert json.loads(_outputs(folder)["error.json"]) == report
    assert set(_outputs(folder)) == {"error.json"}
    refused = json.loads(_outputs(output_prefix(intruder))["error.json"])
    assert output_prefix(intruder) != folder
    assert "names under _long-names/ are reserved" in refused["error"]


def test_gzip_layers_are_read_as_ptd_score_reads_them(
    app_module: ModuleType, invoices: pd.DataFrame, tmp_path: Path
) -> None:
    """One gzip file, with or without Content-Encoding on top, scores; a file gzipped twice
    gets the same one-line refusal that `ptd score` prints for it."""
    from azure.storage.blob import ContentSettings

    data = _csv(invoices)
    stem = _unique("layers/export")
    _upload(f"{stem}.csv", data)
    _upload(
        f"{stem}-both.csv.gz",
        gzip.compress(gzip.compress(data)),
        content_settings=ContentSettings(content_encoding="gzip"),
    )
    _upload(f"{stem}-twice.csv.gz", gzip.compress(gzip.compress(data)))
    for suffix in (".csv", "-both.csv.gz", "-twice.csv.gz"):
        _run(app_module, stem + suffix)
    want, got = _summary(f"{stem}.csv"), _summary(f"{stem}-both.csv.gz")
    assert got["input_gzip"] is True and got["input_decompressed_bytes"] == len(data)
    assert _without_run_details(got) == _without_run_details(want)
    error = _error(f"{stem}-twice.csv.gz")
    local = tmp_path / "export-twice.csv.gz"
    local.write_bytes(gzip.compress(gzip.compress(data)))
    cli = subprocess.run(
        [sys.executable, "-m", "detector", "score", str(local), "--out", str(tmp_path / "r.csv")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 2
    expected = "gzip-compressed; decompress it first"
    assert expected in error and expected in cli.stderr


def test_a_parquet_date_outside_python_s_range_is_one_rejected_row(
    app_module: ModuleType, invoices: pd.DataFrame
) -> None:
    """Before, a date32 of year -768 raised ValueError in pandas' conversion: the blob was
    retried as a service failure and poisoned, every other row unscored."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(invoices, preserve_index=False)
    days = pd.to_datetime(invoices["invoice_date"]).to_numpy().astype("datetime64[D]")
    values = days.astype(np.int64).astype(np.int32)
    values[0] = -1_000_000  # year -768
    index = table.schema.get_field_index("invoice_date")
    table = table.set_column(index, "invoice_date", pa.array(values).cast(pa.date32()))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    name = _unique("dates/ancient") + ".parquet"
    _upload(name, buffer.getvalue())
    _run(app_module, name)
    summary = _summary(name)
    assert summary["input_rows"] == len(invoices)
    assert summary["rows_rejected_by_reason"] == {"invalid invoice_date": 1}
    rejects = _outputs(output_prefix(name))["rejects.csv"].decode()
    assert "invalid invoice_date: outside 1950-01-01 to 2099-12-31" in rejects
