"""Who calls (issue 17): the platform's identity headers are trusted only when built-in
authentication is on for the process (detected from the platform's own variables), the caller
they name is in the audit line and the request log and keys the rate limit, app roles give a 403
JSON error, and no header the caller writes (`X-Forwarded-For`, forged `X-MS-CLIENT-PRINCIPAL*`)
decides identity or limits: in the ASGI app, and through function_app.py with real
`azure.functions.HttpRequest` objects."""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import azure.functions as func
import pytest
from fastapi.testclient import TestClient

from detector.config import ConfigError, Settings
from detector.identity import (
    KNOWN_ROLES,
    MODELS_READ,
    SCORES_READ,
    PrincipalReader,
    decode_principal,
    encode_principal,
    http_auth_level,
    inspect_principal,
    platform_auth_enabled,
)
from tests.test_api import FEATURES_BODY
from tests.test_function_app_http import Context

BILLING_APP = "3f1c2b7e-6a4d-4c1e-9b2a-0d5e8f7a6c11"
FIELD_APP = "7b9e4d2a-1c3f-4e5a-8b6d-2f0a9c8e7d22"
USER_OID = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d"
PLATFORM_ENV = {
    "FUNCTIONS_WORKER_RUNTIME": "python",
    "WEBSITE_SKU": "FlexConsumption",
    "WEBSITE_AUTH_ENABLED": "True",
}
PREDICT = json.dumps({"customer_id": "CUST-IDENTITY-1", "features": FEATURES_BODY}).encode()
JSON = {"content-type": "application/json"}


def app_token(app_id: str, *roles: str) -> dict[str, str]:
    """The headers Easy Auth sets for a client-credentials token of `app_id` (v1 claims)."""
    claims = [("aud", "api://ptd"), ("appid", app_id), ("oid", "sp-object-id"), ("idtyp", "app")]
    claims += [("roles", role) for role in roles]
    return {
        "x-ms-client-principal": encode_principal(claims),
        "x-ms-client-principal-id": "sp-object-id",
        "x-ms-client-principal-name": app_id,
        "x-ms-client-principal-idp": "aad",
    }


def fields_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == logger and hasattr(r, "fields")]


# --- detection and decoding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (PLATFORM_ENV, True),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": "true"}, True),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": "1"}, True),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": "False"}, False),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": ""}, False),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": "yes"}, False),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": " -7 "}, True),
        # What .NET's Int32.TryParse refuses, the host reads as off: so must the app.
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": "4294967296"}, False),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": "1_0"}, False),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": "\u0661"}, False),
        ({**PLATFORM_ENV, "WEBSITE_AUTH_ENABLED": "\u20031"}, False),
        ({k: v for k, v in PLATFORM_ENV.items() if k != "WEBSITE_AUTH_ENABLED"}, False),
        # Not under the Functions host (ptd serve, a shell): nothing strips the headers.
        ({k: v for k, v in PLATFORM_ENV.items() if k != "FUNCTIONS_WORKER_RUNTIME"}, False),
        # Another plan or a container: the host does not run the middleware itself.
        ({**PLATFORM_ENV, "WEBSITE_SKU": "ElasticPremium"}, False),
        ({"WEBSITE_AUTH_ENABLED": "True"}, False),
        # Our own settings cannot turn the trust on.
        (
            {
                "FUNCTIONS_WORKER_RUNTIME": "python",
                "PTD_REQUIRE_FUNCTION_KEY": "false",
                "PTD_REQUIRED_ROLES": "Scores.Read",
            },
            False,
        ),
    ],
)
def test_platform_auth_is_detected_from_the_platforms_variables_only(
    environ: dict[str, str], expected: bool
) -> None:
    assert platform_auth_enabled(environ) is expected
    assert Settings.from_env(environ).platform_auth is expected


def test_the_function_key_is_dropped_only_with_the_platforms_signal() -> None:
    assert http_auth_level(True, False) == "FUNCTION"
    assert http_auth_level(False, False) == "FUNCTION"  # fails closed
    assert http_auth_level(True, True) == "FUNCTION"
    assert http_auth_level(False, True) == "ANONYMOUS"


