"""Tree ensembles (gradient boosting and random forests) as flat arrays, walked together in numpy.

One layout serves both families, after scikit-learn's `Tree` (parallel arrays of feature,
threshold, children and value per node) and LightGBM's model dump (`Booster.dump_model`):

* `feature`, `threshold`, `left`, `right` (-1 for leaves), `value` (a leaf's output; for an
  internal node, the output it would give as a leaf: LightGBM's `internal_value`, the class-1
  share of the node's samples for a forest) and `roots`;
* `missing`, how a node sends a missing (NaN) value, as LightGBM's `NumericalDecision` does
  (include/LightGBM/tree.h): `NAN_LEFT` (NaN goes left; also every forest node, whose inputs are
  imputed), `NAN_RIGHT`, `NAN_AS_ZERO` (missing type None: NaN is compared as 0.0) and
  `ZERO_LEFT` / `ZERO_RIGHT` (missing type Zero: 0 and NaN go to the default side);
* categorical splits (LightGBM's `CategoricalDecision`): `category_set` names a set of codes in
  `categories` / `category_offsets`; a value whose integer part is in the set goes left, any
  other value (NaN, negative, unknown) goes right.

At load the nodes are renumbered breadth-first (a node's right child follows its left child) and
each node reads one column of an *expanded* input: the feature itself, the feature with NaN
replaced so that a plain `x > threshold` sends it the right way, or, for a categorical node,
0/1 for "in the node's set" from a lookup table. Every step of the walk is then two gathers and
a compare, the same for every kind of split. Each node also carries the sum of the value
changes along its path, per feature, so the per-feature contributions of a prediction (path
contributions: Saabas, "Interpreting random forests", 2014; what `treeinterpreter` computes)
come from the leaves alone; with the base value they sum to the model's margin exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

NAN_LEFT, NAN_RIGHT, NAN_AS_ZERO, ZERO_LEFT, ZERO_RIGHT = range(5)
# What a missing value (or, for the ZERO rules, a zero) becomes so that `x > threshold` sends it
# to the node's default side: +inf goes right, NaN goes left, 0.0 is compared as 0.
_REPLACEMENT = {NAN_RIGHT: np.inf, NAN_AS_ZERO: 0.0, ZERO_LEFT: np.nan, ZERO_RIGHT: np.inf}
ZERO_THRESHOLD = 1e-35  # LightGBM's kZeroThreshold: |x| <= it counts as zero
MAX_CATEGORY = 1 << 20  # largest category code a set may hold (bounds the lookup tables)
MAX_NODES = 1 << 24
MAX_TABLE_BYTES = 256 * 1024 * 1024  # the categorical lookup tables of one feature


class TreeError(ValueError):
    """Arrays that do not describe a valid tree ensemble; the message says what is wrong."""


@dataclass(frozen=True)
class Explained:
    """A batch's scores: probability, margin and, per feature, what pushed the margin.

    `contributions` (n, n_features) are in the units of `margin` (log-odds for boosting and
    logistic regression, probability for a forest); each row sums with `base` to its margin.
    """

    probability: np.ndarray  # (n,)
    margin: np.ndarray  # (n,)
    base: float
    contributions: np.ndarray | None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise TreeError(message)


class CompiledTrees:
    """A binary tree ensemble: `aggregate` "mean" (random forest: the mean of the trees'
    class-1 shares is the probability) or "sum" (gradient boosting: the sum of the trees'
    outputs is the log-odds margin, through the logistic function the probability)."""

    CHUNK_PAIRS = 1 << 16  # (row, tree) pairs walked at once: keeps the working set in cache
    EXPLAIN_BLOCK_ROWS = 16_384  # rows explained at once: ~140 MB for 348 trees

    def __init__(self, arrays: dict[str, np.ndarray], aggregate: str, n_features: int) -> None:
        _check(aggregate in ("mean", "sum"), f"unknown aggregate {aggregate!r}")
        self.aggregate = aggregate
        self.n_features = n_features
        feature = np.asarray(arrays["feature"]).astype(np.int64)
        n_nodes = len(feature)
        _check(0 < n_nodes <= MAX_NODES, f"{n_nodes} nodes (1 to {MAX_NODES} allowed)")
        threshold = np.asarray(arrays["threshold"], dtype=np.float64)
        left = np.asarray(arrays["left"]).astype(np.int64)
        right = np.asarray(arrays["right"]).astype(np.int64)
        value = np.asarray(arrays["value"], dtype=np.float64)
        roots = np.asarray(arrays["roots"]).astype(np.int64)
        missing = np.asarray(arrays.get("missing", np.zeros(n_nodes, np.int8))).astype(np.int64)
        category_set = np.asarray(
            arrays.get("category_set", np.full(n_nodes, -1, np.int32))
        ).astype(np.int64)
        categories = np.asarray(arrays.get("categories", np.zeros(0, np.int64))).astype(np.int64)
        offsets = np.asarray(arrays.get("category_offsets", np.zeros(1, np.int64))).astype(np.int64)
        for name, array in (
            ("threshold", threshold),
            ("left", left),
            ("right", right),
            ("value", value),
            ("missing", missing),
            ("category_set", category_set),
        ):
            _check(array.shape == (n_nodes,), f"'{name}' has {array.shape}, not ({n_nodes},)")
        internal = feature >= 0
        leaf = ~internal
        _check(bool(np.isfinite(value).all()), "a node value is not finite")
        _check(not np.isnan(threshold[internal]).any(), "a split threshold is NaN")
        _check(bool((feature < n_features).all()), f"a split reads a feature >= {n_features}")
        _check(bool((feature >= -1).all()), "a feature index is below -1")
        ids = np.arange(n_nodes)
        # Children point forward: no cycles, whatever the arrays claim.
        _check(
            bool(((left[internal] > ids[internal]) & (left[internal] < n_nodes)).all())
            and bool(((right[internal] > ids[internal]) & (right[internal] < n_nodes)).all()),
            "child indices must point forward within the arrays",
        )
        _check(bool((left[leaf] == -1).all() and (right[leaf] == -1).all()), "a leaf has children")
        _check(len(roots) > 0 and bool(((roots >= 0) & (roots < n_nodes)).all()), "bad roots")
        _check(bool(((missing >= 0) & (missing <= ZERO_RIGHT)).all()), "unknown missing rule")
        n_sets = len(offsets) - 1
        _check(
            n_sets >= 0
            and offsets[0] == 0
            and bool((np.diff(offsets) >= 0).all())
            and offsets[-1] == len(categories),
            "category offsets are inconsistent",
        )
        _check(
            bool(((category_set >= -1) & (category_set < n_sets)).all()),
            "a node names an unknown category set",
        )
        _check(
            bool(((categories >= 0) & (categories < MAX_CATEGORY)).all()),
            f"category codes must lie in [0, {MAX_CATEGORY})",
        )
        is_categorical = internal & (category_set >= 0)

        # Breadth-first renumbering; every node must be reached exactly once from the roots.
        new_id = np.full(n_nodes, -1, np.int64)
        new_id[roots] = np.arange(len(roots))
        _check(len(np.unique(roots)) == len(roots), "a root is listed twice")
        levels = [roots]
        assigned = len(roots)
        parent_of = np.full(n_nodes, -1, np.int64)
        level = roots
        while len(level):
            parents = level[internal[level]]
            children = np.empty(2 * len(parents), np.int64)
            children[0::2], children[1::2] = left[parents], right[parents]
            _check(bool((new_id[children] < 0).all()), "a node has two parents")
            parent_of[children] = np.repeat(parents, 2)
            new_id[children] = assigned + np.arange(len(children))
            assigned += len(children)
            levels.append(children)
            level = children
        _check(assigned == n_nodes and bool((new_id >= 0).all()), "nodes unreachable from roots")
        order = np.concatenate(levels)  # old ids in the new order

        # The expanded input: one column per distinct (feature, how NaN/0 are sent) or per
        # distinct (feature, category set).
        rule = np.where(is_categorical, 5 + category_set, missing)
        keys = np.c_[np.where(internal, feature, -1), np.where(internal, rule, -1)]
        unique_keys, node_column = np.unique(keys, axis=0, return_inverse=True)
        used = unique_keys[:, 0] >= 0
        column_of_key = np.cumsum(used) - 1
        node_column = np.where(internal, column_of_key[node_column.ravel()], 0)
        self.column_feature = unique_keys[used, 0]
        self.column_rule = unique_keys[used, 1]
        self.n_columns = max(1, int(used.sum()))
        self._set_tables(categories, offsets)
        self._numeric = np.flatnonzero(self.column_rule < 5)
        self._numeric_feature = self.column_feature[self._numeric]
        self._rules = [
            (rule, np.flatnonzero(self.column_rule == rule))
            for rule in (NAN_RIGHT, NAN_AS_ZERO, ZERO_LEFT, ZERO_RIGHT)
            if (self.column_rule == rule).any()
        ]

        is_internal = internal[order]
        child = np.where(
            is_internal, new_id[np.where(is_internal, left[order], 0)], np.arange(n_nodes)
        )
        self.shift = max(1, int(self.n_columns - 1).bit_length())
        self.column = np.where(is_internal, node_column[order], 0)
        self.code = (child << self.shift) | self.column
        self.mask = (1 << self.shift) - 1
        self.child = child
        self.threshold = np.where(
            is_internal, np.where(is_categorical[order], 0.5, threshold[order]), np.inf
        )
        self.value = value[order]
        self.internal = is_internal
        self.roots = new_id[roots]
        self.scale = 1.0 / len(roots) if aggregate == "mean" else 1.0
        # Path contributions: a child inherits its parent's and adds its own step.
        contributions = np.zeros((n_nodes, n_features))
        for children in levels[1:]:
            parents = parent_of[children]
            rows = new_id[children]
            contributions[rows] = contributions[new_id[parents]]
            contributions[rows, feature[parents]] += value[children] - value[parents]
        # float32 halves the memory the explain gather reads; reasons need no more precision.
        self.path_contributions = contributions.astype(np.float32)
        self.depth = len(levels) - 1

    def _set_tables(self, categories: np.ndarray, offsets: np.ndarray) -> None:
        """Per categorical feature, a table row per code: 0 where the code goes left."""
        self.tables: list[tuple[int, np.ndarray, np.ndarray]] = []
        for feature in np.unique(self.column_feature[self.column_rule >= 5]):
            columns = np.flatnonzero((self.column_feature == feature) & (self.column_rule >= 5))
            sets = self.column_rule[columns] - 5
            members = [categories[offsets[s] : offsets[s + 1]] for s in sets]
            top = max((int(m.max()) for m in members if len(m)), default=0)
            _check(
                (top + 2) * len(columns) * 8 <= MAX_TABLE_BYTES,
                f"category tables of feature {feature} would take more than {MAX_TABLE_BYTES:,} B",
            )
            table = np.ones((top + 2, len(columns)))  # the last row: not a known code
            for k, member in enumerate(members):
                table[member, k] = 0.0
            self.tables.append((int(feature), columns, table))

    @property
    def n_trees(self) -> int:
        return len(self.roots)

    @property
    def base_value(self) -> float:
        """The margin before any split: what the contributions are measured from."""
        return float(self.value[self.roots].sum() * self.scale)

    def expand(self, x: np.ndarray) -> np.ndarray:
        """The walk's input: (n, n_columns) float64 from (n, n_features) feature values."""
        if self.aggregate == "mean":
            # scikit-learn compares float32 features with float64 thresholds; do the same.
            x = x.astype(np.float32).astype(np.float64)
        out = np.empty((len(x), self.n_columns))
        out[:, self._numeric] = x[:, self._numeric_feature]
        # NaN > t is False: NaN already goes left; these columns send it (or 0) elsewhere.
        for rule, columns in self._rules:
            part = out[:, columns]
            missing = np.isnan(part)
            if rule in (ZERO_LEFT, ZERO_RIGHT):
                missing |= np.abs(part) <= ZERO_THRESHOLD
            part[missing] = _REPLACEMENT[rule]
            out[:, columns] = part
        for feature, columns, table in self.tables:
            code = np.trunc(x[:, feature])  # LightGBM casts to int: 101.7 is code 101
            known = (code >= 0) & (code < len(table) - 1)  # NaN is neither
            index = np.where(known, code, len(table) - 1).astype(np.int64)
            out[:, columns] = table[index]
        return out

    def leaves(self, x: np.ndarray) -> np.ndarray:
        """The leaf each row reaches in each tree: (n_rows, n_trees) node ids."""
        n_rows = len(x)
        if n_rows == 1:
            return self._one_row(self.expand(x)[0])[None, :]
        n_trees = self.n_trees
        out = np.empty((n_rows, n_trees), np.int64)
        chunk = max(1, self.CHUNK_PAIRS // n_trees)
        width, shift, mask = self.n_columns, self.shift, self.mask
        for start in range(0, n_rows, chunk):
            flat = self.expand(x[start : start + chunk]).ravel()
            rows = len(flat) // width
            node = np.tile(self.roots, rows)
            active = np.arange(len(node))
            current = node
            base = np.repeat(np.arange(rows) * width, n_trees)
            step = 0
            while True:
                code = self.code[current]
                current = (code >> shift) + (flat[base + (code & mask)] > self.threshold[current])
                step += 1
                if step % 6 == 0:  # dropping finished walks costs a pass; do it now and then
                    node[active] = current
                    keep = self.internal[current]
                    if not keep.any():
                        break
                    active, current, base = active[keep], current[keep], base[keep]
            out[start : start + rows] = node.reshape(rows, n_trees)
        return out

    def _one_row(self, x: np.ndarray) -> np.ndarray:
        """One customer (the /predict path): fewer array operations per step, no compaction."""
        node = self.roots.copy()
        while True:
            for _ in range(8):  # leaves point to themselves: extra steps are harmless
                node = self.child[node] + (x[self.column[node]] > self.threshold[node])
            if not self.internal[node].any():
                return node

    def explain(self, x: np.ndarray, with_contributions: bool = True) -> Explained:
        """Scores of (n, n_features) rows; NaN is missing (a forest expects imputed rows).

        Rows go through in blocks of EXPLAIN_BLOCK_ROWS: the leaf ids and their gathers take
        about 3 x 8 bytes per (row, tree) pair, so a block bounds memory whatever `n` is (a file
        of 1.5 M one-invoice clients took 4.4 GB in one piece)."""
        n = len(x)
        if n <= self.EXPLAIN_BLOCK_ROWS:
            return self._explain_block(x, with_contributions)
        parts = [
            self._explain_block(x[start : start + self.EXPLAIN_BLOCK_ROWS], with_contributions)
            for start in range(0, n, self.EXPLAIN_BLOCK_ROWS)
        ]
        return Explained(
            np.concatenate([p.probability for p in parts]),
            np.concatenate([p.margin for p in parts]),
            self.base_value,
            np.concatenate([p.contributions for p in parts if p.contributions is not None])
            if with_contributions
            else None,
        )

    def _explain_block(self, x: np.ndarray, with_contributions: bool) -> Explained:
        leaves = self.leaves(x)
        margin = self.value[leaves].sum(axis=1) * self.scale
        probability = margin if self.aggregate == "mean" else _logistic(margin)
        if not with_contributions:
            return Explained(probability, margin, self.base_value, None)
        paths = self.path_contributions
        if len(leaves) <= 64:
            summed = paths[leaves].sum(axis=1, dtype=np.float64)
        else:
            # Tree by tree, so each gather stays in cache; `take` into one reused buffer and a
            # float32 sum halve the cost of mixed-type `+=` on fresh arrays (1k rows: 17 -> 8 ms).
            total = np.zeros((len(leaves), paths.shape[1]), np.float32)
            gathered = np.empty_like(total)
            for tree_leaves in np.ascontiguousarray(leaves.T):
                np.take(paths, tree_leaves, axis=0, out=gathered)
                total += gathered
            summed = total.astype(np.float64)
        return Explained(probability, margin, self.base_value, summed * self.scale)


def _logistic(margin: np.ndarray) -> np.ndarray:
    result: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * margin))  # no overflow for large |margin|
    return result


