"""API records: what a predict body is, and how records are validated and scored.

The domain side of the HTTP API, with no HTTP in it (`detector.api` is the app):

* records are validated with pydantic in strict mode (unknown fields forbidden), in one call for
  the whole batch; values of raw invoice rows are checked by `schema.prepare_invoices`, the same
  rules batch files go through;
* features of every raw-history record are computed in one `compute_features` call and every
  record is scored in one `ArtifactSet.score` call; a bad record gets its own `RecordError`, with
  a code, a message and the field path, and the others are still scored.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, NotRequired

import numpy as np
from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
)
from typing_extensions import TypedDict  # pydantic needs it on Python < 3.12

from detector.config import Settings
from detector.features import FEATURE_NAMES, FEATURES, FeatureSpec
from detector.model import ArtifactSet
from detector.reasons import explain_dicts
from detector.schema import DATE_WINDOW, DUPLICATE_INVOICE, MAX_ID_CHARS, MAX_YEAR, MIN_YEAR
from detector.telemetry import METRICS

# --- request schema ----------------------------------------------------------------------------

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
INT64 = 2**63 - 1
_SPECS = {spec.name: spec for spec in FEATURES}


def _bounded(name: str) -> Any:
    spec: FeatureSpec = _SPECS[name]
    return Field(ge=spec.min, le=spec.max, description=f"{spec.description} [{spec.unit}]")


Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"\S")]
Code = Annotated[int, Field(ge=-INT64, le=INT64)]

# Invoice dates, checked while the record is validated so that a placeholder date (9999-12-31,
# 0001-01-01, "today") is reported in field order, before the errors of the fields after it,
# and at the cost of a regular expression (pydantic-core's Rust engine) per row. The rule is
# `schema.prepare_invoices`'s (yyyy-mm-dd within MIN_YEAR..MAX_YEAR), which still runs on every
# row the pattern lets through; the pattern only refuses what that rule refuses too
# (tests/test_api_dates.py checks it against the schema on generated strings): around the date
# it lets anything but ASCII digits through (the schema strips whitespace), and a year written
# with a non-ASCII digit (which pandas reads, e.g. Arabic-Indic digits) is left to the schema.
_OTHER_DIGIT = r"[\d--0-9]"  # a decimal digit that is not ASCII (Rust regex class difference)
_YEAR = "|".join(
    [
        *(str(year) for year in range(MIN_YEAR, MAX_YEAR + 1)),
        rf"{_OTHER_DIGIT}\d{{3}}",
        rf"[0-9]{_OTHER_DIGIT}\d{{2}}",
        rf"[0-9]{{2}}{_OTHER_DIGIT}\d",
        rf"[0-9]{{3}}{_OTHER_DIGIT}",
    ]
)
PLAUSIBLE_DATE = rf"^[^0-9]*(?:{_YEAR})-\d{{2}}-\d{{2}}[^0-9]*$"
INVOICE_DATE_FORMAT = "invalid invoice_date: expected yyyy-mm-dd"
INVOICE_DATE_WINDOW = f"invalid invoice_date: outside {DATE_WINDOW}"
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
# Fields of each object of a record; an object with many more keys than these is refused with
# its first unknown key before pydantic (which would build one error per unknown key): see
# `_shape_error`.
RECORD_FIELDS = ("customer_id", "features", "invoices", "client")
EXTRA_KEYS_REPORTED = 20  # as many unknown keys as `details` can list


def _whole(what: str) -> Callable[[float], float]:
    """A validator refusing a value with decimals, its message naming `what` it is."""

    def check(value: float) -> float:
        if value != int(value):
            raise ValueError(f"{what} must be a whole number")
        return value

    return check


def _feature_field(spec: FeatureSpec) -> Any:
    """A feature's type: a bounded number (a whole number for a categorical code or a count:
    101 or 101.0, not 101.5), nullable unless every client with an invoice has it
    (`FeatureSpec.required`)."""
    bounded: Any = Annotated[float, _bounded(spec.name)]
    if spec.whole:
        what = "a categorical code" if spec.kind == "categorical" else "a count"
        bounded = Annotated[float, _bounded(spec.name), AfterValidator(_whole(what))]
    if spec.required:
        return bounded
    return NotRequired[bounded | None]


def _feature_values() -> Any:
    """The served features as a strict TypedDict, built from the catalog: the request schema
    follows the served set."""
    fields = {spec.name: _feature_field(spec) for spec in FEATURES}
    typed: Any = TypedDict("FeatureValues", fields)  # type: ignore[misc]
    typed.__doc__ = (
        f"The {len(FEATURES)} served features (GET /api/features lists them); those that may be "
        "missing may be null or absent."
    )
    typed.__pydantic_config__ = STRICT  # type: ignore[attr-defined]
    return typed


if TYPE_CHECKING:
    FeatureValues = dict[str, float | int | None]
else:
    FeatureValues = _feature_values()
assert tuple(FeatureValues.__annotations__) == FEATURE_NAMES, "FeatureValues != FEATURE_NAMES"  # nosec B101


class Invoice(TypedDict):
    """One invoice row in the STEG schema. Values are checked by `schema.prepare_invoices`."""

    __pydantic_config__ = STRICT  # type: ignore[misc]

    client_id: NotRequired[Annotated[str, Field(max_length=MAX_ID_CHARS)]]
    invoice_date: Annotated[
        str,
        Field(max_length=32, pattern=PLAUSIBLE_DATE),
        # The documented rule, not the Rust pattern (whose syntax JSON Schema does not have).
        WithJsonSchema(
            {"type": "string", "maxLength": 32, "description": f"yyyy-mm-dd, {DATE_WINDOW}"}
        ),
    ]
    tarif_type: Code
    counter_number: Code
    counter_statue: Annotated[int | str, Field(description="meter status; 0 = working")]
    counter_code: Code
    reading_remarque: Code
    consommation_level_1: float
    consommation_level_2: float
    consommation_level_3: float
    consommation_level_4: float
    months_number: Code
    counter_type: Annotated[str, Field(max_length=16, description="ELEC or GAZ")]
    counter_coefficient: NotRequired[Code]
    old_index: NotRequired[float]
    new_index: NotRequired[float]


class Client(TypedDict, total=False):
    """Client attributes; a missing one is unknown to the model."""

    __pydantic_config__ = STRICT  # type: ignore[misc]

    client_id: Annotated[str, Field(max_length=MAX_ID_CHARS)]
    region: Code | None
    creation_date: Annotated[str | None, Field(max_length=32, description="dd/mm/yyyy")]
    disrict: Code | None
    client_catg: Code | None


class FeaturesRecord(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]

    customer_id: Id
    features: FeatureValues


class HistoryRecord(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]

    customer_id: Id
    # fail_fast: validation stops at the first bad row, so a record of 2,000 bad rows costs
    # one row's errors, not 24,000 error objects (pydantic >= 2.8, "fail_fast" on sequences).
    invoices: Annotated[list[Invoice], Field(min_length=1, fail_fast=True)]
    client: NotRequired[Client | None]


PredictRequest = FeaturesRecord | HistoryRecord


class BatchRequest(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]

    records: list[PredictRequest]


class ReasonOut(TypedDict):
    feature: str
    value: float
    typical: float
    contribution: float
    text: str


class Prediction(TypedDict):
    customer_id: str
    theft_probability: float
    flagged: bool
    risk_level: Literal["low", "elevated", "high", "critical"]
    threshold: float
    reasons: list[ReasonOut]
    model: str
    model_version: str


class ErrorDetail(TypedDict):
    code: str
    message: str
    location: str | None


class ErrorResponse(TypedDict):
    error: ErrorDetail


class BatchItem(TypedDict, total=False):
    index: int
    customer_id: str | None
    theft_probability: float
    flagged: bool
    risk_level: str
    threshold: float
    reasons: list[ReasonOut]
    model: str
    model_version: str
    error: ErrorDetail


class BatchResponse(TypedDict):
    results: list[BatchItem]
    model: str
    model_version: str
    scored: int
    failed: int


# The lists fail fast: the first bad record ends the group call, which is then redone record by
# record to place every error.
_FEATURES_LIST = TypeAdapter(Annotated[list[FeaturesRecord], Field(fail_fast=True)])
_FEATURES_ONE = TypeAdapter(FeaturesRecord)
_HISTORY_LIST = TypeAdapter(Annotated[list[HistoryRecord], Field(fail_fast=True)])
_HISTORY_ONE = TypeAdapter(HistoryRecord)
_INVOICE_FIELDS = frozenset(Invoice.__annotations__)
_CLIENT_FIELDS = frozenset(Client.__annotations__)
_FEATURE_FIELDS = frozenset(FEATURE_NAMES)
_RECORD_FIELDS = frozenset(RECORD_FIELDS)
# More keys than this in an object: refused before validation (`_shape_error`).
_RECORD_WIDTH = len(_RECORD_FIELDS) + EXTRA_KEYS_REPORTED
_FEATURES_WIDTH = len(_FEATURE_FIELDS) + EXTRA_KEYS_REPORTED
_CLIENT_WIDTH = len(_CLIENT_FIELDS) + EXTRA_KEYS_REPORTED
_INVOICE_WIDTH = len(_INVOICE_FIELDS) + EXTRA_KEYS_REPORTED
_UNION_TAGS = frozenset({"int", "str", "float", "none", "bool"})


def format_location(parts: Iterable[Any]) -> str:
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in _UNION_TAGS:
            continue  # pydantic names the member of `int | str` that failed; callers don't care
        else:
            text += f".{part}" if text else str(part)
    return text


def join_location(prefix: str, location: str) -> str:
    if not prefix:
        return location
    if not location:
        return prefix
    return prefix + location if location.startswith("[") else f"{prefix}.{location}"


@dataclass
class RecordError:
    code: str
    message: str
    location: str
    details: list[dict[str, Any]] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "location": self.location,
        }
        if len(self.details) > 1:
            out["details"] = self.details
        return out


def _date_message(value: Any) -> str:
    """The schema's reason for an invoice date the plausibility pattern refused."""
    if isinstance(value, str) and _ISO_DATE.fullmatch(value.strip()):
        return f"invoice rejected: {INVOICE_DATE_WINDOW}"
    return f"invoice rejected: {INVOICE_DATE_FORMAT}"


