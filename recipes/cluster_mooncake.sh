#!/usr/bin/env bash
# Two (or more) nodes sharing one KV store: the cluster tier on Mooncake Store. A prefix one worker
# computed is loaded by every other worker, on any node, instead of being recomputed.
#
#   node 1:  STORE_HOST=<node 1 address> ROLE=head   bash recipes/cluster_mooncake.sh  # store + frontend + worker
#   node 2:  STORE_HOST=<node 1 address> ROLE=worker bash recipes/cluster_mooncake.sh  # one more worker
#
# Discovery across nodes uses etcd + NATS: run deploy/docker-compose.yml on node 1 with its ports
# published on node 1's address, and export on every node
#   DYN_DISCOVERY_BACKEND=etcd ETCD_ENDPOINTS=http://<node 1>:2379 NATS_SERVER=nats://<node 1>:4222
# The store on node 1: mooncake_master with its HTTP metadata server, and a store node holding
# STORE_GB of memory; every worker also contributes FLEXKV_REMOTE_CACHE_GB of its own. Workers must
# hash prefixes alike: keep vLLM's default sha256 prefix hashing, or export one PYTHONHASHSEED on
# every node (a worker with a per-process random seed refuses to start). RDMA: FLEXKV_REMOTE_PROTOCOL=rdma
# and FLEXKV_REMOTE_DEVICE=mlx5_0 (on GPU nodes install mooncake-transfer-engine instead of -non-cuda).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
trap 'echo Cleaning up...; kill 0' EXIT
: "${STORE_HOST:?set STORE_HOST to the address of node 1, reachable from every node}"
: "${ROLE:=head}"
: "${MOONCAKE_PORT:=50051}"
: "${MOONCAKE_HTTP_PORT:=8080}"
: "${STORE_GB:=16}"
MOONCAKE_BIN="${MOONCAKE_BIN:-$(dirname "$(command -v "$PYTHON")")}"
export FLEXKV_REMOTE_STORE="mooncake://$STORE_HOST:$MOONCAKE_PORT"
export FLEXKV_REMOTE_METADATA_SERVER="http://$STORE_HOST:$MOONCAKE_HTTP_PORT/metadata"
export FLEXKV_REMOTE_CACHE_GB="${FLEXKV_REMOTE_CACHE_GB:-4}"
banner "Cluster tier on Mooncake Store ($ROLE, store $FLEXKV_REMOTE_STORE)"

# KV events stay on this host: a Unix socket in a private directory (vLLM binds TCP only on all
# interfaces); set KV_EVENTS_ENDPOINT1 to a TCP endpoint to publish them wider.
EVENTS_DIR="$(mktemp -d /tmp/dynamo-flexkv-kv-events-XXXXXX)"  # mode 0700
events_config() {
  echo "{\"publisher\":\"zmq\",\"topic\":\"kv-events\",\"endpoint\":\"$1\",\"enable_kv_cache_events\":true}"
}

if [ "$ROLE" = "head" ]; then
  "$MOONCAKE_BIN/mooncake_master" -rpc_port="$MOONCAKE_PORT" -rpc_address="$STORE_HOST" \
    -enable_http_metadata_server=true -http_metadata_server_host="$STORE_HOST" \
    -http_metadata_server_port="$MOONCAKE_HTTP_PORT" &
  for _ in $(seq 60); do  # the master listens within a second or two
    (exec 3<>"/dev/tcp/$STORE_HOST/$MOONCAKE_PORT") 2>/dev/null && break
    sleep 0.5
  done
  "$MOONCAKE_BIN/mooncake_client" -master_server_address="$STORE_HOST:$MOONCAKE_PORT" \
    -metadata_server="$FLEXKV_REMOTE_METADATA_SERVER" -host="$STORE_HOST" \
    -global_segment_size="${STORE_GB}GB" -protocol="${FLEXKV_REMOTE_PROTOCOL:-tcp}" &
  $PYTHON -m dynamo.frontend --router-mode kv --http-port "$DYN_HTTP_PORT" &
fi

DYNAMO_USE_FLEXKV=1 \
FLEXKV_CPU_CACHE_GB=$FLEXKV_CPU_CACHE_GB \
DYN_SYSTEM_PORT=${DYN_SYSTEM_PORT1:-8081} \
  $PYTHON -m dynamo_flexkv.vllm --model "$MODEL" $WORKER_ARGS \
    --connector flexkv \
    --kv-events-config "$(events_config "${KV_EVENTS_ENDPOINT1:-ipc://$EVENTS_DIR/worker1}")" &

wait_any_exit
