"""In-process rows: one prediction and batches through `ArtifactSet.score`, with references."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from benchmarks.common import Row, Stats, lat, measure, measure_interleaved, ms, yes_no
from benchmarks.references import References
from detector.model import ArtifactSet


def _agree(ours: np.ndarray, other: np.ndarray) -> float:
    return float(np.max(np.abs(ours - other)))


def single(
    artifacts: ArtifactSet, refs: References, rows: np.ndarray, cfg: dict[str, Any]
) -> tuple[list[Row], dict[str, Stats]]:
    """One customer at a time, cycling over real rows so that every walk is a different path."""
    singles = [rows[i : i + 1] for i in range(min(len(rows), 512))]
    runs, secs = cfg["single_runs"], cfg["single_seconds"]
    sk, ox = refs.sklearn(), refs.onnx(threads=1)
    n = len(singles)
    # Ours and ONNX in turns on the same row: their ratio is then immune to the machine's load
    # changing between two separate runs (sklearn, 200x slower, is timed on its own). Between
    # turns each evicts the other's data from the caches, as a server's other work does.
    stats = measure_interleaved(
        {
            "ours": lambda k: artifacts.score(singles[k % n], with_contributions=False),
            "ours_explained": lambda k: artifacts.score(singles[k % n], with_contributions=True),
            "onnx": lambda k: ox(singles[k % n]),
        },
        runs=runs,
        warmup=50,
        max_seconds=secs,
    )

    def cycling(fn: Any) -> Any:
        rows = itertools.cycle(singles)
        return lambda: fn(next(rows))

    # Each alone in a tight loop too: warm caches flatter both, ONNX more (shown in the note).
    alone = {
        "ours_explained": measure(cycling(artifacts.score), runs=runs, warmup=50, max_seconds=secs),
        "onnx": measure(cycling(ox), runs=runs, warmup=50, max_seconds=secs),
    }

    stats["sklearn"] = measure(
        cycling(sk), runs=cfg["sklearn_single_runs"], warmup=5, max_seconds=secs
    )
    sample = rows[:256]
    ours_p = artifacts.score(sample, with_contributions=False).probability
    note = (
        f"max |Δp| vs sklearn {_agree(ours_p, sk(sample)):.1e} (ours), "
        f"{_agree(ox(sample), sk(sample)):.1e} (ONNX, float32); sklearn n_jobs="
        f"{refs.forest.n_jobs} as shipped; ONNX 1 thread"
    )
    out = []
    for key, label in (
        ("ours", "single prediction, in process (probability)"),
        ("ours_explained", "single prediction, in process (+ contributions, as /predict)"),
    ):
        ratio = stats[key].p50 / stats["onnx"].p50
        speedup = stats["sklearn"].p50 / stats[key].p50
        out.append(
            Row(
                "in process",
                label,
                lat(stats[key]),
                plain=lat(stats["sklearn"]),
                limit=lat(stats["onnx"]),
                ratio=f"{ratio:.2f}x ONNX; sklearn/ours {speedup:.0f}x",
                goal="≤ 3x ONNX (p50)",
                met=yes_no(ratio <= 3),
                note=note
                if key == "ours"
                else f"each alone in a tight loop (warm caches): ours p50 "
                f"{ms(alone['ours_explained'].p50)}, ONNX p50 {ms(alone['onnx'].p50)}, "
                f"{alone['ours_explained'].p50 / alone['onnx'].p50:.2f}x",
                data={k: v.to_dict() for k, v in stats.items()},
            )
        )
    return out, stats


def batches(
    artifacts: ArtifactSet, refs: References, rows: np.ndarray, cfg: dict[str, Any]
) -> tuple[list[Row], dict[int, dict[str, Stats]]]:
    out: list[Row] = []
    everything: dict[int, dict[str, Stats]] = {}
    sk = refs.sklearn()
    import os

    threads = os.cpu_count() or 1
    ox1, oxn = refs.onnx(threads=1), refs.onnx(threads=threads)
    for size in cfg["batch_sizes"]:
        x = rows[:size]
        runs, secs = cfg["batch_runs"], cfg["batch_seconds"]
        stats = {
            "ours": measure(lambda x=x: artifacts.score(x), runs=runs, warmup=1, max_seconds=secs),
            "ours_prob": measure(
                lambda x=x: artifacts.score(x, with_contributions=False),
                runs=runs,
                warmup=1,
                max_seconds=secs,
            ),
            "sklearn": measure(lambda x=x: sk(x), runs=runs, warmup=1, max_seconds=secs),
            "onnx1": measure(lambda x=x: ox1(x), runs=runs, warmup=1, max_seconds=secs),
            "onnxn": measure(lambda x=x: oxn(x), runs=runs, warmup=1, max_seconds=secs),
        }
        everything[size] = stats
        per_min = size / stats["ours"].p50 * 60
        out.append(
            Row(
                "in process",
                f"batch of {size:,} (ArtifactSet.score + contributions)",
                f"{lat(stats['ours'])} ({per_min / 1e6:.1f} M pred/min)",
                plain=lat(stats["sklearn"]),
                limit=f"{lat(stats['onnx1'])} (1 thread); p50 {ms(stats['onnxn'].p50)} "
                f"({threads} threads)",
                ratio=f"{stats['ours'].p50 / stats['onnx1'].p50:.2f}x ONNX-1t; "
                f"sklearn/ours {stats['sklearn'].p50 / stats['ours'].p50:.1f}x",
                goal="10k < 1 s" if size >= 10_000 else "",
                met=yes_no(stats["ours"].p50 < 1) if size >= 10_000 else "",
                note=f"probability only: p50 {ms(stats['ours_prob'].p50)}; ours 1 thread, "
                f"sklearn n_jobs={refs.forest.n_jobs} ({threads} cores)",
                data={k: v.to_dict() for k, v in stats.items()},
            )
        )
    return out, everything


def steps(artifacts: ArtifactSet, rows: np.ndarray, runs: int) -> list[tuple[str, float]]:
    """Median time of each step inside `ArtifactSet.score` for one row (the default forest)."""
    from detector.model import CompiledForest

    forest = artifacts.models[artifacts.default_model]
    if not isinstance(forest, CompiledForest):
        return []
    card = artifacts.cards[artifacts.default_model]
    x = rows[:1]
    values = artifacts.prepare(x)
    scaled = (values - artifacts.mean) / artifacts.scale
    leaves = forest.leaves(scaled)
    probability = forest.value[leaves].mean(axis=1)
    parts: list[tuple[str, Any]] = [
        ("prepare (copy, impute NaN)", lambda: artifacts.prepare(x)),
        ("scale", lambda: (values - artifacts.mean) / artifacts.scale),
        ("forest walk (CompiledForest.leaves)", lambda: forest.leaves(scaled)),
        ("mean of leaf values", lambda: forest.value[leaves].mean(axis=1)),
        (
            "contributions (path sums)",
            lambda: forest.path_contributions[leaves].sum(axis=1, dtype=np.float64),
        ),
        (
            "threshold + risk band",
            lambda: (
                np.searchsorted(np.asarray(card.risk_cutoffs), probability, side="right"),
                probability >= card.threshold,
            ),
        ),
        ("whole score() with contributions", lambda: artifacts.score(x)),
    ]
    return [(name, measure(fn, runs=runs, warmup=20, max_seconds=3).p50) for name, fn in parts]