def _from_validation(exc: ValidationError, prefix: str) -> RecordError:
    details = []
    seen = set()
    # Few errors by construction: lists fail fast, objects with many unknown keys are refused
    # before validation (`_shape_error`).
    for err in exc.errors(include_url=False):
        location = join_location(prefix, format_location(err["loc"]))
        if location in seen:
            continue
        seen.add(location)
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = f"unknown field {str(err['loc'][-1])!r}"
        elif err["type"] == "missing":
            message = f"missing required field {str(err['loc'][-1])!r}"
        elif err["type"] == "string_pattern_mismatch" and err["loc"][-1] == "invoice_date":
            message = _date_message(err.get("input"))
        details.append({"location": location, "message": message, "type": err["type"]})
    first = details[0]
    code = "unknown_field" if first["type"] == "extra_forbidden" else "invalid_value"
    if first["type"] == "missing":
        code = "missing_field"
    return RecordError(code, first["message"], first["location"], details[:20])


# --- scoring pipeline --------------------------------------------------------------------------


@dataclass
class Outcome:
    """Per record: a prediction dict or a RecordError, in request order."""

    items: list[dict[str, Any] | RecordError]
    model: str
    model_version: str
    scored: int = 0
    flagged: int = 0


def _unknown_key(obj: dict[str, Any], known: frozenset[str], location: str) -> RecordError:
    first = next(key for key in obj if key not in known)
    return RecordError("unknown_field", f"unknown field {first!r}", join_location(location, first))