def from_sklearn_forest(forest: Any) -> dict[str, np.ndarray]:
    """The arrays of a fitted binary `RandomForestClassifier` (inputs imputed: NaN never seen)."""
    features, thresholds, lefts, rights, values, roots = [], [], [], [], [], []
    offset = 0
    for estimator in forest.estimators_:
        tree = estimator.tree_
        is_leaf = tree.children_left < 0
        roots.append(offset)
        features.append(np.where(is_leaf, -1, tree.feature))
        thresholds.append(tree.threshold)
        lefts.append(np.where(is_leaf, -1, tree.children_left + offset))
        rights.append(np.where(is_leaf, -1, tree.children_right + offset))
        proportions = tree.value[:, 0, :]
        values.append(proportions[:, 1] / proportions.sum(axis=1))
        offset += tree.node_count
    return {
        "feature": np.concatenate(features).astype(np.int16),
        "threshold": np.concatenate(thresholds).astype(np.float64),
        "left": np.concatenate(lefts).astype(np.int32),
        "right": np.concatenate(rights).astype(np.int32),
        "value": np.concatenate(values).astype(np.float64),
        "roots": np.asarray(roots, dtype=np.int32),
    }


_MISSING_RULES = {("NaN", True): NAN_LEFT, ("NaN", False): NAN_RIGHT, ("Zero", True): ZERO_LEFT}
_MISSING_RULES[("Zero", False)] = ZERO_RIGHT


