#!/usr/bin/env bash
# Disaggregated serving: the prefill worker offloads to FlexKV and hands KV to the decode worker over
# NIXL (vLLM MultiConnector [FlexKV, NIXL]; kvbm's PdConnector when kvbm is installed); the decode
# worker uses NIXL alone. A repeated prompt's prefill is served from the prefill worker's CPU tier.
#   DYNAMO_FLEXKV_CPU=1 bash recipes/disagg.sh   # NIXL over UCX on loopback
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'echo Cleaning up...; kill 0' EXIT
banner "Disaggregated serving + FlexKV (1 prefill, 1 decode)"

# Run frontend
$PYTHON -m dynamo.frontend --http-port "$DYN_HTTP_PORT" &

# Run decode worker without FlexKV (NIXL alone: the launcher makes it a decode worker, as the guide
# meant; Dynamo 1.6.1 itself wants --disaggregation-mode decode)
DYN_SYSTEM_PORT=${DYN_SYSTEM_PORT1:-8081} \
VLLM_NIXL_SIDE_CHANNEL_PORT=${NIXL_PORT1:-20096} \
CUDA_VISIBLE_DEVICES=${DEVICES1:-0} \
  $PYTHON -m dynamo_flexkv.vllm --model "$MODEL" $WORKER_ARGS --connector nixl &

# Run prefill worker with FlexKV
DYN_VLLM_KV_EVENT_PORT=${DYN_VLLM_KV_EVENT_PORT:-20081} \
VLLM_NIXL_SIDE_CHANNEL_PORT=${NIXL_PORT2:-20097} \
DYNAMO_USE_FLEXKV=1 \
FLEXKV_CPU_CACHE_GB=$FLEXKV_CPU_CACHE_GB \
DYN_SYSTEM_PORT=${DYN_SYSTEM_PORT2:-8082} \
CUDA_VISIBLE_DEVICES=${DEVICES2:-1} \
  $PYTHON -m dynamo_flexkv.vllm \
  --model "$MODEL" $WORKER_ARGS \
  --is-prefill-worker \
  --connector nixl flexkv &

wait_any_exit
