"""Blob storage: the connection, the versioned model store, and loading a verified model set.

Layout of the models container (`PTD_MODEL_CONTAINER`, default `models`):

    <version>/<file>            every file listed in the version's manifest (references included)
    <version>/manifest.json     written last: a version exists only once its manifest does
    current.json                {"version", "previous", "activated_at"}: the served version

`ptd publish` uploads a local artifact folder as a new version (never overwriting a different
one), `ptd activate VERSION` moves the pointer (rollback = activate the previous version). On
cold start `load_artifacts` reads the pointer (or the pinned `PTD_MODEL_VERSION`), downloads the
serving files (`model.serving_files`: not the `*.joblib` references, which stay in the store) into
`PTD_MODEL_CACHE_DIR/<version>/` and lets `ArtifactSet` check their SHA-256 before anything is
loaded. Every failure is a `ModelError` whose message says what is wrong and where;
the API answers /api/health with 503 and that reason.

The connection follows the Functions convention for a connection named `STORAGE`: setting
`STORAGE` is a connection string (`UseDevelopmentStorage=true` means Azurite on 127.0.0.1:10000),
or `STORAGE__blobServiceUri` / `STORAGE__serviceUri` is the account's blob endpoint with an
Entra ID credential: `STORAGE__credential=managedidentity` (+ `STORAGE__clientId` for a
user-assigned identity) or, without it, `DefaultAzureCredential` (a developer's `az login`, the
GitHub workflow's OIDC login).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.config import ConfigError, Settings
from detector.model import MANIFEST, ArtifactSet, ModelError, serving_files, verify_manifest

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.storage.blob import BlobServiceClient, ContainerClient

log = logging.getLogger(__name__)

POINTER = "current.json"
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_BLOB_ENDPOINT = f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}"
# Transient failures (throttling, 5xx, dropped connections) are retried with exponential backoff
# and jitter: 0.25 s, 0.5 s, 1 s, 2 s; about 4 s of waiting at most before the error surfaces.
RETRY_TOTAL = 4
RETRY_INITIAL_BACKOFF = 0.25
RETRY_MAX_BACKOFF = 2.0
CONNECTION_TIMEOUT = 5  # seconds to open a connection; an unreachable account fails fast
READ_TIMEOUT = 60  # seconds between bytes of a response (large batch files stream in chunks)


def _azurite_key() -> str:
    # Azurite's well-known, public development key (documented by Microsoft for every emulator
    # install; not a secret). The SDK supplies the same key for `UseDevelopmentStorage=true`.
    from azure.storage.blob._shared.parser import DEVSTORE_ACCOUNT_KEY

    return str(DEVSTORE_ACCOUNT_KEY)


def _retry_policy(retry_total: int) -> Any:
    from azure.storage.blob import ExponentialRetry

    class _Backoff(ExponentialRetry):
        """0.25 s doubling to 2 s, +-25 % jitter (the SDK's default starts at 15 s)."""

        def get_backoff_time(self, settings: dict[str, Any]) -> float:
            base = min(RETRY_INITIAL_BACKOFF * 2 ** settings["count"], RETRY_MAX_BACKOFF)
            return float(base * random.uniform(0.75, 1.25))  # noqa: S311 (jitter, not crypto)  # nosec B311

    return _Backoff(retry_total=retry_total)


def _connection_string(raw: str) -> str:
    """`UseDevelopmentStorage=true` (any case) as the explicit Azurite connection string.

    The SDK honours only the exact lower-case `true` and ignores `DevelopmentStorageProxyUri`;
    spelling the endpoint out keeps Azurite on 127.0.0.1:10000 whatever the spelling.
    """
    parts = dict(
        (key.strip().lower(), value.strip())
        for key, _, value in (item.partition("=") for item in raw.split(";") if item.strip())
    )
    if parts.get("usedevelopmentstorage", "").lower() != "true":
        return raw
    proxy = parts.get("developmentstorageproxyuri", "").rstrip("/")
    endpoint = f"{proxy}/{AZURITE_ACCOUNT}" if proxy else AZURITE_BLOB_ENDPOINT
    return (
        f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};"
        f"AccountKey={_azurite_key()};BlobEndpoint={endpoint};"
    )


def _credential(env: Mapping[str, str], prefix: str) -> TokenCredential:
    kind = env.get(f"{prefix}__credential", "").strip().lower()
    client_id = env.get(f"{prefix}__clientId", "").strip()
    if kind == "managedidentity":
        from azure.identity import ManagedIdentityCredential

        return (
            ManagedIdentityCredential(client_id=client_id)
            if client_id
            else (ManagedIdentityCredential())
        )
    if kind:
        raise ConfigError(f"setting {prefix}__credential={kind!r}: only 'managedidentity' is known")
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential(managed_identity_client_id=client_id or None)


