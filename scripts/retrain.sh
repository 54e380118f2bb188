#!/usr/bin/env bash
# Scheduled retraining (.github/workflows/retrain.yml): train a challenger on the latest data and
# inspection outcomes, compare it with the served champion on a labelled evaluation set that
# neither trained on, publish it, and activate it only when the gate says so (ptd compare: exit 0
# promote, 1 keep; the rule is in docs/MODEL_CARD.md). The champion stays otherwise, and the run
# summary says why.
#
# Needs `ptd` (or PTD="python -m detector") with the storage connection (STORAGE__blobServiceUri
# + az login, or STORAGE), PTD_MODEL_CONTAINER and PTD_TRAINING_CONTAINER. WORK (default
# $RUNNER_TEMP/ptd-retrain) is emptied first. TRAIN_ARGS adds options to `ptd train` (tests pass
# a small fold count). PTD_ACTOR names who retrains in the audit events.
#
# Writes key=value lines to stdout and $GITHUB_OUTPUT: challenger, champion, promoted, and the
# comparison as a Markdown table to $GITHUB_STEP_SUMMARY.
set -euo pipefail

read -r -a ptd <<< "${PTD:-ptd}"
read -r -a train_args <<< "${TRAIN_ARGS:-}"
work="${WORK:-${RUNNER_TEMP:-/tmp}/ptd-retrain}"
rm -rf "${work}"
mkdir -p "${work}"

output() {
  printf '%s\n' "$1"
  if [ -n "${GITHUB_OUTPUT:-}" ]; then printf '%s\n' "$1" >> "${GITHUB_OUTPUT}"; fi
}
summary() {
  if [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then printf '%s\n' "$1" >> "${GITHUB_STEP_SUMMARY}"; fi
  printf '%s\n' "$1" >&2
}

"${ptd[@]}" snapshot --out "${work}/data" > "${work}/snapshot.json"
"${ptd[@]}" train --data "${work}/data" --out "${work}/challenger" "${train_args[@]}"
challenger="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["model_version"])' "${work}/challenger/manifest.json")"
champion="$("${ptd[@]}" versions --json | python3 -c 'import json, sys; print(json.load(sys.stdin).get("current") or "")')"
output "challenger=${challenger}"
output "champion=${champion}"

table() { ls "${work}/data/evaluation/$1".* | head -n 1; }

decision=0
if [ -n "${champion}" ]; then
  "${ptd[@]}" fetch "${champion}" --out "${work}/champion" > /dev/null
  set +e
  "${ptd[@]}" compare "${work}/challenger" "${work}/champion/${champion}" \
    --invoices "$(table invoices)" --clients "$(table clients)" \
    --json "${work}/comparison.json" > "${work}/comparison.txt"
  decision=$?
  set -e
  if [ "${decision}" -gt 1 ]; then
    summary "## Retraining failed: the comparison could not run"
    exit "${decision}"
  fi
  summary "## Champion ${champion} against challenger ${challenger}"
  summary '```'
  summary "$(cat "${work}/comparison.txt")"
  summary '```'
else
  summary "## No model is active: the challenger ${challenger} is activated without a comparison"
fi

"${ptd[@]}" publish --artifacts "${work}/challenger" > /dev/null
if [ "${decision}" = 0 ]; then
  "${ptd[@]}" activate "${challenger}" > /dev/null
  output "promoted=true"
  summary "Promoted: ${challenger} is now the served model (restart the app to load it)."
else
  output "promoted=false"
  summary "Not promoted: ${champion} stays the served model; ${challenger} is published, not active."
fi
