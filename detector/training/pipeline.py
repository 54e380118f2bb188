"""`ptd train`: candidates cross-validated on three views, the shipped models, the artifact set.

Everything is decided on the training split only. The held-out clients (20%, all of a client's
invoices on one side) are scored once, at the end, for the report.

1. Features of every labelled client in three views: the full history and the history cut 12
   and 24 months before its last invoice (`features.views`).
2. Candidates: each model family trained on full histories only, or on all three views of each
   client (augmentation: the model sees what a history looked like before its end). Each is
   cross-validated (stratified, per client) and scored on the held-out fold in each view.
3. The cut views decide: per family, the training strategy with the better mean ROC-AUC over
   the two cut views is shipped.
4. The decision threshold (best F1) and the risk bands come from that candidate's out-of-fold
   predictions on full histories; the shipped model is refitted on the whole training split.
5. The artifact set: arrays for serving, the training library's own files as references, the
   feature metadata, the results and a manifest with every file's SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detector import __version__
from detector.drift import fit_reference
from detector.features import FEATURE_NAMES, FEATURES
from detector.features.views import EVALUATION_CUTS, view_name
from detector.model import (
    CONTRIBUTION_METHODS,
    FEATURES_FILE,
    MANIFEST,
    RESULTS_FILE,
    SCALER_FILE,
    ArtifactSet,
    CompiledLogistic,
    ModelError,
    sha256_file,
)
from detector.model.trees import from_lightgbm, from_sklearn_forest
from detector.schema import InputError
from detector.training.data import LabelledData, load_labelled
from detector.training.learners import FOREST_PARAMS, Fitted, Preprocessing, fit, params_of
from detector.training.metrics import best_f1_threshold, evaluate, ranking, summarise

log = logging.getLogger(__name__)

SEED = 20_261_127
HOLDOUT_SHARE = 0.2
CV_FOLDS = 5
EARLY_STOPPING_SHARE = 0.15  # of each fit's clients, held out to stop a boosted model's growth
MODEL_KINDS = ("lightgbm", "random_forest", "logistic_regression")
DEFAULT_MODEL = "lightgbm"
# Training strategies: which views of each training client a model learns from.
STRATEGIES: dict[str, tuple[int, ...]] = {"full": (0,), "augmented": EVALUATION_CUTS}
RISK_QUANTILES = (0.80, 0.95, 0.99)  # elevated: top 20%, high: top 5%, critical: top 1%
THRESHOLD_METHOD = "maximises F1 on out-of-fold predictions of the training split"
RISK_BANDS = "elevated: top 20%, high: top 5%, critical: top 1% of out-of-fold scores"


@dataclass
class Split:
    """Client ids of the training split and of the held-out split, with their labels."""

    train: pd.Index
    holdout: pd.Index


@dataclass
class CandidateResult:
    """Cross-validation of one (family, strategy): metrics per view and the full-view OOF."""

    kind: str
    strategy: str
    views: dict[str, dict[str, float]]
    out_of_fold: pd.Series  # full-view out-of-fold score per training client
    rounds: list[int]
    seconds: float

    @property
    def prospective_auc(self) -> float:
        """Mean ROC-AUC over the cut views: what decides between strategies."""
        cuts = [self.views[view_name(m)]["roc_auc"] for m in EVALUATION_CUTS if m]
        return float(np.mean(cuts))


def split_clients(labels: pd.Series, seed: int) -> Split:
    """The held-out split: HOLDOUT_SHARE of the clients, stratified by label, seeded. Training
    and feature selection use this same function, so selection never sees the held-out clients.
    """
    from sklearn.model_selection import train_test_split

    ids = labels.index
    train_idx, test_idx = train_test_split(
        np.arange(len(ids)), test_size=HOLDOUT_SHARE, stratify=labels.to_numpy(), random_state=seed
    )
    return Split(ids[np.sort(train_idx)], ids[np.sort(test_idx)])


class Trainer:
    """Holds the data, the split and the preprocessing while candidates are trained.

    `names` are the feature columns (the served set by default; feature selection passes every
    candidate)."""

    def __init__(
        self,
        data: LabelledData,
        seed: int,
        cv_folds: int,
        n_jobs: int,
        names: tuple[str, ...] = FEATURE_NAMES,
    ) -> None:
        self.data = data
        self.seed = seed
        self.cv_folds = cv_folds
        self.n_jobs = n_jobs
        self.views = {m: data.features(m, names) for m in EVALUATION_CUTS}
        self.split = split_clients(data.labels.reindex(self.views[0].index), seed)
        self.prep = Preprocessing.fit(self.views[0].loc[self.split.train])

    def rows(
        self, clients: pd.Index, months: tuple[int, ...], columns: list[str] | None = None
    ) -> tuple[pd.DataFrame, np.ndarray]:
        """Feature rows of these clients in these views (a client may give one row per view)."""
        frames = []
        for m in months:
            view = self.views[m]
            rows = view.loc[view.index.intersection(clients)]
            frames.append(rows if columns is None else rows[columns])
        frame = pd.concat(frames) if len(frames) > 1 else frames[0]
        return frame, self.data.labels.reindex(frame.index).to_numpy()

    def fit(
        self,
        kind: str,
        clients: pd.Index,
        months: tuple[int, ...],
        params: dict[str, Any] | None,
        rounds: int | None = None,
        fold: int = 0,
        columns: list[str] | None = None,
    ) -> Fitted:
        if kind == "random_forest":
            # Leaves of at least `min_samples_leaf` *clients*: a client gives one row per view.
            leaf = (params or {}).get("min_samples_leaf", FOREST_PARAMS["min_samples_leaf"])
            params = {**(params or {}), "min_samples_leaf": leaf * len(months)}
        if kind != "lightgbm" or rounds is not None:
            x, y = self.rows(clients, months, columns)
            return fit(kind, x, y, self.prep, self.seed, self.n_jobs, params, rounds)
        # Early stopping on clients of this fit only (never the fold being evaluated).
        rng = np.random.default_rng(self.seed + fold)
        stop = rng.random(len(clients)) < EARLY_STOPPING_SHARE
        x, y = self.rows(clients[~stop], months, columns)
        valid = self.rows(clients[stop], months, columns)
        return fit(kind, x, y, self.prep, self.seed, self.n_jobs, params, valid=valid)

    def folds(self) -> list[tuple[pd.Index, pd.Index]]:
        """(fit clients, evaluated clients) of each cross-validation fold of the training split."""
        from sklearn.model_selection import StratifiedKFold

        clients = self.split.train
        labels = self.data.labels.reindex(clients).to_numpy()
        splitter = StratifiedKFold(n_splits=self.cv_folds, shuffle=True, random_state=self.seed)
        return [(clients[a], clients[b]) for a, b in splitter.split(np.zeros(len(clients)), labels)]

    def cross_validate(
        self,
        kind: str,
        strategy: str,
        params: dict[str, Any] | None,
        columns: list[str] | None = None,
    ) -> CandidateResult:
        started = time.perf_counter()
        per_view: dict[str, list[dict[str, float]]] = {view_name(m): [] for m in EVALUATION_CUTS}
        out_of_fold = pd.Series(np.nan, index=self.split.train)
        rounds: list[int] = []
        for k, (fit_clients, test_clients) in enumerate(self.folds()):
            model = self.fit(
                kind, fit_clients, STRATEGIES[strategy], params, fold=k, columns=columns
            )
            if model.rounds is not None:
                rounds.append(model.rounds)
            for m in EVALUATION_CUTS:
                x, y = self.rows(test_clients, (m,), columns)
                scores = model.predict(x, self.prep)
                per_view[view_name(m)].append(ranking(y, scores))
                if m == 0:
                    out_of_fold[x.index] = scores
        seconds = time.perf_counter() - started
        views = {name: summarise(folds_) for name, folds_ in per_view.items()}
        log.info(
            "CV %s/%s: %s (%.0f s)",
            kind,
            strategy,
            ", ".join(f"{v} ROC-AUC {views[v]['roc_auc']:.4f}" for v in views),
            seconds,
        )
        return CandidateResult(kind, strategy, views, out_of_fold, rounds, seconds)


def _holdout_report(
    trainer: Trainer, model: Fitted, threshold: float
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Metrics per view on the held-out clients, and their (labels, scores) for the plots."""
    report, scored = {}, {}
    for m in EVALUATION_CUTS:
        x, y = trainer.rows(trainer.split.holdout, (m,))
        scores = model.predict(x, trainer.prep)
        report[view_name(m)] = evaluate(y, scores, threshold) if m == 0 else ranking(y, scores)
        scored[view_name(m)] = (y, scores)
    return report, scored


