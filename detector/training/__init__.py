"""Training: labelled data, model families, cross-validation on full and truncated histories,
feature selection, and the artifact set.

* `data`: the STEG tables prepared once, labels, feature matrices per view;
* `learners`: LightGBM, random forest and logistic regression as training fits them;
* `metrics`: ROC-AUC, PR-AUC, precision at the top, calibration, the decision threshold;
* `pipeline`: `train`, what `ptd train` runs;
* `selection`: `select_features`, what `ptd select-features` runs to choose the served set.

scikit-learn and LightGBM are training dependencies (requirements-dev.txt); serving needs
neither.
"""

from detector.training.metrics import evaluate, precision_at_top
from detector.training.pipeline import CV_FOLDS, HOLDOUT_SHARE, SEED, train

__all__ = ["CV_FOLDS", "HOLDOUT_SHARE", "SEED", "evaluate", "precision_at_top", "train"]
