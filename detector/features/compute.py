"""Computing features: invoice rows in, one row per client out, vectorised, only what is asked.

Training, the HTTP API and batch scoring all call `compute_features`, so what a model learned
from and what it is served can never disagree. The input is the typed frame of
`schema.prepare_invoices` (every row valid) and, optionally, `schema.prepare_clients`; every
client with at least one valid invoice gets a row. Rows are sorted once by (client, energy type,
date), which makes every client, and every client's electricity or gas history, one contiguous
segment: aggregates are then `ufunc.reduceat` over segments, never a Python loop over clients.
Arrays are computed on first use (`functools.cached_property`), so scoring the 30 served
features does not pay for the 100 other candidates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from detector.features.catalog import (
    CANDIDATE_INDEX,
    CANDIDATES,
    COUNTER_CODES,
    FEATURE_NAMES,
    MAX_SLOPE,
    REMARK_CODES,
    STATUS_CODES,
    TARIFF_CODES,
    FeatureSpec,
)
from detector.schema import CONSUMPTION_COLUMNS, PreparedClients

# pandas is imported inside the functions that use it: the HTTP app scores feature bodies
# without it, and importing it costs about half a second of every cold start.
if TYPE_CHECKING:
    import pandas as pd

DAYS_PER_YEAR = 365.25
# Invoices that claim 0 months or years of consumption are export quirks: bill over 1..12.
MIN_MONTHS, MAX_MONTHS = 1, 12
USUAL_MONTHS = 4  # STEG bills every 4 months
RECENT_SHARE = 0.25  # consumption_trend: the latest quarter of invoices against the rest
TYPE_CODES = {"": None, "elec_": 0, "gaz_": 1}


def _reduce(ufunc: np.ufunc, values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """`ufunc.reduceat` over segments starting at `starts` (none for no rows)."""
    result: np.ndarray = ufunc.reduceat(values, starts) if len(values) else np.zeros(0)
    return result


class Segments:
    """Contiguous runs of a sorted array of group codes: where each starts, and its length."""

    def __init__(self, group: np.ndarray) -> None:
        n = len(group)
        boundary = np.r_[True, group[1:] != group[:-1]] if n else np.zeros(0, bool)
        self.starts = np.flatnonzero(boundary)
        self.counts = np.diff(np.r_[self.starts, n]).astype(np.int64)
        self.n = len(self.starts)
        self.group = group[self.starts] if n else group[:0]

    @cached_property
    def ids(self) -> np.ndarray:
        """Segment number of each row."""
        return np.repeat(np.arange(self.n), self.counts)

    def sum(self, values: np.ndarray) -> np.ndarray:
        return _reduce(np.add, values, self.starts)

    def mean(self, values: np.ndarray) -> np.ndarray:
        result: np.ndarray = self.sum(values) / self.counts
        return result

    def share(self, mask: np.ndarray) -> np.ndarray:
        return self.mean(mask.astype(np.float64))

    def min(self, values: np.ndarray) -> np.ndarray:
        return _reduce(np.minimum, values, self.starts)

    def max(self, values: np.ndarray) -> np.ndarray:
        return _reduce(np.maximum, values, self.starts)

    def std(self, values: np.ndarray) -> np.ndarray:
        """Population standard deviation (two-pass: no cancellation for large values)."""
        centred = values - np.repeat(self.mean(values), self.counts)
        result: np.ndarray = np.sqrt(self.mean(centred * centred))
        return result

    def median(self, values: np.ndarray) -> np.ndarray:
        ordered = values[np.lexsort((values, self.ids))]
        low = self.starts + (self.counts - 1) // 2
        high = self.starts + self.counts // 2
        result: np.ndarray = (ordered[low] + ordered[high]) / 2 if len(values) else np.zeros(0)
        return result

    def nunique(self, values: np.ndarray) -> np.ndarray:
        order = np.lexsort((values, self.ids))
        v, ids = values[order], self.ids[order]
        first = np.r_[True, (v[1:] != v[:-1]) | (ids[1:] != ids[:-1])] if len(v) else v[:0]
        return np.bincount(ids[first.astype(bool)], minlength=self.n).astype(np.float64)

    def mode(self, values: np.ndarray) -> np.ndarray:
        """Most frequent value of each segment; ties go to the smallest value."""
        order = np.lexsort((values, self.ids))
        v, ids = values[order], self.ids[order]
        runs = Segments(np.c_[ids, v].view(np.complex128).ravel()) if len(v) else None
        if runs is None:
            return np.zeros(0)
        run_segment, run_value = ids[runs.starts], v[runs.starts]
        # Per segment, the run with the largest count; among equal counts the first (smallest).
        best = np.lexsort((np.arange(runs.n), -runs.counts, run_segment))
        first_of_segment = np.r_[True, run_segment[best][1:] != run_segment[best][:-1]]
        result: np.ndarray = run_value[best][first_of_segment]
        return result

    def slope(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Least-squares slope of y on x per segment; 0 where x does not vary."""
        dx = x - np.repeat(self.mean(x), self.counts)
        dy = y - np.repeat(self.mean(y), self.counts)
        var = self.sum(dx * dx)
        result: np.ndarray = np.divide(
            self.sum(dx * dy), var, out=np.zeros(self.n), where=var > 1e-12
        )
        return result


