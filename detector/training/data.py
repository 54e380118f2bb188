"""Labelled training data: the STEG tables prepared once, labels per client, and the feature
matrices of each view (full history, cut 12 or 24 months before the last invoice)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detector.features import FEATURE_NAMES, compute_features
from detector.features.views import cut_before_last
from detector.model import sha256_file
from detector.schema import (
    CLIENT_COLUMNS,
    INVOICE_COLUMNS,
    InputError,
    PreparedClients,
    prepare_clients,
    prepare_invoices,
)
from detector.tables import read_table
from detector.training.outcomes import (
    before_inspection,
    client_ids,
    merge_labels,
    read_outcomes,
)


def find_table(data_dir: Path, stem: str) -> Path:
    """`DIR/stem.parquet` or `DIR/stem.csv`; InputError names what is missing."""
    for suffix in (".parquet", ".csv"):
        candidate = data_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise InputError(f"{data_dir}: no {stem}.parquet or {stem}.csv")


@dataclass
class LabelledData:
    """Valid invoice rows, client attributes and a 0/1 label for every client that has both."""

    invoices: pd.DataFrame  # prepared: every row valid, only labelled clients
    clients: PreparedClients
    labels: pd.Series  # 0/1 by client_id, sorted by client_id
    fingerprint: str  # SHA-256 over the input files' names and checksums
    summary: dict[str, Any]
    _views: dict[tuple[int, tuple[str, ...]], pd.DataFrame] = field(default_factory=dict)

    def features(self, months: int = 0, names: tuple[str, ...] = FEATURE_NAMES) -> pd.DataFrame:
        """Features of every labelled client in a view (cut `months` before the last invoice;
        clients left without invoices drop out), indexed by client_id, sorted."""
        key = (months, tuple(names))
        if key not in self._views:
            invoices = cut_before_last(self.invoices, months)
            self._views[key] = compute_features(invoices, self.clients, names)
        return self._views[key]


def optional_table(data_dir: Path, stem: str) -> Path | None:
    try:
        return find_table(data_dir, stem)
    except InputError:
        return None


def load_labelled(data_dir: Path, as_of: date | None = None) -> LabelledData:
    """`clients_train` (with `target`) and `invoices_train` from DIR, Parquet or CSV, and
    `outcomes` when present (training.outcomes: labels added or updated, histories cut at the
    inspection; every outcome row used or rejected with its reason, an inspection dated after
    `as_of`, default today, rejected). The summary is the data snapshot the manifest records:
    each file's SHA-256 and rows, the outcome rows used and rejected by reason, the date ranges.

    Raises InputError when a table is missing or carries no labels.
    """
    data_dir = Path(data_dir)
    return load_labelled_files(
        find_table(data_dir, "clients_train"),
        find_table(data_dir, "invoices_train"),
        optional_table(data_dir, "outcomes"),
        as_of,
    )


def load_labelled_files(
    clients_path: Path,
    invoices_path: Path,
    outcomes_path: Path | None = None,
    as_of: date | None = None,
) -> LabelledData:
    """`load_labelled` from named files (`ptd compare` names its evaluation set's files).
    `as_of`: the date of the data, no inspection may be later (default: today, UTC)."""
    fingerprint = hashlib.sha256()
    files: dict[str, dict[str, Any]] = {}
    for path in (clients_path, invoices_path, outcomes_path):
        if path is None:
            continue
        digest = sha256_file(path)
        fingerprint.update(f"{path.name}:{digest};".encode())
        files[path.name] = {"sha256": digest, "bytes": path.stat().st_size}
    raw_clients = read_table(clients_path, (*CLIENT_COLUMNS, "target"))
    if "target" not in raw_clients.columns and outcomes_path is None:
        raise InputError(f"{clients_path}: no 'target' column with the fraud labels")
    raw_invoices = read_table(invoices_path, INVOICE_COLUMNS)
    prepared = prepare_invoices(raw_invoices)
    # Outcomes: every row used or rejected with its reason (the same routine as `ptd snapshot`);
    # a client in neither table, or an inspection dated after `as_of` (today), is rejected.
    outcomes = (
        read_outcomes(
            outcomes_path,
            as_of=as_of,
            known_clients=client_ids(
                raw_clients["client_id"] if "client_id" in raw_clients.columns else [],
                prepared.frame["client_id"],
                prepared.rejects.client_ids,
            ),
        )
        if outcomes_path is not None
        else None
    )
    clients = prepare_clients(raw_clients)
    target = pd.to_numeric(
        raw_clients["target"] if "target" in raw_clients.columns else pd.Series(np.nan),
        errors="coerce",
    )
    by_client = pd.Series(
        target.reindex(raw_clients.index).to_numpy(),
        index=raw_clients["client_id"].astype("string").str.strip(),
    )
    by_client = by_client[~by_client.index.duplicated()]
    by_client = merge_labels(by_client, outcomes)
    history = before_inspection(prepared.frame, outcomes)
    with_invoices = pd.Index(pd.unique(history["client_id"]))
    labels = by_client.reindex(with_invoices.sort_values())
    labelled = labels.isin([0, 1]).to_numpy()
    labels = labels[labelled].astype(np.int64)
    labels.index.name = "client_id"
    invoices = history[history["client_id"].isin(labels.index)].reset_index(drop=True)
    files[clients_path.name]["rows"] = len(raw_clients)
    files[invoices_path.name]["rows"] = len(raw_invoices)
    days = invoices["invoice_day"].to_numpy(dtype=np.float64)
    summary = {
        "files": files,
        "invoice_dates": (
            [str(np.datetime64(int(days.min()), "D")), str(np.datetime64(int(days.max()), "D"))]
            if len(days)
            else [None, None]
        ),
        "clients": len(raw_clients),
        "invoice_rows": len(prepared.frame) + len(prepared.rejects),
        "invoice_rows_rejected": len(prepared.rejects),
        "invoice_rows_rejected_by_reason": prepared.rejects.counts(),
        "clients_with_invoices": len(with_invoices),
        "clients_without_label": int((~labelled).sum()),
        "clients_without_invoices": int((~by_client.index.isin(with_invoices)).sum()),
        "labelled_clients": len(labels),
        "fraud_rate": round(float(labels.mean()), 5) if len(labels) else 0.0,
    }
    if outcomes is not None and outcomes_path is not None:
        files[outcomes_path.name]["rows"] = outcomes.rows
        summary["outcomes"] = {
            **outcomes.summary(),
            "invoice_rows_after_inspection_dropped": int(len(prepared.frame) - len(history)),
        }
    return LabelledData(invoices, clients, labels, fingerprint.hexdigest(), summary)
