#!/usr/bin/env bash
# Write the deployment's parameters file ($RUNNER_TEMP/main.parameters.json, or $1) from
# infra/main.parameters.json and the GitHub environment's variables (scripts/resolve_parameters.py
# substitutes the ${NAME=default} placeholders as azd would). main.bicep defaults the deployer to
# deployer().objectId; DEPLOYER_OBJECT_ID (variable AZURE_DEPLOYER_OBJECT_ID) only overrides it.
set -euo pipefail
test -n "${RESOURCE_GROUP:-}" || { echo "::error::set the variable AZURE_RESOURCE_GROUP on environment ${PTD_STAGE:-?}"; exit 1; }
out="${1:-${RUNNER_TEMP:?}/main.parameters.json}"
set -- --out "${out}"
if [ -n "${DEPLOYER_OBJECT_ID:-}" ]; then set -- "$@" --set "deployerPrincipalId=${DEPLOYER_OBJECT_ID}"; fi
python "$(dirname "$0")/resolve_parameters.py" "$(dirname "$0")/../infra/main.parameters.json" \
  --main "$(dirname "$0")/../infra/main.bicep" "$@"
