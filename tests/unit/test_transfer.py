"""Block copies between vLLM-shaped KV caches and the CPU pool, through the public copier API (CPU).

CI has no GPU: the CUDA primitive's correctness runs in benchmarks/transfer.py on the device; here its
address planning (the part every CUDA method shares) runs against host memory with memmove.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from dynamo_flexkv.storage.cpu.pool import CpuBlockPool
from dynamo_flexkv.storage.layout import KVCacheLayout, PoolGeometry
from dynamo_flexkv.transfer.cuda.pinning import PinningError, pin_host_memory
from dynamo_flexkv.transfer.host import BlockCopier, ThreadedBlockCopier
from dynamo_flexkv.transfer.copier import Copier, make_copier
from dynamo_flexkv.transfer.cuda.segments import (
    SegmentTable,
    coalesce,
    group_layers,
    layer_segment_ranges,
    memmove_entries,
)
from dynamo_flexkv.transfer.layerwise import (
    CudaLayerwiseLoad,
    LayerwiseLoad,
    TransferHandle,
    start_layerwise_load,
    start_load,
    start_save,
)

NUM_BLOCKS = 40
LAYERS = 3
HEADS, HEAD_DIM = 2, 8


def _random_bytes(nbytes: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen)


def _shape(kind: str, block_size: int, num_blocks: int = NUM_BLOCKS) -> tuple[int, ...]:
    return {
        "cpu": (num_blocks, HEADS, block_size, 2 * HEAD_DIM),  # CPU attention [num_blocks, heads, bs, k+v]
        "nhd": (2, num_blocks, block_size, HEADS, HEAD_DIM),  # CUDA attention K/V planes
        "hnd": (2, num_blocks, HEADS, block_size, HEAD_DIM),  # the HND variant, as stored
        "mla": (num_blocks, block_size, 36),  # MLA latent (576 in real models)
    }[kind]


def make_caches(kind: str, block_size: int, separate: bool, seed: int) -> dict[str, torch.Tensor]:
    """Per-layer bf16 KV tensors: views of one buffer (vLLM's usual allocation) or separate tensors."""
    gen = torch.Generator().manual_seed(seed)
    shape = _shape(kind, block_size)
    numel = int(np.prod(shape))
    if separate:
        return {f"l{i}": _random_bytes(2 * numel, gen).view(torch.bfloat16).view(shape) for i in range(LAYERS)}
    raw = _random_bytes(2 * numel * LAYERS, gen).view(torch.bfloat16)
    return {f"l{i}": raw[i * numel : (i + 1) * numel].view(shape) for i in range(LAYERS)}


def expected_shard(caches: dict[str, torch.Tensor], block: int) -> torch.Tensor:
    """The slot format, independently of KVCacheLayout: layers in order, K plane before V plane."""
    parts = []
    for t in caches.values():
        planes = [t[0, block], t[1, block]] if t.shape[0] == 2 and t.shape[1] == NUM_BLOCKS else [t[block]]
        parts += [p.contiguous().view(torch.uint8).flatten() for p in planes]
    return torch.cat(parts)


LAYOUTS = [
    ("cpu", 16, False),
    ("nhd", 16, False),
    ("hnd", 16, False),
    ("mla", 16, False),
    ("nhd", 16, True),
    ("mla", 16, True),
    ("cpu", 128, True),
    ("nhd", 128, False),
]


@pytest.fixture
def pool_factory(tmp_path):
    pools = []

    def make(geometry: PoolGeometry) -> CpuBlockPool:
        pool = CpuBlockPool(f"dynamo-flexkv-test-transfer-{len(pools)}", geometry, shm_dir=tmp_path)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.unlink()


@pytest.mark.parametrize("kind,block_size,separate", LAYOUTS)
@pytest.mark.parametrize("world,rank", [(1, 0), (2, 1)])
def test_round_trip_bit_exact(pool_factory, kind, block_size, separate, world, rank):
    caches = make_caches(kind, block_size, separate, seed=hash((kind, block_size, separate, rank)) % 1000)
    layout = KVCacheLayout(caches, NUM_BLOCKS)
    assert (layout.stacked is None) == separate
    geometry = PoolGeometry(24, layout.shard_bytes, world)
    pool = pool_factory(geometry)
    copier = make_copier(layout, pool.tensor, geometry, rank)
    assert type(copier) is BlockCopier and isinstance(copier, Copier)
    rng = np.random.default_rng(7)
    perm = rng.permutation(NUM_BLOCKS)
    src, dst = perm[:12].tolist(), perm[12:24].tolist()
    slots = rng.permutation(geometry.num_slots)[:12].tolist()

    assert copier.save(src, slots) == 12 * layout.shard_bytes
    start = rank * geometry.shard_stride
    for b, s in zip(src, slots):
        assert torch.equal(pool.tensor[s, start : start + layout.shard_bytes], expected_shard(caches, b))

    for seg in layout.segments:
        seg[dst] = 0xA5  # poison: every byte must be rewritten
    assert copier.load(slots, dst) == 12 * layout.shard_bytes
    for b_src, b_dst in zip(src, dst):
        assert torch.equal(expected_shard(caches, b_src), expected_shard(caches, b_dst))


@pytest.mark.parametrize("kind,block_size,separate", LAYOUTS)
def test_cuda_plans_match_cpu_primitive(pool_factory, kind, block_size, separate):
    """The CUDA methods' address plans, executed with memmove on host memory, against BlockCopier."""
    caches = make_caches(kind, block_size, separate, seed=3)
    layout = KVCacheLayout(caches, NUM_BLOCKS)
    geometry = PoolGeometry(20, layout.shard_bytes, 2)
    ref_pool, batch_pool, staged_pool = (pool_factory(geometry) for _ in range(3))
    rng = np.random.default_rng(11)
    perm = rng.permutation(NUM_BLOCKS)
    src, dst, slots = perm[:10], perm[10:20], rng.permutation(20)[:10]
    BlockCopier(layout, ref_pool.tensor, geometry, 1).save(src.tolist(), slots.tolist())
    num_segments = len(layout.segments)

    # "batch" / "zerocopy": one copy per (block, segment), adjacent ones coalesced
    table = SegmentTable.build(layout, batch_pool.tensor, geometry, 1)
    blocks, slot_arr = table.pairs(src, slots)
    memmove_entries(*coalesce(*table.segment_entries(True, blocks, slot_arr, 0, num_segments)))
    assert torch.equal(batch_pool.tensor, ref_pool.tensor)
    for seg in layout.segments:
        seg[dst.tolist()] = 0xA5
    for lo, hi in layer_segment_ranges(layout):  # a layer-wise load
        memmove_entries(*coalesce(*table.segment_entries(False, dst, slot_arr, lo, hi)))
    for b_src, b_dst in zip(src.tolist(), dst.tolist()):
        assert torch.equal(expected_shard(caches, b_src), expected_shard(caches, b_dst))

    # "staged": packed rows (all layers for a save; one layer at a time for a layer-wise load) <-> slots
    table = SegmentTable.build(layout, staged_pool.tensor, geometry, 1)
    idx = torch.from_numpy(src)
    rows = torch.cat([seg.index_select(0, idx) for seg in layout.segments], dim=1)  # the on-GPU gather
    memmove_entries(*coalesce(*table.row_entries(True, rows.data_ptr(), slot_arr, 0, num_segments)))
    assert torch.equal(staged_pool.tensor, ref_pool.tensor)
    for seg in layout.segments:
        seg[dst.tolist()] = 0x5A
    for lo, hi in layer_segment_ranges(layout):
        row_bytes = int(table.seg_row_off[hi] - table.seg_row_off[lo])
        rows = torch.full((slot_arr.size, row_bytes), 0xEE, dtype=torch.uint8)
        memmove_entries(*coalesce(*table.row_entries(False, rows.data_ptr(), slot_arr, lo, hi)))
        off = 0
        for s in range(lo, hi):  # the on-GPU scatter
            n = layout.segment_bytes[s]
            layout.segments[s].index_copy_(0, torch.from_numpy(dst), rows[:, off : off + n])
            off += n
    for b_src, b_dst in zip(src.tolist(), dst.tolist()):
        assert torch.equal(expected_shard(caches, b_src), expected_shard(caches, b_dst))


def test_plan_rejects_out_of_range_ids(pool_factory):
    caches = make_caches("nhd", 16, False, seed=1)
    layout = KVCacheLayout(caches, NUM_BLOCKS)
    geometry = PoolGeometry(8, layout.shard_bytes, 1)
    table = SegmentTable.build(layout, pool_factory(geometry).tensor, geometry, 0)
    with pytest.raises(IndexError):
        table.pairs([NUM_BLOCKS], [0])
    with pytest.raises(IndexError):
        table.pairs([0], [8])
    with pytest.raises(ValueError):
        table.pairs([0, 1], [0])


def test_coalesce_merges_runs_and_respects_barriers():
    size = np.array([4, 4, 4, 4], dtype=np.int64)
    src = np.array([0, 4, 8, 100], dtype=np.int64)
    dst = np.array([50, 54, 58, 62], dtype=np.int64)
    d, s, n = coalesce(dst, src, size)
    assert d.tolist() == [50, 62] and s.tolist() == [0, 100] and n.tolist() == [12, 4]
    d, s, n = coalesce(dst, src, size, barrier=np.array([0, 0, 1, 1]))
    assert n.tolist() == [8, 4, 4]
    d, s, n = coalesce(dst[:3], src[:3], size[:3])
    assert n.tolist() == [12]


def test_layer_segment_ranges():
    for kind, per_layer in (("nhd", 2), ("cpu", 1), ("mla", 1)):
        layout = KVCacheLayout(make_caches(kind, 16, False, seed=0), NUM_BLOCKS)
        assert layer_segment_ranges(layout) == [(i * per_layer, (i + 1) * per_layer) for i in range(LAYERS)]


def test_group_layers_reaches_min_row_bytes():
    # MLA-like: 18 KiB per layer and block -> groups of 4 layers (72 KiB); a short tail joins the last
    segs = [(i, i + 1) for i in range(10)]
    off = np.arange(11, dtype=np.int64) * (18 << 10)
    groups = group_layers(segs, off, 64 << 10)
    assert [g[2] for g in groups] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9]]
    assert [(g[0], g[1]) for g in groups] == [(0, 4), (4, 10)]
    assert [g[2] for g in group_layers(segs[:8], off[:9], 64 << 10)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [g[2] for g in group_layers(segs[:2], off[:3], 64 << 10)] == [[0, 1]]
    # K/V planes of 32 KiB each: a layer is already 64 KiB -> one layer per group
    segs = [(2 * i, 2 * i + 2) for i in range(4)]
    off = np.arange(9, dtype=np.int64) * (32 << 10)
    assert [g[2] for g in group_layers(segs, off, 64 << 10)] == [[0], [1], [2], [3]]


def test_layerwise_api_on_cpu(pool_factory):
    caches = make_caches("cpu", 16, False, seed=5)
    layout = KVCacheLayout(caches, NUM_BLOCKS)
    geometry = PoolGeometry(16, layout.shard_bytes, 1)
    copier = make_copier(layout, pool_factory(geometry).tensor, geometry, 0)
    src, dst, slots = [1, 5, 9], [2, 6, 10], [3, 0, 7]

    save = start_save(copier, src, slots)
    assert isinstance(save, TransferHandle) and save.done()
    assert save.synchronize() == 3 * layout.shard_bytes
    save.wait()  # no-op on CPU

    for seg in layout.segments:
        seg[dst] = 0
    load = start_layerwise_load(copier, slots, dst)
    assert isinstance(load, LayerwiseLoad)
    assert load.num_layers == LAYERS
    # on CPU the whole copy happened at start: every layer has landed already
    for b_src, b_dst in zip(src, dst):
        assert torch.equal(expected_shard(caches, b_src), expected_shard(caches, b_dst))
    for i in range(LAYERS):
        load.wait_layer(i)
        load.wait_layer(i, host=True)
    with pytest.raises(IndexError):
        load.wait_layer(LAYERS)
    with pytest.raises(IndexError):
        load.wait_layer(-1)
    assert load.done()
    assert load.wait_all() == 3 * layout.shard_bytes
    assert load.synchronize() == 3 * layout.shard_bytes

    whole = start_load(copier, slots, dst)
    assert whole.done() and whole.synchronize() == 3 * layout.shard_bytes
    empty = start_layerwise_load(copier, [], [])
    assert empty.wait_all() == 0


class FakeEvent:
    """Stands in for torch.cuda.Event on the CPU build (host-side waits only)."""

    def __init__(self):
        self.recorded = threading.Event()

    def record(self, stream=None):
        self.recorded.set()

    def query(self):
        return self.recorded.is_set()

    def synchronize(self):
        assert self.recorded.wait(5)


def test_cuda_layerwise_handle_protocol():
    """What the CUDA copier's issuing thread and the forward pass do with a layer-wise handle."""
    handle = CudaLayerwiseLoad(300, 3, torch.device("cpu"), event_factory=FakeEvent)
    assert handle.num_layers == 3 and not handle.done()
    waited = []

    def forward():
        for i in range(3):
            handle.wait_layer(i, host=True)  # blocks until layer i is issued, then until it landed
            waited.append(i)

    th = threading.Thread(target=forward)
    th.start()
    for i in range(3):
        time.sleep(0.02)
        assert waited == list(range(i))  # the forward never runs ahead of the issuing
        handle._layer_event(i).record()
        handle._set_layer_issued(i)
        time.sleep(0.02)
    th.join(5)
    assert waited == [0, 1, 2]
    final = FakeEvent()
    handle._set_issued(final)
    assert not handle.done()
    final.record()
    assert handle.done() and handle.synchronize() == 300 and handle.wait_all(host=True) == 300


def test_cuda_layerwise_handle_failure_releases_waiters():
    handle = CudaLayerwiseLoad(300, 4, torch.device("cpu"), event_factory=FakeEvent)
    th = threading.Thread(target=lambda: handle.wait_layer(2))
    th.start()
    handle._set_failed(RuntimeError("driver said no"))
    th.join(5)
    assert not th.is_alive()
    assert handle.done() and isinstance(handle.error, RuntimeError)
    handle.wait_layer(3)  # returns (nothing to order against); the caller checks done()/error
    with pytest.raises(RuntimeError, match="driver said no"):
        handle.synchronize()


def test_pinning_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-build behaviour")
    t = torch.empty(1 << 16, dtype=torch.uint8)
    assert pin_host_memory(t) is None
    with pytest.raises(PinningError):
        pin_host_memory(t, strict=True)


def test_vllm_permuted_hnd_view_round_trip(pool_factory):
    """vLLM registers HND caches as a permutation of the NHD shape over HND-ordered memory."""
    gen = torch.Generator().manual_seed(9)
    phys = (2, NUM_BLOCKS, HEADS, 16, HEAD_DIM)
    numel = int(np.prod(phys))
    raw = _random_bytes(2 * numel * LAYERS, gen).view(torch.bfloat16)
    caches = {f"l{i}": raw[i * numel : (i + 1) * numel].view(phys).permute(0, 1, 3, 2, 4) for i in range(LAYERS)}
    layout = KVCacheLayout(caches, NUM_BLOCKS)
    geometry = PoolGeometry(8, layout.shard_bytes, 1)
    copier = make_copier(layout, pool_factory(geometry).tensor, geometry, 0)
    copier.save([3, 4], [0, 1])
    before = [t[:, 3].clone() for t in caches.values()]
    copier.load([0, 1], [7, 8])
    # compare bits: random bytes viewed as bf16 include NaNs, which never compare equal
    assert all(torch.equal(b.view(torch.int16), t[:, 7].contiguous().view(torch.int16))
               for b, t in zip(before, caches.values()))


def test_threaded_copier_completes_after_the_call(pool_factory):
    """`cpu_async_copies`: transfers run on a background thread, in order, and report completion
    through the same handles as CUDA; a failed copy surfaces in synchronize(), never at the call."""
    caches = make_caches("cpu", 16, False, seed=6)
    layout = KVCacheLayout(caches, NUM_BLOCKS)
    geometry = PoolGeometry(16, layout.shard_bytes, 1)
    copier = make_copier(layout, pool_factory(geometry).tensor, geometry, 0, cpu_async=True)
    assert type(copier) is ThreadedBlockCopier and isinstance(copier, Copier)
    src, dst, slots = [1, 5, 9], [2, 6, 10], [3, 0, 7]
    gate = threading.Event()
    copier._thread.submit(gate.wait, 5)  # hold the copy thread: the next transfers must queue
    save = start_save(copier, src, slots)
    load = start_layerwise_load(copier, slots, dst)
    assert not save.done() and not load.done()
    gate.set()
    load.wait_layer(LAYERS - 1)  # a per-layer wait returns once the whole load landed
    assert save.done() and load.done()
    for b_src, b_dst in zip(src, dst):
        assert torch.equal(expected_shard(caches, b_src), expected_shard(caches, b_dst))
    assert save.synchronize() == load.synchronize() == 3 * layout.shard_bytes

    bad = start_save(copier, [NUM_BLOCKS + 5], [0])
    with pytest.raises(IndexError):
        bad.synchronize()
    copier.close()
