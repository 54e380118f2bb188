"""Drift: how far the clients being scored have moved from the clients the model learnt from.

For each served feature, training stores a reference distribution in features.json: the cut
points of ten equal-frequency bins of the training split (a categorical code: its most common
codes, one bin each, and "other"), plus a bin for missing values, with the share of training
clients in each. Scoring counts clients per bin (`bin_counts`, cheap, additive across the
partitions of a file and across requests) and compares with the population stability index:

    PSI = sum over bins of (observed - expected) * ln(observed / expected)

(shares, each floored at 1e-4 so an empty bin stays finite). The usual reading (Siddiqi, "Credit
Risk Scorecards", 2006; Yurdakul, "Statistical properties of population stability index",
2018): below 0.1 no significant shift, 0.1 to 0.25 a moderate one, above 0.25 a major one.
A feature over `PSI_THRESHOLD` (0.25) is reported as drifted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from threading import Lock
from typing import Any

import numpy as np

PSI_THRESHOLD = 0.25
BINS = 10
TOP_CODES = 20
FLOOR = 1e-4
MIN_CLIENTS = 100  # fewer clients than this and a PSI says more about noise than about drift


@dataclass(frozen=True)
class FeatureReference:
    """One feature's bins: numeric cut points, or the codes that have their own bin."""

    name: str
    kind: str  # "numeric" or "categorical"
    edges: np.ndarray  # numeric: cut points (bins = len + 1); categorical: the codes
    expected: np.ndarray  # shares of training clients per bin, the last bin is "missing"

    @property
    def n_bins(self) -> int:
        return len(self.expected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "edges": [float(e) for e in self.edges],
            "expected": [round(float(p), 6) for p in self.expected],
        }


def fit_reference(name: str, kind: str, values: np.ndarray) -> FeatureReference:
    """The training distribution of one feature (values: the training split's clients)."""
    present = values[~np.isnan(values)]
    if kind == "categorical":
        codes, counts = np.unique(present, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:TOP_CODES]
        edges = np.sort(codes[order])
    else:
        quantiles = np.quantile(present, np.linspace(0, 1, BINS + 1)[1:-1]) if len(present) else []
        edges = np.unique(np.asarray(quantiles, dtype=np.float64))
    reference = FeatureReference(name, kind, edges, np.zeros(0))
    counts = _counts(reference, values)
    return FeatureReference(name, kind, edges, counts / max(1, counts.sum()))


def _counts(reference: FeatureReference, values: np.ndarray) -> np.ndarray:
    # Numeric: len(edges) + 1 ranges; categorical: one bin per code and "other"; then missing.
    n_bins = len(reference.edges) + 2
    missing = np.isnan(values)
    present = values[~missing]
    if reference.kind == "categorical":
        # One bin per known code, then "other"; codes are compared exactly.
        position = np.searchsorted(reference.edges, present)
        known = (position < len(reference.edges)) & (
            reference.edges[np.minimum(position, len(reference.edges) - 1)] == present
            if len(reference.edges)
            else np.zeros(len(present), bool)
        )
        which = np.where(known, position, len(reference.edges))
    else:
        # Bin i holds values in (edges[i-1], edges[i]]: a value equal to a cut point goes below.
        which = np.searchsorted(reference.edges, present, side="left")
    counts = np.bincount(which, minlength=n_bins - 1).astype(np.float64)[: n_bins - 1]
    return np.append(counts, float(missing.sum()))


def load_references(
    features_meta: dict[str, Any], names: tuple[str, ...]
) -> list[FeatureReference] | None:
    """The references stored in features.json, in `names` order; None for sets trained before
    drift was recorded (then no drift is reported)."""
    by_name = {f["name"]: f for f in features_meta.get("features", [])}
    references = []
    for name in names:
        stored = by_name.get(name, {}).get("reference")
        if not stored:
            return None
        expected = np.asarray(stored["expected"], dtype=np.float64)
        edges = np.asarray(stored["edges"], dtype=np.float64)
        if len(expected) != len(edges) + 2 or not np.isfinite(expected).all():
            raise ValueError(
                f"{name}: drift reference has {len(expected)} shares for {len(edges)} edges"
            )
        references.append(FeatureReference(name, str(stored["kind"]), edges, expected))
    return references


