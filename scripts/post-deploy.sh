#!/usr/bin/env bash
# After the code is deployed: wait until the host lists the blob function, read the keys that
# only exist now, and deploy infra/post-deploy.bicep (the Event Grid subscription of the blob
# trigger, with retry policy and dead-lettering, and the availability test of /api/health).
# Run by .github/workflows/deploy.yml and by azd's postdeploy hook (scripts/azd-postdeploy.sh),
# signed in with az. Keys go to Azure as secure parameters through a private temporary file:
# never on a command line, never in a log (masked on GitHub).
#
# Environment: RESOURCE_GROUP FUNCTION_APP_NAME EVENT_GRID_SYSTEM_TOPIC STORAGE_ACCOUNT_NAME
#   APP_INSIGHTS_NAME; optional BATCH_IN_CONTAINER (batch-in), DEAD_LETTER_CONTAINER
#   (eventgrid-deadletter), ACTION_GROUP_ID, DEPLOYMENT_NAME, AVAILABILITY_TEST (true),
#   POLL_SECONDS (15), POLL_ATTEMPTS (40).
set -euo pipefail

: "${RESOURCE_GROUP:?set RESOURCE_GROUP}"
: "${FUNCTION_APP_NAME:?set FUNCTION_APP_NAME}"
: "${EVENT_GRID_SYSTEM_TOPIC:?set EVENT_GRID_SYSTEM_TOPIC}"
: "${STORAGE_ACCOUNT_NAME:?set STORAGE_ACCOUNT_NAME}"
: "${APP_INSIGHTS_NAME:?set APP_INSIGHTS_NAME}"
BATCH_IN_CONTAINER="${BATCH_IN_CONTAINER:-batch-in}"
DEAD_LETTER_CONTAINER="${DEAD_LETTER_CONTAINER:-eventgrid-deadletter}"
ACTION_GROUP_ID="${ACTION_GROUP_ID:-}"
DEPLOYMENT_NAME="${DEPLOYMENT_NAME:-ptd-post-deploy}"
AVAILABILITY_TEST="${AVAILABILITY_TEST:-true}"
POLL_SECONDS="${POLL_SECONDS:-15}"
POLL_ATTEMPTS="${POLL_ATTEMPTS:-40}"
HERE="$(cd "$(dirname "$0")" && pwd)"
TEMPLATE="${HERE}/../infra/post-deploy.bicep"

mask() {
  if [ -n "${GITHUB_ACTIONS:-}" ] && [ -n "$1" ]; then echo "::add-mask::$1"; fi
}

# 1. The blob extension starts (and creates its webhook key) once the host has indexed the function.
indexed=""
for attempt in $(seq 1 "${POLL_ATTEMPTS}"); do
  names="$(az functionapp function list -g "${RESOURCE_GROUP}" -n "${FUNCTION_APP_NAME}" --query '[].name' -o tsv 2>/dev/null || true)"
  if printf '%s\n' "${names}" | grep -q 'score_batch_blob'; then indexed=1; break; fi
  echo "score_batch_blob not listed yet (attempt ${attempt}); waiting"
  sleep "${POLL_SECONDS}"
done
if [ -z "${indexed}" ]; then echo "::error::the blob function score_batch_blob was never listed"; exit 1; fi

# 2. The webhook key of the blob extension.
blobs_key=""
for attempt in $(seq 1 "${POLL_ATTEMPTS}"); do
  blobs_key="$(az functionapp keys list -g "${RESOURCE_GROUP}" -n "${FUNCTION_APP_NAME}" --query 'systemKeys.blobs_extension' -o tsv 2>/dev/null || true)"
  if [ -n "${blobs_key}" ]; then break; fi
  echo "blobs_extension key not there yet (attempt ${attempt}); waiting"
  sleep "${POLL_SECONDS}"
done
if [ -z "${blobs_key}" ]; then echo "::error::no blobs_extension system key"; exit 1; fi
mask "${blobs_key}"

# 3. A host key of its own for the availability test (revocable without touching callers' keys).
health_key=""
if [ "${AVAILABILITY_TEST}" = "true" ]; then
  health_key="$(az functionapp keys list -g "${RESOURCE_GROUP}" -n "${FUNCTION_APP_NAME}" --query 'functionKeys."availability-test"' -o tsv 2>/dev/null || true)"
  if [ -z "${health_key}" ]; then
    health_key="$(az functionapp keys set -g "${RESOURCE_GROUP}" -n "${FUNCTION_APP_NAME}" --key-type functionKeys --key-name availability-test --query value -o tsv)"
  fi
  if [ -z "${health_key}" ]; then echo "::error::could not read or create the availability-test key"; exit 1; fi
  mask "${health_key}"
fi

# 4. Deploy the post-deploy template. Event Grid validates the webhook when the subscription is
#    created, so a host still warming up can refuse once: retry a few times.
params="$(mktemp)"
chmod 600 "${params}"
trap 'rm -f "${params}"' EXIT
export BATCH_IN_CONTAINER DEAD_LETTER_CONTAINER ACTION_GROUP_ID
BLOBS_KEY="${blobs_key}" HEALTH_KEY="${health_key}" python3 - "${params}" <<'PY'
import json
import os
import sys

values = {
    "functionAppName": os.environ["FUNCTION_APP_NAME"],
    "systemTopicName": os.environ["EVENT_GRID_SYSTEM_TOPIC"],
    "storageAccountName": os.environ["STORAGE_ACCOUNT_NAME"],
    "batchInContainerName": os.environ["BATCH_IN_CONTAINER"],
    "deadLetterContainerName": os.environ["DEAD_LETTER_CONTAINER"],
    "appInsightsName": os.environ["APP_INSIGHTS_NAME"],
    "actionGroupId": os.environ["ACTION_GROUP_ID"],
    "blobsExtensionKey": os.environ["BLOBS_KEY"],
    "healthCheckKey": os.environ["HEALTH_KEY"],
}
doc = {
    "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#",
    "contentVersion": "1.0.0.0",
    "parameters": {name: {"value": value} for name, value in values.items()},
}
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(doc, f)
PY

for attempt in 1 2 3; do
  if az deployment group create -g "${RESOURCE_GROUP}" -n "${DEPLOYMENT_NAME}" \
      --template-file "${TEMPLATE}" --parameters "@${params}" --output none; then
    echo "Event Grid subscription batch-in-to-score-batch-blob (retry policy, dead-lettering) and the /api/health availability test deployed"
    exit 0
  fi
  echo "post-deploy deployment failed (attempt ${attempt}); retrying in ${POLL_SECONDS} s"
  sleep "${POLL_SECONDS}"
done
echo "::error::infra/post-deploy.bicep could not be deployed"
exit 1