def test_role_and_key_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="PTD_REQUIRED_ROLES"):
        Settings.from_env({"PTD_REQUIRED_ROLES": "Scores.Write"})
    with pytest.raises(ConfigError, match="PTD_REQUIRE_FUNCTION_KEY"):
        Settings.from_env({"PTD_REQUIRE_FUNCTION_KEY": "no"})
    assert Settings.from_env({}).require_function_key is True
    assert Settings.from_env({}).required_roles == ()


def test_principals_name_apps_and_users_by_id() -> None:
    app = decode_principal(app_token(BILLING_APP, SCORES_READ)["x-ms-client-principal"])
    assert app is not None and app.name == f"app:{BILLING_APP}" and app.kind == "app"
    assert app.roles == {SCORES_READ}
    # v2 tokens name the client in azp; roles under the role claim type of the principal.
    v2 = decode_principal(
        encode_principal(
            [
                ("azp", FIELD_APP),
                ("http://schemas.microsoft.com/ws/2008/06/identity/claims/role", MODELS_READ),
                ("roles", "Admin.Everything"),  # not a role of this API: ignored
            ]
        )
    )
    assert v2 is not None and v2.name == f"app:{FIELD_APP}" and v2.roles == {MODELS_READ}
    # A user's token (delegated scope): the object id, never the name or e-mail.
    user = decode_principal(
        encode_principal(
            [
                ("http://schemas.microsoft.com/identity/claims/scope", "user_impersonation"),
                ("http://schemas.microsoft.com/identity/claims/objectidentifier", USER_OID),
                ("name", "Jane Inspector"),
                ("appid", FIELD_APP),
            ]
        )
    )
    assert user is not None and user.name == f"user:{USER_OID}" and user.kind == "user"
    for bad in ("", "not base64 !!", encode_principal([]), "e30=", "W10=", "x" * 40_000):
        assert decode_principal(bad) is None
    # An id that could not be a GUID is not logged or used as a key.
    assert decode_principal(encode_principal([("appid", "a b\nc")])) is None


def test_hostile_principals_name_no_caller_and_say_why() -> None:
    real = app_token(BILLING_APP)["x-ms-client-principal"]
    # A padded value: a lenient decoder stops at the padding and reads the forged caller alone.
    forged = next(
        v
        for k in range(3)
        if (v := encode_principal([("appid", FIELD_APP), ("pad", "p" * k)])).endswith("=")
    )
    assert decode_principal(forged) is not None
    # Deep nesting fits in a kilobyte and used to escape as RecursionError (a 500).
    deep = base64.b64encode(b"[" * 1000).decode()
    deep_claims = base64.b64encode(b'{"claims": [' + b'{"a": ' * 1000 + b"1" + b"}" * 1000 + b"]}")
    cases = {
        deep: "not a JSON object",
        deep_claims.decode(): "not a JSON object",
        # Two values joined by a proxy, or bytes appended: never the first value's caller.
        f"{forged}, {real}": "not base64",
        real + "garbage": "not base64",
        "x" * 40_000: "over 32 KiB",
        encode_principal([("name", "Jane")]): "no usable app id",
    }
    for value, why in cases.items():
        caller, reason = inspect_principal(value)
        assert caller is None and why in reason, (value[:40], reason)


def test_the_reader_refuses_two_principal_headers_and_keeps_its_cache_small() -> None:
    reader = PrincipalReader()
    forged = encode_principal([("appid", FIELD_APP)]).encode()
    real = app_token(BILLING_APP)["x-ms-client-principal"].encode()
    caller, why = reader.inspect(
        [(b"x-ms-client-principal", forged), (b"x-ms-client-principal", real)]
    )
    assert caller is None and "more than one" in why
    # A long -ID header is never an id, so it neither names a caller nor grows the cache key.
    user = encode_principal([("scp", "user_impersonation")]).encode()
    for n in range(3):
        caller = reader.caller(
            [(b"x-ms-client-principal", user), (b"x-ms-client-principal-id", b"i" * (100_000 + n))]
        )
        assert caller is None
    assert len(reader._cache) == 1
    assert sum(len(k[0]) + len(k[1] or "") for k in reader._cache) < 1000