def from_lightgbm(booster: Any) -> dict[str, np.ndarray]:
    """The arrays of a trained binary LightGBM `Booster`, from its JSON dump (depth-first
    numbering, so children always follow their parent)."""
    dump = booster.dump_model()
    objective = str(dump.get("objective", ""))
    if (
        dump.get("num_class", 1) != 1
        or dump.get("num_tree_per_iteration", 1) != 1
        or objective.split()[:2] != ["binary", "sigmoid:1"]
    ):
        raise TreeError(f"only binary LightGBM models with sigmoid:1 are supported ({objective})")
    feature: list[int] = []
    threshold: list[float] = []
    left: list[int] = []
    right: list[int] = []
    value: list[float] = []
    missing: list[int] = []
    category_set: list[int] = []
    categories: list[int] = []
    offsets = [0]
    set_of: dict[tuple[int, ...], int] = {}  # equal sets share one column of the input
    roots: list[int] = []

    def add(node: dict[str, Any]) -> int:
        index = len(feature)
        for array, item in ((left, -1), (right, -1), (category_set, -1), (missing, NAN_LEFT)):
            array.append(item)
        if "leaf_value" in node:
            feature.append(-1)
            threshold.append(0.0)
            value.append(float(node["leaf_value"]))
            return index
        feature.append(int(node["split_feature"]))
        value.append(float(node["internal_value"]))
        if node["decision_type"] == "==":
            codes = tuple(sorted(int(c) for c in str(node["threshold"]).split("||")))
            if codes not in set_of:
                set_of[codes] = len(offsets) - 1
                categories.extend(codes)
                offsets.append(len(categories))
            category_set[index] = set_of[codes]
            threshold.append(0.5)
        else:
            kind = node.get("missing_type", "None")
            missing[index] = (
                NAN_AS_ZERO
                if kind == "None"
                else _MISSING_RULES[(kind, bool(node["default_left"]))]
            )
            threshold.append(float(node["threshold"]))
        left[index] = add(node["left_child"])
        right[index] = add(node["right_child"])
        return index

    for tree in dump["tree_info"]:
        roots.append(add(tree["tree_structure"]))
    return {
        "feature": np.asarray(feature, np.int32),
        "threshold": np.asarray(threshold, np.float64),
        "left": np.asarray(left, np.int32),
        "right": np.asarray(right, np.int32),
        "value": np.asarray(value, np.float64),
        "roots": np.asarray(roots, np.int32),
        "missing": np.asarray(missing, np.int8),
        "category_set": np.asarray(category_set, np.int32),
        "categories": np.asarray(categories, np.int64),
        "category_offsets": np.asarray(offsets, np.int64),
    }
