"""Settings read from the environment, once, into a frozen dataclass.

Every setting the code reads is listed here (and in docs/CONFIGURATION.md); the Bicep sets the
same names as app settings. Nothing here has a secret as default.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from detector.identity import KNOWN_ROLES, platform_auth_enabled

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent.parent / "models_artifacts"
MODEL_NAMES = ("lightgbm", "random_forest", "logistic_regression")
# Model version names, everywhere a version is named (store paths, pointer, PTD_MODEL_VERSION,
# the CLI): no path separators, no control characters, bounded length, and no trailing dot (a
# version is a blob path segment, and Azure Storage advises that no path segment end with a dot:
# "Naming and Referencing Containers, Blobs, and Metadata").
VERSION_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9_-])?")
VERSION_RULE = (
    "letters, digits, '.', '_' and '-', at most 64, starting with a letter or digit and not "
    "ending with '.'"
)
PIN_PATTERN = re.compile(r"(?P<version>[^@]*)(@sha256:(?P<sha256>[0-9a-f]{64}))?")
# Functions instances may write only to the temp folder; the cache lives there.
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "ptd-models"
# Largest output of one gzip file (`detector.compression.gunzip_to`). 4 GiB of CSV is about
# 40 M invoice rows at ~100 bytes a row: 11 times the whole STEG history (3.6 M rows, scored in
# about 11 s), so no real export comes near it, while a gzip bomb (1,000x and more) stops there.
# The Bicep sets a lower value for Flex Consumption, whose instances have 0.8 GB of temporary
# storage (docs/CONFIGURATION.md).
DEFAULT_MAX_DECOMPRESSED_BYTES = 4 * 1024**3
# Request bodies: the largest one, and the sum an instance parses and scores at once. Parsing
# costs up to ~23 bytes of memory per body byte (docs/OPERATIONS.md, "Memory"), so 24 MiB in
# work keeps the worker under 1 GB on a 2,048 MB Flex Consumption instance.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_INFLIGHT_BODY_BYTES = 24 * 1024 * 1024


class ConfigError(ValueError):
    """A setting is present but unusable; the message names the setting."""


def _int(env: dict[str, str], name: str, default: int, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"setting {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ConfigError(f"setting {name}={value} must be at least {minimum}")
    return value


def _list(env: dict[str, str], name: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    """Runtime settings. Build with `Settings.from_env()`; tests pass their own mapping."""

    model_source: str = "local"  # PTD_MODEL_SOURCE: "local" (bundled files) or "blob"
    model_dir: Path = BUNDLED_MODEL_DIR  # PTD_MODEL_DIR: artifact folder when source is local
    model_version: str = ""  # PTD_MODEL_VERSION: pin a published version; empty = the pointer
    model_container: str = "models"  # PTD_MODEL_CONTAINER
    model_cache_dir: Path = DEFAULT_CACHE_DIR  # PTD_MODEL_CACHE_DIR
    training_container: str = "training"  # PTD_TRAINING_CONTAINER (ptd snapshot, retraining)
    default_model: str = "lightgbm"  # PTD_DEFAULT_MODEL
    storage_connection: str = "STORAGE"  # name of the connection setting prefix (see store.py)
    batch_in_container: str = "batch-in"  # PTD_BATCH_IN_CONTAINER
    batch_out_container: str = "batch-out"  # PTD_BATCH_OUT_CONTAINER
    max_batch_records: int = 10_000  # PTD_MAX_BATCH_RECORDS
    max_invoices_per_customer: int = 2_000  # PTD_MAX_INVOICES_PER_CUSTOMER
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # PTD_MAX_BODY_BYTES (decoded size)
    # PTD_MAX_INFLIGHT_BODY_BYTES: bodies in work at once; at least max_body_bytes
    max_inflight_body_bytes: int = DEFAULT_MAX_INFLIGHT_BODY_BYTES
    max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES  # PTD_MAX_DECOMPRESSED_BYTES
    rate_limit_per_minute: int = 0  # PTD_RATE_LIMIT_PER_MINUTE per caller; 0 = off
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # PTD_API_KEYS "name:key,..."
    cors_origins: tuple[str, ...] = ()  # PTD_CORS_ORIGINS comma-separated allowlist
    log_level: str = "INFO"  # PTD_LOG_LEVEL
    appinsights_connection: str = field(
        default="", repr=False
    )  # APPLICATIONINSIGHTS_CONNECTION_STRING
    # PTD_REQUIRED_ROLES: app roles a verified caller must hold, per route (detector.identity);
    # empty: any caller the platform let in. Only with built-in authentication on.
    required_roles: tuple[str, ...] = ()
    # PTD_REQUIRE_FUNCTION_KEY: false lets the platform's token alone in (auth level ANONYMOUS),
    # honoured only when built-in authentication is on (detector.identity.http_auth_level).
    require_function_key: bool = True
    # Not a setting: built-in authentication is on for this process, read from the platform's
    # own variables (detector.identity.platform_auth_enabled); never true under `ptd serve`.
    platform_auth: bool = False
    # Not a setting: this process runs under the Azure Functions host (FUNCTIONS_WORKER_RUNTIME
    # set): the host's handlers ship the logs and a function key let the caller in. Never true
    # under `ptd serve`, whatever the environment copied from local.settings.json says.
    functions_host: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if environ is None else environ)
        source = env.get("PTD_MODEL_SOURCE", "local").strip().lower() or "local"
        if source not in ("local", "blob"):
            raise ConfigError(f"setting PTD_MODEL_SOURCE={source!r} must be 'local' or 'blob'")
        default_model = env.get("PTD_DEFAULT_MODEL", "lightgbm").strip() or "lightgbm"
        if default_model not in MODEL_NAMES:
            raise ConfigError(
                f"setting PTD_DEFAULT_MODEL={default_model!r} must be one of "
                f"{', '.join(MODEL_NAMES)}"
            )
        model_version = env.get("PTD_MODEL_VERSION", "").strip()
        pin = PIN_PATTERN.fullmatch(model_version)
        if model_version and not (pin and VERSION_PATTERN.fullmatch(pin["version"])):
            raise ConfigError(
                f"setting PTD_MODEL_VERSION={model_version[:100]!r} must be a version name "
                f"({VERSION_RULE}), optionally followed by @sha256:<64 hex digits>"
            )
        max_body = _int(env, "PTD_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)
        inflight = _int(env, "PTD_MAX_INFLIGHT_BODY_BYTES", DEFAULT_MAX_INFLIGHT_BODY_BYTES)
        if inflight < max_body:
            raise ConfigError(
                f"setting PTD_MAX_INFLIGHT_BODY_BYTES={inflight} must be at least "
                f"PTD_MAX_BODY_BYTES={max_body}: a body of the largest size could never be read"
            )
        roles = _list(env, "PTD_REQUIRED_ROLES")
        unknown = [r for r in roles if r not in KNOWN_ROLES]
        if unknown:
            raise ConfigError(
                f"setting PTD_REQUIRED_ROLES names {unknown[0][:40]!r}; the app roles are "
                f"{', '.join(KNOWN_ROLES)}"
            )
        require_key = env.get("PTD_REQUIRE_FUNCTION_KEY", "true").strip().lower() or "true"
        if require_key not in ("true", "false"):
            raise ConfigError(
                f"setting PTD_REQUIRE_FUNCTION_KEY={require_key[:20]!r} must be 'true' or 'false'"
            )
        return cls(
            model_source=source,
            model_dir=Path(env.get("PTD_MODEL_DIR") or BUNDLED_MODEL_DIR),
            model_version=model_version,
            model_container=env.get("PTD_MODEL_CONTAINER", "models").strip() or "models",
            model_cache_dir=Path(env.get("PTD_MODEL_CACHE_DIR") or DEFAULT_CACHE_DIR),
            training_container=env.get("PTD_TRAINING_CONTAINER", "training").strip() or "training",
            default_model=default_model,
            batch_in_container=env.get("PTD_BATCH_IN_CONTAINER", "batch-in").strip() or "batch-in",
            batch_out_container=env.get("PTD_BATCH_OUT_CONTAINER", "batch-out").strip()
            or "batch-out",
            max_batch_records=_int(env, "PTD_MAX_BATCH_RECORDS", 10_000),
            max_invoices_per_customer=_int(env, "PTD_MAX_INVOICES_PER_CUSTOMER", 2_000),
            max_body_bytes=max_body,
            max_inflight_body_bytes=inflight,
            max_decompressed_bytes=_int(
                env, "PTD_MAX_DECOMPRESSED_BYTES", DEFAULT_MAX_DECOMPRESSED_BYTES
            ),
            rate_limit_per_minute=_int(env, "PTD_RATE_LIMIT_PER_MINUTE", 0, minimum=0),
            api_keys=_list(env, "PTD_API_KEYS"),
            cors_origins=_list(env, "PTD_CORS_ORIGINS"),
            log_level=env.get("PTD_LOG_LEVEL", "INFO").strip().upper() or "INFO",
            appinsights_connection=env.get("APPLICATIONINSIGHTS_CONNECTION_STRING", ""),
            required_roles=roles,
            require_function_key=require_key == "true",
            platform_auth=platform_auth_enabled(env),
            functions_host=bool(env.get("FUNCTIONS_WORKER_RUNTIME")),
        )
