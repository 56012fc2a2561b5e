"""Block layouts: how one block of vLLM's paged KV cache maps onto a CPU-pool slot.

A vLLM KV cache is a set of per-layer tensors whose *block* dimension indexes pages. Each page of
each layer (or each K/V plane of a layer) is one contiguous run of bytes, a *segment*. One TP rank's
share of a block — its *shard* — is the concatenation of that block's segments over all layers.
A pool slot holds the shards of every TP rank side by side, each at a 4 KiB-aligned offset, so a
slot is a valid O_DIRECT buffer and every rank writes its own region without coordination.

Supported per-layer shapes (`num_blocks` known from vLLM's KV-cache config):
- block dimension first: CPU attention `[num_blocks, heads, block_size, k+v]`, MLA
  `[num_blocks, block_size, latent]` — one segment per layer;
- K/V planes first: CUDA attention `[2, num_blocks, block_size, heads, head_dim]` — two segments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

ALIGNMENT = 4096


def round_up(value: int, multiple: int = ALIGNMENT) -> int:
    return (value + multiple - 1) // multiple * multiple


@dataclass(frozen=True)
class PoolGeometry:
    """Sizes shared by the scheduler and every worker; derived from the same config on each side."""

    num_slots: int
    shard_bytes: int  # one TP rank's bytes per block (all layers)
    world_size: int  # TP ranks sharing each slot

    @property
    def shard_stride(self) -> int:
        return round_up(self.shard_bytes)

    @property
    def slot_bytes(self) -> int:
        return self.shard_stride * self.world_size

    @property
    def total_bytes(self) -> int:
        return self.slot_bytes * self.num_slots

    @classmethod
    def for_capacity(cls, capacity_bytes: int, shard_bytes: int, world_size: int) -> PoolGeometry:
        per_slot = cls(1, shard_bytes, world_size).slot_bytes
        if capacity_bytes < per_slot:
            raise ValueError(
                f"cpu_cache_gb (FLEXKV_CPU_CACHE_GB) = {capacity_bytes / 2**30:.6g} GiB holds no KV block of "
                f"this model ({per_slot} bytes per block): set it to at least {per_slot / 2**30:.6g}")
        return cls(capacity_bytes // per_slot, shard_bytes, world_size)


def _block_byte_view(plane: torch.Tensor) -> torch.Tensor:
    """`[num_blocks, block_bytes]` uint8 view of a `[num_blocks, ...]` plane whose blocks are dense.

    A block need not be contiguous in torch's sense, only dense: vLLM registers HND caches as a
    permuted view with the NHD shape, and a copy of whole blocks does not care how a block orders its
    elements inside.
    """
    inner = sorted(zip(plane.stride()[1:], plane.shape[1:]))
    expected = 1
    for stride, size in inner:
        if size != 1 and stride != expected:
            raise ValueError(
                f"each block of a KV tensor must be dense, got shape {tuple(plane.shape)} strides {plane.stride()}"
            )
        expected *= size
    element = plane.element_size()
    storage = torch.empty(0, dtype=torch.uint8, device=plane.device).set_(plane.untyped_storage())
    return torch.as_strided(
        storage,
        size=(plane.shape[0], expected * element),
        stride=(plane.stride(0) * element, 1),
        storage_offset=plane.storage_offset() * element,
    )


def _segments_of(tensor: torch.Tensor, num_blocks: int) -> list[torch.Tensor]:
    """Per-block 2-D byte views `[num_blocks, segment_bytes]` of one layer's KV tensor."""
    if tensor.dim() >= 2 and tensor.shape[0] == 2 and tensor.shape[1] == num_blocks:
        planes = [tensor[0], tensor[1]]
    elif tensor.shape[0] == num_blocks:
        planes = [tensor]
    else:
        raise ValueError(
            f"cannot find the block dimension ({num_blocks} blocks) in a KV tensor of shape "
            f"{tuple(tensor.shape)}; supported: [num_blocks, ...] and [2, num_blocks, ...]"
        )
    return [_block_byte_view(plane) for plane in planes]


class KVCacheLayout:
    """The segments of one TP rank's KV cache, in a fixed order (layer order as registered).

    A hybrid model's cache has one layout per KV-cache group (their block ids differ): each covers
    the group's layers and starts `shard_offset` bytes into the rank's shard of a slot.

    `stacked` is a single strided view `[num_blocks, num_segments, segment_bytes]` over all
    segments when they sit at a constant distance from each other in one allocation (the usual case:
    vLLM carves every layer out of one buffer). Copies then take one gather and one scatter for all
    layers together; otherwise they take one per segment.
    """

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], num_blocks: int, shard_offset: int = 0):
        if not kv_caches:
            raise ValueError("no KV cache tensors were registered")
        self.layer_names = list(kv_caches)
        self.num_blocks = num_blocks
        self.shard_offset = shard_offset
        self.segments = [seg for t in kv_caches.values() for seg in _segments_of(t, num_blocks)]
        self.segment_bytes = [seg.shape[1] for seg in self.segments]
        self.shard_bytes = sum(self.segment_bytes)
        self.device = self.segments[0].device
        self.stacked = self._stack_if_uniform()

    def _stack_if_uniform(self) -> torch.Tensor | None:
        first = self.segments[0]
        if len(set(self.segment_bytes)) != 1 or any(s.stride() != first.stride() for s in self.segments):
            return None
        base = first.untyped_storage().data_ptr()
        if any(s.untyped_storage().data_ptr() != base for s in self.segments):
            return None
        if len(self.segments) == 1:
            return first.unsqueeze(1)
        gaps = {b.data_ptr() - a.data_ptr() for a, b in zip(self.segments, self.segments[1:])}
        if len(gaps) != 1:
            return None
        gap = gaps.pop()
        if gap <= 0:
            return None
        return torch.as_strided(
            first,
            size=(self.num_blocks, len(self.segments), self.segment_bytes[0]),
            stride=(first.stride(0), gap, 1),
        )

    def shard_view(self, pool: torch.Tensor, geometry: PoolGeometry, rank: int) -> list[torch.Tensor]:
        """Per-segment views `[num_slots, segment_bytes]` of this rank's region of every pool slot."""
        if self.shard_offset + self.shard_bytes > geometry.shard_bytes:
            raise ValueError(
                f"KV cache holds {self.shard_offset + self.shard_bytes} bytes per block on this rank but the "
                f"pool was sized for {geometry.shard_bytes}: the scheduler and worker disagree on the KV layout"
            )
        start = rank * geometry.shard_stride + self.shard_offset
        views, offset = [], start
        for size in self.segment_bytes:
            views.append(pool[:, offset : offset + size])
            offset += size
        return views

    def stacked_shard_view(self, pool: torch.Tensor, geometry: PoolGeometry, rank: int) -> torch.Tensor:
        """This rank's region of every slot as `[num_slots, num_segments, segment_bytes]`."""
        start = rank * geometry.shard_stride + self.shard_offset
        region = pool[:, start : start + self.shard_bytes]
        return region.view(pool.shape[0], len(self.segments), self.segment_bytes[0])