def _shape_error(obj: dict[str, Any], prefix: str) -> RecordError | None:
    """An object of the record with far more keys than it has fields, refused with its first
    unknown key before validation: strict validation builds one error per unknown key, and a
    body can hold millions. The check is a `len()` per object (`max(map(len, ...))` over the
    rows); only a refused object is scanned, to its first unknown key."""
    if len(obj) > _RECORD_WIDTH:
        return _unknown_key(obj, _RECORD_FIELDS, prefix)
    features = obj.get("features")
    if type(features) is dict and len(features) > _FEATURES_WIDTH:
        return _unknown_key(features, _FEATURE_FIELDS, join_location(prefix, "features"))
    client = obj.get("client")
    if type(client) is dict and len(client) > _CLIENT_WIDTH:
        return _unknown_key(client, _CLIENT_FIELDS, join_location(prefix, "client"))
    invoices = obj.get("invoices")
    if type(invoices) is list and invoices:
        try:
            widest = max(map(len, invoices))
        except TypeError:  # a row without a length (a number, null): pydantic says which
            return None
        if widest > _INVOICE_WIDTH:
            for j, row in enumerate(invoices):
                if type(row) is dict and len(row) > _INVOICE_WIDTH:
                    where = join_location(prefix, f"invoices[{j}]")
                    return _unknown_key(row, _INVOICE_FIELDS, where)
    return None


