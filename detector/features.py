"""The 14 features: one vectorised code path from invoice rows to one row per client.

Training, the HTTP API and batch scoring all call `compute_features`, so what the model learned
from and what it is served can never disagree. Input is the typed frame of
`schema.prepare_invoices` (plus `schema.prepare_clients`); every client with at least one valid
invoice gets a row. Client attributes that are missing stay NaN here; the model fills them with
the training medians recorded in features.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

# pandas is imported inside the functions that use it: the HTTP app scores feature bodies
# without it, and importing it costs about half a second of every cold start.
if TYPE_CHECKING:
    import pandas as pd

from detector.schema import CONSUMPTION_COLUMNS, PreparedClients

DAYS_PER_YEAR = 365.25
# Invoices that claim 0 months or years of consumption are export quirks: bill over 1..12.
MIN_MONTHS, MAX_MONTHS = 1, 12
# The latest quarter of a client's invoices (at least one) is compared with the rest.
RECENT_SHARE = 0.25


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature means to an inspector, its unit and the range of valid values."""

    name: str
    description: str
    unit: str
    min: float
    max: float
    source: str  # "invoices" or "client"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec(
        "first_invoice_year",
        "year of the first invoice in the history (decimal: 2010.5 = July 2010)",
        "year",
        1900,
        2200,
        "invoices",
    ),
    FeatureSpec(
        "history_years", "years from the first to the last invoice", "years", 0, 100, "invoices"
    ),
    FeatureSpec("n_meters", "number of distinct meters billed", "meters", 1, 10_000, "invoices"),
    FeatureSpec(
        "abnormal_status_share",
        "share of invoices whose meter status was not 'working' (status other than 0)",
        "fraction",
        0,
        1,
        "invoices",
    ),
    FeatureSpec(
        "mean_reading_remark",
        "mean of the agent's reading remark code (higher = more problems noted)",
        "code",
        0,
        100_000,
        "invoices",
    ),
    FeatureSpec(
        "mean_monthly_consumption",
        "mean consumption per month billed (all tiers)",
        "units/month",
        0,
        10_000_000,
        "invoices",
    ),
    FeatureSpec(
        "max_monthly_consumption",
        "highest consumption per month on any invoice",
        "units/month",
        0,
        10_000_000,
        "invoices",
    ),
    FeatureSpec(
        "consumption_trend",
        "monthly consumption in the latest quarter of invoices over the earlier ones "
        "((recent + 1) / (earlier + 1); 1 = unchanged)",
        "ratio",
        0,
        10_000_001,
        "invoices",
    ),
    FeatureSpec(
        "high_tier_share",
        "mean share of consumption billed in tiers 3 and 4 (invoices with consumption)",
        "fraction",
        0,
        1,
        "invoices",
    ),
    FeatureSpec(
        "mean_counter_code",
        "mean meter model code over the invoices (tells the meter generations used)",
        "code",
        0,
        1e15,
        "invoices",
    ),
    FeatureSpec(
        "mean_tariff_type",
        "mean tariff code over the invoices (tells the tariffs the customer was on)",
        "code",
        0,
        1e15,
        "invoices",
    ),
    FeatureSpec("district", "district code of the customer", "code", 0, 1_000_000, "client"),
    FeatureSpec("region", "region code of the customer", "code", 0, 1_000_000, "client"),
    FeatureSpec(
        "client_age_years",
        "years from the customer's creation date to the last invoice (0 if later)",
        "years",
        0,
        200,
        "client",
    ),
)
FEATURE_NAMES: tuple[str, ...] = tuple(spec.name for spec in FEATURES)
FEATURE_INDEX = {name: i for i, name in enumerate(FEATURE_NAMES)}


def _segment_sum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    return np.add.reduceat(values, starts) if len(values) else np.zeros(0)