def bin_counts(references: list[FeatureReference], values: np.ndarray) -> list[np.ndarray]:
    """Clients per bin of each feature: (n, n_features) values -> one count array per feature."""
    return [_counts(ref, values[:, i]) for i, ref in enumerate(references)]


def psi(expected: np.ndarray, counts: np.ndarray) -> float:
    """The population stability index of observed counts against expected shares."""
    observed = counts / max(1.0, float(counts.sum()))
    e = np.maximum(expected, FLOOR)
    o = np.maximum(observed, FLOOR)
    return float(np.sum((o - e) * np.log(o / e)))


def report(
    references: list[FeatureReference] | None,
    counts: list[np.ndarray] | None,
    threshold: float = PSI_THRESHOLD,
) -> dict[str, Any]:
    """The `drift` section of a summary: PSI per feature, and the features over the threshold
    (none when fewer than MIN_CLIENTS were scored: say so instead)."""
    if references is None or counts is None:
        return {"available": False, "reason": "the model set has no reference distributions"}
    clients = int(counts[0].sum()) if counts else 0
    features = {
        ref.name: {"psi": round(psi(ref.expected, c), 5)}
        for ref, c in zip(references, counts, strict=True)
    }
    enough = clients >= MIN_CLIENTS
    drifted = sorted(name for name, f in features.items() if enough and f["psi"] > threshold)
    out: dict[str, Any] = {
        "method": "population stability index against the training split's clients",
        "threshold": threshold,
        "clients": clients,
        "features": features,
        "drifted": drifted,
    }
    if not enough:
        out["note"] = f"fewer than {MIN_CLIENTS} clients: too few to call a shift"
    return out


def add_counts(
    total: list[np.ndarray] | None, more: list[np.ndarray] | None
) -> list[np.ndarray] | None:
    if more is None:
        return total
    if total is None:
        return [c.copy() for c in more]
    return [a + b for a, b in zip(total, more, strict=True)]


class RollingDrift:
    """The last `window` clients an instance scored, as bin counts, for a rolling PSI (the
    HTTP API's drift metric). Rows of single predictions wait in a small buffer and are binned
    `FLUSH_ROWS` at a time (binning one row costs more than scoring it); memory is one count
    array per flushed group, bounded by `window`."""

    FLUSH_ROWS = 256

    def __init__(self, references: list[FeatureReference] | None, window: int = 10_000) -> None:
        self.references = references
        self.window = window
        self._lock = Lock()
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._parts: deque[tuple[int, list[np.ndarray]]] = deque()
        self._total: list[np.ndarray] | None = None
        self._clients = 0

    def add(self, values: np.ndarray) -> None:
        if self.references is None or not len(values):
            return
        with self._lock:
            self._pending.append(values)
            self._pending_rows += len(values)
            if self._pending_rows < self.FLUSH_ROWS:
                return
            batch = np.vstack(self._pending)
            self._pending, self._pending_rows = [], 0
        self._bin(batch)

    def _flush(self) -> None:
        with self._lock:
            if not self._pending:
                return
            batch = np.vstack(self._pending)
            self._pending, self._pending_rows = [], 0
        self._bin(batch)

    def _bin(self, values: np.ndarray) -> None:
        assert self.references is not None  # nosec B101
        counts = bin_counts(self.references, values)
        with self._lock:
            self._parts.append((len(values), counts))
            self._total = add_counts(self._total, counts)
            self._clients += len(values)
            while self._parts and self._clients - self._parts[0][0] >= self.window:
                n, old = self._parts.popleft()
                self._clients -= n
                assert self._total is not None  # nosec B101
                self._total = [a - b for a, b in zip(self._total, old, strict=True)]

    def report(self) -> dict[str, Any]:
        """The drift section for the window (as `report`)."""
        self._flush()
        with self._lock:
            total = None if self._total is None else [c.copy() for c in self._total]
        if total is None:
            return (
                report(self.references, None)
                if self.references is None
                else {
                    "clients": 0,
                    "features": {},
                    "drifted": [],
                }
            )
        return report(self.references, total)
