"""The model store against Azurite: publish, cold-start pull, verify, rollback, refusals."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from detector.config import ConfigError, Settings
from detector.model import MANIFEST, ArtifactSet, ModelError
from detector.store import (
    POINTER,
    ModelStore,
    blob_service_client,
    describe_connection,
    load_artifacts,
)
from tests.azurite import connection_string, free_port
from tests.test_model import REFERENCES, SERVING, random_features

pytestmark = [pytest.mark.azurite, pytest.mark.xdist_group("azurite")]


def _settings(tmp_path: Path, container: str, **extra: object) -> Settings:
    return Settings(
        model_source="blob",
        model_container=container,
        model_cache_dir=tmp_path / "cache",
        **extra,  # type: ignore[arg-type]
    )


def _container() -> str:
    return f"models-{uuid.uuid4().hex[:12]}"


def _as_version(source: Path, target: Path, version: str) -> Path:
    """A copy of an artifact set that calls itself `version` (the manifest is not hashed)."""
    shutil.copytree(source, target)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["model_version"] = version
    (target / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return target


@pytest.fixture
def env(azurite: str) -> dict[str, str]:
    return {"STORAGE": azurite}


class Published(NamedTuple):
    settings: Settings
    store: ModelStore
    version: str


@pytest.fixture
def published(tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path) -> Published:
    """The tiny artifact set, published and activated in a container of its own."""
    settings = _settings(tmp_path, _container())
    store = ModelStore.from_settings(settings, env)
    return Published(settings, store, store.publish(tiny_artifacts_dir, activate=True))


def test_publish_then_cold_start_pull_verifies_and_loads(
    published: Published, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    settings, store, version = published
    manifest = json.loads((tiny_artifacts_dir / MANIFEST).read_text())
    assert version == manifest["model_version"]
    assert store.versions() == [version]
    pointer = store.current()
    assert pointer is not None and pointer["version"] == version and pointer["previous"] is None
    digest = hashlib.sha256((tiny_artifacts_dir / MANIFEST).read_bytes()).hexdigest()
    assert pointer["manifest_sha256"] == digest
    names = {b.name for b in store.container.list_blobs() if not b.name.startswith("audit/")}
    assert names == {POINTER, f"{version}/{MANIFEST}", f"{version}/{MANIFEST}.sha256"} | {
        f"{version}/{f}" for f in manifest["files"]
    }

    artifacts = load_artifacts(settings, env)
    assert artifacts.version == version
    assert artifacts.directory == settings.model_cache_dir / version
    # A second start reuses the verified cache.
    again = load_artifacts(settings, env)
    assert again.version == version


def _spy_downloads(store: ModelStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The blob names the store downloads from now on."""
    fetched: list[str] = []
    original = store.container.download_blob

    def download_blob(blob: str, *args: object, **kwargs: object) -> object:
        fetched.append(blob)
        return original(blob, *args, **kwargs)

    monkeypatch.setattr(store.container, "download_blob", download_blob)
    return fetched


