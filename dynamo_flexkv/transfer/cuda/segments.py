"""Planning of CUDA block copies as numpy arrays of byte addresses: no Python loop over blocks or layers.

Pure numpy (no CUDA): the unit tests execute these plans over CPU memory with `memmove_entries`.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dynamo_flexkv.storage.layout import KVCacheLayout, PoolGeometry


def layer_segment_ranges(layout: KVCacheLayout) -> list[tuple[int, int]]:
    """`[(first_segment, end_segment)]` per layer, in `layout.layer_names` order."""
    counts = getattr(layout, "layer_segment_counts", None)
    if counts is None:
        num_layers, num_segments = len(layout.layer_names), len(layout.segments)
        if num_segments % num_layers:
            raise ValueError(
                f"{num_segments} segments over {num_layers} layers: cannot tell which segments belong to "
                "which layer (mixed layer kinds need KVCacheLayout.layer_segment_counts)"
            )
        counts = [num_segments // num_layers] * num_layers
    bounds = np.concatenate(([0], np.cumsum(counts))).tolist()
    return [(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]


@dataclass(frozen=True)
class SegmentTable:
    """Where every segment of every block lives, as byte addresses: the input of every plan."""

    seg_addr: np.ndarray  # int64 [S]: address of segment s of block 0
    seg_stride: np.ndarray  # int64 [S]: bytes between consecutive blocks of segment s
    seg_bytes: np.ndarray  # int64 [S]
    seg_row_off: np.ndarray  # int64 [S + 1]: offset of segment s inside a shard (and the shard size)
    pool_base: int  # address of this layout's part of this rank's shard in slot 0
    slot_bytes: int
    num_blocks: int
    num_slots: int

    @classmethod
    def build(cls, layout: KVCacheLayout, pool: torch.Tensor, geometry: PoolGeometry, rank: int) -> SegmentTable:
        if pool.dim() != 2 or pool.dtype != torch.uint8 or pool.stride(1) != 1 or pool.stride(0) != geometry.slot_bytes:
            raise ValueError(
                f"the pool must be a [num_slots, {geometry.slot_bytes}] uint8 tensor with contiguous slots, "
                f"got {tuple(pool.shape)} {pool.dtype} strides {pool.stride()}"
            )
        if not 0 <= rank < geometry.world_size:
            raise ValueError(f"rank {rank} outside a world of {geometry.world_size}")
        segs = layout.segments
        seg_bytes = np.array(layout.segment_bytes, dtype=np.int64)
        return cls(
            seg_addr=np.array([s.data_ptr() for s in segs], dtype=np.int64),
            seg_stride=np.array([s.stride(0) * s.element_size() for s in segs], dtype=np.int64),
            seg_bytes=seg_bytes,
            seg_row_off=np.concatenate(([0], np.cumsum(seg_bytes))).astype(np.int64),
            pool_base=pool.data_ptr() + rank * geometry.shard_stride + layout.shard_offset,
            slot_bytes=geometry.slot_bytes,
            num_blocks=layout.num_blocks,
            num_slots=pool.shape[0],
        )

    def pairs(self, block_ids: Sequence[int], slots: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Validated int64 arrays (raw addresses follow from them: an id out of range would corrupt memory)."""
        blocks = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        slot_arr = np.asarray(slots, dtype=np.int64).reshape(-1)
        if blocks.shape != slot_arr.shape:
            raise ValueError(f"{blocks.size} block ids but {slot_arr.size} slots")
        if blocks.size:
            if blocks.min() < 0 or blocks.max() >= self.num_blocks:
                raise IndexError(f"block id out of range [0, {self.num_blocks})")
            if slot_arr.min() < 0 or slot_arr.max() >= self.num_slots:
                raise IndexError(f"slot out of range [0, {self.num_slots})")
        return blocks, slot_arr

    def segment_entries(
        self, to_pool: bool, blocks: np.ndarray, slots: np.ndarray, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dst, src, size) of one copy per (pair, segment in [lo, hi)), pair-major."""
        seg = slice(lo, hi)
        cache = self.seg_addr[seg][None, :] + blocks[:, None] * self.seg_stride[seg][None, :]
        pool = self.pool_base + slots[:, None] * self.slot_bytes + self.seg_row_off[lo:hi][None, :]
        size = np.broadcast_to(self.seg_bytes[seg][None, :], cache.shape)
        dst, src = (pool, cache) if to_pool else (cache, pool)
        return dst.ravel(), src.ravel(), np.ascontiguousarray(size).ravel()

    def row_entries(
        self, to_pool: bool, rows_base: int, slots: np.ndarray, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dst, src, size) between consecutive staging rows (segments [lo, hi) packed) and pool slots."""
        row_bytes = int(self.seg_row_off[hi] - self.seg_row_off[lo])
        rows = rows_base + np.arange(slots.size, dtype=np.int64) * row_bytes
        pool = self.pool_base + slots * self.slot_bytes + self.seg_row_off[lo]
        size = np.full(slots.size, row_bytes, dtype=np.int64)
        return (pool, rows, size) if to_pool else (rows, pool, size)


def group_layers(
    layer_segments: Sequence[tuple[int, int]], seg_row_off: np.ndarray, min_bytes: int
) -> list[tuple[int, int, list[int]]]:
    """Consecutive layers merged until each group's row (bytes per block) reaches `min_bytes`:
    `[(first_segment, end_segment, [layer indices])]`."""
    groups: list[tuple[int, int, list[int]]] = []
    for layer, (lo, hi) in enumerate(layer_segments):
        if groups and int(seg_row_off[groups[-1][1]] - seg_row_off[groups[-1][0]]) < min_bytes:
            first, _, layers = groups[-1]
            groups[-1] = (first, hi, layers + [layer])
        else:
            groups.append((lo, hi, [layer]))
    if len(groups) > 1 and int(seg_row_off[groups[-1][1]] - seg_row_off[groups[-1][0]]) < min_bytes:
        (first, _, layers), (_, end, tail) = groups[-2], groups[-1]  # a short tail joins its neighbour
        groups[-2:] = [(first, end, layers + tail)]
    return groups


def coalesce(
    dst: np.ndarray, src: np.ndarray, size: np.ndarray, barrier: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Merge runs of copies that continue each other on both sides (and share a `barrier` value)."""
    if size.size <= 1:
        return dst, src, size
    follows = (src[1:] == src[:-1] + size[:-1]) & (dst[1:] == dst[:-1] + size[:-1])
    if barrier is not None:
        follows &= barrier[1:] == barrier[:-1]
    if follows.all() if follows.size else True:
        return dst[:1], src[:1], np.array([size.sum()], dtype=size.dtype)
    starts = np.flatnonzero(np.concatenate(([True], ~follows)))
    return dst[starts], src[starts], np.add.reduceat(size, starts)


def memmove_entries(dst: np.ndarray, src: np.ndarray, size: np.ndarray) -> None:
    """Execute a plan with host memmove: the reference executor for plans over CPU memory (tests)."""
    for d, s, n in zip(dst.tolist(), src.tolist(), size.tolist()):
        ctypes.memmove(d, s, n)