def test_the_reader_caches_decoded_principals_by_header() -> None:
    reader = PrincipalReader()
    raw = [(k.encode(), v.encode()) for k, v in app_token(BILLING_APP).items()]
    first = reader.caller(raw)
    assert first is not None and reader.caller(raw) is first
    assert reader.caller([(b"x-ms-client-principal-id", b"someone")]) is None


# --- the ASGI app --------------------------------------------------------------------------------


def test_forged_headers_are_ignored_without_platform_auth(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client()  # platform_auth False: `ptd serve`, tests, Azure without auth
    with caplog.at_level(logging.INFO, logger="detector"):
        ok = client.post(
            "/api/predict", content=PREDICT, headers={**JSON, **app_token(BILLING_APP)}
        )
    assert ok.status_code == 200
    (audit,) = fields_of(caplog, "detector.audit")
    assert audit["caller"] == "anonymous"
    assert BILLING_APP not in caplog.text
    # With local API keys, a forged principal does not replace the key either.
    keyed = make_client(api_keys=(f"billing:{'k' * 24}",))
    refused = keyed.post("/api/predict", content=PREDICT, headers={**JSON, **app_token(FIELD_APP)})
    assert refused.status_code == 401


def test_platform_principal_names_the_caller_in_audit_and_request_log(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(platform_auth=True)
    with caplog.at_level(logging.INFO, logger="detector"):
        ok = client.post(
            "/api/predict", content=PREDICT, headers={**JSON, **app_token(BILLING_APP)}
        )
    assert ok.status_code == 200, ok.text
    (audit,) = fields_of(caplog, "detector.audit")
    assert audit["caller"] == f"app:{BILLING_APP}"
    (request,) = fields_of(caplog, "detector.requests")
    assert request["caller"] == f"app:{BILLING_APP}"
    assert "CUST-IDENTITY-1" not in caplog.text
    # No verified caller: 401 naming the Authorization header (in Azure Easy Auth answers first).
    deep = base64.b64encode(b"[" * 1000).decode()
    for headers, why in (
        ({}, "no principal header"),
        ({"x-ms-client-principal": "garbage"}, "not base64"),
        ({"x-ms-client-principal-id": "x"}, "no principal header"),
        ({"x-ms-client-principal": deep}, "not a JSON object"),
    ):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="detector"):
            refused = client.post("/api/predict", content=PREDICT, headers={**JSON, **headers})
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "unauthorized"
        assert why in refused.json()["error"]["message"]
        assert refused.json()["error"]["location"] == "header.authorization"
        (request,) = fields_of(caplog, "detector.requests")
        assert why in request["auth_failure"]
        assert "Traceback" not in caplog.text
    assert client.get("/api/health").status_code == 200  # open
    schema = client.get("/api/openapi.json").json()
    assert schema["paths"]["/api/predict"]["post"]["security"] == [{"EntraId": []}]
    assert schema["components"]["securitySchemes"]["EntraId"]["scheme"] == "bearer"


def test_missing_app_roles_give_403_json(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(platform_auth=True, required_roles=KNOWN_ROLES)
    reader_only = app_token(FIELD_APP, MODELS_READ)
    with caplog.at_level(logging.INFO, logger="detector"):
        refused = client.post("/api/predict", content=PREDICT, headers={**JSON, **reader_only})
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error == {
        "code": "forbidden",
        "message": f"caller app:{FIELD_APP} lacks the app role Scores.Read this route needs; an "
        "administrator assigns it to the client application (docs/DEPLOYMENT_GUIDE.md)",
        "location": "header.authorization",
    }
    assert refused.headers["content-type"] == "application/json"
    (audit,) = fields_of(caplog, "detector.audit")
    assert audit["caller"] == f"app:{FIELD_APP}" and audit["outcome"] == "forbidden"
    assert client.get("/api/model_info", headers=reader_only).status_code == 200
    assert client.get("/api/features", headers=reader_only).status_code == 200
    scorer = app_token(BILLING_APP, SCORES_READ)
    assert client.get("/api/model_info", headers=scorer).status_code == 403
    assert client.get("/api/metrics", headers=scorer).status_code == 403
    batch = json.dumps({"records": [{"customer_id": "a", "features": FEATURES_BODY}]})
    assert (
        client.post("/api/predict", content=PREDICT, headers={**JSON, **scorer}).status_code == 200
    )
    assert (
        client.post("/api/predict_batch", content=batch, headers={**JSON, **scorer}).status_code
        == 200
    )
    # Roles not listed in PTD_REQUIRED_ROLES are not checked.
    lenient = make_client(platform_auth=True, required_roles=(SCORES_READ,))
    assert lenient.get("/api/model_info", headers=scorer).status_code == 200


def test_rotating_x_forwarded_for_does_not_reset_the_limit_locally(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(rate_limit_per_minute=2)
    codes = [
        client.get("/api/features", headers={"x-forwarded-for": f"203.0.113.{i}"}).status_code
        for i in range(4)
    ]
    assert codes == [200, 200, 429, 429]


def test_the_limit_is_per_verified_caller(make_client: Callable[..., TestClient]) -> None:
    client = make_client(platform_auth=True, rate_limit_per_minute=2)
    billing, field = app_token(BILLING_APP), app_token(FIELD_APP)
    codes = [
        client.get(
            "/api/features", headers={**billing, "x-forwarded-for": f"198.51.100.{i}"}
        ).status_code
        for i in range(3)
    ]
    assert codes == [200, 200, 429]
    assert client.get("/api/features", headers=field).status_code == 200  # its own bucket


# --- through function_app.py ---------------------------------------------------------------------


def load_function_app(
    env: dict[str, str], tiny_artifacts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, Callable[[func.HttpRequest], func.HttpResponse], Callable[[], None]]:
    """function_app imported under `env`, as the worker does at cold start: (the indexed HTTP
    function, a caller of its user code, a closer)."""
    base = {
        "PTD_MODEL_SOURCE": "local",
        "PTD_MODEL_DIR": str(tiny_artifacts_dir),
        "PTD_API_KEYS": "",
        "PTD_CORS_ORIGINS": "",
    }
    for name in ("WEBSITE_AUTH_ENABLED", "WEBSITE_SKU", "FUNCTIONS_WORKER_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**base, **env}.items():
        monkeypatch.setenv(name, value)
    sys.modules.pop("function_app", None)
    module = importlib.import_module("function_app")
    functions = {f.get_function_name(): f for f in module.app.get_functions()}
    http = functions["http_app_func"]
    user_code = http.get_user_function()
    loop = asyncio.new_event_loop()

    def call(request: func.HttpRequest) -> func.HttpResponse:
        response: func.HttpResponse = loop.run_until_complete(user_code(request, Context()))
        return response

    def close() -> None:
        if module.app.startup_task_done:
            loop.run_until_complete(module.app.middleware.notify_shutdown())
            module.app.startup_task_done = False
        loop.close()
        sys.modules.pop("function_app", None)

    return http, call, close


@pytest.fixture
def function_app_under(
    tiny_artifacts_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[dict[str, str]], tuple[Any, Any]]]:
    closers: list[Callable[[], None]] = []

    def load(env: dict[str, str]) -> tuple[Any, Any]:
        http, call, close = load_function_app(env, tiny_artifacts_dir, monkeypatch)
        closers.append(close)
        return http, call

    yield load
    for close in closers:
        close()


def request(path: str, headers: dict[str, str], body: bytes = b"") -> func.HttpRequest:
    method = "POST" if body else "GET"
    return func.HttpRequest(
        method=method, url=f"http://localhost{path}", headers=headers, body=body
    )


def test_function_app_without_platform_auth_ignores_forged_and_forwarded_headers(
    function_app_under: Callable[[dict[str, str]], tuple[Any, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Our own setting asks for the token alone; without the platform's signal it is not honoured.
    http, call = function_app_under(
        {
            "FUNCTIONS_WORKER_RUNTIME": "python",
            "PTD_RATE_LIMIT_PER_MINUTE": "2",
            "PTD_REQUIRE_FUNCTION_KEY": "false",
        }
    )
    assert http.get_trigger().auth_level == func.AuthLevel.FUNCTION
    with caplog.at_level(logging.INFO, logger="detector"):
        codes = [
            call(
                request(
                    "/api/predict",
                    {
                        **JSON,
                        **app_token(BILLING_APP),
                        "x-forwarded-for": f"203.0.113.{i}, 10.0.0.1",
                    },
                    PREDICT,
                )
            ).status_code
            for i in range(3)
        ]
    # One coarse bucket per instance: the host cannot tell the app which key was used, and no
    # header the caller writes buys a fresh allowance.
    assert codes == [200, 200, 429]
    audits = fields_of(caplog, "detector.audit")
    assert [a["caller"] for a in audits] == ["function-key"] * 3
    assert BILLING_APP not in caplog.text


def test_function_app_with_platform_auth_names_limits_and_checks_the_caller(
    function_app_under: Callable[[dict[str, str]], tuple[Any, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    http, call = function_app_under(
        {
            **PLATFORM_ENV,
            "PTD_RATE_LIMIT_PER_MINUTE": "2",
            "PTD_REQUIRED_ROLES": "Scores.Read,Models.Read",
            "PTD_REQUIRE_FUNCTION_KEY": "false",
        }
    )
    assert http.get_trigger().auth_level == func.AuthLevel.ANONYMOUS
    scorer = app_token(BILLING_APP, SCORES_READ)
    with caplog.at_level(logging.INFO, logger="detector"):
        codes = [
            call(
                request(
                    "/api/predict",
                    {**JSON, **scorer, "x-forwarded-for": f"198.51.100.{i}"},
                    PREDICT,
                )
            ).status_code
            for i in range(3)
        ]
    assert codes == [200, 200, 429]
    audits = fields_of(caplog, "detector.audit")
    assert {a["caller"] for a in audits} == {f"app:{BILLING_APP}"}
    other = call(request("/api/predict", {**JSON, **app_token(FIELD_APP, SCORES_READ)}, PREDICT))
    assert other.status_code == 200  # another caller, another bucket
    missing_role = call(request("/api/predict", {**JSON, **app_token(FIELD_APP)}, PREDICT))
    assert missing_role.status_code == 403
    assert json.loads(missing_role.get_body())["error"]["code"] == "forbidden"
    assert missing_role.headers["content-type"] == "application/json"
    anonymous = call(request("/api/predict", JSON, PREDICT))
    assert anonymous.status_code == 401
    assert json.loads(anonymous.get_body())["error"]["location"] == "header.authorization"
    assert call(request("/api/health", {})).status_code == 200


def test_function_app_with_platform_auth_keeps_the_key_by_default(
    function_app_under: Callable[[dict[str, str]], tuple[Any, Any]],
) -> None:
    http, call = function_app_under(PLATFORM_ENV)
    assert http.get_trigger().auth_level == func.AuthLevel.FUNCTION
    ok = call(request("/api/model_info", app_token(BILLING_APP)))
    assert ok.status_code == 200  # no role listed: any caller the platform let in


def test_the_app_says_at_start_which_callers_it_believes(
    make_client: Callable[..., TestClient], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="detector"):
        make_client(platform_auth=True, required_roles=KNOWN_ROLES, api_keys=(f"b:{'k' * 24}",))
    assert "built-in authentication detected" in caplog.text
    assert "PTD_API_KEYS is ignored" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="detector"):
        make_client(required_roles=(SCORES_READ,), require_function_key=False)
    assert "PTD_REQUIRED_ROLES is ignored" in caplog.text
    assert "PTD_REQUIRE_FUNCTION_KEY=false is ignored" in caplog.text
    assert "built-in authentication detected" not in caplog.text
