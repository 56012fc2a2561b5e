#!/usr/bin/env bash
# Brings vLLM 0.26.0 (the newest release built for torch 2.11 + CUDA 13, what the lent GPU machines
# run) and its import-time dependencies onto a GPU machine that cannot reach a package registry, in
# chunks small enough for one transfer each (see docs/gpu.md).
#
#   here:   bash scripts/gpu-bundle.sh build            # downloads, splits into .gpu-bundle/chunk-*/
#   there:  bash scripts/gpu-bundle.sh receive DIR      # once per chunk: keeps it under $BUNDLE_HOME
#   there:  bash scripts/gpu-bundle.sh install          # joins, checks sha256, installs; prints the env
#           (a second `install` only refreshes this package)
#
# On the GPU machine, after `install`: `source "$BUNDLE_HOME/env.sh"` puts vLLM and this package on
# PYTHONPATH (vLLM's plugin entry point is found that way).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VERSION=0.26.0
CHUNK_BYTES=$((58 * 1024 * 1024))
OUT="$ROOT/.gpu-bundle"
BUNDLE_HOME="${BUNDLE_HOME:-/tmp/flexkv-bundle}"
say() { printf '[gpu-bundle %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

build() {
  local cache="$ROOT/.cache/gpu-wheels"
  mkdir -p "$cache/vllm" "$cache/deps"
  local platforms=()
  for tag in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
             manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    platforms+=(--platform "$tag")
  done
  local fetch=(python3 -m pip download -q --progress-bar off --no-deps --only-binary=:all:
               --python-version 3.12 --implementation cp "${platforms[@]}")
  say "downloading vllm==$VLLM_VERSION (about 290 MiB, cached under .cache/gpu-wheels)"
  "${fetch[@]}" -d "$cache/vllm" "vllm==$VLLM_VERSION"
  say "downloading its import-time dependencies ($(grep -vc "^#" "$ROOT/scripts/gpu-requirements.txt") wheels)"
  "${fetch[@]}" -d "$cache/deps" -r "$ROOT/scripts/gpu-requirements.txt"

  rm -rf "$OUT" && mkdir -p "$OUT/chunk-0"
  local wheel
  wheel=$(ls "$cache/vllm"/vllm-"$VLLM_VERSION"-*.whl)
  cp "$cache/deps"/*.whl "$OUT/chunk-0/"
  (cd "$(dirname "$wheel")" && sha256sum "$(basename "$wheel")") > "$OUT/chunk-0/vllm.sha256"
  local tmp
  tmp=$(mktemp -d)
  split -b "$CHUNK_BYTES" -d -a 2 "$wheel" "$tmp/vllm.whl.part-"
  local i=1
  for part in "$tmp"/vllm.whl.part-*; do
    mkdir -p "$OUT/chunk-$i" && mv "$part" "$OUT/chunk-$i/"
    i=$((i + 1))
  done
  rmdir "$tmp"
  for dir in "$OUT"/chunk-*; do
    say "$(basename "$dir"): $(du -sm "$dir" | cut -f1) MiB"
  done
  say "done: carry each .gpu-bundle/chunk-N to the GPU machine and run 'receive' on it, then 'install'"
}

receive() {
  local dir="${1:?usage: gpu-bundle.sh receive DIR}"
  mkdir -p "$BUNDLE_HOME/parts"
  cp "$dir"/* "$BUNDLE_HOME/parts/"
  say "received $(ls "$dir" | wc -l) files from $dir; $(du -sm "$BUNDLE_HOME/parts" | cut -f1) MiB held"
}

install() {
  local parts="$BUNDLE_HOME/parts"
  [ -f "$parts/vllm.sha256" ] || { say "chunk-0 (dependencies + checksum) not received yet"; exit 1; }
  local name
  name=$(awk '{print $2}' "$parts/vllm.sha256")
  if [ -d "$BUNDLE_HOME/site/vllm" ]; then
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$BUNDLE_HOME/proj-site" "$ROOT"
    say "vLLM already installed; refreshed this package"
    return 0
  fi
  cat "$parts"/vllm.whl.part-* > "$BUNDLE_HOME/$name"
  (cd "$BUNDLE_HOME" && sha256sum -c --quiet "$parts/vllm.sha256") \
    || { say "checksum mismatch for $name: a chunk is missing or damaged; receive every chunk again"; exit 1; }
  say "joined $name, checksum ok; installing into $BUNDLE_HOME/site"
  python3 -m pip install -q --no-index --no-deps --target "$BUNDLE_HOME/site" "$BUNDLE_HOME/$name" "$parts"/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$BUNDLE_HOME/proj-site" "$ROOT"
  # The checkout sourcing env.sh comes first, so a newer working tree runs without reinstalling;
  # proj-site carries the package's metadata (vLLM finds the plugin entry point there).
  cat > "$BUNDLE_HOME/env.sh" <<EOF
export PYTHONPATH="\$PWD:$BUNDLE_HOME/proj-site:$BUNDLE_HOME/site\${PYTHONPATH:+:\$PYTHONPATH}"
export VLLM_USE_FLASHINFER_SAMPLER=0   # FlashInfer is not part of the bundle
EOF
  # shellcheck disable=SC1091
  source "$BUNDLE_HOME/env.sh"
  python3 -c "import vllm, torch, dynamo_flexkv; print('vllm', vllm.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  say "ready: source $BUNDLE_HOME/env.sh"
}

case "${1:-}" in
  build) build ;;
  receive) receive "${2:-}" ;;
  install) install ;;
  *) echo "usage: $0 build | receive DIR | install" >&2; exit 2 ;;
esac
