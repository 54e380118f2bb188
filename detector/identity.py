"""Who calls: the verified caller of a request, when the platform verified one.

In Azure the Function App can run App Service built-in authentication ("Easy Auth", configured by
`authsettingsV2` in infra/modules/function-app.bicep). On Flex Consumption it runs inside the
Functions host itself: the host registers its `JobHostEasyAuthMiddleware` on Linux and Flex
Consumption, and enables it when the environment variable `WEBSITE_AUTH_ENABLED` parses as true
(azure-functions-host, `WebScriptHostBuilderExtension`, `HostEasyAuthOptionsSetup`; the host fills
the variable from the site's auth configuration at specialization, an app setting of that name
taking precedence, `HostAssignmentContext.ApplyAppSettings`). The middleware validates the
bearer token and passes the caller to the app in request headers that "external requests aren't
allowed to set" (Microsoft, "Work with user identities in Azure App Service authentication"):

* `X-MS-CLIENT-PRINCIPAL`: base64 of `{"auth_typ", "claims": [{"typ", "val"}, ...], "name_typ",
  "role_typ"}`, the token's claims;
* `X-MS-CLIENT-PRINCIPAL-ID`, `-NAME`, `-IDP`: the caller's object id, name and provider.

Without the middleware nothing strips those headers: anyone could send them. So the app trusts
them only when `platform_auth_enabled` says the middleware ran for this process, from the same
variables the host decided on (`FUNCTIONS_WORKER_RUNTIME`: we run under the Functions host;
`WEBSITE_SKU=FlexConsumption`: the plan on which the host runs the middleware itself;
`WEBSITE_AUTH_ENABLED`: it is on). No `PTD_*` setting can turn the trust on, and `ptd serve` (no
Functions host) never trusts them. What only a real Azure run can prove (that the middleware
strips caller-sent copies on Flex Consumption, and refuses calls without a token) is listed in
docs/OPERATIONS.md ("Callers").

The caller is named by ids, never by a person's name or e-mail: `app:<application (client) id>`
for a client application's token (client-credentials flow: claim `appid`, v1 tokens, or `azp`,
v2), `user:<object id>` for a user's token (claim `oid`). App roles come from the `roles` claim.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

# The app roles of the API's app registration (docs/DEPLOYMENT_GUIDE.md) and the routes needing
# each when `PTD_REQUIRED_ROLES` lists it.
SCORES_READ = "Scores.Read"
MODELS_READ = "Models.Read"
KNOWN_ROLES = (SCORES_READ, MODELS_READ)
ROUTE_ROLES = {
    "/api/predict": SCORES_READ,
    "/api/predict_batch": SCORES_READ,
    "/api/model_info": MODELS_READ,
    "/api/features": MODELS_READ,
    "/api/metrics": MODELS_READ,
}

PRINCIPAL_HEADER = "x-ms-client-principal"
PRINCIPAL_ID_HEADER = "x-ms-client-principal-id"
# Claim types as Easy Auth passes them: short names, or the WS-Federation URIs its default
# claims mapping produces.
_OID = ("http://schemas.microsoft.com/identity/claims/objectidentifier", "oid")
_APPID = ("appid", "azp")
_SCOPE = ("http://schemas.microsoft.com/identity/claims/scope", "scp")
_ROLE = ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role", "role")
# Ids as they may appear in logs and rate-limit keys: GUIDs in practice.
_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# A principal header is a few kB (the token's claims); refuse to decode anything much larger.
MAX_PRINCIPAL_BYTES = 32 * 1024
_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Caller:
    """A verified caller: `name` is `app:<client id>` or `user:<object id>`; `roles` its app
    roles."""

    name: str
    kind: str  # "app" or "user"
    roles: frozenset[str]


# .NET's `Int32.TryParse` with its default (integer) style: optional whitespace and sign, ASCII
# digits, in the 32-bit range.
_DOTNET_INT = re.compile(r"[+-]?[0-9]+")
_DOTNET_SPACE = " \t\n\v\f\r"


def _truthy(value: str | None) -> bool:
    """`WEBSITE_AUTH_ENABLED` as the Functions host reads it (`HostEasyAuthOptionsSetup`:
    `bool.TryParse`, then `int.TryParse`, non-zero is true): "True"/"false" in any case, or a
    32-bit integer in ASCII digits. Anything the host would not read as true is false here, so the
    app never trusts the headers when the host did not run the middleware."""
    text = (value or "").strip(_DOTNET_SPACE)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if not _DOTNET_INT.fullmatch(text):
        return False
    number = int(text)
    return -(2**31) <= number < 2**31 and number != 0


def platform_auth_enabled(environ: Mapping[str, str]) -> bool:
    """True when this process runs under the Functions host on Flex Consumption with built-in
    authentication on: the host then runs the Easy Auth middleware for every request, which
    strips caller-sent `X-MS-CLIENT-PRINCIPAL*` headers and sets them for a verified token."""
    return (
        bool(environ.get("FUNCTIONS_WORKER_RUNTIME"))
        and environ.get("WEBSITE_SKU", "").strip().lower() == "flexconsumption"
        and _truthy(environ.get("WEBSITE_AUTH_ENABLED"))
    )


def _claims(principal: object) -> tuple[dict[str, list[str]], str | None]:
    if not isinstance(principal, dict) or not isinstance(principal.get("claims"), list):
        raise ValueError("no claims")
    claims: dict[str, list[str]] = {}
    for claim in principal["claims"]:
        if isinstance(claim, dict) and isinstance(claim.get("typ"), str):
            value = claim.get("val")
            if isinstance(value, str):
                claims.setdefault(claim["typ"], []).append(value)
    role_typ = principal.get("role_typ")
    return claims, role_typ if isinstance(role_typ, str) else None


def _first(claims: dict[str, list[str]], names: tuple[str, ...]) -> str | None:
    for name in names:
        for value in claims.get(name, ()):
            if _ID.fullmatch(value):
                return value
    return None


# Why a principal names no caller: a fixed vocabulary, safe for logs and error messages.
TOO_LARGE = "principal header over 32 KiB"
NOT_BASE64 = "principal header is not base64"
NOT_CLAIMS = "principal is not a JSON object with a claims list"
NO_ID = "principal has no usable app id (appid, azp) or object id (oid) claim"


def inspect_principal(encoded: str, principal_id: str | None = None) -> tuple[Caller | None, str]:
    """The caller in an `X-MS-CLIENT-PRINCIPAL` value and, when there is none, why (one of
    TOO_LARGE, NOT_BASE64, NOT_CLAIMS, NO_ID; "" with a caller). The value must be strict
    base64 (RFC 4648 §4, as Easy Auth writes it): two values joined by a proxy, or one with bytes
    appended, name no caller rather than the first one's. A token with delegated scopes (`scp`) is
    a user's; one without is a client application's own (client-credentials flow).
    `principal_id` (`X-MS-CLIENT-PRINCIPAL-ID`) stands in for a missing `oid` claim."""
    if len(encoded) > MAX_PRINCIPAL_BYTES:
        return None, TOO_LARGE
    try:
        raw = base64.b64decode(encoded.strip(), validate=True)
    except (ValueError, binascii.Error):
        return None, NOT_BASE64
    try:
        claims, role_typ = _claims(json.loads(raw))
    # RecursionError: a few hundred nested brackets fit in a kilobyte.
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, NOT_CLAIMS
    role_types = (role_typ, *_ROLE) if role_typ else _ROLE
    roles = frozenset(r for t in role_types for r in claims.get(t, ()) if r in KNOWN_ROLES)
    delegated = any(claims.get(t) for t in _SCOPE)
    if not delegated:
        app_id = _first(claims, _APPID)
        if app_id is not None:
            return Caller(f"app:{app_id}", "app", roles), ""
    oid = _first(claims, _OID)
    if oid is None and principal_id and _ID.fullmatch(principal_id):
        oid = principal_id
    if oid is None:
        return None, NO_ID
    return Caller(f"user:{oid}", "user", roles), ""


def decode_principal(encoded: str, principal_id: str | None = None) -> Caller | None:
    """The caller in an `X-MS-CLIENT-PRINCIPAL` value, or None when it names none
    (`inspect_principal` says why)."""
    return inspect_principal(encoded, principal_id)[0]


class PrincipalReader:
    """`caller(headers)`: the verified caller of a request, from the platform's headers. One
    client sends the same token (and so the same header) for up to an hour: decoded principals
    are kept by header value (at most 1,024, the lot dropped when full)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, str | None], tuple[Caller | None, str]] = {}

    def caller(self, raw_headers: list[tuple[bytes, bytes]]) -> Caller | None:
        """The verified caller, or None (see `inspect`)."""
        return self.inspect(raw_headers)[0]

    def inspect(self, raw_headers: list[tuple[bytes, bytes]]) -> tuple[Caller | None, str]:
        """The verified caller and, without one, why (a fixed phrase, safe to log)."""
        encoded: str | None = None
        principal_id: str | None = None
        for name, value in raw_headers:
            lowered = name.lower()
            if lowered == b"x-ms-client-principal":
                if encoded is not None:
                    return None, "more than one principal header"
                encoded = value.decode("latin-1")
            elif lowered == b"x-ms-client-principal-id":
                principal_id = value.decode("latin-1")
        if encoded is None:
            return None, "no principal header (no token, or the platform did not verify one)"
        if len(encoded) > MAX_PRINCIPAL_BYTES:  # before the cache: never a key of that size
            return None, TOO_LARGE
        if principal_id is not None and not _ID.fullmatch(principal_id):
            principal_id = None  # never an id; also keeps the cache key small
        key = (encoded, principal_id)
        try:
            return self._cache[key]
        except KeyError:
            pass
        found = inspect_principal(encoded, principal_id)
        if len(self._cache) >= _CACHE_SIZE:
            self._cache.clear()
        self._cache[key] = found
        return found


