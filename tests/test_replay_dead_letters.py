"""scripts/replay_dead_letters.py against Azurite: dead-lettered BlobCreated events are turned
back into uploads of the files they announced, unless the file was scored or is gone."""

from __future__ import annotations

import json
from typing import Any

import pytest

from detector.blob_batch import output_prefix
from scripts.replay_dead_letters import blob_of, replay
from tests.azurite import free_port

pytestmark = [pytest.mark.azurite, pytest.mark.xdist_group("azurite")]


def event(name: str, container: str = "batch-in") -> dict[str, Any]:
    """A dead-lettered BlobCreated event as Event Grid writes it (Event Grid schema)."""
    return {
        "id": f"id-{name}",
        "topic": "/subscriptions/s/providers/Microsoft.Storage/storageAccounts/st",
        "subject": f"/blobServices/default/containers/{container}/blobs/{name}",
        "eventType": "Microsoft.Storage.BlobCreated",
        "data": {"url": f"https://st.blob.core.windows.net/{container}/{name}", "api": "PutBlob"},
        "deadLetterReason": "MaxDeliveryAttemptsExceeded",
        "deliveryAttempts": 30,
        "lastDeliveryOutcome": "Unauthorized",
    }


@pytest.fixture
def containers(azurite: str) -> Any:
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(azurite)
    suffix = str(free_port())
    names = {kind: f"{kind}{suffix}" for kind in ("in", "out", "dl")}
    clients = {kind: service.create_container(name) for kind, name in names.items()}
    yield service, names, clients
    for name in names.values():
        service.delete_container(name)


def test_blob_of_reads_the_subject() -> None:
    assert blob_of(event("2025-01/a b.csv")) == ("batch-in", "2025-01/a b.csv")
    assert blob_of({"subject": "/something/else"}) is None


def test_replay_reuploads_unscored_files_and_skips_the_rest(containers: Any) -> None:
    service, names, c = containers
    for name in ("pending.csv", "done.csv"):
        c["in"].upload_blob(name, b"client_id,invoice_date\n1,2020-01-01\n")
    done_etag = c["in"].get_blob_client("done.csv").get_blob_properties().etag
    # The trigger's own layout: batch-out/<input blob name>/summary.json.
    c["out"].upload_blob(
        f"{output_prefix('done.csv')}/summary.json", json.dumps({"input_etag": done_etag})
    )
    pending_before = c["in"].get_blob_client("pending.csv").get_blob_properties().etag
    c["dl"].upload_blob(
        "evgt/batch-in-to-score-batch-blob/2026/11/30/12/a.json",
        json.dumps([event("pending.csv", names["in"]), event("done.csv", names["in"])]),
    )
    c["dl"].upload_blob(
        "evgt/batch-in-to-score-batch-blob/2026/11/30/12/b.json",
        json.dumps(event("deleted.csv", names["in"])),  # a single event, not an array
    )
    c["dl"].upload_blob("evgt/x/c.json", json.dumps([event("other.csv", "elsewhere")]))

    dry = replay(service, names["in"], names["out"], names["dl"], dry_run=True, delete=True)
    assert dry.replayed == ["pending.csv"]
    assert c["in"].get_blob_client("pending.csv").get_blob_properties().etag == pending_before
    assert len(list(c["dl"].list_blobs())) == 3, "a dry run deletes nothing"

    report = replay(service, names["in"], names["out"], names["dl"], delete=True)
    assert report.replayed == ["pending.csv"]
    assert report.already_scored == ["done.csv"]
    assert report.gone == ["deleted.csv"]
    assert report.other_containers == ["/blobServices/default/containers/elsewhere/blobs/other.csv"]
    pending = c["in"].get_blob_client("pending.csv")
    assert pending.get_blob_properties().etag != pending_before  # a new BlobCreated event
    assert pending.download_blob().readall() == b"client_id,invoice_date\n1,2020-01-01\n"
    assert c["in"].get_blob_client("done.csv").get_blob_properties().etag == done_etag
    assert not list(c["dl"].list_blobs())


def test_replay_keeps_dead_letters_without_delete(containers: Any) -> None:
    service, names, c = containers
    c["in"].upload_blob("a.csv", b"x")
    c["dl"].upload_blob("d.json", json.dumps([event("a.csv", names["in"])]))
    report = replay(service, names["in"], names["out"], names["dl"])
    assert report.replayed == ["a.csv"]
    assert [b.name for b in c["dl"].list_blobs()] == ["d.json"]
