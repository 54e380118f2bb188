"""Inspection outcomes: what inspectors found, as labels for the next model.

An outcomes table (CSV or Parquet) has one row per inspection: `client_id`, `inspection_date`
(yyyy-mm-dd, or dd/mm/yyyy) and `fraud` (1 confirmed, 0 not); other columns (the inspector's
notes, a case number) are ignored. Outcomes add labels for new clients and update those of the
clients table: the latest inspection of a client decides its label (on one day, a confirmed fraud
wins). Because an outcome has a date, the client's history is cut there: only invoices dated
*before* the inspection are used, so nothing the inspection caused (a replaced meter, a corrected
bill, consumption that rises once a bypass is removed) can leak into what the model learns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detector.schema import InputError, Rejects, in_window, parse_dates
from detector.tables import read_table

OUTCOME_COLUMNS = ("client_id", "inspection_date", "fraud")


@dataclass(frozen=True)
class Outcomes:
    """The latest inspection of each client: its label and its date (days since 1970-01-01)."""

    labels: pd.Series  # 0/1 by client_id
    inspected: pd.Series  # inspection day by client_id
    rejects: Rejects
    rows: int
    days: np.ndarray  # every valid inspection's day (the date range of the table)

    def summary(self) -> dict[str, Any]:
        days = self.days
        first, last = (_iso(days.min()), _iso(days.max())) if len(days) else (None, None)
        return {
            "outcome_rows": self.rows,
            "outcome_rows_rejected": len(self.rejects),
            "outcome_rows_rejected_by_reason": self.rejects.counts(),
            "inspected_clients": len(self.labels),
            "inspection_dates": [first, last],
            "inspected_fraud_rate": round(float(self.labels.mean()), 5)
            if len(self.labels)
            else 0.0,
        }


def _iso(day: float) -> str:
    return str(np.datetime64(int(day), "D"))


def read_outcomes(path: Path) -> Outcomes:
    """Read and validate an outcomes table; a row that cannot be used is rejected with its
    reason (counted in the summary), never guessed. Raises InputError when a column is missing."""
    raw = read_table(Path(path), OUTCOME_COLUMNS)
    missing = [c for c in OUTCOME_COLUMNS if c not in raw.columns]
    if missing:
        raise InputError(f"{Path(path).name}: outcomes need column(s): {', '.join(missing)}")
    n = len(raw)
    reasons = np.full(n, "", dtype=object)
    ids = raw["client_id"].astype("string").str.strip().fillna("")
    reasons[(ids == "").to_numpy()] = "missing client_id"
    day = parse_dates(raw["inspection_date"], day_first=True)
    bad_day = np.isnan(day) | ~in_window(day)
    reasons[bad_day & (reasons == "")] = "invalid inspection_date: expected yyyy-mm-dd"
    fraud = pd.to_numeric(raw["fraud"], errors="coerce").to_numpy(dtype=np.float64)
    reasons[~np.isin(fraud, (0.0, 1.0)) & (reasons == "")] = "invalid fraud: expected 0 or 1"
    good = reasons == ""
    frame = pd.DataFrame(
        {"client_id": ids[good].to_numpy(), "day": day[good], "fraud": fraud[good]}
    )
    # The latest inspection decides; on the same day a confirmed fraud wins.
    latest = frame.sort_values(["client_id", "day", "fraud"]).drop_duplicates(
        "client_id", keep="last"
    )
    latest = latest.set_index("client_id")
    bad = ~good
    rejects = Rejects(
        np.flatnonzero(bad).astype(np.int64),
        ids[bad].to_numpy(dtype=object),
        reasons[bad],
    )
    return Outcomes(
        labels=latest["fraud"].astype(np.int64),
        inspected=latest["day"],
        rejects=rejects,
        rows=n,
        days=day[good],
    )


def before_inspection(invoices: pd.DataFrame, outcomes: Outcomes | None) -> pd.DataFrame:
    """Prepared invoice rows, each inspected client's cut to those dated before its inspection."""
    if outcomes is None or not len(outcomes.inspected) or not len(invoices):
        return invoices
    limit = invoices["client_id"].map(outcomes.inspected).to_numpy(dtype=np.float64)
    day = invoices["invoice_day"].to_numpy(dtype=np.float64)
    keep = np.isnan(limit) | (day < limit)
    kept: pd.DataFrame = invoices[keep].reset_index(drop=True)
    return kept


def merge_labels(targets: pd.Series, outcomes: Outcomes | None) -> pd.Series:
    """Labels by client: the clients table's `target`, added to and updated by the outcomes."""
    if outcomes is None:
        return targets
    merged = targets.copy()
    merged = merged.reindex(merged.index.union(outcomes.labels.index))
    merged.loc[outcomes.labels.index] = outcomes.labels.to_numpy(dtype=np.float64)
    return merged
