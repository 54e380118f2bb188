"""Each feature on small hand-computed examples, the truncated views, and the input validation
around them."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from detector.features import CANDIDATES, FEATURE_NAMES, FEATURES, compute_features
from detector.features.views import cut_before_last
from detector.schema import InputError, prepare_clients, prepare_invoices

ALL = [spec.name for spec in CANDIDATES]


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
        "new_index": sum(levels),
        "months_number": 4,
        "counter_type": "ELEC",
    }
    for i, level in enumerate(levels, start=1):
        row[f"consommation_level_{i}"] = level
    row.update(overrides)
    return row


def features_of(
    rows: list[dict[str, object]], clients: pd.DataFrame | None = None, names: list[str] = ALL
) -> pd.DataFrame:
    prepared = prepare_invoices(pd.DataFrame(rows))
    assert len(prepared.rejects) == 0, prepared.rejects.to_frame()
    return compute_features(prepared.frame, prepare_clients(clients), names)


def year(date: str) -> float:
    days = (np.datetime64(date) - np.datetime64("1970-01-01")).astype(int)
    return 1970 + days / 365.25


def test_specs_are_complete_and_the_served_set_is_drawn_from_them() -> None:
    names = [spec.name for spec in CANDIDATES]
    assert len(set(names)) == len(names) > 100
    assert 25 <= len(FEATURES) <= 50 and len(set(FEATURE_NAMES)) == len(FEATURES)
    assert set(FEATURE_NAMES) <= set(names)
    for spec in CANDIDATES:
        assert spec.description and spec.unit and spec.min < spec.max
        assert spec.kind in ("numeric", "categorical") and spec.source in ("invoices", "client")
    # Nothing reads the date of the last invoice (a trace of the inspection, not of theft).
    assert not {"history_years", "client_age_years", "last_year"} & set(names)


def test_every_served_feature_has_words_for_an_inspector() -> None:
    from detector.reasons import _TEXTS

    assert set(FEATURE_NAMES) <= set(_TEXTS)
    for spec in FEATURES:
        text = _TEXTS[spec.name](3.0, 1.0)
        assert text and "_" not in text  # words, not column names


def test_one_invoice_client() -> None:
    f = features_of([invoice("a", "2015-03-01", 400, 0, 100, 0, months_number=4)]).loc["a"]
    assert f["first_year"] == pytest.approx(year("2015-03-01"))
    assert f["n_invoices"] == 1 and f["elec_n_invoices"] == 1
    assert f["n_meters"] == 1 and f["new_meter_after_years"] == 0
    assert f["cons_mean"] == f["cons_max"] == f["cons_min"] == f["cons_median"] == 125
    assert f["cons_std"] == 0 and f["cons_cv"] == 0 and f["cons_slope"] == 0
    assert f["tier1_share"] == pytest.approx(0.8) and f["tier3_share"] == pytest.approx(0.2)
    assert f["consumption_trend"] == 1.0  # nothing earlier to compare with
    for missing in ("gap_max_days", "gap_mean_days", "latest_meter_cons_ratio", "gaz_n_invoices"):
        assert math.isnan(f[missing]), missing
    for attribute in ("district", "region", "client_catg", "creation_year"):
        assert math.isnan(f[attribute])  # no client attributes given


def test_consumption_statistics_per_month_and_per_energy() -> None:
    rows = [
        invoice("a", "2015-01-01", 400),  # 100 a month
        invoice("a", "2015-05-01", 800),  # 200
        invoice("a", "2015-09-01", 0),  # 0
        invoice("a", "2016-01-01", 120, months_number=2),  # 60
        invoice("a", "2015-03-01", 40, counter_type="GAZ", counter_number=9, counter_code=5),
    ]
    f = features_of(rows).loc["a"]
    elec = np.array([100, 200, 0, 60])
    assert f["elec_cons_mean"] == pytest.approx(elec.mean())
    assert f["elec_cons_std"] == pytest.approx(elec.std())
    assert f["elec_cons_cv"] == pytest.approx(elec.std() / elec.mean())
    assert f["elec_cons_median"] == pytest.approx(80)
    assert f["elec_cons_min"] == 0 and f["elec_cons_max"] == 200
    assert f["elec_zero_share"] == pytest.approx(0.25)
    assert f["gaz_cons_mean"] == 10 and f["gaz_n_invoices"] == 1
    assert f["cons_max"] == 200 and f["n_invoices"] == 5
    assert f["zero_share"] == pytest.approx(1 / 5)
    assert f["irregular_period_share"] == pytest.approx(1 / 5)  # one invoice of 2 months
    assert f["gaz_first_year"] == pytest.approx(year("2015-03-01"))
    assert f["n_meters"] == 2 and f["elec_n_meters"] == 1 and f["n_codes"] == 2
    # Least-squares slope of monthly consumption over years, over (mean + 1).
    t = np.array([year(d) for d in ("2015-01-01", "2015-05-01", "2015-09-01", "2016-01-01")])
    slope = np.polyfit(t, elec, 1)[0]
    assert f["elec_cons_slope"] == pytest.approx(slope / (elec.mean() + 1))


def test_gas_only_client_has_no_electricity_features() -> None:
    rows = [
        invoice("g", "2015-01-01", 30, counter_type="GAZ", counter_code=5, tarif_type=40),
        invoice("g", "2015-05-01", 0, counter_type="GAZ", counter_code=5, tarif_type=40),
    ]
    f = features_of(rows).loc["g"]
    for name in ("elec_n_invoices", "elec_cons_cv", "elec_n_meters", "elec_tier1_share"):
        assert math.isnan(f[name]), name
    assert f["gaz_n_invoices"] == 2 and f["code_5_share"] == 1 and f["tariff_40_share"] == 1
    assert f["code_mode"] == 5 and f["tariff_mode"] == 40


def test_a_meter_change_and_the_gaps_between_readings() -> None:
    rows = [
        invoice("m", "2010-01-01", 400, counter_number=1),
        invoice("m", "2010-05-01", 400, counter_number=1),  # 120 days later
        invoice("m", "2011-01-01", 400, counter_number=1),  # 245 days later
        invoice("m", "2013-01-01", 1200, counter_number=2, counter_code=207),  # the new meter
        invoice("m", "2013-05-01", 1200, counter_number=2, counter_code=207),  # 120 days later
    ]
    f = features_of(rows).loc["m"]
    assert f["n_meters"] == 2 and f["elec_n_codes"] == 2 and f["meter_changes"] == 1
    assert f["new_meter_after_years"] == pytest.approx(1096 / 365.25)  # 2010-01-01 -> 2013-01-01
    assert f["meters_added_later"] == 1
    assert f["gap_max_days"] == 245 and f["gap_mean_days"] == pytest.approx((120 + 245 + 120) / 3)
    assert f["latest_meter_cons_ratio"] == pytest.approx((300 + 1) / (100 + 1))
    assert f["code_207_share"] == pytest.approx(2 / 5) and f["code_mode"] == 203


def test_mode_ties_go_to_the_smallest_code() -> None:
    rows = [invoice("t", "2015-01-01", 1, counter_code=413), invoice("t", "2015-02-01", 1)]
    assert features_of(rows).loc["t", "code_mode"] == 203


def test_zero_and_negative_index_differences() -> None:
    rows = [
        invoice("a", "2015-01-01", 0, old_index=500, new_index=500),  # zero, and it matches
        invoice("a", "2015-05-01", 120, old_index=500, new_index=300),  # negative, mismatch
        invoice("a", "2015-09-01", 80, old_index=300, new_index=380),
    ]
    f = features_of(rows).loc["a"]
    assert f["index_negative_share"] == pytest.approx(1 / 3)
    assert f["index_mismatch_share"] == pytest.approx(1 / 3)
    assert f["zero_share"] == pytest.approx(1 / 3)


def test_optional_columns_absent_leave_their_features_missing() -> None:
    rows = [invoice("a", "2015-01-01", 10), invoice("a", "2015-05-01", 20)]
    frame = pd.DataFrame(rows).drop(columns=["old_index", "new_index", "counter_coefficient"])
    prepared = prepare_invoices(frame)
    f = compute_features(prepared.frame, None, ALL).loc["a"]
    assert math.isnan(f["index_mismatch_share"]) and math.isnan(f["coefficient_share"])
    assert f["cons_mean"] == pytest.approx(3.75)


def test_months_number_is_clipped_to_a_sane_range() -> None:
    rows = [
        invoice("a", "2015-01-01", 120, months_number=0),  # 0 months: billed over one month
        invoice("a", "2016-01-01", 1200, months_number=636_624),  # export quirk: over 12
    ]
    f = features_of(rows).loc["a"]
    assert f["cons_mean"] == pytest.approx((120 / 1 + 1200 / 12) / 2)
    assert f["months_max"] == 636_624


def test_status_and_remarks() -> None:
    rows = [
        invoice("s", "2015-01-01", 1, counter_statue=0, reading_remarque=8),
        invoice("s", "2015-02-01", 1, counter_statue="0.0", reading_remarque=6),
        invoice("s", "2015-03-01", 1, counter_statue="5", reading_remarque=8),
        invoice("s", "2015-04-01", 1, counter_statue="A", reading_remarque=9),
    ]
    f = features_of(rows).loc["s"]
    assert f["status_abnormal_share"] == pytest.approx(0.5)  # "0", 0 and "0.0" are working
    assert f["status_5_share"] == pytest.approx(0.25)
    assert f["elec_remark_8_share"] == pytest.approx(0.5) and f["remark_6_share"] == 0.25
    assert f["remark_mean"] == pytest.approx(31 / 4)


def test_client_attributes_and_creation_delay() -> None:
    rows = [invoice("a", "2015-01-01", 10), invoice("b", "2010-01-01", 10)]
    clients = pd.DataFrame(
        {
            "client_id": ["a", "b"],
            "disrict": [60, 69],
            "region": [101, 301],
            "client_catg": [11, 51],
            "creation_date": ["01/01/2005", "2011-01-01"],
        }
    )
    f = features_of(rows, clients)
    assert f.loc["a", "region"] == 101 and f.loc["b", "district"] == 69
    assert f.loc["b", "client_catg"] == 51
    assert f.loc["a", "creation_year"] == pytest.approx(year("2005-01-01"))
    assert f.loc["a", "creation_to_first_invoice_years"] == pytest.approx(3652 / 365.25)
    assert f.loc["b", "creation_to_first_invoice_years"] == pytest.approx(-365 / 365.25)


def test_missing_client_attributes_stay_missing() -> None:
    rows = [invoice("a", "2015-01-01", 10), invoice("b", "2015-01-01", 10)]
    clients = pd.DataFrame({"client_id": ["a"], "region": [None], "creation_date": [None]})
    f = features_of(rows, clients)
    attributes = ["district", "region", "creation_year", "creation_to_first_invoice_years"]
    assert np.isnan(f.loc[["a", "b"], attributes].to_numpy()).all()


def test_served_features_by_default_clients_sorted() -> None:
    rows = [invoice(c, "2015-01-01", 10) for c in ("z", "b", "m")]
    prepared = prepare_invoices(pd.DataFrame(rows))
    f = compute_features(prepared.frame)
    assert list(f.index) == ["b", "m", "z"]
    assert list(f.columns) == list(FEATURE_NAMES)
    with pytest.raises(KeyError):
        compute_features(prepared.frame, None, ["no_such_feature"])


def test_features_do_not_depend_on_other_clients_nor_on_row_order() -> None:
    a = [
        invoice("a", f"2015-{m:02d}-01", 10 * m, counter_number=m % 2, counter_type=t)
        for m in range(1, 10)
        for t in ("ELEC", "GAZ")
    ]
    a.append(invoice("a", "2015-01-01", 55, counter_number=7))  # same day as another: a tie
    b = [invoice("b", f"2016-{m:02d}-01", 99, counter_statue="1") for m in range(1, 4)]
    alone = features_of(a)
    together = features_of(b + a[::-1])
    pd.testing.assert_series_equal(alone.loc["a"], together.loc["a"])


def test_derived_features_stay_inside_their_published_ranges() -> None:
    """The range GET /api/features publishes holds for features computed from any valid rows."""
    rng = np.random.default_rng(5)
    rows = []
    for c in range(60):
        for _ in range(int(rng.integers(1, 12))):
            date = f"{rng.integers(1950, 2099)}-{rng.integers(1, 13):02d}-{rng.integers(1, 28):02d}"
            rows.append(
                invoice(
                    f"c{c}",
                    date,
                    *rng.choice([0, 1, 10_000_000], size=4).tolist(),
                    months_number=int(rng.choice([0, 1, 4, 10**9])),
                    counter_number=int(rng.integers(0, 3)),
                    counter_type=str(rng.choice(["ELEC", "GAZ"])),
                    reading_remarque=int(rng.choice([-(10**15), 6, 10**15])),
                )
            )
    clients = pd.DataFrame(
        {
            "client_id": [f"c{c}" for c in range(60)],
            "creation_date": [f"{rng.integers(1950, 2099)}-01-01" for _ in range(60)],
            "region": rng.integers(0, 1_000_000, 60),
        }
    )
    f = features_of(rows, clients)
    for spec in CANDIDATES:
        values = f[spec.name].dropna()
        assert ((values >= spec.min) & (values <= spec.max)).all(), spec.name
        if spec.required:
            assert f[spec.name].notna().all(), spec.name


def test_cut_before_last_keeps_what_was_known_months_earlier() -> None:
    rows = [
        invoice("a", "2010-01-01", 1),
        invoice("a", "2014-01-01", 1),
        invoice("a", "2015-01-01", 1),  # last: a 12-month cut keeps what is dated 2014-01-01
        invoice("b", "2015-01-01", 1),  # a single invoice: nothing is left 12 months earlier
        invoice("c", "2012-06-01", 1),
        invoice("c", "2014-06-01", 1),
    ]
    prepared = prepare_invoices(pd.DataFrame(rows)).frame
    cut = cut_before_last(prepared, 12)
    assert sorted(cut.groupby("client_id").size().items()) == [("a", 2), ("c", 1)]
    assert cut_before_last(prepared, 0) is prepared
    deeper = cut_before_last(prepared, 24)
    assert sorted(deeper["client_id"].unique()) == ["a", "c"]
    assert len(deeper[deeper["client_id"] == "a"]) == 1


def test_bad_rows_are_rejected_with_reason_and_the_rest_kept() -> None:
    rows = [
        invoice("a", "2015-01-01", 10),
        invoice("", "2015-01-01", 10),
        invoice("b", "not a date", 10),
        invoice("c", "2015-01-01", -5),
        invoice("d", "2015-01-01", 10, months_number="x"),
        invoice("e", "2015-01-01", 10, counter_type="WATER"),
        invoice("f", "2015-01-01", float("inf")),
        invoice("g", "9999-12-31", 10),
        invoice("h", "today", 10),
        invoice("i", "1000-01-01", 10),
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
    assert reasons[7] == "invalid invoice_date: outside 1950-01-01 to 2099-12-31"
    assert reasons[8] == "invalid invoice_date: expected yyyy-mm-dd"
    assert reasons[9] == reasons[7]
    assert prepared.rejects.counts()["invalid invoice_date"] == 4


def test_missing_columns_are_named() -> None:
    frame = pd.DataFrame([invoice("a", "2015-01-01", 1)]).drop(
        columns=["months_number", "counter_type"]
    )
    with pytest.raises(InputError, match="months_number, counter_type"):
        prepare_invoices(frame)


def test_invalid_client_attribute_is_reported_and_treated_as_missing() -> None:
    clients = pd.DataFrame(
        {
            "client_id": ["a", "a", "b", "c"],
            "region": ["x", 1, 2, 3],
            "creation_date": ["31/02/2001", None, "bad", "01/01/0001"],
        }
    )
    prepared = prepare_clients(clients)
    assert list(prepared.frame.index) == ["a", "b", "c"]
    assert np.isnan(prepared.frame.loc["a", "region"])
    assert np.isnan(prepared.frame.loc["c", "creation_day"])
    reasons = list(prepared.rejects.reasons)
    assert reasons[0].startswith("invalid region") and reasons[1].startswith("duplicate")
    assert reasons[2].startswith("invalid creation_date")
    assert (
        reasons[3] == "invalid creation_date: outside 1950-01-01 to 2099-12-31; treated as missing"
    )


def test_empty_input_gives_no_clients() -> None:
    prepared = prepare_invoices(pd.DataFrame([invoice("a", "2015-01-01", 1)]).iloc[:0])
    assert compute_features(prepared.frame).empty
    assert compute_features(prepared.frame, None, ALL).empty
