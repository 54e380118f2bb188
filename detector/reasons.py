"""Top reasons in words an inspector understands, from a model's per-feature contributions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from detector.features import CANDIDATE_INDEX, FEATURE_NAMES


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


def _share(what: str) -> Callable[[float, float], str]:
    return lambda v, t: f"{_pct(v)} of {what} (typical: {_pct(t)})"


def _code(what: str) -> Callable[[float, float], str]:
    return lambda v, t: f"{what} {v:.0f} has more confirmed fraud in the training data"


def _new_meter(v: float, t: float) -> str:
    usual = "none added later" if t == 0 else f"{t:.1f} years"
    return f"a new meter appeared {v:.1f} years into the billing history (typical: {usual})"


def _latest_meter(v: float, t: float) -> str:
    if v >= 1:
        return (
            f"consumption on the newest meter is {v:.1f} times that on the earlier ones "
            f"(typical: {t:.1f})"
        )
    return (
        f"consumption on the newest meter is {1 - v:.0%} below that on the earlier ones "
        f"(typical: {t:.1f} times)"
    )


def _variation(v: float, t: float) -> str:
    much = "a lot" if v > t else "little"
    return (
        f"monthly electricity consumption varies {much} from bill to bill (coefficient of "
        f"variation {v:.2f}, typical: {t:.2f})"
    )


def _slope(v: float, t: float) -> str:
    direction = "rises" if v >= 0 else "falls"
    return (
        f"electricity consumption {direction} by {abs(v):.0%} of its mean per year "
        f"(typical: {t:+.0%})"
    )


def _creation_delay(v: float, t: float) -> str:
    if v < 0:
        return f"first invoice {-v:.1f} years before the customer's creation date"
    return f"first invoice {v:.1f} years after the customer was created (typical: {t:.1f})"


# The served features in an inspector's words; any other catalog feature gets `_generic`.
_TEXTS: dict[str, Callable[[float, float], str]] = {
    "new_meter_after_years": _new_meter,
    "region": _code("region"),
    "district": _code("district"),
    "client_catg": _code("client category"),
    "code_mode": lambda v, t: (
        f"mostly billed on meters of model {v:.0f}, a model with more confirmed fraud in the "
        "training data"
    ),
    "elec_n_codes": lambda v, t: (
        f"{v:.0f} different electricity meter models billed (typical: {t:.0f}): the meter was "
        "changed for another model"
    ),
    "elec_n_meters": lambda v, t: (
        f"{v:.0f} different electricity meters billed (typical: {t:.0f}): meters were replaced "
        "or added"
    ),
    "latest_meter_cons_ratio": _latest_meter,
    "code_203_share": _share("invoices from meters of model 203"),
    "code_207_share": _share("invoices from meters of model 207"),
    "code_413_share": _share("invoices from meters of model 413"),
    "code_420_share": _share("invoices from meters of model 420"),
    "elec_cons_cv": _variation,
    "first_year": lambda v, t: f"billing history starts in {int(v)} (typical: {int(t)})",
    "gaz_first_year": lambda v, t: f"gas billing starts in {int(v)} (typical: {int(t)})",
    "creation_year": lambda v, t: f"customer since {int(v)} (typical: {int(t)})",
    "creation_to_first_invoice_years": _creation_delay,
    "elec_cons_std": lambda v, t: (
        f"electricity consumption swings by {v:.0f} per month around its mean (typical: {t:.0f})"
    ),
    "elec_cons_min": lambda v, t: (
        f"lowest electricity consumption on a bill: {v:.0f} per month (typical: {t:.0f})"
    ),
    "elec_cons_median": lambda v, t: (
        f"median electricity consumption of {v:.0f} per month is {_compare(v, t)} the "
        f"typical {t:.0f}"
    ),
    "cons_max": lambda v, t: (
        f"peak billed consumption of {v:.0f} per month is {_compare(v, t)} the typical {t:.0f}"
    ),
    "elec_remark_8_share": _share("electricity readings with the agent's remark 8"),
    "remark_6_share": _share("readings with the agent's remark 6"),
    "gap_max_days": lambda v, t: (
        f"longest gap between two readings of one meter: {v:.0f} days (typical: {t:.0f})"
    ),
    "irregular_period_share": _share("invoices covering an unusual period (not 4 months)"),
    "elec_cons_slope": _slope,
    "elec_tier1_share": _share("electricity consumption billed in the lowest tier"),
    "elec_status_abnormal_share": _share(
        "electricity invoices reporting the meter as not working normally"
    ),
    "tariff_9_share": _share("invoices on tariff 9"),
    "tariff_10_share": _share("invoices on tariff 10"),
    "status_5_share": _share("invoices with meter status 5"),
    "elec_remark_6_share": _share("electricity readings with the agent's remark 6"),
    "gaz_remark_8_share": _share("gas readings with the agent's remark 8"),
    "remark_8_share": _share("readings with the agent's remark 8"),
    "elec_n_invoices": lambda v, t: f"{v:.0f} electricity invoices (typical: {t:.0f})",
    "n_invoices": lambda v, t: f"{v:.0f} invoices in the history (typical: {t:.0f})",
    "cons_mean": lambda v, t: (
        f"mean billed consumption of {v:.0f} per month is {_compare(v, t)} the typical {t:.0f}"
    ),
    "gaz_cons_median": lambda v, t: (
        f"median gas consumption of {v:.0f} per month is {_compare(v, t)} the typical {t:.0f}"
    ),
    "gaz_cons_cv": lambda v, t: (
        f"monthly gas consumption varies {'a lot' if v > t else 'little'} from bill to bill "
        f"(coefficient of variation {v:.2f}, typical: {t:.2f})"
    ),
    "meter_changes": lambda v, t: (
        f"the billed meter changed {v:.0f} times from one invoice to the next (typical: {t:.0f})"
    ),
}


def _generic(name: str) -> Callable[[float, float], str]:
    description = CANDIDATE_INDEX[name].description
    return lambda v, t: f"{description}: {v:.4g} (typical: {t:.4g})"


_TEXT_BY_INDEX = tuple(_TEXTS.get(name) or _generic(name) for name in FEATURE_NAMES)


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
    # the trees did with it (interactions), nor can a missing one: neither is given as a reason.
    equal = np.abs(values - typical) <= 1e-9 * np.maximum(1.0, np.abs(typical))
    pushes[equal | np.isnan(values) | ~(pushes > 1e-9)] = -np.inf
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
