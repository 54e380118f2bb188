"""Structure of the Bicep in infra/: parsed with pycep-parser (no Bicep compiler here).

What is checked is what a first deployment depends on: the Flex Consumption plan and its scale
settings, identity-only connections, container-scoped least-privilege roles, storage hardening,
Application Insights without local auth, the alerts, the Event Grid system topic, the outputs the
deploy workflow reads, and that the app settings match what the code reads (both directions).
Issue 17 added: built-in authentication (authsettingsV2: Entra ID, tokens required but on the
open paths, the allowed client applications) and the settings of the caller checks.
Issue 16 added: the deployer defaulting to deployer(), dead-lettering and the post-deploy
template (Event Grid subscription, availability test), alert receivers and minimum request
counts, diagnostic settings, network isolation, zone redundancy, the lock, the workbook and the
azd tags. Conditions of the templates (zone redundancy, receivers, isolation) are evaluated with
a small interpreter of the parsed expressions (`evaluate`), not only looked at.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from pycep import BicepParser

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
MAIN = INFRA / "main.bicep"
MODULES = INFRA / "modules"
POST_DEPLOY = INFRA / "post-deploy.bicep"
DEPLOY_WORKFLOW = ROOT / ".github" / "workflows" / "deploy.yml"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))
TELEMETRY = ROOT / "detector" / "telemetry.py"

# Built-in role definition ids.
BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
BLOB_DATA_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
BLOB_DATA_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
QUEUE_DATA_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
MONITORING_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"

# Settings the code reads that must never be set in Azure: function keys do the auth there, and
# the models come from blob storage, not from a folder.
LOCAL_ONLY_SETTINGS = {"PTD_API_KEYS", "PTD_MODEL_DIR"}
# Read by the `ptd` model-store commands (the deploy workflow sets it), never by the app.
CLI_ONLY_SETTINGS = {"PTD_ACTOR", "PTD_TRAINING_CONTAINER"}
# Assumed until detector/config.py exists (the list).
FALLBACK_CODE_SETTINGS = {
    "PTD_MODEL_SOURCE",
    "PTD_MODEL_VERSION",
    "PTD_MODEL_CONTAINER",
    "PTD_MODEL_CACHE_DIR",
    "PTD_DEFAULT_MODEL",
    "PTD_BATCH_IN_CONTAINER",
    "PTD_BATCH_OUT_CONTAINER",
    "PTD_MAX_BATCH_RECORDS",
    "PTD_MAX_INVOICES_PER_CUSTOMER",
    "PTD_MAX_BODY_BYTES",
    "PTD_RATE_LIMIT_PER_MINUTE",
    "PTD_CORS_ORIGINS",
    "PTD_LOG_LEVEL",
    "PTD_API_KEYS",
    "PTD_MODEL_DIR",
}
# The app's storage connection. The blob SDK binding (Functions host) and the Python store read
# the identity triple; the host's blob extension also reads the queue URI of the trigger's
# connection, where it keeps the poison queue of blobs that keep failing.
STORAGE_CONNECTION = "STORAGE"
STORAGE_IDENTITY_SUFFIXES = {"blobServiceUri", "credential", "clientId"}
STORAGE_HOST_READ_SUFFIXES = {"queueServiceUri"}
# Settings that Flex Consumption rejects or that would carry a secret.
FORBIDDEN_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "FUNCTIONS_EXTENSION_VERSION",
    "WEBSITE_RUN_FROM_PACKAGE",
    "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING",
    "WEBSITE_CONTENTSHARE",
    "AzureWebJobsStorage",
    "STORAGE",
    "APPINSIGHTS_INSTRUMENTATIONKEY",
}
# Events the app logs (detector/telemetry.py) that the log alerts look for.
ALERT_EVENTS = ("batch_failed", "model_load_failed", "batch_drift")
# Outputs the deploy workflow needs, at least.
REQUIRED_OUTPUTS = {
    "functionAppName",
    "functionAppUrl",
    "storageAccountName",
    "storageBlobEndpoint",
    "modelsContainerName",
    "batchInContainerName",
    "batchOutContainerName",
    "eventGridSystemTopicName",
    "resourceGroup",
}


@cache
def parse(path: Path) -> dict[str, Any]:
    return BicepParser().parse(file_path=path)


def module(name: str) -> dict[str, Any]:
    return parse(MODULES / name)


def module_call(name: str) -> dict[str, Any]:
    """The config of main.bicep's module `name` (name, params, scope), unwrapped from `if`."""
    config = parse(MAIN)["modules"][name]["config"]
    if "condition" in config and isinstance(config.get("config"), dict):
        return config["config"]
    return config


def module_condition(name: str) -> Any:
    config = parse(MAIN)["modules"][name]["config"]
    return config.get("condition")


def evaluate(expr: Any, scope: dict[str, Any]) -> Any:
    """Evaluate a parsed Bicep expression of the kinds the templates use for their conditions
    (ternaries, empty, contains, concat, union, !, literals, names of params and vars). pycep
    writes names and string literals alike as strings: a string naming something in `scope` is
    that value, any other string is itself."""
    if isinstance(expr, str):
        return scope.get(expr, expr)
    if isinstance(expr, list):
        return [evaluate(item, scope) for item in expr]
    if not isinstance(expr, dict):
        return expr
    if "operator" in expr:
        op, operands = expr["operator"]["type"], expr["operator"]["operands"]
        if op == "conditional":
            branch = "true_value" if evaluate(operands["condition"], scope) else "false_value"
            return evaluate(operands[branch], scope)
        if op == "not":
            return not evaluate(operands["bool_value"], scope)
        comparisons = {
            "greater_than": lambda a, b: a > b,
            "greater_than_or_equals": lambda a, b: a >= b,
            "less_than": lambda a, b: a < b,
            "less_than_or_equals": lambda a, b: a <= b,
            "equals": lambda a, b: a == b,
            "not_equals": lambda a, b: a != b,
        }
        if op in comparisons:
            first = evaluate(operands["operand_1"], scope)
            second = evaluate(operands["operand_2"], scope)
            return comparisons[op](first, second)
        if op == "property_accessor":
            base = evaluate(operands["operand_1"], scope)
            path = operands["operand_2"]
            names = []
            while isinstance(path, dict):
                names.append(path["operator"]["operands"]["operand_1"])
                path = path["operator"]["operands"]["operand_2"]
            names.append(path)
            for name in names:
                base = base[name] if isinstance(base, dict) else f"{base}.{name}"
            return base
        raise NotImplementedError(op)
    if "function" in expr:
        fn, args = expr["function"]["type"], expr["function"]["parameters"]
        values = [evaluate(v, scope) for v in args.values()]
        if fn == "empty":
            return not values[0]
        if fn == "contains":
            return values[1] in values[0]
        if fn == "concat":
            return [item for value in values for item in value]
        if fn == "split":
            return values[0].split(values[1])
        if fn == "replace":
            return values[0].replace(values[1], values[2])
        if fn == "union":
            merged: dict[str, Any] = {}
            for value in values:
                merged.update(value)
            return merged
        raise NotImplementedError(fn)
    return {key.strip("'"): evaluate(value, scope) for key, value in expr.items()}


def defaults(doc: dict[str, Any]) -> dict[str, Any]:
    return {name: spec.get("default") for name, spec in doc["parameters"].items()}


def scope_of(doc: dict[str, Any], **params: Any) -> dict[str, Any]:
    """Parameters (defaults overridden by `params`) and the variables computed from them."""
    scope = {**defaults(doc), **params}
    for name, spec in doc.get("variables", {}).items():
        try:
            scope[name] = evaluate(spec["value"], scope)
        except (NotImplementedError, KeyError, TypeError):
            scope[name] = spec["value"]  # uses functions the tests need not evaluate
    return scope


