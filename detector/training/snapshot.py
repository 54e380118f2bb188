"""`ptd snapshot`: the training data a scheduled retrain uses, from the `training` container.

Layout of the container (`PTD_TRAINING_CONTAINER`, default `training`), filled by the utility:

    latest/clients_train.(parquet|csv)    clients with `target` (the labelled history so far)
    latest/invoices_train.(parquet|csv)   their invoices, STEG schema
    outcomes/<anything>.(csv|parquet)     inspection outcomes: client_id, inspection_date, fraud
    evaluation/clients.(parquet|csv)      a labelled evaluation set that no model trains on
    evaluation/invoices.(parquet|csv)

The snapshot folder then holds `clients_train`, `invoices_train` and `outcomes.parquet` for
`ptd train --data`, and `evaluation/` for `ptd compare`. Clients of the evaluation set are removed
from the training tables and outcomes, so that the challenger never learns from the clients it is
judged on.

Every outcome row of every file ends used or rejected with its reason (`validate_outcomes`, the
routine `ptd train` applies too): `outcomes.parquet` holds the used rows, typed (`client_id`
string, `inspection_date` date, `fraud` int64 0/1), and `outcomes.rejects.csv` the others
(`source, row, client_id, reason`): an inspection dated after the snapshot's date, a client of the
evaluation set, a client in neither training table, a bad date or `fraud`. The summary counts
them; no client id is logged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from detector.config import Settings
from detector.schema import InputError
from detector.tables import read_table, spreadsheet_safe
from detector.training.outcomes import UNKNOWN_CLIENT, client_ids, read_outcomes, today

log = logging.getLogger(__name__)
TABLE_SUFFIXES = (".parquet", ".csv")


def _download(container: Any, name: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:
        container.download_blob(name, max_concurrency=2).readinto(handle)
    return target


def _one(names: list[str], prefix: str, stem: str) -> str:
    found = [n for n in names for s in TABLE_SUFFIXES if n == f"{prefix}{stem}{s}"]
    if not found:
        raise InputError(f"training container: no {prefix}{stem}.parquet or .csv")
    return found[0]


def take_snapshot(
    out: Path, settings: Settings, environ: Mapping[str, str] | None = None, container: str = ""
) -> dict[str, Any]:
    """Download the latest training tables, every outcome file (merged) and the evaluation
    set into `out`; returns what was taken. Raises InputError for a missing table or an
    unusable outcome file, ModelError/ConfigError for the storage connection."""
    from detector.store import blob_service_client, storage_error

    name = container or settings.training_container
    client = blob_service_client(settings, environ).get_container_client(name)
    try:
        names = sorted(blob.name for blob in client.list_blobs())
    except Exception as exc:
        raise storage_error(exc, "cannot list the training data", f"container {name}") from None
    out = Path(out)
    taken: dict[str, Any] = {"container": name, "files": {}}
    evaluation = out / "evaluation"
    paths = {}
    for prefix, stem, target in (
        ("latest/", "clients_train", out),
        ("latest/", "invoices_train", out),
        ("evaluation/", "clients", evaluation),
        ("evaluation/", "invoices", evaluation),
    ):
        blob = _one(names, prefix, stem)
        path = _download(client, blob, target / PurePosixPath(blob).name)
        paths[f"{prefix}{stem}"] = path
        taken["files"][blob] = path.stat().st_size
    held_out = client_ids(read_table(paths["evaluation/clients"], ("client_id",))["client_id"])
    known = []
    for key in ("latest/clients_train", "latest/invoices_train"):
        path = paths[key]
        table = read_table(path)
        ids = table["client_id"].astype("string").str.strip()
        kept = table[~ids.isin(held_out).to_numpy()]
        taken[f"{key}_rows_held_out"] = int(len(table) - len(kept))
        known.append(kept["client_id"])
        kept.to_parquet(path.with_suffix(".parquet"), index=False)
        if path.suffix != ".parquet":
            path.unlink()
    outcome_blobs = [n for n in names if n.startswith("outcomes/") and n.endswith(TABLE_SUFFIXES)]
    taken["outcome_files"] = outcome_blobs
    if outcome_blobs:
        taken.update(_outcomes(client, outcome_blobs, out, client_ids(*known), held_out))
    log.info(
        "training snapshot of %s taken into %s: %d outcome rows used, %d rejected",
        name,
        out,
        taken.get("outcome_rows", 0),
        taken.get("outcome_rows_rejected", 0),
    )
    return taken


OUTCOMES_FILE = "outcomes.parquet"
OUTCOME_REJECTS_FILE = "outcomes.rejects.csv"


def _outcomes(
    container: Any, blobs: list[str], out: Path, known: pd.Index, held_out: pd.Index
) -> dict[str, Any]:
    """Validate every outcome file (`read_outcomes`: inspections after today, the snapshot's
    date, clients of the evaluation set and clients in neither training table are rejected);
    write the used rows, typed, to OUTCOMES_FILE and the rejected ones with their reasons to
    OUTCOME_REJECTS_FILE; return the counts. Raises InputError for an unusable file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    as_of = today()
    used, rejected = [], []
    read = 0
    reasons: Counter[str] = Counter()
    unknown: set[str] = set()
    for blob in blobs:
        path = _download(container, blob, out / "outcome-files" / PurePosixPath(blob).name)
        try:
            checked = read_outcomes(path, as_of=as_of, known_clients=known, held_out=held_out)
        except InputError as exc:
            raise InputError(f"{blob}: {str(exc).split(': ', 1)[-1]}") from None
        read += checked.rows
        used.append(checked.used)
        reasons.update(checked.rejects.counts())
        frame = checked.rejects.to_frame()
        unknown.update(frame.loc[frame["reason"] == UNKNOWN_CLIENT, "client_id"])
        frame.insert(0, "source", blob)
        rejected.append(frame)
    table = pd.concat(used, ignore_index=True)
    schema = pa.schema(
        [("client_id", pa.string()), ("inspection_date", pa.date32()), ("fraud", pa.int64())]
    )
    pq.write_table(
        pa.Table.from_pandas(table, schema=schema, preserve_index=False), out / OUTCOMES_FILE
    )
    rejects = pd.concat(rejected, ignore_index=True)
    counts: dict[str, Any] = {
        "outcomes_as_of": as_of.isoformat(),
        "outcome_rows": len(table),
        "outcome_rows_read": read,
        "outcome_rows_rejected": len(rejects),
        "outcome_rows_rejected_by_reason": dict(sorted(reasons.items())),
        "outcome_unknown_clients": len(unknown),
    }
    if len(rejects):
        for column in ("source", "client_id"):
            rejects[column] = spreadsheet_safe(rejects[column])
        rejects.to_csv(out / OUTCOME_REJECTS_FILE, index=False)
        counts["outcome_rejects"] = str(out / OUTCOME_REJECTS_FILE)
    return counts
