#!/usr/bin/env bash
# Decide whether this run of .github/workflows/deploy.yml may deploy, what and where; print
# stage=<stage> and sha=<commit> for GITHUB_OUTPUT. Deploys happen only after CI passed for the
# very commit deployed, and only commits of main are deployed:
#   workflow_run  (CI finished on a push to main): only if CI succeeded -> dev, CI's head commit;
#   workflow_dispatch: only from main; COMMIT (optional) may name an earlier commit of main, to
#                 roll the code back; CI must have succeeded for that commit -> the chosen stage.
# Environment: EVENT_NAME REF STAGE_INPUT COMMIT_INPUT RUN_CONCLUSION RUN_EVENT RUN_BRANCH
#   RUN_SHA GITHUB_SHA GITHUB_REPOSITORY; uses git (full history of main) and gh (GH_TOKEN).
set -euo pipefail

fail() { echo "::error::$*" >&2; exit 1; }

case "${EVENT_NAME:-}" in
  workflow_run)
    [ "${RUN_EVENT:-}" = "push" ] || fail "CI ran for a ${RUN_EVENT:-?} event, not a push: nothing to deploy"
    [ "${RUN_BRANCH:-}" = "main" ] || fail "CI ran on ${RUN_BRANCH:-?}: only main is deployed"
    [ "${RUN_CONCLUSION:-}" = "success" ] || fail "CI concluded ${RUN_CONCLUSION:-?} for ${RUN_SHA:-?}: not deploying"
    stage="dev"
    sha="${RUN_SHA:?}"
    ;;
  workflow_dispatch)
    [ "${REF:-}" = "refs/heads/main" ] || fail "deploys run from main only (this run is on ${REF:-?})"
    stage="${STAGE_INPUT:-dev}"
    sha="${COMMIT_INPUT:-${GITHUB_SHA:?}}"
    [[ "${sha}" =~ ^[0-9a-f]{7,40}$ ]] || fail "commit '${sha}' is not a commit id"
    sha="$(git rev-parse --verify --quiet "${sha}^{commit}")" || fail "commit ${COMMIT_INPUT:-} not found"
    git merge-base --is-ancestor "${sha}" origin/main || fail "commit ${sha} is not on main"
    passed="$(gh api "repos/${GITHUB_REPOSITORY:?}/actions/workflows/ci.yml/runs?head_sha=${sha}&status=success&per_page=1" --jq '.total_count')" \
      || fail "could not ask GitHub for the CI runs of ${sha}"
    [ "${passed:-0}" -gt 0 ] || fail "CI has not passed for ${sha}: not deploying it"
    ;;
  *)
    fail "unexpected event ${EVENT_NAME:-?}"
    ;;
esac

case "${stage}" in
  dev|test|prod) ;;
  *) fail "unknown stage ${stage}" ;;
esac
echo "stage=${stage}"
echo "sha=${sha}"
