"""The blob-triggered batch: score a billing export dropped into `batch-in`, write to `batch-out`.

For an input blob `<dir>/<stem>.<ext>` the outputs go under `batch-out/<dir>/<stem>/`:

    results.csv    one row per scored client (probability, flag, risk level, reasons, model)
    rejects.csv    only when rows were rejected: source, row (0-based in the file), client, reason
    summary.json   counts, flagged rate, model and version, timings, the input's name and ETag
    error.json     instead of the three above when the file cannot be used at all

Transfer integrity. The stored bytes are downloaded as stored (`decompress=False`): the SDK's
automatic decompression of `Content-Encoding: gzip` blobs works per HTTP response, and a blob
above the single-GET size (32 MiB) is read in ranges that cannot be decompressed separately
(Azure/azure-sdk-for-python#23714; on this SDK a 39 MB gzip-encoded blob of 118 MB of CSV came
out as 102 MB of mixed bytes, while `readinto` returned the stored size). The bytes written are
counted and must equal the blob's Content-Length, and its Content-MD5 when it has one;
otherwise the run raises `TransferError` (the host retries, then parks the blob in the poison
queue) and nothing is scored. A blob whose stored bytes are gzip (by `Content-Encoding: gzip`
or by the magic bytes, e.g. `x.csv.gz`) is decompressed with `compression.gunzip_to` under
PTD_MAX_DECOMPRESSED_BYTES; an over-limit, corrupt or otherwise encoded file gets `error.json`.

Event Grid delivers at least once, so a run is idempotent: outputs are keyed by the input's
name and ETag; summary.json (or error.json) is written last, and a run that finds one for the
same ETag does nothing. A crash before that point leaves no summary, so the redelivery redoes
the work and overwrites the partial outputs with identical ones. A file that cannot be read gets
error.json and the function returns normally, so the host does not retry it over and over; a
failure of the service itself (model store, output container, a transfer that does not add up)
raises, so the host retries.

The blob is downloaded in chunks to a temporary file and scored by `batch.score_file`, the same
code as `ptd score`: memory stays bounded whatever the file size. Logs carry file names,
counts and timings, never customer data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, cast

from detector.batch import score_file
from detector.compression import gunzip_to, is_gzip
from detector.config import Settings
from detector.model import ArtifactSet
from detector.schema import InputError

if TYPE_CHECKING:
    from azure.storage.blob import BlobClient, BlobProperties, ContainerClient

log = logging.getLogger(__name__)

RESULTS = "results.csv"
REJECTS = "rejects.csv"
SUMMARY = "summary.json"
ERROR = "error.json"
DOWNLOAD_CONCURRENCY = 2
GZIP_ENCODINGS = ("gzip", "x-gzip")
HASH_BUFFER_BYTES = 1 << 20
_SIMPLE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}")


class TransferError(RuntimeError):
    """What was downloaded is not what the blob holds (length or Content-MD5): nothing is scored
    and the run raises, so that the Functions host retries it (then poisons it)."""


def output_prefix(blob_name: str) -> str:
    """`a/b/export.csv` -> `a/b/export`: the folder of the outputs in `batch-out`."""
    path = PurePosixPath(blob_name)
    return str(path.with_suffix("")) if path.suffix else str(path)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_json(container: ContainerClient, name: str) -> dict[str, Any] | None:
    from azure.core.exceptions import ResourceNotFoundError

    try:
        value = json.loads(container.download_blob(name).readall())
    except ResourceNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # a corrupt marker is not a valid "done": redo the work
    return value if isinstance(value, dict) else None


def _upload_json(container: ContainerClient, name: str, value: dict[str, Any]) -> None:
    from azure.storage.blob import ContentSettings

    container.upload_blob(
        name,
        json.dumps(value, indent=2, sort_keys=True).encode(),
        overwrite=True,
        content_settings=ContentSettings(content_type="application/json"),
    )


def _upload_file(container: ContainerClient, name: str, path: Path, content_type: str) -> None:
    from azure.storage.blob import ContentSettings

    with path.open("rb") as handle:
        container.upload_blob(
            name,
            handle,
            overwrite=True,
            max_concurrency=DOWNLOAD_CONCURRENCY,
            content_settings=ContentSettings(content_type=content_type),
        )


def _delete_if_present(container: ContainerClient, *names: str) -> None:
    from azure.core.exceptions import ResourceNotFoundError

    for name in names:
        with contextlib.suppress(ResourceNotFoundError):
            container.delete_blob(name)


def _output_container(settings: Settings, environ: Mapping[str, str] | None) -> ContainerClient:
    from detector.store import blob_service_client, ensure_container

    container = blob_service_client(settings, environ).get_container_client(
        settings.batch_out_container
    )
    ensure_container(container, f"output container {settings.batch_out_container}")
    return container


def _audit(outcome: str, fields: dict[str, Any]) -> None:
    """One structured line per file (no customer data), and the batch metrics."""
    try:
        from detector.telemetry import METRICS, log_event
    except ImportError:  # pragma: no cover - telemetry is part of the package
        log.info("batch file %s: %s", outcome, fields)
        return
    log_event(log, logging.INFO, {"event": "batch_file", "outcome": outcome, **fields})
    METRICS.inc("batch_files_total", 1, {"outcome": outcome})
    if outcome == "scored":
        METRICS.inc("batch_rows_scored_total", fields.get("input_rows", 0))
        METRICS.inc("batch_rows_rejected_total", fields.get("rows_rejected", 0), {"source": "blob"})


# -- reading the input: every byte, as stored -----------------------------------------------------
class _CountingWriter:
    """A seekable file wrapper that counts the bytes written through it (what the SDK's chunked
    `readinto` really delivered: its return value is the size it expected, not what it wrote)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.bytes_written = 0

    def write(self, data: bytes) -> int:
        written = self._handle.write(data)
        self.bytes_written += written
        return written

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def seekable(self) -> bool:
        return True


