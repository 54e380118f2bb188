"""The blob-triggered batch: score a billing export dropped into `batch-in`, write to `batch-out`.

Output layout. Each input blob has its own folder in `batch-out`, named by its whole blob name
(suffix included), so `x.csv`, `x.parquet`, `x.txt` and `x` never share outputs:

    batch-in/2025-01/invoices.csv  ->  batch-out/2025-01/invoices.csv/results.csv
                                                                     /rejects.csv
                                                                     /summary.json
                                                                     /error.json

    results.csv    one row per scored client (probability, flag, risk level, reasons, model)
    rejects.csv    only when rows were rejected: source, row (0-based in the file), client, reason
    summary.json   counts, flagged rate, model and version, timings, the input's name and ETag
    error.json     instead of the three above when the file cannot be used at all

Blob Storage caps a blob name at 1,024 characters and 254 path segments ("Naming and
Referencing Containers, Blobs, and Metadata", Azure Storage REST reference). An input whose
outputs would break either cap cannot have its own folder: it gets only `error.json`, under
`batch-out/_long-names/<sha256 of the blob name, UTF-8, hex>/` (`output_prefix`), saying so.

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

Ordering. Event Grid delivers at least once, so a run is idempotent: a run that finds
summary.json (or error.json) for the same input name and ETag does nothing. A crash before the
summary leaves no summary, so the redelivery redoes the work and overwrites the partial outputs
with identical ones. A file replaced while an earlier version is being scored has two runs in
flight; the older one must never end on top. So every write and delete in `batch-out` is
conditional (If-Match on the ETag observed just before, or If-None-Match: * when absent), and
between observing and writing the run checks that its input is still the current version of
the blob: if not (replaced or deleted) it stops writing (`skipped`, outcome `superseded`), and a
write refused because another run changed that output meanwhile is re-observed and retried.
Only the run of the current version can keep writing, so its outputs are the ones that remain.

A file that cannot be used gets error.json and the function returns normally, so the host does
not retry it over and over; a failure of the service itself (model store, output container, a
transfer that does not add up) raises, so the host retries. The blob is downloaded in chunks to
a temporary file and scored by `batch.score_file`, the same code as `ptd score`: memory stays
bounded whatever the file size. Logs carry file names, counts and timings, never customer data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, cast

from detector.batch import score_file
from detector.compression import gunzip_to
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
OUTPUTS = (RESULTS, REJECTS, SUMMARY, ERROR)
DOWNLOAD_CONCURRENCY = 2
# Blob Storage naming rules (Azure Storage REST reference, "Naming and Referencing Containers,
# Blobs, and Metadata"): at most 1,024 characters, at most 254 path segments. Characters are
# counted here as UTF-16 code units, as .NET and JavaScript strings count them (a character
# outside the Basic Multilingual Plane counts twice); Azurite enforces neither limit.
MAX_BLOB_NAME_CHARS = 1024
MAX_PATH_SEGMENTS = 254
LONG_NAMES = "_long-names"
GZIP_ENCODINGS = ("gzip", "x-gzip")
WRITE_ATTEMPTS = 5
HASH_BUFFER_BYTES = 1 << 20
_SIMPLE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}")


class TransferError(RuntimeError):
    """What was downloaded is not what the blob holds (length or Content-MD5): nothing is scored
    and the run raises, so that the Functions host retries it (then poisons it)."""


class _Superseded(Exception):
    """The input is no longer the version this run read: its outputs must not be written."""


# -- where the outputs go -------------------------------------------------------------------------
def _name_chars(name: str) -> int:
    """Length of a blob name in UTF-16 code units (what .NET and JavaScript count)."""
    return len(name.encode("utf-16-le")) // 2


def name_problem(blob_name: str) -> str | None:
    """Why `blob_name` cannot have its own output folder in `batch-out`, or None when it can.

    Its outputs are `<blob_name>/<file>`; the longest of them must fit Blob Storage's limits of
    MAX_BLOB_NAME_CHARS characters and MAX_PATH_SEGMENTS path segments; and names under
    LONG_NAMES are reserved (the folder of those reports).
    """
    if blob_name == LONG_NAMES or blob_name.startswith(f"{LONG_NAMES}/"):
        # Its outputs would share a folder with those of a name too long (or delete them).
        return (
            f"names under {LONG_NAMES}/ are reserved for the reports of names that are too "
            "long: move the file to another folder"
        )
    extra = max(len(f"/{output}") for output in OUTPUTS)  # "/summary.json"
    chars = _name_chars(blob_name)
    if chars + extra > MAX_BLOB_NAME_CHARS:
        return (
            f"the blob name is {chars} characters long; its outputs add {extra} and Blob "
            f"Storage allows {MAX_BLOB_NAME_CHARS}: rename the file to at most "
            f"{MAX_BLOB_NAME_CHARS - extra} characters"
        )
    segments = blob_name.count("/") + 1
    if segments + 1 > MAX_PATH_SEGMENTS:
        return (
            f"the blob name has {segments} path segments; its outputs add one and Blob "
            f"Storage allows {MAX_PATH_SEGMENTS}: move the file to a folder at most "
            f"{MAX_PATH_SEGMENTS - 2} levels deep"
        )
    return None


def output_prefix(blob_name: str) -> str:
    """The folder of the outputs of input blob `blob_name` in `batch-out`.

    `2025-01/invoices.csv` -> `2025-01/invoices.csv`: the whole name, so that inputs differing
    only in their suffix never share outputs. A name whose outputs would break Blob Storage's
    naming limits (`name_problem`) -> `_long-names/<sha256 of the UTF-8 name, hex>`, which holds
    only its error.json.
    """
    if name_problem(blob_name) is None:
        return blob_name
    return f"{LONG_NAMES}/{hashlib.sha256(blob_name.encode('utf-8')).hexdigest()}"


# -- small helpers --------------------------------------------------------------------------------
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


def _upload_json(
    container: ContainerClient, name: str, value: dict[str, Any], **conditions: Any
) -> None:
    from azure.storage.blob import ContentSettings

    container.upload_blob(
        name,
        json.dumps(value, indent=2, sort_keys=True).encode(),
        overwrite=True,
        content_settings=ContentSettings(content_type="application/json"),
        **conditions,
    )


def _upload_file(
    container: ContainerClient, name: str, path: Path, content_type: str, **conditions: Any
) -> None:
    from azure.storage.blob import ContentSettings

    with path.open("rb") as handle:
        container.upload_blob(
            name,
            handle,
            overwrite=True,
            max_concurrency=DOWNLOAD_CONCURRENCY,
            content_settings=ContentSettings(content_type=content_type),
            **conditions,
        )


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


# -- conditional writes: never over the outputs of a newer version of the input -------------------
class _Outputs:
    """Writes the outputs of one version (name, ETag) of an input blob under `prefix`.

    Each write or delete: observe the output blob (its ETag, or that it is absent), check that
    the input is still this version (else `_Superseded`), then write on the condition that the
    output did not change since it was observed (If-Match / If-None-Match: *; Blob Storage,
    "Specifying conditional headers for Blob service operations"). A refused condition means
    another run wrote that output meanwhile: observe again. After WRITE_ATTEMPTS refusals in a
    row it raises RuntimeError (the host retries the run).
    """

    def __init__(
        self, container: ContainerClient, source: BlobClient, prefix: str, name: str, etag: str
    ) -> None:
        self.container = container
        self.source = source
        self.prefix = prefix
        self.input_name = name
        self.input_etag = etag

    def path(self, output: str) -> str:
        return f"{self.prefix}/{output}"

    def _observe(self, output: str) -> dict[str, Any]:
        from azure.core import MatchConditions
        from azure.core.exceptions import ResourceNotFoundError

        try:
            etag = self.container.get_blob_client(self.path(output)).get_blob_properties().etag
        except ResourceNotFoundError:
            return {"match_condition": MatchConditions.IfMissing}
        return {"etag": etag, "match_condition": MatchConditions.IfNotModified}

    def check_current(self) -> None:
        """Raise `_Superseded` unless the input blob still has this run's ETag."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            current = str(self.source.get_blob_properties().etag)
        except ResourceNotFoundError:
            raise _Superseded("deleted") from None
        if current != self.input_etag:
            raise _Superseded("replaced")

    def _apply(self, output: str, operation: Callable[[str, dict[str, Any]], None]) -> None:
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError

        for _ in range(WRITE_ATTEMPTS):
            conditions = self._observe(output)
            self.check_current()
            try:
                operation(self.path(output), conditions)
                return
            except (ResourceModifiedError, ResourceExistsError):
                continue  # another run changed this output after it was observed: look again
        raise RuntimeError(
            f"batch output {self.path(output)} changed under each of {WRITE_ATTEMPTS} "
            "conditional writes; not written"
        )

    def put_json(self, output: str, value: dict[str, Any]) -> None:
        self._apply(output, lambda name, c: _upload_json(self.container, name, value, **c))

    def put_file(self, output: str, path: Path, content_type: str) -> None:
        self._apply(
            output, lambda name, c: _upload_file(self.container, name, path, content_type, **c)
        )

    def delete(self, output: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        def delete(name: str, conditions: dict[str, Any]) -> None:
            if "etag" not in conditions:
                return  # absent: nothing to delete
            with contextlib.suppress(ResourceNotFoundError):
                self.container.delete_blob(name, **conditions)

        self._apply(output, delete)


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


def _local_name(blob_name: str) -> str:
    """`input` + the suffixes the file format is recognised by: `x.csv` -> `input.csv`,
    `x.csv.gz` -> `input.csv.gz` (`score_file` decompresses it and reads `input.csv`). A suffix
    that is not a short plain word (a name full of dots) becomes `.unknown`."""
    path = PurePosixPath(blob_name)
    suffixes = [path.suffix]
    if path.suffix.lower() in (".gz", ".gzip"):
        suffixes.insert(0, PurePosixPath(path.stem).suffix)
    cleaned = [s if _SIMPLE_SUFFIX.fullmatch(s) else ".unknown" for s in suffixes if s]
    return "input" + "".join(cleaned).lower()


def _prepare(
    blob_name: str, properties: BlobProperties, raw: Path, settings: Settings
) -> tuple[Path, dict[str, Any]]:
    """The downloaded file ready for `score_file`: its Content-Encoding (transport) undone.
    A gzip *file* (`x.csv.gz`, or gzip bytes under any name) is left to `score_file`, which
    decompresses it as `ptd score` does.

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
    local = raw.with_name(_local_name(blob_name))
    if not encodings:
        raw.rename(local)
        return local, {}
    size = gunzip_to(raw, local, settings.max_decompressed_bytes, name=label)
    raw.unlink()  # the instance's temporary disk is small (0.8 GB on Flex Consumption)
    return local, {"input_content_encoding": "gzip", "input_decoded_bytes": size}


# -- the run --------------------------------------------------------------------------------------
def _refuse(
    writer: _Outputs, identity: dict[str, Any], reason: str, model_version: str | None
) -> dict[str, Any]:
    """error.json for an input that cannot be used; its other outputs go."""
    report = {
        **identity,
        "error": reason,
        "output_folder": writer.prefix,
        "processed_at": _now(),
        "model_version": model_version,
    }
    for stale in (SUMMARY, RESULTS, REJECTS):
        writer.delete(stale)
    writer.put_json(ERROR, report)
    log.warning("batch input %s cannot be used: %s", identity["input_blob"], reason)
    _audit("unreadable", {**identity, "error": reason})
    return report


def process_blob(
    client: BlobClient,
    settings: Settings,
    artifacts: ArtifactSet | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Score one input blob; returns the summary (or error report) written to `batch-out`, or a
    report with `skipped` when nothing was (the blob is gone, was already processed, or changed
    before its outputs were written).

    `client` is the azure.storage.blob.BlobClient the Functions host binds for the trigger.
    `artifacts` defaults to the process-wide model (`store.shared_artifacts`). Raises
    TransferError when the bytes read are not the blob's, ModelError / storage errors when the
    service fails: the host retries those.
    """
    from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError

    started = time.perf_counter()
    name = str(client.blob_name)
    try:
        properties = client.get_blob_properties()
    except ResourceNotFoundError:
        log.warning("batch input %s no longer exists; nothing to do", name)
        _audit("gone", {"input_blob": name})
        return {"input_blob": name, "skipped": "input blob no longer exists"}
    etag = str(properties.etag)
    size = int(properties.size)
    identity = {"input_blob": name, "input_etag": etag, "input_bytes": size}
    prefix = output_prefix(name)

    out = _output_container(settings, environ)
    for marker in (SUMMARY, ERROR):
        previous = _read_json(out, f"{prefix}/{marker}")
        if (
            previous is not None
            and previous.get("input_etag") == etag
            and previous.get("input_blob", name) == name
        ):
            log.info("batch input %s (etag %s) was already processed; skipping", name, etag)
            _audit("duplicate", identity)
            return previous

    writer = _Outputs(out, client, prefix, name, etag)
    try:
        problem = name_problem(name)
        if problem is not None:
            return _refuse(writer, identity, problem, model_version=None)

        if artifacts is None:
            from detector.store import shared_artifacts

            artifacts = shared_artifacts(settings)  # ModelError propagates: the host retries

        with tempfile.TemporaryDirectory(prefix="ptd-blob-") as tmp:
            workdir = Path(tmp)
            raw = workdir / "download"
            try:
                transfer = _download(client, properties, raw)
            except (ResourceNotFoundError, ResourceModifiedError) as exc:
                gone = isinstance(exc, ResourceNotFoundError)
                reason = "deleted" if gone else "replaced"
                log.warning("batch input %s was %s while being read; not scored", name, reason)
                _audit(reason, identity)
                # The replacement (if any) has its own event; nothing is written for this one.
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
                    max_invoices_per_client=settings.max_invoices_per_customer,
                    max_decompressed_bytes=settings.max_decompressed_bytes,
                )
            except InputError as exc:
                reason = str(exc)
                if local is not None:  # score_file names the local copy: name the blob
                    reason = reason.replace(local.name, PurePosixPath(name).name)
                return _refuse(writer, identity, reason, artifacts.version)
            upload_started = time.perf_counter()
            # Results first, summary last: summary.json is the "done" marker.
            writer.delete(SUMMARY)
            writer.delete(ERROR)
            writer.put_file(RESULTS, result.results_path, "text/csv")
            if result.rejects_path is not None:
                writer.put_file(REJECTS, result.rejects_path, "text/csv")
            else:
                writer.delete(REJECTS)
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
                    # gzip on the way (Content-Encoding) or as a file: either way decompressed
                    "input_gzip": bool(encoding) or summary["input_gzip"],
                    "input_decompressed_bytes": summary.get("input_decompressed_bytes")
                    or encoding.get("input_decoded_bytes"),
                    "output_folder": prefix,
                    "outputs": {
                        "results": writer.path(RESULTS),
                        "rejects": writer.path(REJECTS) if result.rejects_path else None,
                    },
                    "processed_at": _now(),
                }
            )
            writer.put_json(SUMMARY, summary)
    except _Superseded as exc:
        log.warning(
            "batch input %s was %s before its outputs were written; they are left to the "
            "run of the current version",
            name,
            exc,
        )
        _audit("superseded", identity)
        return {
            **identity,
            "skipped": f"input blob was {exc} before its outputs were written",
        }
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
