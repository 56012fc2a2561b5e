"""Scheduler-role half of the connector: decides what to load and save, never touches bytes.

Request flow (see docs/architecture.md):
1. `get_num_new_matched_tokens` matches the request's vLLM block hashes beyond its GPU hit against
   the index, locks the hit and answers "load asynchronously" — the scheduler is never blocked.
2. `update_state_after_alloc` binds the hit to the GPU blocks vLLM allocated; the next
   `build_connector_meta` hands the copy to the workers.
3. `request_finished` reserves pool slots for the request's full, computed blocks not yet cached
   and asks vLLM to keep the GPU blocks until the workers copied them (async save).
4. `update_connector_output` commits (or rolls back) what the workers finished; only then do blocks
   become matchable and visible to the router as events.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from vllm.distributed.kv_events import KVCacheEvent
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from dynamo_flexkv.index.engine import CacheEngine
from dynamo_flexkv.index.plans import LoadPlan, StorePlan
from dynamo_flexkv.index.policies import make_policy
from dynamo_flexkv.index.tier import TierIndex
from dynamo_flexkv.integration.vllm.events import EventTranslator
from dynamo_flexkv.integration.vllm.instance import InstanceFacts
from dynamo_flexkv.integration.vllm.metadata import BlockTransfer, FlexKVStepMetadata, FlexKVWorkerReport
from dynamo_flexkv.integration.vllm.stats import FlexKVStats

logger = logging.getLogger(__name__)

CPU_TIER = "CPU"


class SchedulerSide:
    def __init__(self, facts: InstanceFacts, eviction_policy: str, publish_events: bool):
        self.block_size = facts.block_size
        num_slots = facts.geometry.num_slots
        self.engine = CacheEngine([TierIndex(CPU_TIER, num_slots, make_policy(eviction_policy, num_slots))])
        self.events = EventTranslator(facts.block_size) if publish_events else None
        self.loaded_tokens = 0  # tokens whose load was scheduled, since start
        self._reported = self.engine.snapshot()
        # request id -> (first block index of the hit, its locked plan), awaiting allocation
        self._matched: dict[str, tuple[int, LoadPlan]] = {}
        self._loading: dict[str, LoadPlan] = {}
        self._saving: dict[str, StorePlan] = {}
        self._step = FlexKVStepMetadata()
        logger.info(
            "scheduler ready: identity=%s cpu_slots=%d block_size=%d policy=%s",
            facts.identity, num_slots, facts.block_size, eviction_policy,
        )

    # --- loads ---------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        request_id = request.request_id
        first = num_computed_tokens // self.block_size
        keys = request.block_hashes[first:]
        hits = self.engine.lookup(keys) if keys else 0
        if hits == 0:
            self._release_match(request_id)
            return 0, False
        plan = self.engine.prepare_load(request_id, keys[:hits])  # replaces an earlier match
        self._matched[request_id] = (first, plan)
        return hits * self.block_size, True

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        request_id = request.request_id
        matched = self._matched.pop(request_id, None)
        if matched is None:
            return
        if num_external_tokens == 0:
            self.engine.cancel_load(request_id)
            return
        first, plan = matched
        count = num_external_tokens // self.block_size
        if count < len(plan.keys):  # vLLM took less than offered: lock only what will be loaded
            plan = self.engine.prepare_load(request_id, plan.keys[:count])
        block_ids = blocks.get_block_ids()[0][first : first + count]
        self._step.loads.append(BlockTransfer(request_id, tuple(block_ids), tuple(plan.slots)))
        self._loading[request_id] = plan
        self.loaded_tokens += count * self.block_size
        logger.debug("load scheduled: request=%s blocks=%d from=%s", request_id, count, plan.tier)

    def _release_match(self, request_id: str) -> None:
        if self._matched.pop(request_id, None) is not None:
            self.engine.cancel_load(request_id)

    # --- saves ---------------------------------------------------------------------------------

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        self._release_match(request_id)
        if request_id in self._loading:
            return False, None  # its blocks are still being filled; vLLM frees them after the load
        full = min(len(request.block_hashes), request.num_computed_tokens // self.block_size, len(block_ids))
        if full == 0:
            return False, None
        keys = request.block_hashes[:full]
        parents = [None, *keys[:-1]]
        plan = self.engine.prepare_store(request_id, keys, parents)
        if plan is None:
            return False, None
        position = {key: i for i, key in enumerate(keys)}
        indices = [position[key] for key in plan.keys]
        if self.events is not None:
            tokens = request.all_token_ids
            self.events.remember(plan.keys, [tokens[i * self.block_size : (i + 1) * self.block_size] for i in indices])
        self._step.saves.append(BlockTransfer(request_id, tuple(block_ids[i] for i in indices), tuple(plan.slots)))
        self._saving[request_id] = plan
        logger.debug("save scheduled: request=%s blocks=%d", request_id, len(plan.keys))
        return True, None

    # --- per step --------------------------------------------------------------------------------

    def build_connector_meta(self) -> FlexKVStepMetadata:
        step, self._step = self._step, FlexKVStepMetadata()
        return step

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        report = output.kv_connector_worker_meta
        failed_loads = report.failed_loads if isinstance(report, FlexKVWorkerReport) else set()
        failed_saves = report.failed_saves if isinstance(report, FlexKVWorkerReport) else set()
        for request_id in output.finished_recving or ():
            plan = self._loading.pop(request_id, None)
            if plan is not None:
                ok = request_id not in failed_loads
                self.engine.complete_load(request_id, success=ok, bad_keys=() if ok else plan.keys)
                if not ok:
                    logger.warning("load failed, blocks dropped and recomputed: request=%s", request_id)
        for request_id in output.finished_sending or ():
            plan = self._saving.pop(request_id, None)
            if plan is not None:
                ok = request_id not in failed_saves
                self.engine.complete_store(request_id, success=ok)
                if not ok:
                    if self.events is not None:
                        self.events.forget(plan.keys)
                    logger.warning("save failed, slots released: request=%s", request_id)

    def take_events(self) -> Iterable[KVCacheEvent]:
        tier_events = self.engine.take_events()
        if self.events is None:
            return ()
        return self.events.translate(tier_events)

    def reset_cache(self) -> bool:
        self.engine.reset()
        logger.info("cache reset: every unlocked block dropped")
        return True

    def take_stats(self) -> FlexKVStats | None:
        """Hits and evictions since the last call, and the blocks each tier holds now."""
        now, before = self.engine.snapshot(), self._reported
        self._reported = now
        stats = FlexKVStats()
        for tier, held in now.blocks_held.items():
            hits = now.hit_blocks[tier] - before.hit_blocks[tier]
            evicted = now.evicted_blocks[tier] - before.evicted_blocks[tier]
            if hits:
                stats.add(f"hit_tokens:{tier}", hits * self.block_size)
            if evicted:
                stats.add(f"evicted_blocks:{tier}", evicted)
            if held != before.blocks_held[tier] or hits or evicted:
                stats.data[f"held_blocks:{tier}"] = held
        return None if stats.is_empty() else stats

    @property
    def num_inflight(self) -> int:
        return len(self._loading) + len(self._saving)