def _md5_of(path: Path) -> bytes:
    digest = hashlib.md5(usedforsecurity=False)  # Blob Storage's Content-MD5, not security
    with path.open("rb") as handle:
        while block := handle.read(HASH_BUFFER_BYTES):
            digest.update(block)
    return digest.digest()


def _download(client: BlobClient, properties: BlobProperties, target: Path) -> dict[str, Any]:
    """Download the stored bytes of the version `properties` describes into `target`.

    Raises ResourceNotFoundError / ResourceModifiedError when the blob is deleted or replaced
    meanwhile (the download is pinned to the ETag), TransferError when the bytes written differ
    in number from the blob's Content-Length or, if it has one, from its Content-MD5.
    """
    from azure.core import MatchConditions

    name, etag, size = str(client.blob_name), str(properties.etag), int(properties.size)
    with target.open("wb") as handle:
        counter = _CountingWriter(handle)
        downloader = client.download_blob(
            max_concurrency=DOWNLOAD_CONCURRENCY,
            etag=etag,
            match_condition=MatchConditions.IfNotModified,
            decompress=False,  # the stored bytes: Azure/azure-sdk-for-python#23714
        )
        downloader.readinto(cast(IO[bytes], counter))
    on_disk = target.stat().st_size
    if not counter.bytes_written == on_disk == size == int(downloader.size):
        raise TransferError(
            f"batch input {name}: read {counter.bytes_written} bytes ({on_disk} on disk) but "
            f"the blob holds {size} (ETag {etag}); nothing scored, the run is retried"
        )
    stored_md5 = properties.content_settings.content_md5
    if stored_md5 and _md5_of(target) != bytes(stored_md5):
        raise TransferError(
            f"batch input {name}: the {size} bytes read do not match the blob's Content-MD5 "
            f"(ETag {etag}); nothing scored, the run is retried"
        )
    return {"input_content_md5_checked": bool(stored_md5)}


def _encodings(properties: BlobProperties) -> tuple[str, ...]:
    raw = properties.content_settings.content_encoding or ""
    codings = (coding.strip().lower() for coding in raw.split(","))
    return tuple(coding for coding in codings if coding and coding != "identity")


def _local_name(blob_name: str, gzipped: bool) -> str:
    """`input` + the suffix the file format is recognised by: `x.csv.gz` (gzip) -> `input.csv`.
    A suffix that is not a short plain word (a name full of dots) becomes `.unknown`."""
    path = PurePosixPath(blob_name)
    suffix = path.suffix
    if gzipped and suffix.lower() in (".gz", ".gzip"):
        suffix = PurePosixPath(path.stem).suffix
    if suffix and not _SIMPLE_SUFFIX.fullmatch(suffix):
        suffix = ".unknown"
    return "input" + suffix.lower()


def _prepare(
    blob_name: str, properties: BlobProperties, raw: Path, settings: Settings
) -> tuple[Path, dict[str, Any]]:
    """The downloaded file ready for `score_file`: decompressed when its bytes are gzip.

    Raises InputError (error.json) for a Content-Encoding other than gzip, and for a gzip that
    is corrupt or inflates beyond settings.max_decompressed_bytes.
    """
    label = PurePosixPath(blob_name).name
    encodings = _encodings(properties)
    if encodings and encodings not in [(e,) for e in GZIP_ENCODINGS]:
        raise InputError(
            f"{label}: stored with Content-Encoding {', '.join(encodings)}; "
            "only gzip (or none) can be read"
        )
    gzipped = bool(encodings) or is_gzip(raw)
    local = raw.with_name(_local_name(blob_name, gzipped))
    if not gzipped:
        raw.rename(local)
        return local, {"input_gzip": False}
    size = gunzip_to(raw, local, settings.max_decompressed_bytes, name=label)
    raw.unlink()  # the instance's temporary disk is small (0.8 GB on Flex Consumption)
    return local, {"input_gzip": True, "input_decompressed_bytes": size}


