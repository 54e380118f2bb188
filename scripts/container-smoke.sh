#!/usr/bin/env bash
# Smoke test of the container image on a CI runner (it needs Docker): run IMAGE with Azurite for
# its storage connections and file-based function keys made up for this run, then require
#   - the process to run as a non-root user,
#   - Docker's HEALTHCHECK to report "healthy",
#   - GET /api/health and one golden POST /api/predict to answer as expected
#     (scripts/smoke_test.py --skip-batch: the scores are computed with the bundled model here).
# Usage: scripts/container-smoke.sh IMAGE    (Azurite must listen on 127.0.0.1:10000-10002)
set -euo pipefail
IMAGE="${1:?usage: container-smoke.sh IMAGE}"
PORT="${PORT:-8080}"
NAME="ptd-smoke-$$"
ATTEMPTS="${ATTEMPTS:-40}"

user="$(docker run --rm --entrypoint id "${IMAGE}" -u)"
if [ "${user}" = "0" ]; then echo "::error::the image runs as root"; exit 1; fi
echo "image runs as uid ${user}"

secrets="$(mktemp -d)"
chmod 777 "${secrets}"
key="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
master="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
echo "::add-mask::${key}"
echo "::add-mask::${master}"
KEY="${key}" MASTER="${master}" python3 - "${secrets}/host.json" <<'PY'
import json, os, sys
doc = {
    "masterKey": {"name": "master", "value": os.environ["MASTER"], "encrypted": False},
    "functionKeys": [{"name": "default", "value": os.environ["KEY"], "encrypted": False}],
    "systemKeys": [],
}
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump(doc, f)
PY
chmod 666 "${secrets}/host.json"

cleanup() {
  docker logs "${NAME}" > container.log 2>&1 || true
  docker rm -f "${NAME}" > /dev/null 2>&1 || true
  rm -rf "${secrets}"
}
trap cleanup EXIT

docker run -d --name "${NAME}" --network host \
  -e AzureWebJobsStorage=UseDevelopmentStorage=true \
  -e STORAGE=UseDevelopmentStorage=true \
  -e AzureWebJobsSecretStorageType=files \
  -e FUNCTIONS_SECRETS_PATH=/home/ptd/secrets \
  -e "ASPNETCORE_URLS=http://+:${PORT}" \
  -e "PTD_HEALTHCHECK_PORT=${PORT}" \
  -v "${secrets}:/home/ptd/secrets" \
  "${IMAGE}"

status=""
for attempt in $(seq 1 "${ATTEMPTS}"); do
  status="$(docker inspect --format '{{.State.Health.Status}}' "${NAME}")"
  if [ "${status}" = "healthy" ]; then break; fi
  echo "container health: ${status} (attempt ${attempt}); waiting"
  sleep 10
done
if [ "${status}" != "healthy" ]; then
  echo "::error::the container never became healthy"
  docker logs "${NAME}" 2>&1 | tail -50
  exit 1
fi

SMOKE_FUNCTION_KEY="${key}" python scripts/smoke_test.py --skip-batch \
  --app-url "http://127.0.0.1:${PORT}" --run-id "container-$$"
