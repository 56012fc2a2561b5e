"""GPU <-> CPU-pool block copies at bus speed: the CUDA primitive behind `BlockCopier`'s interface.

`make_copier` (transfer/copier.py) returns a `CudaBlockCopier` when vLLM's KV cache lives on a CUDA
device. It keeps `BlockCopier`'s interface (`save(block_ids, slots)`, `load(slots, block_ids)`,
`block_bytes`; blocking, returning bytes moved) and adds asynchronous forms (`save_async`,
`load_async`, `load_layerwise`; handles in transfer/layerwise.py).

A transfer of n (block, slot) pairs touches n x S *segments* (S = segments per block: one per layer,
or two per layer for K/V planes). Every method plans them as numpy arrays of addresses (`SegmentTable`;
no Python loop over blocks or layers) and executes them as a few large operations on side streams,
ordered after the caller's current (compute) stream by an event recorded at call time. The compute
stream never waits for a save.

Who issues the operations (`issue=`, the setting `cuda_issue`; one of ISSUE_MODES):
- "caller" (default): the calling thread, before the call returns (a 4 GiB load: ~7 ms).
- "thread": one background thread per direction (`_Issuer`), so the call returns at once. Every torch
  and driver call of the issue loop releases the GIL, and the thread must win it back each time;
  while the engine thread runs Python (vLLM's step loop, an eager forward), each win waits out
  Python's 5 ms switch interval: a 4 GiB load that takes 79 ms with an idle caller took 3.1 s
  (`benchmarks/transfer.py`, busy host). In vLLM the thread mode gave the longer TTFT, and
  the same decode speed once a step's saves are one transfer (docs/gpu.md).
- "caller-loads": loads by the caller, saves by the thread.
Issuing tens of thousands of small copies (the "batch" method, or layer rows of scattered slots)
blocks the issuing thread until the GPU has worked through most of them; the staged method issues
a layer's rows over consecutive slots as one 2D copy, so a 32k-token layer-wise load is issued in
~8 ms.

Methods (`method=`, the setting `cuda_copy_method`; docs/gpu-data-plane.md has every figure):
- "staged" (default): a Triton gather of a chunk of blocks (all layers; one layer group for a
  layer-wise load) into a 64 MiB device staging buffer, then one `cuMemcpyBatchAsync` of whole rows
  into the pinned pool slots, and the reverse (copy, then scatter) for loads. A ring of staging
  buffers (2 for saves, 4 for loads) on two side streams per direction hides the HBM-speed
  gather/scatter under the PCIe copy. Copy engines do the PCIe work: 0.93-1.00 of pinned memcpy each
  way and 0.93-1.00 of the bidirectional peak, with no measurable slowdown of concurrent matmuls.
- "batch": one `cuMemcpyBatchAsync` entry per (block, segment) straight between the paged cache and
  the pool (adjacent entries coalesced). No staging, no SM work, but copies under ~256 KiB run below
  bus speed (0.35-0.72 for 32 KiB / 18 KiB segments); at bus speed only for 128-token blocks.
- "zerocopy": the Triton kernel reads the paged cache and writes the host-mapped pinned pool directly
  over PCIe (and the reverse), on a persistent grid of `max_programs` CTAs: 0.87-0.95 each way, but it
  holds SMs for the whole transfer (concurrent matmuls took 3.4x as long).
- "torch": BlockCopier's own index_select / index_copy_ path through pageable memory (0.02-0.07).
  Used when the pool could not be pinned.

`cuMemcpyBatchAsync` (CUDA >= 12.8 driver) is called through ctypes on libcuda (batch_memcpy.py). On
an older driver, or with the setting `cuda_batch_memcpy` off, "staged" and "batch" issue one
`cuMemcpyAsync` per (coalesced) copy instead. The plans are built in segments.py.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

import numpy as np
import torch

from dynamo_flexkv.storage.layout import KVCacheLayout, PoolGeometry
from dynamo_flexkv.transfer.cuda.batch_memcpy import BatchMemcpy, memcpy_2d_async, memcpy_each_async
from dynamo_flexkv.transfer.cuda.pinning import PinnedRegion, find_pinned_region, pin_host_memory
from dynamo_flexkv.transfer.cuda.segments import SegmentTable, coalesce, group_layers, layer_segment_ranges
from dynamo_flexkv.transfer.host import BlockCopier
from dynamo_flexkv.transfer.layerwise import CudaLayerwiseLoad, CudaTransferHandle

logger = logging.getLogger(__name__)

METHODS = ("staged", "batch", "zerocopy", "torch")
# Fastest first, as measured on the lent H200 (docs/gpu-data-plane.md); the first available one wins.
PREFERRED_METHODS = ("staged", "batch", "zerocopy", "torch")
ISSUE_MODES = ("caller", "thread", "caller-loads")  # the setting cuda_issue (config.CudaIssue)
DEFAULT_STAGING_BYTES = 64 << 20  # per buffer; two per direction
DEFAULT_MAX_BATCH = 2048  # copies per cuMemcpyBatchAsync call
# A layer-wise load moves one layer's bytes of every block as one row per block. Host-to-device copies
# under ~32 KiB fall off a cliff on the lent H200 (16 KiB copies: 3.5 GB/s; 64 KiB: 50 GB/s), so
# layers whose rows are smaller (MLA: 18 KiB per 16-token block) are loaded in groups; every layer of
# a group becomes ready together.
LAYER_GROUP_MIN_BYTES = 64 << 10
# runs of at least this many consecutive slots are copied as one 2D copy (staged method)
MIN_2D_RUN = 8


def _triton_kernels():
    try:
        from dynamo_flexkv.transfer.cuda import kernels
    except Exception as exc:  # no Triton (or it cannot compile here): the copy-engine methods remain
        logger.info("Triton kernels unavailable: %s", exc)
        return None
    return kernels


# --------------------------------------------------------------------------------------------------
# The copier


class _Issuer:
    """A thread that issues one direction's copies, so that callers never block on the driver's queue
    (issuing gigabytes of copies blocks the issuing thread until the GPU has worked through most of
    them)."""

    def __init__(self, name: str, device_index: int):
        self._device_index = device_index
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn) -> None:
        self._queue.put(fn)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        torch.cuda.set_device(self._device_index)
        while (fn := self._queue.get()) is not None:
            fn()


class _Ring:
    """Staging buffers for one direction, reused in turn; each carries its 'ready' and 'free' events."""

    def __init__(self, count: int, nbytes: int, device: torch.device):
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(count)]
        self.ready = [torch.cuda.Event() for _ in range(count)]
        self.free = [torch.cuda.Event() for _ in range(count)]
        self.turn = 0

    def next(self) -> int:
        i = self.turn
        self.turn = (self.turn + 1) % len(self.bufs)
        return i


class CudaBlockCopier(BlockCopier):
    """Batched block copies between a CUDA paged KV cache and this rank's region of the pinned pool."""

    def __init__(
        self,
        layout: KVCacheLayout,
        pool: torch.Tensor,
        geometry: PoolGeometry,
        rank: int,
        *,
        method: str = "auto",
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        staging_buffers: int = 2,
        load_staging_buffers: int = 4,
        max_programs: int | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        load_priority: int = -100,
        pin: bool = True,
        issue: str = "caller",
        batch_memcpy: bool = True,
    ):
        if layout.device.type != "cuda":
            raise ValueError(f"CudaBlockCopier needs a KV cache on a CUDA device, got {layout.device}")
        if issue not in ISSUE_MODES:
            raise ValueError(f"issue={issue!r}: choose one of {ISSUE_MODES}")
        super().__init__(layout, pool, geometry, rank)
        self.device = layout.device
        self.device_index = layout.device.index if layout.device.index is not None else torch.cuda.current_device()
        self.geometry = geometry
        self.pool = pool
        self.table = SegmentTable.build(layout, pool, geometry, rank)
        self.layer_segments = layer_segment_ranges(layout)
        self.num_layers = len(self.layer_segments)
        self.num_segments = len(layout.segments)

        self.pinned: PinnedRegion | None = find_pinned_region(pool.data_ptr(), pool.numel())
        if self.pinned is None and pin:
            self.pinned = pin_host_memory(pool, device=self.device)
        self._batch = BatchMemcpy.get() if batch_memcpy else None
        self._tk = _triton_kernels()
        self._kernel_ok = self._tk is not None and self._kernel_layout_ok()
        if self._kernel_ok:
            self._prepare_kernel_tables(max_programs)
        self.method = self._resolve_method(method)

        self._save_copy = torch.cuda.Stream(self.device)
        self._load_copy = torch.cuda.Stream(self.device)
        self._save_dev = torch.cuda.Stream(self.device)
        # a load's scatter is what the forward pass waits for: let its CTAs go first
        self._load_dev = torch.cuda.Stream(self.device, priority=load_priority)
        self._staging_bytes = max(int(staging_bytes), int(self.table.seg_row_off[-1]))
        # a load's scatter waits for SMs behind the forward's kernels: a deeper ring keeps its copies going
        self._ring_depth = {True: max(2, int(staging_buffers)), False: max(2, int(load_staging_buffers))}
        self.layer_groups = group_layers(self.layer_segments, self.table.seg_row_off, LAYER_GROUP_MIN_BYTES)
        self._max_batch = max(1, int(max_batch))
        self.issue = issue
        # direction (True: saves) -> its issuing thread; a direction without one is issued by the caller
        threaded = {"caller": (), "thread": (True, False), "caller-loads": (True,)}[issue]
        self._issuers = {to_pool: _Issuer(f"flexkv-{'save' if to_pool else 'load'}-issue-{rank}", self.device_index)
                         for to_pool in threaded}
        self._rings: dict[bool, _Ring] = {}
        # staging row ids 0..k-1 for the gather kernel, as many as the smallest per-layer row allows
        min_row = min(int(self.table.seg_row_off[hi] - self.table.seg_row_off[lo]) for lo, hi in self.layer_segments)
        self._arange = torch.arange(self._staging_bytes // min_row + 1, device=self.device)
        if self._kernel_ok and self.method in ("staged", "zerocopy"):
            self._warm_up_kernels()
        logger.info(
            "cuda copier rank %d: %d layers, %d segments, %d bytes per block, method %s, issue %s (pinned: %s, "
            "batch memcpy: %s, triton: %s)",
            rank, self.num_layers, self.num_segments, self.block_bytes, self.method, issue,
            self.pinned is not None, self._batch is not None, self._kernel_ok,
        )

    # ---- capability checks -------------------------------------------------------------------
    def _kernel_layout_ok(self) -> bool:
        t = self.table
        uniform = len(set(t.seg_bytes.tolist())) == 1
        aligned = all(int(x) % 16 == 0 for x in [*t.seg_addr, *t.seg_stride, *t.seg_bytes, t.pool_base, t.slot_bytes])
        return uniform and aligned

    def _prepare_kernel_tables(self, max_programs: int | None) -> None:
        t = self.table
        self._cache_base = int(t.seg_addr.min())
        as_dev = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64).to(self.device)  # noqa: E731
        self._k_seg_cache_off = as_dev((t.seg_addr - self._cache_base) // 4)
        self._k_seg_cache_stride = as_dev(t.seg_stride // 4)
        self._k_seg_row_off = as_dev(t.seg_row_off[:-1] // 4)
        self._k_seg_words = int(t.seg_bytes[0]) // 4
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._zc_programs = max_programs or 4 * sms  # zero-copy over PCIe: many loads in flight
        self._gather_programs = 4 * sms  # on-GPU gather/scatter (HBM speed, short)

    def available_methods(self) -> list[str]:
        out = []
        pinned = self.pinned is not None
        if pinned:  # without cuMemcpyBatchAsync (driver < 12.8), one cuMemcpyAsync per (coalesced) copy
            out.append("staged")
            out.append("batch")
        if pinned and self._kernel_ok and self.pinned.mapped_same_address:
            out.append("zerocopy")
        out.append("torch")
        return out

    def _resolve_method(self, method: str) -> str:
        available = self.available_methods()
        if method != "auto":
            if method not in METHODS:
                raise ValueError(f"unknown copy method {method!r}; choose one of {METHODS}")
            if method in available:
                return method
            logger.warning("copy method %s is not available here (available: %s)", method, available)
        if self.pinned is None:
            logger.warning("CPU pool is not pinned: GPU<->CPU copies run on the slow pageable path")
        return next(m for m in PREFERRED_METHODS if m in available)

    # ---- BlockCopier interface ---------------------------------------------------------------
    def save(self, block_ids: Sequence[int], slots: Sequence[int]) -> int:
        """vLLM cache -> pool; blocks until the bytes are in the pool. Returns bytes moved."""
        return self.save_async(block_ids, slots).synchronize()

    def load(self, slots: Sequence[int], block_ids: Sequence[int]) -> int:
        """Pool -> vLLM cache; blocks until the bytes are in the cache. Returns bytes moved."""
        return self.load_async(slots, block_ids).synchronize()

    # ---- asynchronous API --------------------------------------------------------------------
    def save_async(self, block_ids: Sequence[int], slots: Sequence[int]) -> CudaTransferHandle:
        """Cache -> pool, after the work already queued on the caller's current stream; returns at once."""
        blocks, slot_arr = self.table.pairs(block_ids, slots)
        handle = CudaTransferHandle(blocks.size * self.block_bytes, self.device)
        self._submit(handle, True, blocks, slot_arr, [(0, self.num_segments, [])])
        return handle

    def load_async(self, slots: Sequence[int], block_ids: Sequence[int]) -> CudaTransferHandle:
        """Pool -> cache, after the work already queued on the caller's current stream; returns at once."""
        blocks, slot_arr = self.table.pairs(block_ids, slots)
        handle = CudaTransferHandle(blocks.size * self.block_bytes, self.device)
        self._submit(handle, False, blocks, slot_arr, [(0, self.num_segments, [])])
        return handle

    def load_layerwise(self, slots: Sequence[int], block_ids: Sequence[int]) -> CudaLayerwiseLoad:
        """Pool -> cache layer by layer; layer i's event fires once its bytes landed. Returns at once."""
        blocks, slot_arr = self.table.pairs(block_ids, slots)
        handle = CudaLayerwiseLoad(blocks.size * self.block_bytes, self.num_layers, self.device)
        self._submit(handle, False, blocks, slot_arr, self.layer_groups)
        return handle

    def close(self) -> None:
        """Stop the issuing threads (after the work already submitted)."""
        for issuer in self._issuers.values():
            issuer.close()

    def _submit(self, handle, to_pool, blocks, slots, layer_groups) -> None:
        """`layer_groups`: `[(first_segment, end_segment, [layers that are ready once it landed])]`."""
        # ordered after whatever the caller queued so far (the forward that wrote the blocks, or
        # kernels that may still read the blocks a load overwrites)
        after = torch.cuda.Event()
        after.record(torch.cuda.current_stream(self.device))
        layerwise = isinstance(handle, CudaLayerwiseLoad)
        groups = [(lo, hi) for lo, hi, _ in layer_groups]

        def layer_done(g: int, stream: torch.cuda.Stream) -> None:
            if layerwise:
                for layer in layer_groups[g][2]:
                    handle._layer_event(layer).record(stream)
                    handle._set_layer_issued(layer)

        def issue() -> None:
            try:
                event, keep = self._enqueue(to_pool, blocks, slots, groups, layer_done, after)
                handle._set_issued(event, keep)
            except BaseException as exc:  # reported through the handle; never kills the thread
                logger.exception("issuing a %s of %d blocks failed", "save" if to_pool else "load", blocks.size)
                handle._set_failed(exc)

        issuer = self._issuers.get(to_pool)
        if issuer is None:
            issue()
        else:
            issuer.submit(issue)

    # ---- execution ---------------------------------------------------------------------------
    def _enqueue(self, to_pool, blocks, slots, groups, layer_done, after):
        stream = self._save_copy if to_pool else self._load_copy
        if blocks.size == 0 or self.method == "torch":
            return self._run_torch(to_pool, blocks, slots, len(groups), layer_done, after, stream), None
        if self.method == "staged":
            return self._run_staged(to_pool, blocks, slots, groups, layer_done, after)
        stream.wait_event(after)
        keep = self._device_indices(stream, blocks, slots) if self.method == "zerocopy" else None
        for g, (lo, hi) in enumerate(groups):
            if self.method == "batch":
                self._batch_entries(stream, *self.table.segment_entries(to_pool, blocks, slots, lo, hi))
            else:  # zerocopy
                with torch.cuda.stream(stream):
                    self._kernel(to_pool, keep[0], keep[1], lo, hi, self.table.pool_base, self.table.slot_bytes,
                                 0, self._zc_programs)
            layer_done(g, stream)
        done = torch.cuda.Event()
        done.record(stream)
        return done, keep

    def _run_torch(self, to_pool, blocks, slots, num_groups, layer_done, after, stream):
        """BlockCopier's own path (pageable pool): synchronous, then every event fires at once."""
        if blocks.size:
            after.synchronize()
            with torch.cuda.stream(stream):
                if to_pool:
                    BlockCopier.save(self, blocks.tolist(), slots.tolist())
                else:
                    BlockCopier.load(self, slots.tolist(), blocks.tolist())
        else:
            stream.wait_event(after)
        for g in range(num_groups):
            layer_done(g, stream)
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def _device_indices(self, stream, blocks, slots):
        with torch.cuda.stream(stream):
            pinned = torch.from_numpy(np.stack([blocks, slots])).pin_memory()
            both = pinned.to(self.device, non_blocking=True)
        return both[0], both[1], pinned

    def _pinned_chunks(self, dst, src):
        """Per copy, the pinned registration its pool side lies in (one copy never spans two);
        None when the pool is one registration."""
        if self.pinned is None or len(self.pinned.chunks) <= 1:
            return None
        # the pool side is whichever address lies inside the pinned region
        pool_side = np.where((dst >= self.pinned.ptr) & (dst < self.pinned.ptr + self.pinned.nbytes), dst, src)
        return (pool_side - self.pinned.ptr) // self.pinned.chunk_bytes

    def _batch_entries(self, stream, dst, src, size):
        dst, src, size = coalesce(dst, src, size, self._pinned_chunks(dst, src))
        if self._batch is None:
            memcpy_each_async(dst, src, size, stream.cuda_stream, self.device_index)
            return
        for i in range(0, size.size, self._max_batch):
            j = i + self._max_batch
            self._batch(dst[i:j], src[i:j], size[i:j], stream.cuda_stream, self.device_index)

    def _kernel(self, to_rows, cache_rows, row_ids, lo, hi, row_base, row_bytes, row_bias_bytes, programs,
                pair_begin=0, n_pairs=None):
        self._tk.kv_block_copy(
            cache_base=self._cache_base,
            row_base=row_base,
            cache_rows=cache_rows,
            row_ids=row_ids,
            pair_begin=pair_begin,
            n_pairs=n_pairs,
            seg_cache_off=self._k_seg_cache_off,
            seg_cache_stride=self._k_seg_cache_stride,
            seg_row_off=self._k_seg_row_off,
            row_words=row_bytes // 4,
            row_bias=row_bias_bytes // 4,
            seg_begin=lo,
            n_segs=hi - lo,
            seg_words=self._k_seg_words,
            to_rows=to_rows,
            max_programs=programs,
        )

    def _ring(self, to_pool: bool) -> _Ring:
        ring = self._rings.get(to_pool)
        if ring is None:
            ring = self._rings[to_pool] = _Ring(self._ring_depth[to_pool], self._staging_bytes, self.device)
        return ring

    def _gather_torch(self, to_rows, rows_t, lo, hi, buf_rows):
        """Fallback gather/scatter (no Triton): torch index ops on the segment views."""
        stacked = self.layout.stacked
        m = rows_t.numel()
        if stacked is not None:
            view = buf_rows.view(m, hi - lo, -1)
            if to_rows:
                torch.index_select(stacked[:, lo:hi], 0, rows_t, out=view)
            else:
                stacked[:, lo:hi].index_copy_(0, rows_t, view)
            return
        off = 0
        for s in range(lo, hi):
            n = int(self.table.seg_bytes[s])
            if to_rows:
                buf_rows[:, off : off + n].copy_(self.layout.segments[s].index_select(0, rows_t))
            else:
                self.layout.segments[s].index_copy_(0, rows_t, buf_rows[:, off : off + n])
            off += n

    def _run_staged(self, to_pool, blocks, slots, groups, layer_done, after):
        """Pipelined gather (GPU) + copy (copy engines) through two staging buffers per direction."""
        order = np.argsort(slots, kind="stable")  # consecutive slots -> mergeable copies
        blocks, slots = blocks[order], slots[order]
        ring = self._ring(to_pool)
        dev, copy = (self._save_dev, self._save_copy) if to_pool else (self._load_dev, self._load_copy)
        dev.wait_event(after)  # the gather reads, the scatter writes, the cache after queued compute
        with torch.cuda.stream(dev):
            pinned_idx = torch.from_numpy(blocks).pin_memory()
            rows_all = pinned_idx.to(self.device, non_blocking=True)
        keep = [rows_all, pinned_idx]
        t = self.table
        for g, (lo, hi) in enumerate(groups):
            row_bytes = int(t.seg_row_off[hi] - t.seg_row_off[lo])
            # equal units that each fit a staging buffer (no small trailing unit)
            units = -(-blocks.size * row_bytes // self._staging_bytes)
            per_unit = max(1, min(-(-blocks.size // units), self._staging_bytes // row_bytes))
            for p0 in range(0, blocks.size, per_unit):
                p1 = min(blocks.size, p0 + per_unit)
                i = ring.next()
                buf = ring.bufs[i]
                rows = buf[: (p1 - p0) * row_bytes].view(p1 - p0, row_bytes)
                if to_pool:
                    dev.wait_event(ring.free[i])
                    with torch.cuda.stream(dev):
                        self._stage(True, rows_all, p0, p1, lo, hi, rows, row_bytes)
                    ring.ready[i].record(dev)
                    copy.wait_event(ring.ready[i])
                    self._copy_rows(copy, True, buf.data_ptr(), slots[p0:p1], lo, hi)
                    ring.free[i].record(copy)
                else:
                    copy.wait_event(ring.free[i])
                    self._copy_rows(copy, False, buf.data_ptr(), slots[p0:p1], lo, hi)
                    ring.ready[i].record(copy)
                    dev.wait_event(ring.ready[i])
                    with torch.cuda.stream(dev):
                        self._stage(False, rows_all, p0, p1, lo, hi, rows, row_bytes)
                    ring.free[i].record(dev)
            layer_done(g, dev)
        done = torch.cuda.Event()
        done.record(copy if to_pool else dev)
        return done, keep

    def _stage(self, to_rows, rows_all, p0, p1, lo, hi, buf_rows, row_bytes):
        """Gather (to_rows) or scatter pairs [p0, p1) of `rows_all` between the cache and `buf_rows`."""
        if self._kernel_ok:
            self._kernel(to_rows, rows_all, self._arange, lo, hi, buf_rows.data_ptr(), row_bytes,
                         int(self.table.seg_row_off[lo]), self._gather_programs, pair_begin=p0, n_pairs=p1 - p0)
        else:
            self._gather_torch(to_rows, rows_all[p0:p1], lo, hi, buf_rows)

    def _warm_up_kernels(self) -> None:
        """Compile the gather and the scatter now, not inside the first request's transfer: block 0 is
        gathered into a row and scattered back unchanged (before vLLM has run any forward)."""
        row_bytes = int(self.table.seg_row_off[-1])
        row = torch.empty(row_bytes, dtype=torch.uint8, device=self.device).view(1, row_bytes)
        with torch.cuda.stream(self._save_dev):
            for to_rows in (True, False):
                self._stage(to_rows, self._arange, 0, 1, 0, self.num_segments, row, row_bytes)
        self._save_dev.synchronize()

    def _copy_rows(self, stream, to_pool, rows_base, slots, lo, hi) -> None:
        """Staging rows <-> pool slots `slots` (sorted). Where a row is only part of a slot (one layer
        of a layer-wise load, a TP rank's shard), a run of consecutive slots is one 2D copy: the driver
        takes ~0.75 us per batched copy, so the 65k rows of a 32k-token layer-wise load would block
        the caller for ~50 ms."""
        t = self.table
        dst, src, size = t.row_entries(to_pool, rows_base, slots, lo, hi)
        row_bytes = int(t.seg_row_off[hi] - t.seg_row_off[lo])
        if row_bytes == t.slot_bytes or slots.size < MIN_2D_RUN:  # whole slots: coalescing merges runs
            self._batch_entries(stream, dst, src, size)
            return
        breaks = slots[1:] != slots[:-1] + 1
        chunk = self._pinned_chunks(dst, src)
        if chunk is not None:
            breaks |= chunk[1:] != chunk[:-1]
        starts = np.flatnonzero(np.concatenate(([True], breaks)))
        lengths = np.diff(np.append(starts, slots.size))
        long_runs = lengths >= MIN_2D_RUN
        dst_pitch, src_pitch = (t.slot_bytes, row_bytes) if to_pool else (row_bytes, t.slot_bytes)
        for first, count in zip(starts[long_runs].tolist(), lengths[long_runs].tolist()):
            self._copy_2d(stream, int(dst[first]), dst_pitch, int(src[first]), src_pitch, row_bytes, count)
        if not long_runs.all():
            short = np.repeat(~long_runs, lengths)
            self._batch_entries(stream, dst[short], src[short], size[short])

    def _copy_2d(self, stream, dst, dst_pitch, src, src_pitch, width, height) -> None:
        memcpy_2d_async(stream.cuda_stream, self.device_index, dst, dst_pitch, src, src_pitch, width, height)
