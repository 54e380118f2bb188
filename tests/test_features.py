"""Each feature on small hand-computed examples, and the input validation around them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from detector.features import FEATURE_NAMES, FEATURES, compute_features
from detector.schema import InputError, prepare_clients, prepare_invoices


def invoice(client: str, date: str, *levels: int, **overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "client_id": client,
        "invoice_date": date,
        "tarif_type": 11,
        "counter_number": 1,
        "counter_statue": "0",
        "counter_code": 203,
        "reading_remarque": 6,
        "counter_coefficient": 1,
        "consommation_level_1": 0,
        "consommation_level_2": 0,
        "consommation_level_3": 0,
        "consommation_level_4": 0,
        "old_index": 0,
        "new_index": 0,
        "months_number": 4,
        "counter_type": "ELEC",
    }
    for i, level in enumerate(levels, start=1):
        row[f"consommation_level_{i}"] = level
    row.update(overrides)
    return row


def features_of(rows: list[dict[str, object]], clients: pd.DataFrame | None = None) -> pd.DataFrame:
    prepared = prepare_invoices(pd.DataFrame(rows))
    assert len(prepared.rejects) == 0, prepared.rejects.to_frame()
    return compute_features(prepared.frame, prepare_clients(clients))


def test_feature_specs_are_complete_and_ordered() -> None:
    assert len(FEATURES) == 14
    assert len(set(FEATURE_NAMES)) == 14
    for spec in FEATURES:
        assert spec.description and spec.unit and spec.min < spec.max


def test_one_invoice_client() -> None:
    f = features_of([invoice("a", "2015-03-01", 400, 0, 100, 0, months_number=4)]).loc["a"]
    assert f["first_invoice_year"] == pytest.approx(1970 + 16495 / 365.25)  # 2015-03-01
    assert f["history_years"] == 0
    assert f["n_meters"] == 1
    assert f["mean_monthly_consumption"] == pytest.approx(500 / 4)
    assert f["max_monthly_consumption"] == pytest.approx(125)
    assert f["consumption_trend"] == 1.0  # nothing earlier to compare with
    assert f["high_tier_share"] == pytest.approx(100 / 500)
    for attribute in ("district", "region", "client_age_years"):  # no client attributes given
        assert math.isnan(f[attribute])


def test_trend_compares_latest_quarter_with_earlier_invoices() -> None:
    # 8 invoices: the latest 2 (a quarter) are recent. Monthly: 100 x6, then 20 x2.
    rows = [invoice("a", f"2015-{m:02d}-01", 400) for m in range(1, 7)]
    rows += [invoice("a", f"2015-{m:02d}-01", 80) for m in (7, 8)]
    rows.reverse()  # order of the input must not matter: the history is sorted by date
    f = features_of(rows).loc["a"]
    assert f["consumption_trend"] == pytest.approx((20 + 1) / (100 + 1))
    assert f["max_monthly_consumption"] == pytest.approx(100)
    assert f["history_years"] == pytest.approx(212 / 365.25)  # 2015-01-01 .. 2015-08-01


def test_zero_and_negative_index_differences_are_kept() -> None:
    rows = [
        invoice("a", "2015-01-01", 0, old_index=500, new_index=500),
        invoice("a", "2015-05-01", 120, old_index=500, new_index=300),
    ]
    f = features_of(rows).loc["a"]
    assert f["mean_monthly_consumption"] == pytest.approx((0 + 30) / 2)
    assert f["consumption_trend"] == pytest.approx((30 + 1) / (0 + 1))
    assert f["high_tier_share"] == 0  # only the billed invoice counts, and it has no tier 3/4


def test_months_number_is_clipped_to_a_sane_range() -> None:
    rows = [
        invoice("a", "2015-01-01", 120, months_number=0),  # 0 months: billed over one month
        invoice("a", "2016-01-01", 1200, months_number=636_624),  # export quirk: over 12
    ]
    f = features_of(rows).loc["a"]
    assert f["mean_monthly_consumption"] == pytest.approx((120 / 1 + 1200 / 12) / 2)


def test_gas_only_client_and_meter_status_and_remarks() -> None:
    rows = [
        invoice(
            "g",
            "2015-01-01",
            30,
            counter_type="GAZ",
            counter_statue="0",
            counter_code=5,
            tarif_type=40,
            reading_remarque=6,
            counter_number=7,
        ),
        invoice(
            "g",
            "2015-05-01",
            0,
            counter_type="GAZ",
            counter_statue="1",
            counter_code=5,
            tarif_type=40,
            reading_remarque=9,
            counter_number=8,
        ),
        invoice(
            "g",
            "2015-09-01",
            0,
            counter_type="GAZ",
            counter_statue="A",
            counter_code=5,
            tarif_type=40,
            reading_remarque=9,
            counter_number=8,
        ),
    ]
    f = features_of(rows).loc["g"]
    assert f["n_meters"] == 2
    assert f["abnormal_status_share"] == pytest.approx(2 / 3)
    assert f["mean_reading_remark"] == pytest.approx(8)
    assert f["mean_monthly_consumption"] == pytest.approx(30 / 4 / 3)
    assert f["mean_counter_code"] == 5 and f["mean_tariff_type"] == 40


def test_status_zero_spelled_as_number_is_working() -> None:
    rows = [
        invoice("a", "2015-01-01", 10, counter_statue=0),
        invoice("a", "2015-02-01", 10, counter_statue="0.0"),
    ]
    assert features_of(rows).loc["a", "abnormal_status_share"] == 0


def test_client_attributes_region_and_age() -> None:
    rows = [invoice("a", "2015-01-01", 10), invoice("b", "2010-01-01", 10)]
    clients = pd.DataFrame(
        {
            "client_id": ["a", "b"],
            "disrict": [60, 69],
            "region": [101, 301],
            "creation_date": ["01/01/2005", "2011-01-01"],
        }
    )
    f = features_of(rows, clients)
    assert f.loc["a", "region"] == 101 and f.loc["b", "district"] == 69
    assert f.loc["a", "client_age_years"] == pytest.approx(3652 / 365.25)
    assert f.loc["b", "client_age_years"] == 0  # created after the last invoice: clipped


def test_missing_client_attributes_stay_missing_for_imputation() -> None:
    rows = [invoice("a", "2015-01-01", 10), invoice("b", "2015-01-01", 10)]
    clients = pd.DataFrame({"client_id": ["a"], "region": [None], "creation_date": [None]})
    f = features_of(rows, clients)
    attributes = ["district", "region", "client_age_years"]
    assert np.isnan(f.loc[["a", "b"], attributes].to_numpy()).all()


def test_clients_come_out_sorted_with_all_features() -> None:
    rows = [invoice(c, "2015-01-01", 10) for c in ("z", "b", "m")]
    f = features_of(rows)
    assert list(f.index) == ["b", "m", "z"]
    assert list(f.columns) == list(FEATURE_NAMES)


def test_features_do_not_depend_on_other_clients() -> None:
    a = [invoice("a", f"2015-{m:02d}-01", 10 * m, counter_number=m % 2) for m in range(1, 10)]
    b = [invoice("b", f"2016-{m:02d}-01", 99, counter_statue="1") for m in range(1, 4)]
    alone = features_of(a)
    together = features_of(a + b)
    pd.testing.assert_series_equal(alone.loc["a"], together.loc["a"])


def test_bad_rows_are_rejected_with_reason_and_the_rest_kept() -> None:
    rows = [
        invoice("a", "2015-01-01", 10),
        invoice("", "2015-01-01", 10),
        invoice("b", "not a date", 10),
        invoice("c", "2015-01-01", -5),
        invoice("d", "2015-01-01", 10, months_number="x"),
        invoice("e", "2015-01-01", 10, counter_type="WATER"),
        invoice("f", "2015-01-01", float("inf")),
    ]
    prepared = prepare_invoices(pd.DataFrame(rows))
    assert list(prepared.frame["client_id"]) == ["a"]
    reasons = dict(zip(prepared.rejects.rows, prepared.rejects.reasons, strict=True))
    assert reasons[1] == "missing client_id"
    assert reasons[2].startswith("invalid invoice_date")
    assert "negative consumption" in reasons[3]
    assert reasons[4].startswith("invalid months_number")
    assert reasons[5].startswith("invalid counter_type")
    assert reasons[6].startswith("invalid consommation_level_1")
    assert prepared.rejects.counts()["invalid invoice_date"] == 1


def test_missing_columns_are_named() -> None:
    frame = pd.DataFrame([invoice("a", "2015-01-01", 1)]).drop(
        columns=["months_number", "tarif_type"]
    )
    with pytest.raises(InputError, match="months_number"):
        prepare_invoices(frame)


def test_invalid_client_attribute_is_reported_and_imputed() -> None:
    clients = pd.DataFrame(
        {
            "client_id": ["a", "a", "b"],
            "region": ["x", 1, 2],
            "creation_date": ["31/02/2001", None, "bad"],
        }
    )
    prepared = prepare_clients(clients)
    assert list(prepared.frame.index) == ["a", "b"]
    assert np.isnan(prepared.frame.loc["a", "region"])
    reasons = list(prepared.rejects.reasons)
    assert reasons[0].startswith("invalid region") and reasons[1].startswith("duplicate")
    assert reasons[2].startswith("invalid creation_date")


def test_empty_input_gives_no_clients() -> None:
    prepared = prepare_invoices(pd.DataFrame([invoice("a", "2015-01-01", 1)]).iloc[:0])
    assert compute_features(prepared.frame).empty


def test_reasons_skip_typical_values_and_name_the_biggest_push() -> None:
    from detector.reasons import explain_rows

    typical = np.arange(14, dtype=float)
    values = typical.copy()
    values[[2, 5]] += 1.0  # only these two differ from the typical customer
    contributions = np.zeros(14)
    contributions[[0, 2, 5, 7]] = [0.5, 0.1, 0.3, -0.2]  # feature 0 pushes most but is typical
    (reasons,) = explain_rows(values[None], contributions[None], typical)
    assert [r.feature for r in reasons] == [FEATURE_NAMES[5], FEATURE_NAMES[2]]
    assert all(r.text for r in reasons)


def test_reasons_of_many_rows_match_a_row_by_row_reference() -> None:
    """The vectorised choice against the rule written plainly, one row at a time: ties, rows
    without any reason, values equal to the typical one and negative pushes included."""
    from detector.reasons import explain_rows

    rng = np.random.default_rng(11)
    n = 500
    typical = rng.uniform(1, 100, 14)
    values = np.where(rng.random((n, 14)) < 0.3, typical, typical * rng.uniform(0.5, 2, (n, 14)))
    contributions = rng.choice([-0.02, 0.0, 0.01, 0.02, 0.05], size=(n, 14))  # many ties
    contributions[:20] = -0.01  # rows that nothing pushed up
    got = explain_rows(values, contributions, typical, limit=3)
    for row, reasons in enumerate(got):
        candidates = [
            (-contributions[row, i], i)  # largest first; ties keep the feature order
            for i in range(14)
            if contributions[row, i] > 1e-9 and values[row, i] != typical[i]
        ]
        expected = [i for _, i in sorted(candidates)[:3]]
        assert [r.feature for r in reasons] == [FEATURE_NAMES[i] for i in expected]
        assert [r.value for r in reasons] == [values[row, i] for i in expected]
        assert [r.typical for r in reasons] == [typical[i] for i in expected]
        assert [r.contribution for r in reasons] == [contributions[row, i] for i in expected]
    assert not any(got[:20]) and all(got[20:])
