"""The `Copier` protocol every block copier keeps, and `make_copier`, which picks one by the cache's device.

A copier moves whole blocks between vLLM's paged KV cache and this rank's region of the CPU pool:
`transfer.host.BlockCopier` for host-memory caches (`ThreadedBlockCopier` completes them on a
background thread), `transfer.cuda.copier.CudaBlockCopier` (bus-speed copies on side streams) on
CUDA. The CUDA module builds on the host one (its fallback path), never the reverse, and this module
imports the CUDA one only when the cache is on a CUDA device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from dynamo_flexkv.storage.layout import KVCacheLayout, PoolGeometry
from dynamo_flexkv.transfer.host import BlockCopier, ThreadedBlockCopier
from dynamo_flexkv.transfer.layerwise import LayerwiseLoad, TransferHandle


@runtime_checkable
class Copier(Protocol):
    layout: KVCacheLayout
    block_bytes: int  # bytes of one block in this rank's region of a slot

    def save(self, block_ids: Sequence[int], slots: Sequence[int]) -> int:
        """vLLM cache -> pool, blocking; returns the bytes moved."""

    def load(self, slots: Sequence[int], block_ids: Sequence[int]) -> int:
        """Pool -> vLLM cache, blocking; returns the bytes moved."""

    def save_async(self, block_ids: Sequence[int], slots: Sequence[int]) -> TransferHandle:
        """Cache -> pool, ordered after the work already queued; completes when the handle says so."""

    def load_async(self, slots: Sequence[int], block_ids: Sequence[int]) -> TransferHandle:
        """Pool -> cache, as one transfer."""

    def load_layerwise(self, slots: Sequence[int], block_ids: Sequence[int]) -> LayerwiseLoad:
        """Pool -> cache, each layer ready on its own (transfer/layerwise.py)."""

    def close(self) -> None:
        """Let submitted transfers finish and stop background threads."""


def make_copier(
    layout: KVCacheLayout, pool: torch.Tensor, geometry: PoolGeometry, rank: int,
    cpu_async: bool = False, **cuda_options
) -> Copier:
    """The copier for this rank's caches: `CudaBlockCopier` on a CUDA device, else `BlockCopier`
    (`ThreadedBlockCopier` with `cpu_async`).

    `cuda_options` (method, issue, staging_bytes, max_programs, pin, batch_memcpy) only apply on CUDA.
    On CUDA the pool is pinned here if nobody pinned it yet (`transfer.cuda.pinning.pin_host_memory`,
    idempotent).
    """
    if layout.device.type == "cuda":
        from dynamo_flexkv.transfer.cuda.copier import CudaBlockCopier

        return CudaBlockCopier(layout, pool, geometry, rank, **cuda_options)
    if cpu_async:
        return ThreadedBlockCopier(layout, pool, geometry, rank)
    return BlockCopier(layout, pool, geometry, rank)
