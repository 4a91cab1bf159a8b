#!/bin/sh
# Once per fleet, from a checkout, against the Prefect server of PREFECT_API_URL: the work pool,
# the project's deployments (prefect.yaml) and the shared result storage.
#   deploy/setup.sh s3://bucket/prefect-results
# Then every machine sets PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=s3-bucket/neuroal-results.
set -eu
[ $# -eq 1 ] || { echo "usage: deploy/setup.sh s3://bucket/prefect-results" >&2; exit 2; }
prefect --no-prompt work-pool create neuroal --type process --overwrite
# Unset: Prefect would write this machine's NEUROAL_HOME into the deployments, and every worker
# would then run its cells in this checkout instead of its own.
env -u NEUROAL_HOME prefect --no-prompt deploy --all
python "$(dirname "$0")/result_storage.py" "$1"