def process_blob(
    client: BlobClient,
    settings: Settings,
    artifacts: ArtifactSet | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Score one input blob; returns the summary (or error report) written to `batch-out`.

    `client` is the azure.storage.blob.BlobClient the Functions host binds for the trigger.
    `artifacts` defaults to the process-wide model (`store.shared_artifacts`). Raises
    TransferError when the bytes read are not the blob's, ModelError / storage errors when the
    service fails: the host retries those.
    """
    from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

    started = time.perf_counter()
    name = str(client.blob_name)
    prefix = output_prefix(name)
    try:
        properties = client.get_blob_properties()
    except ResourceNotFoundError:
        log.warning("batch input %s no longer exists; nothing to do", name)
        _audit("gone", {"input_blob": name})
        return {"input_blob": name, "skipped": "input blob no longer exists"}
    etag = str(properties.etag)
    size = int(properties.size)
    identity = {"input_blob": name, "input_etag": etag, "input_bytes": size}

    out = _output_container(settings, environ)
    for marker in (SUMMARY, ERROR):
        previous = _read_json(out, f"{prefix}/{marker}")
        if previous is not None and previous.get("input_etag") == etag:
            log.info("batch input %s (etag %s) was already processed; skipping", name, etag)
            _audit("duplicate", identity)
            return previous

    if artifacts is None:
        from detector.store import shared_artifacts

        artifacts = shared_artifacts(settings)  # ModelError propagates: the host retries

    with tempfile.TemporaryDirectory(prefix="ptd-blob-") as tmp:
        workdir = Path(tmp)
        raw = workdir / "download"
        try:
            # Chunked download pinned to the ETag seen above: a blob replaced or deleted while
            # it is read fails here instead of mixing two versions.
            transfer = _download(client, properties, raw)
        except (ResourceNotFoundError, ResourceModifiedError) as exc:
            gone = isinstance(exc, ResourceNotFoundError)
            reason = "deleted" if gone else "replaced"
            log.warning("batch input %s was %s while being read; not scored", name, reason)
            _audit(reason, identity)
            # The replacement (if any) has its own event; nothing is written for this version.
            return {**identity, "skipped": f"input blob was {reason} while being read"}
        download_seconds = time.perf_counter() - started
        local: Path | None = None
        try:
            local, encoding = _prepare(name, properties, raw, settings)
            result = score_file(
                local,
                artifacts,
                workdir / RESULTS,
                rejects_out=workdir / REJECTS,
                workdir=workdir,
            )
        except InputError as exc:
            reason = str(exc)
            if local is not None:  # score_file names the local copy: name the blob
                reason = reason.replace(local.name, PurePosixPath(name).name)
            report = {
                **identity,
                "error": reason,
                "processed_at": _now(),
                "model_version": artifacts.version,
            }
            _delete_if_present(
                out, f"{prefix}/{SUMMARY}", f"{prefix}/{RESULTS}", f"{prefix}/{REJECTS}"
            )
            _upload_json(out, f"{prefix}/{ERROR}", report)
            log.warning("batch input %s cannot be used: %s", name, reason)
            _audit("unreadable", {**identity, "error": reason})
            return report
        upload_started = time.perf_counter()
        # Results first, summary last: summary.json is the "done" marker.
        _delete_if_present(out, f"{prefix}/{SUMMARY}", f"{prefix}/{ERROR}")
        _upload_file(out, f"{prefix}/{RESULTS}", result.results_path, "text/csv")
        if result.rejects_path is not None:
            _upload_file(out, f"{prefix}/{REJECTS}", result.rejects_path, "text/csv")
        else:
            _delete_if_present(out, f"{prefix}/{REJECTS}")
        summary = dict(result.summary)
        summary["seconds"] = {
            **summary["seconds"],
            "download": round(download_seconds, 3),
            "upload": round(time.perf_counter() - upload_started, 3),
        }
        summary["seconds"]["total"] = round(time.perf_counter() - started, 3)
        summary.update(
            {
                **identity,
                **transfer,
                **encoding,
                "outputs": {
                    "results": f"{prefix}/{RESULTS}",
                    "rejects": f"{prefix}/{REJECTS}" if result.rejects_path else None,
                },
                "processed_at": _now(),
            }
        )
        _upload_json(out, f"{prefix}/{SUMMARY}", summary)
    _audit(
        "scored",
        {
            **identity,
            "clients_scored": summary["clients_scored"],
            "clients_flagged": summary["clients_flagged"],
            "input_rows": summary["input_rows"],
            "rows_rejected": summary["rows_rejected"],
            "model_version": summary["model_version"],
            "seconds": summary["seconds"]["total"],
        },
    )
    return summary