def body(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource's object, unwrapped from an `if (...)` condition."""
    config = resource["config"]
    if "condition" in config and isinstance(config.get("config"), dict):
        return config["config"]
    return config


def resources_of(doc: dict[str, Any], rtype: str, *, existing: bool = False) -> dict[str, Any]:
    return {
        symbol: res
        for symbol, res in doc.get("resources", {}).items()
        if res["type"].lower() == rtype.lower() and res["existing"] == existing
    }


def one(doc: dict[str, Any], rtype: str) -> dict[str, Any]:
    found = resources_of(doc, rtype)
    assert len(found) == 1, f"expected one {rtype}, found {sorted(found)}"
    return body(next(iter(found.values())))


def param_default(doc: dict[str, Any], name: str) -> Any:
    assert name in doc["parameters"], f"parameter {name} missing"
    return doc["parameters"][name].get("default")


def decorator(doc: dict[str, Any], param: str, kind: str) -> Any:
    for deco in doc["parameters"][param]["decorators"]:
        if deco["type"] == kind:
            return deco["argument"]
    return None


def is_secure(doc: dict[str, Any], param: str) -> bool:
    return any(d["type"] == "secure" for d in doc["parameters"][param]["decorators"])


def accessor(value: Any) -> tuple[str, str] | None:
    """`a.b` as ("a", "b") when value is a simple property access."""
    if isinstance(value, dict) and value.get("operator", {}).get("type") == "property_accessor":
        ops = value["operator"]["operands"]
        if isinstance(ops["operand_1"], str) and isinstance(ops["operand_2"], str):
            return ops["operand_1"], ops["operand_2"]
    return None


def role_assignments(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Each role assignment as {symbol, scope, role (GUID), principal, conditional}."""
    variables = {k: v["value"] for k, v in doc.get("variables", {}).items()}
    out = []
    for symbol, res in resources_of(doc, "Microsoft.Authorization/roleAssignments").items():
        cfg = body(res)
        fn = cfg["properties"]["roleDefinitionId"]["function"]
        assert fn["type"] == "subscription_resource_id", symbol
        role_ref = fn["parameters"]["resource_name_1"]
        out.append(
            {
                "symbol": symbol,
                "scope": cfg.get("scope"),
                "role": variables.get(role_ref, role_ref),
                "principal": cfg["properties"]["principalId"],
                "principalType": cfg["properties"].get("principalType"),
                "conditional": "condition" in res["config"],
            }
        )
    return out


def app_settings() -> dict[str, Any]:
    doc = module("function-app.bicep")
    configs = [
        body(r)
        for r in resources_of(doc, "Microsoft.Web/sites/config").values()
        if body(r)["name"] == "appsettings"
    ]
    assert len(configs) == 1
    return configs[0]["properties"]


# --- parsing and composition ---------------------------------------------------------------


@pytest.mark.parametrize("path", BICEP_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_every_bicep_file_parses(path: Path) -> None:
    doc = parse(path)
    assert doc.get("resources") or doc.get("modules"), f"{path} declares nothing"


def test_expected_files_exist() -> None:
    names = {p.name for p in MODULES.glob("*.bicep")}
    assert {
        "identity.bicep",
        "storage.bicep",
        "host-storage.bicep",
        "storage-roles.bicep",
        "monitoring.bicep",
        "function-app.bicep",
        "eventgrid.bicep",
        "alerts.bicep",
        "network.bicep",
        "private-endpoints.bicep",
        "activity-log.bicep",
        "workbook.bicep",
    } <= names
    assert MAIN.exists() and POST_DEPLOY.exists()


def test_resources_are_declared_natively_not_from_registries() -> None:
    for path in BICEP_FILES:
        text = path.read_text()
        assert "br/public:" not in text and "br:" not in text, f"registry module in {path}"
    for name, mod in parse(MAIN)["modules"].items():
        assert mod["type"] == "local", name
        assert (INFRA / mod["detail"]["path"]).exists(), mod["detail"]["path"]


def test_module_calls_match_module_parameters() -> None:
    for name, mod in parse(MAIN)["modules"].items():
        target = parse(INFRA / mod["detail"]["path"])
        declared = target["parameters"]
        passed = set(module_call(name)["params"])
        assert passed <= set(declared), f"{name}: unknown params {passed - set(declared)}"
        required = {p for p, spec in declared.items() if spec.get("default") is None}
        assert required <= passed, f"{name}: required params not passed {required - passed}"


def resolved_parameters(environ: dict[str, str]) -> dict[str, Any]:
    """infra/main.parameters.json as the workflow resolves it (scripts/resolve_parameters.py)."""
    from scripts.resolve_parameters import bicep_param_types, resolve

    doc = json.loads((INFRA / "main.parameters.json").read_text())
    return resolve(doc, bicep_param_types(MAIN), environ)["parameters"]


def test_parameters_file_matches_main() -> None:
    main = parse(MAIN)
    for environ in ({}, {"PTD_STAGE": "prod", "ZONE_REDUNDANT": "true", "VNET_ENABLED": "true"}):
        values = resolved_parameters(environ)
        for name, spec in values.items():
            assert name in main["parameters"], f"main.parameters.json sets unknown {name}"
            kind = main["parameters"][name]["type"]
            python_type = {"int": int, "bool": bool, "string": str}[kind]
            assert type(spec["value"]) is python_type, (name, spec["value"])
            allowed = decorator(main, name, "allowed")
            if allowed is not None:
                assert spec["value"] in allowed, f"{name}={spec['value']!r} not in {allowed}"
    # The deployer is left to main.bicep's default (deployer().objectId), not overridden by "".
    assert "deployerPrincipalId" not in resolved_parameters({})


# --- Function App on Flex Consumption -------------------------------------------------------


def test_plan_is_flex_consumption_fc1() -> None:
    plan = one(module("function-app.bicep"), "Microsoft.Web/serverfarms")
    assert plan["sku"] == {"name": "FC1", "tier": "FlexConsumption"}
    assert plan["properties"]["reserved"] is True  # Linux


def test_function_app_runtime_identity_and_deployment_storage() -> None:
    app = one(module("function-app.bicep"), "Microsoft.Web/sites")
    assert app["kind"] == "functionapp,linux"
    assert app["identity"]["type"] == "UserAssigned"
    props = app["properties"]
    assert props["httpsOnly"] is True
    assert props["siteConfig"]["minTlsVersion"] == "1.2"
    config = props["functionAppConfig"]
    assert config["runtime"] == {"name": "python", "version": "3.11"}
    storage = config["deployment"]["storage"]
    assert storage["type"] == "blobContainer"
    assert storage["authentication"]["type"] == "UserAssignedIdentity"
    assert storage["authentication"]["userAssignedIdentityResourceId"] == "identityId"
    assert "deploymentContainerName" in storage["value"]


def test_scale_settings_are_parameters() -> None:
    doc = module("function-app.bicep")
    scale = one(doc, "Microsoft.Web/sites")["properties"]["functionAppConfig"][
        "scaleAndConcurrency"
    ]
    assert scale["maximumInstanceCount"] == "maximumInstanceCount"
    assert scale["instanceMemoryMB"] == "instanceMemoryMB"
    assert scale["triggers"]["http"]["perInstanceConcurrency"] == "httpPerInstanceConcurrency"
    assert "alwaysReadyInstances" in json.dumps(scale["alwaysReady"])
    assert "alwaysReadyHttp" in json.dumps(scale["alwaysReady"])
    always_ready = doc["variables"]["alwaysReadyHttp"]["value"]
    assert always_ready == [{"name": "http", "instanceCount": "alwaysReadyInstances"}]
    # Microsoft.Web/sites@2024-04-01 was reported to refuse 512 (azure-rest-api-specs issue 40898).
    app = resources_of(doc, "Microsoft.Web/sites")["app"]
    assert app["api_version"] == "2024-04-01"
    assert set(decorator(doc, "instanceMemoryMB", "allowed")) == {2048, 4096}

    main = parse(MAIN)
    assert set(decorator(main, "instanceMemoryMB", "allowed")) == {2048, 4096}
    assert param_default(main, "alwaysReadyInstances") == 0
    for name in (
        "maximumInstanceCount",
        "instanceMemoryMB",
        "httpPerInstanceConcurrency",
        "alwaysReadyInstances",
        "zoneRedundant",
    ):
        assert module_call("functionApp")["params"][name] == name


def test_basic_publishing_credentials_are_off() -> None:
    doc = module("function-app.bicep")
    policies = [
        body(r)
        for r in resources_of(
            doc, "Microsoft.Web/sites/basicPublishingCredentialsPolicies"
        ).values()
    ]
    assert {p["name"] for p in policies} == {"ftp", "scm"}
    assert all(p["properties"]["allow"] is False for p in policies)


# --- app settings: identity connections and the code's settings -----------------------------


def test_host_storage_connection_is_identity_based() -> None:
    settings = app_settings()
    for service in ("blob", "queue", "table"):
        assert settings[f"AzureWebJobsStorage__{service}ServiceUri"].startswith("host")
    assert settings["AzureWebJobsStorage__credential"] == "managedidentity"
    assert settings["AzureWebJobsStorage__clientId"] == "identityClientId"


def test_app_storage_connection_is_identity_based() -> None:
    settings = app_settings()
    assert settings[f"{STORAGE_CONNECTION}__blobServiceUri"] == "dataBlobEndpoint"
    assert settings[f"{STORAGE_CONNECTION}__credential"] == "managedidentity"
    assert settings[f"{STORAGE_CONNECTION}__clientId"] == "identityClientId"


def test_telemetry_settings() -> None:
    settings = app_settings()
    assert settings["APPLICATIONINSIGHTS_CONNECTION_STRING"] == "appInsightsConnectionString"
    assert settings["APPLICATIONINSIGHTS_AUTHENTICATION_STRING"] == (
        "ClientId=${identityClientId};Authorization=AAD"
    )
    assert settings["PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY"] == "true"


def test_no_forbidden_or_secret_settings() -> None:
    settings = app_settings()
    assert not FORBIDDEN_SETTINGS & set(settings)
    assert not LOCAL_ONLY_SETTINGS & set(settings)
    for name, value in settings.items():
        text = json.dumps(value)
        assert "AccountKey=" not in text and "listKeys" not in text, name
        assert "SharedAccessSignature" not in text, name
    for path in BICEP_FILES:
        assert "listKeys(" not in path.read_text(), f"{path} reads account keys"
    assert settings["PTD_MODEL_SOURCE"] == "blob"


def code_string_constants() -> set[str]:
    sources = list((ROOT / "detector").rglob("*.py"))
    if (ROOT / "function_app.py").exists():
        sources.append(ROOT / "function_app.py")
    constants: set[str] = set()
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                constants.add(node.value)
    return constants


def code_settings() -> set[str]:
    """PTD_* names the code reads: string literals in detector/ and function_app.py."""
    if not (ROOT / "detector" / "config.py").exists():
        return set(FALLBACK_CODE_SETTINGS)
    return {c for c in code_string_constants() if re.fullmatch(r"PTD_[A-Z0-9_]+", c)}


def test_every_setting_the_code_reads_is_set_in_azure() -> None:
    read = code_settings()
    assert read, "found no PTD_* setting in the code"
    assert LOCAL_ONLY_SETTINGS <= FALLBACK_CODE_SETTINGS
    settings = set(app_settings())
    missing = read - LOCAL_ONLY_SETTINGS - CLI_ONLY_SETTINGS - settings
    assert not missing, f"read by the code but not set by infra: {sorted(missing)}"
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in settings


def test_every_ptd_setting_in_azure_is_read_by_the_code() -> None:
    read = code_settings()
    set_in_azure = {s for s in app_settings() if s.startswith("PTD_")}
    unread = set_in_azure - read
    assert not unread, f"set by infra but read by no code: {sorted(unread)}"


def test_request_body_limits_fit_the_instance_memory() -> None:
    """Issue 13, class 5: the host refuses bodies over the app's limit before they reach the
    worker, the Bicep's defaults are the code's, and the budget of bodies in work holds the
    largest body; at about 23 bytes of memory per body byte (docs/OPERATIONS.md, Memory) the
    budget stays under half of the smallest allowed instance."""
    from detector.config import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_INFLIGHT_BODY_BYTES

    settings = app_settings()

    def string_of(param: str) -> dict[str, Any]:
        return {"function": {"type": "string", "parameters": {"value_to_convert": param}}}

    assert settings["FUNCTIONS_REQUEST_BODY_SIZE_LIMIT"] == string_of("maxBodyBytes")
    assert settings["PTD_MAX_BODY_BYTES"] == string_of("maxBodyBytes")
    assert settings["PTD_MAX_INFLIGHT_BODY_BYTES"] == string_of("maxInflightBodyBytes")
    main, app = parse(MAIN), module("function-app.bicep")
    for doc in (main, app):
        assert param_default(doc, "maxBodyBytes") == DEFAULT_MAX_BODY_BYTES
        assert param_default(doc, "maxInflightBodyBytes") == DEFAULT_MAX_INFLIGHT_BODY_BYTES
    for name in ("maxBodyBytes", "maxInflightBodyBytes"):
        assert module_call("functionApp")["params"][name] == name
    assert DEFAULT_MAX_INFLIGHT_BODY_BYTES >= DEFAULT_MAX_BODY_BYTES
    smallest_instance_mb = min(decorator(main, "instanceMemoryMB", "allowed"))
    worst_mb = 23 * DEFAULT_MAX_INFLIGHT_BODY_BYTES / 2**20
    assert worst_mb < smallest_instance_mb / 2, (worst_mb, smallest_instance_mb)


def test_storage_connection_settings_match_the_code() -> None:
    constants = code_string_constants()
    storage_settings = {
        s.split("__", 1)[1] for s in app_settings() if s.startswith(f"{STORAGE_CONNECTION}__")
    }
    # Infra -> code: the identity triple the code's connection needs is set, and nothing else
    # but the queue URI the Functions host reads for the blob trigger's poison queue.
    assert storage_settings >= STORAGE_IDENTITY_SUFFIXES
    assert storage_settings <= STORAGE_IDENTITY_SUFFIXES | STORAGE_HOST_READ_SUFFIXES
    # Code -> infra: the code names the connection STORAGE, and every STORAGE__x it reads is set.
    names_connection = STORAGE_CONNECTION in constants or any(
        c.startswith(f"{STORAGE_CONNECTION}__") for c in constants
    )
    assert names_connection, "the code never names the STORAGE connection"
    read_suffixes = {
        c.split("__", 1)[1]
        for c in constants
        if re.fullmatch(rf"{STORAGE_CONNECTION}__[A-Za-z]+", c)
    }
    assert read_suffixes <= storage_settings, (
        f"read but not set: {read_suffixes - storage_settings}"
    )


def test_container_settings_match_the_containers() -> None:
    main = parse(MAIN)
    variables = {k: v["value"] for k, v in main["variables"].items()}
    assert variables["modelsContainerName"] == "models"
    assert variables["batchInContainerName"] == "batch-in"
    assert variables["batchOutContainerName"] == "batch-out"
    settings = app_settings()
    assert settings["PTD_MODEL_CONTAINER"] == "modelsContainerName"
    assert settings["PTD_BATCH_IN_CONTAINER"] == "batchInContainerName"
    assert settings["PTD_BATCH_OUT_CONTAINER"] == "batchOutContainerName"


# --- storage --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["storage.bicep", "host-storage.bicep"])
def test_storage_accounts_are_hardened(name: str) -> None:
    account = one(module(name), "Microsoft.Storage/storageAccounts")
    props = account["properties"]
    assert props["allowSharedKeyAccess"] is False
    assert props["allowBlobPublicAccess"] is False
    assert props["minimumTlsVersion"] == "TLS1_2"
    assert props["supportsHttpsTrafficOnly"] is True


def test_no_storage_account_anywhere_allows_shared_keys() -> None:
    for path in BICEP_FILES:
        for res in resources_of(parse(path), "Microsoft.Storage/storageAccounts").values():
            assert body(res)["properties"]["allowSharedKeyAccess"] is False, path


def test_storage_sku_parameter() -> None:
    main = parse(MAIN)
    assert param_default(main, "storageSku") == "Standard_LRS"
    assert set(decorator(main, "storageSku", "allowed")) == {
        "Standard_LRS",
        "Standard_GRS",
        "Standard_ZRS",
        "Standard_GZRS",
    }
    assert module_call("storage")["params"]["sku"] == "dataStorageSku"
    assert module_call("hostStorage")["params"]["sku"] == "hostStorageSku"


def test_data_containers_versioning_and_soft_delete() -> None:
    doc = module("storage.bicep")
    containers = resources_of(doc, "Microsoft.Storage/storageAccounts/blobServices/containers")
    names = {body(c)["name"] for c in containers.values()}
    assert names == {
        "modelsContainerName",
        "trainingContainerName",
        "batchInContainerName",
        "batchOutContainerName",
        "deadLetterContainerName",
    }
    assert all(body(c)["properties"]["publicAccess"] == "None" for c in containers.values())
    assert param_default(doc, "modelsContainerName") == "models"
    assert param_default(doc, "batchInContainerName") == "batch-in"
    assert param_default(doc, "batchOutContainerName") == "batch-out"
    blob = one(doc, "Microsoft.Storage/storageAccounts/blobServices")["properties"]
    assert blob["isVersioningEnabled"] is True
    assert blob["deleteRetentionPolicy"]["enabled"] is True
    assert blob["containerDeleteRetentionPolicy"]["enabled"] is True


def test_models_are_immutable_versions() -> None:
    """Version-level WORM on `models` (with versioning on): published versions cannot be
    changed or deleted for modelsImmutabilityDays, and 0 turns it off."""
    doc = module("storage.bicep")
    containers = resources_of(doc, "Microsoft.Storage/storageAccounts/blobServices/containers")
    (models,) = [c for c in containers.values() if body(c)["name"] == "modelsContainerName"]
    worm = body(models)["properties"]["immutableStorageWithVersioning"]["enabled"]
    assert evaluate(worm, scope_of(doc)) is True
    assert evaluate(worm, scope_of(doc, modelsImmutabilityDays=0)) is False
    policies = resources_of(
        doc, "Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies"
    )
    (policy,) = policies.values()
    condition = policy["config"]["condition"]
    assert evaluate(condition, scope_of(doc)) is True
    assert evaluate(condition, scope_of(doc, modelsImmutabilityDays=0)) is False
    assert body(policy)["name"] == "default"
    properties = body(policy)["properties"]
    assert properties["allowProtectedAppendWrites"] is False
    assert evaluate(properties["immutabilityPeriodSinceCreationInDays"], scope_of(doc)) == 30
    blob = one(doc, "Microsoft.Storage/storageAccounts/blobServices")["properties"]
    assert blob["isVersioningEnabled"] is True  # a prerequisite of version-level WORM
    assert param_default(module("../main.bicep"), "modelsImmutabilityDays") == 30
    assert module_call("storage")["params"]["modelsImmutabilityDays"]


def test_deployment_package_container() -> None:
    doc = module("host-storage.bicep")
    containers = resources_of(doc, "Microsoft.Storage/storageAccounts/blobServices/containers")
    assert [body(c)["name"] for c in containers.values()] == ["deploymentContainerName"]


def test_lifecycle_policy_deletes_batch_files_after_retention() -> None:
    doc = module("storage.bicep")
    policy = one(doc, "Microsoft.Storage/storageAccounts/managementPolicies")
    assert policy["name"] == "default"
    rules = policy["properties"]["policy"]["rules"]
    assert len(rules) == 1
    definition = rules[0]["definition"]
    assert set(definition["filters"]["prefixMatch"]) == {
        "${batchInContainerName}/",
        "${batchOutContainerName}/",
        "${deadLetterContainerName}/",
    }
    actions = definition["actions"]
    assert actions["baseBlob"]["delete"]["daysAfterModificationGreaterThan"] == "batchRetentionDays"
    assert actions["version"]["delete"]["daysAfterCreationGreaterThan"] == "batchRetentionDays"
    main = parse(MAIN)
    assert "batchRetentionDays" in main["parameters"]
    assert module_call("storage")["params"]["batchRetentionDays"] == "batchRetentionDays"


# --- role assignments -----------------------------------------------------------------------


def test_app_roles_on_data_account_are_container_scoped_least_privilege() -> None:
    doc = module("storage-roles.bicep")
    by_scope: dict[tuple[str, str], set[str]] = {}
    for ra in role_assignments(doc):
        by_scope.setdefault((ra["scope"], ra["principal"]), set()).add(ra["role"])
    assert by_scope == {
        ("models", "appPrincipalId"): {BLOB_DATA_READER},
        ("batchIn", "appPrincipalId"): {BLOB_DATA_READER},
        ("batchOut", "appPrincipalId"): {BLOB_DATA_CONTRIBUTOR},
        ("poisonQueue", "appPrincipalId"): {QUEUE_DATA_CONTRIBUTOR},
        ("models", "deployerPrincipalId"): {BLOB_DATA_CONTRIBUTOR},
        # The scheduled retraining reads the training data (ptd snapshot).
        ("training", "deployerPrincipalId"): {BLOB_DATA_CONTRIBUTOR},
        # The smoke test uploads a golden file to batch-in and reads (and deletes) its results.
        ("batchIn", "deployerPrincipalId"): {BLOB_DATA_CONTRIBUTOR},
        ("batchOut", "deployerPrincipalId"): {BLOB_DATA_CONTRIBUTOR},
    }
    # The scopes are the container (and queue) resources, not the account.
    containers = resources_of(
        doc, "Microsoft.Storage/storageAccounts/blobServices/containers", existing=True
    )
    assert {body(c)["name"] for c in containers.values()} == {
        "modelsContainerName",
        "trainingContainerName",
        "batchInContainerName",
        "batchOutContainerName",
    }
    assert {"models", "training", "batchIn", "batchOut"} <= set(containers)
    queues = resources_of(
        doc, "Microsoft.Storage/storageAccounts/queueServices/queues", existing=True
    )
    assert set(queues) == {"poisonQueue"}


def test_deployer_defaults_to_whoever_deploys() -> None:
    """Without a role on `models` every `ptd publish` of a first deploy fails: main.bicep gives it
    to the deploying principal (deployer().objectId) unless told otherwise, as Azure's sample."""
    main = parse(MAIN)
    default = param_default(main, "deployerPrincipalId")
    assert default == {
        "operator": {
            "type": "property_accessor",
            "operands": {
                "operand_1": {"function": {"type": "deployer", "parameters": {}}},
                "operand_2": "objectId",
            },
        }
    }
    assert module_call("storageRoles")["params"]["deployerPrincipalId"] == "deployerPrincipalId"
    doc = module("storage-roles.bicep")
    deployer = [ra for ra in role_assignments(doc) if ra["principal"] == "deployerPrincipalId"]
    assert len(deployer) == 4 and all(ra["conditional"] for ra in deployer)
    assert param_default(doc, "deployerPrincipalId") == ""  # the module still allows none
    # principalType: unset (null) by default so one template serves a GitHub service principal
    # and an azd user; a wrong principalType would fail the assignment.
    assert param_default(main, "deployerPrincipalType") == ""
    for ra in deployer:
        for kind, expected in (
            ("", None),
            ("User", "User"),
            ("ServicePrincipal", "ServicePrincipal"),
        ):
            assert evaluate(ra["principalType"], {"deployerPrincipalType": kind}) == expected


def test_host_roles_on_its_own_account() -> None:
    doc = module("host-storage.bicep")
    roles = role_assignments(doc)
    assert {ra["role"] for ra in roles} == {
        BLOB_DATA_OWNER,
        QUEUE_DATA_CONTRIBUTOR,
        TABLE_DATA_CONTRIBUTOR,
    }
    assert all(ra["scope"] == "account" and ra["principal"] == "principalId" for ra in roles)


def test_no_owner_or_broad_role_on_the_data_account() -> None:
    for path in BICEP_FILES:
        if path.name == "host-storage.bicep":
            continue
        for ra in role_assignments(parse(path)):
            assert ra["role"] != BLOB_DATA_OWNER, f"{path}: {ra['symbol']}"
            assert ra["scope"] not in (None, "account", "storageAccount"), f"{path}: {ra['symbol']}"


def test_all_role_assignments_have_principal_types_and_stable_names() -> None:
    for path in BICEP_FILES:
        doc = parse(path)
        for symbol, res in resources_of(doc, "Microsoft.Authorization/roleAssignments").items():
            cfg = body(res)
            assert cfg["name"]["function"]["type"] == "guid", f"{path}: {symbol}"
            principal_type = cfg["properties"]["principalType"]
            if isinstance(principal_type, dict):  # the deployer's: null only when unknown
                principal_type = evaluate(principal_type, {"deployerPrincipalType": "User"})
            assert principal_type, f"{path}: {symbol}"


def test_app_and_roles_use_the_same_identity() -> None:
    main = parse(MAIN)
    params = {name: module_call(name)["params"] for name in main["modules"]}
    for mod, key in (
        ("hostStorage", "principalId"),
        ("storageRoles", "appPrincipalId"),
        ("monitoring", "publisherPrincipalId"),
    ):
        value = params[mod][key]
        text = json.dumps(value)
        assert '"identity"' in text and "principalId" in text, f"{mod}.{key}: {text}"
    assert "identity" in json.dumps(params["functionApp"]["identityId"])
    assert "clientId" in json.dumps(params["functionApp"]["identityClientId"])


# --- monitoring and alerts ------------------------------------------------------------------


def test_application_insights_local_auth_off() -> None:
    doc = module("monitoring.bicep")
    ai = one(doc, "Microsoft.Insights/components")["properties"]
    assert ai["DisableLocalAuth"] is True
    assert accessor(ai["WorkspaceResourceId"]) == ("workspace", "id")
    one(doc, "Microsoft.OperationalInsights/workspaces")
    roles = role_assignments(doc)
    assert [(r["scope"], r["role"], r["principal"]) for r in roles] == [
        ("appInsights", MONITORING_METRICS_PUBLISHER, "publisherPrincipalId")
    ]


def alert_rules() -> dict[str, dict[str, Any]]:
    doc = module("alerts.bicep")
    return {
        symbol: body(res)
        for symbol, res in resources_of(doc, "Microsoft.Insights/scheduledQueryRules").items()
    }


def rendered_query(rule: dict[str, Any], **params: Any) -> str:
    """The KQL of a log alert rule as ARM would send it (format() applied)."""
    scope = scope_of(module("alerts.bicep"), receivers=["email"], **params)
    (criterion,) = rule["properties"]["criteria"]["allOf"]
    query = criterion["query"]
    if isinstance(query, dict) and query.get("function", {}).get("type") == "format":
        args = [evaluate(v, scope) for v in query["function"]["parameters"].values()]
        return str(args[0]).format(*args[1:])
    return str(evaluate(query, scope))


def test_alerts_cover_the_four_conditions_and_notify() -> None:
    doc = module("alerts.bicep")
    rules = alert_rules()
    assert len(rules) >= 4
    queries = {}
    for symbol, rule in rules.items():
        props = rule["properties"]
        assert props["enabled"] is True, symbol
        assert props["scopes"] == ["appInsightsId"], symbol
        assert accessor(props["actions"]["actionGroups"][0]) == ("actionGroup", "id"), symbol
        queries[symbol] = rendered_query(rule)
    assert "countif(toint(resultCode) >= 500)" in queries["http5xx"], "5xx alert"
    assert "percentile(duration, 95)" in queries["p95Latency"], "p95 alert"
    variables = {k: v["value"] for k, v in doc["variables"].items()}
    events = {
        variables["batchFailedEvent"],
        variables["modelLoadFailedEvent"],
        variables["batchDriftEvent"],
    }
    assert events == set(ALERT_EVENTS)
    assert '"batch_failed"' in queries["batchFailed"]
    assert '"batch_drift"' in queries["batchDrift"]
    assert '"model_load_failed"' in queries["modelLoadFailed"]
    assert module_call("alerts")["params"]["alertEmail"] == "alertEmail"


def test_rate_alerts_need_a_minimum_request_count() -> None:
    """One failed request in a quiet 5-minute bin is not "100 % errors"."""
    rules = alert_rules()
    for symbol in ("http5xx", "p95Latency"):
        query = rendered_query(rules[symbol], minRequests=37)
        stages = [stage.strip() for stage in query.split("|")]
        summarize = next(i for i, st in enumerate(stages) if st.startswith("summarize"))
        minimum = next(i for i, st in enumerate(stages) if st.endswith(">= 37"))
        assert summarize < minimum, f"{symbol}: the minimum must filter the summarized bins"
        if symbol == "http5xx":
            percent = next(i for i, st in enumerate(stages) if "failedPercent" in st)
            assert minimum < percent
    doc = module("alerts.bicep")
    assert param_default(doc, "minRequests") == 20
    assert decorator(doc, "minRequests", "min_value") == 1
    assert module_call("alerts")["params"]["minRequests"] == "alertMinRequests"
    assert param_default(parse(MAIN), "alertMinRequests") == 20


def action_group_receivers(**main_params: Any) -> dict[str, list[Any]]:
    """The action group's receivers for main.bicep parameters, through the module call."""
    main_scope = scope_of(parse(MAIN), **main_params)
    call = module_call("alerts")["params"]
    module_params = {
        name: evaluate(call[name], main_scope)
        for name in ("receivers", "alertEmail", "alertWebhookUrl")
    }
    doc = module("alerts.bicep")
    scope = scope_of(doc, **module_params)
    group = one(doc, "Microsoft.Insights/actionGroups")["properties"]
    return {
        "receivers": module_params["receivers"],
        "email": evaluate(group["emailReceivers"], scope),
        "webhook": evaluate(group["webhookReceivers"], scope),
    }


def test_no_action_group_without_a_receiver() -> None:
    main = parse(MAIN)
    assert param_default(main, "alertsEnabled") is True
    assert module_condition("alerts") == "alertsEnabled"  # false: no alerts, explicitly
    assert decorator(module("alerts.bicep"), "receivers", "min_length") == 1
    assert is_secure(main, "alertWebhookUrl")  # a webhook URL carries its own token
    # Neither receiver: the list ARM checks against minLength 1 is empty, so ARM refuses.
    assert action_group_receivers()["receivers"] == []
    email = action_group_receivers(alertEmail="oncall@example.org")
    assert email["receivers"] == ["email"]
    assert [r["emailAddress"] for r in email["email"]] == ["oncall@example.org"]
    assert email["webhook"] == []
    hook = action_group_receivers(alertWebhookUrl="https://hooks.example.org/x")
    assert hook["email"] == [] and [r["serviceUri"] for r in hook["webhook"]] == [
        "https://hooks.example.org/x"
    ]
    both = action_group_receivers(alertEmail="a@example.org", alertWebhookUrl="https://h/x")
    assert both["receivers"] == ["email", "webhook"]
    assert all(r["useCommonAlertSchema"] is True for r in both["email"] + both["webhook"])


def test_event_grid_delivery_alerts() -> None:
    """Dead-lettered, dropped and failed deliveries of BlobCreated events page someone."""
    doc = module("alerts.bicep")
    (symbol,) = resources_of(doc, "Microsoft.Insights/metricAlerts")
    res = resources_of(doc, "Microsoft.Insights/metricAlerts")[symbol]
    assert res["config"]["loop_type"]["detail"]["array_name"] == "eventGridRules"
    cfg = body(res)["properties"]
    assert cfg["scopes"] == ["systemTopicId"]
    (criterion,) = cfg["criteria"]["allOf"]
    assert criterion["metricNamespace"] == "Microsoft.EventGrid/systemTopics"
    assert criterion["operator"] == "GreaterThan" and criterion["threshold"] == 0
    assert criterion["timeAggregation"] == "Total"
    assert cfg["actions"][0]["actionGroupId"] == {
        "operator": {
            "type": "property_accessor",
            "operands": {"operand_1": "actionGroup", "operand_2": "id"},
        }
    }
    metrics = {rule["metric"] for rule in doc["variables"]["eventGridRules"]["value"]}
    assert metrics == {"DeadLetteredCount", "DroppedEventCount", "DeliveryAttemptFailCount"}
    topic = json.dumps(module_call("alerts")["params"]["systemTopicId"])
    assert '"eventGrid"' in topic and '"id"' in topic


def test_alert_event_names_match_the_app_telemetry() -> None:
    telemetry = ROOT / "detector" / "telemetry.py"
    if not telemetry.exists():
        pytest.skip("detector/telemetry.py not written yet")
    constants = {
        node.value
        for node in ast.walk(ast.parse(telemetry.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    for event in ALERT_EVENTS:
        assert event in constants, f"detector/telemetry.py never logs {event!r}"


# --- Event Grid -----------------------------------------------------------------------------


def test_event_grid_system_topic_on_the_data_account() -> None:
    topic = one(module("eventgrid.bicep"), "Microsoft.EventGrid/systemTopics")
    assert topic["properties"]["topicType"] == "Microsoft.Storage.StorageAccounts"
    assert topic["properties"]["source"] == "storageAccountId"
    params = parse(MAIN)["modules"]["eventGrid"]["config"]["params"]
    source = json.dumps(params["storageAccountId"])
    assert '"storage"' in source and '"outputs"' in source and '"id"' in source, source


# --- outputs --------------------------------------------------------------------------------


def test_outputs_used_by_the_deploy_workflow_exist() -> None:
    outputs = set(parse(MAIN)["outputs"])
    assert outputs >= REQUIRED_OUTPUTS
    workflow = DEPLOY_WORKFLOW.read_text()
    yaml.safe_load(workflow)  # valid YAML
    infra_step_ids = {
        step["id"]
        for job in yaml.safe_load(workflow)["jobs"].values()
        for step in job["steps"]
        if "bicep-deploy" in step.get("uses", "") and step.get("id")
    }
    assert infra_step_ids, "no azure/bicep-deploy step with an id"
    used = set()
    for step_id in infra_step_ids:
        used |= set(re.findall(rf"steps\.{step_id}\.outputs\.([A-Za-z0-9_]+)", workflow))
    assert used, "the workflow reads no deployment output"
    assert used <= outputs, f"deploy.yml reads outputs main.bicep lacks: {sorted(used - outputs)}"


# --- Event Grid: dead-lettering, the post-deploy subscription, the availability test -------------


def test_system_topic_identity_writes_dead_letters_only() -> None:
    doc = module("eventgrid.bicep")
    topic = one(doc, "Microsoft.EventGrid/systemTopics")
    assert topic["identity"] == {"type": "SystemAssigned"}
    (ra,) = role_assignments(doc)
    assert ra["scope"] == "deadLetter" and ra["role"] == BLOB_DATA_CONTRIBUTOR
    assert "systemTopic" in json.dumps(ra["principal"]) and "principalId" in json.dumps(
        ra["principal"]
    )
    (container,) = resources_of(
        doc, "Microsoft.Storage/storageAccounts/blobServices/containers", existing=True
    ).values()
    assert body(container)["name"] == "deadLetterContainerName"
    params = module_call("eventGrid")["params"]
    assert "deadLetterContainerName" in json.dumps(params["deadLetterContainerName"])
    assert parse(MAIN)["variables"]["deadLetterContainerName"]["value"] == "eventgrid-deadletter"


def post_deploy_subscription() -> dict[str, Any]:
    return one(parse(POST_DEPLOY), "Microsoft.EventGrid/systemTopics/eventSubscriptions")


def test_blob_trigger_subscription_targets_the_webhook_with_the_secure_key() -> None:
    doc = parse(POST_DEPLOY)
    sub = post_deploy_subscription()["properties"]
    destination = sub["destination"]
    assert destination["endpointType"] == "WebHook"
    url = destination["properties"]["endpointUrl"]
    function = doc["variables"]["blobFunctionName"]["value"]
    assert url == (
        "https://${app.properties.defaultHostName}/runtime/webhooks/blobs"
        "?functionName=Host.Functions.${blobFunctionName}&code=${blobsExtensionKey}"
    )
    assert is_secure(doc, "blobsExtensionKey") and is_secure(doc, "healthCheckKey")
    assert sub["filter"]["includedEventTypes"] == ["Microsoft.Storage.BlobCreated"]
    assert sub["filter"]["subjectBeginsWith"] == (
        "/blobServices/default/containers/${batchInContainerName}/"
    )
    # The function the webhook names is the blob function of function_app.py.
    source = (ROOT / "function_app.py").read_text()
    assert re.search(rf"function_name\(\s*[\"']{function}[\"']\s*\)", source)
    assert param_default(doc, "batchInContainerName") == "batch-in"


def test_blob_trigger_subscription_retries_then_dead_letters() -> None:
    doc = parse(POST_DEPLOY)
    sub = post_deploy_subscription()["properties"]
    assert "deadLetterDestination" not in sub  # only the identity-based form
    assert sub["retryPolicy"] == {
        "maxDeliveryAttempts": "maxDeliveryAttempts",
        "eventTimeToLiveInMinutes": "eventTimeToLiveInMinutes",
    }
    assert param_default(doc, "maxDeliveryAttempts") == 30
    assert decorator(doc, "maxDeliveryAttempts", "max_value") == 30
    assert param_default(doc, "eventTimeToLiveInMinutes") == 1440
    assert decorator(doc, "eventTimeToLiveInMinutes", "max_value") == 1440
    dead = sub["deadLetterWithResourceIdentity"]
    assert dead["identity"] == {"type": "SystemAssigned"}  # the topic's, given the role above
    destination = dead["deadLetterDestination"]
    assert destination["endpointType"] == "StorageBlob"
    assert accessor(destination["properties"]["resourceId"]) == ("account", "id")
    assert destination["properties"]["blobContainerName"] == "deadLetterContainerName"
    assert (
        param_default(doc, "deadLetterContainerName")
        == (parse(MAIN)["variables"]["deadLetterContainerName"]["value"])
    )
    account = resources_of(doc, "Microsoft.Storage/storageAccounts", existing=True)["account"]
    assert body(account)["name"] == "storageAccountName"


def test_availability_test_of_health_and_its_alert() -> None:
    doc = parse(POST_DEPLOY)
    tests = resources_of(doc, "Microsoft.Insights/webtests")
    (res,) = tests.values()
    assert res["config"]["condition"] is not None  # only with a key to send
    webtest = body(res)
    assert webtest["kind"] == "standard" and webtest["properties"]["Kind"] == "standard"
    props = webtest["properties"]
    assert props["Request"]["RequestUrl"] == "https://${app.properties.defaultHostName}/api/health"
    assert props["Request"]["HttpVerb"] == "GET"
    assert props["Request"]["Headers"] == [{"key": "x-functions-key", "value": "healthCheckKey"}]
    assert props["ValidationRules"]["ExpectedHttpStatusCode"] == 200
    assert props["ValidationRules"]["ContentValidation"]["ContentMatch"] == '"status":"ok"'
    assert len(param_default(doc, "availabilityTestLocations")) >= 5
    assert "'hidden-link:${appInsights.id}'" in json.dumps(webtest["tags"])
    alert = one(doc, "Microsoft.Insights/metricAlerts")["properties"]
    criteria = alert["criteria"]
    assert criteria["'odata.type'"] == (
        "Microsoft.Azure.Monitor.WebtestLocationAvailabilityCriteria"
    )
    assert accessor(criteria["webTestId"]) == ("healthTest", "id")
    assert alert["actions"] == [{"actionGroupId": "actionGroupId"}]


# --- diagnostics, lock ------------------------------------------------------------------------


def diagnostic_categories(cfg: dict[str, Any]) -> set[str]:
    return {entry["category"] for entry in cfg["properties"]["logs"] if entry["enabled"] is True}


def test_blob_data_plane_logs_go_to_log_analytics() -> None:
    doc = module("storage.bicep")
    (res,) = resources_of(doc, "Microsoft.Insights/diagnosticSettings").values()
    cfg = body(res)
    assert cfg["scope"] == "blobService"  # every container: batch-in, batch-out, models, ...
    assert diagnostic_categories(cfg) == {"StorageRead", "StorageWrite", "StorageDelete"}
    assert cfg["properties"]["workspaceId"] == "workspaceId"
    workspace = json.dumps(module_call("storage")["params"]["workspaceId"])
    assert '"monitoring"' in workspace and "workspaceId" in workspace


def test_event_grid_delivery_failures_go_to_log_analytics() -> None:
    doc = module("eventgrid.bicep")
    (res,) = resources_of(doc, "Microsoft.Insights/diagnosticSettings").values()
    cfg = body(res)
    assert cfg["scope"] == "systemTopic"
    assert diagnostic_categories(cfg) == {"DeliveryFailures"}
    assert "workspaceId" in json.dumps(module_call("eventGrid")["params"]["workspaceId"])


def test_activity_log_goes_to_log_analytics() -> None:
    doc = module("activity-log.bicep")
    assert doc["globals"]["scope"]["value"] == "subscription"
    (res,) = resources_of(doc, "Microsoft.Insights/diagnosticSettings").values()
    logs = body(res)["properties"]["logs"]
    assert logs["loop_type"]["detail"]["array_name"] == "categories"
    categories = set(doc["variables"]["categories"]["value"])
    assert {"Administrative", "Security", "Policy", "Alert"} <= categories
    call = module_call("activityLog")
    assert call["scope"] == {
        "function": {"type": "subscription", "parameters": {"subscription_id": None}}
    }
    assert module_condition("activityLog") == "activityLogEnabled"
    assert param_default(parse(MAIN), "activityLogEnabled") is True


def test_data_account_has_a_can_not_delete_lock() -> None:
    doc = module("storage.bicep")
    (res,) = resources_of(doc, "Microsoft.Authorization/locks").values()
    assert res["config"]["condition"] == "lockAccount"
    lock = body(res)
    assert lock["scope"] == "account" and lock["properties"]["level"] == "CanNotDelete"
    assert param_default(doc, "lockAccount") is True
    assert module_call("storage")["params"]["lockAccount"] == "lockDataAccount"
    assert param_default(parse(MAIN), "lockDataAccount") is True
    # The host account is rebuilt by any deploy and carries no lock.
    assert not resources_of(module("host-storage.bicep"), "Microsoft.Authorization/locks")


# --- network isolation and zone redundancy ------------------------------------------------------


def test_network_isolation_is_off_by_default_and_complete_when_on() -> None:
    main = parse(MAIN)
    assert param_default(main, "vnetEnabled") is False
    for name in ("network", "dataPrivateEndpoints", "hostPrivateEndpoints"):
        assert module_condition(name) == "vnetEnabled", name
    services = {
        name: [e["service"] for e in module_call(name)["params"]["endpoints"]]
        for name in ("dataPrivateEndpoints", "hostPrivateEndpoints")
    }
    assert services == {
        "dataPrivateEndpoints": ["blob", "queue"],  # models/batch containers, poison queue
        "hostPrivateEndpoints": ["blob", "queue", "table"],  # AzureWebJobsStorage
    }
    subnet = module_call("functionApp")["params"]["virtualNetworkSubnetId"]
    assert evaluate(subnet, {"vnetEnabled": False}) == ""
    assert evaluate(subnet, {"vnetEnabled": True}) == "network.outputs.appSubnetId"
    app = one(module("function-app.bicep"), "Microsoft.Web/sites")["properties"]
    assert evaluate(app["virtualNetworkSubnetId"], {"virtualNetworkSubnetId": ""}) is None
    net = one(module("network.bicep"), "Microsoft.Network/virtualNetworks")["properties"]
    subnets = {s["name"]: s["properties"] for s in net["subnets"]}
    assert subnets["app"]["delegations"][0]["properties"]["serviceName"] == (
        "Microsoft.App/environments"
    )
    assert set(module("network.bicep")["variables"]["storageServices"]["value"]) == {
        "blob",
        "queue",
        "table",
    }


@pytest.mark.parametrize("name", ["storage.bicep", "host-storage.bicep"])
def test_storage_firewall_follows_vnet_enabled(name: str) -> None:
    doc = module(name)
    account = one(doc, "Microsoft.Storage/storageAccounts")["properties"]
    acls = account["networkAcls"]
    for enabled, action in ((False, "Allow"), (True, "Deny")):
        scope = scope_of(doc, vnetEnabled=enabled, allowedIpRanges=[])
        rules = evaluate(acls, scope)
        assert rules["defaultAction"] == action, (name, enabled)
        assert rules["bypass"] == "AzureServices"  # Event Grid dead-lettering with its identity
    assert (
        module_call("storage" if name == "storage.bicep" else "hostStorage")["params"][
            "vnetEnabled"
        ]
        == "vnetEnabled"
    )


@pytest.mark.parametrize(
    ("zone_redundant", "storage_sku", "data_sku", "host_sku"),
    [
        (False, "Standard_LRS", "Standard_LRS", "Standard_LRS"),
        (False, "Standard_GRS", "Standard_GRS", "Standard_LRS"),
        (True, "Standard_LRS", "Standard_ZRS", "Standard_ZRS"),
        (True, "Standard_GRS", "Standard_GZRS", "Standard_ZRS"),
        (True, "Standard_GZRS", "Standard_GZRS", "Standard_ZRS"),
    ],
)
def test_zone_redundancy_brings_zone_redundant_storage(
    zone_redundant: bool, storage_sku: str, data_sku: str, host_sku: str
) -> None:
    scope = scope_of(parse(MAIN), zoneRedundant=zone_redundant, storageSku=storage_sku)
    assert scope["dataStorageSku"] == data_sku
    assert scope["hostStorageSku"] == host_sku
    assert host_sku in decorator(module("host-storage.bicep"), "sku", "allowed")
    plan = one(module("function-app.bicep"), "Microsoft.Web/serverfarms")["properties"]
    assert plan["zoneRedundant"] == "zoneRedundant"
    assert param_default(parse(MAIN), "zoneRedundant") is False


# --- the operators' workbook --------------------------------------------------------------------


def workbook() -> dict[str, Any]:
    return json.loads((MODULES / "workbook.json").read_text())


def test_workbook_is_deployed_on_application_insights() -> None:
    wb = one(module("workbook.bicep"), "Microsoft.Insights/workbooks")
    assert wb["kind"] == "shared"
    assert wb["properties"]["sourceId"] == "appInsightsId"
    assert wb["properties"]["serializedData"] == {
        "function": {
            "type": "load_text_content",
            "parameters": {"file_path": "workbook.json", "encoding": None},
        }
    }
    assert "appInsightsId" in json.dumps(module_call("workbook")["params"]["appInsightsId"])
    assert workbook()["version"] == "Notebook/1.0"


def test_workbook_shows_the_operators_dashboard() -> None:
    panels = {
        item["name"]: item["content"]["query"] for item in workbook()["items"] if item["type"] == 3
    }
    assert set(panels) >= {
        "requests",
        "latency",
        "errors",
        "batch-files",
        "batch-rows",
        "flagged-share",
        "model-version",
        "cold-starts",
    }
    assert "percentile(duration, 95)" in panels["latency"]
    assert "resultCode" in panels["errors"]
    assert "model_version" in panels["model-version"]
    # Every metric a panel reads is one the app records (detector/telemetry.py).
    tree = ast.parse(TELEMETRY.read_text())
    help_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign | ast.Assign) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "_HELP" for t in targets):
                help_names = {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    assert help_names, "detector/telemetry.py has no _HELP table"
    used = set()
    for query in panels.values():
        used |= set(re.findall(r'"([a-z_]+_(?:total|seconds|ms))"', query))
    assert used and used <= help_names, used - help_names
    assert {"batch_files_total", "predictions_flagged_total", "model_load_seconds"} <= used


# --- azd ---------------------------------------------------------------------------------------


def test_azd_tags() -> None:
    azure_yaml = yaml.safe_load((ROOT / "azure.yaml").read_text())
    (service,) = azure_yaml["services"]
    app = one(module("function-app.bicep"), "Microsoft.Web/sites")
    assert evaluate(app["tags"], {"tags": {}, "azdServiceName": service})["azd-service-name"] == (
        service
    )
    assert param_default(module("function-app.bicep"), "azdServiceName") == service
    assert scope_of(parse(MAIN), azdEnvName="ptd-dev", tags={})["allTags"]["azd-env-name"] == (
        "ptd-dev"
    )
    assert "azd-env-name" not in scope_of(parse(MAIN), tags={})["allTags"]
    values = resolved_parameters({"AZURE_ENV_NAME": "ptd-dev"})
    assert values["azdEnvName"]["value"] == "ptd-dev"


# --- who calls: built-in authentication (issue 17) ---------------------------------------------


def auth_settings() -> dict[str, Any]:
    doc = module("function-app.bicep")
    configs = [
        body(r)
        for r in resources_of(doc, "Microsoft.Web/sites/config").values()
        if body(r)["name"] == "authsettingsV2"
    ]
    assert len(configs) == 1
    return configs[0]


def test_built_in_authentication_is_entra_id_with_tokens_required() -> None:
    doc = module("function-app.bicep")
    config = auth_settings()
    assert config["parent"] == "app"
    props = config["properties"]
    # On exactly when the API's app registration is named; deployed either way, so that emptying
    # the parameter turns it off again.
    assert not resources_of(doc, "Microsoft.Web/sites/config")["authSettings"]["config"].get(
        "condition"
    )
    for client_id, enabled in (("", False), ("5f0c0b5e-0000-4000-8000-000000000001", True)):
        scope = scope_of(doc, entraApiClientId=client_id)
        assert evaluate(props["platform"]["enabled"], scope) is enabled
        aad = props["identityProviders"]["azureActiveDirectory"]
        assert evaluate(aad["enabled"], scope) is enabled
    assert param_default(doc, "entraApiClientId") == ""
    assert param_default(parse(MAIN), "entraApiClientId") == ""
    validation = props["globalValidation"]
    assert validation["requireAuthentication"] is True
    assert validation["unauthenticatedClientAction"] == "Return401"  # an API: no login redirect
    aad = props["identityProviders"]["azureActiveDirectory"]
    assert aad["registration"]["clientId"] == "entraApiClientId"
    assert aad["registration"]["openIdIssuer"].endswith("${entraTenantId}/v2.0")
    assert "environment().authentication.loginEndpoint" in aad["registration"]["openIdIssuer"]
    assert aad["validation"]["allowedAudiences"] == "entraAudiences"
    # v1 tokens name the Application ID URI, v2 ones the client id; nothing while off.
    client_id = "5f0c0b5e-0000-4000-8000-000000000001"
    assert scope_of(doc, entraApiClientId=client_id)["entraAudiences"] == [
        "api://${entraApiClientId}",
        client_id,
    ]
    assert scope_of(doc, entraApiClientId="")["entraAudiences"] == []
    assert props["login"]["tokenStore"]["enabled"] is False
    assert props["httpSettings"]["requireHttps"] is True


def test_only_health_the_api_description_and_the_blob_webhook_are_open() -> None:
    from detector.api import OPEN_ROUTES, ROUTES

    excluded = set(auth_settings()["properties"]["globalValidation"]["excludedPaths"])
    # The availability test and the smoke test ask /api/health; Event Grid calls the blob
    # trigger's webhook with its system key and no token.
    assert excluded == OPEN_ROUTES | {"/runtime/webhooks/blobs"}
    assert "/api/health" in excluded
    protected = set(ROUTES) - OPEN_ROUTES
    assert protected == {
        "/api/model_info",
        "/api/features",
        "/api/predict",
        "/api/predict_batch",
        "/api/metrics",
    }
    assert not protected & excluded
    health = one(parse(POST_DEPLOY), "Microsoft.Insights/webtests")["properties"]["Request"]
    assert health["RequestUrl"].endswith("/api/health")


def test_allowed_client_applications_are_a_parameter() -> None:
    aad = auth_settings()["properties"]["identityProviders"]["azureActiveDirectory"]
    assert aad["validation"]["defaultAuthorizationPolicy"] == {
        "allowedApplications": "allowedClientApplications"
    }
    main = parse(MAIN)
    assert module_call("functionApp")["params"]["allowedClientApplications"] == "allowedClientIds"
    for text, ids in (
        ("", []),
        ("11111111-1111-1111-1111-111111111111", ["11111111-1111-1111-1111-111111111111"]),
        ("aaa, bbb,ccc", ["aaa", "bbb", "ccc"]),
    ):
        assert scope_of(main, allowedClientApplications=text)["allowedClientIds"] == ids
    for name in ("entraApiClientId", "requiredAppRoles", "requireFunctionKey"):
        assert module_call("functionApp")["params"][name] == name
    values = resolved_parameters(
        {"ENTRA_API_CLIENT_ID": "api-id", "ENTRA_ALLOWED_CLIENT_APPS": "a,b"}
    )
    assert values["entraApiClientId"]["value"] == "api-id"
    assert values["allowedClientApplications"]["value"] == "a,b"
    assert resolved_parameters({})["requireFunctionKey"]["value"] is True


def test_caller_settings_default_to_roles_checked_and_keys_required() -> None:
    from detector.config import Settings
    from detector.identity import KNOWN_ROLES

    settings = app_settings()
    assert settings["PTD_REQUIRED_ROLES"] == "requiredAppRoles"
    assert evaluate(settings["PTD_REQUIRE_FUNCTION_KEY"], {"requireFunctionKey": True}) == "true"
    assert evaluate(settings["PTD_REQUIRE_FUNCTION_KEY"], {"requireFunctionKey": False}) == (
        "false"
    )
    for doc in (parse(MAIN), module("function-app.bicep")):
        roles = param_default(doc, "requiredAppRoles")
        assert tuple(roles.split(",")) == KNOWN_ROLES
        assert param_default(doc, "requireFunctionKey") is True
    parsed = Settings.from_env(
        {"PTD_REQUIRED_ROLES": param_default(parse(MAIN), "requiredAppRoles")}
    )
    assert parsed.required_roles == KNOWN_ROLES
    # The platform's own variables are never app settings of ours.
    assert not {"WEBSITE_AUTH_ENABLED", "WEBSITE_SKU"} & set(settings)
