# Sourced by the launch scripts in this directory. Mirrors the variables of Dynamo's FlexKV guide
# (examples/backends/vllm/launch/*_flexkv*.sh) and adds one switch for machines without a GPU:
#
#   DYNAMO_FLEXKV_CPU=1   vLLM's CPU build, the offline tiny model, Dynamo's file discovery on
#                         loopback (no etcd/NATS), small caches. Every default below can still be
#                         overridden by exporting the variable.
RECIPES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(cd "$RECIPES_DIR/.." && pwd)"

if [ "${DYNAMO_FLEXKV_CPU:-0}" = "1" ]; then
  : "${PYTHON:=$([ -x "$REPO_DIR/.venv/bin/python" ] && echo "$REPO_DIR/.venv/bin/python" || echo python)}"
  : "${MODEL:=${DYNAMO_FLEXKV_MODEL_DIR:-$REPO_DIR/.cache/tiny-llama}}"
  : "${WORKER_ARGS:=--served-model-name tiny --enforce-eager --block-size 32 --max-model-len 1024 --num-gpu-blocks-override 64}"
  : "${FLEXKV_CPU_CACHE_GB:=0.25}"
  export DYN_DISCOVERY_BACKEND="${DYN_DISCOVERY_BACKEND:-file}"
  export DYN_FILE_KV="${DYN_FILE_KV:-$(mktemp -d /tmp/dynamo-flexkv-discovery-XXXXXX)}"
  export DYN_REQUEST_PLANE="${DYN_REQUEST_PLANE:-tcp}" DYN_EVENT_PLANE="${DYN_EVENT_PLANE:-zmq}"
  export DYN_TCP_RPC_HOST=127.0.0.1 DYN_TCP_RESPONSE_STREAM_HOST=127.0.0.1 DYN_EVENT_PLANE_HOST=127.0.0.1
  export DYN_SYSTEM_HOST=127.0.0.1 VLLM_HOST_IP=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
  export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
  export UCX_MODULES="^ib" UCX_NET_DEVICES="${UCX_NET_DEVICES:-lo}"  # NIXL over loopback
fi
: "${PYTHON:=python}"
: "${MODEL:=Qwen/Qwen3-0.6B}"
: "${WORKER_ARGS:=}"
: "${FLEXKV_CPU_CACHE_GB:=32}"
export DYN_HTTP_PORT="${DYN_HTTP_PORT:-8000}"

banner() {
  echo "== $1 | model $MODEL | http://127.0.0.1:$DYN_HTTP_PORT | python $PYTHON"
}

# Like Dynamo's launch_utils.sh: return when the first background service exits, with its code.
wait_any_exit() {
  local code=0
  wait -n || code=$?
  echo "a service exited (code $code); stopping the others"
  return "$code"
}
