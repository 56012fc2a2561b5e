#!/usr/bin/env bash
# Aggregated serving with FlexKV and KV-aware routing: one frontend (--router-mode kv), two workers.
# Each worker publishes vLLM's KV events — GPU blocks and FlexKV's CPU-tier blocks — on its own
# endpoint; the router indexes both tiers and sends a prompt back to the worker that holds it.
# No FLEXKV_SERVER_RECV_PORT is needed: every worker derives its own FlexKV identity. Pin one per
# worker with FLEXKV_SERVER_RECV_PORT1/2 if you want to (never the same value for both).
#   DYNAMO_FLEXKV_CPU=1 bash recipes/agg_router.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'echo Cleaning up...; kill 0' EXIT
banner "Aggregated serving + FlexKV + KV routing (2 workers)"
unset FLEXKV_SERVER_RECV_PORT  # one value for both workers would make them share an identity

# KV events carry prompt tokens: by default each worker publishes on a Unix socket in a private
# directory (vLLM binds TCP only on all interfaces). Set KV_EVENTS_ENDPOINT1/2 to a TCP endpoint to publish
# over TCP, and firewall those ports.
EVENTS_DIR="$(mktemp -d /tmp/dynamo-flexkv-kv-events-XXXXXX)"  # mode 0700

events_config() {
  echo "{\"publisher\":\"zmq\",\"topic\":\"kv-events\",\"endpoint\":\"$1\",\"enable_kv_cache_events\":true}"
}

# Run frontend with the KV router
$PYTHON -m dynamo.frontend --router-mode kv --http-port "$DYN_HTTP_PORT" &

# Worker 1
env ${FLEXKV_SERVER_RECV_PORT1:+FLEXKV_SERVER_RECV_PORT=$FLEXKV_SERVER_RECV_PORT1} \
DYNAMO_USE_FLEXKV=1 \
FLEXKV_CPU_CACHE_GB=$FLEXKV_CPU_CACHE_GB \
DYN_SYSTEM_PORT=${DYN_SYSTEM_PORT1:-8081} \
CUDA_VISIBLE_DEVICES=${DEVICES1:-0} \
  $PYTHON -m dynamo_flexkv.vllm --model "$MODEL" $WORKER_ARGS \
    --connector flexkv \
    --kv-events-config "$(events_config "${KV_EVENTS_ENDPOINT1:-ipc://$EVENTS_DIR/worker1}")" &

# Worker 2
env ${FLEXKV_SERVER_RECV_PORT2:+FLEXKV_SERVER_RECV_PORT=$FLEXKV_SERVER_RECV_PORT2} \
DYNAMO_USE_FLEXKV=1 \
FLEXKV_CPU_CACHE_GB=$FLEXKV_CPU_CACHE_GB \
DYN_SYSTEM_PORT=${DYN_SYSTEM_PORT2:-8082} \
CUDA_VISIBLE_DEVICES=${DEVICES2:-1} \
  $PYTHON -m dynamo_flexkv.vllm --model "$MODEL" $WORKER_ARGS \
    --connector flexkv \
    --kv-events-config "$(events_config "${KV_EVENTS_ENDPOINT2:-ipc://$EVENTS_DIR/worker2}")" &

wait_any_exit
