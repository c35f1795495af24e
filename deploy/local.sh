#!/usr/bin/env bash
# Start a one-node Ray head on loopback, submit `python -m scalespd.run CONFIG`, stop the head.
# Usage: deploy/local.sh configs/tms_5-2.yaml [RUN_DIR]
set -euo pipefail
cfg=${1:?usage: deploy/local.sh CONFIG [RUN_DIR]}
run_dir=${2:-$PWD/runs/local}
export RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --num-cpus "$(nproc)"
trap 'ray stop --force >/dev/null' EXIT
ray job submit --address http://127.0.0.1:8265 --working-dir . \
    -- python -m scalespd.run "$cfg" --run-dir "$run_dir"
