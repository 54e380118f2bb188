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

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "models_artifacts"

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
    # The API refuses a float for a code: the body builder must not send one.
    code = FEATURE_NAMES[next(i for i in CATEGORICAL if np.isfinite(row[i]))]
    floated = {**body, "features": {**body["features"], code: float(body["features"][code])}}
    with pytest.raises(ValidationError):
        adapter.validate_python(floated)


@pytest.mark.skipif(
    not (ARTIFACTS / "random_forest.joblib").is_file(), reason="no bundled model artifacts"
)
def test_tiny_suite_in_process_and_over_http(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skl2onnx")
    rows, extra = run_suite(TINY, ("inprocess", "http", "training"), None, ARTIFACTS)
    failed = [r for r in rows if r.name == "section failed"]
    assert not failed, failed
    names = [r.name for r in rows]
    assert any("single prediction" in n for n in names)
    assert any("/api/predict_batch" in n for n in names)
    assert all("errors: 0" in r.note for r in rows if r.section == "sustained load")
    text = render(rows, extra, machine(), "python -m benchmarks --tiny", 1.0)
    assert "| Section | Benchmark |" in text and "Where the time goes" in text
