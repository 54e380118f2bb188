"""The model card's pictures, drawn from the held-out clients' scores (matplotlib, SVG).

* ROC and precision-recall curves, one line per view (full histories, cut 12 and 24 months);
* a calibration curve: mean predicted probability against the observed fraud rate, per decile;
* a gains chart: inspect the top k% of clients, find y% of the fraud (and the lift over random).

Each SVG carries the model version in its title metadata (`tests/test_docs.py` checks that the
card's pictures are those of the bundled model) and no date, so that a retrain on the same data
draws the same files. Curves are thinned to a few hundred points to keep the files small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VIEW_LABELS = {
    "full": "full history",
    "cut_12m": "cut 12 months back",
    "cut_24m": "cut 24 months back",
}
MAX_POINTS = 300
FILES = ("roc.svg", "precision_recall.svg", "calibration.svg", "gains.svg")


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_POINTS).astype(int))
    return x[keep], y[keep]


def _finish(
    figure: Any, axis: Any, heading: str, legend_at: str, path: Path, what: str, version: str
) -> Path:
    """Title and legend on `axis`, then `figure` written to `path` as SVG with `what` and the
    model version in its title metadata (no date), and closed. Returns `path`."""
    import matplotlib.pyplot as plt

    axis.set_title(heading)
    axis.legend(loc=legend_at)
    figure.tight_layout()
    figure.savefig(
        path,
        format="svg",
        metadata={"Title": f"{what}: model {version}", "Date": None, "Creator": "ptd train"},
    )
    plt.close(figure)
    return path


def write_plots(
    out_dir: Path,
    version: str,
    model: str,
    holdout: dict[str, tuple[np.ndarray, np.ndarray]],
) -> list[Path]:
    """Draw the four pictures of `model` into `out_dir`; `holdout` maps a view name to the
    held-out clients' (labels, scores). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "ptd", "font.size": 9})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    figure, axis = plt.subplots(figsize=(4.6, 4))
    for view, (labels, scores) in holdout.items():
        fpr, tpr, _ = roc_curve(labels, scores)
        axis.plot(*_thin(fpr, tpr), label=VIEW_LABELS.get(view, view))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random")
    axis.set(xlabel="false positive rate", ylabel="true positive rate (recall)")
    written.append(
        _finish(
            figure,
            axis,
            f"ROC, held-out clients ({model})",
            "lower right",
            out_dir / FILES[0],
            "ROC curves",
            version,
        )
    )

    figure, axis = plt.subplots(figsize=(4.6, 4))
    for view, (labels, scores) in holdout.items():
        precision, recall, _ = precision_recall_curve(labels, scores)
        axis.plot(*_thin(recall, precision), label=VIEW_LABELS.get(view, view))
    base = float(np.mean(holdout["full"][0]))
    axis.axhline(base, color="grey", linestyle=":", label=f"random ({base:.1%} fraud)")
    axis.set(xlabel="recall (share of the fraud found)", ylabel="precision (fraud per visit)")
    written.append(
        _finish(
            figure,
            axis,
            f"Precision-recall, held-out clients ({model})",
            "upper right",
            out_dir / FILES[1],
            "Precision-recall curves",
            version,
        )
    )

    labels, scores = holdout["full"]
    figure, axis = plt.subplots(figsize=(4.6, 4))
    order = np.argsort(scores, kind="stable")
    groups = np.array_split(order, 10)
    predicted = [float(scores[g].mean()) for g in groups if len(g)]
    observed = [float(labels[g].mean()) for g in groups if len(g)]
    axis.plot(
        [0, max(predicted + observed)],
        [0, max(predicted + observed)],
        color="grey",
        linestyle=":",
        label="perfect calibration",
    )
    axis.plot(predicted, observed, marker="o", label="deciles of the score")
    axis.set(xlabel="mean predicted probability", ylabel="observed fraud rate")
    written.append(
        _finish(
            figure,
            axis,
            f"Calibration, full histories ({model})",
            "upper left",
            out_dir / FILES[2],
            "Calibration curve",
            version,
        )
    )

    figure, axis = plt.subplots(figsize=(4.6, 4))
    for view, (labels, scores) in holdout.items():
        ranked = labels[np.argsort(-scores, kind="stable")]
        found = np.cumsum(ranked) / max(1, ranked.sum())
        inspected = np.arange(1, len(ranked) + 1) / len(ranked)
        axis.plot(*_thin(inspected * 100, found * 100), label=VIEW_LABELS.get(view, view))
    axis.plot([0, 100], [0, 100], color="grey", linestyle=":", label="random")
    labels, scores = holdout["full"]
    ranked = labels[np.argsort(-scores, kind="stable")]
    for share in (0.05, 0.2):
        k = max(1, int(np.ceil(share * len(ranked))))
        y = 100 * ranked[:k].sum() / max(1, ranked.sum())
        axis.annotate(
            f"top {share:.0%}: {y:.0f}% of the fraud",
            (share * 100, y),
            (share * 100 + 8, y - 12),
            arrowprops={"arrowstyle": "-", "color": "grey"},
        )
    axis.set(xlabel="clients inspected, top of the list (%)", ylabel="fraud found (%)")
    written.append(
        _finish(
            figure,
            axis,
            f"Gains, held-out clients ({model})",
            "lower right",
            out_dir / FILES[3],
            "Gains chart",
            version,
        )
    )
    return written
