"""The model store against Azurite: publish, cold-start pull, verify, rollback, refusals."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pytest

from detector.config import ConfigError, Settings
from detector.model import MANIFEST, ModelError
from detector.store import (
    POINTER,
    ModelStore,
    blob_service_client,
    describe_connection,
    load_artifacts,
)
from tests.azurite import connection_string, free_port

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


def test_publish_then_cold_start_pull_verifies_and_loads(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    settings = _settings(tmp_path, _container())
    store = ModelStore.from_settings(settings, env)
    version = store.publish(tiny_artifacts_dir, activate=True)
    manifest = json.loads((tiny_artifacts_dir / MANIFEST).read_text())
    assert version == manifest["model_version"]
    assert store.versions() == [version]
    pointer = store.current()
    assert pointer is not None and pointer["version"] == version and pointer["previous"] is None
    names = {b.name for b in store.container.list_blobs()}
    assert names == {POINTER, f"{version}/{MANIFEST}"} | {
        f"{version}/{f}" for f in manifest["files"]
    }

    artifacts = load_artifacts(settings, env)
    assert artifacts.version == version
    assert artifacts.directory == settings.model_cache_dir / version
    # A second start reuses the verified cache.
    again = load_artifacts(settings, env)
    assert again.version == version


def test_publish_is_idempotent_and_versions_are_immutable(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    store = ModelStore.from_settings(_settings(tmp_path, _container()), env)
    first = store.publish(tiny_artifacts_dir, version="v1")
    assert store.publish(tiny_artifacts_dir, version="v1") == first  # a retried deploy step
    other = _as_version(tiny_artifacts_dir, tmp_path / "other", "something-else")
    with pytest.raises(ModelError, match="already exists"):
        store.publish(other, version="v1")
    assert store.current() is None  # publishing alone does not activate


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
    version = store.publish(tiny_artifacts_dir, version="v1")
    with pytest.raises(ModelError, match="not found"):
        store.activate("nope")
    store.container.delete_blob(f"{version}/scaler.npz")
    with pytest.raises(ModelError, match=r"scaler\.npz"):
        store.activate(version)
    assert store.current() is None


def test_tampered_blob_is_refused_naming_the_file(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    settings = _settings(tmp_path, _container())
    store = ModelStore.from_settings(settings, env)
    version = store.publish(tiny_artifacts_dir, activate=True)
    data = (tiny_artifacts_dir / "random_forest.npz").read_bytes()
    store.container.upload_blob(f"{version}/random_forest.npz", data + b"\0", overwrite=True)
    with pytest.raises(ModelError, match=r"random_forest\.npz fails its checksum"):
        load_artifacts(settings, env)
    # Nothing unverified is left in the cache for the next start to pick up.
    assert not (settings.model_cache_dir / version).exists()


def test_tampered_cache_is_downloaded_again(
    tmp_path: Path, env: dict[str, str], tiny_artifacts_dir: Path
) -> None:
    settings = _settings(tmp_path, _container())
    ModelStore.from_settings(settings, env).publish(tiny_artifacts_dir, activate=True)
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
