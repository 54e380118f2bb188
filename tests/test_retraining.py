"""The model after go-live: inspection outcomes, the data snapshot, champion/challenger, drift,
and the scheduled retraining's step script against Azurite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from detector.api import create_app
from detector.cli import main
from detector.config import Settings
from detector.features import FEATURE_NAMES
from detector.model import ArtifactSet
from detector.store import ModelStore
from detector.training import train
from detector.training.compare import MIN_FRAUD, compare, gate
from detector.training.data import load_labelled
from tests.synthetic import make_steg

REPO = Path(__file__).resolve().parent.parent


def _rows(client: str, dates: list[str], meter: int = 1) -> list[dict[str, Any]]:
    return [
        {
            "client_id": client,
            "invoice_date": date,
            "tarif_type": 11,
            "counter_number": meter,
            "counter_statue": "0",
            "counter_code": 203,
            "reading_remarque": 6,
            "consommation_level_1": 100,
            "consommation_level_2": 0,
            "consommation_level_3": 0,
            "consommation_level_4": 0,
            "months_number": 4,
            "counter_type": "ELEC",
        }
        for date in dates
    ]


# --- inspection outcomes -------------------------------------------------------------------------


def test_outcomes_add_and_update_labels_and_cut_histories_at_the_inspection(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    clients = pd.DataFrame({"client_id": ["a", "b", "c"], "target": [0, 0, 1]})
    invoices = pd.DataFrame(
        _rows("a", ["2015-01-01", "2016-01-01", "2017-01-01", "2018-01-01"])
        + _rows("b", ["2015-01-01", "2016-01-01"])
        + _rows("c", ["2015-01-01"])
        + _rows("d", ["2014-01-01", "2015-06-01", "2016-06-01"])
    )
    outcomes = pd.DataFrame(
        {
            "client_id": ["a", "d", "d", "b", "x"],
            "inspection_date": ["2017-01-01", "2015-06-01", "2016-07-01", "bad", "2015-01-01"],
            "fraud": [1, 0, 1, 1, 7],
            "notes": ["bypass", "", "meter tampered", "", ""],
        }
    )
    clients.to_csv(data / "clients_train.csv", index=False)
    invoices.to_csv(data / "invoices_train.csv", index=False)
    outcomes.to_csv(data / "outcomes.csv", index=False)
    labelled = load_labelled(data)
    # a: the outcome turns 0 into 1; d: only in the outcomes, its latest inspection decides;
    # b keeps its target (its outcome row is invalid); c is unchanged.
    assert labelled.labels.to_dict() == {"a": 1, "b": 0, "c": 1, "d": 1}
    kept = labelled.invoices.groupby("client_id")["invoice_day"].apply(list).to_dict()
    day = lambda d: float((np.datetime64(d) - np.datetime64("1970-01-01")).astype(int))  # noqa: E731
    # Strictly before the inspection: the invoice of the inspection day itself is out.
    assert kept["a"] == [day("2015-01-01"), day("2016-01-01")]
    assert kept["d"] == [day("2014-01-01"), day("2015-06-01"), day("2016-06-01")]
    assert len(kept["b"]) == 2
    snapshot = labelled.summary
    assert snapshot["outcomes"]["outcome_rows"] == 3  # used
    assert snapshot["outcomes"]["outcome_rows_read"] == 5
    assert snapshot["outcomes"]["outcome_rows_rejected"] == 2
    assert snapshot["outcomes"]["inspection_dates"] == ["2015-06-01", "2017-01-01"]
    assert snapshot["outcomes"]["invoice_rows_after_inspection_dropped"] == 2
    assert set(snapshot["files"]) == {"clients_train.csv", "invoices_train.csv", "outcomes.csv"}
    assert snapshot["files"]["invoices_train.csv"]["rows"] == 10
    assert snapshot["invoice_dates"] == ["2014-01-01", "2016-06-01"]


def _write_training(folder: Path, outcomes: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    clients = pd.DataFrame({"client_id": ["a", "b", "c"], "target": [0, 0, 1]})
    invoices = pd.DataFrame(
        _rows("a", ["2015-01-01", "2016-01-01", "2017-01-01", "2018-01-01"])
        + _rows("b", ["2015-01-01", "2016-01-01"])
        + _rows("c", ["2015-01-01", "2016-01-01"])
    )
    clients.to_csv(folder / "clients_train.csv", index=False)
    invoices.to_csv(folder / "invoices_train.csv", index=False)
    outcomes.to_csv(folder / "outcomes.csv", index=False)


# The reviewer's rows: a future date that would flip a label, a non-date, fraud=7, an empty fraud,
# an unknown client; and one valid row.
HOSTILE_OUTCOMES = pd.DataFrame(
    {
        "client_id": ["a", "a", "b", "c", "c", "zz"],
        "inspection_date": [
            "2099-01-01",
            "2016-06-01",
            "not-a-date",
            "2015-06-01",
            "2015-06-01",
            "2015-01-01",
        ],
        "fraud": ["1", "0", "1", "7", "", "1"],
    }
)
HOSTILE_REASONS = {
    "inspection_date in the future": 1,
    "invalid fraud": 2,
    "invalid inspection_date": 1,
    "unknown client_id": 1,
}


def test_train_uses_or_rejects_every_outcome_row(tmp_path: Path) -> None:
    """`ptd train --data DIR` with DIR/outcomes.csv: a row is used or rejected with its reason."""
    _write_training(tmp_path / "data", HOSTILE_OUTCOMES)
    labelled = load_labelled(tmp_path / "data")
    outcomes = labelled.summary["outcomes"]
    assert (outcomes["outcome_rows_read"], outcomes["outcome_rows"]) == (6, 1)
    assert outcomes["outcome_rows_rejected"] == 5
    assert outcomes["outcome_rows_rejected_by_reason"] == HOSTILE_REASONS
    assert outcomes["outcome_unknown_clients"] == 1
    assert outcomes["inspection_dates"] == ["2016-06-01", "2016-06-01"]
    # The 2099 row did not decide a's label: its inspection of 2016-06-01 (no fraud) did, and
    # a's history stops there; c keeps its target (both its rows are invalid).
    assert labelled.labels.to_dict() == {"a": 0, "b": 0, "c": 1}
    day = float((np.datetime64("2016-06-01") - np.datetime64("1970-01-01")).astype(int))
    kept = labelled.invoices.groupby("client_id")["invoice_day"].max().to_dict()
    assert kept["a"] < day
    # An inspection after the date of the data is rejected too.
    early = load_labelled(tmp_path / "data", as_of=date(2016, 1, 1)).summary["outcomes"]
    assert early["outcome_rows"] == 0
    assert early["outcome_rows_rejected_by_reason"]["inspection_date in the future"] == 2


@pytest.mark.azurite
@pytest.mark.xdist_group("azurite")
def test_snapshot_uses_or_rejects_every_outcome_row(
    tmp_path: Path,
    azurite: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from detector.store import blob_service_client

    training = f"training-{uuid.uuid4().hex[:8]}"
    container = blob_service_client(Settings(), {"STORAGE": azurite}).get_container_client(training)
    container.create_container()
    clients, invoices = make_steg(40, seed=3)
    evaluation_clients, evaluation_invoices = make_steg(20, seed=4)
    for frame in (evaluation_clients, evaluation_invoices):
        frame["client_id"] = "e-" + frame["client_id"]
    good = pd.DataFrame(
        {
            "client_id": ["c00000", "c00001", "c00002"],
            "inspection_date": ["2015-06-01", "20/07/2015", "2015-08-01"],
            "fraud": ["1", "0", "1.0"],
        }
    )
    hostile = pd.DataFrame(
        {
            "client_id": ["c00003", "c00004", "c00005", "c00006", "nobody", "e-c00000"],
            "inspection_date": [
                "2099-01-01",
                "not-a-date",
                "2015-06-01",
                "2015-06-01",
                "2015-01-01",
                "2015-01-01",
            ],
            "fraud": ["1", "1", "7", "", "1", "1"],
        }
    )
    for name, frame in (
        ("latest/clients_train.parquet", clients),
        ("latest/invoices_train.parquet", invoices),
        ("outcomes/2026-10.csv", good),
        ("outcomes/2026-11.csv", hostile),
        ("evaluation/clients.parquet", evaluation_clients),
        ("evaluation/invoices.parquet", evaluation_invoices),
    ):
        data = frame.to_csv(index=False).encode() if name.endswith(".csv") else frame.to_parquet()
        container.upload_blob(name, data)
    monkeypatch.setenv("STORAGE", azurite)
    monkeypatch.setenv("PTD_TRAINING_CONTAINER", training)
    out = tmp_path / "snapshot"
    assert main(["snapshot", "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    taken = json.loads(printed)
    reasons = {
        "client in the evaluation set": 1,
        "inspection_date in the future": 1,
        "invalid fraud": 2,
        "invalid inspection_date": 1,
        "unknown client_id": 1,
    }
    assert (taken["outcome_rows"], taken["outcome_rows_read"]) == (3, 9)
    assert taken["outcome_rows_rejected"] == 6
    assert taken["outcome_rows_rejected_by_reason"] == reasons
    assert taken["outcome_unknown_clients"] == 1
    assert taken["outcomes_as_of"] == datetime.now(UTC).date().isoformat()
    assert "outcomes: 9 rows read from 2 file(s), 3 used, 6 rejected (" in err
    assert "outcomes.rejects.csv" in err and "nobody" not in err
    # The stored outcomes are typed: what `ptd train` reads is what was checked.
    schema = pq.read_schema(out / "outcomes.parquet")
    assert [str(schema.field(c).type) for c in ("client_id", "inspection_date", "fraud")] == [
        "string",
        "date32[day]",
        "int64",
    ]
    stored = pd.read_parquet(out / "outcomes.parquet")
    assert stored["fraud"].tolist() == [1, 0, 1]
    assert [str(d) for d in stored["inspection_date"]] == ["2015-06-01", "2015-07-20", "2015-08-01"]
    rejects = pd.read_csv(out / "outcomes.rejects.csv", dtype=str, keep_default_na=False)
    assert list(rejects.columns) == ["source", "row", "client_id", "reason"]
    assert set(rejects["source"]) == {"outcomes/2026-11.csv"}
    assert rejects["row"].tolist() == ["0", "1", "2", "3", "4", "5"]
    assert rejects["reason"].str.split(":").str[0].value_counts().to_dict() == reasons
    # `ptd train --data` on the snapshot: the same routine, every stored row used.
    outcomes = load_labelled(out).summary["outcomes"]
    assert (outcomes["outcome_rows"], outcomes["outcome_rows_rejected"]) == (3, 0)


def test_the_manifest_records_the_training_data_snapshot(tiny_artifacts: ArtifactSet) -> None:
    snapshot = tiny_artifacts.manifest["training_data"]
    assert set(snapshot["files"]) == {"clients_train.parquet", "invoices_train.parquet"}
    for entry in snapshot["files"].values():
        assert len(entry["sha256"]) == 64 and entry["rows"] > 0
    assert snapshot["invoice_dates"][0] < snapshot["invoice_dates"][1]
    assert snapshot["labelled_clients"] == 300


# --- champion / challenger -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("evaluation")
    clients, invoices = make_steg(400, seed=9)
    clients.to_parquet(folder / "clients.parquet", index=False)
    invoices.to_parquet(folder / "invoices.parquet", index=False)
    return folder / "invoices.parquet", folder / "clients.parquet"


@pytest.fixture(scope="module")
def worse_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained on shuffled labels: it learnt nothing."""
    folder = tmp_path_factory.mktemp("shuffled")
    clients, invoices = make_steg(300, seed=1)
    clients["target"] = np.random.default_rng(0).permutation(clients["target"].to_numpy())
    clients.to_parquet(folder / "clients_train.parquet", index=False)
    invoices.to_parquet(folder / "invoices_train.parquet", index=False)
    out = tmp_path_factory.mktemp("worse")
    train(folder, out, cv_folds=3, n_jobs=1, forest_params={"n_estimators": 15})
    return out


