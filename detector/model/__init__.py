"""Models: the verified artifact set, and the compiled model families it serves.

* `artifacts`: the manifest and its checksums, `ArtifactSet` (load, verify, score);
* `trees`: tree ensembles (LightGBM gradient boosting, random forest) walked in numpy, with
  per-feature path contributions;
* `linear`: the logistic regression.
"""

from detector.model.artifacts import (
    CONTRIBUTION_METHODS,
    FEATURES_FILE,
    MANIFEST,
    MODEL_KINDS,
    REFERENCE_SUFFIX,
    RESULTS_FILE,
    RISK_LEVELS,
    SCALER_FILE,
    ArtifactSet,
    ModelCard,
    ModelError,
    Scores,
    finite_or_none,
    manifest_files,
    serving_files,
    sha256_file,
    verify_manifest,
)
from detector.model.linear import CompiledLogistic
from detector.model.trees import CompiledTrees, Explained, TreeError

__all__ = [
    "CONTRIBUTION_METHODS",
    "FEATURES_FILE",
    "MANIFEST",
    "MODEL_KINDS",
    "REFERENCE_SUFFIX",
    "RESULTS_FILE",
    "RISK_LEVELS",
    "SCALER_FILE",
    "ArtifactSet",
    "CompiledLogistic",
    "CompiledTrees",
    "Explained",
    "ModelCard",
    "ModelError",
    "Scores",
    "TreeError",
    "finite_or_none",
    "manifest_files",
    "serving_files",
    "sha256_file",
    "verify_manifest",
]
