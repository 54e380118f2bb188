"""A verified artifact set: check every file against the manifest, load the models, score.

Serving never unpickles. Training writes each model twice: the training library's own form
(the reference: LightGBM's text model, scikit-learn's `*.joblib`) and its arrays (`*.npz`,
loaded with `allow_pickle=False`, so loading cannot execute code). Serving loads only the
arrays: `trees.CompiledTrees` for the gradient-boosted model and the forest (their training
libraries' probabilities to 1e-9, tests check), `linear.CompiledLogistic` for the logistic
regression.

`serving_files` says which files of a manifest serving loads: the cold start downloads only
those (the `*.joblib` references stay in the store), and `verify_manifest` requires them, while a
reference file is checked whenever it is present.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from detector.features import FEATURE_NAMES
from detector.model.linear import CompiledLogistic
from detector.model.trees import CompiledTrees, TreeError

MANIFEST = "manifest.json"
FEATURES_FILE = "features.json"
RESULTS_FILE = "training_results.json"
SCALER_FILE = "scaler.npz"
# Reference files are what training writes next to the arrays in the training library's own
# form: each model's `reference_file` (LightGBM's text model, scikit-learn's pickles; sets
# published before the gradient-boosted model also carry `scaler.joblib`, named nowhere but in
# `files`). Serving reads none of them: every `*.joblib` (serving never unpickles: the no-pickle
# invariant restated) and every model's `reference_file` is a reference; any other file is
# downloaded and verified like the arrays.
REFERENCE_SUFFIX = ".joblib"
MODEL_KINDS = ("lightgbm", "random_forest", "logistic_regression")
RISK_LEVELS = ("low", "elevated", "high", "critical")


class ModelError(RuntimeError):
    """An artifact set is missing, tampered with or inconsistent; the message says which file."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain_name(name: object) -> bool:
    """Whether `name` is one file of a folder: not a path, not `.` or `..`, no control character.

    A backslash is refused too: Blob Storage reads it as `/`, so `a\\b` is a path there.
    """
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
        and Path(name).name == name
    )


