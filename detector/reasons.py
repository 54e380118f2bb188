"""Top reasons in words an inspector understands, from a model's per-feature contributions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from detector.features import FEATURE_NAMES


@dataclass(frozen=True)
class Reason:
    """One feature that pushed the score up: its value, the typical value, and the words."""

    feature: str
    value: float
    typical: float
    contribution: float
    text: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


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
    "n_invoices": lambda v, t: f"{v:.0f} invoices in the history (typical customer: {t:.0f})",
    "history_years": lambda v, t: f"{v:.1f} years of billing history (typical: {t:.1f})",
    "n_meters": lambda v, t: f"{v:.0f} different meters billed (typical: {t:.0f}): "
    "meters were replaced or added",
    "abnormal_status_share": lambda v, t: f"{_pct(v)} of invoices report the meter as not "
    f"working normally (typical: {_pct(t)})",
    "mean_reading_remark": lambda v, t: f"agents' reading remarks average {v:.1f} "
    f"(typical: {t:.1f}): problems noted at readings",
    "mean_monthly_consumption": lambda v, t: f"mean billed consumption of {v:.0f} per month is "
    f"{_compare(v, t)} the typical {t:.0f}",
    "max_monthly_consumption": lambda v, t: f"peak billed consumption of {v:.0f} per month is "
    f"{_compare(v, t)} the typical {t:.0f}",
    "consumption_trend": _trend,
    "zero_consumption_share": lambda v, t: f"{_pct(v)} of invoices billed zero consumption "
    f"(typical: {_pct(t)})",
    "high_tier_share": lambda v, t: f"{_pct(v)} of consumption billed in the top tiers "
    f"(typical: {_pct(t)})",
    "mean_counter_code": lambda v, t: f"meter model codes (mean {v:.0f}) of a kind with more "
    "confirmed fraud in the training data",
    "mean_tariff_type": lambda v, t: f"tariff codes (mean {v:.0f}) of a kind with more "
    "confirmed fraud in the training data",
    "region": lambda v, t: f"region {v:.0f} has more confirmed fraud in the training data",
    "client_age_years": lambda v, t: f"customer for {v:.1f} years at the last invoice "
    f"(typical: {t:.1f})",
}
assert set(_TEXTS) == set(FEATURE_NAMES)


def top_reasons(
    values: np.ndarray, contributions: np.ndarray, typical: np.ndarray, limit: int = 3
) -> list[Reason]:
    """The features that pushed this one customer's score up the most, largest first."""
    order = np.argsort(-contributions, kind="stable")[:limit]
    reasons = []
    for index in order:
        contribution = float(contributions[index])
        if contribution <= 1e-9:
            break
        name = FEATURE_NAMES[index]
        value, usual = float(values[index]), float(typical[index])
        reasons.append(Reason(name, value, usual, contribution, _TEXTS[name](value, usual)))
    return reasons