def _classify(obj: Any, prefix: str, max_invoices: int) -> str | RecordError:
    if not isinstance(obj, dict):
        return RecordError("invalid_type", "a record must be a JSON object", prefix or "body")
    has_features, has_invoices = "features" in obj, "invoices" in obj
    if has_features and has_invoices:
        return RecordError(
            "invalid_value",
            "give either features or invoices, not both",
            join_location(prefix, "features"),
        )
    if has_features:
        return _shape_error(obj, prefix) or "features"
    if has_invoices:
        invoices = obj["invoices"]
        if isinstance(invoices, list):
            if not invoices:
                return RecordError(
                    "empty_history",
                    "invoices must hold at least one row",
                    join_location(prefix, "invoices"),
                )
            if len(invoices) > max_invoices:
                return RecordError(
                    "too_many_invoices",
                    f"{len(invoices)} invoices for one customer; the limit is {max_invoices}",
                    join_location(prefix, "invoices"),
                )
        return _shape_error(obj, prefix) or "history"
    return RecordError(
        "missing_field",
        "a record needs 'features' or 'invoices'",
        join_location(prefix, "features"),
    )


def _validate(
    indexes: list[int],
    objs: list[Any],
    many: TypeAdapter[Any],
    one: TypeAdapter[Any],
    prefix_of: Callable[[int], str],
    errors: dict[int, RecordError],
) -> list[tuple[int, Any]]:
    """Validate a group in one call; only when it fails, record by record to place the errors."""
    if not indexes:
        return []
    group = [objs[i] for i in indexes]
    try:
        return list(zip(indexes, many.validate_python(group), strict=True))
    except ValidationError:
        pass
    valid = []
    for i in indexes:
        try:
            valid.append((i, one.validate_python(objs[i])))
        except ValidationError as exc:
            errors[i] = _from_validation(exc, prefix_of(i))
    return valid


def _history_features(
    records: list[tuple[int, Any]],
    prefix_of: Callable[[int], str],
    errors: dict[int, RecordError],
) -> dict[int, np.ndarray]:
    """Features of every raw-history record: one prepare/compute_features pass for them all."""
    import pandas as pd

    from detector.features import compute_features
    from detector.schema import (
        OPTIONAL_INVOICE_COLUMNS,
        REQUIRED_INVOICE_COLUMNS,
        prepare_clients,
        prepare_invoices,
    )

    rows: list[dict[str, Any]] = []
    row_origin: list[tuple[int, int]] = []
    clients: list[dict[str, Any]] = []
    for index, record in records:
        key = str(index)
        customer = record["customer_id"]
        for j, invoice in enumerate(record["invoices"]):
            given = invoice.get("client_id")
            if given is not None and given.strip() != customer.strip():
                errors.setdefault(
                    index,
                    RecordError(
                        "invalid_value",
                        "client_id of an invoice differs from the record's customer_id",
                        join_location(prefix_of(index), f"invoices[{j}].client_id"),
                    ),
                )
            row = dict(invoice)
            row["client_id"] = key
            rows.append(row)
            row_origin.append((index, j))
        client = record.get("client")
        if client:
            given = client.get("client_id")
            if given is not None and given.strip() != customer.strip():
                errors.setdefault(
                    index,
                    RecordError(
                        "invalid_value",
                        "client.client_id differs from the record's customer_id",
                        join_location(prefix_of(index), "client.client_id"),
                    ),
                )
            clients.append({**client, "client_id": key, "_index": index})
    # Optional columns are checked whenever present in a frame, so rows are prepared in groups
    # that carry the same optional columns (a record without counter_type is not rejected
    # because another record in the batch has it).
    groups: dict[tuple[str, ...], list[int]] = {}
    for k, row in enumerate(rows):
        groups.setdefault(tuple(c for c in OPTIONAL_INVOICE_COLUMNS if c in row), []).append(k)
    frames = []
    for optional, members in groups.items():
        columns = [*REQUIRED_INVOICE_COLUMNS, *optional]
        frame = pd.DataFrame.from_records([rows[k] for k in members], columns=columns)
        prepared = prepare_invoices(frame)
        frames.append(prepared.frame)
        for row, reason in zip(prepared.rejects.rows, prepared.rejects.reasons, strict=True):
            index, j = row_origin[members[int(row)]]
            if index in errors:
                continue
            text = str(reason)
            column = text.split(":", 1)[0].removeprefix("invalid ").removeprefix("missing ")
            where = f"invoices[{j}]" if text == DUPLICATE_INVOICE else f"invoices[{j}].{column}"
            errors[index] = RecordError(
                "invalid_value",
                f"invoice rejected: {text}",
                join_location(prefix_of(index), where),
            )
    client_frame = None
    if clients:
        client_frame = pd.DataFrame.from_records(clients)
    prepared_clients = prepare_clients(
        client_frame.drop(columns="_index") if client_frame is not None else None
    )
    if client_frame is not None:
        origin = client_frame["_index"].to_numpy()
        for row, reason in zip(
            prepared_clients.rejects.rows, prepared_clients.rejects.reasons, strict=True
        ):
            index = int(origin[int(row)])
            if index in errors:
                continue
            reason = str(reason).removesuffix("; treated as missing")
            column = reason.split(":", 1)[0].removeprefix("invalid ")
            errors[index] = RecordError(
                "invalid_value",
                f"client rejected: {reason}",
                join_location(prefix_of(index), f"client.{column}"),
            )
    bad_keys = [str(i) for i, _ in records if i in errors]
    invoices = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if bad_keys:
        invoices = invoices[~invoices["client_id"].isin(bad_keys)].reset_index(drop=True)
    if not len(invoices):
        return {}
    features: pd.DataFrame = compute_features(invoices, prepared_clients)
    matrix = features.to_numpy(dtype=np.float64)
    return {int(key): matrix[k] for k, key in enumerate(features.index)}


