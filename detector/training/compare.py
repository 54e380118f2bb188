"""`ptd compare`: champion/challenger on the same labelled clients, and the promotion gate.

Both artifact sets score the same clients with the same features (computed once, by the code
both must match); the labels come from the clients' `target` and/or an outcomes table
(histories cut at the inspection, as in training). The gate promotes the challenger when it is
not worse than the champion beyond a stated margin on any metric a utility acts on:

* ROC-AUC (the whole ranking) by no more than 0.005,
* PR-AUC (finding fraud among few) by no more than 0.01,
* precision in the top 5% (fraud found per inspection, at a typical budget) by no more than 0.02,

and when the evaluation set holds at least MIN_FRAUD confirmed frauds (fewer cannot tell two
models apart). The margins are about one standard deviation of these metrics between
cross-validation folds of the STEG data (docs/MODEL_CARD.md): a challenger within noise of the
champion is promoted, since it learnt from newer data. Precision in the top 1% is reported but
does not decide: on a few hundred clients it moves by several points from noise alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from detector.model import ArtifactSet
from detector.schema import InputError
from detector.training.data import load_labelled_files
from detector.training.metrics import ranking

MARGINS = {"roc_auc": 0.005, "pr_auc": 0.01, "precision_top_5pct": 0.02}
REPORTED = ("roc_auc", "pr_auc", "precision_top_1pct", "precision_top_5pct")
MIN_FRAUD = 30


@dataclass
class Comparison:
    """Both models' metrics on the same clients, and the gate's decision with its reasons."""

    challenger: dict[str, Any]
    champion: dict[str, Any]
    clients: int
    frauds: int
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "challenger": self.challenger,
            "champion": self.champion,
            "clients": self.clients,
            "frauds": self.frauds,
            "margins": MARGINS,
            "min_fraud": MIN_FRAUD,
            "promote": self.promote,
            "reasons": self.reasons,
        }

    def table(self) -> str:
        lines = [
            f"{'metric':<22}{'challenger':>12}{'champion':>12}{'margin':>9}",
            *(
                f"{name:<22}{self.challenger[name]:>12.4f}{self.champion[name]:>12.4f}"
                # A metric without a margin is shown, not gated (too noisy on a few hundred).
                + (f"{MARGINS[name]:>9.3f}" if name in MARGINS else f"{'shown':>9}")
                for name in REPORTED
            ),
            f"{self.clients:,} clients, {self.frauds:,} confirmed frauds",
            f"{'promote the challenger' if self.promote else 'keep the champion'}: "
            + "; ".join(self.reasons),
        ]
        return "\n".join(lines)


def gate(
    challenger: dict[str, Any], champion: dict[str, Any], frauds: int
) -> tuple[bool, list[str]]:
    """The promotion rule (module docstring): (promote, the reasons)."""
    reasons = []
    if frauds < MIN_FRAUD:
        return False, [f"only {frauds} confirmed frauds to compare on (at least {MIN_FRAUD})"]
    worse = [
        f"{name} {challenger[name]:.4f} is more than {margin} below the champion's "
        f"{champion[name]:.4f}"
        for name, margin in MARGINS.items()
        if challenger[name] < champion[name] - margin
    ]
    if worse:
        return False, worse
    reasons.append(
        "no metric worse than the champion's beyond its margin ("
        + ", ".join(f"{name} {challenger[name] - champion[name]:+.4f}" for name in MARGINS)
        + ")"
    )
    return True, reasons


def compare(
    challenger_dir: Path,
    champion_dir: Path,
    invoices: Path,
    clients: Path,
    outcomes: Path | None = None,
    model: str | None = None,
) -> Comparison:
    """Score both sets on the labelled clients and apply the gate. Raises ModelError when a set
    cannot be loaded (or was trained on other features than this code computes), InputError
    when the data carries no labels."""
    challenger_set = ArtifactSet(Path(challenger_dir))
    champion_set = ArtifactSet(Path(champion_dir))
    data = load_labelled_files(Path(clients), Path(invoices), Path(outcomes) if outcomes else None)
    features = data.features(0)
    if not len(features):
        raise InputError("no labelled client with an invoice to compare on")
    labels = data.labels.reindex(features.index).to_numpy()
    values = features.to_numpy(dtype=np.float64)
    metrics: list[dict[str, Any]] = []
    for artifacts in (challenger_set, champion_set):
        scores = artifacts.score(values, model, with_contributions=False).probability
        metrics.append(
            {
                **ranking(labels, scores),
                "model": artifacts.resolve(model),
                "model_version": artifacts.version,
            }
        )
    frauds = int(labels.sum())
    promote, reasons = gate(metrics[0], metrics[1], frauds)
    return Comparison(metrics[0], metrics[1], len(labels), frauds, promote, reasons)
