"""The input contract: STEG invoice and client columns, and their row-level validation.

`prepare_invoices` and `prepare_clients` turn a raw frame (from CSV, Parquet or JSON) into typed
columns and a list of rejected rows with the reason, so that nothing valid is lost because of a
bad row and nothing bad is dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

# pandas is imported inside the functions that use it: the HTTP app scores feature bodies
# without it, and importing it costs about half a second of every cold start.
if TYPE_CHECKING:
    import pandas as pd

CONSUMPTION_COLUMNS = (
    "consommation_level_1",
    "consommation_level_2",
    "consommation_level_3",
    "consommation_level_4",
)
# Columns the served features read; each must be present in an invoice file.
REQUIRED_INVOICE_COLUMNS = (
    "client_id",
    "invoice_date",
    "tarif_type",
    "counter_number",
    "counter_statue",
    "counter_code",
    "reading_remarque",
    *CONSUMPTION_COLUMNS,
    "months_number",
    "counter_type",
)
# The rest of the STEG schema: accepted and type-checked when present; only candidate features
# that the bundled models do not use read them (missing when the column is absent).
OPTIONAL_INVOICE_COLUMNS = (
    "counter_coefficient",
    "old_index",
    "new_index",
)
INVOICE_COLUMNS = REQUIRED_INVOICE_COLUMNS + OPTIONAL_INVOICE_COLUMNS
CLIENT_COLUMNS = ("client_id", "disrict", "client_catg", "region", "creation_date")
# The typed attributes `prepare_clients` returns, in its frame's column order.
CLIENT_ATTRIBUTES = ("district", "region", "client_catg", "creation_day")

# Larger than any real bill (the shared data peaks below 1e6 kWh per tier); above it is an
# export error, not a customer.
MAX_CONSUMPTION = 10_000_000
MAX_CODE = 10**15
# A client id is a key, not text: the API refuses longer ones (records.Id), files reject them.
MAX_ID_CHARS = 128
LONG_ID = f"invalid client_id: longer than {MAX_ID_CHARS} characters"
# U+FFFD is what a decoder writes for bytes it cannot read (upstream, or for the five bytes
# Windows-1252 leaves unassigned): two different ids can have become one, so an id holding it
# is never trusted as a key.
UNDECODABLE_ID = (
    "invalid client_id: holds U+FFFD, the mark of bytes that could not be read as text "
    "(re-export the file as UTF-8)"
)
COUNTER_TYPES = ("ELEC", "GAZ")
# Plausible dates. Exports write placeholders such as 0001-01-01, 1000-01-01, 1900-01-01 or
# 9999-12-31 for "unknown"; no electricity or gas bill of a living customer is dated before
# 1950 or after 2099, so a date outside this window is a reject, not a history.
MIN_YEAR, MAX_YEAR = 1950, 2099
_EPOCH = np.datetime64("1970-01-01", "D")
MIN_DAY = float((np.datetime64(f"{MIN_YEAR}-01-01", "D") - _EPOCH).astype(np.int64))
MAX_DAY = float((np.datetime64(f"{MAX_YEAR}-12-31", "D") - _EPOCH).astype(np.int64))
DATE_WINDOW = f"{MIN_YEAR}-01-01 to {MAX_YEAR}-12-31"

INVOICE_SCHEMA: dict[str, dict[str, str]] = {
    "client_id": {"type": "string", "meaning": "customer id (join key)"},
    "invoice_date": {
        "type": "date",
        "meaning": f"invoice date, yyyy-mm-dd, from {DATE_WINDOW}",
    },
    "tarif_type": {"type": "integer", "meaning": "tariff code"},
    "counter_number": {"type": "integer", "meaning": "meter number"},
    "counter_statue": {"type": "string", "meaning": "meter status code; 0 = working"},
    "counter_code": {"type": "integer", "meaning": "meter model code"},
    "reading_remarque": {"type": "integer", "meaning": "agent's note on the reading"},
    "consommation_level_1": {"type": "number", "meaning": "consumption billed in tier 1"},
    "consommation_level_2": {"type": "number", "meaning": "consumption billed in tier 2"},
    "consommation_level_3": {"type": "number", "meaning": "consumption billed in tier 3"},
    "consommation_level_4": {"type": "number", "meaning": "consumption billed in tier 4"},
    "months_number": {"type": "integer", "meaning": "months covered by the invoice"},
    "counter_type": {"type": "string", "meaning": "ELEC or GAZ (energy the meter measures)"},
    "counter_coefficient": {"type": "integer", "meaning": "optional: meter coefficient"},
    "old_index": {"type": "number", "meaning": "optional: index at the previous reading"},
    "new_index": {"type": "number", "meaning": "optional: index at this reading"},
}
CLIENT_SCHEMA: dict[str, dict[str, str]] = {
    "client_id": {"type": "string", "meaning": "customer id (join key)"},
    "region": {"type": "integer", "meaning": "region code; unknown to the model if missing"},
    "creation_date": {
        "type": "date",
        "meaning": f"date the customer joined, dd/mm/yyyy or yyyy-mm-dd, from {DATE_WINDOW}; "
        "missing (unknown to the model) when absent or invalid",
    },
    "disrict": {
        "type": "integer",
        "meaning": "district code (source's spelling); unknown to the model if missing",
    },
    "client_catg": {"type": "integer", "meaning": "client category code; unknown if missing"},
}


class InputError(ValueError):
    """The input as a whole cannot be used (missing columns, unreadable file)."""


@dataclass(frozen=True)
class Rejects:
    """Rows that were not used, with the reason for each (row = 0-based position in the input)."""

    rows: np.ndarray  # int64 positions
    client_ids: np.ndarray  # object; "" where the id itself was missing
    reasons: np.ndarray  # object

    @staticmethod
    def empty() -> Rejects:
        return Rejects(np.empty(0, np.int64), np.empty(0, object), np.empty(0, object))

    def __len__(self) -> int:
        return len(self.rows)

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd

        return pd.DataFrame(
            {"row": self.rows, "client_id": self.client_ids, "reason": self.reasons}
        )

    def counts(self) -> dict[str, int]:
        """Rejected rows by reason (the reason's text up to the first colon)."""
        import pandas as pd

        keys = pd.Series(self.reasons, dtype=object).str.split(":", n=1).str[0]
        return {str(k): int(v) for k, v in keys.value_counts().sort_index().items()}


@dataclass(frozen=True)
class PreparedInvoices:
    """Valid invoice rows, typed: the frame `features.compute_features` expects."""

    frame: pd.DataFrame
    rejects: Rejects


def _missing_columns(frame: pd.DataFrame, required: tuple[str, ...], what: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise InputError(f"{what} is missing required column(s): {', '.join(missing)}")


def _through_uniques(series: pd.Series, transform: Callable[[pd.Series], pd.Series]) -> pd.Series:
    """Apply a string transform to the distinct values only; exports repeat values heavily."""
    import pandas as pd

    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    mapped = transform(pd.Series(uniques, dtype=object).astype("string"))
    out = (
        mapped.take(np.where(codes < 0, 0, codes))
        if len(mapped)
        else pd.Series([pd.NA] * len(series), dtype="string")
    )
    out = out.reset_index(drop=True).astype("string")
    return out.mask(codes < 0)


def _client_ids(series: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Ids as stripped strings, and a mask of rows whose id is missing or blank."""
    ids = _through_uniques(series, lambda u: u.str.strip())
    bad = (ids.isna() | (ids == "")).to_numpy(dtype=bool)
    return ids.fillna(""), bad


def long_ids(ids: pd.Series) -> np.ndarray:
    """Rows whose (stripped) id is longer than MAX_ID_CHARS: rejected with LONG_ID."""
    return (ids.str.len() > MAX_ID_CHARS).fillna(False).to_numpy(dtype=bool)


def undecodable_ids(ids: pd.Series) -> np.ndarray:
    """Rows whose id holds U+FFFD (the replacement character): rejected with UNDECODABLE_ID."""
    return ids.str.contains("\ufffd", regex=False).fillna(False).to_numpy(dtype=bool)


def _numbers(series: pd.Series) -> np.ndarray:
    """Float64 values; anything non-numeric becomes NaN (then rejected by the caller)."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(series):
        return np.full(len(series), np.nan)
    if pd.api.types.is_numeric_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.to_numeric(series.astype("string").str.strip(), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )


def parse_dates(series: pd.Series, day_first: bool = False) -> np.ndarray:
    """Days since 1970-01-01 as float64; NaN where the text is not a date.

    Only `yyyy-mm-dd` (and `dd/mm/yyyy` when `day_first`) are dates: pandas alone would also
    read words such as "today". Days are counted on the calendar, never through nanoseconds,
    so 9999-12-31 stays in year 9999 (where `in_window` refuses it) instead of wrapping around.
    """
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(series):
        if isinstance(series.dtype, pd.DatetimeTZDtype):  # the day where the bill was dated
            series = series.dt.tz_localize(None)
        values = series.to_numpy()
        days = values.astype("datetime64[D]").astype(np.int64).astype(np.float64)
        days[pd.isna(series).to_numpy()] = np.nan
        return days
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    text = pd.Series(uniques, dtype=object).astype("string").str.strip()
    iso = text.str.fullmatch(r"\d{4}-\d{2}-\d{2}").fillna(False).astype(bool)
    parsed = pd.to_datetime(text.where(iso), format="%Y-%m-%d", errors="coerce")
    if day_first:
        dmy = text.str.fullmatch(r"\d{2}/\d{2}/\d{4}").fillna(False).astype(bool)
        parsed = parsed.fillna(pd.to_datetime(text.where(dmy), format="%d/%m/%Y", errors="coerce"))
    missing = pd.isna(parsed).to_numpy()
    unique_days = (
        parsed.to_numpy().astype("datetime64[D]").astype(np.int64).astype(np.float64)
        if len(parsed)
        else np.zeros(0)
    )
    unique_days[missing] = np.nan
    days = (
        unique_days[np.where(codes < 0, 0, codes)] if len(uniques) else np.full(len(codes), np.nan)
    )
    days[codes < 0] = np.nan
    return days


def in_window(days: np.ndarray) -> np.ndarray:
    """Which days lie in the plausible window (MIN_YEAR-01-01 .. MAX_YEAR-12-31); NaN is not."""
    with np.errstate(invalid="ignore"):
        return (days >= MIN_DAY) & (days <= MAX_DAY)


def _status_text(uniques: pd.Series) -> pd.Series:
    import pandas as pd

    text = uniques.str.strip()
    is_zero = (pd.to_numeric(text, errors="coerce") == 0).fillna(False).astype(bool)
    return text.mask(is_zero, "0")


def normalise_status(series: pd.Series) -> pd.Series:
    """Meter status as text; numeric spellings of zero ("0", "0.0", 0) all become "0"."""
    return _through_uniques(series, _status_text).fillna("")


DUPLICATE_INVOICE = "duplicate invoice: the same values as an earlier row of this client"


def _exact_duplicates(frame: pd.DataFrame) -> np.ndarray:
    """Rows whose every value (as prepared) equals an earlier row's: the same invoice exported
    twice, which would otherwise count twice in every feature. Rows get a key from their
    numbers first (one pass), and only rows sharing a key are compared in full."""
    import pandas as pd

    if len(frame) < 2:
        return np.zeros(len(frame), dtype=bool)
    # A cheap key from the numeric columns (FNV-style multiply-xor of their bit patterns);
    # hashing the text columns too would cost ten times as much, and equal numbers are rare
    # enough that the full comparison below sees few rows.
    key = np.full(len(frame), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in frame.columns:
            column = frame[name]
            if column.dtype == np.float64:
                # Finite by now (non-finite rows are rejected first), so bits are values.
                bits = np.ascontiguousarray(column.to_numpy()).view(np.uint64)
                key = (key ^ bits) * np.uint64(0x100000001B3)
    ordered = np.sort(key)  # sorting (SIMD) finds repeated keys 20x faster than hashing
    shared = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(shared):
        return np.zeros(len(frame), dtype=bool)
    candidates = pd.Series(key).isin(np.unique(shared)).to_numpy()  # a small hash table
    repeated = np.zeros(len(frame), dtype=bool)
    if candidates.any():
        repeated[candidates] = frame[candidates].duplicated(keep="first").to_numpy()
    return repeated


def prepare_invoices(raw: pd.DataFrame, row_offset: int = 0) -> PreparedInvoices:
    """Validate and type invoice rows; returns the usable rows and the rejected ones.

    `row_offset` is added to reported row numbers when the input arrives in chunks.
    """
    import pandas as pd

    _missing_columns(raw, REQUIRED_INVOICE_COLUMNS, "invoice data")
    n = len(raw)
    reasons = np.full(n, "", dtype=object)

    def reject(mask: np.ndarray, reason: str) -> None:
        reasons[mask & (reasons == "")] = reason

    client_id, bad_id = _client_ids(raw["client_id"])
    reject(bad_id, "missing client_id")
    reject(long_ids(client_id), LONG_ID)
    reject(undecodable_ids(client_id), UNDECODABLE_ID)
    invoice_day = parse_dates(raw["invoice_date"])
    reject(np.isnan(invoice_day), "invalid invoice_date: expected yyyy-mm-dd")
    reject(~in_window(invoice_day), f"invalid invoice_date: outside {DATE_WINDOW}")

    columns: dict[str, np.ndarray] = {"invoice_day": invoice_day}
    integer_like = ("tarif_type", "counter_number", "counter_code", "reading_remarque")
    for name in (*integer_like, "months_number", *CONSUMPTION_COLUMNS):
        values = _numbers(raw[name])
        reject(~np.isfinite(values), f"invalid {name}: not a finite number")
        columns[name] = values
    for name in CONSUMPTION_COLUMNS:
        values = columns[name]
        reject(values < 0, f"invalid {name}: negative consumption")
        reject(values > MAX_CONSUMPTION, f"invalid {name}: above {MAX_CONSUMPTION:,}")
    reject(columns["months_number"] < 0, "invalid months_number: negative")
    for name in integer_like:
        reject(np.abs(columns[name]) > MAX_CODE, f"invalid {name}: absurd magnitude")
    status = normalise_status(raw["counter_statue"])
    reject((status == "").to_numpy(dtype=bool), "invalid counter_statue: missing")

    kind = _through_uniques(raw["counter_type"], lambda u: u.str.strip().str.upper())
    known = kind.isin(COUNTER_TYPES).fillna(False).to_numpy(dtype=bool)
    reject(~known, "invalid counter_type: not ELEC/GAZ")
    for name in OPTIONAL_INVOICE_COLUMNS:
        if name in raw.columns:
            values = _numbers(raw[name])
            reject(~np.isfinite(values), f"invalid {name}: not a finite number")
            reject(np.abs(values) > MAX_CODE, f"invalid {name}: absurd magnitude")
            columns[name] = values

    bad = reasons != ""
    good = ~bad
    frame = pd.DataFrame({name: values[good] for name, values in columns.items()})
    frame.insert(0, "client_id", client_id[good].reset_index(drop=True))
    frame["counter_statue"] = status[good].reset_index(drop=True)
    frame["counter_type"] = kind[good].reset_index(drop=True)
    repeated = _exact_duplicates(frame)
    if repeated.any():
        positions = np.flatnonzero(good)[repeated]
        reasons[positions] = DUPLICATE_INVOICE
        bad[positions], good[positions] = True, False
        frame = frame[~repeated].reset_index(drop=True)
    rejects = Rejects(
        rows=np.flatnonzero(bad).astype(np.int64) + row_offset,
        client_ids=client_id[bad].to_numpy(dtype=object),
        reasons=reasons[bad],
    )
    return PreparedInvoices(frame=frame, rejects=rejects)


@dataclass(frozen=True)
class PreparedClients:
    """Client attributes by client_id: codes and creation day (NaN where missing)."""

    frame: pd.DataFrame  # index client_id; columns district, region, client_catg, creation_day
    rejects: Rejects


def prepare_clients(raw: pd.DataFrame | None) -> PreparedClients:
    """Validate client attributes. A bad value is reported and treated as missing."""
    import pandas as pd

    if raw is None or len(raw) == 0:
        empty = pd.DataFrame(
            {name: pd.Series(dtype=float) for name in CLIENT_ATTRIBUTES},
            index=pd.Index([], name="client_id", dtype="string"),
        )
        return PreparedClients(empty, Rejects.empty())
    _missing_columns(raw, ("client_id",), "client data")
    n = len(raw)
    client_id, bad_id = _client_ids(raw["client_id"])
    reasons = np.full(n, "", dtype=object)
    reasons[bad_id] = "missing client_id"
    reasons[long_ids(client_id) & (reasons == "")] = LONG_ID
    reasons[undecodable_ids(client_id) & (reasons == "")] = UNDECODABLE_ID
    codes = {}
    for column in ("disrict", "region", "client_catg"):
        values = _numbers(raw[column]).copy() if column in raw.columns else np.full(n, np.nan)
        if column in raw.columns:
            given = raw[column].notna().to_numpy()
            bad = given & ~np.isfinite(values)
            bad |= np.isfinite(values) & ((values < 0) | (values > 1_000_000))
            reasons[bad & (reasons == "")] = f"invalid {column}: not a code; treated as missing"
            values[bad] = np.nan
        codes[column] = values
    if "creation_date" in raw.columns:
        creation = parse_dates(raw["creation_date"], day_first=True)
        given = raw["creation_date"].notna().to_numpy()
        bad_date = given & np.isnan(creation)
        reasons[bad_date & (reasons == "")] = (
            "invalid creation_date: expected dd/mm/yyyy or yyyy-mm-dd; treated as missing"
        )
        implausible = given & ~np.isnan(creation) & ~in_window(creation)
        reasons[implausible & (reasons == "")] = (
            f"invalid creation_date: outside {DATE_WINDOW}; treated as missing"
        )
        creation = np.where(implausible, np.nan, creation)
    else:
        creation = np.full(n, np.nan)
    duplicated = client_id.duplicated(keep="first").to_numpy() & ~bad_id
    reasons[duplicated & (reasons == "")] = "duplicate client_id: first row used"
    keep = ~bad_id & ~duplicated
    frame = pd.DataFrame(
        {
            "district": codes["disrict"][keep],
            "region": codes["region"][keep],
            "client_catg": codes["client_catg"][keep],
            "creation_day": creation[keep],
        },
        index=pd.Index(client_id[keep], name="client_id"),
    )
    flagged = reasons != ""
    rejects = Rejects(
        np.flatnonzero(flagged).astype(np.int64),
        client_id[flagged].to_numpy(dtype=object),
        reasons[flagged],
    )
    return PreparedClients(frame, rejects)
