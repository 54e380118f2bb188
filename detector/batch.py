"""Batch scoring of whole tables: invoice rows (or a features table) in, one result per client.

The `ptd score` command and the blob-triggered function both call `score_frames`, so a file
scored locally and one dropped into `batch-in` give the same results. Nothing is lost silently:
every client in the input is in `results` or, with the reason, in `rejects`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from detector.features import FEATURE_NAMES, FEATURES, compute_features
from detector.model import ArtifactSet, Scores
from detector.reasons import top_reasons
from detector.schema import (
    CLIENT_COLUMNS,
    INVOICE_COLUMNS,
    InputError,
    Rejects,
    prepare_clients,
    prepare_invoices,
)

RESULT_COLUMNS = (
    "client_id",
    "theft_probability",
    "flagged",
    "risk_level",
    "reasons",
    "model",
    "model_version",
)
REJECT_COLUMNS = ("source", "row", "client_id", "reason")


@dataclass
class BatchResult:
    """Scored clients, rejected rows with reasons, and a summary for humans and monitoring."""

    results: pd.DataFrame
    rejects: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def is_features_table(columns: pd.Index) -> bool:
    return "client_id" in columns and all(name in columns for name in FEATURE_NAMES)


def _reject_frame(source: str, rejects: Rejects) -> pd.DataFrame:
    frame = rejects.to_frame()
    frame.insert(0, "source", source)
    return frame


def _features_from_table(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Validate a ready features table: finite numbers within each feature's range."""
    ids = table["client_id"].astype("string").str.strip()
    reasons = pd.Series("", index=table.index, dtype=object)
    reasons[ids.isna() | (ids == "")] = "missing client_id"
    values = {}
    for spec in FEATURES:
        column = pd.to_numeric(table[spec.name], errors="coerce").astype(np.float64)
        # Client attributes may be missing (imputed); invoice features may not.
        bad = (column < spec.min) | (column > spec.max) | np.isinf(column)
        if spec.source == "invoices":
            bad |= column.isna()
        reasons[bad & (reasons == "")] = f"invalid {spec.name}: missing or outside [{spec.min}, {spec.max}]"
        values[spec.name] = column
    duplicated = ids.duplicated(keep="first") & (reasons == "")
    reasons[duplicated] = "duplicate client_id: first row used"
    good = (reasons == "").to_numpy()
    features = pd.DataFrame(values)[good]
    features.index = pd.Index(ids[good].to_numpy(), name="client_id")
    bad_rows = np.flatnonzero(~good)
    rejects = pd.DataFrame(
        {
            "source": "features",
            "row": bad_rows,
            "client_id": ids.fillna("").to_numpy(dtype=object)[bad_rows],
            "reason": reasons.to_numpy()[bad_rows],
        }
    )
    return features, rejects


def results_frame(client_ids: pd.Index, scores: Scores, typical: np.ndarray) -> pd.DataFrame:
    """One row per client, with the top reasons joined as text."""
    if scores.contributions is None:
        reasons = [""] * len(client_ids)
    else:
        reasons = [
            "; ".join(r.text for r in top_reasons(values, contribution, typical))
            for values, contribution in zip(scores.features, scores.contributions, strict=True)
        ]
    return pd.DataFrame(
        {
            "client_id": np.asarray(client_ids, dtype=object),
            "theft_probability": np.round(scores.probability, 6),
            "flagged": scores.flagged,
            "risk_level": scores.risk_level,
            "reasons": reasons,
            "model": scores.model,
            "model_version": scores.model_version,
        }
    )


def score_frames(
    table: pd.DataFrame,
    artifacts: ArtifactSet,
    clients: pd.DataFrame | None = None,
    model: str | None = None,
    with_reasons: bool = True,
) -> BatchResult:
    """Score a table of invoice rows (client attributes as extra columns or in `clients`),
    or a features table (client_id and the 14 features)."""
    started = time.perf_counter()
    name = artifacts.resolve(model)
    if is_features_table(table.columns):
        features, rejects = _features_from_table(table)
        input_kind, input_rows = "features", len(table)
    else:
        missing_invoice_columns = [c for c in ("client_id", "invoice_date") if c not in table]
        if missing_invoice_columns and not is_features_table(table.columns):
            raise InputError(
                "input is neither invoice rows nor a features table: missing column(s) "
                f"{', '.join(missing_invoice_columns)}"
            )
        invoices = prepare_invoices(table)
        if clients is None and any(c in table.columns for c in ("region", "creation_date")):
            attrs = [c for c in CLIENT_COLUMNS if c in table.columns]
            clients = table[attrs].drop_duplicates(subset="client_id", keep="first")
            client_source = "invoices (client columns)"
        else:
            client_source = "clients"
        prepared_clients = prepare_clients(clients)
        features = compute_features(invoices.frame, prepared_clients)
        rejects = pd.concat(
            [
                _reject_frame("invoices", invoices.rejects),
                _reject_frame(client_source, prepared_clients.rejects),
            ],
            ignore_index=True,
        )
        input_kind, input_rows = "invoices", len(table)
    features_done = time.perf_counter()
    scores = artifacts.score(features.to_numpy(dtype=np.float64), name, with_reasons)
    results = results_frame(features.index, scores, artifacts.typical)
    finished = time.perf_counter()
    scored_ids = set(features.index)
    unscored = {str(c) for c in rejects["client_id"] if c and c not in scored_ids}
    summary = {
        "input_kind": input_kind,
        "input_rows": int(input_rows),
        "clients_scored": int(len(results)),
        "clients_flagged": int(results["flagged"].sum()),
        "flagged_rate": round(float(results["flagged"].mean()), 5) if len(results) else 0.0,
        "clients_rejected": len(unscored),
        "rows_rejected": int(len(rejects)),
        "rows_rejected_by_reason": {
            str(k): int(v)
            for k, v in rejects["reason"].str.split(":", n=1).str[0].value_counts().items()
        },
        "model": name,
        "model_version": artifacts.version,
        "seconds": {
            "features": round(features_done - started, 3),
            "scoring": round(finished - features_done, 3),
        },
    }
    return BatchResult(results=results, rejects=rejects, summary=summary)


__all__ = ["INVOICE_COLUMNS", "REJECT_COLUMNS", "RESULT_COLUMNS", "BatchResult", "score_frames"]
