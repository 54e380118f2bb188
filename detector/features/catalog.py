"""The feature catalog: every candidate per-client aggregate, and the served set chosen from it.

Each candidate is a `FeatureSpec`: what it means to an inspector, its unit and the range of
values it can take (the same range `GET /api/features` publishes for direct feature input, and
which features computed from raw history cannot leave: `compute.py` clips where a ratio could).
Families of aggregates are computed over all of a client's meters and, where it helps, per
energy type (`counter_type` ELEC or GAZ): `elec_cons_std` is `cons_std` over electricity
invoices only. Nothing here reads the date of the *last* invoice: a history ends early when an
inspection found fraud and the client was disconnected, so the length of a history is a trace of
the label, not a sign of theft (docs/MODEL_CARD.md, "Leakage").

`SERVED` is the set the bundled models use (40 features), chosen on the training split only by
`ptd select-features` (cross-validated permutation importance on full and truncated histories,
near-duplicates dropped; docs/FEATURE_SELECTION.md has the ranking and the measurements).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from detector.schema import MAX_CODE, MAX_CONSUMPTION, MAX_YEAR, MIN_YEAR

SCOPES = {"": "all meters", "elec_": "electricity meters", "gaz_": "gas meters"}
# The most frequent codes in the STEG data: each gets a share-of-invoices candidate.
STATUS_CODES = ("1", "4", "5")
REMARK_CODES = (6, 8, 9)
COUNTER_CODES = (5, 10, 202, 203, 207, 410, 413, 420, 433, 442)
TARIFF_CODES = (9, 10, 11, 12, 13, 14, 15, 29, 40, 45)
# Monthly consumption is at most one invoice's total over one month.
MAX_MONTHLY = 4.0 * MAX_CONSUMPTION
# Families that read an optional invoice column (old_index, new_index, counter_coefficient).
OPTIONAL_COLUMN_FAMILIES = ("index_mismatch_share", "index_negative_share", "coefficient_share")
MAX_SLOPE = 1_000.0  # relative change per year; clipped (a few days of history can give more)
MAX_INVOICES = 10_000_000
MAX_DAYS = (MAX_YEAR - MIN_YEAR + 1) * 366.0
# Units of features that count things: their values are whole numbers (`FeatureSpec.whole`).
COUNT_UNITS = ("invoices", "meters", "codes", "tariffs", "changes")


@dataclass(frozen=True)
class FeatureSpec:
    """One per-client feature.

    `source` is "invoices" (computed from the billing history) or "client" (an attribute of
    the client). `required` says that every client with one valid invoice has a value; the
    others may be missing (null in direct feature input): a client attribute that was not
    given, a gas feature of a client without gas, a gap for a client whose meters each have one
    invoice. The models treat missing as unknown. `kind` is "numeric" or "categorical" (a code
    whose order means nothing: the gradient-boosted model splits on sets of codes). `family`
    and `scope` say how `compute.py` computes it (scope "" = all meters, "elec_" or "gaz_" =
    one energy type).
    """

    name: str
    description: str
    unit: str
    min: float
    max: float
    source: str = "invoices"
    kind: str = "numeric"
    family: str = ""
    scope: str = ""
    required: bool = True

    @property
    def whole(self) -> bool:
        """Only whole numbers are valid: a categorical code (101, not 101.5) or a count."""
        return self.kind == "categorical" or self.unit in COUNT_UNITS

    def to_dict(self) -> dict[str, object]:
        return {key: value for key, value in asdict(self).items() if key not in ("family", "scope")}


def _scoped_families() -> list[tuple[str, str, str, float, float]]:
    """(family, description, unit, min, max) of the families computed per scope."""
    monthly = "consumption billed per month (all tiers)"
    families = [
        ("n_invoices", "number of invoices", "invoices", 1, MAX_INVOICES),
        (
            "first_year",
            "year of the first invoice (2010.5 = July 2010)",
            "year",
            MIN_YEAR,
            MAX_YEAR + 1,
        ),
        ("cons_mean", f"mean {monthly}", "units/month", 0, MAX_MONTHLY),
        ("cons_median", f"median {monthly}", "units/month", 0, MAX_MONTHLY),
        ("cons_min", f"lowest {monthly} on any invoice", "units/month", 0, MAX_MONTHLY),
        ("cons_max", f"highest {monthly} on any invoice", "units/month", 0, MAX_MONTHLY),
        ("cons_std", f"standard deviation of the {monthly}", "units/month", 0, MAX_MONTHLY),
        (
            "cons_cv",
            f"coefficient of variation of the {monthly} (standard deviation / mean; 0 when "
            "nothing was billed)",
            "ratio",
            0,
            float(MAX_INVOICES) ** 0.5,
        ),
        (
            "cons_slope",
            f"trend of the {monthly}: least-squares change per year over (mean + 1), clipped "
            f"to +-{MAX_SLOPE:.0f}",
            "1/year",
            -MAX_SLOPE,
            MAX_SLOPE,
        ),
    ]
    for tier in (1, 2, 3, 4):
        families.append(
            (
                f"tier{tier}_mean",
                f"mean consumption billed per month in tier {tier}",
                "units/month",
                0,
                MAX_MONTHLY,
            )
        )
        families.append(
            (
                f"tier{tier}_share",
                f"share of the consumption billed in tier {tier}",
                "fraction",
                0,
                1,
            )
        )
    families += [
        ("zero_share", "share of invoices with no consumption billed", "fraction", 0, 1),
        (
            "index_mismatch_share",
            "share of invoices whose index difference (new - old) differs from the billed "
            "consumption (missing without old_index/new_index)",
            "fraction",
            0,
            1,
        ),
        (
            "index_negative_share",
            "share of invoices whose new index is below the old one",
            "fraction",
            0,
            1,
        ),
        ("months_mean", "mean number of months an invoice covers", "months", 0, MAX_CODE),
        ("months_max", "longest period one invoice covers", "months", 0, MAX_CODE),
        (
            "status_abnormal_share",
            "share of invoices whose meter status was not 'working' (status other than 0)",
            "fraction",
            0,
            1,
        ),
        ("remark_mean", "mean of the agent's reading remark code", "code", -MAX_CODE, MAX_CODE),
        *(
            (
                f"remark_{code}_share",
                f"share of readings with agent's remark {code}",
                "fraction",
                0,
                1,
            )
            for code in REMARK_CODES
        ),
        ("n_meters", "number of distinct meters billed", "meters", 1, MAX_INVOICES),
        ("n_codes", "number of distinct meter model codes", "codes", 1, MAX_INVOICES),
        ("n_tariffs", "number of distinct tariffs", "tariffs", 1, MAX_INVOICES),
        (
            "coefficient_share",
            "share of invoices with a meter coefficient above 1 (missing without "
            "counter_coefficient)",
            "fraction",
            0,
            1,
        ),
    ]
    return families


def _scoped() -> list[FeatureSpec]:
    """Families computed over all meters and per energy type."""
    return [
        FeatureSpec(
            f"{scope}{family}",
            f"{description} ({meters})",
            unit,
            low,
            high,
            family=family,
            scope=scope,
            required=scope == "" and family not in OPTIONAL_COLUMN_FAMILIES,
        )
        for scope, meters in SCOPES.items()
        for family, description, unit, low, high in _scoped_families()
    ]


def _whole_client() -> list[FeatureSpec]:
    """Families over all of a client's invoices, and the client's own attributes."""
    specs: list[FeatureSpec] = []
    for status in STATUS_CODES:
        specs.append(
            FeatureSpec(
                f"status_{status}_share",
                f"share of invoices with meter status {status}",
                "fraction",
                0,
                1,
                family="status_share",
            )
        )
    for code in COUNTER_CODES:
        specs.append(
            FeatureSpec(
                f"code_{code}_share",
                f"share of invoices from meters of model code {code}",
                "fraction",
                0,
                1,
                family="code_share",
            )
        )
    for tariff in TARIFF_CODES:
        specs.append(
            FeatureSpec(
                f"tariff_{tariff}_share",
                f"share of invoices on tariff {tariff}",
                "fraction",
                0,
                1,
                family="tariff_share",
            )
        )
    specs += [
        FeatureSpec(
            "code_mode",
            "the meter model code billed most often",
            "code",
            0,
            MAX_CODE,
            kind="categorical",
            family="code_mode",
        ),
        FeatureSpec(
            "tariff_mode",
            "the tariff billed most often",
            "code",
            0,
            MAX_CODE,
            kind="categorical",
            family="tariff_mode",
        ),
        FeatureSpec(
            "gap_mean_days",
            "mean days between consecutive invoices of the same meter (missing when no meter "
            "has two)",
            "days",
            0,
            MAX_DAYS,
            family="gap_mean_days",
            required=False,
        ),
        FeatureSpec(
            "gap_max_days",
            "longest gap between consecutive invoices of the same meter",
            "days",
            0,
            MAX_DAYS,
            family="gap_max_days",
            required=False,
        ),
        FeatureSpec(
            "new_meter_after_years",
            "years from the first invoice to the first invoice of the meter that appeared "
            "last (0 when every meter was there from the start)",
            "years",
            0,
            MAX_YEAR - MIN_YEAR + 1,
            family="new_meter_after_years",
        ),
        FeatureSpec(
            "meters_added_later",
            "meters whose first invoice came more than a year after the client's first invoice",
            "meters",
            0,
            MAX_INVOICES,
            family="meters_added_later",
        ),
        FeatureSpec(
            "meter_changes",
            "times the billed meter of one energy type changed from one invoice to the next",
            "changes",
            0,
            MAX_INVOICES,
            family="meter_changes",
        ),
        FeatureSpec(
            "latest_meter_cons_ratio",
            "monthly consumption on the meter that appeared last over that on the earlier "
            "meters ((latest + 1) / (earlier + 1); missing with a single meter)",
            "ratio",
            0,
            MAX_MONTHLY + 1,
            family="latest_meter_cons_ratio",
            required=False,
        ),
        FeatureSpec(
            "irregular_period_share",
            "share of invoices that do not cover the usual 4 months",
            "fraction",
            0,
            1,
            family="irregular_period_share",
        ),
        FeatureSpec(
            "consumption_trend",
            "monthly consumption in the latest quarter of invoices over the earlier ones "
            "((recent + 1) / (earlier + 1); 1 = unchanged)",
            "ratio",
            0,
            MAX_MONTHLY + 1,
            family="consumption_trend",
        ),
        FeatureSpec(
            "district",
            "district code of the client",
            "code",
            0,
            1_000_000,
            source="client",
            required=False,
            kind="categorical",
            family="district",
        ),
        FeatureSpec(
            "region",
            "region code of the client",
            "code",
            0,
            1_000_000,
            source="client",
            required=False,
            kind="categorical",
            family="region",
        ),
        FeatureSpec(
            "client_catg",
            "client category code",
            "code",
            0,
            1_000_000,
            source="client",
            required=False,
            kind="categorical",
            family="client_catg",
        ),
        FeatureSpec(
            "creation_year",
            "year the client joined (creation_date; 2010.5 = July 2010)",
            "year",
            MIN_YEAR,
            MAX_YEAR + 1,
            source="client",
            required=False,
            family="creation_year",
        ),
        FeatureSpec(
            "creation_to_first_invoice_years",
            "years from the client's creation date to its first invoice (negative when "
            "billed before it was created)",
            "years",
            -(MAX_YEAR - MIN_YEAR + 1),
            MAX_YEAR - MIN_YEAR + 1,
            source="client",
            required=False,
            family="creation_to_first_invoice_years",
        ),
    ]
    return specs


CANDIDATES: tuple[FeatureSpec, ...] = tuple(_scoped() + _whole_client())
CANDIDATE_INDEX: dict[str, FeatureSpec] = {spec.name: spec for spec in CANDIDATES}

# Chosen by `ptd select-features` on the training split (docs/FEATURE_SELECTION.md): the 40
# best by cross-validated permutation importance, averaged over full histories and histories
# cut 12 and 24 months before their last invoice, after dropping near-duplicates; 40 is where
# the cut views stopped improving (30: 0.8457 / 0.8174 ROC-AUC, 40: 0.8477 / 0.8192, 50: 0.8477
# / 0.8198).
SERVED: tuple[str, ...] = (
    "new_meter_after_years",
    "region",
    "elec_n_codes",
    "elec_n_meters",
    "code_207_share",
    "latest_meter_cons_ratio",
    "elec_cons_cv",
    "code_mode",
    "first_year",
    "elec_cons_std",
    "creation_to_first_invoice_years",
    "creation_year",
    "elec_cons_min",
    "elec_remark_8_share",
    "code_413_share",
    "gap_max_days",
    "client_catg",
    "elec_status_abnormal_share",
    "code_420_share",
    "code_203_share",
    "elec_cons_slope",
    "elec_tier1_share",
    "elec_n_invoices",
    "elec_cons_median",
    "irregular_period_share",
    "tariff_10_share",
    "status_5_share",
    "elec_remark_6_share",
    "remark_6_share",
    "cons_max",
    "gaz_cons_median",
    "gaz_first_year",
    "cons_mean",
    "gaz_cons_cv",
    "meter_changes",
    "gaz_remark_8_share",
    "remark_8_share",
    "tariff_9_share",
    "district",
    "n_invoices",
)
FEATURES: tuple[FeatureSpec, ...] = tuple(CANDIDATE_INDEX[name] for name in SERVED)
FEATURE_NAMES: tuple[str, ...] = SERVED
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}


def specs_of(names: tuple[str, ...] | list[str]) -> tuple[FeatureSpec, ...]:
    """The specs of the named candidates, in the given order; KeyError names an unknown one."""
    unknown = [name for name in names if name not in CANDIDATE_INDEX]
    if unknown:
        raise KeyError(f"unknown feature(s): {', '.join(unknown)}")
    return tuple(CANDIDATE_INDEX[name] for name in names)
