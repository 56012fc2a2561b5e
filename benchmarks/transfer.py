#!/usr/bin/env python3
"""GPU <-> CPU-pool block transfer benchmark (and its CPU counterpart), against the physical limit.

On CUDA, in one run:
1. the physical limit: pinned memcpy H2D, D2H and both at once (two streams), 1 GiB contiguous;
2. correctness: bit-exact round trips (save, then load into other blocks, poisoned first), the pool
   bytes against the CPU primitive's slot format, and layer-wise loads, for every copy method and
   every layout (vLLM CUDA K/V planes NHD and HND, block-first CPU layout, MLA, separate per-layer
   tensors, block sizes 16 and 128, a TP rank > 0);
3. throughput of D2H (save), H2D (load) and both at once for `--blocks` random blocks of each model,
   for each method, as a ratio to (1);
4. the slowdown of a concurrent bf16 matmul stream while transfers run;
5. layer-wise overlap: a simulated forward (per layer: wait_layer(i), then the GEMMs of one Llama-3-8B
   layer for `--new-tokens` tokens) over a cached prefix of `--prefix-tokens`, with and without it;
6. busy host: a 4k- and a 32k-token prefix loaded and saved while the calling thread keeps running
   Python, as vLLM's engine thread does between steps and in an eager forward, for each way of
   issuing the copies (`--busy-methods`; `issue=caller|thread|caller-loads`), against pinned memcpy.
On CPU (auto when no GPU, or --device cpu) the same steps run on small sizes with `BlockCopier`, and
the limit is a plain contiguous torch copy of the same bytes.

Caches are built exactly as vLLM shapes them; vLLM itself is not needed. Prints progress lines, then a
markdown table (also written to --out); --json keeps every number.

    python benchmarks/transfer.py                       # auto: full sizes on CUDA, small on CPU
    python benchmarks/transfer.py --device cpu --blocks 64 --layers 4
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo_flexkv.storage.layout import KVCacheLayout, PoolGeometry  # noqa: E402
from dynamo_flexkv.config import load_settings  # noqa: E402
from dynamo_flexkv.transfer.copier import make_copier  # noqa: E402
from dynamo_flexkv.transfer.host import BlockCopier  # noqa: E402
from dynamo_flexkv.transfer.layerwise import start_layerwise_load, start_load, start_save  # noqa: E402

GB = 1e9


def log(msg: str) -> None:
    print(f"[transfer-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# Models and vLLM-shaped caches


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    kind: str  # "attn" (K/V planes) or "mla"
    block_size: int
    heads: int = 8
    head_dim: int = 128
    latent: int = 576
    dtype: torch.dtype = torch.bfloat16

    def block_bytes_per_layer(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        if self.kind == "mla":
            return self.block_size * self.latent * elem
        return 2 * self.block_size * self.heads * self.head_dim * elem

    @property
    def shard_bytes(self) -> int:
        return self.layers * self.block_bytes_per_layer()


MODELS = {
    "llama-16": Model("llama-16", 32, "attn", 16),
    "llama-128": Model("llama-128", 32, "attn", 128),
    "mla-16": Model("mla-16", 61, "mla", 16),
    "mla-64": Model("mla-64", 61, "mla", 64),
}


def layer_shape(model: Model, num_blocks: int, layout: str) -> tuple[int, ...]:
    m = model
    if m.kind == "mla":
        return (num_blocks, m.block_size, m.latent)
    if layout == "nhd":  # vLLM FlashAttention: [2, num_blocks, block_size, num_kv_heads, head_dim]
        return (2, num_blocks, m.block_size, m.heads, m.head_dim)
    if layout == "hnd":  # the HND variant, as stored: [2, num_blocks, num_kv_heads, block_size, head_dim]
        return (2, num_blocks, m.heads, m.block_size, m.head_dim)
    if layout == "cpu":  # CPU attention: [num_blocks, num_kv_heads, block_size, k+v]
        return (num_blocks, m.heads, m.block_size, 2 * m.head_dim)
    raise ValueError(layout)


def build_caches(model: Model, num_blocks: int, layout: str, separate: bool, device, fill: bool = True):
    """Per-layer KV tensors: views of one buffer (vLLM's usual allocation) or separate allocations."""
    shape = layer_shape(model, num_blocks, layout)
    numel = math.prod(shape)
    elem = torch.empty((), dtype=model.dtype).element_size()

    def random_bytes(n: int) -> torch.Tensor:
        t = torch.empty(n, dtype=torch.uint8, device=device)
        if fill:
            t.view(torch.int32)[: n // 4].random_()
        return t

    if separate:
        return {f"layers.{i}.attn": random_bytes(numel * elem).view(model.dtype).view(shape) for i in range(model.layers)}
    raw = random_bytes(model.layers * numel * elem).view(model.dtype)
    return {f"layers.{i}.attn": raw[i * numel : (i + 1) * numel].view(shape) for i in range(model.layers)}


class HostBuffer:
    """One host region for every pool of the run: /dev/shm when it has room (as `CpuBlockPool`), else
    anonymous memory; pinned once (one registration) on CUDA."""

    def __init__(self, nbytes: int, cuda: bool):
        self.nbytes = nbytes
        self.path = None
        shm = Path("/dev/shm")
        if shm.is_dir() and shutil.disk_usage(shm).free > nbytes + (1 << 30):
            self.path = shm / f"flexkv-bench-{os.getpid()}"
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                self._mmap = mmap.mmap(fd, nbytes, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        else:
            self._mmap = mmap.mmap(-1, nbytes)
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8)
        self.region = None
        self.pin_seconds = 0.0
        if cuda:
            from dynamo_flexkv.transfer.cuda.pinning import pin_host_memory

            self.region = pin_host_memory(self.tensor, row_bytes=nbytes, chunk_bytes=nbytes, strict=True)
            self.pin_seconds = self.region.seconds

    def pool(self, geometry: PoolGeometry) -> torch.Tensor:
        assert geometry.total_bytes <= self.nbytes
        return self.tensor[: geometry.total_bytes].view(geometry.num_slots, geometry.slot_bytes)

    def close(self) -> None:
        if self.region is not None:
            self.region.unpin()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Timing helpers


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peak(device, nbytes: int, reps: int) -> dict:
    """Physical limit: contiguous copies of `nbytes` (pinned memcpy on CUDA, torch copy on CPU)."""
    if device.type == "cuda":
        host_a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        host_b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev_a = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dev_b = torch.empty(nbytes, dtype=torch.uint8, device=device)
        host_a.view(torch.int32).random_()
        s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)
        h2d = median_time(lambda: dev_a.copy_(host_a, non_blocking=True), device, reps)
        d2h = median_time(lambda: host_b.copy_(dev_b, non_blocking=True), device, reps)

        def both():
            with torch.cuda.stream(s1):
                dev_a.copy_(host_a, non_blocking=True)
            with torch.cuda.stream(s2):
                host_b.copy_(dev_b, non_blocking=True)

        bid = median_time(both, device, reps)
        out = {"h2d": nbytes / h2d / GB, "d2h": nbytes / d2h / GB, "both": 2 * nbytes / bid / GB}
        del host_a, host_b, dev_a, dev_b
        return out
    src = torch.empty(nbytes, dtype=torch.uint8)
    src.view(torch.int32).random_()
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), device, reps)
    src2, dst2 = torch.empty_like(src), torch.empty_like(src)

    def both():
        th = threading.Thread(target=lambda: dst2.copy_(src2))
        th.start()
        dst.copy_(src)
        th.join()

    tb = median_time(both, device, reps)
    return {"h2d": nbytes / t / GB, "d2h": nbytes / t / GB, "both": 2 * nbytes / tb / GB}