def test_cold_start_downloads_only_the_serving_files(
    tmp_path: Path, env: dict[str, str], bundled: ArtifactSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bundled set as published (its manifest predates the rule): 1.5 MB of 6.1 MB to fetch.
    store = ModelStore.from_settings(_settings(tmp_path, _container()), env)
    version = store.publish(bundled.directory)
    # Publishing still keeps the complete, reproducible set in the store.
    assert {b.name for b in store.container.list_blobs() if not b.name.startswith("audit/")} == {
        f"{version}/{name}" for name in [*bundled.manifest["files"], MANIFEST, f"{MANIFEST}.sha256"]
    }
    fetched = _spy_downloads(store, monkeypatch)
    directory = store.download(version, tmp_path / "cache")
    assert sorted(fetched) == sorted(f"{version}/{name}" for name in [*SERVING, MANIFEST])
    assert sorted(p.name for p in directory.iterdir()) == sorted([*SERVING, MANIFEST])
    for name in REFERENCES:
        assert not (directory / name).exists()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [version]  # no staging left
    downloaded = sum(p.stat().st_size for p in directory.iterdir())
    references = sum((bundled.directory / name).stat().st_size for name in REFERENCES)
    everything = sum(p.stat().st_size for p in bundled.directory.iterdir())
    assert downloaded == everything - references and references > downloaded

    loaded = ArtifactSet(directory)
    assert loaded.version == bundled.version == version
    values = random_features(bundled, 2000, seed=11)
    for model in bundled.model_names:
        ours, theirs = loaded.score(values, model), bundled.score(values, model)
        np.testing.assert_array_equal(ours.probability, theirs.probability)
        np.testing.assert_array_equal(ours.flagged, theirs.flagged)
        np.testing.assert_array_equal(ours.risk_level, theirs.risk_level)
        np.testing.assert_array_equal(ours.contributions, theirs.contributions)  # type: ignore[arg-type]

    # A second start trusts the verified cache without fetching anything but the manifest.
    fetched.clear()
    assert store.download(version, tmp_path / "cache") == directory
    assert fetched == [f"{version}/{MANIFEST}"]


def test_publish_still_needs_the_reference_files(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    # The store keeps complete, reproducible versions even though cold starts skip the references.
    folder = tmp_path / "set"
    shutil.copytree(tiny_artifacts_dir, folder)
    (folder / "random_forest.joblib").unlink()
    store = ModelStore.from_settings(_settings(tmp_path, _container()), env)
    with pytest.raises(ModelError, match=r"random_forest\.joblib listed in the manifest is"):
        store.publish(folder)
    assert store.versions() == []


@pytest.mark.parametrize("name", ["scaler.npz", "random_forest.npz", "training_results.json"])
def test_tampered_serving_blob_is_refused(
    published: Published, env: dict[str, str], tiny_artifacts_dir: Path, name: str
) -> None:
    settings, store, version = published
    data = (tiny_artifacts_dir / name).read_bytes()
    tampered = bytes([data[0] ^ 1]) + data[1:]  # same size, one bit flipped
    store.container.upload_blob(f"{version}/{name}", tampered, overwrite=True)
    with pytest.raises(ModelError, match=f"{re.escape(name)} fails its checksum"):
        load_artifacts(settings, env)
    assert sorted((settings.model_cache_dir).iterdir()) == []  # nothing unverified is kept


@pytest.mark.parametrize("name", ["scaler.npz", "logistic_regression.npz", "features.json"])
def test_missing_serving_blob_is_refused(
    published: Published, env: dict[str, str], name: str
) -> None:
    settings, store, version = published
    store.container.delete_blob(f"{version}/{name}")
    with pytest.raises(ModelError, match=f"cannot download {re.escape(name)}.*not found"):
        load_artifacts(settings, env)
    assert sorted((settings.model_cache_dir).iterdir()) == []


def test_manifest_that_hides_a_serving_file_is_refused(
    published: Published, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    # A manifest that does not list a file serving loads cannot vouch for it: no download.
    settings, store, version = published
    manifest = json.loads((tiny_artifacts_dir / MANIFEST).read_text())
    del manifest["files"]["scaler.npz"]
    store.container.upload_blob(f"{version}/{MANIFEST}", json.dumps(manifest), overwrite=True)
    with pytest.raises(ModelError, match=r"serving loads scaler\.npz"):
        store.download(version, settings.model_cache_dir)  # unpinned: the rule itself refuses
    # Through the pointer, the edit is refused first: the activated manifest had another hash.
    with pytest.raises(ModelError, match="manifest changed after it was activated"):
        load_artifacts(settings, env)
    assert not settings.model_cache_dir.exists() or not any(settings.model_cache_dir.iterdir())


@pytest.mark.parametrize("name", REFERENCES)
def test_tampered_reference_in_the_cache_is_refused_and_replaced(
    published: Published,
    env: dict[str, str],
    tiny_artifacts_dir: Path,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, store, _ = published
    directory = load_artifacts(settings, env).directory
    assert not (directory / name).exists()
    # A reference file that shows up in the cache must match the manifest like any other file.
    tampered = (tiny_artifacts_dir / name).read_bytes() + b"\0"
    (directory / name).write_bytes(tampered)
    with pytest.raises(ModelError, match=f"{re.escape(name)} fails its checksum"):
        ArtifactSet(directory)
    # The next start does not trust that cache: it downloads the serving files again.
    assert load_artifacts(settings, env).directory == directory
    assert sorted(p.name for p in directory.iterdir()) == sorted([*SERVING, MANIFEST])
    # A genuine reference in the cache is accepted, and the cache is then reused as it is.
    (directory / name).write_bytes((tiny_artifacts_dir / name).read_bytes())
    fetched = _spy_downloads(store, monkeypatch)
    assert store.download(ArtifactSet(directory).version, settings.model_cache_dir) == directory
    assert len(fetched) == 1 and (directory / name).exists()


def test_publish_is_idempotent_and_versions_are_immutable(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    store = ModelStore.from_settings(_settings(tmp_path, _container()), env)
    first = store.publish(tiny_artifacts_dir)
    assert store.publish(tiny_artifacts_dir, version=first) == first  # a retried deploy step
    # Another set that calls itself the same version (trained again the same day, say).
    other = _as_version(tiny_artifacts_dir, tmp_path / "other", first)
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["created_at"] = "another training"
    (other / MANIFEST).write_text(json.dumps(manifest, indent=2))
    with pytest.raises(ModelError, match=r"already exists .*retrain \(`ptd train`\)"):
        store.publish(other)
    assert store.versions() == [first]
    assert store.current() is None  # publishing alone does not activate
    # A stored file damaged or deleted behind the store: publishing again cannot repair it
    # (a published version is never rewritten), so it must not report success either.
    name = sorted(json.loads((tiny_artifacts_dir / MANIFEST).read_text())["files"])[0]
    store.container.upload_blob(f"{first}/{name}", b"damaged", overwrite=True)
    with pytest.raises(ModelError, match=rf"already published with this manifest, but .*{name}"):
        store.publish(tiny_artifacts_dir)
    store.container.delete_blob(f"{first}/{name}")
    with pytest.raises(ModelError, match="stored copy fails its check"):
        store.publish(tiny_artifacts_dir)
    # Publishing with --activate: the activation's own verification refuses it.
    with pytest.raises(ModelError, match=rf"model version '{first}' not activated: .*{name}"):
        store.publish(tiny_artifacts_dir, activate=True)
    assert store.current() is None


def test_rollback_moves_the_pointer_back(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    settings = _settings(tmp_path, _container())
    store = ModelStore.from_settings(settings, env)
    v1 = store.publish(_as_version(tiny_artifacts_dir, tmp_path / "a", "2026-a"), activate=True)
    v2 = store.publish(_as_version(tiny_artifacts_dir, tmp_path / "b", "2026-b"), activate=True)
    assert (store.current() or {})["previous"] == v1
    assert load_artifacts(settings, env).version == v2
    pointer = store.activate(v1)  # the rollback
    assert pointer["version"] == v1 and pointer["previous"] == v2
    assert load_artifacts(settings, env).version == v1
    # A pinned version wins over the pointer.
    pinned = _settings(tmp_path, settings.model_container, model_version=v2)
    assert load_artifacts(pinned, env).version == v2


def test_activate_refuses_unknown_or_incomplete_versions(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    store = ModelStore.from_settings(_settings(tmp_path, _container()), env)
    version = store.publish(tiny_artifacts_dir)
    with pytest.raises(ModelError, match="not found"):
        store.activate("nope")
    store.container.delete_blob(f"{version}/scaler.npz")
    with pytest.raises(ModelError, match=r"scaler\.npz"):
        store.activate(version)
    assert store.current() is None


def test_tampered_blob_is_refused_naming_the_file(
    published: Published, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    settings, store, version = published
    data = (tiny_artifacts_dir / "random_forest.npz").read_bytes()
    store.container.upload_blob(f"{version}/random_forest.npz", data + b"\0", overwrite=True)
    with pytest.raises(ModelError, match=r"random_forest\.npz fails its checksum"):
        load_artifacts(settings, env)
    # Nothing unverified is left in the cache for the next start to pick up.
    assert not (settings.model_cache_dir / version).exists()


def test_tampered_cache_is_downloaded_again(
    published: Published, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    settings = published.settings
    artifacts = load_artifacts(settings, env)
    cached = artifacts.directory / "scaler.npz"
    cached.write_bytes(cached.read_bytes() + b"x")
    assert load_artifacts(settings, env).version == artifacts.version
    assert cached.read_bytes() == (tiny_artifacts_dir / "scaler.npz").read_bytes()


def test_missing_file_container_and_pointer(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    with pytest.raises(ModelError, match="container not found"):
        load_artifacts(_settings(tmp_path, _container(), model_version="v1"), env)
    settings = _settings(tmp_path, _container())
    store = ModelStore.from_settings(settings, env)
    with pytest.raises(ModelError, match="container not found"):
        load_artifacts(settings, env)
    version = store.publish(tiny_artifacts_dir)
    with pytest.raises(ModelError, match="no model is active"):
        load_artifacts(settings, env)
    store.activate(version)
    store.container.delete_blob(f"{version}/features.json")
    with pytest.raises(ModelError, match=r"cannot download features\.json.*not found"):
        load_artifacts(settings, env)


def test_unreachable_account_fails_fast(tmp_path: Path) -> None:
    env = {"STORAGE": connection_string(free_port())}  # nothing listens there
    settings = _settings(tmp_path, "models")
    started = time.monotonic()
    with pytest.raises(ModelError, match="unreachable"):
        load_artifacts(settings, env, retry_total=1)
    assert time.monotonic() - started < 5
    # With the default retries (exponential backoff) it still gives up within seconds.
    started = time.monotonic()
    with pytest.raises(ModelError, match="unreachable"):
        load_artifacts(settings, env)
    assert time.monotonic() - started < 10


def test_local_source_needs_no_storage(tiny_artifacts_dir: Path) -> None:
    settings = Settings(model_source="local", model_dir=tiny_artifacts_dir)
    assert load_artifacts(settings, {}).version


def test_connection_settings() -> None:
    settings = Settings()
    dev = blob_service_client(settings, {"STORAGE": "UseDevelopmentStorage=True"})
    assert dev.url.startswith("http://127.0.0.1:10000/devstoreaccount1")
    assert describe_connection(settings, {"STORAGE": "UseDevelopmentStorage=true"}).startswith(
        "Azurite"
    )
    explicit = blob_service_client(settings, {"STORAGE": connection_string(12345)})
    assert explicit.url.startswith("http://127.0.0.1:12345/devstoreaccount1")
    assert "AccountKey" not in describe_connection(settings, {"STORAGE": connection_string(1)})

    uri = "https://acct.blob.core.windows.net"
    mi = blob_service_client(
        settings,
        {
            "STORAGE__blobServiceUri": uri,
            "STORAGE__credential": "managedidentity",
            "STORAGE__clientId": "00000000-0000-0000-0000-000000000001",
        },
    )
    assert type(mi.credential).__name__ == "ManagedIdentityCredential"
    assert mi.url.startswith(uri)
    default = blob_service_client(settings, {"STORAGE__serviceUri": uri})
    assert type(default.credential).__name__ == "DefaultAzureCredential"
    with pytest.raises(ConfigError, match="no storage connection"):
        blob_service_client(settings, {})
    with pytest.raises(ConfigError, match="STORAGE__credential"):
        blob_service_client(settings, {"STORAGE__serviceUri": uri, "STORAGE__credential": "x"})
    with pytest.raises(ConfigError, match="connection string"):
        blob_service_client(settings, {"STORAGE": "nonsense"})
