"""Per-client features from billing history: the catalog, the vectorised computation, and the
truncated views that training evaluates on.

* `catalog`: every candidate feature (`FeatureSpec`: meaning, unit, valid range) and the served
  set (`FEATURES`, `FEATURE_NAMES`) chosen from it;
* `compute`: `compute_features`, the one code path from invoice rows to features for training,
  the HTTP API and batch scoring;
* `views`: histories cut some months before their last invoice (prospective evaluation).
"""

from detector.features.catalog import (
    CANDIDATE_INDEX,
    CANDIDATES,
    FEATURE_INDEX,
    FEATURE_NAMES,
    FEATURES,
    FeatureSpec,
    specs_of,
)
from detector.features.compute import compute_features

__all__ = [
    "CANDIDATES",
    "CANDIDATE_INDEX",
    "FEATURES",
    "FEATURE_INDEX",
    "FEATURE_NAMES",
    "FeatureSpec",
    "compute_features",
    "specs_of",
]
