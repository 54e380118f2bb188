"""`ptd select-features`: choose the served features from the catalog, on the training split.

The procedure (its output is docs/feature_selection.json; the chosen names are
`features.catalog.SERVED`):

1. Every candidate of the catalog, for every labelled client of the training split (the
   held-out clients of `ptd train` are never read), in three views: the full history and the
   history cut 12 and 24 months before its last invoice.
2. Cross-validated permutation importance (Breiman, "Random forests", 2001; scikit-learn's
   `permutation_importance` does the same per feature): in each fold a gradient-boosted model
   learns from all views of the fold's training clients; on the held-out fold, in each view,
   each candidate's values are shuffled and the fall in ROC-AUC is its importance. Averaging
   over the three views ranks what helps *before* an inspection as much as after.
3. Near-duplicates dropped: walking down the ranking, a candidate whose Spearman rank
   correlation with one already kept exceeds 0.95 (on the training split's full histories) is
   dropped, so that two names for one signal do not fill the served set.
4. The top 20 to 50 are cross-validated like `ptd train`'s candidates; the served size is the
   smallest whose mean ROC-AUC over the two cut views is within 0.001 of the best size's (more
   features cost serving time and explain no better once the cut views stop improving).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from detector.features import CANDIDATES
from detector.features.views import EVALUATION_CUTS, view_name
from detector.training.data import load_labelled
from detector.training.pipeline import CV_FOLDS, SEED, STRATEGIES, Trainer

log = logging.getLogger(__name__)

DUPLICATE_CORRELATION = 0.95
SIZES = (20, 25, 30, 35, 40, 50)
SIZE_TOLERANCE = 0.001  # of mean cut-view ROC-AUC: below it, a larger set is not better


def choose_size(by_size: dict[str, Any]) -> int:
    """The smallest size whose mean cut-view ROC-AUC is within SIZE_TOLERANCE of the best."""

    def prospective(views: dict[str, Any]) -> float:
        cuts = [views[view_name(m)]["roc_auc"] for m in EVALUATION_CUTS if m]
        return float(np.mean(cuts))

    best = max(prospective(views) for views in by_size.values())
    return min(
        int(size) for size, views in by_size.items() if prospective(views) >= best - SIZE_TOLERANCE
    )


IMPORTANCE_ROUNDS = 300  # trees of the models that rank the candidates (no early stopping)


def select_features(
    data_dir: Path,
    seed: int = SEED,
    cv_folds: int = CV_FOLDS,
    n_jobs: int = -1,
    sizes: tuple[int, ...] = SIZES,
) -> dict[str, Any]:
    """Rank every candidate, drop near-duplicates, cross-validate the top `sizes`; the report
    (JSON-ready) names the chosen size's top candidates as `chosen` (`choose_size`)."""
    from sklearn.metrics import roc_auc_score

    started = time.perf_counter()
    data = load_labelled(Path(data_dir))
    names = tuple(spec.name for spec in CANDIDATES)
    trainer = Trainer(data, seed, cv_folds, n_jobs, names)
    full_train = trainer.views[0].loc[trainer.split.train]
    usable = [
        name
        for name in names
        if full_train[name].notna().any() and full_train[name].nunique(dropna=True) > 1
    ]
    log.info("%d of %d candidates vary on the training split", len(usable), len(names))

    importance = pd.Series(0.0, index=usable)
    rng = np.random.default_rng(seed)
    for k, (fit_clients, test_clients) in enumerate(trainer.folds()):
        model = trainer.fit(
            "lightgbm",
            fit_clients,
            STRATEGIES["augmented"],
            None,
            rounds=IMPORTANCE_ROUNDS,
            columns=usable,
        )
        for m in EVALUATION_CUTS:
            x, y = trainer.rows(test_clients, (m,), usable)
            base = roc_auc_score(y, model.predict(x, trainer.prep))
            for name in usable:
                shuffled = x.copy()
                shuffled[name] = rng.permutation(shuffled[name].to_numpy())
                drop = base - roc_auc_score(y, model.predict(shuffled, trainer.prep))
                importance[name] += drop / (cv_folds * len(EVALUATION_CUTS))
        log.info("permutation importance: fold %d of %d done", k + 1, cv_folds)
    importance = importance.sort_values(ascending=False, kind="stable")

    correlation = full_train[usable].rank().corr().abs()
    kept: list[str] = []
    duplicate_of: dict[str, str] = {}
    for name in importance.index:
        twin = next((k for k in kept if correlation.loc[name, k] > DUPLICATE_CORRELATION), None)
        if twin is None:
            kept.append(name)
        else:
            duplicate_of[name] = twin

    by_size: dict[str, Any] = {}
    for size in sizes:
        result = trainer.cross_validate("lightgbm", "augmented", None, columns=kept[:size])
        by_size[str(size)] = result.views
    chosen_size = choose_size(by_size)
    return {
        "method": __doc__,
        "seed": seed,
        "folds": cv_folds,
        "train_clients": len(trainer.split.train),
        "candidates": len(names),
        "usable_candidates": len(usable),
        "ranking": [
            {
                "feature": name,
                "importance_roc_auc_drop": round(float(importance[name]), 6),
                "duplicate_of": duplicate_of.get(name),
            }
            for name in importance.index
        ],
        "cross_validation_by_size": by_size,
        "size_rule": f"the smallest size within {SIZE_TOLERANCE} of the best mean ROC-AUC over "
        "the cut views",
        "chosen_size": chosen_size,
        "chosen": kept[:chosen_size],
        "seconds": round(time.perf_counter() - started, 1),
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as docs/FEATURE_SELECTION.md."""
    lines = [
        "# Feature selection",
        "",
        "Generated by `ptd select-features --data ../shared/data/steg --out "
        "docs/feature_selection.json --markdown docs/FEATURE_SELECTION.md` (the JSON holds the "
        f"same figures). {report['usable_candidates']} of {report['candidates']} candidate "
        f"features vary on the {report['train_clients']:,} clients of the training split; the "
        "held-out clients are never read.",
        "",
        "## Cross-validated size of the served set",
        "",
        f"LightGBM trained on all three views of each client, {report['folds']}-fold CV; "
        f"ROC-AUC (precision in the top 5%) per view. Served: {report['size_rule']}.",
        "",
        "| features | " + " | ".join(view_name(m) for m in EVALUATION_CUTS) + " |",
        "|---" * (len(EVALUATION_CUTS) + 1) + "|",
    ]
    for size, views in report["cross_validation_by_size"].items():
        per_view = [views[view_name(m)] for m in EVALUATION_CUTS]
        cells = [f"{v['roc_auc']:.4f} ({v['precision_top_5pct']:.3f})" for v in per_view]
        marker = " (served)" if int(size) == report["chosen_size"] else ""
        lines.append(f"| {size}{marker} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Ranking",
        "",
        "Mean fall in ROC-AUC when the feature is shuffled (over folds and views). Served "
        "features are in bold; a near-duplicate names the feature it duplicates.",
        "",
        "| rank | feature | importance | near-duplicate of |",
        "|---|---|---|---|",
    ]
    chosen = set(report["chosen"])
    for rank, entry in enumerate(report["ranking"], start=1):
        name = entry["feature"]
        shown = f"**{name}**" if name in chosen else name
        twin = entry["duplicate_of"] or ""
        lines.append(f"| {rank} | {shown} | {entry['importance_roc_auc_drop']:.5f} | {twin} |")
    return "\n".join(lines) + "\n"


__all__ = ["markdown", "select_features"]
