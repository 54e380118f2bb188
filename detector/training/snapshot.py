"""`ptd snapshot`: the training data a scheduled retrain uses, from the `training` container.

Layout of the container (`PTD_TRAINING_CONTAINER`, default `training`), filled by the utility:

    latest/clients_train.(parquet|csv)    clients with `target` (the labelled history so far)
    latest/invoices_train.(parquet|csv)   their invoices, STEG schema
    outcomes/<anything>.(csv|parquet)     inspection outcomes: client_id, inspection_date, fraud
    evaluation/clients.(parquet|csv)      a labelled evaluation set that no model trains on
    evaluation/invoices.(parquet|csv)

The snapshot folder then holds `clients_train`, `invoices_train` and `outcomes.parquet` (every
outcome file, validated, in one table) for `ptd train --data`, and `evaluation/` for
`ptd compare`. Clients of the evaluation set are removed from the training tables and outcomes,
so that the challenger never learns from the clients it is judged on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd

from detector.config import Settings
from detector.schema import InputError
from detector.tables import read_table
from detector.training.outcomes import OUTCOME_COLUMNS

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
    held_out = set(
        read_table(paths["evaluation/clients"], ("client_id",))["client_id"]
        .astype("string")
        .str.strip()
    )
    for key in ("latest/clients_train", "latest/invoices_train"):
        path = paths[key]
        table = read_table(path)
        ids = table["client_id"].astype("string").str.strip()
        kept = table[~ids.isin(held_out).to_numpy()]
        taken[f"{key}_rows_held_out"] = int(len(table) - len(kept))
        kept.to_parquet(path.with_suffix(".parquet"), index=False)
        if path.suffix != ".parquet":
            path.unlink()
    outcome_blobs = [n for n in names if n.startswith("outcomes/") and n.endswith(TABLE_SUFFIXES)]
    frames = []
    for blob in outcome_blobs:
        path = _download(client, blob, out / "outcome-files" / PurePosixPath(blob).name)
        table = read_table(path, OUTCOME_COLUMNS)
        missing = [c for c in OUTCOME_COLUMNS if c not in table.columns]
        if missing:
            raise InputError(f"{blob}: outcomes need column(s): {', '.join(missing)}")
        frames.append(table[list(OUTCOME_COLUMNS)].astype("string"))
    taken["outcome_files"] = outcome_blobs
    if frames:
        outcomes = pd.concat(frames, ignore_index=True)
        ids = outcomes["client_id"].str.strip()
        outcomes = outcomes[~ids.isin(held_out).to_numpy()]
        outcomes.to_parquet(out / "outcomes.parquet", index=False)
        taken["outcome_rows"] = len(outcomes)
    log.info("training snapshot of %s taken into %s", name, out)
    return taken