def compute_features(
    invoices: pd.DataFrame, clients: PreparedClients | None = None
) -> pd.DataFrame:
    """Features per client, indexed by client_id, in the order of FEATURE_NAMES.

    `invoices` is `PreparedInvoices.frame`: every row valid. Clients come out sorted by id.
    """
    import pandas as pd

    codes, uniques = pd.factorize(invoices["client_id"], sort=True)
    day = invoices["invoice_day"].to_numpy(dtype=np.float64)
    # One sort by (client, date) makes every client a contiguous, date-ordered segment.
    order = np.lexsort((day, codes))
    codes = codes[order]
    day = day[order]
    n_clients = len(uniques)
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else codes
    counts = np.diff(np.r_[starts, len(codes)]).astype(np.float64)

    def column(name: str) -> np.ndarray:
        return invoices[name].to_numpy(dtype=np.float64)[order]

    consumption = sum(column(name) for name in CONSUMPTION_COLUMNS)
    assert isinstance(consumption, np.ndarray)  # type narrowing  # nosec B101
    months = np.clip(column("months_number"), MIN_MONTHS, MAX_MONTHS)
    monthly = consumption / months
    high_tier = column("consommation_level_3") + column("consommation_level_4")
    billed = consumption > 0
    high_share = np.divide(high_tier, consumption, out=np.zeros_like(consumption), where=billed)
    billed_count = _segment_sum(billed.astype(np.float64), starts)

    # Position of each invoice within its client: the last RECENT_SHARE (at least one) is recent.
    position = np.arange(len(codes)) - np.repeat(starts, counts.astype(np.int64))
    n_recent = np.maximum(1, np.floor(counts * RECENT_SHARE))
    recent = position >= np.repeat(counts - n_recent, counts.astype(np.int64))
    recent_sum = _segment_sum(np.where(recent, monthly, 0.0), starts)
    earlier_sum = _segment_sum(np.where(recent, 0.0, monthly), starts)
    n_earlier = counts - n_recent
    recent_mean = recent_sum / n_recent
    earlier_mean = np.divide(earlier_sum, n_earlier, out=np.zeros(n_clients), where=n_earlier > 0)
    trend = np.where(n_earlier > 0, (recent_mean + 1.0) / (earlier_mean + 1.0), 1.0)

    meters = pd.DataFrame({"c": codes, "m": column("counter_number")}).drop_duplicates()
    n_meters = np.bincount(meters["c"].to_numpy(), minlength=n_clients).astype(np.float64)
    abnormal = (invoices["counter_statue"] != "0").to_numpy(dtype=np.float64)[order]
    first_day = day[starts] if len(starts) else np.zeros(0)
    last_day = day[np.r_[starts[1:], len(day)] - 1] if len(starts) else np.zeros(0)

    district = np.full(n_clients, np.nan)
    region = np.full(n_clients, np.nan)
    age_years = np.full(n_clients, np.nan)
    if clients is not None and len(clients.frame):
        attrs = clients.frame.reindex(pd.Index(uniques))
        district = attrs["district"].to_numpy(dtype=np.float64)
        region = attrs["region"].to_numpy(dtype=np.float64)
        creation = attrs["creation_day"].to_numpy(dtype=np.float64)
        age_years = np.maximum(0.0, (last_day - creation) / DAYS_PER_YEAR)

    values = {
        "first_invoice_year": 1970.0 + first_day / DAYS_PER_YEAR,
        "history_years": (last_day - first_day) / DAYS_PER_YEAR,
        "n_meters": n_meters,
        "abnormal_status_share": _segment_sum(abnormal, starts) / counts,
        "mean_reading_remark": _segment_sum(column("reading_remarque"), starts) / counts,
        "mean_monthly_consumption": _segment_sum(monthly, starts) / counts,
        "max_monthly_consumption": (
            np.maximum.reduceat(monthly, starts) if len(monthly) else np.zeros(0)
        ),
        "consumption_trend": trend,
        "high_tier_share": np.divide(
            _segment_sum(high_share, starts),
            billed_count,
            out=np.zeros(n_clients),
            where=billed_count > 0,
        ),
        "mean_counter_code": _segment_sum(column("counter_code"), starts) / counts,
        "mean_tariff_type": _segment_sum(column("tarif_type"), starts) / counts,
        "district": district,
        "region": region,
        "client_age_years": age_years,
    }
    return pd.DataFrame(values, index=pd.Index(uniques, name="client_id"))[list(FEATURE_NAMES)]
