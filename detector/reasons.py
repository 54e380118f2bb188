"""Top reasons in words an inspector understands, from a model's per-feature contributions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.features import FEATURE_NAMES


@dataclass(slots=True)  # not frozen: batches build tens of thousands of these
class Reason:
    """One feature that pushed the score up: its value, the typical value, and the words."""

    feature: str
    value: float
    typical: float
    contribution: float
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature": self.feature,
            "value": self.value,
            "typical": self.typical,
            "contribution": self.contribution,
            "text": self.text,
        }


def _pct(v: float) -> str:
    return f"{v:.0%}"


def _compare(v: float, typical: float) -> str:
    return "above" if v > typical else "below"


def _trend(v: float, t: float) -> str:
    if v < 1:
        return (
            f"billed consumption fell {1 - v:.0%} below the customer's own earlier level "
            "in the latest invoices"
        )
    return f"billed consumption rose {v - 1:.0%} above the customer's own earlier level"


_TEXTS: dict[str, Callable[[float, float], str]] = {
    "first_invoice_year": lambda v, t: f"billing history starts in {int(v)} (typical: {int(t)})",
    "history_years": lambda v, t: f"{v:.1f} years of billing history (typical: {t:.1f})",
    "n_meters": lambda v, t: (
        f"{v:.0f} different meters billed (typical: {t:.0f}): meters were replaced or added"
    ),
    "abnormal_status_share": lambda v, t: (
        f"{_pct(v)} of invoices report the meter as not working normally (typical: {_pct(t)})"
    ),
    "mean_reading_remark": lambda v, t: (
        f"agents' reading remarks average {v:.1f} (typical: {t:.1f}): problems noted at readings"
    ),
    "mean_monthly_consumption": lambda v, t: (
        f"mean billed consumption of {v:.0f} per month is {_compare(v, t)} the typical {t:.0f}"
    ),
    "max_monthly_consumption": lambda v, t: (
        f"peak billed consumption of {v:.0f} per month is {_compare(v, t)} the typical {t:.0f}"
    ),
    "consumption_trend": _trend,
    "high_tier_share": lambda v, t: (
        f"{_pct(v)} of consumption billed in the top tiers (typical: {_pct(t)})"
    ),
    "mean_counter_code": lambda v, t: (
        f"meter model codes (mean {v:.0f}) of a kind with more confirmed fraud in the training data"
    ),
    "mean_tariff_type": lambda v, t: (
        f"tariff codes (mean {v:.0f}) of a kind with more confirmed fraud in the training data"
    ),
    "district": lambda v, t: f"district {v:.0f} has more confirmed fraud in the training data",
    "region": lambda v, t: f"region {v:.0f} has more confirmed fraud in the training data",
    "client_age_years": lambda v, t: (
        f"customer for {v:.1f} years at the last invoice (typical: {t:.1f})"
    ),
}
assert set(_TEXTS) == set(FEATURE_NAMES)  # import-time invariant  # nosec B101


_TEXT_BY_INDEX = tuple(_TEXTS[name] for name in FEATURE_NAMES)


def _top(
    values: np.ndarray, contributions: np.ndarray, typical: np.ndarray, limit: int
) -> tuple[list[int], zip[tuple[str, float, float, float, str]]]:
    """Each row's count of reasons, and every reason's fields, rows in order, largest first.

    The choice is one vectorised pass over the whole matrix; only the chosen reasons are
    touched in Python, once each: batch scoring explains thousands of rows per request.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    pushes = np.array(np.atleast_2d(contributions), dtype=np.float64, copy=True)
    # A value equal to the typical customer's cannot explain why this one scores high, whatever
    # the trees did with it (interactions): it is never given as a reason.
    equal = np.abs(values - typical) <= 1e-9 * np.maximum(1.0, np.abs(typical))
    pushes[equal | ~(pushes > 1e-9)] = -np.inf
    order = np.argsort(-pushes, axis=1, kind="stable")[:, :limit]
    top = np.take_along_axis(pushes, order, axis=1)
    keep = top > -np.inf  # sorted, so each row's kept reasons come first
    chosen = order[keep]
    index = chosen.tolist()
    value = values[np.nonzero(keep)[0], chosen].tolist()
    usual = typical.tolist()
    usual_of = [usual[i] for i in index]
    texts = [_TEXT_BY_INDEX[i](v, t) for i, v, t in zip(index, value, usual_of, strict=True)]
    names = [FEATURE_NAMES[i] for i in index]
    fields = zip(names, value, usual_of, top[keep].tolist(), texts, strict=True)
    return keep.sum(axis=1).tolist(), fields


def _split(counts: list[int], flat: list[Any]) -> list[list[Any]]:
    rows, start = [], 0
    for count in counts:
        rows.append(flat[start : start + count])
        start += count
    return rows


def explain_rows(
    values: np.ndarray, contributions: np.ndarray, typical: np.ndarray, limit: int = 3
) -> list[list[Reason]]:
    """For each row, the features that pushed its score up the most, largest first."""
    counts, fields = _top(values, contributions, typical, limit)
    return _split(counts, [Reason(*f) for f in fields])


def explain_dicts(
    values: np.ndarray, contributions: np.ndarray, typical: np.ndarray, limit: int = 3
) -> list[list[dict[str, Any]]]:
    """`explain_rows` as JSON-ready dicts (the API's `reasons`), without the Reason objects."""
    counts, fields = _top(values, contributions, typical, limit)
    flat = [
        {"feature": f, "value": v, "typical": t, "contribution": c, "text": x}
        for f, v, t, c, x in fields
    ]
    return _split(counts, flat)


def top_reasons(
    values: np.ndarray, contributions: np.ndarray, typical: np.ndarray, limit: int = 3
) -> list[Reason]:
    """The features that pushed one customer's score up the most, largest first."""
    return explain_rows(values, contributions, typical, limit)[0]
