"""Model versions that cannot change under their name, sets checked before they are published or
served, version names, concurrent publishes, audit events and deploys that respect operators.
Against Azurite, with the tiny model trained in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from detector.api import create_app
from detector.cli import main as cli_main
from detector.config import ConfigError, Settings
from detector.model import MANIFEST, ArtifactSet, ModelError, sha256_file, verify_manifest
from detector.model.artifacts import load_arrays
from detector.store import POINTER, ModelStore, check_version, load_artifacts

pytestmark = [pytest.mark.azurite, pytest.mark.xdist_group("azurite")]
REPO = Path(__file__).resolve().parent.parent


def _store(tmp_path: Path, azurite: str) -> tuple[Settings, ModelStore, dict[str, str]]:
    settings = Settings(
        model_source="blob",
        model_container=f"life-{uuid.uuid4().hex[:12]}",
        model_cache_dir=tmp_path / "cache",
    )
    env = {"STORAGE": azurite}
    return settings, ModelStore.from_settings(settings, env), env


def _copy(source: Path, target: Path, **manifest_changes: Any) -> Path:
    shutil.copytree(source, target)
    if manifest_changes:
        manifest = json.loads((target / MANIFEST).read_text())
        manifest.update(manifest_changes)
        (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return target


def _rehash(folder: Path) -> None:
    """Update the manifest's checksums to the files as they are now (what a careful attacker,
    or a careless edit, does)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"] = {name: sha256_file(folder / name) for name in manifest["files"]}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


# --- pinned versions -----------------------------------------------------------------------------


def test_a_version_edited_in_place_after_activation_is_refused_at_cold_start(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path
) -> None:
    settings, store, env = _store(tmp_path, azurite)
    version = store.publish(tiny_artifacts_dir, activate=True)
    assert load_artifacts(settings, env).version == version
    # One file changed and the manifest's checksum updated to match: every checksum passes.
    edited = _copy(tiny_artifacts_dir, tmp_path / "edited")
    features = json.loads((edited / "features.json").read_text())
    features["features"][0]["fill_value"] += 1.0
    (edited / "features.json").write_text(json.dumps(features))
    _rehash(edited)
    verify_manifest(edited)
    for name in ("features.json", MANIFEST):
        store.container.upload_blob(
            f"{version}/{name}", (edited / name).read_bytes(), overwrite=True
        )
    fresh = Settings(**{**settings.__dict__, "model_cache_dir": tmp_path / "cache2"})
    with pytest.raises(ModelError, match="manifest changed after it was activated"):
        load_artifacts(fresh, env)
    # Through the app: /api/health answers 503 with the reason, as for a bad checksum.
    with TestClient(create_app(fresh, lambda: load_artifacts(fresh, env))) as client:
        health = client.get("/api/health")
    assert health.status_code == 503
    assert "manifest changed after it was activated" in health.json()["reason"]
    details = {e["version"]: e for e in store.describe()["versions"]}
    assert details[version]["state"] == "changed" and details[version]["current"]
    # A pin in the setting holds too: the right hash serves, another is refused.
    digest = hashlib.sha256((tiny_artifacts_dir / MANIFEST).read_bytes()).hexdigest()
    pinned = Settings(**{**fresh.__dict__, "model_version": f"{version}@sha256:{digest}"})
    with pytest.raises(ModelError, match="manifest changed"):
        load_artifacts(pinned, env)
    edited_digest = hashlib.sha256((edited / MANIFEST).read_bytes()).hexdigest()
    repinned = Settings(**{**fresh.__dict__, "model_version": f"{version}@sha256:{edited_digest}"})
    assert load_artifacts(repinned, env).version == version  # an operator's explicit choice


