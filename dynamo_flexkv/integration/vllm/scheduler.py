"""Scheduler-role half of the connector: decides what to load and save, never touches bytes.

Request flow (see docs/architecture.md):
1. `get_num_new_matched_tokens` matches the request's vLLM block hashes beyond its GPU hit against
   the index, locks the hit and answers "load asynchronously" — the scheduler is never blocked.
2. `update_state_after_alloc` binds the hit to the GPU blocks vLLM allocated; the next
   `build_connector_meta` hands the copy to the workers.
   Hits that only a lower tier (SSD, cluster store) holds are first staged into CPU slots; their
   GPU copy is handed out once the reads finished. While a shared tier is being asked whether the
   blocks after a local hit exist, the answer is None ("ask again later").
3. `request_finished` reserves pool slots for the request's full, computed blocks not yet cached
   and asks vLLM to keep the GPU blocks until the workers copied them (async save).
4. `update_connector_output` commits (or rolls back) what the workers finished; only then do blocks
   become matchable and visible to the router as events. Committed blocks are written through to
   every lower tier in the background.
Tier assembly, the cascade and shared-tier lookups live in `dynamo_flexkv.tiers.TierStack`; this
class translates vLLM's requests and block ids to keys and slots.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from vllm.distributed.kv_events import KVCacheEvent
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.index.plans import LoadPlan, StorePlan
from dynamo_flexkv.integration.vllm.events import EventTranslator
from dynamo_flexkv.integration.vllm.metadata import BlockTransfer, FlexKVStepMetadata, FlexKVWorkerReport
from dynamo_flexkv.integration.vllm.stats import FlexKVStats
from dynamo_flexkv.tiers import InstanceFacts, TierStack

logger = logging.getLogger(__name__)


class SchedulerSide:
    def __init__(self, facts: InstanceFacts, settings: FlexKVSettings, publish_events: bool):
        self.identity = facts.identity
        self.block_size = facts.block_size
        self.layerwise = settings.layerwise_load
        self.tiers = TierStack(facts, settings, record_events=publish_events)
        self.engine = self.tiers.engine
        self.events = EventTranslator(facts.block_size, self.tiers.media) if publish_events else None
        self.loaded_tokens = 0  # tokens whose load was scheduled, since start
        self._reported = self.engine.snapshot()
        # request id -> (first block index of the hit, its locked plan), awaiting allocation
        self._matched: dict[str, tuple[int, LoadPlan]] = {}
        self._loading: dict[str, LoadPlan] = {}  # loads between steps, reported by vLLM
        self._loading_layerwise: dict[str, LoadPlan] = {}  # loads inside a step, reported by workers
        self._staging: dict[str, tuple[int, ...]] = {}  # request id -> GPU block ids awaiting staging
        self._saving: dict[str, StorePlan] = {}
        self._step = FlexKVStepMetadata()
        logger.info(
            "scheduler ready: identity=%s cpu_slots=%d block_size=%d policy=%s tiers=%s",
            facts.identity, facts.geometry.num_slots, facts.block_size, settings.eviction_policy, self.tiers.names,
        )

    # --- loads ---------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        request_id = request.request_id
        first = num_computed_tokens // self.block_size
        keys = request.block_hashes[first:]
        first_parent = request.block_hashes[first - 1] if first else None
        hits = self.tiers.lookup(request_id, keys, first_parent)
        if hits is None:  # a shared tier is being asked: vLLM asks again in a later step
            self._release_match(request_id)
            return None, False
        if hits == 0:
            self._release_match(request_id)
            return 0, False
        plan = self.engine.prepare_load(request_id, keys[:hits], first_parent)  # replaces an earlier match
        if plan is None:
            self._release_match(request_id)
            return 0, False
        if self.events is not None and plan.staged:
            self._remember_tokens(request, [first + s.index for s in plan.staged], [plan.keys[s.index] for s in plan.staged])
        self._matched[request_id] = (first, plan)
        load_async = bool(plan.staged) or not self.layerwise
        tokens = len(plan.keys) * self.block_size
        if not load_async:
            # Computed in this very step, vLLM needs one token to compute (it samples the next one
            # from it): offer all but the last; the last block is still loaded whole and vLLM
            # rewrites that token's KV into it. An async full hit may offer every token: vLLM then
            # recomputes the last one itself (Scheduler._update_waiting_for_remote_kv).
            tokens = min(tokens, request.num_tokens - 1 - first * self.block_size)
        return tokens, load_async

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        request_id = request.request_id
        matched = self._matched.pop(request_id, None)
        if matched is None:
            return
        if num_external_tokens == 0:
            self.engine.cancel_load(request_id)
            return
        first, plan = matched
        count = -(-num_external_tokens // self.block_size)  # a partial last block is loaded whole
        if count < len(plan.keys):  # vLLM took less than offered: lock only what will be loaded
            first_parent = request.block_hashes[first - 1] if first else None
            plan = self.engine.prepare_load(request_id, plan.keys[:count], first_parent)
        block_ids = tuple(blocks.get_block_ids()[0][first : first + count])
        # tokens vLLM will not compute (a full-prompt async hit still recomputes its last one)
        self.loaded_tokens += min(num_external_tokens, request.num_tokens - 1 - first * self.block_size)
        if plan.staged:
            self._loading[request_id] = plan
            self.tiers.stage(plan)
            self._staging[request_id] = block_ids
        elif self.layerwise:
            self._loading_layerwise[request_id] = plan
            self._step.layerwise_loads.append(BlockTransfer(request_id, block_ids, plan.slots))
        else:
            self._loading[request_id] = plan
            self._step.loads.append(BlockTransfer(request_id, block_ids, plan.slots))
        logger.debug("load scheduled: request=%s blocks=%d staged=%d", request_id, count, len(plan.staged))

    def _release_match(self, request_id: str) -> None:
        if self._matched.pop(request_id, None) is not None:
            self.engine.cancel_load(request_id)

    # --- saves ---------------------------------------------------------------------------------

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        self._release_match(request_id)
        self.tiers.forget(request_id)
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
            self._remember_tokens(request, indices, plan.keys)
        self._step.saves.append(BlockTransfer(request_id, tuple(block_ids[i] for i in indices), tuple(plan.slots)))
        self._saving[request_id] = plan
        logger.debug("save scheduled: request=%s blocks=%d", request_id, len(plan.keys))
        return True, None

    def _remember_tokens(self, request: Request, indices: list[int], keys) -> None:
        tokens, size = request.all_token_ids, self.block_size
        self.events.remember(keys, [tokens[i * size : (i + 1) * size] for i in indices])

    # --- per step --------------------------------------------------------------------------------

    def build_connector_meta(self) -> FlexKVStepMetadata:
        self._advance_lower_tiers()
        step, self._step = self._step, FlexKVStepMetadata()
        return step

    def _advance_lower_tiers(self) -> None:
        """Hand out the GPU copies of finished stagings; the stack commits spills and starts new ones."""
        for request_id, usable in self.tiers.advance():
            plan, block_ids = self._loading[request_id], self._staging.pop(request_id)
            if usable < len(plan.keys):
                logger.warning("staging failed at block %d of %d, recomputing the rest: request=%s",
                               usable, len(plan.keys), request_id)
            self._step.loads.append(BlockTransfer(request_id, block_ids[:usable], plan.slots[:usable],
                                                  unavailable=block_ids[usable:]))

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        report = output.kv_connector_worker_meta
        if not isinstance(report, FlexKVWorkerReport):
            report = FlexKVWorkerReport()
        for request_id in report.done_layerwise:
            self._complete_load(self._loading_layerwise.pop(request_id, None), report)
        for request_id in output.finished_recving or ():
            self._complete_load(self._loading.pop(request_id, None), report)
        failed_saves = report.failed_saves
        for request_id in output.finished_sending or ():
            plan = self._saving.pop(request_id, None)
            if plan is not None:
                ok = request_id not in failed_saves
                self.engine.complete_store(request_id, success=ok)
                if not ok:
                    if self.events is not None:
                        self.events.forget(plan.keys)
                    logger.warning("save failed, slots released: request=%s", request_id)
        self._advance_lower_tiers()  # start the write-through at once: it holds CPU blocks

    def _complete_load(self, plan: LoadPlan | None, report: FlexKVWorkerReport) -> None:
        if plan is None:
            return
        request_id = plan.request_id
        ok = request_id not in report.failed_loads
        self.engine.complete_load(request_id, success=ok, bad_keys=() if ok else plan.keys)
        if not ok:
            logger.warning("load failed, blocks dropped and recomputed: request=%s", request_id)

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
    def has_lower_tier_work(self) -> bool:
        return self.tiers.num_pending > 0

    @property
    def num_inflight(self) -> int:
        return len(self._loading) + len(self._loading_layerwise) + len(self._saving) + self.tiers.num_pending

    def shutdown(self) -> None:
        """Let in-flight lower-tier writes land (bounded), so a restart finds them."""
        self.tiers.close()
