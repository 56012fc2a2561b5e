"""Start-up cost of the weights' content identity (`integration/vllm/fingerprint.py`) on an 8B-sized
checkpoint, cold (page cache dropped) and warm.

The checkpoint is synthetic: Llama-3-8B's tensor names, shapes and bf16 dtype (291 tensors, ~16 GB)
in 4 safetensors shards of random bytes, written once under .cache/ and reused. Baselines measured in
the same run: reading only the safetensors headers (the least any content identity reads), and the
old fingerprint (names, sizes and mtimes: one stat per file, which a swapped checkpoint fools).

Cold runs drop the page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root).

    python benchmarks/fingerprint.py --repeat 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from dynamo_flexkv.integration.vllm.fingerprint import weight_files, weights_identity

REPO = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE, LAYERS, KV_HIDDEN, VOCAB = 4096, 14336, 32, 1024, 128256
SHARDS = 4
CHUNK = 64 << 20


def llama_8b_tensors() -> list[tuple[str, tuple[int, ...]]]:
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        tensors += [(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (KV_HIDDEN, HIDDEN)),
                    (p + "self_attn.v_proj.weight", (KV_HIDDEN, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                    (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                    (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)), (p + "input_layernorm.weight", (HIDDEN,)),
                    (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return tensors + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        size = 2 * math.prod(shape)  # bf16
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    partial = path.with_suffix(".partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        left = offset
        while left:
            n = min(CHUNK, left)
            f.write(os.urandom(n))
            left -= n
    partial.rename(path)


def checkpoint(root: Path) -> Path:
    """The synthetic checkpoint, built on first use (a few minutes) and reused."""
    tensors = llama_8b_tensors()
    per_shard = -(-len(tensors) // SHARDS)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(SHARDS):
        path = root / f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        if not path.exists():
            print(f"writing {path.name} ...", flush=True)
            write_shard(path, tensors[i * per_shard:(i + 1) * per_shard])
    return root


def headers_only(root: Path) -> None:
    """The least any content identity reads: each file's header."""
    for path in weight_files(root):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            f.read(n)


def names_sizes_mtimes(root: Path) -> str:
    """The old fingerprint's reads: one stat per weight file."""
    return "\n".join(f"{p.relative_to(root)}:{(st := p.stat()).st_size}:{st.st_mtime_ns}" for p in weight_files(root))


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[[], object], cold: bool) -> float:
    if cold:
        drop_page_cache()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=REPO / ".cache" / "fingerprint-llama-8b")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    root = checkpoint(args.dir)
    files = weight_files(root)
    total = sum(p.stat().st_size for p in files)
    cases = {
        "content identity": lambda: weights_identity(str(root), None),
        "headers only": lambda: headers_only(root),
        "names+sizes+mtimes (old)": lambda: names_sizes_mtimes(root),
    }
    times: dict[str, list[float]] = {f"{name}, {state}": [] for name in cases for state in ("cold", "warm")}
    for _ in range(args.repeat):
        for name, fn in cases.items():
            times[f"{name}, cold"].append(timed(fn, cold=True))
            times[f"{name}, warm"].append(timed(fn, cold=False))
    results = {name: summary(values) for name, values in times.items()}
    print(f"checkpoint: {len(files)} shards, {sum(1 for _ in llama_8b_tensors())} tensors, {total / 1e9:.1f} GB; "
          f"{args.repeat} repetitions")
    print(f"{'case':34} {'median':>9} {'min':>9} {'max':>9} {'s per 10 GB':>12}")
    for name, r in results.items():
        print(f"{name:34} {r['median_s']:9.4f} {r['min_s']:9.4f} {r['max_s']:9.4f} {r['median_s'] * 1e10 / total:12.4f}")
    for state in ("cold", "warm"):
        identity = results[f"content identity, {state}"]["median_s"]
        for baseline in ("headers only", "names+sizes+mtimes (old)"):
            ratio = identity / results[f"{baseline}, {state}"]["median_s"]
            print(f"{state}: content identity / {baseline} = {ratio:.1f}x")
    if args.json:
        args.json.write_text(json.dumps({"bytes": total, "repeat": args.repeat, "results": results}, indent=2))


if __name__ == "__main__":
    main()
