"""Cold start: process start to first prediction, with the model pulled from Azurite.

    .venv/bin/python -m benchmarks.cold_start [--artifacts models_artifacts] [--runs 3]

Starts Azurite (tests/azurite.py), publishes the artifact set, then for each run starts a fresh
Python process with an empty model cache that (1) imports what it needs, (2) reads the pointer,
(3) downloads the set, (4) verifies every SHA-256, (5) loads the arrays and (6) scores one
client. Each step is timed in the child; the parent times the whole thing from spawn, so the
interpreter's own start is included. A second variant imports `function_app` first (the HTTP app
and the trigger, what a Functions worker imports) and then calls `store.load_artifacts`.
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
def timed(path):
    s = time.time(); r = original(path); spent["verify"] += time.time() - s; return r
store_module.verify_manifest = timed
store.download(version, settings.model_cache_dir)
t["download"] = time.time() - spent["verify"]
s = time.time(); verify_manifest(directory); spent["verify"] += time.time() - s
t["verify_total"] = spent["verify"]
s = time.time(); artifacts = ArtifactSet(directory, verify=False); t["load"] = time.time() - s
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


def main() -> None:
    import os

    from detector.config import Settings
    from detector.store import ModelStore
    from tests.azurite import azurite

    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", default=str(REPO / "models_artifacts"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    size = sum(p.stat().st_size for p in Path(args.artifacts).iterdir()) / 1e6
    with azurite() as connection, tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "STORAGE": connection,
            "PTD_MODEL_SOURCE": "blob",
            "PTD_MODEL_CONTAINER": "models",
            "PYTHONPATH": str(REPO),
        }
        store = ModelStore.from_settings(Settings.from_env(env), env)
        version = store.publish(Path(args.artifacts), activate=True)
        print(f"published {version} ({size:.1f} MB) to Azurite")
        totals, app_totals = [], []
        for run in range(args.runs):
            env["PTD_MODEL_CACHE_DIR"] = f"{tmp}/steps-{run}"
            total, t = _child(CHILD_STEPS, env)
            totals.append(total)
            print(
                f"run {run + 1}: {total:.2f} s = interpreter {t['start'] - t['spawned']:.2f} + "
                f"imports {t['imports'] - t['start']:.2f} + "
                f"pointer {t['pointer'] - t['imports']:.2f}"
                f" + download {t['download'] - t['pointer']:.2f} + verify {t['verify_total']:.2f}"
                f" + load {t['load']:.2f} + first prediction {t['first_prediction'] * 1000:.1f} ms"
            )
            env["PTD_MODEL_CACHE_DIR"] = f"{tmp}/app-{run}"
            total, t = _child(CHILD_APP, env)
            app_totals.append(total)
            print(
                f"  via function_app: {total:.2f} s = interpreter {t['start'] - t['spawned']:.2f} "
                f"+ import function_app {t['import_function_app'] - t['start']:.2f} + "
                f"load_artifacts (pointer, download, verify, load) "
                f"{t['load_artifacts'] - t['import_function_app']:.2f} + predict "
                f"{(t['end'] - t['load_artifacts']) * 1000:.1f} ms"
            )
        print(
            f"median process start -> first prediction: {statistics.median(totals):.2f} s "
            f"(library only), {statistics.median(app_totals):.2f} s (importing function_app)"
        )


if __name__ == "__main__":
    main()