def test_versions_list_hashes_and_whether_they_match_what_was_published(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path
) -> None:
    _, store, _ = _store(tmp_path, azurite)
    sets = {v: _named(tiny_artifacts_dir, tmp_path / v, v) for v in ("v1", "v2")}
    store.publish(sets["v1"], activate=True)
    store.publish(sets["v2"])
    described = store.describe()
    assert [(e["version"], e["state"], e["current"]) for e in described["versions"]] == [
        ("v1", "ok", True),
        ("v2", "ok", False),
    ]
    for e in described["versions"]:
        digest = hashlib.sha256((sets[e["version"]] / MANIFEST).read_bytes()).hexdigest()
        assert e["manifest_sha256"] == e["published_sha256"] == digest
        assert e["verified"] is None  # the files were not read
    manifest = json.loads((sets["v2"] / MANIFEST).read_text())
    manifest["created_at"] = "changed"
    store.container.upload_blob(f"v2/{MANIFEST}", json.dumps(manifest), overwrite=True)
    assert {e["version"]: e["state"] for e in store.describe()["versions"]}["v2"] == "changed"


# --- activation proves the whole published set intact --------------------------------------------


def _named(source: Path, target: Path, version: str) -> Path:
    """A copy of an artifact set whose manifest calls it `version` (the manifest is not hashed in
    its own `files`, so every checksum still holds)."""
    return _copy(source, target, model_version=version)


def _rewrite_manifest(store: ModelStore, version: str, manifest: dict[str, Any]) -> None:
    """Replace a stored version's manifest and its published hash together (what someone with
    write access to the container can do)."""
    data = json.dumps(manifest, indent=2).encode()
    store.container.upload_blob(f"{version}/{MANIFEST}", data, overwrite=True)
    digest = hashlib.sha256(data).hexdigest().encode()
    store.container.upload_blob(f"{version}/{MANIFEST}.sha256", digest, overwrite=True)