class Scope:
    """The invoice rows of one scope (all meters, or one energy type), sorted by client, type
    and date, with their per-client segments. Each array is computed once, on first use."""

    def __init__(self, history: History, type_code: int | None) -> None:
        self.history = history
        self.rows = (
            np.arange(history.n_rows)
            if type_code is None
            else np.flatnonzero(history.type_code == type_code)
        )

    def column(self, name: str) -> np.ndarray:
        return self.history.column(name)[self.rows]

    @cached_property
    def segments(self) -> Segments:
        return Segments(self.history.client[self.rows])

    @cached_property
    def levels(self) -> list[np.ndarray]:
        return [self.column(name) for name in CONSUMPTION_COLUMNS]

    @cached_property
    def total(self) -> np.ndarray:
        total: np.ndarray = np.sum(self.levels, axis=0) if len(self.rows) else np.zeros(0)
        return total

    @cached_property
    def months(self) -> np.ndarray:
        months: np.ndarray = np.clip(self.column("months_number"), MIN_MONTHS, MAX_MONTHS)
        return months

    @cached_property
    def monthly(self) -> np.ndarray:
        monthly: np.ndarray = self.total / self.months
        return monthly

    @cached_property
    def years(self) -> np.ndarray:
        years: np.ndarray = 1970.0 + self.column("invoice_day") / DAYS_PER_YEAR
        return years

    @cached_property
    def index_difference(self) -> np.ndarray | None:
        if not self.history.has("old_index") or not self.history.has("new_index"):
            return None
        difference: np.ndarray = self.column("new_index") - self.column("old_index")
        return difference