def manifest_files(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The manifest's `files`, {file name: SHA-256 hex}, every name confined to the set's folder.

    Checked before any listed file is read or downloaded: a name that is a path (absolute,
    `../other/...`, with `/` or `\\`), `.` or `..`, or has a control character is refused, so a
    manifest can vouch only for files of its own folder (a store version, a cache, a local set).
    Raises ModelError: "manifest names a file outside the artifact folder: <name>", or "is not a
    valid manifest" when `files` is not an object.
    """
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    if not isinstance(files, Mapping):
        raise ModelError(f"{MANIFEST} is not a valid manifest: 'files' is not an object")
    for name, digest in files.items():
        if not _plain_name(name):
            raise ModelError(f"manifest names a file outside the artifact folder: {name!r}")
        if not isinstance(digest, str):
            raise ModelError(f"{MANIFEST} is not a valid manifest: SHA-256 of {name} not text")
    return {str(name): str(digest) for name, digest in files.items()}


def serving_files(manifest: Mapping[str, Any]) -> list[str]:
    """The files of the manifest that serving needs, sorted: every listed file but the references.

    These are what a cold start downloads (with manifest.json itself). Raises ModelError if a
    listed name is not a plain file of the folder (`manifest_files`), or if the manifest does not
    list a file that `ArtifactSet` loads (the JSON files, the scaler, each model's
    `serving_file`), since such a file could not be verified.
    """
    listed = list(manifest_files(manifest))
    try:
        entries = dict(manifest.get("models", {})).values()
        loaded = {FEATURES_FILE, RESULTS_FILE, SCALER_FILE} | {
            str(entry["serving_file"]) for entry in entries
        }
        references = {name for name in listed if name.endswith(REFERENCE_SUFFIX)} | {
            str(entry["reference_file"]) for entry in entries if entry.get("reference_file")
        }
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{MANIFEST} is not a valid manifest: {exc!r}") from None
    serving = sorted(name for name in listed if name not in references)
    unverifiable = sorted(loaded - set(serving))
    if unverifiable:
        raise ModelError(
            f"manifest: serving loads {', '.join(unverifiable)}, which must be listed in its files "
            "and cannot be a reference file"
        )
    return serving


def verify_manifest(directory: Path, *, references_optional: bool = False) -> dict[str, Any]:
    """Check the files listed in the manifest against their SHA-256; return the manifest.

    Every serving file (`serving_files`) must be present and match. So must every reference
    file, unless `references_optional` (serving, whose cold start does not download them): then
    an absent reference file is skipped, but one that is present is still checked, so a
    tampered file is never accepted. Publishing verifies the full set.
    """
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ModelError(f"no {MANIFEST} in {directory}")
    try:
        manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict):
            raise TypeError("not a JSON object")
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise ModelError(f"{manifest_path} is not a valid manifest: {exc}") from None
    files = manifest_files(manifest)  # every name confined to the folder, before any file is read
    serving = set(serving_files(manifest))
    for name, expected in sorted(files.items()):
        path = directory / name
        if not path.is_file():
            if references_optional and name not in serving:
                continue  # a reference file: serving never reads it, the cold start skips it
            raise ModelError(f"artifact {name} listed in the manifest is missing from {directory}")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelError(
                f"artifact {name} fails its checksum (manifest {expected[:12]}..., "
                f"file {actual[:12]}...): refusing to load"
            )
    return manifest


# Bounds on what one .npz may inflate to: the bundled forest's arrays take about 25 MB.
MAX_ARRAY_BYTES = 256 * 1024 * 1024
MAX_ARCHIVE_BYTES = 512 * 1024 * 1024
MAX_ARRAYS = 64

# numpy parses a `.npy` header with `ast.literal_eval`, and CPython before 3.13 keeps the AST
# constructor's recursion depth per interpreter, not per thread: two threads building ASTs at
# once can raise "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905;
# it failed a CI run with two concurrent publishes). Header parsing is microseconds, so
# serialising it costs nothing measurable.
_HEADER_LOCK = threading.Lock()


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` archive, read within bounds whatever the archive claims.

    Each member's `.npy` header is read first (format: numpy.lib.format, NEP 1): an object or
    structured dtype, or a declared size over MAX_ARRAY_BYTES (MAX_ARCHIVE_BYTES in all), is
    refused before any data is inflated; then exactly the declared number of bytes is
    decompressed, so a member that inflates further is never read. No pickle is ever loaded.
    Raises ModelError naming the file and the member.
    """
    import zipfile

    arrays: dict[str, np.ndarray] = {}
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if len(members) > MAX_ARRAYS:
                raise ModelError(f"{path.name}: {len(members)} members (at most {MAX_ARRAYS})")
            for member in members:
                name = member.filename
                if not name.endswith(".npy") or "/" in name:
                    raise ModelError(f"{path.name}: unexpected member {name!r}")
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    if version not in ((1, 0), (2, 0)):
                        raise ModelError(f"{path.name}: {name}: unknown .npy version {version}")
                    with _HEADER_LOCK:
                        if version == (1, 0):
                            header = np.lib.format.read_array_header_1_0(stream, 10_000)
                        else:
                            header = np.lib.format.read_array_header_2_0(stream, 10_000)
                    shape, fortran, dtype = header
                    if dtype.hasobject or dtype.fields is not None or dtype.itemsize == 0:
                        raise ModelError(f"{path.name}: {name}: dtype {dtype} is not a number")
                    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
                    size = count * dtype.itemsize
                    total += size
                    if size > MAX_ARRAY_BYTES or total > MAX_ARCHIVE_BYTES:
                        raise ModelError(
                            f"{path.name}: {name} declares {size:,} bytes (limits: "
                            f"{MAX_ARRAY_BYTES:,} per array, {MAX_ARCHIVE_BYTES:,} per file)"
                        )
                    data = stream.read(size)
                    if len(data) != size:
                        raise ModelError(f"{path.name}: {name} is shorter than its header says")
                    array = np.frombuffer(data, dtype=dtype).reshape(
                        shape, order="F" if fortran else "C"
                    )
                    arrays[name[: -len(".npy")]] = array
    except ModelError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"cannot read {path.name}: {exc}") from None
    return arrays


