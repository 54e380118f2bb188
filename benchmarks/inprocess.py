"""In-process rows: one prediction and batches through `ArtifactSet.score`, beside LightGBM.

The default model is the gradient-boosted one, served by our numpy walker (`CompiledTrees`);
the references are LightGBM's own predictions of the same model (`references.py`): the Python
`Booster.predict` a naive server would call (plain) and the C++ prediction alone, 1 thread
(limit), and `pred_contrib` (TreeSHAP in C++) beside our rows with contributions. Functions
compared in a row are timed in turns on the same inputs (`measure_interleaved`), so their
ratios compare samples taken under the same machine load.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from benchmarks.common import Row, Stats, lat, measure, measure_interleaved, ms, yes_no
from benchmarks.references import PREDICT_CONTRIB, Agreement, LightGBMReference
from detector.model import ArtifactSet, CompiledTrees
from detector.model.trees import _logistic

# Ours must give LightGBM's probabilities as training checks them (pipeline._check_serving);
# the contributions are float32 per node: their sum meets the margin to far less than a reason
# could show (contributions are quoted to 2 or 3 digits).
MAX_DP = 1e-9
MAX_MARGIN_GAP = 1e-4


def _ratio(a: Stats, b: Stats) -> float:
    return a.p50 / b.p50


def times(ratio: float) -> str:
    """A ratio with the digits it deserves: 0.13x, 1.7x, 24x."""
    return f"{ratio:.2f}x" if ratio < 1 else f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def single(
    artifacts: ArtifactSet, ref: LightGBMReference, rows: np.ndarray, cfg: dict[str, Any]
) -> tuple[list[Row], dict[str, Stats]]:
    """One customer at a time, cycling over real rows so that every walk is a different path.

    Ours (probability only, and with contributions as /predict) and LightGBM's C++ single-row
    predict and pred_contrib (1 thread) in turns on the same row: between turns each evicts the
    others' data from the caches, as a server's other work does. `Booster.predict` runs on every
    core, so it is timed in its own turns afterwards: its OpenMP threads keep spinning after a
    call and would take a core from the 1-thread samples that follow.
    """
    singles = [rows[i : i + 1] for i in range(min(len(rows), 512))]
    n = len(singles)
    runs, secs = cfg["single_runs"], cfg["single_seconds"]
    fast, fast_contrib = ref.single(), ref.single(PREDICT_CONTRIB)
    python, python_contrib = ref.python(), ref.python(contributions=True)
    stats = measure_interleaved(
        {
            "ours": lambda k: artifacts.score(singles[k % n], with_contributions=False),
            "ours_explained": lambda k: artifacts.score(singles[k % n]),
            "lgbm": lambda k: fast(singles[k % n][0]),
            "lgbm_contrib": lambda k: fast_contrib(singles[k % n][0]),
        },
        runs=runs,
        warmup=50,
        max_seconds=secs,
    )
    stats |= measure_interleaved(
        {
            "python": lambda k: python(singles[k % n]),
            "python_contrib": lambda k: python_contrib(singles[k % n]),
        },
        runs=runs,
        warmup=50,
        max_seconds=secs,
    )

    def cycling(fn: Callable[[np.ndarray], Any]) -> Callable[[], Any]:
        rows = itertools.cycle(singles)
        return lambda: fn(next(rows))

    # Each alone in a tight loop too: warm caches flatter both, LightGBM's small C++ loop more.
    alone = {
        "ours": measure(
            cycling(lambda r: artifacts.score(r, with_contributions=False)),
            runs=runs,
            warmup=50,
            max_seconds=secs,
        ),
        "lgbm": measure(cycling(lambda r: fast(r[0])), runs=runs, warmup=50, max_seconds=secs),
    }
    data = {k: v.to_dict() for k, v in stats.items()}
    out = [
        Row(
            "in process",
            "single prediction, in process (probability)",
            lat(stats["ours"]),
            plain=lat(stats["python"]),
            limit=lat(stats["lgbm"]),
            ratio=f"{times(_ratio(stats['ours'], stats['lgbm']))} LightGBM C++; "
            f"{times(_ratio(stats['ours'], stats['python']))} Booster.predict",
            goal="none: the ratio to LightGBM C++ is reported",
            note=f"{ref.n_trees} trees. Each alone in a tight loop (warm caches): ours p50 "
            f"{ms(alone['ours'].p50)}, LightGBM C++ p50 {ms(alone['lgbm'].p50)}, "
            f"{times(_ratio(alone['ours'], alone['lgbm']))}",
            data=data,
        ),
        Row(
            "in process",
            "single prediction, in process (+ contributions, as /predict)",
            lat(stats["ours_explained"]),
            plain=f"pred_contrib {lat(stats['python_contrib'])}",
            limit=f"pred_contrib (TreeSHAP) {lat(stats['lgbm_contrib'])}",
            ratio=f"{times(_ratio(stats['ours_explained'], stats['lgbm_contrib']))} LightGBM "
            f"pred_contrib; {times(_ratio(stats['ours_explained'], stats['lgbm']))} its predict",
            note="ours: path contributions (Saabas) of the leaves reached; LightGBM: exact "
            "TreeSHAP, in C++, 1 thread",
            data=data,
        ),
    ]
    return out, stats


def batches(
    artifacts: ArtifactSet, ref: LightGBMReference, rows: np.ndarray, cfg: dict[str, Any]
) -> tuple[list[Row], dict[int, dict[str, Stats]]]:
    """Batches of real rows. In turns on 1 thread: ours with contributions and probability
    only, LightGBM's predict and pred_contrib in C++. Then, in their own turns (see `single`),
    `Booster.predict` and its pred_contrib on every core."""
    out: list[Row] = []
    everything: dict[int, dict[str, Stats]] = {}
    cores = ref.cores
    predict_1, contrib_1 = ref.batch(1), ref.batch(1, PREDICT_CONTRIB)
    predict_n, contrib_n = ref.python(), ref.python(contributions=True)

    def turns(x: np.ndarray) -> tuple[dict[str, Callable[[int], Any]], ...]:
        one_thread: dict[str, Callable[[int], Any]] = {
            "ours": lambda _: artifacts.score(x),
            "ours_prob": lambda _: artifacts.score(x, with_contributions=False),
            "predict_1": lambda _: predict_1(x),
            "contrib_1": lambda _: contrib_1(x),
        }
        every_core: dict[str, Callable[[int], Any]] = {
            "predict_n": lambda _: predict_n(x),
            "contrib_n": lambda _: contrib_n(x),
        }
        return one_thread, every_core

    for size in cfg["batch_sizes"]:
        stats: dict[str, Stats] = {}
        for group in turns(rows[:size]):
            stats |= measure_interleaved(
                group, runs=cfg["batch_runs"], warmup=1, max_seconds=cfg["batch_seconds"]
            )
        everything[size] = stats
        data = {k: v.to_dict() for k, v in stats.items()}
        big = size >= 10_000
        out.append(
            Row(
                "in process",
                f"batch of {size:,} (ArtifactSet.score + contributions)",
                f"{lat(stats['ours'])} ({size / stats['ours'].p50 * 60 / 1e6:.1f} M pred/min)",
                plain=f"pred_contrib, {cores} cores: {lat(stats['contrib_n'])}",
                limit=f"pred_contrib (TreeSHAP) C++ 1 thread: {lat(stats['contrib_1'])}",
                ratio=f"{times(_ratio(stats['ours'], stats['contrib_1']))} pred_contrib-1t; "
                f"{times(_ratio(stats['ours'], stats['contrib_n']))} pred_contrib-{cores}t",
                goal="10k ≤ 1 s" if big else "",
                met=yes_no(stats["ours"].p50 <= 1) if big else "",
                note="ours on 1 thread",
                data=data,
            )
        )
        out.append(
            Row(
                "in process",
                f"batch of {size:,} (ArtifactSet.score, probability only)",
                f"{lat(stats['ours_prob'])} "
                f"({size / stats['ours_prob'].p50 * 60 / 1e6:.1f} M pred/min)",
                plain=f"Booster.predict, {cores} cores: {lat(stats['predict_n'])}",
                limit=f"predict C++ 1 thread: {lat(stats['predict_1'])}",
                ratio=f"{times(_ratio(stats['ours_prob'], stats['predict_1']))} predict-1t; "
                f"{times(_ratio(stats['ours_prob'], stats['predict_n']))} predict-{cores}t",
                note="ours on 1 thread",
                data=data,
            )
        )
    return out, everything


def agreement_row(check: Agreement) -> Row:
    """The agreement of ours with LightGBM as one results row (the figures are in extra too)."""
    ok = check.max_dp <= MAX_DP and check.max_margin_gap <= MAX_MARGIN_GAP
    return Row(
        "in process",
        f"agreement with LightGBM ({check.rows:,} clients)",
        f"max |Δp| {check.max_dp:.1e}; base + Σ contributions vs raw margin "
        f"{check.max_margin_gap:.1e}",
        limit=f"TreeSHAP sums to the margin to {check.max_shap_gap:.1e}",
        goal=f"|Δp| ≤ {MAX_DP:.0e}; margin ≤ {MAX_MARGIN_GAP:.0e}",
        met=yes_no(ok),
        note=f"our top reason is TreeSHAP's top one for {check.top_reason_same:.1%} of the "
        f"{check.explained_rows:,} clients given a reason (in its top 3: "
        f"{check.top_in_shap_top3:.1%}); largest contribution on the same feature: "
        f"{check.top_feature_same:.1%} of all",
        data=check.to_dict(),
    )


def steps(
    artifacts: ArtifactSet, rows: np.ndarray, runs: int, ref: LightGBMReference | None = None
) -> list[tuple[str, float]]:
    """Median time of each step inside `ArtifactSet.score` for one row (the default model),
    each step alone on its own inputs; LightGBM's C++ single-row predict last, for scale."""
    model = artifacts.models[artifacts.default_model]
    card = artifacts.cards[artifacts.default_model]
    if not isinstance(model, CompiledTrees) or card.kind != "lightgbm":
        return []
    x = rows[:1]
    values = np.array(x, dtype=np.float64, copy=True).reshape(-1, x.shape[1])
    expanded = model.expand(values)
    leaves = model._one_row(expanded[0])[None, :]
    margin = model.value[leaves].sum(axis=1) * model.scale
    probability = _logistic(margin)
    cutoffs = np.asarray(card.risk_cutoffs)
    parts: list[tuple[str, Callable[[], Any]]] = [
        (
            "copy the input (float64)",
            lambda: np.array(x, dtype=np.float64, copy=True).reshape(-1, x.shape[1]),
        ),
        (
            f"expand (CompiledTrees.expand: {model.n_columns} columns from {x.shape[1]} "
            "features, NaN rules, category tables)",
            lambda: model.expand(values),
        ),
        (
            f"walk (CompiledTrees._one_row: {model.n_trees} trees, depth ≤ {model.depth})",
            lambda: model._one_row(expanded[0]),
        ),
        (
            "leaf sum + logistic",
            lambda: _logistic(model.value[leaves].sum(axis=1) * model.scale),
        ),
        (
            "contributions (path sums of the leaves)",
            lambda: model.path_contributions[leaves].sum(axis=1, dtype=np.float64),
        ),
        (
            "threshold + risk band",
            lambda: (
                np.searchsorted(cutoffs, probability, side="right"),
                probability >= card.threshold,
            ),
        ),
        ("whole score(), probability only", lambda: artifacts.score(x, with_contributions=False)),
        ("whole score() with contributions", lambda: artifacts.score(x)),
    ]
    if ref is not None:
        fast = ref.single()
        parts.append(("LightGBM C++ single-row predict, 1 thread (reference)", lambda: fast(x[0])))
    return [(name, measure(fn, runs=runs, warmup=20, max_seconds=3).p50) for name, fn in parts]