def describe_connection(settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """Where the connection points, without any secret: for error messages and logs."""
    env = os.environ if environ is None else environ
    prefix = settings.storage_connection
    raw = env.get(prefix, "").strip()
    if raw:
        parts = dict(
            (key.strip().lower(), value.strip())
            for key, _, value in (item.partition("=") for item in raw.split(";") if item.strip())
        )
        if parts.get("usedevelopmentstorage", "").lower() == "true":
            return f"Azurite ({AZURITE_BLOB_ENDPOINT})"
        return parts.get("blobendpoint") or f"account {parts.get('accountname', '?')}"
    for suffix in ("blobServiceUri", "serviceUri"):
        uri = env.get(f"{prefix}__{suffix}", "").strip()
        if uri:
            return uri.split("?", 1)[0]
    return f"(setting {prefix} is not set)"


def blob_service_client(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    *,
    retry_total: int = RETRY_TOTAL,
    connection_timeout: float = CONNECTION_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
) -> BlobServiceClient:
    """A client for the account named by the `settings.storage_connection` connection."""
    from azure.storage.blob import BlobServiceClient

    env = os.environ if environ is None else environ
    prefix = settings.storage_connection
    options: dict[str, Any] = {
        "retry_policy": _retry_policy(retry_total),
        "connection_timeout": connection_timeout,
        "read_timeout": read_timeout,
    }
    raw = env.get(prefix, "").strip()
    if raw:
        try:
            return BlobServiceClient.from_connection_string(_connection_string(raw), **options)
        except ValueError as exc:
            raise ConfigError(
                f"setting {prefix} is not a usable connection string: {exc}"
            ) from None
    uri = (env.get(f"{prefix}__blobServiceUri") or env.get(f"{prefix}__serviceUri") or "").strip()
    if uri:
        return BlobServiceClient(account_url=uri, credential=_credential(env, prefix), **options)
    raise ConfigError(
        f"no storage connection: set {prefix} (a connection string, or UseDevelopmentStorage=true "
        f"for Azurite) or {prefix}__blobServiceUri with {prefix}__credential=managedidentity"
    )


def storage_error(exc: Exception, what: str, where: str) -> ModelError:
    """A storage exception as a one-line ModelError that says what failed and where."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    if isinstance(exc, ResourceNotFoundError):
        code = str(getattr(exc, "error_code", "") or "")
        if code == "ContainerNotFound":
            return ModelError(f"{what}: container not found ({where})")
        return ModelError(f"{what}: not found ({where})")
    if isinstance(exc, ClientAuthenticationError):
        return ModelError(f"{what}: not authorised ({where}): {_first_line(exc)}")
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return ModelError(f"{what}: storage account unreachable ({where}): {_first_line(exc)}")
    if isinstance(exc, HttpResponseError):
        return ModelError(f"{what}: storage error {exc.status_code} ({where}): {_first_line(exc)}")
    return ModelError(f"{what}: {type(exc).__name__} ({where}): {_first_line(exc)}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def ensure_container(container: ContainerClient, where: str = "") -> None:
    """Create the container if it is missing. A role scoped to the container itself (as the
    Bicep grants) may not create containers: a 403 here means "it exists, go on"."""
    from azure.core.exceptions import HttpResponseError, ResourceExistsError

    try:
        container.create_container()
    except ResourceExistsError:
        pass
    except HttpResponseError as exc:
        if exc.status_code != 403:
            raise storage_error(
                exc, f"cannot create container {container.container_name}", where
            ) from None
        log.debug("no right to create container %s; assuming it exists", container.container_name)
    except Exception as exc:
        raise storage_error(
            exc, f"cannot create container {container.container_name}", where
        ) from None


class ModelStore:
    """Versioned artifact sets in a blob container, with a pointer to the served one."""

    def __init__(self, container: ContainerClient, where: str = "") -> None:
        self.container = container
        self.where = where or f"container {container.container_name}"

    @classmethod
    def from_settings(
        cls, settings: Settings, environ: Mapping[str, str] | None = None, **client_options: Any
    ) -> ModelStore:
        service = blob_service_client(settings, environ, **client_options)
        where = f"container {settings.model_container} at {describe_connection(settings, environ)}"
        return cls(service.get_container_client(settings.model_container), where)

    # -- reading -----------------------------------------------------------------------------
    def _read_json(self, name: str, what: str, missing_ok: bool = False) -> dict[str, Any]:
        """A JSON blob; with `missing_ok` a missing blob (not container) re-raises as is."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            data = self.container.download_blob(name).readall()
        except ResourceNotFoundError as exc:
            if missing_ok and getattr(exc, "error_code", None) != "ContainerNotFound":
                raise
            raise storage_error(exc, what, f"{name} in {self.where}") from None
        except Exception as exc:
            raise storage_error(exc, what, f"{name} in {self.where}") from None
        try:
            value = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"{what}: {name} in {self.where} is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ModelError(f"{what}: {name} in {self.where} is not a JSON object")
        return value

    def _exists(self, name: str) -> bool:
        try:
            return bool(self.container.get_blob_client(name).exists())
        except Exception as exc:
            raise storage_error(exc, f"cannot check {name}", self.where) from None

    def manifest(self, version: str) -> dict[str, Any]:
        _check_version(version)
        return self._read_json(f"{version}/{MANIFEST}", f"model version {version!r}")

    def current(self) -> dict[str, Any] | None:
        """The pointer ({"version", "previous", "activated_at"}), or None if nothing is active."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            pointer = self._read_json(POINTER, "model pointer", missing_ok=True)
        except ResourceNotFoundError:
            return None
        if not isinstance(pointer.get("version"), str) or not pointer["version"]:
            raise ModelError(f"model pointer {POINTER} in {self.where} names no version")
        return pointer

    def versions(self) -> list[str]:
        """Complete versions (those whose manifest exists), sorted; none if no container."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            names = [blob.name for blob in self.container.list_blobs()]
        except ResourceNotFoundError:
            return []
        except Exception as exc:
            raise storage_error(exc, "cannot list model versions", self.where) from None
        return sorted(
            name[: -len(MANIFEST) - 1]
            for name in names
            if name.endswith(f"/{MANIFEST}") and name.count("/") == 1
        )

    # -- writing -----------------------------------------------------------------------------
    def _ensure_container(self) -> None:
        ensure_container(self.container, self.where)

    def publish(
        self, artifacts_dir: Path, version: str | None = None, activate: bool = False
    ) -> str:
        """Upload a verified local artifact folder as `version` (default: its model_version).

        Files go first and the manifest last, so a half-finished upload is never a version.
        Publishing a version that already exists with the same manifest is a no-op (the
        deploy workflow retries); a different manifest under the same name is refused.
        """
        from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
        from azure.storage.blob import ContentSettings

        artifacts_dir = Path(artifacts_dir)
        manifest = verify_manifest(artifacts_dir)  # the full set: references are uploaded too
        version = version or str(manifest.get("model_version", ""))
        _check_version(version)
        manifest_bytes = (artifacts_dir / MANIFEST).read_bytes()
        self._ensure_container()
        manifest_name = f"{version}/{MANIFEST}"
        if self._exists(manifest_name):
            existing = self._download_bytes(manifest_name, f"model version {version!r}")
            if existing != manifest_bytes:
                raise ModelError(
                    f"model version {version!r} already exists in {self.where} with a different "
                    "manifest; versions are immutable: publish under a new --version"
                )
            log.info("model version %s is already published", version)
        else:
            try:
                for name in sorted(manifest["files"]):
                    with (artifacts_dir / name).open("rb") as handle:
                        self.container.upload_blob(f"{version}/{name}", handle, overwrite=True)
                self.container.upload_blob(
                    manifest_name,
                    manifest_bytes,
                    content_settings=ContentSettings(content_type="application/json"),
                )  # overwrite=False: the SDK sends If-None-Match: *
            except (ResourceExistsError, ResourceModifiedError):
                raise ModelError(
                    f"model version {version!r} was published concurrently in {self.where}; "
                    "check it with `ptd versions`"
                ) from None
            except Exception as exc:
                raise storage_error(
                    exc, f"cannot publish model version {version!r}", self.where
                ) from None
            log.info("published model version %s (%d files)", version, len(manifest["files"]) + 1)
        if activate:
            self.activate(version)
        return version

    def _download_bytes(self, name: str, what: str) -> bytes:
        try:
            return bytes(self.container.download_blob(name).readall())
        except Exception as exc:
            raise storage_error(exc, what, f"{name} in {self.where}") from None

    def activate(self, version: str) -> dict[str, Any]:
        """Point `current.json` at a complete version; returns the new pointer."""
        from azure.storage.blob import ContentSettings

        manifest = self.manifest(version)  # raises if the version is incomplete or absent
        missing = [
            name
            for name in sorted(manifest.get("files", {}))
            if not self._exists(f"{version}/{name}")
        ]
        if missing:
            raise ModelError(
                f"model version {version!r} in {self.where} is missing {', '.join(missing)}: "
                "not activated"
            )
        current = self.current()
        previous = current["version"] if current else None
        if previous == version:
            previous = current.get("previous") if current else None
        pointer = {
            "version": version,
            "previous": previous,
            "activated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            self.container.upload_blob(
                POINTER,
                json.dumps(pointer, indent=2).encode(),
                overwrite=True,
                content_settings=ContentSettings(content_type="application/json"),
            )
        except Exception as exc:
            raise storage_error(
                exc, f"cannot activate model version {version!r}", self.where
            ) from None
        log.info("activated model version %s (previous %s)", version, previous)
        return pointer

    # -- cold start ----------------------------------------------------------------------------
    def download(self, version: str, cache_dir: Path) -> Path:
        """The verified serving files of `version` in `cache_dir/<version>/`, unless cached.

        Only `serving_files` and the manifest are fetched; the reference files stay in the
        store (publish keeps the complete set there).
        """
        _check_version(version)
        manifest_bytes = self._download_bytes(f"{version}/{MANIFEST}", f"model version {version!r}")
        try:
            names = serving_files(json.loads(manifest_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"model version {version!r}: manifest is not valid: {exc}") from None
        except ModelError as exc:
            raise ModelError(f"model version {version!r}: {exc}") from None
        target = Path(cache_dir) / version
        if _cache_matches(target, manifest_bytes):
            return target
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache_dir))
        try:
            for name in names:
                if Path(name).name != name:
                    raise ModelError(f"model version {version!r}: manifest names {name!r}")
                blob_name = f"{version}/{name}"
                try:
                    with (staging / name).open("wb") as handle:
                        self.container.download_blob(blob_name, max_concurrency=2).readinto(handle)
                except Exception as exc:
                    raise storage_error(
                        exc,
                        f"model version {version!r}: cannot download {name}",
                        f"{blob_name} in {self.where}",
                    ) from None
            (staging / MANIFEST).write_bytes(manifest_bytes)
            # Every SHA-256 before the set may replace the cache (references were not fetched).
            verify_manifest(staging, references_optional=True)
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            try:
                staging.rename(target)
            except OSError:
                # Another process finished first; use its copy if it verifies.
                if not _cache_matches(target, manifest_bytes):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _cache_matches(target: Path, manifest_bytes: bytes) -> bool:
    try:
        if (target / MANIFEST).read_bytes() != manifest_bytes:
            return False
        verify_manifest(target, references_optional=True)
        return True
    except (OSError, ModelError):
        return False