def encode_principal(claims: list[tuple[str, str]], auth_typ: str = "aad") -> str:
    """An `X-MS-CLIENT-PRINCIPAL` value with these claims, as Easy Auth encodes it (tests,
    benchmarks, docs)."""
    principal = {
        "auth_typ": auth_typ,
        "claims": [{"typ": t, "val": v} for t, v in claims],
        "name_typ": "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name",
        "role_typ": "http://schemas.microsoft.com/ws/2008/06/identity/claims/role",
    }
    return base64.b64encode(json.dumps(principal).encode()).decode("ascii")


def http_auth_level(settings_require_function_key: bool, platform_auth: bool) -> str:
    """The auth level of the HTTP function: "FUNCTION" (the host checks a function key) unless
    built-in authentication is on for this process *and* `PTD_REQUIRE_FUNCTION_KEY=false`; then
    "ANONYMOUS" (the token alone; the app still refuses protected routes without a verified
    caller). Fails closed: without the platform's signal the key stays required."""
    if platform_auth and not settings_require_function_key:
        return "ANONYMOUS"
    return "FUNCTION"


__all__ = [
    "KNOWN_ROLES",
    "MODELS_READ",
    "ROUTE_ROLES",
    "SCORES_READ",
    "Caller",
    "PrincipalReader",
    "decode_principal",
    "encode_principal",
    "http_auth_level",
    "inspect_principal",
    "platform_auth_enabled",
]