def test_an_equal_challenger_is_promoted(
    tiny_artifacts_dir: Path, evaluation: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    invoices, clients = evaluation
    args = [str(tiny_artifacts_dir), str(tiny_artifacts_dir)]
    assert main(["compare", *args, "--invoices", str(invoices), "--clients", str(clients)]) == 0
    out = capsys.readouterr().out
    assert "promote the challenger" in out and "roc_auc" in out and "precision_top_5pct" in out
    # Top-1% precision is shown without a margin (it does not decide), never as "nan".
    (top1,) = [line for line in out.splitlines() if line.startswith("precision_top_1pct")]
    assert top1.endswith("shown") and "nan" not in out


def test_a_worse_challenger_is_refused_and_a_better_one_promoted(
    tiny_artifacts_dir: Path, worse_dir: Path, evaluation: tuple[Path, Path], tmp_path: Path
) -> None:
    invoices, clients = evaluation
    refused = compare(worse_dir, tiny_artifacts_dir, invoices, clients)
    assert not refused.promote
    assert refused.challenger["roc_auc"] < refused.champion["roc_auc"] - 0.005
    assert any("roc_auc" in r for r in refused.reasons)
    code = main(
        [
            "compare",
            str(worse_dir),
            str(tiny_artifacts_dir),
            "--invoices",
            str(invoices),
            "--clients",
            str(clients),
            "--json",
            str(tmp_path / "c.json"),
        ]
    )
    assert code == 1 and json.loads((tmp_path / "c.json").read_text())["promote"] is False
    promoted = compare(tiny_artifacts_dir, worse_dir, invoices, clients)
    assert promoted.promote and promoted.frauds >= MIN_FRAUD


def test_the_gate_rule() -> None:
    champion = {"roc_auc": 0.88, "pr_auc": 0.40, "precision_top_5pct": 0.49}
    within = {"roc_auc": 0.876, "pr_auc": 0.392, "precision_top_5pct": 0.475}
    assert gate(within, champion, 100)[0] is True
    for metric, value in (("roc_auc", 0.874), ("pr_auc", 0.389), ("precision_top_5pct", 0.469)):
        promote, reasons = gate({**within, metric: value}, champion, 100)
        assert not promote and metric in reasons[0]
    promote, reasons = gate({k: v + 0.1 for k, v in champion.items()}, champion, MIN_FRAUD - 1)
    assert not promote and "confirmed frauds" in reasons[0]


# --- drift ---------------------------------------------------------------------------------------


def test_score_writes_a_summary_with_drift_and_a_shift_is_reported(
    tiny_artifacts_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clients, invoices = make_steg(300, seed=1)  # the data the tiny model learnt from
    same = tmp_path / "same.parquet"
    invoices.to_parquet(same, index=False)
    clients_path = tmp_path / "clients.parquet"
    clients.to_parquet(clients_path, index=False)
    args = ["score", str(same), "--clients", str(clients_path), "--out", str(tmp_path / "same.csv")]
    assert main([*args, "--model-dir", str(tiny_artifacts_dir)]) == 0
    summary = json.loads((tmp_path / "same.summary.json").read_text())
    drift = summary["drift"]
    assert drift["threshold"] == 0.25 and drift["clients"] == summary["clients_scored"]
    assert set(drift["features"]) == set(FEATURE_NAMES)
    assert drift["drifted"] == [], drift
    # Consumption ten times higher and every history starting twenty years later.
    shifted = invoices.copy()
    shifted["consommation_level_1"] = shifted["consommation_level_1"] * 10
    dates = pd.to_datetime(shifted["invoice_date"]) + pd.DateOffset(years=20)
    shifted["invoice_date"] = dates.dt.strftime("%Y-%m-%d")
    moved = tmp_path / "moved.parquet"
    shifted.to_parquet(moved, index=False)
    capsys.readouterr()
    args = ["score", str(moved), "--clients", str(clients_path), "--out", str(tmp_path / "m.csv")]
    assert main([*args, "--model-dir", str(tiny_artifacts_dir)]) == 0
    drift = json.loads((tmp_path / "m.summary.json").read_text())["drift"]
    assert {"first_year", "elec_cons_median"} <= set(drift["drifted"])
    assert drift["features"]["first_year"]["psi"] > 0.25
    assert "drift:" in capsys.readouterr().err


def test_the_api_exports_a_rolling_drift_metric(tiny_artifacts: ArtifactSet) -> None:
    clients, invoices = make_steg(300, seed=2)
    with TestClient(create_app(Settings(), lambda: tiny_artifacts)) as client:
        records = [
            {
                "customer_id": cid,
                "invoices": invoices[invoices["client_id"] == cid]
                .drop(columns="client_id")
                .to_dict("records"),
            }
            for cid in clients["client_id"]
        ]
        assert client.post("/api/predict_batch", json={"records": records}).status_code == 200
        text = client.get("/api/metrics").text
    assert "# TYPE ptd_feature_psi gauge" in text
    assert 'ptd_feature_psi{feature="first_year",model_version="' in text
    assert "# TYPE ptd_features_drifted gauge" in text


# --- the scheduled retraining --------------------------------------------------------------------


def _upload_training(store_env: dict[str, str], container: str, seed: int, shuffle: bool) -> None:
    from detector.store import blob_service_client

    settings = Settings()
    client = blob_service_client(settings, store_env).get_container_client(container)
    if not client.exists():
        client.create_container()
    clients, invoices = make_steg(300, seed=seed)
    if shuffle:
        clients["target"] = np.random.default_rng(1).permutation(clients["target"].to_numpy())
    evaluation_clients, evaluation_invoices = make_steg(400, seed=9)
    evaluation_clients["client_id"] = "e-" + evaluation_clients["client_id"]
    evaluation_invoices["client_id"] = "e-" + evaluation_invoices["client_id"]
    outcomes = pd.DataFrame(
        {"client_id": clients["client_id"][:20], "inspection_date": "2015-06-01", "fraud": 1}
    )
    # Two rows the snapshot must reject: an inspection dated in the future, an unknown client.
    outcomes.loc[20] = ["c00030", "2099-01-01", 1]
    outcomes.loc[21] = ["nobody", "2015-06-01", 1]
    for name, frame in (
        ("latest/clients_train.parquet", clients),
        ("latest/invoices_train.parquet", invoices),
        ("outcomes/2026-11.csv", outcomes),
        ("evaluation/clients.parquet", evaluation_clients),
        ("evaluation/invoices.parquet", evaluation_invoices),
    ):
        data = frame.to_csv(index=False).encode() if name.endswith(".csv") else frame.to_parquet()
        client.upload_blob(name, data, overwrite=True)


def _retrain(tmp_path: Path, azurite: str, models: str, training: str) -> dict[str, str]:
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PTD_", "STORAGE"))},
        "STORAGE": azurite,
        "PTD_MODEL_CONTAINER": models,
        "PTD_TRAINING_CONTAINER": training,
        "PTD": f"{sys.executable} -m detector",
        "TRAIN_ARGS": "--folds 3",
        "WORK": str(tmp_path / "work"),
        "GITHUB_OUTPUT": str(tmp_path / "output"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "PYTHONPATH": str(REPO),
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "retrain.sh")],
        env=environ,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(line.split("=", 1) for line in (tmp_path / "output").read_text().splitlines())


@pytest.mark.azurite
@pytest.mark.xdist_group("azurite")
@pytest.mark.parametrize("shuffle", [False, True], ids=["better", "worse"])
def test_the_retraining_step_promotes_only_what_the_gate_allows(
    tmp_path: Path, azurite: str, worse_dir: Path, tiny_artifacts_dir: Path, shuffle: bool
) -> None:
    env = {"STORAGE": azurite}
    models, training = f"models-{uuid.uuid4().hex[:8]}", f"training-{uuid.uuid4().hex[:8]}"
    store = ModelStore.from_settings(Settings(model_container=models), env)
    # The champion: a useless model when the challenger should win, a good one otherwise.
    champion_dir = tiny_artifacts_dir if shuffle else worse_dir
    champion = store.publish(champion_dir, activate=True)
    _upload_training(env, training, seed=1, shuffle=shuffle)
    outputs = _retrain(tmp_path, azurite, models, training)
    assert outputs["champion"] == champion
    challenger = outputs["challenger"]
    assert challenger in store.versions()  # published either way
    summary = (tmp_path / "summary.md").read_text()
    if shuffle:
        assert outputs["promoted"] == "false"
        assert (store.current() or {})["version"] == champion
        assert "keep the champion" in summary and "Not promoted" in summary
    else:
        assert outputs["promoted"] == "true"
        assert (store.current() or {})["version"] == challenger
        assert "promote the challenger" in summary and "Promoted" in summary
    # The challenger never trained on the evaluation clients.
    trained = json.loads((tmp_path / "work" / "challenger" / "manifest.json").read_text())
    assert "outcomes.parquet" in trained["training_data"]["files"]
    # The outcome rows it used, and the ones the snapshot rejected, are counted.
    taken = json.loads((tmp_path / "work" / "snapshot.json").read_text())
    assert (taken["outcome_rows"], taken["outcome_rows_rejected"]) == (20, 2)
    assert trained["training_data"]["outcomes"]["outcome_rows"] == 20
    assert trained["training_data"]["labelled_clients"] == 300