def train(
    data_dir: Path,
    out_dir: Path,
    seed: int = SEED,
    cv_folds: int = CV_FOLDS,
    n_jobs: int = -1,
    forest_params: dict[str, Any] | None = None,
    boosting_params: dict[str, Any] | None = None,
    baseline: Path | None = None,
    strategies: tuple[str, ...] = tuple(STRATEGIES),
    plots: Path | None = None,
) -> dict[str, Any]:
    """Train every family, write the artifact set to `out_dir`, return training_results.

    `baseline` is a JSON file with the figures of the model this one replaces (copied into the
    results, for the model card's side-by-side table); `plots`, a folder for the model card's
    pictures of the default model (training.plots). Raises InputError when the data cannot
    train (missing tables, too few clients of a label for the folds), ModelError when the set
    would not pass serving's validation (nothing is written then).
    """
    started = time.perf_counter()
    data = load_labelled(Path(data_dir))
    counts = np.bincount(data.labels.to_numpy(), minlength=2)
    if len(counts) != 2 or counts.min() < cv_folds * 2:
        raise InputError(
            f"{data_dir}: need at least {cv_folds * 2} clients of each label to train "
            f"and cross-validate (have {counts.tolist()})"
        )
    trainer = Trainer(data, seed, cv_folds, n_jobs)
    features_seconds = time.perf_counter() - started
    params = {"lightgbm": boosting_params, "random_forest": forest_params}

    candidates: list[CandidateResult] = [
        trainer.cross_validate(kind, strategy, params.get(kind))
        for kind in MODEL_KINDS
        for strategy in strategies
    ]
    results: dict[str, Any] = {"models": {}, "candidates": []}
    shipped: dict[str, tuple[Fitted, CandidateResult, float, list[float]]] = {}
    holdout_scores: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for kind in MODEL_KINDS:
        mine = [c for c in candidates if c.kind == kind]
        chosen = max(mine, key=lambda c: (c.prospective_auc, c.strategy == "augmented"))
        model_started = time.perf_counter()
        oof = chosen.out_of_fold.dropna()
        y_oof = data.labels.reindex(oof.index).to_numpy()
        threshold = best_f1_threshold(y_oof, oof.to_numpy())
        cutoffs = [float(np.quantile(oof.to_numpy(), q)) for q in RISK_QUANTILES]
        rounds = round(float(np.mean(chosen.rounds))) if chosen.rounds else None
        final = trainer.fit(
            kind, trainer.split.train, STRATEGIES[chosen.strategy], params.get(kind), rounds
        )
        shipped[kind] = (final, chosen, threshold, cutoffs)
        holdout, holdout_scores[kind] = _holdout_report(trainer, final, threshold)
        results["models"][kind] = {
            "params": params_of(final),
            "training_views": [view_name(m) for m in STRATEGIES[chosen.strategy]],
            "strategy": chosen.strategy,
            "cross_validation": {
                "folds": cv_folds,
                "views": chosen.views,
                "out_of_fold": evaluate(y_oof, oof.to_numpy(), threshold),
            },
            "holdout": holdout,
            "train_seconds": round(time.perf_counter() - model_started + chosen.seconds, 1),
        }
        log.info(
            "trained %s (%s): holdout ROC-AUC %s",
            kind,
            chosen.strategy,
            ", ".join(
                f"{v} {r['roc_auc']:.4f}" for v, r in results["models"][kind]["holdout"].items()
            ),
        )
    for candidate in candidates:
        results["candidates"].append(
            {
                "model": candidate.kind,
                "strategy": candidate.strategy,
                "training_views": [view_name(m) for m in STRATEGIES[candidate.strategy]],
                "shipped": shipped[candidate.kind][1] is candidate,
                "cross_validation": candidate.views,
                "seconds": round(candidate.seconds, 1),
            }
        )
    written = _publish_locally(
        Path(out_dir),
        lambda staging: _write(
            staging, trainer, shipped, results, started, features_seconds, baseline
        ),
    )
    if plots is not None:
        from detector.training.plots import write_plots

        write_plots(
            Path(plots), written["model_version"], DEFAULT_MODEL, holdout_scores[DEFAULT_MODEL]
        )
    return written


