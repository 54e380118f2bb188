"""Replay the BlobCreated events Event Grid dead-lettered: score the files they announced.

Event Grid writes an event it could not deliver to the blob trigger's webhook (after the retry
policy ran out, or at once for a 400/401/403/413) as JSON into the data account's dead-letter
container (`eventgrid-deadletter`). Each names a file in `batch-in` by its subject
(`/blobServices/default/containers/batch-in/blobs/<name>`). For each such file this script:

* skips it when `batch-out/<path>/<name>.<ext>/summary.json` (or `error.json`; the folder is
  `detector.blob_batch.output_prefix`) already carries the file's current ETag (a later
  delivery or a re-upload scored it);
* reports it when the file is gone (deleted, or removed by the retention rule);
* otherwise re-uploads the file's own bytes (only if nobody changed it since it was read): a new
  ETag and a new BlobCreated event, which the trigger scores like any upload;

and, with `--delete`, removes the dead-letter blobs it has handled. `--dry-run` only reports.
Fix the cause first (docs/RUNBOOKS.md, "Dead-lettered events"), or the replay is dead-lettered
again. Storage is reached like `ptd` (STORAGE__blobServiceUri and az login, or STORAGE); your
identity needs Blob Data Contributor on batch-in and the dead-letter container, Reader on
batch-out.

Usage: python scripts/replay_dead_letters.py [--dry-run] [--delete]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

SUBJECT_PREFIX = "/blobServices/default/containers/"


@dataclass
class Replay:
    replayed: list[str] = field(default_factory=list)
    already_scored: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)
    other_containers: list[str] = field(default_factory=list)
    dead_letters: list[str] = field(default_factory=list)


def events_of(document: Any) -> Iterable[dict[str, Any]]:
    """A dead-letter blob holds one event or a JSON array of them."""
    items = document if isinstance(document, list) else [document]
    return (item for item in items if isinstance(item, dict))


def blob_of(event: dict[str, Any]) -> tuple[str, str] | None:
    """(container, blob name) of a BlobCreated event, from its subject."""
    subject = str(event.get("subject", ""))
    if not subject.startswith(SUBJECT_PREFIX) or "/blobs/" not in subject:
        return None
    container, _, name = subject[len(SUBJECT_PREFIX) :].partition("/blobs/")
    return container, name


def already_scored(batch_out: Any, name: str, etag: str) -> bool:
    from azure.core.exceptions import ResourceNotFoundError

    from detector.blob_batch import ERROR, SUMMARY, output_prefix

    for marker in (SUMMARY, ERROR):
        try:
            data = batch_out.download_blob(f"{output_prefix(name)}/{marker}").readall()
        except ResourceNotFoundError:
            continue
        if json.loads(data).get("input_etag") == etag:
            return True
    return False


def reupload(blob: Any, etag: str) -> None:
    """Upload the blob's own bytes again, only if it still has `etag` (streamed via a temp file)."""
    from azure.core import MatchConditions

    with tempfile.TemporaryFile() as buffer:
        blob.download_blob(etag=etag, match_condition=MatchConditions.IfNotModified).readinto(
            buffer
        )
        buffer.seek(0)
        blob.upload_blob(
            buffer, overwrite=True, etag=etag, match_condition=MatchConditions.IfNotModified
        )


def replay(
    service: Any,
    batch_in: str,
    batch_out: str,
    dead_letter: str,
    *,
    dry_run: bool = False,
    delete: bool = False,
) -> Replay:
    from azure.core.exceptions import ResourceNotFoundError

    report = Replay()
    letters = service.get_container_client(dead_letter)
    source = service.get_container_client(batch_in)
    target = service.get_container_client(batch_out)
    names: dict[str, None] = {}
    for item in letters.list_blobs():
        report.dead_letters.append(item.name)
        document = json.loads(letters.download_blob(item.name).readall())
        for event in events_of(document):
            found = blob_of(event)
            if found is None or found[0] != batch_in:
                report.other_containers.append(str(event.get("subject", "")))
                continue
            names.setdefault(found[1])
    for name in names:
        blob = source.get_blob_client(name)
        try:
            etag = str(blob.get_blob_properties().etag)
        except ResourceNotFoundError:
            report.gone.append(name)
            continue
        if already_scored(target, name, etag):
            report.already_scored.append(name)
            continue
        if not dry_run:
            reupload(blob, etag)
        report.replayed.append(name)
    if delete and not dry_run:
        for name in report.dead_letters:
            letters.delete_blob(name)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="report, change nothing")
    parser.add_argument("--delete", action="store_true", help="delete the handled dead letters")
    parser.add_argument("--dead-letter-container", default="eventgrid-deadletter")
    args = parser.parse_args(argv)

    from detector.config import Settings
    from detector.store import blob_service_client

    settings = Settings.from_env()
    report = replay(
        blob_service_client(settings),
        settings.batch_in_container,
        settings.batch_out_container,
        args.dead_letter_container,
        dry_run=args.dry_run,
        delete=args.delete,
    )
    verb = "would re-upload" if args.dry_run else "re-uploaded"
    for name in report.replayed:
        print(f"{verb} {name}")
    for name in report.already_scored:
        print(f"already scored: {name}")
    for name in report.gone:
        print(f"gone (not in batch-in any more): {name}")
    for subject in report.other_containers:
        print(f"not a batch-in event, left alone: {subject}")
    print(
        f"{len(report.dead_letters)} dead-letter blobs: {len(report.replayed)} files {verb}, "
        f"{len(report.already_scored)} already scored, {len(report.gone)} gone"
        + ("; dead letters deleted" if args.delete and not args.dry_run else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