class History:
    """Prepared invoice rows of many clients, sorted once by (client, energy type, date)."""

    def __init__(self, invoices: pd.DataFrame, clients: PreparedClients | None) -> None:
        import pandas as pd

        codes, uniques = pd.factorize(invoices["client_id"], sort=True)
        self.client_ids = pd.Index(uniques, name="client_id")
        self.n_clients = len(uniques)
        kinds = invoices["counter_type"].to_numpy(dtype=object)
        type_code = np.where(kinds == "GAZ", 1, 0)
        day = invoices["invoice_day"].to_numpy(dtype=np.float64)
        meter = invoices["counter_number"].to_numpy(dtype=np.float64)
        # The meter breaks ties of date, so that no feature depends on the input's row order.
        self.order = np.lexsort((meter, day, type_code, codes))
        self.client = codes[self.order].astype(np.int64)
        self.type_code = type_code[self.order]
        self.n_rows = len(self.order)
        self._frame = invoices
        self._columns: dict[str, np.ndarray] = {}
        self._clients = clients
        self.scopes: dict[str, Scope] = {}

    def has(self, name: str) -> bool:
        return name in self._frame.columns

    def column(self, name: str) -> np.ndarray:
        if name not in self._columns:
            series = self._frame[name]
            values = (
                series.to_numpy(dtype=object)
                if name in ("counter_statue", "counter_type")
                else series.to_numpy(dtype=np.float64)
            )
            self._columns[name] = values[self.order]
        return self._columns[name]

    def scope(self, prefix: str) -> Scope:
        if prefix not in self.scopes:
            self.scopes[prefix] = Scope(self, TYPE_CODES[prefix])
        return self.scopes[prefix]

    @cached_property
    def everything(self) -> Scope:
        return self.scope("")

    @cached_property
    def first_day(self) -> np.ndarray:
        return self.everything.segments.min(self.column("invoice_day"))

    @cached_property
    def attributes(self) -> pd.DataFrame | None:
        if self._clients is None or not len(self._clients.frame):
            return None
        return self._clients.frame.reindex(self.client_ids)

    def attribute(self, name: str) -> np.ndarray:
        attributes = self.attributes
        if attributes is None:
            return np.full(self.n_clients, np.nan)
        return attributes[name].to_numpy(dtype=np.float64)

    @cached_property
    def meter_rows(self) -> tuple[Segments, np.ndarray]:
        """Rows sorted by (client, meter, date): the segments of each (client, meter), and the
        order of those rows relative to the (client, type, date) order."""
        order = np.lexsort((self.column("invoice_day"), self.column("counter_number"), self.client))
        pairs = np.c_[self.client[order], self.column("counter_number")[order]]
        key = pairs.astype(np.float64).view(np.complex128).ravel()
        return Segments(key), order

    @cached_property
    def meter_starts(self) -> tuple[np.ndarray, np.ndarray]:
        """(client, first day) of each of a client's meters."""
        meters, order = self.meter_rows
        days = self.column("invoice_day")[order]
        return self.client[order][meters.starts], meters.min(days)

    @cached_property
    def latest_meter_start(self) -> np.ndarray:
        client, start = self.meter_starts
        latest = np.full(self.n_clients, -np.inf)
        np.maximum.at(latest, client, start)
        return latest


# --- families ------------------------------------------------------------------------------
# A scoped family maps a Scope to one value per segment (client with rows in that scope); a
# whole-client family maps the History to one value per client.

ScopedFamily = Callable[[Scope], np.ndarray]
ClientFamily = Callable[[History], np.ndarray]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    result: np.ndarray = np.divide(
        numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0
    )
    return result


def _cv(s: Scope) -> np.ndarray:
    return _ratio(s.segments.std(s.monthly), s.segments.mean(s.monthly))


def _slope(s: Scope) -> np.ndarray:
    slope = s.segments.slope(s.years, s.monthly) / (s.segments.mean(s.monthly) + 1.0)
    clipped: np.ndarray = np.clip(slope, -MAX_SLOPE, MAX_SLOPE)
    return clipped


def _index_share(test: Callable[[Scope, np.ndarray], np.ndarray]) -> ScopedFamily:
    def family(s: Scope) -> np.ndarray:
        difference = s.index_difference
        if difference is None:
            return np.full(s.segments.n, np.nan)
        return s.segments.share(test(s, difference))

    return family


def _tier_mean(k: int) -> ScopedFamily:
    return lambda s: s.segments.mean(s.levels[k] / s.months)


def _tier_share(k: int) -> ScopedFamily:
    return lambda s: _ratio(s.segments.sum(s.levels[k]), s.segments.sum(s.total))


def _remark_share(code: int) -> ScopedFamily:
    return lambda s: s.segments.share(s.column("reading_remarque") == code)


def _coefficient_share(s: Scope) -> np.ndarray:
    if not s.history.has("counter_coefficient"):
        return np.full(s.segments.n, np.nan)
    return s.segments.share(s.column("counter_coefficient") > 1)