def _publish_locally(out_dir: Path, write: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Write the set into a staging folder beside `out_dir`, validate it as serving and
    publishing will (`ArtifactSet`, and the served probabilities against the training
    library's), and only then replace the set in `out_dir`: a set that fails is never written
    where it could be served or published (the staging folder is removed)."""
    import shutil
    import tempfile

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-staging-", dir=out_dir.parent))
    try:
        results = write(staging)
        out_dir.mkdir(parents=True, exist_ok=True)
        old = out_dir / MANIFEST
        stale: set[str] = set()
        if old.is_file():
            try:
                stale = set(json.loads(old.read_text()).get("files", {}))
            except (json.JSONDecodeError, AttributeError):
                stale = set()
        new = {path.name for path in staging.iterdir()}
        for name in sorted(stale - new):
            (out_dir / name).unlink(missing_ok=True)
        for name in [*sorted(new - {MANIFEST}), MANIFEST]:  # the manifest last
            shutil.move(staging / name, out_dir / name)
        return results
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write(
    out_dir: Path,
    trainer: Trainer,
    shipped: dict[str, tuple[Fitted, CandidateResult, float, list[float]]],
    results: dict[str, Any],
    started: float,
    features_seconds: float,
    baseline: Path | None,
) -> dict[str, Any]:
    import joblib
    import lightgbm
    import sklearn

    out_dir.mkdir(parents=True, exist_ok=True)
    prep = trainer.prep
    np.savez_compressed(out_dir / SCALER_FILE, mean=prep.mean, scale=prep.scale)
    content = hashlib.sha256()
    manifest_models: dict[str, Any] = {}
    for kind, (fitted, _, threshold, cutoffs) in shipped.items():
        if kind == "lightgbm":
            arrays = from_lightgbm(fitted.model)
            reference = f"{kind}.txt"
            fitted.model.save_model(str(out_dir / reference))
        elif kind == "random_forest":
            arrays = from_sklearn_forest(fitted.model)
            reference = f"{kind}.joblib"
            joblib.dump(fitted.model, out_dir / reference, compress=3)
        else:
            arrays = CompiledLogistic.from_sklearn(fitted.model)
            reference = f"{kind}.joblib"
            joblib.dump(fitted.model, out_dir / reference, compress=3)
        np.savez_compressed(out_dir / f"{kind}.npz", **arrays)  # type: ignore[arg-type]
        for key in sorted(arrays):
            content.update(arrays[key].tobytes())
        manifest_models[kind] = {
            "kind": kind,
            "serving_file": f"{kind}.npz",
            "reference_file": reference,
            "threshold": threshold,
            "threshold_method": THRESHOLD_METHOD,
            "risk_cutoffs": cutoffs,
            "risk_bands": RISK_BANDS,
            "contributions": CONTRIBUTION_METHODS[kind],
        }
    full = trainer.views[0].loc[trainer.split.train].to_numpy(dtype=np.float64)
    typical = np.nanmedian(full, axis=0)
    references = [
        fit_reference(spec.name, spec.kind, full[:, i]) for i, spec in enumerate(FEATURES)
    ]
    features_meta = {
        "features": [
            {
                **spec.to_dict(),
                "fill_value": float(fill),
                # The typical client: the median, or for a categorical code the most common one.
                "typical": float(fill if spec.kind == "categorical" else med),
                # The training split's distribution, for drift (detector.drift).
                "reference": reference.to_dict(),
            }
            for spec, fill, med, reference in zip(
                FEATURES, prep.fill_values, typical, references, strict=True
            )
        ],
        "missing": "the gradient-boosted model reads a missing value as unknown; the random "
        "forest and the logistic regression replace it by fill_value (the training split's "
        "median, or most common code)",
    }
    (out_dir / FEATURES_FILE).write_text(json.dumps(features_meta, indent=2) + "\n")
    # The version names what is served: the arrays, the feature metadata, thresholds and bands.
    content.update((out_dir / FEATURES_FILE).read_bytes())
    content.update(json.dumps(manifest_models, sort_keys=True).encode())
    created = datetime.now(UTC)
    version = f"{created:%Y%m%d}-{content.hexdigest()[:10]}"
    data = trainer.data
    results.update(
        {
            "model_version": version,
            "trained_at": created.isoformat(timespec="seconds"),
            "data": {**data.summary, "fingerprint_sha256": data.fingerprint},
            "split": {
                "method": "stratified by label, per client: all of its invoices on one side",
                "holdout_share": HOLDOUT_SHARE,
                "train_clients": len(trainer.split.train),
                "holdout_clients": len(trainer.split.holdout),
                "seed": trainer.seed,
            },
            "views": {
                view_name(m): {
                    "months_cut": m,
                    "train_clients": int(trainer.views[m].index.isin(trainer.split.train).sum()),
                    "holdout_clients": int(
                        trainer.views[m].index.isin(trainer.split.holdout).sum()
                    ),
                }
                for m in EVALUATION_CUTS
            },
            "default_model": DEFAULT_MODEL,
            "selection_rule": "per model, the training strategy with the higher mean "
            "cross-validated ROC-AUC over the cut views is shipped",
            "features_seconds": round(features_seconds, 1),
            "total_seconds": round(time.perf_counter() - started, 1),
        }
    )
    if baseline is not None:
        results["baseline"] = json.loads(Path(baseline).read_text())
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    files = sorted(
        [SCALER_FILE, FEATURES_FILE, RESULTS_FILE]
        + [f"{kind}.npz" for kind in shipped]
        + [entry["reference_file"] for entry in manifest_models.values()]
    )
    manifest = {
        "model_version": version,
        "created_at": results["trained_at"],
        "default_model": DEFAULT_MODEL,
        "feature_names": list(FEATURE_NAMES),
        "models": manifest_models,
        "training_data_fingerprint": data.fingerprint,
        "training_data": {
            key: data.summary[key]
            for key in ("files", "invoice_dates", "labelled_clients", "fraud_rate", "outcomes")
            if key in data.summary
        },
        "libraries": {
            "python": platform.python_version(),
            "detector": __version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
            "scikit-learn": sklearn.__version__,
            "lightgbm": lightgbm.__version__,
            "joblib": joblib.__version__,
        },
        "files": {name: sha256_file(out_dir / name) for name in files},
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    # The set must load and score as serving will: the arrays against the training library.
    _check_serving(out_dir, trainer, shipped)
    return results


def _check_serving(
    out_dir: Path,
    trainer: Trainer,
    shipped: dict[str, tuple[Fitted, CandidateResult, float, list[float]]],
) -> None:
    """The set must pass the validation that publishing and every cold start apply
    (`ArtifactSet`: checksums, finite numbers in range, shapes, trees), and serving's compiled
    models must give the training library's probabilities (1e-9). Raises ModelError."""
    artifacts = ArtifactSet(out_dir)
    sample = trainer.views[0].loc[trainer.split.holdout[:2000]]
    for kind, (fitted, *_) in shipped.items():
        served = artifacts.score(sample.to_numpy(dtype=np.float64), kind, False).probability
        reference = fitted.predict(sample, trainer.prep)
        worst = float(np.max(np.abs(served - reference))) if len(sample) else 0.0
        if not worst <= 1e-9:  # NaN too
            raise ModelError(f"{kind}: served probabilities differ from training by {worst:.2e}")
