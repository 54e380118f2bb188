"""Inspection outcomes: what inspectors found, as labels for the next model.

An outcomes table (CSV or Parquet) has one row per inspection: `client_id`, `inspection_date`
(yyyy-mm-dd, or dd/mm/yyyy) and `fraud` (1 confirmed, 0 not); other columns (the inspector's
notes, a case number) are ignored. Outcomes add labels for new clients and update those of the
clients table: the latest inspection of a client decides its label (on one day, a confirmed fraud
wins). Because an outcome has a date, the client's history is cut there: only invoices dated
*before* the inspection are used, so nothing the inspection caused (a replaced meter, a corrected
bill, consumption that rises once a bypass is removed) can leak into what the model learns.

Every row ends used or rejected with its reason (`validate_outcomes`, the one routine behind
`ptd train --data DIR` with DIR/outcomes.* and `ptd snapshot`): a missing client id, a date that
is not one or lies outside the plausible window, an inspection dated after the data's date (the
snapshot's, or today: a future date would decide its client's label over every real
inspection), a `fraud` other than 0 or 1, a client of the evaluation set (snapshot), or a client
found in neither the clients nor the invoices table.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detector.schema import DATE_WINDOW, InputError, Rejects, in_window, parse_dates
from detector.tables import read_table

OUTCOME_COLUMNS = ("client_id", "inspection_date", "fraud")
# Reasons a row is not used; a summary counts them by the text before the first colon.
MISSING_CLIENT = "missing client_id"
BAD_DATE = "invalid inspection_date: expected yyyy-mm-dd or dd/mm/yyyy"
DATE_OUT_OF_WINDOW = f"invalid inspection_date: outside {DATE_WINDOW}"
FUTURE_DATE = "inspection_date in the future: after {as_of}, the date of the data"
BAD_FRAUD = "invalid fraud: expected 0 or 1"
HELD_OUT = "client in the evaluation set: held out of training"
UNKNOWN_CLIENT = "unknown client_id: in neither the clients nor the invoices table"


def today() -> date:
    """The date (UTC) an inspection may not be later than, when the data names none."""
    return datetime.now(UTC).date()


@dataclass(frozen=True)
class Outcomes:
    """Validated outcome rows and, per client, the latest inspection: its label and its date.

    `used` holds every row that was used, typed (`client_id` string, `inspection_date` a date,
    `fraud` int64 0/1), in input order; `rejects` every other row with its reason. `labels` and
    `inspected` (days since 1970-01-01) are by client_id.
    """

    labels: pd.Series  # 0/1 by client_id
    inspected: pd.Series  # inspection day by client_id
    rejects: Rejects
    rows: int  # rows read: len(used) + len(rejects)
    days: np.ndarray  # every used inspection's day (the date range of the table)
    used: pd.DataFrame
    as_of: date
    unknown_clients: int  # distinct client ids found in neither table

    def summary(self) -> dict[str, Any]:
        """Counts for the data snapshot (the manifest's `training_data.outcomes`): no client id."""
        days = self.days
        first, last = (_iso(days.min()), _iso(days.max())) if len(days) else (None, None)
        return {
            "outcome_rows": len(self.used),
            "outcome_rows_read": self.rows,
            "outcome_rows_rejected": len(self.rejects),
            "outcome_rows_rejected_by_reason": self.rejects.counts(),
            "outcome_unknown_clients": self.unknown_clients,
            "outcomes_as_of": self.as_of.isoformat(),
            "inspected_clients": len(self.labels),
            "inspection_dates": [first, last],
            "inspected_fraud_rate": round(float(self.labels.mean()), 5)
            if len(self.labels)
            else 0.0,
        }


def counts_line(summary: dict[str, Any], files: int | None = None) -> str:
    """One line for stderr from an outcomes summary (`Outcomes.summary`, `ptd snapshot`'s):
    how many rows were read (from how many `files`), used and rejected, by reason; counts
    only, no client id."""
    reasons = ", ".join(
        f"{reason}: {count}" for reason, count in summary["outcome_rows_rejected_by_reason"].items()
    )
    source = f" from {files} file(s)" if files is not None else ""
    line = (
        f"outcomes: {summary['outcome_rows_read']} rows read{source}, "
        f"{summary['outcome_rows']} used, {summary['outcome_rows_rejected']} rejected"
    )
    if reasons:
        line += f" ({reasons})"
    unknown = summary.get("outcome_unknown_clients", 0)
    if unknown:
        line += f"; {unknown} client id(s) in neither the clients nor the invoices table"
    return line


def _iso(day: float) -> str:
    return str(np.datetime64(int(day), "D"))


def client_ids(*columns: Collection[str] | pd.Index | pd.Series) -> pd.Index:
    """The distinct client ids of some columns (the clients' and invoices' `client_id`), as
    stripped strings; unique values are stripped, not every row (millions of invoices)."""
    parts = [
        pd.Series(
            pd.unique(
                c.to_numpy() if isinstance(c, pd.Series | pd.Index) else np.array(list(c), object)
            )
        )
        for c in columns
    ]
    merged = pd.concat([pd.Series([], dtype=object), *parts], ignore_index=True)
    stripped = merged.astype("string").str.strip().dropna()
    result: pd.Index = pd.Index(stripped.unique(), dtype="string")
    return result


def validate_outcomes(
    raw: pd.DataFrame,
    *,
    as_of: date | None = None,
    known_clients: Collection[str] | pd.Index | pd.Series | None = None,
    held_out: Collection[str] | pd.Index | pd.Series | None = None,
) -> Outcomes:
    """Check every outcome row; each is used or rejected with its reason, never guessed.

    `raw` has the OUTCOME_COLUMNS (any other column is ignored; rows are numbered from 0 in the
    rejects). `as_of` (default: today, UTC) is the date of the data: a later inspection is
    rejected. With `known_clients`, a client in neither table is rejected ("unknown client_id");
    with `held_out` (the evaluation set's clients), so is a client of it. The first reason
    that applies is the row's. Returns the used rows, typed, and the labels they give.
    Raises InputError when a column is missing.
    """
    missing = [c for c in OUTCOME_COLUMNS if c not in raw.columns]
    if missing:
        raise InputError(f"outcomes need column(s): {', '.join(missing)}")
    as_of = as_of or today()
    n = len(raw)
    reasons = np.full(n, "", dtype=object)

    def reject(mask: np.ndarray, reason: str) -> None:
        reasons[mask & (reasons == "")] = reason

    ids = raw["client_id"].astype("string").str.strip().fillna("")
    reject((ids == "").to_numpy(), MISSING_CLIENT)
    day = parse_dates(raw["inspection_date"], day_first=True)
    reject(np.isnan(day), BAD_DATE)
    reject(~np.isnan(day) & ~in_window(day), DATE_OUT_OF_WINDOW)
    limit = float((np.datetime64(as_of, "D") - np.datetime64(0, "D")).astype(np.int64))
    with np.errstate(invalid="ignore"):
        reject(day > limit, FUTURE_DATE.format(as_of=as_of.isoformat()))
    fraud = pd.to_numeric(raw["fraud"], errors="coerce").to_numpy(dtype=np.float64)
    reject(~np.isin(fraud, (0.0, 1.0)), BAD_FRAUD)
    if held_out is not None:
        reject(ids.isin(client_ids(held_out)).to_numpy(), HELD_OUT)
    unknown_clients = 0
    if known_clients is not None:
        unknown = ~ids.isin(client_ids(known_clients)).to_numpy()
        reject(unknown, UNKNOWN_CLIENT)
        unknown_clients = int(ids[reasons == UNKNOWN_CLIENT].nunique())
    good = reasons == ""
    used = pd.DataFrame(
        {
            "client_id": ids[good].to_numpy(),
            "inspection_date": day[good].astype(np.int64).astype("datetime64[D]"),
            "fraud": fraud[good].astype(np.int64),
        }
    ).astype({"client_id": "string"})
    frame = pd.DataFrame(
        {"client_id": used["client_id"].to_numpy(), "day": day[good], "fraud": fraud[good]}
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
        used=used,
        as_of=as_of,
        unknown_clients=unknown_clients,
    )


def read_outcomes(
    path: Path,
    *,
    as_of: date | None = None,
    known_clients: Collection[str] | pd.Index | pd.Series | None = None,
    held_out: Collection[str] | pd.Index | pd.Series | None = None,
) -> Outcomes:
    """Read an outcomes table (CSV or Parquet) and validate it (`validate_outcomes`).
    Raises InputError naming the file when it cannot be read or a column is missing."""
    raw = read_table(Path(path), OUTCOME_COLUMNS)
    try:
        return validate_outcomes(raw, as_of=as_of, known_clients=known_clients, held_out=held_out)
    except InputError as exc:
        raise InputError(f"{Path(path).name}: {exc}") from None


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