SCOPED: dict[str, ScopedFamily] = {
    "n_invoices": lambda s: s.segments.counts.astype(np.float64),
    "first_year": lambda s: s.segments.min(s.years),
    "cons_mean": lambda s: s.segments.mean(s.monthly),
    "cons_median": lambda s: s.segments.median(s.monthly),
    "cons_min": lambda s: s.segments.min(s.monthly),
    "cons_max": lambda s: s.segments.max(s.monthly),
    "cons_std": lambda s: s.segments.std(s.monthly),
    "cons_cv": _cv,
    "cons_slope": _slope,
    **{f"tier{k + 1}_mean": _tier_mean(k) for k in range(4)},
    **{f"tier{k + 1}_share": _tier_share(k) for k in range(4)},
    "zero_share": lambda s: s.segments.share(s.total == 0),
    "index_mismatch_share": _index_share(lambda s, d: d != s.total),
    "index_negative_share": _index_share(lambda s, d: d < 0),
    "months_mean": lambda s: s.segments.mean(s.column("months_number")),
    "months_max": lambda s: s.segments.max(s.column("months_number")),
    "status_abnormal_share": lambda s: s.segments.share(s.column("counter_statue") != "0"),
    "remark_mean": lambda s: s.segments.mean(s.column("reading_remarque")),
    **{f"remark_{code}_share": _remark_share(code) for code in REMARK_CODES},
    "n_meters": lambda s: s.segments.nunique(s.column("counter_number")),
    "n_codes": lambda s: s.segments.nunique(s.column("counter_code")),
    "n_tariffs": lambda s: s.segments.nunique(s.column("tarif_type")),
    "coefficient_share": _coefficient_share,
}


def _gaps(h: History) -> tuple[np.ndarray, np.ndarray]:
    """(client, days since the same meter's previous invoice) for every invoice but a meter's
    first."""
    meters, order = h.meter_rows
    days = h.column("invoice_day")[order]
    later = np.ones(len(order), bool)
    later[meters.starts] = False
    gaps = np.diff(days, prepend=days[:1]) if len(days) else days
    return h.client[order][later], gaps[later]


def _gap_mean(h: History) -> np.ndarray:
    client, gaps = _gaps(h)
    count = np.bincount(client, minlength=h.n_clients)
    total = np.bincount(client, weights=gaps, minlength=h.n_clients)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _gap_max(h: History) -> np.ndarray:
    client, gaps = _gaps(h)
    longest = np.full(h.n_clients, -np.inf)
    np.maximum.at(longest, client, gaps)
    return np.where(np.isfinite(longest), longest, np.nan)


def _new_meter_after(h: History) -> np.ndarray:
    years: np.ndarray = (h.latest_meter_start - h.first_day) / DAYS_PER_YEAR
    return years


def _meters_added_later(h: History) -> np.ndarray:
    client, start = h.meter_starts
    late = start - h.first_day[client] > DAYS_PER_YEAR
    return np.bincount(client[late], minlength=h.n_clients).astype(np.float64)


def _meter_changes(h: History) -> np.ndarray:
    meter, client, kind = h.column("counter_number"), h.client, h.type_code
    same_history = (client[1:] == client[:-1]) & (kind[1:] == kind[:-1])
    changed = same_history & (meter[1:] != meter[:-1])
    return np.bincount(client[1:][changed], minlength=h.n_clients).astype(np.float64)


