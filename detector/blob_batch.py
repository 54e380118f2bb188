"""The blob-triggered batch: score a billing export dropped into `batch-in`, write to `batch-out`.

For an input blob `<dir>/<stem>.<ext>` the outputs go under `batch-out/<dir>/<stem>/`:

    results.csv    one row per scored client (probability, flag, risk level, reasons, model)
    rejects.csv    only when rows were rejected: source, row (0-based in the file), client, reason
    summary.json   counts, flagged rate, model and version, timings, the input's name and ETag
    error.json     instead of the three above when the file cannot be used at all

Event Grid delivers at least once, so a run is idempotent: outputs are keyed by the input's
name and ETag; summary.json (or error.json) is written last, and a run that finds one for the
same ETag does nothing. A crash before that point leaves no summary, so the redelivery redoes
the work and overwrites the partial outputs with identical ones. A file that cannot be read gets
error.json and the function returns normally, so the host does not retry it over and over; a
failure of the service itself (model store, output container) raises, so the host retries.

The blob is downloaded in chunks to a temporary file and scored by `batch.score_file`, the same
code as `ptd score`: memory stays bounded whatever the file size. Logs carry file names,
counts and timings, never customer data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from detector.batch import score_file
from detector.config import Settings
from detector.model import ArtifactSet
from detector.schema import InputError

if TYPE_CHECKING:
    from azure.storage.blob import BlobClient, ContainerClient

log = logging.getLogger(__name__)

RESULTS = "results.csv"
REJECTS = "rejects.csv"
SUMMARY = "summary.json"
ERROR = "error.json"
DOWNLOAD_CONCURRENCY = 2


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


def process_blob(
    client: BlobClient,
    settings: Settings,
    artifacts: ArtifactSet | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Score one input blob; returns the summary (or error report) written to `batch-out`.

    `client` is the azure.storage.blob.BlobClient the Functions host binds for the trigger.
    `artifacts` defaults to the process-wide model (`store.shared_artifacts`).
    """
    from azure.core import MatchConditions
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
        local = workdir / ("input" + (PurePosixPath(name).suffix or ""))
        try:
            with local.open("wb") as handle:
                # Chunked download pinned to the ETag seen above: a blob replaced or deleted
                # while it is read fails here instead of mixing two versions.
                client.download_blob(
                    max_concurrency=DOWNLOAD_CONCURRENCY,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                ).readinto(handle)
        except (ResourceNotFoundError, ResourceModifiedError) as exc:
            gone = isinstance(exc, ResourceNotFoundError)
            reason = "deleted" if gone else "replaced"
            log.warning("batch input %s was %s while being read; not scored", name, reason)
            _audit(reason, identity)
            # The replacement (if any) has its own event; nothing is written for this version.
            return {**identity, "skipped": f"input blob was {reason} while being read"}
        download_seconds = time.perf_counter() - started
        try:
            result = score_file(
                local,
                artifacts,
                workdir / RESULTS,
                rejects_out=workdir / REJECTS,
                workdir=workdir,
            )
        except InputError as exc:
            reason = str(exc).replace(local.name, PurePosixPath(name).name)
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
