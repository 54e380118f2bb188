"""Blob storage: the connection, the versioned model store, and loading a verified model set.

Layout of the models container (`PTD_MODEL_CONTAINER`, default `models`):

    <version>/<file>            every file listed in the version's manifest (references included)
    <version>/manifest.json     written last: a version exists only once its manifest does
    <version>/manifest.json.sha256   the manifest's SHA-256 when it was published (created
                                once, If-None-Match: publish never overwrites it)
    <version>/.publishing       a lock blob, leased while a publish of the version runs
    current.json                the served version: {"version", "manifest_sha256", "previous",
                                "previous_manifest_sha256", "activated_at", "activated_by"}
    audit/<time>-<action>-<version>.json   who published or activated what, and what was before

Version names match `VERSION_PATTERN` (letters, digits, `.`, `_`, `-`; at most 64 characters,
starting with a letter or digit, not ending with `.`) everywhere a version is named. `ptd publish`
validates the set (`ArtifactSet`: checksums and every number, shape and tree), then uploads it
under a lease on the version's lock blob, files first and the manifest last with If-None-Match: two
publishers of one version can never mix their files. `ptd activate VERSION` first verifies the
whole stored version (`ModelStore.verify`: the cold start's own routine, `download` then
`open_version`, on every listed file, references included) and only then records the SHA-256 of the
manifest it verified in the pointer (rollback = activate the previous version). On cold start
`load_artifacts` reads the pointer (or the pinned `PTD_MODEL_VERSION`, optionally
`VERSION@sha256:HASH`), refuses a version whose manifest no longer has the activated hash (edited
in place), downloads the serving files (`model.serving_files`: not the reference files, which stay
in the store) into `PTD_MODEL_CACHE_DIR/<version>/` and lets `ArtifactSet` check their SHA-256 and
validate them before anything is served. Every failure is a `ModelError` whose message says what is
wrong and where; the API answers /api/health with 503 and that reason.

The connection follows the Functions convention for a connection named `STORAGE`: setting
`STORAGE` is a connection string (`UseDevelopmentStorage=true` means Azurite on 127.0.0.1:10000),
or `STORAGE__blobServiceUri` / `STORAGE__serviceUri` is the account's blob endpoint with an
Entra ID credential: `STORAGE__credential=managedidentity` (+ `STORAGE__clientId` for a
user-assigned identity) or, without it, `DefaultAzureCredential` (a developer's `az login`, the
GitHub workflow's OIDC login).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.config import PIN_PATTERN, VERSION_PATTERN, VERSION_RULE, ConfigError, Settings
from detector.model import (
    MANIFEST,
    ArtifactSet,
    ModelError,
    manifest_files,
    serving_files,
    sha256_file,
    verify_manifest,
)

if TYPE_CHECKING:
    from azure.core.credentials import TokenCredential
    from azure.storage.blob import BlobServiceClient, ContainerClient

log = logging.getLogger(__name__)

POINTER = "current.json"
LOCK = ".publishing"
HASH_SUFFIX = ".sha256"  # <version>/manifest.json.sha256: the hash it was published with
AUDIT_PREFIX = "audit/"
LEASE_SECONDS = 60  # the publish lock's lease, renewed between uploads
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_BLOB_ENDPOINT = f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}"
# Transient failures (throttling, 5xx, dropped connections) are retried with exponential backoff
# and jitter: 0.25 s, 0.5 s, 1 s, 2 s; about 4 s of waiting at most before the error surfaces.
RETRY_TOTAL = 4
RETRY_INITIAL_BACKOFF = 0.25
RETRY_MAX_BACKOFF = 2.0
CONNECTION_TIMEOUT = 5  # seconds to open a connection; an unreachable account fails fast
READ_TIMEOUT = 60  # seconds between bytes of a response (large batch files stream in chunks)
# Largest GET of a model file: the serving files (1.9 MB at most) take one each; a large
# reference file streams to disk in 4 MiB ranges (two at once), whatever its size.
MODEL_GET_BYTES = 4 * 1024 * 1024


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
    max_get_bytes: int | None = None,
) -> BlobServiceClient:
    """A client for the account named by the `settings.storage_connection` connection.

    `max_get_bytes` caps each GET of a download (the SDK's first request otherwise asks for up
    to 32 MiB, and holds several copies of it in memory). Raises ConfigError.
    """
    from azure.storage.blob import BlobServiceClient

    env = os.environ if environ is None else environ
    prefix = settings.storage_connection
    options: dict[str, Any] = {
        "retry_policy": _retry_policy(retry_total),
        "connection_timeout": connection_timeout,
        "read_timeout": read_timeout,
    }
    if max_get_bytes:
        options["max_single_get_size"] = options["max_chunk_get_size"] = max_get_bytes
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
        """The store the settings name. Downloads go in GETs of at most MODEL_GET_BYTES, so
        verifying a version of any size holds a few MiB of it in memory. Raises ConfigError."""
        client_options.setdefault("max_get_bytes", MODEL_GET_BYTES)
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
        check_version(version)
        return self._read_json(f"{version}/{MANIFEST}", f"model version {version!r}")

    def current(self) -> dict[str, Any] | None:
        """The pointer (see the module docstring), or None if nothing is active."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            pointer = self._read_json(POINTER, "model pointer", missing_ok=True)
        except ResourceNotFoundError:
            return None
        version = pointer.get("version")
        if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
            raise ModelError(f"model pointer {POINTER} in {self.where} names no valid version")
        return pointer

    def versions(self) -> list[str]:
        """Complete versions (a valid name whose manifest exists), sorted; none if no container.
        Blobs under other names are not versions (`ptd versions --json` lists them apart)."""
        return sorted(v for v in self._manifest_folders() if VERSION_PATTERN.fullmatch(v))

    def _published_sha256(self, version: str) -> str | None:
        """The manifest's SHA-256 recorded when the version was published (None if older)."""
        from azure.core.exceptions import ResourceNotFoundError

        name = f"{version}/{MANIFEST}{HASH_SUFFIX}"
        try:
            text = self.container.download_blob(name).readall().decode("ascii", "replace")
        except ResourceNotFoundError:
            return None
        except Exception as exc:
            raise storage_error(exc, f"cannot read {name}", self.where) from None
        return text.strip()[:64] or None

    def _manifest_folders(self) -> list[str]:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            names = [blob.name for blob in self.container.list_blobs()]
        except ResourceNotFoundError:
            return []
        except Exception as exc:
            raise storage_error(exc, "cannot list model versions", self.where) from None
        return [name[: -len(MANIFEST) - 1] for name in names if name.endswith(f"/{MANIFEST}")]

    def describe(self, verify: bool = False) -> dict[str, Any]:
        """Every version with its manifest's SHA-256 now, the one it was published with, and
        whether they still agree (`state`: ok, changed, unknown); the pointer; names that are not
        valid versions.

        That compares the manifest only (one small blob per version): its files are not read.
        With `verify`, each version is also checked as activation checks it (`verify`: every
        listed file downloaded, one version at a time, and hashed in 1 MiB blocks; the manifest
        against its published hash; the current one against the pointer's too): `verified` is
        then True or False with `verify_error`, else None. Raises ModelError when the store
        cannot be listed or read.
        """
        folders = self._manifest_folders()
        pointer = self.current() if folders else None
        entries = []
        for version in sorted(v for v in folders if VERSION_PATTERN.fullmatch(v)):
            name = f"{version}/{MANIFEST}"
            digest = sha256_bytes(self._download_bytes(name, f"model version {version!r}"))
            published = self._published_sha256(version)
            state = "unknown" if not published else "ok" if published == digest else "changed"
            current = bool(pointer and pointer["version"] == version)
            activated = pointer.get("manifest_sha256") if pointer and current else None
            if activated and activated != digest:
                state = "changed"
            verified: bool | None = None
            error: str | None = None
            if verify:
                try:
                    self._verify_as_published(version, activated or None)
                    verified = True
                except ModelError as exc:
                    verified, error = False, str(exc)
            entries.append(
                {
                    "version": version,
                    "manifest_sha256": digest,
                    "published_sha256": published,
                    "state": state,
                    "current": current,
                    "verified": verified,
                    "verify_error": error,
                }
            )
        invalid = sorted(v for v in folders if not VERSION_PATTERN.fullmatch(v))
        return {"versions": entries, "pointer": pointer, "invalid_names": invalid}

    # -- writing -----------------------------------------------------------------------------
    def _ensure_container(self) -> None:
        ensure_container(self.container, self.where)

    def _audit(self, action: str, version: str, previous: str | None, actor: str) -> None:
        """An audit event: a blob under audit/ and a structured log line, no customer data."""
        from azure.storage.blob import ContentSettings

        now = datetime.now(UTC)
        event = {
            "event": "model_" + action,
            "at": now.isoformat(timespec="seconds"),
            "actor": actor,
            "version": version,
            "previous": previous,
            "where": self.where,
        }
        name = f"{AUDIT_PREFIX}{now:%Y%m%dT%H%M%S%fZ}-{action}-{version}.json"
        try:
            self.container.upload_blob(
                name,
                json.dumps(event, indent=2).encode(),
                content_settings=ContentSettings(content_type="application/json"),
            )
        except Exception as exc:
            raise storage_error(exc, f"cannot write the audit event {name}", self.where) from None
        from detector.telemetry import log_event

        log_event(log, logging.INFO, event)

    def publish(
        self,
        artifacts_dir: Path,
        version: str | None = None,
        activate: bool = False,
        activate_if_none: bool = False,
        actor: str | None = None,
    ) -> str:
        """Upload a validated local artifact folder under its own `model_version`.

        `version`, when given, must be that model_version (a set published under another name
        would report another version in /api/health and make rollbacks unverifiable; every cold
        start refuses such a version, see `open_version`). The set is checked as serving will
        check it (`ArtifactSet`: checksums, numbers, shapes, trees) before anything is
        uploaded. The upload holds a lease on the version's lock blob, so a concurrent publish
        of the same version fails cleanly instead of mixing files; files go first and the
        manifest last (If-None-Match: *), so a half-finished upload is never a version.
        Publishing a version that already exists with the same manifest is a no-op (the deploy
        workflow retries) once the stored copy is verified (`verify`; a damaged one is refused
        with the reason); a different manifest under the same name is refused. `activate`
        moves the pointer to it (`activate`: the stored set verified first); `activate_if_none`
        only when no version is active. Raises ModelError.
        """
        from azure.storage.blob import ContentSettings

        artifacts_dir = Path(artifacts_dir)
        if version:
            check_version(version)
        verify_manifest(artifacts_dir)  # the full set: references are uploaded too
        checked = ArtifactSet(artifacts_dir)  # the same validation as a cold start
        if version and version != checked.version:
            raise ModelError(
                f"--version {version!r} is not the set's model_version {checked.version!r} "
                f"({artifacts_dir / MANIFEST}): a set is published under its own version, so "
                "that /api/health, /api/model_info and rollbacks name what is served; leave "
                "--version out, or retrain (`ptd train`) for a new version"
            )
        version = check_version(checked.version)
        actor = actor or self.actor()
        manifest_bytes = (artifacts_dir / MANIFEST).read_bytes()
        digest = sha256_bytes(manifest_bytes)
        self._ensure_container()
        activating = activate or (activate_if_none and self.current() is None)
        manifest_name = f"{version}/{MANIFEST}"
        if self._exists(manifest_name):
            self._same_manifest(version, manifest_bytes)
            # "Already published" must mean "stored intact": a file damaged or deleted behind
            # the store would otherwise pass for a successful publish (files are never
            # rewritten under a published manifest, so the publish cannot repair it).
            # Activation below verifies the stored copy itself: not downloaded twice.
            if not activating:
                try:
                    self.verify(version)
                except ModelError as exc:
                    raise ModelError(
                        f"model version {version!r} is already published with this manifest, "
                        f"but the stored copy fails its check: {exc}; a published version is "
                        "never rewritten: restore the blob from its earlier version (RUNBOOKS) "
                        "or publish a retrained set"
                    ) from None
            log.info("model version %s is already published", version)
        else:
            with self._publish_lock(version) as renew:
                if self._exists(manifest_name):  # published by someone else meanwhile
                    self._same_manifest(version, manifest_bytes)
                else:
                    try:
                        for name in sorted(checked.manifest["files"]):
                            with (artifacts_dir / name).open("rb") as handle:
                                self.container.upload_blob(
                                    f"{version}/{name}", handle, overwrite=True
                                )
                            renew()
                        self._record_published_sha256(version, digest)
                        self.container.upload_blob(
                            manifest_name,
                            manifest_bytes,
                            content_settings=ContentSettings(content_type="application/json"),
                        )  # overwrite=False: the SDK sends If-None-Match: *
                    except ModelError:
                        raise
                    except Exception as exc:
                        raise storage_error(
                            exc, f"cannot publish model version {version!r}", self.where
                        ) from None
                    log.info("published model version %s", version)
                    self._audit("published", version, None, actor)
        if activating:
            self.activate(version, actor=actor)
        return version

    def _record_published_sha256(self, version: str, digest: str) -> None:
        """Write `<version>/manifest.json.sha256` once: a conditional create (If-None-Match: *),
        so a publish never overwrites it. One left by an unfinished publish of this same
        manifest is kept as it is; one that records another manifest refuses the publish.

        It is a record, not a signature: whoever may write to the container can replace it
        together with the manifest (docs/RUNBOOKS.md, "Model rollback"). Raises ModelError.
        """
        from azure.core.exceptions import ResourceExistsError

        name = f"{version}/{MANIFEST}{HASH_SUFFIX}"
        try:
            self.container.upload_blob(name, digest.encode(), overwrite=False)
        except ResourceExistsError:
            recorded = self._published_sha256(version) or ""
            if recorded != digest:
                raise ModelError(
                    f"model version {version!r}: {name} in {self.where} already records another "
                    f"manifest (SHA-256 {recorded[:12]}..., this one {digest[:12]}...), left by "
                    "an unfinished publish; it is never overwritten: retrain (`ptd train`) for a "
                    "new version"
                ) from None

    def _same_manifest(self, version: str, manifest_bytes: bytes) -> None:
        existing = self._download_bytes(f"{version}/{MANIFEST}", f"model version {version!r}")
        if existing != manifest_bytes:
            raise ModelError(
                f"model version {version!r} already exists in {self.where} with a different "
                "manifest; versions are immutable: retrain (`ptd train`) for a new version"
            )

    @contextlib.contextmanager
    def _publish_lock(self, version: str) -> Iterator[Callable[[], None]]:
        """Hold a lease on `<version>/.publishing` (pessimistic concurrency: Azure Storage's
        lease, "Managing concurrency in Blob storage"); yields a function that renews it."""
        from azure.core.exceptions import HttpResponseError, ResourceExistsError

        lock = self.container.get_blob_client(f"{version}/{LOCK}")
        try:
            lock.upload_blob(b"", overwrite=False)
        except ResourceExistsError:
            pass  # a previous publish left it; its lease (if any) decides
        except Exception as exc:
            raise storage_error(exc, f"cannot create {version}/{LOCK}", self.where) from None
        try:
            lease = lock.acquire_lease(lease_duration=LEASE_SECONDS)
        except HttpResponseError as exc:
            if exc.status_code == 409:
                raise ModelError(
                    f"model version {version!r} is being published by someone else in "
                    f"{self.where}; wait a minute and check it with `ptd versions`"
                ) from None
            raise storage_error(exc, f"cannot lock {version}/{LOCK}", self.where) from None
        last = time.monotonic()

        def renew() -> None:
            nonlocal last
            if time.monotonic() - last > LEASE_SECONDS / 3:
                lease.renew()
                last = time.monotonic()

        try:
            yield renew
            # Done: the lock blob goes (a failed publish leaves it; its lease expires).
            with contextlib.suppress(Exception):
                lock.delete_blob(lease=lease)
        finally:
            with contextlib.suppress(Exception):
                lease.release()

    def _download_bytes(self, name: str, what: str) -> bytes:
        try:
            return bytes(self.container.download_blob(name).readall())
        except Exception as exc:
            raise storage_error(exc, what, f"{name} in {self.where}") from None

    def verify(self, version: str, expected_sha256: str | None = None) -> str:
        """Check a stored version as a cold start would, and every file of it: returns the
        SHA-256 of the manifest that was checked.

        The cold start's own routine (`download`, then `open_version`), with `complete`: every
        file the manifest lists, the references (`*.joblib`, LightGBM's text model) included,
        is downloaded into a temporary folder (removed after) and checked against its SHA-256;
        names outside the version's folder are refused before anything is downloaded; then the
        set is validated and loaded as serving loads it. Memory stays bounded whatever the
        size of a file: it streams to disk in GETs of MODEL_GET_BYTES and is hashed in 1 MiB
        blocks. `expected_sha256` as in `download`.

        Raises ModelError naming the file and the check that failed.
        """
        check_version(version)
        with tempfile.TemporaryDirectory(prefix="ptd-verify-") as tmp:
            directory = self.download(version, Path(tmp), expected_sha256, complete=True)
            open_version(directory, version)
            return sha256_file(directory / MANIFEST)

    def _verify_as_published(self, version: str, expected_sha256: str | None = None) -> str:
        """`verify`, and the verified manifest must be the one recorded when the version was
        published (`manifest.json.sha256`, when there is one): what activation requires.
        Returns the manifest's SHA-256. Raises ModelError."""
        digest = self.verify(version, expected_sha256)
        published = self._published_sha256(version)
        if published and published != digest:
            raise ModelError(
                f"model version {version!r}: its manifest changed since it was published "
                f"(SHA-256 {digest[:12]}..., published {published[:12]}...); see RUNBOOKS, "
                "'A model version changed under its name'"
            )
        return digest

    def activate(self, version: str, actor: str | None = None) -> dict[str, Any]:
        """Point `current.json` at a stored version once it is proven intact; returns the new
        pointer, pinned to the SHA-256 of the manifest that was verified.

        The whole set is verified first (`verify`: every file, references included, against the
        manifest; names confined to the folder; the same validation as a cold start), and a
        manifest that differs from the hash recorded when the version was published
        (`manifest.json.sha256`) is refused: a version every cold start would refuse is never
        activated. The pointer is replaced only if nobody changed it since it was read (ETag), so
        two activations cannot lose each other's `previous`.

        Raises ModelError ("model version <v> not activated: <file and check>"); the pointer is
        then unchanged.
        """
        from azure.core import MatchConditions
        from azure.core.exceptions import (
            ResourceExistsError,
            ResourceModifiedError,
            ResourceNotFoundError,
        )
        from azure.storage.blob import ContentSettings

        check_version(version)
        actor = actor or self.actor()
        started = time.perf_counter()
        try:
            digest = self._verify_as_published(version)
        except ModelError as exc:
            reason = str(exc).removeprefix(f"model version {version!r}: ")
            raise ModelError(f"model version {version!r} not activated: {reason}") from None
        log.info(
            "model version %s verified for activation in %.2f s",
            version,
            time.perf_counter() - started,
        )
        pointer_blob = self.container.get_blob_client(POINTER)
        try:
            current_props = pointer_blob.get_blob_properties()
            etag: str | None = str(current_props.etag)
        except ResourceNotFoundError:
            etag = None
        except Exception as exc:
            raise storage_error(exc, "cannot read the model pointer", self.where) from None
        current = self.current() if etag else None
        if current and current["version"] != version:
            previous, previous_sha = current["version"], current.get("manifest_sha256")
        elif current:
            previous, previous_sha = (
                current.get("previous"),
                current.get("previous_manifest_sha256"),
            )
        else:
            previous, previous_sha = None, None
        pointer = {
            "version": version,
            "manifest_sha256": digest,
            "previous": previous,
            "previous_manifest_sha256": previous_sha,
            "activated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "activated_by": actor,
        }
        condition: dict[str, Any] = (
            {"etag": etag, "match_condition": MatchConditions.IfNotModified, "overwrite": True}
            if etag
            else {"overwrite": False}
        )
        try:
            pointer_blob.upload_blob(
                json.dumps(pointer, indent=2).encode(),
                content_settings=ContentSettings(content_type="application/json"),
                **condition,
            )
        except (ResourceModifiedError, ResourceExistsError):
            raise ModelError(
                f"the model pointer in {self.where} changed while version {version!r} was being "
                "activated; check `ptd versions` and activate again"
            ) from None
        except Exception as exc:
            raise storage_error(
                exc, f"cannot activate model version {version!r}", self.where
            ) from None
        log.info("activated model version %s (previous %s)", version, previous)
        self._audit("activated", version, current["version"] if current else None, actor)
        return pointer

    def actor(self) -> str:
        """Who acts: PTD_ACTOR (the deploy workflow sets the GitHub actor), else the identity of
        the credential's storage token (user principal name, or the app's id), else the kind
        of connection (a connection string carries no identity)."""
        named = os.environ.get("PTD_ACTOR", "").strip()
        if named:
            return named[:200]
        credential = getattr(self.container, "credential", None)
        get_token = getattr(credential, "get_token", None)
        if get_token is None:
            return "shared key (connection string)"
        try:
            token = get_token("https://storage.azure.com/.default").token
            payload = token.split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except Exception:  # the identity is for the audit line; never fail a publish on it
            return "entra id (identity unknown)"
        for claim in ("upn", "unique_name", "preferred_username", "appid", "oid"):
            if claims.get(claim):
                return f"{claim}:{claims[claim]}"
        return "entra id (identity unknown)"

    # -- cold start ----------------------------------------------------------------------------
    def download(
        self,
        version: str,
        cache_dir: Path,
        expected_sha256: str | None = None,
        *,
        complete: bool = False,
    ) -> Path:
        """The verified files of `version` in `cache_dir/<version>/`, unless already cached.

        The one routine that reads a stored version, for the cold start (`load_artifacts`),
        `ptd fetch` and activation (`verify`). The manifest is read once; with `expected_sha256`
        (the pointer's, or a pin) a manifest that no longer has that SHA-256 is refused: the
        version was changed under its name after it was activated. Every name it lists must be
        a plain file of the version's folder (`manifest_files`), checked before anything is
        downloaded. The files stream to disk in a staging folder, every SHA-256 is checked
        (`verify_manifest`), and only then does the folder replace the cache. By default only
        `serving_files` are fetched (the references stay in the store); `complete` fetches and
        checks every listed file, references included.

        Raises ModelError naming the file and the check (or the storage error).
        """
        check_version(version)
        manifest_bytes = self._download_bytes(f"{version}/{MANIFEST}", f"model version {version!r}")
        if expected_sha256 and sha256_bytes(manifest_bytes) != expected_sha256:
            raise ModelError(
                f"model version {version!r}: its manifest changed after it was activated "
                f"(SHA-256 {sha256_bytes(manifest_bytes)[:12]}..., activated "
                f"{expected_sha256[:12]}...): refusing to serve it; see RUNBOOKS, "
                "'A model version changed under its name'"
            )
        try:
            manifest = json.loads(manifest_bytes)
            names = list(manifest_files(manifest)) if complete else serving_files(manifest)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelError(f"model version {version!r}: manifest is not valid: {exc}") from None
        except ModelError as exc:
            raise ModelError(f"model version {version!r}: {exc}") from None
        target = Path(cache_dir) / version
        if _cache_matches(target, manifest_bytes, complete):
            return target
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache_dir))
        try:
            for name in names:
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
            # Every SHA-256 before the set may replace the cache (with `complete`, the
            # references' too; otherwise they were not fetched).
            verify_manifest(staging, references_optional=not complete)
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
            try:
                staging.rename(target)
            except OSError:
                # Another process finished first; use its copy if it verifies.
                if not _cache_matches(target, manifest_bytes, complete):
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _cache_matches(target: Path, manifest_bytes: bytes, complete: bool = False) -> bool:
    try:
        if (target / MANIFEST).read_bytes() != manifest_bytes:
            return False
        verify_manifest(target, references_optional=not complete)
        return True
    except (OSError, ModelError):
        return False


