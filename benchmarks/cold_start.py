"""Cold start: process start to first prediction, with the model from local files or from Azurite.

    .venv/bin/python -m benchmarks.cold_start [--artifacts models_artifacts] [--runs 3]

Starts Azurite (tests/azurite.py), publishes the artifact set, then for each run starts a fresh
Python process with an empty model cache that (1) imports what it needs, (2) reads the pointer,
(3) downloads the serving files (not the references: *.joblib, lightgbm.txt), (4) verifies
their SHA-256, (5) loads the arrays and (6) scores one client. Each step is timed in the child;
the parent times the whole thing from spawn, so the interpreter's own start is included. A
second variant imports `function_app` first (the HTTP app and the trigger, what a Functions
worker imports) and then calls `store.load_artifacts`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CHILD_STEPS = r"""
import time, json, sys, os
t = {"start": time.time()}
from pathlib import Path
import numpy as np
from detector.config import Settings
from detector.features import FEATURE_NAMES
from detector.model import ArtifactSet, verify_manifest
from detector.store import ModelStore
import azure.storage.blob
t["imports"] = time.time()
settings = Settings.from_env()
store = ModelStore.from_settings(settings)
version = store.current()["version"]
t["pointer"] = time.time()
from detector import store as store_module
directory = Path(settings.model_cache_dir) / version
# download() verifies in its staging folder before the rename; time the verify separately.
original = store_module.verify_manifest
spent = {"verify": 0.0}
def timed(path, **options):
    s = time.time(); r = original(path, **options); spent["verify"] += time.time() - s; return r
store_module.verify_manifest = timed
store.download(version, settings.model_cache_dir)
t["download"] = time.time() - spent["verify"]
s = time.time(); verify_manifest(directory, references_optional=True)
spent["verify"] += time.time() - s
t["verify_total"] = spent["verify"]
s = time.time(); artifacts = ArtifactSet(directory, verify=False); t["load"] = time.time() - s
s = time.time()
scores = artifacts.score(np.full((1, len(FEATURE_NAMES)), np.nan))
t["first_prediction"] = time.time() - s
t["end"] = time.time()
print(json.dumps(t))
"""

CHILD_LOCAL = r"""
import time, json, sys, os
t = {"start": time.time()}
from pathlib import Path
import numpy as np
from detector.config import Settings
from detector.features import FEATURE_NAMES
from detector.model import ArtifactSet, verify_manifest
t["imports"] = time.time()
settings = Settings.from_env()
s = time.time(); verify_manifest(Path(settings.model_dir), references_optional=True)
t["verify_total"] = time.time() - s
s = time.time(); artifacts = ArtifactSet(Path(settings.model_dir), verify=False)
t["load"] = time.time() - s
s = time.time()
scores = artifacts.score(np.full((1, len(FEATURE_NAMES)), np.nan))
t["first_prediction"] = time.time() - s
t["end"] = time.time()
print(json.dumps(t))
"""

CHILD_APP = r"""
import time, json
t = {"start": time.time()}
import function_app
t["import_function_app"] = time.time()
import numpy as np
from detector.features import FEATURE_NAMES
from detector.store import load_artifacts
artifacts = load_artifacts(function_app.settings)
t["load_artifacts"] = time.time()
artifacts.score(np.full((1, len(FEATURE_NAMES)), np.nan))
t["end"] = time.time()
print(json.dumps(t))
"""


def _child(code: str, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    spawned = time.time()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return data["end"] - spawned, {**data, "spawned": spawned}


def _steps(t: dict[str, float], total: float) -> dict[str, float]:
    """Seconds per step of one CHILD_STEPS / CHILD_LOCAL run."""
    out = {
        "total": total,
        "interpreter": t["start"] - t["spawned"],
        "imports": t["imports"] - t["start"],
    }
    if "pointer" in t:
        out["pointer"] = t["pointer"] - t["imports"]
        out["download"] = t["download"] - t["pointer"]
    out["verify"] = t["verify_total"]
    out["load"] = t["load"]
    out["first_prediction"] = t["first_prediction"]
    return out


def _app_steps(t: dict[str, float], total: float) -> dict[str, float]:
    return {
        "total": total,
        "interpreter": t["start"] - t["spawned"],
        "import_function_app": t["import_function_app"] - t["start"],
        "load_artifacts": t["load_artifacts"] - t["import_function_app"],
        "first_prediction": t["end"] - t["load_artifacts"],
    }


def measure_local(artifacts: Path, runs: int) -> dict[str, list[dict[str, float]]]:
    """Fresh processes with the bundled files: library only, and importing function_app."""
    import os

    env = {
        **os.environ,
        "PTD_MODEL_SOURCE": "local",
        "PTD_MODEL_DIR": str(artifacts),
        "PYTHONPATH": str(REPO),
    }
    steps, app = [], []
    for _ in range(runs):
        total, t = _child(CHILD_LOCAL, env)
        steps.append(_steps(t, total))
        total, t = _child(CHILD_APP, env)
        app.append(_app_steps(t, total))
    return {"steps": steps, "function_app": app}


def measure_blob(artifacts: Path, runs: int) -> dict[str, Any]:
    """Azurite started, the set published, then fresh processes with an empty model cache."""
    import os

    from detector.config import Settings
    from detector.store import ModelStore
    from tests.azurite import azurite

    with azurite() as connection, tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "STORAGE": connection,
            "PTD_MODEL_SOURCE": "blob",
            "PTD_MODEL_CONTAINER": "models",
            "PYTHONPATH": str(REPO),
        }
        store = ModelStore.from_settings(Settings.from_env(env), env)
        version = store.publish(Path(artifacts), activate=True)
        steps, app = [], []
        for run in range(runs):
            env["PTD_MODEL_CACHE_DIR"] = f"{tmp}/steps-{run}"
            total, t = _child(CHILD_STEPS, env)
            steps.append(_steps(t, total))
            env["PTD_MODEL_CACHE_DIR"] = f"{tmp}/app-{run}"
            total, t = _child(CHILD_APP, env)
            app.append(_app_steps(t, total))
        # What a cold start fetched (serving files + manifest), not the whole published set.
        downloaded = sum(p.stat().st_size for p in Path(f"{tmp}/steps-0/{version}").iterdir())
    return {
        "version": version,
        "downloaded_mb": downloaded / 1e6,
        "steps": steps,
        "function_app": app,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default=str(REPO / "models_artifacts"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for name, result in (
        ("local files", measure_local(Path(args.artifacts), args.runs)),
        ("Azurite", measure_blob(Path(args.artifacts), args.runs)),
    ):
        for variant in ("steps", "function_app"):
            for run, steps in enumerate(result[variant]):
                parts = " + ".join(f"{k} {v:.3f}" for k, v in steps.items() if k != "total")
                print(f"{name} / {variant} run {run + 1}: {steps['total']:.2f} s = {parts}")
            totals = [s["total"] for s in result[variant]]
            print(f"{name} / {variant}: median {statistics.median(totals):.2f} s")


if __name__ == "__main__":
    main()
