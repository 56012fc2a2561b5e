#!/usr/bin/env bash
# Aggregated serving with FlexKV: one frontend, one vLLM worker with a CPU tier.
# Same commands as Dynamo's FlexKV guide (legacy `--connector flexkv` syntax), run through
# dynamo-flexkv's launcher, which translates them for Dynamo 1.6.1.
#   DYNAMO_FLEXKV_CPU=1 bash recipes/agg.sh      # CPU-only machine, tiny model
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'echo Cleaning up...; kill 0' EXIT
banner "Aggregated serving + FlexKV (1 worker)"

# Run frontend
$PYTHON -m dynamo.frontend --http-port "$DYN_HTTP_PORT" &

# Run worker with FlexKV (DYNAMO_USE_FLEXKV=1 also turns vLLM's KV events on)
DYNAMO_USE_FLEXKV=1 \
FLEXKV_CPU_CACHE_GB=$FLEXKV_CPU_CACHE_GB \
DYN_SYSTEM_PORT=${DYN_SYSTEM_PORT1:-8081} \
CUDA_VISIBLE_DEVICES=${DEVICES1:-0} \
  $PYTHON -m dynamo_flexkv.vllm --model "$MODEL" $WORKER_ARGS --connector flexkv &

wait_any_exit
