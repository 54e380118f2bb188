"""Shared fixtures: the shared data folder (skipped when absent) and tiny trained models."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from detector.model import ArtifactSet
from tests.synthetic import write_steg

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "steg"
BUNDLED = REPO / "models_artifacts"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "invoices_train.parquet").is_file():
        pytest.skip("../shared/data/steg is not present (only the project repo was cloned)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_steg(tmp_path_factory.mktemp("steg"), n_clients=300, seed=1)


@pytest.fixture(scope="session")
def tiny_artifacts_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """A model trained on the synthetic fixture: small, fast, deterministic."""
    from detector.training import train

    out = tmp_path_factory.mktemp("artifacts")
    train(synthetic_dir, out, cv_folds=3, n_jobs=1, forest_params={"n_estimators": 15})
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_artifacts_dir: Path) -> ArtifactSet:
    return ArtifactSet(tiny_artifacts_dir)


@pytest.fixture(scope="session")
def bundled() -> ArtifactSet:
    return ArtifactSet(BUNDLED)


@pytest.fixture(scope="session")
def azurite() -> Iterator[str]:
    """Connection string of an Azurite blob emulator on a free port (one per xdist worker)."""
    from tests.azurite import AzuriteUnavailable
    from tests.azurite import azurite as start_azurite

    try:
        with start_azurite() as connection:
            yield connection
    except AzuriteUnavailable as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Azurite is required in CI: {exc}")
        pytest.skip(f"Azurite is not available: {exc}")


@pytest.fixture
def make_client(
    tiny_artifacts: ArtifactSet, tiny_artifacts_dir: Path
) -> Iterator[Callable[..., Any]]:
    """Build API test clients over the tiny model (settings overridable); closed at teardown."""
    from fastapi.testclient import TestClient

    from detector.api import create_app
    from detector.config import Settings

    clients: list[TestClient] = []

    def make(loader: Callable[[], ArtifactSet] | None = None, **overrides: Any) -> TestClient:
        settings = Settings(model_dir=tiny_artifacts_dir, **overrides)
        client = TestClient(
            create_app(settings, loader or (lambda: tiny_artifacts)), raise_server_exceptions=False
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(make_client: Callable[..., Any]) -> Any:
    """An API test client over the tiny model, default settings."""
    return make_client()


@pytest.fixture(scope="module")
def app_module(azurite: str, tiny_artifacts_dir: Path) -> Iterator[ModuleType]:
    """function_app imported with settings pointing at Azurite and the tiny model (the blob
    trigger's tests; one import per module)."""
    env = {
        "STORAGE": azurite,
        "PTD_MODEL_SOURCE": "local",
        "PTD_MODEL_DIR": str(tiny_artifacts_dir),
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    sys.modules.pop("function_app", None)
    from detector.config import Settings
    from detector.store import blob_service_client, clear_shared_artifacts

    clear_shared_artifacts()
    try:
        module = importlib.import_module("function_app")
        # get_functions() validates names and may run once per app: index once, keep the result.
        module.indexed = {f.get_function_name(): f for f in module.app.get_functions()}  # type: ignore[attr-defined]
        service = blob_service_client(Settings())
        for name in ("batch-in", "batch-out"):
            if not service.get_container_client(name).exists():
                service.create_container(name)
        yield module
    finally:
        sys.modules.pop("function_app", None)
        clear_shared_artifacts()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