_load_arrays = load_arrays


@dataclass(frozen=True)
class ModelCard:
    """What the manifest says of one model: its file, threshold and risk bands."""

    name: str
    kind: str
    serving_file: str
    threshold: float
    threshold_method: str
    risk_cutoffs: tuple[float, float, float]  # elevated, high, critical: score cut-offs
    contributions: str  # how the per-feature contributions are computed, in which units


@dataclass(frozen=True)
class Scores:
    """The model's answer for a batch of clients, row-aligned with the input.

    `features` are the values as given (NaN where missing); `contributions` (n, n_features)
    sum with `base` to `margin` (log-odds, or probability for the forest).
    """

    model: str
    model_version: str
    probability: np.ndarray
    flagged: np.ndarray
    risk_level: np.ndarray  # object array of RISK_LEVELS
    features: np.ndarray
    contributions: np.ndarray | None
    margin: np.ndarray
    base: float


CONTRIBUTION_METHODS = {
    "lightgbm": "path contributions (Saabas) of the trees, in log-odds",
    "random_forest": "path contributions (Saabas) of the trees, in probability",
    "logistic_regression": "coefficient x standardised value, in log-odds",
}


class ArtifactSet:
    """A verified, loaded artifact folder: feature metadata, scaler and every served model.

    Raises ModelError when a file is missing, fails its checksum or does not fit the others.
    """

    def __init__(self, directory: Path, verify: bool = True) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ModelError(f"model folder {self.directory} does not exist")
        self.manifest = (
            verify_manifest(self.directory, references_optional=True)
            if verify
            else self._read_json(MANIFEST)
        )
        self.version: str = str(self.manifest.get("model_version", ""))
        if not self.version:
            raise ModelError(f"{MANIFEST} has no model_version")
        names = tuple(self.manifest.get("feature_names", ()))
        if names != FEATURE_NAMES:
            raise ModelError(
                "artifacts were trained on different features than this code computes: "
                f"{list(names)} != {list(FEATURE_NAMES)}"
            )
        n_features = len(FEATURE_NAMES)
        self.features_meta: dict[str, Any] = self._read_json(FEATURES_FILE)
        self.training_results: dict[str, Any] = self._read_json(RESULTS_FILE)
        try:
            meta = {f["name"]: f for f in self.features_meta["features"]}
            self.fill_values = np.array(
                [float(meta[name]["fill_value"]) for name in FEATURE_NAMES], dtype=np.float64
            )
            self.typical = np.array(
                [float(meta[name]["typical"]) for name in FEATURE_NAMES], dtype=np.float64
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"{FEATURES_FILE} lacks a feature's fill or typical value: {exc!r}"
            ) from None
        if not (np.isfinite(self.fill_values).all() and np.isfinite(self.typical).all()):
            raise ModelError(f"{FEATURES_FILE}: fill and typical values must be finite")
        from detector.drift import RollingDrift, load_references

        try:
            self.drift_references = load_references(self.features_meta, FEATURE_NAMES)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{FEATURES_FILE}: invalid drift reference: {exc}") from None
        # What this instance scored lately against the training distribution (HTTP metric).
        self.rolling_drift = RollingDrift(self.drift_references)
        scaler = _load_arrays(self.directory / SCALER_FILE)
        self.mean = scaler["mean"].astype(np.float64)
        self.scale = scaler["scale"].astype(np.float64)
        if self.mean.shape != (n_features,) or self.scale.shape != self.mean.shape:
            raise ModelError(f"{SCALER_FILE} does not match the {n_features} features")
        if (
            not (np.isfinite(self.mean).all() and np.isfinite(self.scale).all())
            or (self.scale <= 0).any()
        ):
            raise ModelError(f"{SCALER_FILE}: means must be finite and scales positive")
        self.default_model: str = str(self.manifest.get("default_model", "lightgbm"))
        self.cards: dict[str, ModelCard] = {}
        self.models: dict[str, CompiledTrees | CompiledLogistic] = {}
        for name, entry in dict(self.manifest.get("models", {})).items():
            card = self._card(name, entry)
            arrays = _load_arrays(self.directory / card.serving_file)
            try:
                compiled: CompiledTrees | CompiledLogistic
                if card.kind == "lightgbm":
                    compiled = CompiledTrees(arrays, "sum", n_features)
                elif card.kind == "random_forest":
                    compiled = CompiledTrees(arrays, "mean", n_features)
                else:
                    compiled = CompiledLogistic(arrays, n_features)
            except (KeyError, TreeError, ValueError) as exc:
                raise ModelError(f"{card.serving_file} is not a valid {card.kind}: {exc}") from None
            self.cards[name] = card
            self.models[name] = compiled
        if self.default_model not in self.models:
            raise ModelError(f"{MANIFEST}: default model {self.default_model!r} is not in the set")

    @staticmethod
    def _card(name: str, entry: Any) -> ModelCard:
        try:
            kind = str(entry["kind"])
            if kind not in MODEL_KINDS:
                raise ModelError(f"{MANIFEST}: model {name} has unknown kind {kind!r}")
            cutoffs = tuple(float(c) for c in entry["risk_cutoffs"])
            threshold = float(entry["threshold"])
            card = ModelCard(
                name=name,
                kind=kind,
                serving_file=str(entry["serving_file"]),
                threshold=threshold,
                threshold_method=str(entry["threshold_method"]),
                risk_cutoffs=cutoffs,  # type: ignore[arg-type]
                contributions=CONTRIBUTION_METHODS[kind],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{MANIFEST}: model {name} is not described fully: {exc!r}") from None
        scores = (threshold, *cutoffs)
        if len(cutoffs) != 3 or not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in scores):
            raise ModelError(
                f"{MANIFEST}: model {name}: threshold and the 3 risk cut-offs must be "
                "probabilities in [0, 1]"
            )
        if list(cutoffs) != sorted(cutoffs):
            raise ModelError(f"{MANIFEST}: model {name}: risk cut-offs must not decrease")
        return card

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.directory / name
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelError(f"artifact {name} is missing from {self.directory}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"artifact {name} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ModelError(f"artifact {name} is not a JSON object")
        return data

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(self.models)

    def resolve(self, name: str | None) -> str:
        chosen = name or self.default_model
        if chosen not in self.models:
            raise KeyError(f"unknown model {chosen!r}; available: {', '.join(self.models)}")
        return chosen

    def impute(self, values: np.ndarray) -> np.ndarray:
        """Missing values replaced by the training split's medians (the forest and the logistic
        regression cannot take NaN; the gradient-boosted model reads it as "unknown")."""
        missing = np.isnan(values)
        if not missing.any():
            return values
        return np.where(missing, self.fill_values, values)

    def score(
        self, features: np.ndarray, model: str | None = None, with_contributions: bool = True
    ) -> Scores:
        """Score raw feature rows: (n, n_features) in FEATURE_NAMES order, NaN = missing."""
        name = self.resolve(model)
        card = self.cards[name]
        values = np.array(features, dtype=np.float64, copy=True).reshape(-1, len(FEATURE_NAMES))
        compiled = self.models[name]
        if card.kind == "lightgbm":
            explained = compiled.explain(values, with_contributions)
        else:
            scaled = (self.impute(values) - self.mean) / self.scale
            explained = compiled.explain(scaled, with_contributions)
        probability = explained.probability
        band = np.searchsorted(np.asarray(card.risk_cutoffs), probability, side="right")
        return Scores(
            model=name,
            model_version=self.version,
            probability=probability,
            flagged=probability >= card.threshold,
            risk_level=np.asarray(RISK_LEVELS, dtype=object)[band],
            features=values,
            contributions=explained.contributions,
            margin=explained.margin,
            base=explained.base,
        )


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None
