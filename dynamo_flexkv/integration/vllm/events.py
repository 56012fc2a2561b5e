"""Turns the index's tier events into vLLM KV events that Dynamo's KV router indexes.

The router drops a BlockStored without token ids or with a block size other than vLLM's, and it chains
lower-tier blocks onto the worker's GPU events by hash. So every event carries vLLM's own block
hashes (converted exactly as vLLM converts its GPU-event hashes), the parent hash, the block's tokens
and vLLM's block size — and is emitted only after the bytes landed (the index emits `Stored` on
commit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVCacheEvent
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from dynamo_flexkv.index.plans import Cleared, Removed, Stored, TierEvent

logger = logging.getLogger(__name__)

class EventTranslator:
    def __init__(self, block_size: int, media: Mapping[str, str | None]):
        self.block_size = block_size
        self.media = dict(media)  # tier name -> KV-event medium (from its backend); None: not announced
        self._tokens: dict[bytes, Sequence[int]] = {}  # blocks stored, or being stored, somewhere
        self._tiers: dict[bytes, int] = {}  # how many tiers announced each block

    def remember(self, keys: Sequence[bytes], tokens: Sequence[Sequence[int]]) -> None:
        self._tokens.update(zip(keys, tokens))

    def forget(self, keys: Iterable[bytes]) -> None:
        """Drop the tokens of blocks no tier announced (e.g. a store that was rolled back)."""
        for key in keys:
            if not self._tiers.get(key):
                self._tokens.pop(key, None)

    def translate(self, events: Iterable[TierEvent]) -> list[KVCacheEvent]:
        out: list[KVCacheEvent] = []
        for event in events:
            medium = self.media[event.tier]
            if medium is None:
                continue
            if isinstance(event, Stored):
                for key in event.keys:
                    self._tiers[key] = self._tiers.get(key, 0) + 1
                out.extend(self._stored(event.keys, event.parents, medium))
            elif isinstance(event, Removed):
                out.append(BlockRemoved(block_hashes=[maybe_convert_block_hash(k) for k in event.keys], medium=medium))
                self._left(event.keys)
            elif isinstance(event, Cleared):
                # vLLM's AllBlocksCleared names no medium: the router would forget this worker's GPU
                # (and other tiers') blocks too. Remove exactly what left this tier instead.
                if event.keys:
                    out.append(BlockRemoved(block_hashes=[maybe_convert_block_hash(k) for k in event.keys],
                                            medium=medium))
                self._left(event.keys)
        return out

    def _left(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            held = self._tiers.pop(key, 0) - 1
            if held > 0:
                self._tiers[key] = held
            else:
                self._tokens.pop(key, None)

    def _stored(self, keys: Sequence[bytes], parents: Sequence[bytes | None], medium: str) -> list[BlockStored]:
        """One BlockStored per run of keys that chain parent -> child, as vLLM emits them."""
        events, run, run_parent = [], [], None
        for key, parent in zip(keys, parents):
            if key not in self._tokens:  # e.g. found on disk at start-up: tokens unknown, not announced
                logger.debug("block %s stored in %s without known tokens: not announced", key.hex()[:16], medium)
                continue
            if run and parent != run[-1]:
                events.append(self._block_stored(run, run_parent, medium))
                run = []
            if not run:
                run_parent = parent
            run.append(key)
        if run:
            events.append(self._block_stored(run, run_parent, medium))
        return events

    def _block_stored(self, run: list[bytes], parent: bytes | None, medium: str) -> BlockStored:
        return BlockStored(
            block_hashes=[maybe_convert_block_hash(k) for k in run],
            parent_block_hash=None if parent is None else maybe_convert_block_hash(parent),
            token_ids=[t for k in run for t in self._tokens[k]],
            block_size=self.block_size,
            lora_id=None,
            medium=medium,
            lora_name=None,
            group_idx=0,
        )
