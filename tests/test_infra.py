"""Structure of the Bicep in infra/: parsed with pycep-parser (no Bicep compiler here).

What is checked is what a first deployment depends on: the Flex Consumption plan and its scale
settings, identity-only connections, container-scoped least-privilege roles, storage hardening,
Application Insights without local auth, the alerts, the Event Grid system topic, the outputs the
deploy workflow reads, and that the app settings match what the code reads (both directions).
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
DEPLOY_WORKFLOW = ROOT / ".github" / "workflows" / "deploy.yml"
BICEP_FILES = sorted(INFRA.rglob("*.bicep"))

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
ALERT_EVENTS = ("batch_failed", "model_load_failed")
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
    } <= names
    assert MAIN.exists()


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
        passed = set(mod["config"]["params"])
        assert passed <= set(declared), f"{name}: unknown params {passed - set(declared)}"
        required = {p for p, spec in declared.items() if spec.get("default") is None}
        assert required <= passed, f"{name}: required params not passed {required - passed}"


def test_parameters_file_matches_main() -> None:
    main = parse(MAIN)
    values = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    for name, spec in values.items():
        assert name in main["parameters"], f"main.parameters.json sets unknown {name}"
        allowed = decorator(main, name, "allowed")
        if allowed is not None:
            assert spec["value"] in allowed, f"{name}={spec['value']!r} not in {allowed}"


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
    assert set(decorator(doc, "instanceMemoryMB", "allowed")) <= {512, 2048, 4096}

    main = parse(MAIN)
    assert param_default(main, "alwaysReadyInstances") == 0
    for name in (
        "maximumInstanceCount",
        "instanceMemoryMB",
        "httpPerInstanceConcurrency",
        "alwaysReadyInstances",
    ):
        assert main["modules"]["functionApp"]["config"]["params"][name] == name


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
    missing = read - LOCAL_ONLY_SETTINGS - settings
    assert not missing, f"read by the code but not set by infra: {sorted(missing)}"
    assert "APPLICATIONINSIGHTS_CONNECTION_STRING" in settings


def test_every_ptd_setting_in_azure_is_read_by_the_code() -> None:
    read = code_settings()
    set_in_azure = {s for s in app_settings() if s.startswith("PTD_")}
    unread = set_in_azure - read
    assert not unread, f"set by infra but read by no code: {sorted(unread)}"


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
    assert main["modules"]["storage"]["config"]["params"]["sku"] == "storageSku"


def test_data_containers_versioning_and_soft_delete() -> None:
    doc = module("storage.bicep")
    containers = resources_of(doc, "Microsoft.Storage/storageAccounts/blobServices/containers")
    names = {body(c)["name"] for c in containers.values()}
    assert names == {"modelsContainerName", "batchInContainerName", "batchOutContainerName"}
    assert all(body(c)["properties"]["publicAccess"] == "None" for c in containers.values())
    assert param_default(doc, "modelsContainerName") == "models"
    assert param_default(doc, "batchInContainerName") == "batch-in"
    assert param_default(doc, "batchOutContainerName") == "batch-out"
    blob = one(doc, "Microsoft.Storage/storageAccounts/blobServices")["properties"]
    assert blob["isVersioningEnabled"] is True
    assert blob["deleteRetentionPolicy"]["enabled"] is True
    assert blob["containerDeleteRetentionPolicy"]["enabled"] is True


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
    }
    actions = definition["actions"]
    assert actions["baseBlob"]["delete"]["daysAfterModificationGreaterThan"] == "batchRetentionDays"
    assert actions["version"]["delete"]["daysAfterCreationGreaterThan"] == "batchRetentionDays"
    main = parse(MAIN)
    assert "batchRetentionDays" in main["parameters"]
    assert main["modules"]["storage"]["config"]["params"]["batchRetentionDays"] == (
        "batchRetentionDays"
    )


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
    }
    # The scopes are the container (and queue) resources, not the account.
    containers = resources_of(
        doc, "Microsoft.Storage/storageAccounts/blobServices/containers", existing=True
    )
    assert {body(c)["name"] for c in containers.values()} == {
        "modelsContainerName",
        "batchInContainerName",
        "batchOutContainerName",
    }
    assert {"models", "batchIn", "batchOut"} <= set(containers)
    queues = resources_of(
        doc, "Microsoft.Storage/storageAccounts/queueServices/queues", existing=True
    )
    assert set(queues) == {"poisonQueue"}


def test_deployer_role_is_optional() -> None:
    doc = module("storage-roles.bicep")
    deployer = [ra for ra in role_assignments(doc) if ra["principal"] == "deployerPrincipalId"]
    assert len(deployer) == 1 and deployer[0]["conditional"]
    assert param_default(doc, "deployerPrincipalId") == ""
    main = parse(MAIN)
    assert param_default(main, "deployerPrincipalId") == ""
    assert main["modules"]["storageRoles"]["config"]["params"]["deployerPrincipalId"] == (
        "deployerPrincipalId"
    )


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
            assert cfg["properties"]["principalType"], f"{path}: {symbol}"


def test_app_and_roles_use_the_same_identity() -> None:
    main = parse(MAIN)
    params = {name: mod["config"]["params"] for name, mod in main["modules"].items()}
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


def test_alerts_cover_the_four_conditions_and_notify() -> None:
    doc = module("alerts.bicep")
    group = one(doc, "Microsoft.Insights/actionGroups")
    assert "emailReceivers" in group["properties"]
    assert "alertEmail" in json.dumps(doc["variables"]["emailReceivers"])
    rules = {
        symbol: body(res)
        for symbol, res in resources_of(doc, "Microsoft.Insights/scheduledQueryRules").items()
    }
    assert len(rules) >= 4
    queries = {}
    for symbol, rule in rules.items():
        props = rule["properties"]
        assert props["enabled"] is True, symbol
        assert props["scopes"] == ["appInsightsId"], symbol
        assert accessor(props["actions"]["actionGroups"][0]) == ("actionGroup", "id"), symbol
        (criterion,) = props["criteria"]["allOf"]
        queries[symbol] = json.dumps(criterion)
    assert any("resultCode" in q and ">= 500" in q for q in queries.values()), "5xx alert"
    assert any("percentile(duration, 95)" in q for q in queries.values()), "p95 alert"
    variables = {k: v["value"] for k, v in doc["variables"].items()}
    events = {variables["batchFailedEvent"], variables["modelLoadFailedEvent"]}
    assert events == set(ALERT_EVENTS)
    for var in ("batchFailedEvent", "modelLoadFailedEvent"):
        assert any(var in q and "eventQuery" in q for q in queries.values()), var
    main = parse(MAIN)
    assert param_default(main, "alertEmail") == ""
    assert main["modules"]["alerts"]["config"]["params"]["alertEmail"] == "alertEmail"


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