def _latest_meter_ratio(h: History) -> np.ndarray:
    meters, order = h.meter_rows
    client = h.client[order]
    first_of_meter = np.repeat(meters.min(h.column("invoice_day")[order]), meters.counts)
    latest = first_of_meter == h.latest_meter_start[client]
    monthly = h.everything.monthly[order]

    def mean_of(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        count = np.bincount(client[mask], minlength=h.n_clients)
        total = np.bincount(client[mask], weights=monthly[mask], minlength=h.n_clients)
        return total / np.maximum(count, 1), count

    latest_mean, _ = mean_of(latest)
    earlier_mean, earlier_count = mean_of(~latest)
    return np.where(earlier_count > 0, (latest_mean + 1.0) / (earlier_mean + 1.0), np.nan)


def _consumption_trend(h: History) -> np.ndarray:
    s = h.everything
    # Date order across energy types; equal dates ordered by value, so input order never matters.
    order = np.lexsort((s.monthly, h.column("invoice_day"), h.client))
    monthly = s.monthly[order]
    seg = s.segments
    counts = seg.counts.astype(np.float64)
    position = np.arange(len(monthly)) - np.repeat(seg.starts, seg.counts)
    n_recent = np.maximum(1, np.floor(counts * RECENT_SHARE))
    recent = position >= np.repeat(counts - n_recent, seg.counts)
    recent_mean = seg.sum(np.where(recent, monthly, 0.0)) / n_recent
    n_earlier = counts - n_recent
    earlier_mean = _ratio(seg.sum(np.where(recent, 0.0, monthly)), n_earlier)
    return np.where(n_earlier > 0, (recent_mean + 1.0) / (earlier_mean + 1.0), 1.0)


def _share_of(column: str, value: object) -> ClientFamily:
    return lambda h: h.everything.segments.share(h.column(column) == value)


def _creation_year(h: History) -> np.ndarray:
    return 1970.0 + h.attribute("creation_day") / DAYS_PER_YEAR


def _creation_to_first(h: History) -> np.ndarray:
    years: np.ndarray = (h.first_day - h.attribute("creation_day")) / DAYS_PER_YEAR
    return years


WHOLE_CLIENT: dict[str, ClientFamily] = {
    **{f"status_{code}_share": _share_of("counter_statue", code) for code in STATUS_CODES},
    **{f"code_{code}_share": _share_of("counter_code", code) for code in COUNTER_CODES},
    **{f"tariff_{code}_share": _share_of("tarif_type", code) for code in TARIFF_CODES},
    "code_mode": lambda h: h.everything.segments.mode(h.column("counter_code")),
    "tariff_mode": lambda h: h.everything.segments.mode(h.column("tarif_type")),
    "gap_mean_days": _gap_mean,
    "gap_max_days": _gap_max,
    "new_meter_after_years": _new_meter_after,
    "meters_added_later": _meters_added_later,
    "meter_changes": _meter_changes,
    "latest_meter_cons_ratio": _latest_meter_ratio,
    "irregular_period_share": lambda h: h.everything.segments.share(
        h.column("months_number") != USUAL_MONTHS
    ),
    "consumption_trend": _consumption_trend,
    "district": lambda h: h.attribute("district"),
    "region": lambda h: h.attribute("region"),
    "client_catg": lambda h: h.attribute("client_catg"),
    "creation_year": _creation_year,
    "creation_to_first_invoice_years": _creation_to_first,
}


def _compute(spec: FeatureSpec, history: History) -> np.ndarray:
    if spec.name in WHOLE_CLIENT:
        return WHOLE_CLIENT[spec.name](history)
    scope = history.scope(spec.scope)
    values = np.full(history.n_clients, np.nan)
    if scope.segments.n:
        values[scope.segments.group] = SCOPED[spec.family](scope)
    return values


# Every candidate has a way to be computed, and nothing is computed that is not a candidate
# (import-time invariants).
assert set(WHOLE_CLIENT) <= set(CANDIDATE_INDEX)  # nosec B101
assert {s.family for s in CANDIDATES if s.name not in WHOLE_CLIENT} == set(SCOPED)  # nosec B101


def compute_features(
    invoices: pd.DataFrame,
    clients: PreparedClients | None = None,
    names: Sequence[str] = FEATURE_NAMES,
) -> pd.DataFrame:
    """Features per client: a frame indexed by client_id (sorted), one column per name.

    `invoices` is `PreparedInvoices.frame` (every row valid); `clients` the prepared client
    attributes (missing attributes stay NaN). `names` defaults to the served features; any
    candidate of `catalog.CANDIDATES` may be asked for. Raises KeyError for an unknown name.
    """
    import pandas as pd

    specs = [CANDIDATE_INDEX[name] for name in names]
    history = History(invoices, clients)
    values = {spec.name: _compute(spec, history) for spec in specs}
    return pd.DataFrame(values, index=history.client_ids, columns=list(names))
