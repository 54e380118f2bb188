#!/usr/bin/env bash
# azd postdeploy hook (azure.yaml): what .github/workflows/deploy.yml does after the code
# deployment, for a stage deployed with `azd up`:
#   1. publish the bundled model (scripts/publish-model.sh: activated only when no version is
#      active, or with `azd env set ACTIVATE_BUNDLED_MODEL true`; retried while the deployer's
#      new role on `models` propagates), and restart the app;
#   2. scripts/post-deploy.sh: the Event Grid subscription of the blob trigger (retry policy,
#      dead-lettering) and the availability test of /api/health;
#   3. scripts/smoke_test.py: /api/health, one golden prediction and one golden batch file.
# Needs `az login` (as the same principal as azd) and the project's Python environment
# (`make .venv/.installed`, or ptd installed). SMOKE_TEST=false skips step 3.
set -euo pipefail
cd "$(dirname "$0")/.."

# azd's environment: AZURE_RESOURCE_GROUP and the outputs of infra/main.bicep.
while IFS='=' read -r key value; do
  [ -n "${key}" ] || continue
  value="${value%\"}"
  value="${value#\"}"
  export "${key}=${value}"
done <<ENV
$(azd env get-values)
ENV

# An output, whatever case azd stored its name in (functionAppName or FUNCTIONAPPNAME).
output() {
  local name="$1" upper
  upper="$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')"
  printf '%s' "${!name:-${!upper:-}}"
}

export RESOURCE_GROUP="${AZURE_RESOURCE_GROUP:?run azd env set AZURE_RESOURCE_GROUP <name> first}"
export FUNCTION_APP_NAME; FUNCTION_APP_NAME="$(output functionAppName)"
export EVENT_GRID_SYSTEM_TOPIC; EVENT_GRID_SYSTEM_TOPIC="$(output eventGridSystemTopicName)"
export STORAGE_ACCOUNT_NAME; STORAGE_ACCOUNT_NAME="$(output storageAccountName)"
export BATCH_IN_CONTAINER; BATCH_IN_CONTAINER="$(output batchInContainerName)"
export DEAD_LETTER_CONTAINER; DEAD_LETTER_CONTAINER="$(output deadLetterContainerName)"
export APP_INSIGHTS_NAME; APP_INSIGHTS_NAME="$(output appInsightsName)"
export ACTION_GROUP_ID; ACTION_GROUP_ID="$(output actionGroupId)"
export STORAGE__blobServiceUri; STORAGE__blobServiceUri="$(output storageBlobEndpoint)"
export PTD_MODEL_CONTAINER; PTD_MODEL_CONTAINER="$(output modelsContainerName)"
export PTD_BATCH_IN_CONTAINER="${BATCH_IN_CONTAINER}"
export PTD_BATCH_OUT_CONTAINER; PTD_BATCH_OUT_CONTAINER="$(output batchOutContainerName)"
export DEPLOYMENT_NAME="ptd-post-deploy-azd-${AZURE_ENV_NAME:-env}"
APP_URL="$(output functionAppUrl)"

PYTHON="python3"
if [ -x .venv/bin/python ]; then PYTHON=".venv/bin/python"; fi

export PTD_ACTOR="${PTD_ACTOR:-azd:${AZURE_ENV_NAME:-env}}"
published="$(PTD="${PYTHON} -m detector" bash scripts/publish-model.sh)"
printf '%s\n' "${published}"
MODEL_DIR="$(printf '%s\n' "${published}" | sed -n 's/^model_dir=//p')"

# Instances read the model pointer at cold start: restart so that none keeps the previous model.
az functionapp restart -g "${RESOURCE_GROUP}" -n "${FUNCTION_APP_NAME}"

bash scripts/post-deploy.sh

if [ "${SMOKE_TEST:-true}" = "true" ]; then
  key="$(az functionapp keys list -g "${RESOURCE_GROUP}" -n "${FUNCTION_APP_NAME}" --query 'functionKeys.default' -o tsv)"
  model_args=()
  if [ -n "${MODEL_DIR}" ]; then model_args=(--model-dir "${MODEL_DIR}"); fi
  SMOKE_FUNCTION_KEY="${key}" "${PYTHON}" scripts/smoke_test.py --app-url "${APP_URL}" \
    --run-id "azd-$(date +%Y%m%d%H%M%S)" "${model_args[@]}"
fi
