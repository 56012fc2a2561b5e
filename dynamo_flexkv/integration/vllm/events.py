"""Turns the index's tier events into vLLM KV events that Dynamo's KV router indexes.

The router drops a BlockStored without token ids or with a block size other than vLLM's, and it chains
lower-tier blocks onto the worker's GPU events by hash. So every event carries vLLM's own block
hashes (converted exactly as vLLM converts its GPU-event hashes), the parent hash, the block's tokens
and vLLM's block size, and the LoRA adapter that computed it, as vLLM's own events do — and is emitted
only after the bytes landed (the index emits `Stored` on commit). A block is removed from the router's
view only where it was announced: a block stored without known tokens (never announced) leaves
without an event.
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
        self._lora: dict[bytes, tuple[int, str]] = {}  # (adapter id, name) of LoRA blocks
        self._tiers: dict[bytes, int] = {}  # how many tiers announced each block
        self._announced: set[tuple[str, bytes]] = set()  # (medium, key)

    def remember(self, keys: Sequence[bytes], tokens: Sequence[Sequence[int]],
                 lora: tuple[int, str] | None = None) -> None:
        self._tokens.update(zip(keys, tokens))
        if lora is not None:
            self._lora.update(dict.fromkeys(keys, lora))

    def persistable_tokens(self, keys: Sequence[bytes]) -> list[Sequence[int]]:
        """Tokens to record with blocks written to disk, so a restart can announce them; empty
        for blocks of unknown tokens or of a LoRA adapter (not recorded on disk)."""
        return [() if key in self._lora else self._tokens.get(key, ()) for key in keys]

    def forget(self, keys: Iterable[bytes]) -> None:
        """Drop the tokens of blocks no tier announced (e.g. a store that was rolled back)."""
        for key in keys:
            if not self._tiers.get(key):
                self._tokens.pop(key, None)
                self._lora.pop(key, None)

    def translate(self, events: Iterable[TierEvent]) -> list[KVCacheEvent]:
        out: list[KVCacheEvent] = []
        for event in events:
            medium = self.media[event.tier]
            if medium is None:
                continue
            if isinstance(event, Stored):
                out.extend(self._stored(event.keys, event.parents, medium))
            elif isinstance(event, (Removed, Cleared)):
                # A Cleared becomes removals too: vLLM's AllBlocksCleared names no medium, so the
                # router would forget this worker's GPU (and other tiers') blocks as well.
                gone = [key for key in event.keys if (medium, key) in self._announced]
                if gone:
                    out.append(BlockRemoved(block_hashes=[maybe_convert_block_hash(k) for k in gone], medium=medium))
                self._left(medium, gone)
        return out

    def _left(self, medium: str, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._announced.discard((medium, key))
            held = self._tiers.pop(key, 0) - 1
            if held > 0:
                self._tiers[key] = held
            else:
                self._tokens.pop(key, None)
                self._lora.pop(key, None)

    def _stored(self, keys: Sequence[bytes], parents: Sequence[bytes | None], medium: str) -> list[BlockStored]:
        """One BlockStored per run of keys that chain parent -> child, as vLLM emits them."""
        events, run, run_parent = [], [], None
        for key, parent in zip(keys, parents):
            if key not in self._tokens:  # e.g. found on disk at start-up: tokens unknown, not announced
                logger.debug("block %s stored in %s without known tokens: not announced", key.hex()[:16], medium)
                continue
            if (medium, key) not in self._announced:
                self._announced.add((medium, key))
                self._tiers[key] = self._tiers.get(key, 0) + 1
            if run and (parent != run[-1] or self._lora.get(key) != self._lora.get(run[-1])):
                events.append(self._block_stored(run, run_parent, medium))
                run = []
            if not run:
                run_parent = parent
            run.append(key)
        if run:
            events.append(self._block_stored(run, run_parent, medium))
        return events

    def _block_stored(self, run: list[bytes], parent: bytes | None, medium: str) -> BlockStored:
        lora_id, lora_name = self._lora.get(run[0], (None, None))
        return BlockStored(
            block_hashes=[maybe_convert_block_hash(k) for k in run],
            parent_block_hash=None if parent is None else maybe_convert_block_hash(parent),
            token_ids=[t for k in run for t in self._tokens[k]],
            block_size=self.block_size,
            lora_id=lora_id,
            medium=medium,
            lora_name=lora_name,
            group_idx=0,
        )