def _check_version(version: str) -> None:
    if not version or "/" in version or version in (".", "..") or version.startswith("."):
        raise ModelError(f"invalid model version {version!r}")


def load_artifacts(
    settings: Settings, environ: Mapping[str, str] | None = None, **client_options: Any
) -> ArtifactSet:
    """The model set the settings choose, verified, loaded. Raises ModelError with the reason."""
    if settings.model_source == "local":
        return ArtifactSet(settings.model_dir)
    started = time.perf_counter()
    try:
        store = ModelStore.from_settings(settings, environ, **client_options)
    except ConfigError as exc:
        raise ModelError(str(exc)) from None
    version = settings.model_version
    if not version:
        pointer = store.current()
        if pointer is None:
            raise ModelError(
                f"no model is active: {POINTER} is missing in {store.where}; "
                "run `ptd publish --activate`"
            )
        version = str(pointer["version"])
    directory = store.download(version, settings.model_cache_dir)
    artifacts = ArtifactSet(directory)  # verifies every SHA-256 again, then loads
    log.info(
        "model version %s loaded from blob storage in %.2f s",
        artifacts.version,
        time.perf_counter() - started,
    )
    return artifacts


_cache_lock = threading.Lock()
_cached: dict[tuple[str, str, str, str, str], ArtifactSet] = {}


def shared_artifacts(settings: Settings) -> ArtifactSet:
    """`load_artifacts`, once per process and settings (a failure is retried on the next call)."""
    key = (
        settings.model_source,
        str(settings.model_dir),
        settings.model_version,
        settings.model_container,
        str(settings.model_cache_dir),
    )
    with _cache_lock:
        if key not in _cached:
            _cached[key] = load_artifacts(settings)
        return _cached[key]


def clear_shared_artifacts() -> None:
    """Forget the loaded models (tests; a pointer change otherwise applies at the next start)."""
    with _cache_lock:
        _cached.clear()