# --------------------------------------------------------------------------------------------------
# Copier construction


def parse_method(spec: str) -> tuple[str, dict]:
    """'name[/key=value...]': staged/mib=64/bufs=2/lbufs=4/prio=-100/max=2048/issue=thread, batch/max=2048, zerocopy/ctas=32,
    torch, legacy (BlockCopier unchanged on the CUDA cache)."""
    name, *opts = spec.split("/")
    keys = {"mib": ("staging_bytes", lambda v: int(v) << 20), "bufs": ("staging_buffers", int), "issue": ("issue", str),
            "lbufs": ("load_staging_buffers", int),
            "ctas": ("max_programs", int), "max": ("max_batch", int), "prio": ("load_priority", int)}
    out = {}
    for opt in opts:
        k, _, v = opt.partition("=")
        key, conv = keys[k]
        out[key] = conv(v)
    return name, out


def make(layout, pool, geometry, rank, spec: str):
    name, opts = parse_method(spec)
    if layout.device.type != "cuda" or name == "legacy":
        return BlockCopier(layout, pool, geometry, rank)
    # FLEXKV_CUDA_BATCH_MEMCPY=0 measures the per-copy path of drivers before CUDA 12.8
    copier = make_copier(layout, pool, geometry, rank, method=name,
                         batch_memcpy=load_settings().cuda_batch_memcpy, **opts)
    if copier.method != name:
        copier.close()
        raise RuntimeError(f"method {name} unavailable here (got {copier.method})")
    return copier


def make_or_skip(section: str, layout, pool, geometry, spec: str):
    """The copier of `spec` for a benchmark section, or None (logged) where it is unavailable here."""
    try:
        return make(layout, pool, geometry, 0, spec)
    except Exception as exc:
        log(f"{section} {spec}: unavailable ({exc})")
        return None


def close(copier) -> None:
    if hasattr(copier, "close"):
        copier.close()


# --------------------------------------------------------------------------------------------------
# Correctness


def round_trip(name, copier, caches, layout, pool, geometry, rank, src_blocks, dst_blocks, slots, device) -> list[str]:
    """Save `src_blocks` to `slots` (compared with the CPU primitive's slot format), then load them into
    the poisoned `dst_blocks`, whole and layer by layer; returns failures."""
    failures = []
    num_blocks = layout.num_blocks
    pool.fill_(0x5A)
    copier.save(src_blocks, slots)
    # the slot format's reference: the CPU primitive on a CPU copy of the caches as they are now
    ref_layout = KVCacheLayout({k: v.cpu() for k, v in caches.items()}, num_blocks)
    ref_pool = torch.full_like(pool, 0x5A)
    BlockCopier(ref_layout, ref_pool, geometry, rank).save(src_blocks, slots)
    if not torch.equal(pool, ref_pool):
        failures.append(f"{name}: pool bytes differ from the CPU primitive's slot format")
    for layerwise in (False, True):
        for seg in layout.segments:
            seg[dst_blocks] = 0xA5  # poison
        if layerwise:
            handle = start_layerwise_load(copier, slots, dst_blocks)
            for i in range(len(layout.layer_names)):
                handle.wait_layer(i)
            handle.wait_all()
            handle.synchronize()
        else:
            copier.load(slots, dst_blocks)
        sync(device)
        for s, seg in enumerate(layout.segments):
            if not torch.equal(seg[src_blocks], seg[dst_blocks]):
                failures.append(f"{name}: segment {s} differs after {'layerwise ' if layerwise else ''}load")
                break
    return failures


