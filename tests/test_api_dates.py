"""Issue 13, class 4 on the API side: implausible invoice dates (placeholders such as
9999-12-31, 0001-01-01, 1000-01-01, 3016-01-01, words such as "today") are a 422 naming
`invoices[j].invoice_date` (`records[k].invoices[j].invoice_date` in a batch), by the same rule
as batch files (`schema.prepare_invoices`); every input is generated here."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from detector.records import PLAUSIBLE_DATE, Invoice
from detector.schema import DATE_WINDOW, in_window, parse_dates
from tests.synthetic import make_steg
from tests.test_api import FEATURES_BODY, a_history, assert_error, post

JSON = {"content-type": "application/json"}
CASES = Path(__file__).resolve().parent.parent.parent / "shared" / "cases" / "2026-11-30"
# Placeholders seen in real exports, a word, the window's neighbours, and other non-dates.
OUTSIDE_WINDOW = (
    "9999-12-31",
    "0001-01-01",
    "1000-01-01",
    "3016-01-01",
    "1949-12-31",
    "2100-01-01",
)
NOT_A_DATE = ("today", "", "31/12/2019", "2015-02-30", "2015-1-1", "20150301", "NaT")


@pytest.fixture(scope="module")
def steg() -> tuple[pd.DataFrame, pd.DataFrame]:
    return make_steg(12, seed=13)


# --- class 4: plausible invoice dates ----------------------------------------------------------


@pytest.mark.parametrize("date", OUTSIDE_WINDOW + NOT_A_DATE)
def test_implausible_invoice_date_is_422_naming_the_field(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame], date: str
) -> None:
    body = a_history(steg)
    body["invoices"][1]["invoice_date"] = date
    response = post(client, "/api/predict", body)
    assert_error(response, 422, "invoices[1].invoice_date", "invalid_value")
    message = response.json()["error"]["message"]
    if date in OUTSIDE_WINDOW:
        assert message == f"invoice rejected: invalid invoice_date: outside {DATE_WINDOW}"
    else:
        assert message.startswith("invoice rejected: invalid invoice_date: expected yyyy-mm-dd")


@pytest.mark.parametrize("date", ["9999-12-31", "0001-01-01", "1000-01-01", "3016-01-01", "today"])
def test_implausible_date_in_a_batch_fails_that_record_only(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame], date: str
) -> None:
    good, bad = a_history(steg, 0), a_history(steg, 1)
    bad["invoices"][-1]["invoice_date"] = date
    records = [good, bad, {"customer_id": "f", "features": FEATURES_BODY}]
    response = post(client, "/api/predict_batch", {"records": records})
    assert response.status_code == 200
    body = response.json()
    assert (body["scored"], body["failed"]) == (2, 1)
    last = len(bad["invoices"]) - 1
    error = body["results"][1]["error"]
    assert error["location"] == f"records[1].invoices[{last}].invoice_date"
    assert error["code"] == "invalid_value"
    alone = post(client, "/api/predict", good).json()["theft_probability"]
    assert body["results"][0]["theft_probability"] == alone


def test_the_date_is_named_before_the_errors_of_later_fields(client: TestClient) -> None:
    """The shared case: an export without counter_type whose first row is dated 9999-12-31. The
    date is the first field of the row in error; the missing field is listed in details."""
    rows = [
        {
            "invoice_date": date,
            "tarif_type": 11,
            "counter_number": 1335667,
            "counter_statue": "0",
            "counter_code": 203,
            "reading_remarque": 8,
            "consommation_level_1": 82,
            "consommation_level_2": 0,
            "consommation_level_3": 0,
            "consommation_level_4": 0,
            "months_number": 4,
        }
        for date in ("9999-12-31", "2015-03-23")
    ]
    response = post(client, "/api/predict", {"customer_id": "c-9", "invoices": rows})
    assert_error(response, 422, "invoices[0].invoice_date", "invalid_value")
    details = {d["location"] for d in response.json()["error"]["details"]}
    assert details == {"invoices[0].invoice_date", "invoices[0].counter_type"}


def test_the_shared_sentinel_case(client: TestClient) -> None:
    path = CASES / "sentinel-date-predict.json"
    if not path.is_file():
        pytest.skip("../shared/cases is not present")
    response = client.post("/api/predict", content=path.read_bytes(), headers=JSON)
    assert_error(response, 422, "invoices[0].invoice_date", "invalid_value")


@pytest.mark.parametrize("date", ["1950-01-01", "2099-12-31", " 2015-03-01 ", "2015-03-01\t"])
def test_dates_inside_the_window_are_scored(
    client: TestClient, steg: tuple[pd.DataFrame, pd.DataFrame], date: str
) -> None:
    body = a_history(steg)
    body["invoices"][0]["invoice_date"] = date
    response = post(client, "/api/predict", body)
    assert response.status_code == 200, response.text


_DATE = TypeAdapter(Invoice.__annotations__["invoice_date"])
# ASCII, Arabic-Indic and fullwidth digits (pandas reads the latter two in a year).
_DIGITS = (
    "0123456789" + "".join(map(chr, range(0x660, 0x66A))) + "".join(map(chr, range(0xFF10, 0xFF1A)))
)
_SPACES = " \t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u3000"


def _schema_accepts(text: str) -> bool:
    days = parse_dates(pd.Series([text], dtype=object))
    return bool(in_window(days)[0])


def _pattern_accepts(text: str) -> bool:
    try:
        _DATE.validate_python(text)
    except ValidationError:
        return False
    return True


_SCRIPTS = ("0123456789", _DIGITS[10:20], _DIGITS[20:30])


def _written(number: int, width: int, scripts: list[int]) -> str:
    """`number` zero-padded, each digit in the script `scripts[k]` (ASCII, Arabic-Indic or
    fullwidth)."""
    return "".join(_SCRIPTS[s][int(c)] for c, s in zip(f"{number:0{width}d}", scripts, strict=True))


_PLAUSIBLE_LOOKING = st.builds(
    lambda pre, y, ys, m, ms, d, ds, post: (
        f"{pre}{_written(y, 4, ys)}-{_written(m, 2, ms)}-{_written(d, 2, ds)}{post}"
    ),
    st.text(alphabet=_SPACES, max_size=2),
    st.integers(1900, 2150),
    st.lists(st.sampled_from([0, 0, 1, 2]), min_size=4, max_size=4),
    st.integers(0, 13),
    st.lists(st.sampled_from([0, 0, 1, 2]), min_size=2, max_size=2),
    st.integers(0, 32),
    st.lists(st.sampled_from([0, 0, 1, 2]), min_size=2, max_size=2),
    st.text(alphabet=_SPACES, max_size=2),
)


@hyp_settings(max_examples=500, deadline=None)
@given(
    text=st.one_of(
        _PLAUSIBLE_LOOKING,
        st.text(alphabet=_DIGITS + _SPACES + "-/.Tx", max_size=14),
        st.integers(0, 9999).map(lambda y: f"{y:04d}-06-15"),
    )
)
def test_the_api_date_pattern_never_refuses_what_the_schema_accepts(text: str) -> None:
    """One rule: the API's early check refuses only what `schema.prepare_invoices` refuses."""
    if len(text) > 32:  # the API's length limit on the field, checked separately
        return
    if _schema_accepts(text):
        assert _pattern_accepts(text), repr(text)


@pytest.mark.parametrize("year", [1949, 1950, 2099, 2100, 1, 1000, 3016, 9999])
def test_the_pattern_window_is_the_schema_window(year: int) -> None:
    text = f"{year:04d}-06-15"
    assert _pattern_accepts(text) == _schema_accepts(text) == (1950 <= year <= 2099)


def test_openapi_documents_the_window_not_the_engine_pattern(client: TestClient) -> None:
    schema = client.get("/api/openapi.json").json()["components"]["schemas"]["Invoice"]
    date = schema["properties"]["invoice_date"]
    assert "pattern" not in date  # Rust-regex syntax; JSON Schema patterns are ECMA-262
    assert DATE_WINDOW in date["description"]
    assert PLAUSIBLE_DATE.startswith("^")
