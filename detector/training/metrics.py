"""Metrics a utility reads: ranking quality, precision among the top-scored, calibration.

ROC-AUC and PR-AUC (average precision) are scikit-learn's; precision at k is the share of
confirmed fraud among the k% highest scores (what an inspector finds knocking on those doors).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def precision_at_top(labels: np.ndarray, scores: np.ndarray, share: float) -> float:
    """Fraud rate among the `share` (0..1) highest scores; ties keep the input order."""
    count = max(1, int(np.ceil(share * len(scores))))
    top = np.argsort(-scores, kind="stable")[:count]
    return float(labels[top].mean())


def ranking(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC-AUC, PR-AUC and precision in the top 1% and 5%: threshold-free, comparable."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "clients": len(labels),
        "fraud_rate": round(float(labels.mean()), 5),
        "roc_auc": round(float(roc_auc_score(labels, scores)), 5),
        "pr_auc": round(float(average_precision_score(labels, scores)), 5),
        "precision_top_1pct": round(precision_at_top(labels, scores, 0.01), 5),
        "precision_top_5pct": round(precision_at_top(labels, scores, 0.05), 5),
    }


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Brier score, expected calibration error and a reliability table over equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        in_bin = which == b
        if not in_bin.any():
            continue
        predicted, observed = float(scores[in_bin].mean()), float(labels[in_bin].mean())
        ece += in_bin.mean() * abs(predicted - observed)
        table.append(
            {
                "bin": f"{edges[b]:.1f}-{edges[b + 1]:.1f}",
                "clients": int(in_bin.sum()),
                "mean_predicted": round(predicted, 4),
                "observed_rate": round(observed, 4),
            }
        )
    brier = float(np.mean((scores - labels) ** 2))
    return {"brier": round(brier, 5), "ece": round(float(ece), 5), "reliability": table}


def evaluate(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """`ranking`, plus what the decision threshold does, plus calibration."""
    flagged = scores >= threshold
    true_positive = int((flagged & (labels == 1)).sum())
    return {
        **ranking(labels, scores),
        "threshold": round(threshold, 6),
        "flagged_rate": round(float(flagged.mean()), 5),
        "precision_at_threshold": round(true_positive / max(1, int(flagged.sum())), 5),
        "recall_at_threshold": round(true_positive / max(1, int(labels.sum())), 5),
        "calibration": calibration(labels, scores),
    }


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score cut-off that maximises F1 on the given (out-of-fold) predictions."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(thresholds[int(np.argmax(f1[:-1]))])


def summarise(folds: list[dict[str, float]]) -> dict[str, float]:
    """Mean and standard deviation over folds of each ranking metric."""
    out: dict[str, float] = {}
    for key in ("roc_auc", "pr_auc", "precision_top_1pct", "precision_top_5pct"):
        values = [fold[key] for fold in folds]
        out[key] = round(float(np.mean(values)), 5)
        out[f"{key}_std"] = round(float(np.std(values)), 5)
    out["clients"] = int(np.mean([fold["clients"] for fold in folds]))
    return out
