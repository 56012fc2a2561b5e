"""Triton gather/scatter between vLLM's paged KV cache and pool-shaped rows (CUDA only).

Import this module only on CUDA: it imports Triton at module level and the CPU build has none.

One kernel, `_kv_block_copy`, moves whole *segments* (one block's bytes of one layer, or of one K/V
plane of a layer) between
- the cache side: segment `s` of block `b` starts at word `seg_cache_off[s] + b * seg_cache_stride[s]`
  from `cache_base` (any mix of per-layer tensors, views of one buffer or not), and
- the row side: segment `s` of row `r` starts at word `r * row_words + seg_row_off[s] - row_bias`
  from `row_base` — a pool slot (pinned host memory, read or written directly over PCIe: zero-copy)
  or a row of a device staging buffer (a plain on-GPU gather/scatter).
It runs as a persistent grid: `grid` programs stride over the (pair, segment) work items, so the
caller decides how many SMs a transfer may occupy while the model computes. All offsets are in 4-byte
words and 16-byte aligned (checked by the caller), so loads and stores are 16 bytes wide.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


class TypedPtr:
    """The least Triton needs to pass a raw address (e.g. pinned host memory) as a pointer argument."""

    def __init__(self, ptr: int, dtype: torch.dtype = torch.int32):
        self.ptr = ptr
        self.dtype = dtype

    def data_ptr(self) -> int:
        return self.ptr

    def untyped_storage(self) -> TypedPtr:
        return self


# Triton compiles one variant per value class of every integer argument (1, a multiple of 16, other)
# and per pointer alignment: unit sizes and layer offsets vary from call to call, and each new variant
# is a compile of ~0.7 s inside a request's load. So no integer is specialized, the index pointers are
# always their tensors' (aligned) bases, and only the constexprs select a variant.
@triton.jit(do_not_specialize=["row_words", "row_bias", "pair_begin", "n_pairs", "seg_begin", "n_segs"])
def _kv_block_copy(
    cache_base,
    row_base,
    cache_rows,
    row_ids,
    seg_cache_off,
    seg_cache_stride,
    seg_row_off,
    row_words,
    row_bias,
    pair_begin,
    n_pairs,
    seg_begin,
    n_segs,
    SEG_WORDS: tl.constexpr,
    CHUNK: tl.constexpr,
    TO_ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    total = n_pairs * n_segs
    lane = tl.arange(0, CHUNK)
    for w in range(pid, total, nprog):
        pair = w // n_segs
        s = seg_begin + (w - pair * n_segs)
        crow = tl.load(cache_rows + pair_begin + pair)
        rrow = tl.load(row_ids + pair)
        c0 = tl.load(seg_cache_off + s) + crow * tl.load(seg_cache_stride + s)
        r0 = rrow * row_words + tl.load(seg_row_off + s) - row_bias
        c0 = tl.multiple_of(c0, 4)
        r0 = tl.multiple_of(r0, 4)
        for c in range(0, SEG_WORDS, CHUNK):
            offs = c + lane
            if SEG_WORDS % CHUNK == 0:
                if TO_ROWS:
                    tl.store(row_base + r0 + offs, tl.load(cache_base + c0 + offs))
                else:
                    tl.store(cache_base + c0 + offs, tl.load(row_base + r0 + offs))
            else:
                mask = offs < SEG_WORDS
                if TO_ROWS:
                    tl.store(row_base + r0 + offs, tl.load(cache_base + c0 + offs, mask=mask), mask=mask)
                else:
                    tl.store(cache_base + c0 + offs, tl.load(row_base + r0 + offs, mask=mask), mask=mask)


def kv_block_copy(
    *,
    cache_base: int,
    row_base: int,
    cache_rows: torch.Tensor,
    row_ids: torch.Tensor,
    seg_cache_off: torch.Tensor,
    seg_cache_stride: torch.Tensor,
    seg_row_off: torch.Tensor,
    row_words: int,
    row_bias: int,
    seg_begin: int,
    n_segs: int,
    seg_words: int,
    to_rows: bool,
    max_programs: int,
    pair_begin: int = 0,
    n_pairs: int | None = None,
    chunk: int = 4096,
    num_warps: int = 8,
) -> None:
    """Launch on the current stream: pairs `[pair_begin, pair_begin + n_pairs)` of `cache_rows` (all of
    them by default) with `row_ids[:n_pairs]`. Index tensors are int64 on the device; offsets are in words."""
    if n_pairs is None:
        n_pairs = cache_rows.numel() - pair_begin
    total = n_pairs * n_segs
    if total == 0:
        return
    chunk = min(chunk, triton.next_power_of_2(seg_words))
    grid = (max(1, min(total, max_programs)),)
    _kv_block_copy[grid](
        TypedPtr(cache_base),
        TypedPtr(row_base),
        cache_rows,
        row_ids,
        seg_cache_off,
        seg_cache_stride,
        seg_row_off,
        row_words,
        row_bias,
        pair_begin,
        n_pairs,
        seg_begin,
        n_segs,
        SEG_WORDS=seg_words,
        CHUNK=chunk,
        TO_ROWS=to_rows,
        num_warps=num_warps,
    )
