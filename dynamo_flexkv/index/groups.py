"""KV-cache groups: which stored blocks a hit needs, per group, so it is usable by every group.

A hybrid model (vLLM's hybrid KV cache manager) keeps several KV-cache groups with their own block
tables: full-attention layers read every block before the next token; sliding-window layers read
only the blocks of their window, and vLLM frees the blocks before it (its table holds its null
block there). The index keeps one entry per token block of the request's block-hash chain, and each
entry records, as a bit mask, which groups' KV it holds: a block saved after vLLM freed its
sliding-window page holds the full-attention layers' KV only.

A hit over blocks `[first, first + n)` (the blocks before `first` are vLLM's own hits) is usable
when every full-attention group has all `n` blocks and every sliding-window group has the blocks its
window covers at the hit's end. Anything shorter is recomputed, never served half-filled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

ALL_GROUPS = -1  # the mask of a block holding every group's KV (every bit set)


@dataclass(frozen=True)
class KVGroup:
    """One KV-cache group as the index sees it.

    `window`: tokens a sliding-window group keeps — its attention window plus any tokens vLLM
    retains below it — or None for a group that reads every earlier token (full attention).
    """

    kind: str
    window: int | None = None

    def first_kept_block(self, num_tokens: int, block_size: int) -> int:
        """The first block of the group vLLM still holds once `num_tokens` tokens are computed (it
        frees the blocks wholly before the window of the next token)."""
        if self.window is None:
            return 0
        return max(0, num_tokens - self.window + 1) // block_size


def group_mask(groups: Sequence[int]) -> int:
    """The bit mask of the group indices `groups`."""
    mask = 0
    for group in groups:
        mask |= 1 << group
    return mask


def usable_hit(groups: Sequence[KVGroup], masks: Sequence[int], first: int, block_size: int) -> int:
    """How many of the blocks `first, first + 1, ...` a hit may load; `masks[i]` is the groups block
    `first + i` holds. The longest `n` such that, for a hit ending after block `first + n - 1`,
    every group has each block it keeps there: all of them for full attention, its window for a
    sliding-window group. The window is taken at one token before the hit's end, so a hit whose last
    token vLLM recomputes still finds that token's window."""
    n = len(masks)
    for bit, group in enumerate(groups):
        if group.window is None:  # a prefix property: stop at the first block without this group
            n = next((i for i in range(n) if not masks[i] >> bit & 1), n)
    windowed = [(bit, group) for bit, group in enumerate(groups) if group.window is not None]
    # last_missing[k][i]: the last index <= i whose block lacks windowed group k (-1: none)
    last_missing = []
    for bit, _ in windowed:
        missing, latest = [], -1
        for i in range(n):
            if not masks[i] >> bit & 1:
                latest = i
            missing.append(latest)
        last_missing.append(missing)
    while n > 0:
        end_tokens = (first + n) * block_size
        if all(last_missing[k][n - 1] < group.first_kept_block(end_tokens - 1, block_size) - first
               for k, (_, group) in enumerate(windowed)):
            return n
        n -= 1
    return 0


def held_groups(groups: Sequence[KVGroup], block_ids: Sequence[Sequence[int]], index: int,
                num_computed: int, block_size: int, null_block: int) -> int:
    """The mask of the groups whose KV of block `index` a save can copy: the group's block table
    reaches it, it is not the null block, and vLLM has not freed it (`num_computed` may be ahead of
    the count vLLM freed by, never behind, so this errs towards leaving a group out)."""
    mask = 0
    for bit, (group, ids) in enumerate(zip(groups, block_ids, strict=True)):
        if index < len(ids) and ids[index] != null_block and index >= group.first_kept_block(num_computed, block_size):
            mask |= 1 << bit
    return mask
