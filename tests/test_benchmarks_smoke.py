"""The benchmark harness at tiny sizes, so that `make bench` cannot rot. Asserts no timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from benchmarks import http
from benchmarks.__main__ import TINY, render, run_suite
from benchmarks.common import Stats, feature_rows, features_body, machine, measure
from detector.features import FEATURE_NAMES, FEATURES
from detector.records import FeaturesRecord

pytestmark = pytest.mark.xdist_group("benchmarks")

REQUIRED = [i for i, spec in enumerate(FEATURES) if spec.required]
OPTIONAL = [i for i, spec in enumerate(FEATURES) if not spec.required]
CATEGORICAL = [i for i, spec in enumerate(FEATURES) if spec.kind == "categorical"]


def test_stats_are_medians_and_percentiles() -> None:
    stats = Stats([0.001 * i for i in range(1, 101)])
    assert stats.n == 100
    assert stats.p50 == pytest.approx(0.0505)
    assert stats.p50 <= stats.p95 <= stats.p99 <= 0.1
    calls = []
    timed = measure(lambda: calls.append(1), runs=5, warmup=2)
    assert timed.n == 5 and len(calls) == 7


def test_profile_buckets_charge_the_innermost_owner(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text(
        "run (uvicorn/server.py:1);score (/work/x/detector/model/artifacts.py:10);"
        "_one_row (/work/x/detector/model/trees.py:5);take (numpy/_core/fromnumeric.py:5) 3\n"
        "run (uvicorn/server.py:1);handle (h11/_connection.py:3) 1\n"
    )
    shares = dict(http.buckets(raw))
    assert shares["model: ArtifactSet.score (numpy tree walk)"] == pytest.approx(0.75)
    assert http.summarise_profile(raw) is not None


def test_feature_rows_keep_clients_missing_optional_features() -> None:
    rows, source = feature_rows(300, None)
    assert rows.shape == (300, len(FEATURE_NAMES)) and source.startswith("synthetic")
    assert np.isfinite(rows[:, REQUIRED]).all()
    # Gas-only clients have no electricity features: they are real clients and stay in.
    assert np.isnan(rows[:, OPTIONAL]).any(axis=1).any()


def test_features_body_is_what_the_strict_api_accepts() -> None:
    rows, _ = feature_rows(50, None)
    row = rows[np.isnan(rows[:, OPTIONAL]).any(axis=1)][0]
    body = features_body(row, "c1")
    assert body["customer_id"] == "c1"
    assert list(body["features"]) == list(FEATURE_NAMES)
    for i in CATEGORICAL:
        value = body["features"][FEATURE_NAMES[i]]
        assert value is None or type(value) is int
    assert any(body["features"][FEATURE_NAMES[i]] is None for i in OPTIONAL)
    adapter = TypeAdapter(FeaturesRecord)
    adapter.validate_python(body)
    # The API refuses a fractional code (101.5); the body builder sends whole numbers.
    code = FEATURE_NAMES[next(i for i in CATEGORICAL if np.isfinite(row[i]))]
    floated = {**body, "features": {**body["features"], code: body["features"][code] + 0.5}}
    with pytest.raises(ValidationError):
        adapter.validate_python(floated)


def test_tiny_suite_in_process_and_over_http(tiny_artifacts_dir: Path) -> None:
    rows, extra = run_suite(TINY, ("inprocess", "http", "training"), None, tiny_artifacts_dir)
    failed = [r for r in rows if r.name == "section failed"]
    assert not failed, failed
    by_name = {r.name: r for r in rows}

    single = by_name["single prediction, in process (probability)"]
    explained = by_name["single prediction, in process (+ contributions, as /predict)"]
    assert set(single.data) >= {"ours", "lgbm", "python", "lgbm_contrib", "python_contrib"}
    assert "LightGBM C++" in single.ratio and "pred_contrib" in explained.limit
    for size in TINY["batch_sizes"]:
        with_reasons = by_name[f"batch of {size:,} (ArtifactSet.score + contributions)"]
        probability = by_name[f"batch of {size:,} (ArtifactSet.score, probability only)"]
        assert "pred_contrib" in with_reasons.limit and "predict C++ 1 thread" in probability.limit
        assert all(with_reasons.data[k]["n"] >= 2 for k in ("contrib_1", "predict_n"))

    check = extra["agreement"]
    assert check["rows"] == max(*TINY["batch_sizes"], 512)  # every benchmark row
    assert check["max_dp"] <= 1e-9
    assert check["max_margin_gap"] <= 1e-4 and check["max_shap_gap"] <= 1e-6
    assert check["explained_rows"] > 0
    for key in ("top_reason_same", "top_in_shap_top3", "top_feature_same"):
        assert 0.0 <= check[key] <= 1.0
    assert check["top_reason_same"] <= check["top_in_shap_top3"]
    agreement = next(r for r in rows if r.name.startswith("agreement with LightGBM"))
    assert agreement.met == "yes"

    steps = dict(extra["score_steps"])
    assert any(name.startswith("expand") for name in steps)
    assert any(name.startswith("walk") for name in steps)
    assert all(seconds > 0 for seconds in steps.values())

    assert any("/api/predict_batch" in r.name for r in rows)
    assert extra["http"]["bad_responses"] == 0  # every body was accepted by the strict API
    assert all("errors: 0" in r.note for r in rows if r.section == "sustained load")
    text = render(rows, extra, machine(), "python -m benchmarks --tiny", 1.0)
    assert "| Section | Benchmark |" in text and "Where the time goes" in text
    assert "Agreement with LightGBM" in text and "TreeSHAP" in text


def test_identity_benchmark_runs_at_tiny_sizes() -> None:
    """`python -m benchmarks.identity` (docs/OPERATIONS.md, "Callers") cannot rot."""
    from benchmarks import identity

    figures = identity.measure(reader_runs=5, predict_runs=3)
    assert set(figures["reader_us"]) == {"cached", "new token"}
    assert set(figures["predict_in_process_us"]) == {"auth off", "auth on"}
    assert figures["predict_ratio_p50"] > 0