def open_version(directory: Path, version: str) -> ArtifactSet:
    """The set `download` put in `directory`, validated and loaded as serving loads it
    (`ArtifactSet`: every SHA-256 again, every number, shape and tree), for `version`.

    The last step of every cold start, `ptd fetch` and activation. The manifest's
    `model_version` must be the folder's name: the app reports it in /api/health and
    /api/model_info, so a set stored under another name would report a version that is not
    the one served (two versions, one name; a rollback that cannot be checked). Raises ModelError.
    """
    artifacts = ArtifactSet(directory)
    if artifacts.version != version:
        raise ModelError(
            f"model version {version!r}: its manifest's model_version is {artifacts.version!r}: "
            "refusing to serve a set under another version's name; publish it under its own"
        )
    return artifacts


def check_version(version: str) -> str:
    """`version` if it is a valid version name (VERSION_PATTERN), else ModelError."""
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        shown = repr(version)[:80]
        raise ModelError(f"invalid model version {shown}: use {VERSION_RULE}")
    return version


_check_version = check_version


def parse_pin(value: str) -> tuple[str, str | None]:
    """`VERSION` or `VERSION@sha256:HASH` (PTD_MODEL_VERSION) as (version, hash or None)."""
    pin = PIN_PATTERN.fullmatch(value)
    if pin is None:
        raise ModelError(f"invalid pin {value[:120]!r}: expected VERSION@sha256:<64 hex digits>")
    return check_version(pin["version"]), pin["sha256"]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
    version, pinned = parse_pin(settings.model_version) if settings.model_version else ("", None)
    pointer = store.current()
    if not version:
        if pointer is None:
            raise ModelError(
                f"no model is active: {POINTER} is missing in {store.where}; "
                "run `ptd publish --activate`"
            )
        version = str(pointer["version"])
    if pinned is None and pointer is not None and pointer["version"] == version:
        pinned = pointer.get("manifest_sha256") or None
    directory = store.download(version, settings.model_cache_dir, pinned)
    artifacts = open_version(directory, version)  # every SHA-256 again, validated, loaded
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