def _tamper(store: ModelStore, version: str, kind: str, good: str) -> str:
    """Break a stored version in one way; returns what the refusal must say."""
    manifest = json.loads(store.container.download_blob(f"{version}/{MANIFEST}").readall())
    if kind == "serving file overwritten":
        store.container.upload_blob(f"{version}/scaler.npz", b"garbage", overwrite=True)
        return r"scaler\.npz fails its checksum"
    if kind == "reference tampered":
        blob = store.container.download_blob(f"{version}/random_forest.joblib").readall()
        store.container.upload_blob(f"{version}/random_forest.joblib", blob + b"\0", overwrite=True)
        return r"random_forest\.joblib fails its checksum"
    if kind == "path outside the folder":
        # Blob Storage resolves `v/../good/scaler.npz` to the good version's genuine file: its
        # checksum matches, but it is not this version's file.
        digest = manifest["files"].pop("scaler.npz")
        manifest["files"][f"../{good}/scaler.npz"] = digest
        _rewrite_manifest(store, version, manifest)
        return r"outside the artifact folder: '\.\./"
    if kind == "absolute path":
        digest = manifest["files"].pop("random_forest.joblib")
        manifest["files"]["/tmp/random_forest.joblib"] = digest
        _rewrite_manifest(store, version, manifest)
        return r"outside the artifact folder: '/tmp/random_forest\.joblib'"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["serving file overwritten", "reference tampered", "path outside the folder", "absolute path"],
)
def test_activate_refuses_a_version_that_is_not_intact_and_keeps_the_pointer(
    tmp_path: Path,
    azurite: str,
    tiny_artifacts_dir: Path,
    kind: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, store, env = _store(tmp_path, azurite)
    good = store.publish(_named(tiny_artifacts_dir, tmp_path / "good", "good"), activate=True)
    bad = store.publish(_named(tiny_artifacts_dir, tmp_path / "bad", "bad"))
    before = store.current()
    message = _tamper(store, bad, kind, good)
    with pytest.raises(ModelError, match=f"model version 'bad' not activated: .*{message}"):
        store.activate(bad)
    assert store.current() == before
    # `ptd activate` (and so rollbacks, publish-model.sh, retrain.sh): one line, exit 2.
    monkeypatch.setenv("STORAGE", azurite)
    monkeypatch.setenv("PTD_MODEL_CONTAINER", settings.model_container)
    capsys.readouterr()
    assert cli_main(["activate", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptd activate: error: model version 'bad' not activated: "), err
    assert "\n" not in err and re.search(message, err)
    assert store.current() == before
    # What activation refuses, the cold start refuses (it never reads the references).
    if kind != "reference tampered":
        pinned = Settings(**{**settings.__dict__, "model_version": bad})
        with pytest.raises(ModelError, match=message):
            load_artifacts(pinned, env)
    # `ptd versions` compared the manifests only, and says so; `--verify` checks every file.
    capsys.readouterr()
    assert cli_main(["versions"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all("files not checked (ptd versions --verify)" in line for line in lines), lines
    assert cli_main(["versions", "--verify"]) == 1
    out, err = capsys.readouterr()
    listed = {line[2:].split()[0]: line for line in out.splitlines()}
    assert listed["good"].startswith("* good") and listed["good"].endswith("every file verified")
    assert re.search(f"FAILS: .*{message}", listed["bad"]), listed["bad"]
    assert "1 version(s) fail verification" in err
    assert cli_main(["versions", "--verify", "--json"]) == 1
    details = {e["version"]: e for e in json.loads(capsys.readouterr().out)["details"]}
    assert details["good"]["verified"] is True and details["bad"]["verified"] is False
    assert re.search(message, details["bad"]["verify_error"])


def test_activate_refuses_a_manifest_changed_since_it_was_published(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path
) -> None:
    """Every file still matches the rewritten manifest, but it is not the published one."""
    _, store, _ = _store(tmp_path, azurite)
    version = store.publish(tiny_artifacts_dir)
    manifest = json.loads((tiny_artifacts_dir / MANIFEST).read_text())
    manifest["models"]["lightgbm"]["threshold"] = 0.01  # flags nearly everyone
    store.container.upload_blob(f"{version}/{MANIFEST}", json.dumps(manifest), overwrite=True)
    with pytest.raises(ModelError, match="not activated: its manifest changed since it was"):
        store.activate(version)
    assert store.current() is None
    # `ptd versions --verify` checks as activation does: every file matches, yet it fails.
    (entry,) = store.describe(verify=True)["versions"]
    assert (entry["state"], entry["verified"]) == ("changed", False)
    assert "its manifest changed since it was published" in entry["verify_error"]


# The peak resident memory of this process alone: VmHWM is per address space (ru_maxrss would
# carry the forking test process's own peak over the exec).
MEASURE_VERIFY = """
import re, sys
from pathlib import Path
from detector.config import Settings
from detector.store import ModelStore
ModelStore.from_settings(Settings.from_env()).verify(sys.argv[1])
print(re.search(r"VmHWM:\\s*(\\d+) kB", Path("/proc/self/status").read_text())[1])
"""


def test_verification_streams_the_files_in_bounded_memory(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path
) -> None:
    """A 96 MB reference file streams to disk in ranges and is hashed in blocks, never held in
    memory: the peak resident memory of a fresh process grows by far less than the file."""
    settings, store, _ = _store(tmp_path, azurite)
    small = store.publish(_named(tiny_artifacts_dir, tmp_path / "small", "small"))
    folder = _named(tiny_artifacts_dir, tmp_path / "big", "big")
    size = 96 * 1024 * 1024
    with (folder / "big.joblib").open("wb") as handle:
        for _ in range(size // (1 << 20)):
            handle.write(os.urandom(1 << 20))
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["big.joblib"] = sha256_file(folder / "big.joblib")
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    big = store.publish(folder)
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PTD_", "STORAGE"))},
        "STORAGE": azurite,
        "PTD_MODEL_CONTAINER": settings.model_container,
        "PYTHONPATH": str(REPO),
    }

    def peak_kb(version: str) -> int:
        """The peak resident memory of a fresh process that verifies `version`."""
        done = subprocess.run(
            [sys.executable, "-c", MEASURE_VERIFY, version],
            env=environ,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout)

    # Measured: +17 MB (4 MiB GETs, two at once); 133 MB when the file is read whole.
    small_kb, big_kb = peak_kb(small), peak_kb(big)
    assert (big_kb - small_kb) * 1024 < size / 3, (small_kb, big_kb)


def test_publish_never_overwrites_the_published_hash(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path
) -> None:
    """`manifest.json.sha256` is created once (If-None-Match): a publish that finds one (left by
    an interrupted publish: files and hash uploaded, no manifest yet) keeps it as it is."""
    _, store, _ = _store(tmp_path, azurite)
    version = ArtifactSet(tiny_artifacts_dir).version
    digest = sha256_file(tiny_artifacts_dir / MANIFEST)
    sidecar = store.container.get_blob_client(f"{version}/{MANIFEST}.sha256")
    store.container.create_container()
    sidecar.upload_blob(digest.encode())  # the same manifest's: the publish resumes
    etag = sidecar.get_blob_properties().etag
    assert store.publish(tiny_artifacts_dir) == version
    assert sidecar.get_blob_properties().etag == etag  # not rewritten
    assert {e["version"]: e["state"] for e in store.describe()["versions"]} == {version: "ok"}
    # One that records another manifest is never replaced: that publish is refused.
    other = _named(tiny_artifacts_dir, tmp_path / "other", "other")
    blob = store.container.get_blob_client(f"other/{MANIFEST}.sha256")
    blob.upload_blob(b"0" * 64)
    etag = blob.get_blob_properties().etag
    with pytest.raises(ModelError, match=r"already records another manifest .* never overwritten"):
        store.publish(other)
    assert blob.get_blob_properties().etag == etag
    assert store.versions() == [version]


# --- a set is published and served under its own version only ------------------------------------


def test_publish_refuses_a_version_name_other_than_the_manifests(
    tmp_path: Path,
    azurite: str,
    tiny_artifacts_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings, store, _ = _store(tmp_path, azurite)
    own = ArtifactSet(tiny_artifacts_dir).version
    with pytest.raises(
        ModelError, match=f"--version 'other' is not the set's model_version '{own}'.*retrain"
    ):
        store.publish(tiny_artifacts_dir, version="other")
    assert store.versions() == []
    monkeypatch.setenv("STORAGE", azurite)
    monkeypatch.setenv("PTD_MODEL_CONTAINER", settings.model_container)
    capsys.readouterr()
    args = ["publish", "--artifacts", str(tiny_artifacts_dir), "--version"]
    assert cli_main([*args, "other", "--activate"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("ptd publish: error: --version 'other' is not the set's") and "\n" not in err
    )
    assert store.versions() == []  # nothing uploaded, not even the container
    assert cli_main([*args, own]) == 0  # its own name, spelt out: accepted
    assert store.versions() == [own] and store.current() is None


def test_a_version_stored_under_another_name_is_refused_at_activation_and_cold_start(
    tmp_path: Path,
    azurite: str,
    tiny_artifacts_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A set copied under another name behind the store (or published under a --version of its
    choosing by an older ptd) would report its manifest's version while another is served."""
    settings, store, env = _store(tmp_path, azurite)
    good = store.publish(_named(tiny_artifacts_dir, tmp_path / "good", "good"), activate=True)
    own = ArtifactSet(tiny_artifacts_dir).version
    for name in [*json.loads((tiny_artifacts_dir / MANIFEST).read_text())["files"], MANIFEST]:
        data = (tiny_artifacts_dir / name).read_bytes()
        store.container.upload_blob(f"renamed/{name}", data)
    refusal = f"its manifest's model_version is '{own}'"
    with pytest.raises(ModelError, match=f"model version 'renamed' not activated: {refusal}"):
        store.activate("renamed")
    assert (store.current() or {})["version"] == good
    # The cold start refuses it, pinned or through a pointer written before this check: 503.
    pointer = {
        "version": "renamed",
        "manifest_sha256": sha256_file(tiny_artifacts_dir / MANIFEST),
        "previous": good,
    }
    store.container.upload_blob(POINTER, json.dumps(pointer), overwrite=True)
    pinned = Settings(**{**settings.__dict__, "model_version": "renamed"})
    for chosen in (settings, pinned):
        with pytest.raises(ModelError, match=refusal):
            load_artifacts(chosen, env)
        with TestClient(create_app(chosen, lambda c=chosen: load_artifacts(c, env))) as client:
            health = client.get("/api/health")
        assert health.status_code == 503 and refusal in health.json()["reason"]
    # `ptd fetch` (the smoke test's golden scores, the retraining's champion) too.
    monkeypatch.setenv("STORAGE", azurite)
    monkeypatch.setenv("PTD_MODEL_CONTAINER", settings.model_container)
    capsys.readouterr()
    assert cli_main(["fetch", "renamed", "--out", str(tmp_path / "fetched")]) == 2
    assert refusal in capsys.readouterr().err


# --- sets checked before they are published or served --------------------------------------------


def _nan_threshold(source: Path, target: Path) -> Path:
    folder = _copy(source, target)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["models"]["lightgbm"]["threshold"] = float("nan")
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_a_nan_threshold_is_refused_at_publish_and_at_load(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path
) -> None:
    settings, store, env = _store(tmp_path, azurite)
    folder = _nan_threshold(tiny_artifacts_dir, tmp_path / "nan")
    with pytest.raises(ModelError, match="must be probabilities"):
        store.publish(folder, version="bad")
    assert store.versions() == []
    # Uploaded behind publish's back: activation refuses it, and so does a cold start pinned to it.
    store.container.create_container()
    for name in [*json.loads((folder / MANIFEST).read_text())["files"], MANIFEST]:
        store.container.upload_blob(f"bad/{name}", (folder / name).read_bytes(), overwrite=True)
    with pytest.raises(ModelError, match=r"'bad' not activated: .*must be probabilities"):
        store.activate("bad")
    assert store.current() is None
    pinned = Settings(**{**settings.__dict__, "model_version": "bad"})
    with pytest.raises(ModelError, match="must be probabilities"):
        load_artifacts(pinned, env)


@pytest.mark.parametrize(
    ("file", "key", "value", "message"),
    [
        ("scaler.npz", "scale", np.zeros(40), "scales positive"),
        ("scaler.npz", "mean", np.full(40, np.inf), "must be finite"),
        ("logistic_regression.npz", "coef", np.full(40, np.nan), "coefficients must be finite"),
        ("logistic_regression.npz", "coef", np.ones(3), "expected 40 coefficients"),
        ("lightgbm.npz", "value", None, "not finite"),
        ("lightgbm.npz", "left", None, "point forward"),
    ],
)
def test_out_of_range_numbers_and_broken_trees_are_refused(
    tmp_path: Path, tiny_artifacts_dir: Path, file: str, key: str, value: Any, message: str
) -> None:
    folder = _copy(tiny_artifacts_dir, tmp_path / "set")
    arrays = dict(np.load(folder / file))
    if value is None and key == "value":
        value = arrays["value"].copy()
        value[3] = np.inf
    elif value is None and key == "left":  # a cycle: an internal node's child is the root
        value = arrays["left"].copy()
        value[np.flatnonzero(value >= 0)[1]] = 0
    arrays[key] = value
    np.savez_compressed(folder / file, **arrays)
    _rehash(folder)
    with pytest.raises(ModelError, match=message):
        ArtifactSet(folder)


def test_an_npz_that_claims_gigabytes_is_refused_before_anything_is_inflated(
    tmp_path: Path,
) -> None:
    """The header declares 2**40 float64 values; nothing near that is ever allocated."""
    path = tmp_path / "bomb.npz"
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1))
    header["shape"] = (2**40,)
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("value.npy", "w") as out,
    ):
        np.lib.format.write_array_header_1_0(out, header)
        out.write(b"\0" * (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match="declares 8,796,093,022,208 bytes"):
            load_arrays(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024 * 1024


def test_an_npz_that_inflates_past_its_header_reads_only_what_it_declares(
    tmp_path: Path,
) -> None:
    """A member whose data goes on far beyond its declared shape (a zip bomb behind a small
    header): exactly the declared bytes are read."""
    path = tmp_path / "long.npz"
    header = np.lib.format.header_data_from_array_1_0(np.zeros(4))
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive,
        archive.open("value.npy", "w") as out,
    ):
        np.lib.format.write_array_header_1_0(out, header)
        for _ in range(64):  # 512 MB of zeros, a few hundred KB compressed
            out.write(b"\0" * (8 << 20))
    tracemalloc.start()
    try:
        arrays = load_arrays(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert arrays["value"].shape == (4,) and peak < 16 * 1024 * 1024


def test_npy_headers_are_never_parsed_by_two_threads_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """numpy parses headers with `ast.literal_eval`, which CPython < 3.13 cannot run in two
    threads at once (python/cpython#106905: a CI run failed on it); concurrent loads, as two
    publishers or two cold starts make, take turns at the header."""
    path = tmp_path / "arrays.npz"
    np.savez(path, a=np.zeros(3), b=np.ones(2))
    parse = np.lib.format.read_array_header_1_0
    inside = 0
    most = 0
    count_lock = threading.Lock()

    def slow_parse(*args: Any, **kwargs: Any) -> Any:
        nonlocal inside, most
        with count_lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.01)  # long enough that unserialised threads would overlap here
        try:
            return parse(*args, **kwargs)
        finally:
            with count_lock:
                inside -= 1

    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", slow_parse)
    start = threading.Barrier(4)
    loaded: list[dict[str, np.ndarray]] = []

    def load() -> None:
        start.wait()
        loaded.append(load_arrays(path))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(loaded) == 4 and all(list(arrays["b"]) == [1.0, 1.0] for arrays in loaded)
    assert most == 1


def test_pickled_or_structured_members_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, value=np.array([object()], dtype=object))
    with pytest.raises(ModelError, match="is not a number"):
        load_arrays(path)


def test_training_validates_before_it_writes(
    synthetic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A set that fails the validation never reaches the output folder."""
    import detector.training.pipeline as pipeline

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier set")
    monkeypatch.setattr(pipeline, "best_f1_threshold", lambda labels, scores: float("nan"))
    with pytest.raises(ModelError, match="must be probabilities"):
        pipeline.train(synthetic_dir, out, cv_folds=3, n_jobs=1, forest_params={"n_estimators": 5})
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-staging")]


# --- names ---------------------------------------------------------------------------------------

BAD_NAMES = [
    *("a\\b", "x" * 300, "v1\x1b[31m", "../v1", ".hidden", "a/b", "a b", "", "-v1", "v1?"),
    # Azure Storage advises that no blob path segment end with a dot.
    *("x.", "v1..", "x" * 63 + "."),
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_version_names_are_refused_everywhere(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path, name: str
) -> None:
    _, store, _ = _store(tmp_path, azurite)
    if name:  # an empty --version means "the manifest's own version"
        with pytest.raises(ModelError, match="invalid model version"):
            store.publish(tiny_artifacts_dir, version=name)
    with pytest.raises(ModelError, match="invalid model version"):
        store.activate(name)
    if name:
        with pytest.raises(ConfigError, match="PTD_MODEL_VERSION"):
            Settings.from_env({"PTD_MODEL_VERSION": name})
    assert store.versions() == []


@pytest.mark.parametrize("name", ["1", "v1.0", "v1.0-rc_1", "x_", "x-", "x" * 64, "a.b.c"])
def test_names_at_the_edges_of_the_rule_are_accepted(name: str) -> None:
    assert check_version(name) == name
    assert Settings.from_env({"PTD_MODEL_VERSION": name}).model_version == name
    with pytest.raises(ModelError, match="invalid model version"):
        check_version(name + "x" * (65 - len(name)))  # 65 characters


def test_a_nested_name_written_behind_the_store_is_not_a_version(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path
) -> None:
    _, store, _ = _store(tmp_path, azurite)
    store.publish(_named(tiny_artifacts_dir, tmp_path / "ok", "ok"), version="ok")
    store.container.upload_blob(f"a\\b/{MANIFEST}", b"{}")  # Blob Storage reads "\\" as "/"
    store.container.upload_blob(f"x./{MANIFEST}", b"{}")  # a segment ending with a dot
    assert store.versions() == ["ok"]
    assert store.describe()["invalid_names"] == ["a/b", "x."]


# --- concurrent publishes ------------------------------------------------------------------------


def test_two_publishers_of_one_version_never_leave_a_mixed_version(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path
) -> None:
    mine = _named(tiny_artifacts_dir, tmp_path / "mine", "race")
    other = _copy(
        tiny_artifacts_dir, tmp_path / "other", created_at="another training", model_version="race"
    )
    features = json.loads((other / "features.json").read_text())
    features["missing"] = "another text, so every file but the arrays differs"
    (other / "features.json").write_text(json.dumps(features))
    _rehash(other)
    for attempt in range(4):
        _, store, _ = _store(tmp_path / str(attempt), azurite)
        start = threading.Barrier(2)
        outcomes: dict[str, str] = {}

        def publish(
            label: str,
            folder: Path,
            start: threading.Barrier = start,
            store: ModelStore = store,
            outcomes: dict[str, str] = outcomes,
        ) -> None:
            start.wait()
            try:
                store.publish(folder, version="race")
                outcomes[label] = "published"
            except ModelError as exc:
                outcomes[label] = str(exc)

        threads = [
            threading.Thread(target=publish, args=("a", mine)),
            threading.Thread(target=publish, args=("b", other)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert list(outcomes.values()).count("published") == 1, outcomes
        loser = next(v for v in outcomes.values() if v != "published")
        assert "being published by someone else" in loser or "already exists" in loser
        # The one version in the store is complete and consistent: every file its manifest's.
        target = tmp_path / f"check-{attempt}"
        target.mkdir()
        manifest = json.loads(store.container.download_blob(f"race/{MANIFEST}").readall())
        for name in [*manifest["files"], MANIFEST]:
            (target / name).write_bytes(store.container.download_blob(f"race/{name}").readall())
        verify_manifest(target)
        ArtifactSet(target)


# --- audit ---------------------------------------------------------------------------------------


def test_publish_and_activate_write_audit_events_naming_who(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, store, _ = _store(tmp_path, azurite)
    monkeypatch.setenv("PTD_ACTOR", "github:octocat")
    store.publish(_named(tiny_artifacts_dir, tmp_path / "v1", "v1"), activate=True)
    monkeypatch.delenv("PTD_ACTOR")
    store.publish(_named(tiny_artifacts_dir, tmp_path / "v2", "v2"), version="v2", activate=True)
    events = [
        json.loads(store.container.download_blob(b.name).readall())
        for b in store.container.list_blobs(name_starts_with="audit/")
    ]
    summary = [(e["event"], e["version"], e["previous"], e["actor"]) for e in events]
    assert summary == [
        ("model_published", "v1", None, "github:octocat"),
        ("model_activated", "v1", None, "github:octocat"),
        ("model_published", "v2", None, "shared key (connection string)"),
        ("model_activated", "v2", "v1", "shared key (connection string)"),
    ]
    pointer = json.loads(store.container.download_blob(POINTER).readall())
    assert pointer["activated_by"] == "shared key (connection string)"
    assert pointer["previous"] == "v1" and pointer["previous_manifest_sha256"]


# --- deploys respect operators -------------------------------------------------------------------


def _publish_step(tmp_path: Path, azurite: str, container: str, **env: str) -> dict[str, str]:
    """scripts/publish-model.sh, as the deploy workflow runs it, with the real `ptd`."""
    environ = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("PTD_", "STORAGE"))},
        "STORAGE": azurite,
        "PTD_MODEL_CONTAINER": container,
        "PTD": f"{sys.executable} -m detector",
        "PUBLISH_ATTEMPTS": "1",
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_OUTPUT": str(tmp_path / "github_output"),
        "PYTHONPATH": str(REPO),
        **env,
    }
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "publish-model.sh")],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    outputs = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    written = (tmp_path / "github_output").read_text()
    assert all(f"{k}={v}" in written for k, v in outputs.items())
    return outputs


def test_a_deploy_never_replaces_the_active_version_unless_asked(
    tmp_path: Path, azurite: str, tiny_artifacts_dir: Path, bundled: ArtifactSet
) -> None:
    settings, store, _ = _store(tmp_path, azurite)
    container = settings.model_container
    # First deploy: nothing is active, the bundled version is activated.
    first = _publish_step(tmp_path, azurite, container)
    assert first["active"] == first["bundled"] == bundled.version and first["activated"] == "true"
    # An operator rolls forward to another model.
    store.publish(_named(tiny_artifacts_dir, tmp_path / "op", "operator-choice"), activate=True)
    pointer = store.current()
    # The next deploy publishes the bundled set again but leaves the operator's choice active,
    # and fetches that set for the smoke test's golden scores.
    again = _publish_step(tmp_path, azurite, container)
    assert store.current() == pointer
    assert (again["before"], again["active"], again["activated"]) == (
        "operator-choice",
        "operator-choice",
        "false",
    )
    assert ArtifactSet(Path(again["model_dir"])).version == "operator-choice"
    # Asked for explicitly (the workflow input), the bundled model is activated.
    forced = _publish_step(tmp_path, azurite, container, ACTIVATE_BUNDLED_MODEL="true")
    assert forced["active"] == bundled.version and forced["activated"] == "true"
    assert forced["model_dir"] == ""
    assert (store.current() or {})["previous"] == "operator-choice"


def test_ptd_score_scores_with_the_model_the_settings_name(
    tmp_path: Path,
    azurite: str,
    tiny_artifacts_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """RUNBOOKS reprocesses a file locally with `ptd score` to get Azure's results: so it must
    score with the store's active version (after a rollback or a retrain, not the bundled set),
    PTD_MODEL_DIR when the source is local, and --model-dir only when asked."""
    from tests.synthetic import make_steg

    settings, store, _ = _store(tmp_path, azurite)
    active = store.publish(_named(tiny_artifacts_dir, tmp_path / "a", "active-one"), activate=True)
    _, invoices = make_steg(30, seed=5)
    path = tmp_path / "inv.csv"
    invoices.to_csv(path, index=False)

    def version_scored(*extra: str) -> str:
        out = tmp_path / "r.csv"
        assert cli_main(["score", str(path), "--out", str(out), *extra]) == 0, capsys.readouterr()
        return str(json.loads((tmp_path / "r.summary.json").read_text())["model_version"])

    monkeypatch.setenv("STORAGE", azurite)
    monkeypatch.setenv("PTD_MODEL_SOURCE", "blob")
    monkeypatch.setenv("PTD_MODEL_CONTAINER", settings.model_container)
    monkeypatch.setenv("PTD_MODEL_CACHE_DIR", str(tmp_path / "cache"))
    assert version_scored() == active
    assert version_scored("--model-dir", str(REPO / "models_artifacts")) != active
    monkeypatch.setenv("PTD_MODEL_SOURCE", "local")
    monkeypatch.setenv("PTD_MODEL_DIR", str(tiny_artifacts_dir))
    assert version_scored() == ArtifactSet(tiny_artifacts_dir).version
    # An unreachable choice is one line and exit 2, never the bundled set instead.
    monkeypatch.setenv("PTD_MODEL_SOURCE", "blob")
    monkeypatch.setenv("PTD_MODEL_CONTAINER", "no-such-container")
    capsys.readouterr()
    assert cli_main(["score", str(path), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ptd score: error:") and err.count("\n") == 1


def test_ptd_versions_names_a_missing_container(
    tmp_path: Path,
    azurite: str,
    tiny_artifacts_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A mistyped PTD_MODEL_CONTAINER is an error (exit 2), as in ptd activate and ptd fetch,
    not an empty store (exit 0)."""
    settings, store, _ = _store(tmp_path, azurite)
    monkeypatch.setenv("STORAGE", azurite)
    monkeypatch.setenv("PTD_MODEL_CONTAINER", settings.model_container)
    capsys.readouterr()
    assert cli_main(["versions"]) == 2
    err = capsys.readouterr().err
    assert "container not found" in err and settings.model_container in err
    # Scripts read --json (publish-model.sh before the first publish): no error, but said.
    assert cli_main(["versions", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["versions"] == [] and listed["container_exists"] is False
    store._ensure_container()  # an existing, empty container: no version yet, not an error
    assert cli_main(["versions"]) == 0
    assert "no model version published" in capsys.readouterr().err