def check_layout(case: str, model: Model, layout_kind: str, separate: bool, device, specs, rank: int = 0,
                 world: int = 1, n: int = 48, small_chunks: bool = False) -> list[str]:
    """Round trips through every method; returns failures (empty = all bit-exact)."""
    failures = []
    num_blocks = 3 * n + 7
    caches = build_caches(model, num_blocks, layout_kind, separate, device)
    layout = KVCacheLayout(caches, num_blocks)
    geometry = PoolGeometry(2 * n + 3, layout.shard_bytes, world)
    # a pool of its own, page-aligned like CpuBlockPool's (pinned in several chunks when asked, to
    # exercise the chunk barriers)
    pool_mem = mmap.mmap(-1, geometry.total_bytes)
    pool = torch.frombuffer(pool_mem, dtype=torch.uint8).view(geometry.num_slots, geometry.slot_bytes)
    region = None
    if device.type == "cuda":
        from dynamo_flexkv.transfer.cuda.pinning import pin_host_memory

        region = pin_host_memory(pool, chunk_bytes=(3 * geometry.slot_bytes if small_chunks else 1 << 30), strict=True)
    rng = np.random.default_rng(hash(case) % 2**32)
    try:
        # random slots, and runs of consecutive slots (one 2D copy each where a row is part of a slot)
        runs = [*range(1, 1 + n // 2), *range(n // 2 + 3, n // 2 + 3 + 2 * (n - n // 2), 2)]
        patterns = {"random slots": rng.permutation(geometry.num_slots)[:n].tolist(),
                    "runs of slots": rng.permutation(runs).tolist()}
        for spec in specs:
            try:
                copier = make(layout, pool, geometry, rank, spec)
            except RuntimeError as exc:
                failures.append(f"{case}/{spec}: {exc}")
                continue
            try:
                for pattern, slots in patterns.items():
                    perm = rng.permutation(num_blocks)
                    src_blocks, dst_blocks = perm[:n].tolist(), perm[n : 2 * n].tolist()
                    failures += round_trip(f"{case}/{spec}/{pattern}", copier, caches, layout, pool, geometry,
                                           rank, src_blocks, dst_blocks, slots, device)
            except Exception as exc:
                failures.append(f"{case}/{spec}: {type(exc).__name__}: {exc}")
            finally:
                close(copier)
    finally:
        if region is not None:
            region.unpin()
    return failures


def run_checks(device, specs, args) -> tuple[int, list[str]]:
    small = Model("small", 4, "attn", 16, heads=2, head_dim=64)
    cases = [
        ("nhd16-views", MODELS["llama-16"], "nhd", False, {}),
        ("hnd16-views", MODELS["llama-16"], "hnd", False, {}),
        ("nhd16-separate", MODELS["llama-16"], "nhd", True, {}),
        ("nhd128-views", MODELS["llama-128"], "nhd", False, {"n": 12}),
        ("cpu16-views", MODELS["llama-16"], "cpu", False, {}),
        ("mla16-views", MODELS["mla-16"], "mla", False, {}),
        ("mla16-separate", MODELS["mla-16"], "mla", True, {}),
        ("nhd-rank1-of-2", small, "nhd", False, {"rank": 1, "world": 2}),
        ("nhd-pinned-in-chunks", small, "nhd", False, {"small_chunks": True}),
    ]
    if device.type == "cpu":
        cases = [(c, Model(m.name, min(m.layers, args.layers), m.kind, m.block_size), lk, sep, kw)
                 for c, m, lk, sep, kw in cases]
    failures: list[str] = []
    for case, model, lk, sep, kw in cases:
        t0 = time.perf_counter()
        got = check_layout(case, model, lk, sep, device, specs, **kw)
        failures += got
        log(f"check {case:<24} {'OK' if not got else 'FAIL ' + '; '.join(got)} ({time.perf_counter() - t0:.1f}s)")
    # vLLM registers the HND layout as a permuted view of the NHD shape: does KVCacheLayout take it?
    try:
        buf = torch.empty(2, 2, 8, 2, 16, 8, dtype=torch.bfloat16, device=device)
        KVCacheLayout({f"l{i}": buf[i].permute(0, 1, 3, 2, 4) for i in range(2)}, 8)
        log("check hnd-permuted-view      OK (KVCacheLayout accepts vLLM's permuted HND view)")
    except ValueError as exc:
        log(f"check hnd-permuted-view      NOTE: KVCacheLayout rejects vLLM's permuted HND view: {exc}")
    return len(cases), failures


# --------------------------------------------------------------------------------------------------
# Throughput


def bench_model(model: Model, device, host: HostBuffer | None, specs, args, peak) -> list[dict]:
    n = args.blocks
    num_blocks = 2 * n + 64
    t0 = time.perf_counter()
    caches = build_caches(model, num_blocks, "cpu" if device.type == "cpu" else "nhd", False, device)
    layout = KVCacheLayout(caches, num_blocks)
    geometry = PoolGeometry(2 * n, layout.shard_bytes, 1)
    pool = host.pool(geometry) if host is not None else torch.empty(geometry.total_bytes, dtype=torch.uint8).view(
        geometry.num_slots, geometry.slot_bytes)
    log(f"{model.name}: {model.layers} layers, {layout.shard_bytes / 2**20:.2f} MiB per block, "
        f"{n} blocks = {n * layout.shard_bytes / 2**30:.2f} GiB per transfer (setup {time.perf_counter() - t0:.1f}s)")
    rng = np.random.default_rng(0)
    perm = rng.permutation(num_blocks)
    save_blocks, load_blocks = perm[:n].tolist(), perm[n : 2 * n].tolist()
    slot_perm = rng.permutation(2 * n)
    save_slots, load_slots = slot_perm[:n].tolist(), slot_perm[n:].tolist()
    nbytes = n * layout.shard_bytes
    rows = []
    for spec in specs:
        if spec == "legacy" and (device.type != "cuda" or nbytes > (4 << 30)):
            continue
        copier = make_or_skip(model.name, layout, pool, geometry, spec)
        if copier is None:
            continue
        reps = 1 if spec == "legacy" else args.reps
        try:
            enq = []

            def save():
                t = time.perf_counter()
                h = start_save(copier, save_blocks, save_slots)
                enq.append(time.perf_counter() - t)
                h.synchronize()

            def load():
                start_load(copier, load_slots, load_blocks).synchronize()

            def load_layerwise():
                start_layerwise_load(copier, load_slots, load_blocks).synchronize()

            def both():
                if hasattr(copier, "save_async"):
                    hs = copier.save_async(save_blocks, save_slots)
                    hl = copier.load_async(load_slots, load_blocks)
                    hs.synchronize()
                    hl.synchronize()
                else:  # CPU / legacy: two threads
                    th = threading.Thread(target=lambda: copier.save(save_blocks, save_slots))
                    th.start()
                    copier.load(load_slots, load_blocks)
                    th.join()

            # the load reads slots the save filled in the warm-up: fill them once first
            start_save(copier, load_blocks, load_slots).synchronize()
            t_save = median_time(save, device, reps)
            t_load = median_time(load, device, reps)
            t_both = median_time(both, device, reps)
            t_lw = median_time(load_layerwise, device, reps) if spec != "legacy" else float("inf")
        except Exception as exc:
            log(f"{model.name} {spec}: FAILED ({type(exc).__name__}: {exc})")
            close(copier)
            continue
        close(copier)
        row = {
            "model": model.name, "method": spec, "bytes": nbytes,
            "d2h": nbytes / t_save / GB, "h2d": nbytes / t_load / GB, "both": 2 * nbytes / t_both / GB,
            "enqueue_ms": 1e3 * statistics.median(enq) if enq else float("nan"),
            "h2d_layerwise": nbytes / t_lw / GB,
        }
        row["d2h_ratio"] = row["d2h"] / peak["d2h"]
        row["h2d_ratio"] = row["h2d"] / peak["h2d"]
        row["both_ratio"] = row["both"] / peak["both"]
        row["h2d_layerwise_ratio"] = row["h2d_layerwise"] / peak["h2d"]
        rows.append(row)
        log(f"{model.name} {spec:<12} D2H {row['d2h']:6.1f} GB/s ({row['d2h_ratio']:.2f}x)  "
            f"H2D {row['h2d']:6.1f} GB/s ({row['h2d_ratio']:.2f}x)  both {row['both']:6.1f} GB/s "
            f"({row['both_ratio']:.2f}x)  H2D layer-wise {row['h2d_layerwise']:6.1f} GB/s ({row['h2d_layerwise_ratio']:.2f}x)  "
            f"enqueue {row['enqueue_ms']:.1f} ms")
        del copier
    del caches, layout
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------------
# Compute interference and layer-wise overlap


def bench_interference(device, host, specs, args) -> list[dict]:
    """Slowdown of a bf16 matmul stream while bidirectional transfers run on the copier's streams."""
    model = MODELS["llama-16"]
    n = args.blocks
    num_blocks = 2 * n + 64
    layout = KVCacheLayout(build_caches(model, num_blocks, "nhd", False, device), num_blocks)
    geometry = PoolGeometry(2 * n, layout.shard_bytes, 1)
    pool = host.pool(geometry)
    size = args.matmul_size
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    c = torch.empty_like(a)
    compute = torch.cuda.Stream(device)

    def matmuls(k):
        with torch.cuda.stream(compute):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(k):
                torch.mm(a, b, out=c)
            e1.record()
        e1.synchronize()
        return e0.elapsed_time(e1) / 1e3

    matmuls(5)
    t1 = matmuls(20) / 20
    k = max(10, int(0.15 / t1))  # about 150 ms of matmuls
    alone = statistics.median(matmuls(k) for _ in range(3))
    tflops = 2 * size**3 * k / alone / 1e12
    log(f"interference: {k} x bf16 {size}^3 matmul alone: {alone * 1e3:.1f} ms ({tflops:.0f} TFLOP/s)")
    rng = np.random.default_rng(1)
    perm = rng.permutation(num_blocks)
    sb, lb = perm[:n].tolist(), perm[n : 2 * n].tolist()
    sp = rng.permutation(2 * n)
    ss, ls = sp[:n].tolist(), sp[n:].tolist()
    rows = []
    for spec in specs:
        copier = make_or_skip("interference", layout, pool, geometry, spec)
        if copier is None:
            continue
        copier.save(lb, ls)  # fill the slots the loads read
        side = torch.cuda.Stream(device)
        # one pair (save + load) alone, to size the transfer window
        t_pair = median_time(lambda: [h.synchronize() for h in (copier.save_async(sb, ss), copier.load_async(ls, lb))],
                             device, 2)
        pairs = max(2, math.ceil(3 * alone / t_pair))
        stats = {}

        def transfers():
            with torch.cuda.stream(side):
                t0 = time.perf_counter()
                for _ in range(pairs):
                    hs = copier.save_async(sb, ss)
                    hl = copier.load_async(ls, lb)
                    hs.synchronize()
                    hl.synchronize()
                stats["t"] = time.perf_counter() - t0

        th = threading.Thread(target=transfers)
        th.start()
        time.sleep(min(0.3 * t_pair * pairs, 0.05))
        busy = matmuls(k)
        th.join()
        xfer = 2 * pairs * n * layout.shard_bytes / stats["t"] / GB
        row = {"method": spec, "matmul_alone_ms": alone * 1e3, "matmul_with_ms": busy * 1e3,
               "slowdown_pct": 100 * (busy / alone - 1), "transfer_alone_gbs": 2 * n * layout.shard_bytes / t_pair / GB,
               "transfer_with_gbs": xfer}
        rows.append(row)
        log(f"interference {spec:<12} matmul {busy * 1e3:.1f} ms ({row['slowdown_pct']:+.1f}%), transfers during it "
            f"{xfer:.1f} GB/s (alone {row['transfer_alone_gbs']:.1f} GB/s)")
        close(copier)
    return rows


class LayerGemms:
    """One Llama-3-8B layer's GEMMs (qkv, o, gate+up, down) for `tokens` new tokens."""

    def __init__(self, tokens: int, device, hidden: int = 4096, inter: int = 14336, kv: int = 1024):
        dt = torch.bfloat16 if device.type == "cuda" else torch.float32
        g = lambda *s: torch.randn(*s, dtype=dt, device=device) * 0.02  # noqa: E731
        self.x = g(tokens, hidden)
        self.w = [g(hidden, hidden + 2 * kv), g(hidden, hidden), g(hidden, 2 * inter), g(inter, hidden)]
        self.flops = 2 * tokens * sum(w.shape[0] * w.shape[1] for w in self.w)
        self.hidden, self.inter = hidden, inter

    def __call__(self):
        qkv = self.x @ self.w[0]
        o = qkv[:, : self.hidden] @ self.w[1]
        gu = o @ self.w[2]
        return gu[:, : self.inter] @ self.w[3]


def bench_overlap(device, host, specs, args) -> list[dict]:
    base = MODELS["llama-16"]
    model = Model(base.name, base.layers if device.type == "cuda" else args.layers, "attn", base.block_size)
    n = args.prefix_tokens // model.block_size
    num_blocks = n + 64
    layout = KVCacheLayout(build_caches(model, num_blocks, "nhd" if device.type == "cuda" else "cpu", False, device),
                           num_blocks)
    geometry = PoolGeometry(n, layout.shard_bytes, 1)
    pool = host.pool(geometry) if host is not None else torch.empty(geometry.total_bytes, dtype=torch.uint8).view(
        geometry.num_slots, geometry.slot_bytes)
    gemm = LayerGemms(args.new_tokens, device) if device.type == "cuda" else LayerGemms(
        args.new_tokens, device, hidden=512, inter=1792, kv=128)
    layers = model.layers
    rng = np.random.default_rng(2)
    blocks = rng.permutation(num_blocks)[:n].tolist()
    slots = rng.permutation(n).tolist()

    def forward(load=None):
        for i in range(layers):
            if load is not None:
                load.wait_layer(i)
            gemm()

    t_compute = median_time(forward, device, args.reps)
    log(f"overlap: prefix {args.prefix_tokens} tokens = {n} blocks = {n * layout.shard_bytes / 2**30:.2f} GiB; "
        f"{layers} layers x {gemm.flops / 1e12:.2f} TFLOP ({args.new_tokens} new tokens): compute {t_compute * 1e3:.1f} ms")
    rows = []
    for spec in specs:
        copier = make_or_skip("overlap", layout, pool, geometry, spec)
        if copier is None:
            continue
        copier.save(blocks, slots)
        t_load = median_time(lambda: start_load(copier, slots, blocks).synchronize(), device, args.reps)
        t_load_lw = median_time(lambda: start_layerwise_load(copier, slots, blocks).synchronize(), device, args.reps)

        def sequential():
            h = start_load(copier, slots, blocks)
            h.wait()
            forward()

        def layerwise():
            forward(start_layerwise_load(copier, slots, blocks))

        t_seq = median_time(sequential, device, args.reps)
        t_lw = median_time(layerwise, device, args.reps)
        hidden = (t_seq - t_lw) / min(t_compute, t_load) if min(t_compute, t_load) > 0 else 0.0
        row = {"method": spec, "load_ms": t_load * 1e3, "load_layerwise_ms": t_load_lw * 1e3, "compute_ms": t_compute * 1e3, "sequential_ms": t_seq * 1e3,
               "layerwise_ms": t_lw * 1e3, "ideal_ms": max(t_load, t_compute) * 1e3, "hidden_frac": hidden}
        rows.append(row)
        log(f"overlap {spec:<12} load {t_load * 1e3:.1f} ms (layer by layer {t_load_lw * 1e3:.1f} ms), compute {t_compute * 1e3:.1f} ms: load-then-forward "
            f"{t_seq * 1e3:.1f} ms, layer-wise {t_lw * 1e3:.1f} ms (ideal {row['ideal_ms']:.1f} ms; "
            f"{100 * hidden:.0f}% of the shorter one hidden)")
        close(copier)
    return rows


# --------------------------------------------------------------------------------------------------
# Busy host: the caller keeps running Python while the copies run


def engine_thread_work(seconds: float, state: dict) -> None:
    """Pure Python for `seconds`, never releasing the GIL: what vLLM's engine thread does between
    steps (scheduling, bookkeeping) and, in eager mode, while it launches a layer's kernels."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for i in range(32):
            state[i] = state.get(i, 0) + 1


def bench_busy_host(device, host, specs, args, peak) -> list[dict]:
    """Load, save and layer-wise load of a 4k- and a 32k-token prefix (Llama-3-8B shape), timed from
    the call to the last byte, with the caller waiting idle and with the caller running Python: polling
    `done()` between 0.2 ms slices (the engine's step loop), or, for the layer-wise load, a Python
    forward of 0.3 ms per layer that waits for each layer first (an eager forward)."""
    model = MODELS["llama-16"]
    max_blocks = 32768 // model.block_size
    num_blocks = max_blocks + 64
    layout = KVCacheLayout(build_caches(model, num_blocks, "nhd", False, device), num_blocks)
    geometry = PoolGeometry(max_blocks, layout.shard_bytes, 1)
    pool = host.pool(geometry)
    rng = np.random.default_rng(3)
    marker = torch.zeros(1, device=device)
    state: dict = {}
    rows = []
    for spec in specs:
        copier = make_or_skip("busy host", layout, pool, geometry, spec)
        if copier is None:
            continue
        for tokens in (4096, 32768):
            n = tokens // model.block_size
            blocks = rng.permutation(num_blocks)[:n].tolist()
            slots = list(range(n))  # consecutive, as a request's blocks get them from a fresh pool
            copier.save(blocks, slots)  # warm-up, and the bytes the loads read
            copier.load(slots, blocks)
            starts = {"load": lambda: start_load(copier, slots, blocks),
                      "save": lambda: start_save(copier, blocks, slots),
                      "layer-wise load": lambda: start_layerwise_load(copier, slots, blocks)}
            for kind, start in starts.items():
                for busy in (False, True):
                    took, returned = [], []
                    for _ in range(args.reps + 1):
                        sync(device)
                        t0 = time.perf_counter()
                        handle = start()
                        returned.append(time.perf_counter() - t0)
                        if busy and kind == "layer-wise load":
                            for layer in range(model.layers):
                                handle.wait_layer(layer)
                                marker.add_(1)  # the layer's "attention", ordered after its bytes
                                engine_thread_work(0.0003, state)
                        elif busy:
                            while not handle.done():
                                engine_thread_work(0.0002, state)
                        handle.synchronize()
                        sync(device)
                        took.append(time.perf_counter() - t0)
                    took, returned = took[1:], returned[1:]  # the first of each series warms up
                    nbytes = n * layout.shard_bytes
                    limit_s = nbytes / (peak["d2h" if kind == "save" else "h2d"] * GB)
                    row = {"method": spec, "tokens": tokens, "kind": kind, "caller": "busy" if busy else "idle",
                           "bytes": nbytes, "ms": statistics.median(took) * 1e3, "min_ms": min(took) * 1e3,
                           "max_ms": max(took) * 1e3, "returns_ms": statistics.median(returned) * 1e3,
                           "limit_ms": limit_s * 1e3, "ratio": limit_s / statistics.median(took)}
                    rows.append(row)
                    log(f"busy host {spec:<22} {tokens:>5} tokens {kind:<15} caller {row['caller']}: "
                        f"{row['ms']:.1f} ms ({row['min_ms']:.1f}-{row['max_ms']:.1f}; memcpy {row['limit_ms']:.1f} ms, "
                        f"x{row['ratio']:.2f}), call returns after {row['returns_ms']:.2f} ms")
        close(copier)
    return rows


# --------------------------------------------------------------------------------------------------
# Pinning experiment


def bench_pinning(device, args) -> dict:
    """Registration time (single call vs 1 GiB chunks on 4 threads, each on fresh, untouched memory),
    and whether one copy may straddle two registrations."""
    from dynamo_flexkv.transfer.cuda.pinning import pin_host_memory
    from dynamo_flexkv.transfer.cuda.batch_memcpy import BatchMemcpy

    nbytes = args.pin_test_gib << 30
    out = {"bytes": nbytes}
    for label, chunk, threads in (("single", nbytes, 1), ("1GiB-x4threads", 1 << 30, 4)):
        buf = mmap.mmap(-1, nbytes)
        t = torch.frombuffer(buf, dtype=torch.uint8)
        r = pin_host_memory(t, row_bytes=1 << 20, chunk_bytes=chunk, threads=threads, strict=True)
        out[label] = r.seconds
        log(f"pinning {nbytes / 2**30:.0f} GiB of untouched memory ({label}): {r.seconds:.2f} s "
            f"(mapped at the host address: {r.mapped_same_address})")
        if label != "single":
            dev = torch.empty(2 << 20, dtype=torch.uint8, device=device)
            src = t[(1 << 30) - (1 << 20) : (1 << 30) + (1 << 20)]
            src.view(torch.int32).random_()
            try:
                stream = torch.cuda.Stream(device)
                BatchMemcpy.get()(np.array([dev.data_ptr()]), np.array([src.data_ptr()]), np.array([2 << 20]),
                                  stream.cuda_stream, device.index)
                stream.synchronize()
                out["straddle_copy"] = "ok" if torch.equal(dev.cpu(), src) else "wrong bytes"
            except Exception as exc:
                out["straddle_copy"] = f"error: {exc}"
            log(f"pinning: one cuMemcpyBatchAsync copy straddling two registered chunks: {out['straddle_copy']}")
        r.unpin()
        del t
        buf.close()
    return out


def bench_batch_sizes(device, host: HostBuffer, args) -> list[dict]:
    """cuMemcpyBatchAsync alone: 1 GiB as copies of one size between scattered pinned-host offsets and
    a contiguous device buffer, one way and both ways at once (each direction issued by its own thread)."""
    from dynamo_flexkv.transfer.cuda.batch_memcpy import BatchMemcpy

    batch = BatchMemcpy.get()
    total = 1 << 30
    dev = [torch.empty(total, dtype=torch.uint8, device=device) for _ in range(2)]
    hbase = [host.tensor.data_ptr(), host.tensor.data_ptr() + total]
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]
    rng = np.random.default_rng(3)
    rows = []
    for size, flags in ((16 << 10, 1), (32 << 10, 1), (32 << 10, 0), (64 << 10, 1), (256 << 10, 1), (1 << 20, 1),
                        (2 << 20, 1), (2 << 20, 0), (16 << 20, 1)):
        n = total // size
        plans = []
        for d in range(2):
            host_off = hbase[d] + rng.permutation(n).astype(np.int64) * size
            dev_off = dev[d].data_ptr() + np.arange(n, dtype=np.int64) * size
            plans.append((host_off, dev_off))
        sizes = np.full(n, size, dtype=np.int64)

        def issue(d, to_host):
            host_off, dev_off = plans[d]
            dst, src = (host_off, dev_off) if to_host else (dev_off, host_off)
            for i in range(0, n, 2048):
                batch(dst[i : i + 2048], src[i : i + 2048], sizes[i : i + 2048], streams[d].cuda_stream, device.index,
                      flags)

        def both():
            th = threading.Thread(target=issue, args=(1, False))
            th.start()
            issue(0, True)
            th.join()

        t_d2h = median_time(lambda: issue(0, True), device, 3)
        t_h2d = median_time(lambda: issue(0, False), device, 3)
        t_both = median_time(both, device, 3)
        row = {"size": size, "flags": flags, "d2h": total / t_d2h / GB, "h2d": total / t_h2d / GB,
               "both": 2 * total / t_both / GB}
        rows.append(row)
        log(f"batch memcpy {size >> 10:>6} KiB copies (flags {flags}): D2H {row['d2h']:.1f}  H2D {row['h2d']:.1f}  "
            f"both {row['both']:.1f} GB/s")
    del dev
    return rows


# --------------------------------------------------------------------------------------------------


def environment(device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "no_batch_memcpy": not load_settings().cuda_batch_memcpy}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import triton

            env["triton"] = triton.__version__
        except Exception as exc:
            env["triton"] = f"unavailable ({exc})"
        try:
            import cuda.bindings

            env["cuda-bindings"] = getattr(cuda.bindings, "__version__", "present")
        except Exception:
            env["cuda-bindings"] = "absent"
        from dynamo_flexkv.transfer.cuda.pinning import CudaDriver
        from dynamo_flexkv.transfer.cuda.batch_memcpy import BatchMemcpy

        env["driver_cuda_version"] = CudaDriver.get().version
        env["cuMemcpyBatchAsync"] = BatchMemcpy.get() is not None
        env["shm_free_gib"] = round(shutil.disk_usage("/dev/shm").free / 2**30, 1) if Path("/dev/shm").is_dir() else 0
    return env


def fmt_table(peak, rows, inter, overlap, device, busy=()) -> str:
    lim = "pinned memcpy" if device.type == "cuda" else "contiguous torch copy"
    out = [f"Physical limit ({lim}, same run): H2D {peak['h2d']:.1f} GB/s, D2H {peak['d2h']:.1f} GB/s, "
           f"both at once {peak['both']:.1f} GB/s", "",
           "| model | GiB / transfer | method | D2H GB/s (x peak) | H2D GB/s (x peak) | both GB/s (x peak) | H2D layer-wise GB/s (x peak) | call returns after ms |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        layerwise = f"{r['h2d_layerwise']:.1f} ({r['h2d_layerwise_ratio']:.2f})" if r["h2d_layerwise"] > 0 else "n/a"
        out.append(f"| {r['model']} | {r['bytes'] / 2**30:.2f} | {r['method']} | {r['d2h']:.1f} ({r['d2h_ratio']:.2f}) | "
                   f"{r['h2d']:.1f} ({r['h2d_ratio']:.2f}) | {r['both']:.1f} ({r['both_ratio']:.2f}) | "
                   f"{layerwise} | {r['enqueue_ms']:.1f} |")
    if inter:
        out += ["", "| method | matmul alone ms | matmul during transfers ms | compute slowdown | transfers GB/s alone / during |",
                "|---|---|---|---|---|"]
        for r in inter:
            out.append(f"| {r['method']} | {r['matmul_alone_ms']:.1f} | {r['matmul_with_ms']:.1f} | "
                       f"{r['slowdown_pct']:+.1f}% | {r['transfer_alone_gbs']:.1f} / {r['transfer_with_gbs']:.1f} |")
    if overlap:
        out += ["", "| method | load ms (layer by layer) | forward ms | load, then forward ms | layer-wise ms | ideal ms | hidden |",
                "|---|---|---|---|---|---|---|"]
        for r in overlap:
            out.append(f"| {r['method']} | {r['load_ms']:.1f} ({r['load_layerwise_ms']:.1f}) | {r['compute_ms']:.1f} | {r['sequential_ms']:.1f} | "
                       f"{r['layerwise_ms']:.1f} | {r['ideal_ms']:.1f} | {100 * r['hidden_frac']:.0f}% |")
    if busy:
        out += ["", "| method | prefix tokens | transfer | caller | ms (min-max) | x memcpy | call returns after ms |",
                "|---|---|---|---|---|---|---|"]
        for r in busy:
            out.append(f"| {r['method']} | {r['tokens']} | {r['kind']} | {r['caller']} | {r['ms']:.1f} "
                       f"({r['min_ms']:.1f}-{r['max_ms']:.1f}) | {r['ratio']:.2f} | {r['returns_ms']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--blocks", type=int, default=None, help="blocks per transfer (default 1024 on CUDA, 64 on CPU)")
    p.add_argument("--models", default=None, help="comma list of " + ",".join(MODELS))
    p.add_argument("--layers", type=int, default=4, help="layers per model on CPU (small sizes)")
    p.add_argument("--methods", default=None,
                   help="comma list: staged[:MiB], batch, zerocopy[:ctas], torch, legacy (default: all on CUDA)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--peak-mib", type=int, default=None, help="bytes of the contiguous limit copy")
    p.add_argument("--prefix-tokens", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--pin-test-gib", type=int, default=4)
    p.add_argument("--interference-methods", default=None)
    p.add_argument("--overlap-methods", default=None)
    p.add_argument("--busy-methods", default="staged/issue=thread,staged/issue=caller")
    p.add_argument("--skip", default="",
                   help="comma list of: checks,throughput,interference,overlap,pinning,batch-sizes,busy-host")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write every number here")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available() and args.device != "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    args.blocks = args.blocks or (1024 if cuda else 64)
    args.reps = args.reps or 3
    args.prefix_tokens = args.prefix_tokens or (32768 if cuda else 2048)
    args.new_tokens = args.new_tokens or (4096 if cuda else 64)
    model_names = (args.models or ("llama-16,llama-128,mla-16" if cuda else "llama-16,mla-16")).split(",")
    specs = (args.methods or ("staged,batch,zerocopy,zerocopy/ctas=32,legacy" if cuda else "cpu")).split(",")
    skip = set(filter(None, args.skip.split(",")))
    if not cuda:
        skip |= {"interference", "pinning", "batch-sizes", "busy-host"}
    env = environment(device)
    log("environment: " + json.dumps(env))

    results: dict = {"env": env, "args": vars(args)}
    peak_bytes = (args.peak_mib or (1024 if cuda else 256)) << 20
    peak = measure_peak(device, peak_bytes, args.reps)
    results["peak"] = peak
    log(f"limit ({'pinned memcpy' if cuda else 'contiguous copy'}, {peak_bytes >> 20} MiB): H2D {peak['h2d']:.1f} GB/s, "
        f"D2H {peak['d2h']:.1f} GB/s, both {peak['both']:.1f} GB/s")

    check_specs = [s for s in specs if s.split("/")[0] != "legacy" and "ctas" not in s] + ["torch"] if cuda else ["cpu"]
    if "checks" not in skip:
        try:
            n_cases, failures = run_checks(device, check_specs, args)
        except Exception as exc:
            import traceback

            traceback.print_exc()
            n_cases, failures = 0, [f"checks crashed: {exc}"]
        results["check_failures"] = failures
        log(f"correctness: {n_cases} layouts x {len(check_specs)} methods: "
            f"{'all bit-exact' if not failures else str(len(failures)) + ' FAILURES'}")
    if "pinning" not in skip:
        try:
            results["pinning"] = bench_pinning(device, args)
        except Exception as exc:
            log(f"pinning experiment failed: {exc}")

    models = [MODELS[m] for m in model_names]
    if not cuda:
        models = [Model(m.name, min(m.layers, args.layers), m.kind, m.block_size) for m in models]
    host = None
    if cuda and not {"throughput", "interference", "overlap", "batch-sizes", "busy-host"} <= skip:
        need = max(PoolGeometry(2 * args.blocks, m.shard_bytes, 1).total_bytes for m in models)
        need = max(need, PoolGeometry(max(args.prefix_tokens, 32768) // 16, MODELS["llama-16"].shard_bytes, 1).total_bytes)
        host = HostBuffer(need, cuda=True)
        log(f"host pool buffer: {need / 2**30:.1f} GiB ({'shm' if host.path else 'anonymous'}), "
            f"pinned in {host.pin_seconds:.1f} s")
    rows, inter, overlap, busy = [], [], [], []

    def section(name, fn):
        try:
            return fn()
        except Exception as exc:  # keep the other sections' numbers
            import traceback

            traceback.print_exc()
            log(f"{name} FAILED: {type(exc).__name__}: {exc}")
            return []

    try:
        if "batch-sizes" not in skip and cuda:
            results["batch_sizes"] = section("batch sizes", lambda: bench_batch_sizes(device, host, args))
        if "throughput" not in skip:
            for model in models:
                rows += section(f"throughput {model.name}", lambda: bench_model(model, device, host, specs, args, peak))
        if "interference" not in skip:
            inter = section("interference", lambda: bench_interference(
                device, host, (args.interference_methods or "staged,batch,zerocopy,zerocopy/ctas=32").split(","), args))
        if "overlap" not in skip:
            ov_specs = (args.overlap_methods or ("staged,staged/lbufs=2,batch,zerocopy" if cuda else "cpu")).split(",")
            overlap = section("overlap", lambda: bench_overlap(device, host, ov_specs, args))
        if "busy-host" not in skip:
            busy = section("busy host", lambda: bench_busy_host(device, host, args.busy_methods.split(","), args, peak))
    finally:
        if host is not None:
            host.close()
    results.update(rows=rows, interference=inter, overlap=overlap, busy_host=busy)
    if args.json:  # first: a formatting problem must not lose the numbers
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    table = fmt_table(peak, rows, inter, overlap, device, busy)
    print("\n" + table + "\n", flush=True)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 1 if results.get("check_failures") else 0


if __name__ == "__main__":
    sys.exit(main())