def score_records(
    objs: list[Any],
    artifacts: ArtifactSet,
    model: str,
    settings: Settings,
    prefix_of: Callable[[int], str],
) -> Outcome:
    """Validate, compute features and score every record; errors stay with their record."""
    errors: dict[int, RecordError] = {}
    feature_idx: list[int] = []
    history_idx: list[int] = []
    for i, obj in enumerate(objs):
        kind = _classify(obj, prefix_of(i), settings.max_invoices_per_customer)
        if isinstance(kind, RecordError):
            errors[i] = kind
        elif kind == "features":
            feature_idx.append(i)
        else:
            history_idx.append(i)
    features_valid = _validate(feature_idx, objs, _FEATURES_LIST, _FEATURES_ONE, prefix_of, errors)
    history_valid = _validate(history_idx, objs, _HISTORY_LIST, _HISTORY_ONE, prefix_of, errors)

    rows: list[int] = []
    blocks: list[np.ndarray] = []
    if features_valid:
        nan = math.nan
        values = [
            [r["features"].get(name, nan) for name in FEATURE_NAMES] for _, r in features_valid
        ]
        matrix = np.array(values, dtype=np.float64)  # null (None) becomes NaN: missing
        blocks.append(matrix)
        rows.extend(i for i, _ in features_valid)
    if history_valid:
        computed = _history_features(history_valid, prefix_of, errors)
        history_rows = [i for i, _ in history_valid if i not in errors and i in computed]
        if history_rows:
            blocks.append(np.vstack([computed[i] for i in history_rows]))
            rows.extend(history_rows)

    items: list[dict[str, Any] | RecordError] = [errors.get(i) or {} for i in range(len(objs))]
    outcome = Outcome(items, model, artifacts.version)
    if not rows:
        return outcome
    matrix = np.vstack(blocks) if len(blocks) > 1 else blocks[0]
    started = time.perf_counter()
    scores = artifacts.score(matrix, model)
    METRICS.observe("model_latency_ms", (time.perf_counter() - started) * 1000, {"model": model})
    threshold = artifacts.cards[model].threshold
    probability = scores.probability.tolist()
    flagged = scores.flagged.tolist()
    risk = scores.risk_level.tolist()
    contributions = scores.contributions
    assert contributions is not None  # type narrowing  # nosec B101
    reasons = explain_dicts(scores.features, contributions, artifacts.typical)
    for k, i in enumerate(rows):
        items[i] = {
            "customer_id": objs[i]["customer_id"],
            "theft_probability": probability[k],
            "flagged": flagged[k],
            "risk_level": risk[k],
            "threshold": threshold,
            "reasons": reasons[k],
            "model": model,
            "model_version": artifacts.version,
        }
    outcome.scored = len(rows)
    outcome.flagged = int(np.count_nonzero(scores.flagged))
    labels = {"model": model, "model_version": artifacts.version}
    METRICS.inc("predictions_total", outcome.scored, labels)
    METRICS.inc("predictions_flagged_total", outcome.flagged, labels)
    artifacts.rolling_drift.add(scores.features)  # the drift metric (GET /api/metrics)
    return outcome


__all__ = [
    "BatchItem",
    "BatchRequest",
    "BatchResponse",
    "Client",
    "ErrorDetail",
    "ErrorResponse",
    "FeatureValues",
    "FeaturesRecord",
    "HistoryRecord",
    "Invoice",
    "Outcome",
    "PredictRequest",
    "Prediction",
    "ReasonOut",
    "RecordError",
    "format_location",
    "join_location",
    "score_records",
]
