#!/usr/bin/env bash
# Publish the bundled model (models_artifacts/) and decide what is served, respecting operators:
# the bundled version is activated only when no version is active yet, or when the operator asks
# for it (ACTIVATE_BUNDLED_MODEL=true: the deploy workflow's `activate_bundled_model` input, or
# `azd env set ACTIVATE_BUNDLED_MODEL true`). A rollback or a retrained model that an operator
# activated is never replaced by a deployment of the code.
#
# Used by .github/workflows/deploy.yml and scripts/azd-postdeploy.sh. Needs `ptd` (or
# PTD="python -m detector") with the storage connection (STORAGE__blobServiceUri + az login, or
# STORAGE) and PTD_MODEL_CONTAINER. PTD_ACTOR names who deploys in the audit events (the GitHub
# actor). Retries the publish while a new role assignment propagates (PUBLISH_ATTEMPTS times,
# PUBLISH_RETRY_SECONDS apart).
#
# Writes key=value lines to stdout and to $GITHUB_OUTPUT when set:
#   bundled=<version>    the bundled set's version
#   before=<version>     the active version before (empty: none)
#   active=<version>     the active version after
#   activated=true|false whether this run moved the pointer (the smoke test's rollback uses it)
#   model_dir=<path>     the active set's serving files, fetched and verified, when it is not the
#                        bundled one (the smoke test computes its golden scores with it)
set -euo pipefail
cd "$(dirname "$0")/.."

read -r -a ptd <<< "${PTD:-ptd}"
attempts="${PUBLISH_ATTEMPTS:-6}"
pause="${PUBLISH_RETRY_SECONDS:-30}"

current() {
  "${ptd[@]}" versions --json | python3 -c 'import json, sys; print(json.load(sys.stdin).get("current") or "")'
}

bundled="$(python3 -c 'import json; print(json.load(open("models_artifacts/manifest.json"))["model_version"])')"

flag="--activate-if-none"
if [ "${ACTIVATE_BUNDLED_MODEL:-false}" = "true" ]; then
  flag="--activate"
fi

before=""
for attempt in $(seq 1 "${attempts}"); do
  # A role assignment made by the Bicep can take a few minutes to apply: retry reads too.
  if before="$(current)" && "${ptd[@]}" publish --artifacts models_artifacts "${flag}"; then
    break
  fi
  if [ "${attempt}" = "${attempts}" ]; then
    echo "::error::ptd publish failed ${attempts} times" >&2
    exit 1
  fi
  echo "ptd publish failed (attempt ${attempt}); retrying in ${pause} s" >&2
  sleep "${pause}"
done

active="$(current)"
activated=false
if [ "${active}" != "${before}" ]; then activated=true; fi
model_dir=""
if [ -n "${active}" ] && [ "${active}" != "${bundled}" ]; then
  echo "the active model ${active} is not the bundled ${bundled}: it stays active" >&2
  "${ptd[@]}" fetch "${active}" --out "${RUNNER_TEMP:-/tmp}/ptd-active-model" >/dev/null
  model_dir="${RUNNER_TEMP:-/tmp}/ptd-active-model/${active}"
fi

outputs="bundled=${bundled}
before=${before}
active=${active}
activated=${activated}
model_dir=${model_dir}"
printf '%s\n' "${outputs}"
if [ -n "${GITHUB_OUTPUT:-}" ]; then printf '%s\n' "${outputs}" >> "${GITHUB_OUTPUT}"; fi
