"""Scheduler-role half of the connector: decides what to load and save, never touches bytes.

Request flow (see docs/architecture.md):
1. `get_num_new_matched_tokens` matches the request's vLLM block hashes beyond its GPU hit against
   the index, locks the hit and answers "load asynchronously" — the scheduler is never blocked.
2. `update_state_after_alloc` binds the hit to the GPU blocks vLLM allocated; the next
   `build_connector_meta` hands the copy to the workers.
   Hits that only a lower tier (SSD, cluster store) holds are first staged into CPU slots; their
   GPU copy is handed out once the reads finished. While a shared tier is being asked whether the
   blocks after a local hit exist, the answer is None ("ask again later").
3. Saves (`save_policy`): each step, `build_connector_meta` reserves pool slots for the full blocks
   of running requests whose KV earlier steps computed (`all`: prompt and generated, `prompt`:
   prompt only); `request_finished` does the same for what is left and asks vLLM to keep the GPU
   blocks until every save of the request landed. A request vLLM preempted in this step has its
   computed blocks saved in `handle_preemptions`, before the step reuses them.
   A cache reset (`reset_cache`, e.g. after a weight update) is a barrier: what was planned before it
   commits nothing after it (see `CacheEngine.reset`), and KV a request computed or loaded before it
   is never saved (vLLM preempts running requests first with `reset_running_requests`).
4. `update_connector_output` commits (or rolls back) what the workers finished; only then do blocks
   become matchable and visible to the router as events. Committed blocks are written through to
   every lower tier in the background.
Hybrid models (vLLM's hybrid KV cache manager: several KV-cache groups, or a sliding window) give
one block table per group. A save copies each group's blocks it still holds (a sliding-window group
has freed the blocks before its window) and the index records which groups each block holds; a hit
is cut to what every group can use (`index.groups.usable_hit`), and a load fills every block vLLM
gave each group except its null blocks. Hybrid models' hits are loaded between steps (see compat.py).
Tier assembly, the cascade and shared-tier lookups live in `dynamo_flexkv.tiers.stack.TierStack`; this
class translates vLLM's requests and block ids to keys and slots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_events import KVCacheEvent
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.index.groups import held_groups, usable_hit
from dynamo_flexkv.index.plans import LoadPlan, StorePlan, Stored
from dynamo_flexkv.index.tier import BlockState
from dynamo_flexkv.integration.vllm.compat import NULL_BLOCK_ID
from dynamo_flexkv.integration.vllm.events import EventTranslator
from dynamo_flexkv.integration.vllm.metadata import BlockTransfer, FlexKVStepMetadata, FlexKVWorkerReport
from dynamo_flexkv.integration.vllm.stats import FlexKVStats
from dynamo_flexkv.tiers.facts import InstanceFacts
from dynamo_flexkv.tiers.stack import TierStack

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    """A request between its first match and its end: what it was given and what is saved of it."""

    request: Request
    block_ids: list[list[int]]  # its GPU blocks per KV-cache group, as the scheduler output says
    kv_tokens: int = 0  # tokens whose KV the steps scheduled so far compute
    next_block: int = 0  # blocks before it are in the CPU tier or being written there
    stale: bool = False  # its KV predates the last cache reset: never saved (until it is recomputed)


class SchedulerSide:
    def __init__(self, facts: InstanceFacts, settings: FlexKVSettings, publish_events: bool, layerwise: bool):
        """`layerwise`: CPU-tier hits load inside the step (decided once: `compat.loads_layer_by_layer`)."""
        self.identity = facts.identity
        self.block_size = facts.block_size
        self.groups = facts.groups
        self.hybrid = facts.hybrid
        self.layerwise = layerwise
        self.save_policy = settings.save_policy
        self.tp_size = int(facts.layout.get("tp_size", 1))
        self.tiers = TierStack(facts, settings, record_events=publish_events)
        self.engine = self.tiers.engine
        self.events = EventTranslator(facts.block_size, self.tiers.media) if publish_events else None
        self._restored_events = self._announce_recovered()
        self.loaded_tokens = 0  # tokens whose load was scheduled, since start
        self.computed_tokens = 0  # tokens vLLM scheduled for computing, since start
        self.preemptions = 0  # preempted requests seen, since start
        self._reported = self.engine.snapshot()
        self._reported_io = self._tier_io()
        self._reported_health: dict[str, int] = {}  # tier -> healthy, as last reported
        self._stats = FlexKVStats()  # lookups and allocation failures since the last take_stats
        # request id -> (first block index of the hit, its locked plan), awaiting allocation
        self._matched: dict[str, tuple[int, LoadPlan]] = {}
        self._loading: dict[str, LoadPlan] = {}  # loads between steps, reported by vLLM
        self._loading_layerwise: dict[str, LoadPlan] = {}  # loads inside a step, reported by workers
        # request id -> (GPU block ids per group, group masks of the plan's blocks) awaiting staging
        self._staging: dict[str, tuple[list[list[int]], list[int]]] = {}
        self._tracked: dict[str, _Tracked] = {}
        self._saving: dict[str, tuple[str, StorePlan]] = {}  # save id -> (request id, plan)
        self._save_acks: dict[str, int] = {}  # save id -> ranks that finished it so far
        self._save_order: dict[str, int] = {}  # save id -> when it was planned
        self._save_failed: set[str] = set()
        self._held: set[str] = set()  # finished requests whose GPU blocks vLLM keeps for our saves
        self._lacking: dict[str, int] = {}  # request id -> first block of its load a group could not fill
        self._save_seq = 0
        self._step = FlexKVStepMetadata()
        logger.info(
            "scheduler ready: identity=%s cpu_slots=%d block_size=%d policy=%s tiers=%s",
            facts.identity, facts.geometry.num_slots, facts.block_size, settings.eviction_policy, self.tiers.names,
        )

    def _announce_recovered(self) -> list[KVCacheEvent]:
        """Events for the blocks lower tiers kept from an earlier run (with recorded tokens), so the
        router credits a restarted worker's disk tier."""
        if self.events is None:
            return []
        events = []
        for tier, found in self.tiers.recovered.items():
            known = [b for b in found if b.tokens]
            self.events.remember([b.key for b in known], [b.tokens for b in known])
            announced = self.events.translate([Stored(tier, tuple(b.key for b in found), tuple(b.parent for b in found))])
            logger.info("tier %s: %d of %d recovered blocks announced", tier,
                        sum(len(e.block_hashes) for e in announced), len(found))
            events += announced
        return events

    # --- loads ---------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        request_id = request.request_id
        if request_id not in self._tracked:
            self._tracked[request_id] = _Tracked(request, [[] for _ in self.groups])
        first = num_computed_tokens // self.block_size
        keys = request.block_hashes[first:]
        first_parent = request.block_hashes[first - 1] if first else None
        started = time.perf_counter()
        hits = self.tiers.lookup(request_id, keys, first_parent)
        self._stats.observe("lookup_seconds", time.perf_counter() - started)
        if hits is None:  # a shared tier is being asked: vLLM asks again in a later step
            self._release_match(request_id)
            return None, False
        if self.hybrid and hits:  # as far as every group finds the blocks it needs
            hits = usable_hit(self.groups, self.engine.groups_of(keys[:hits]), first, self.block_size)
        self._stats.add("query_tokens", len(keys) * self.block_size)
        self._stats.add("miss_tokens", (len(keys) - hits) * self.block_size)
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
        block_ids = [list(ids[first : first + count]) for ids in blocks.get_block_ids()]
        masks = self.engine.groups_of(plan.keys)
        # tokens vLLM will not compute (a full-prompt async hit still recomputes its last one)
        self.loaded_tokens += min(num_external_tokens, request.num_tokens - 1 - first * self.block_size)
        if plan.staged:
            self._loading[request_id] = plan
            self.tiers.stage(plan)
            self._staging[request_id] = (block_ids, masks)
        elif self.layerwise:
            self._loading_layerwise[request_id] = plan
            self._step.layerwise_loads.append(self._load_transfer(request_id, plan, block_ids, masks))
        else:
            self._loading[request_id] = plan
            self._step.loads.append(self._load_transfer(request_id, plan, block_ids, masks))
        logger.debug("load scheduled: request=%s blocks=%d staged=%d", request_id, count, len(plan.staged))

    def _load_transfer(self, request_id: str, plan: LoadPlan, block_ids: list[list[int]], masks: list[int],
                       usable: int | None = None) -> BlockTransfer:
        """The copies of a load into the blocks vLLM gave each group (`block_ids[g][j]` for
        `plan.keys[j]`), leaving out its null blocks. A block the slot cannot fill (the slot lacks
        the group's KV, or it is beyond the `usable` blocks staging delivered) is unavailable: vLLM
        recomputes it."""
        usable = len(plan.keys) if usable is None else usable
        pairs, unavailable = [], []
        for bit, ids in enumerate(block_ids):
            live = [(j, block_id) for j, block_id in enumerate(ids) if block_id != NULL_BLOCK_ID]
            lacking = [j for j, _ in live if j < usable and not masks[j] >> bit & 1]
            pairs.append([(block_id, plan.slots[j]) for j, block_id in live if j < usable and masks[j] >> bit & 1])
            lacking_set = set(lacking)
            unavailable += [block_id for j, block_id in live if j >= usable or j in lacking_set]
            if lacking:  # usable_hit cut the hit for every group: vLLM kept more blocks than predicted
                logger.warning("group %d of request %s: %d blocks the tier does not hold, recomputed",
                               bit, request_id, len(lacking))
                # dropped when the load completes, or the request would match them again and again
                self._lacking[request_id] = min(lacking[0], self._lacking.get(request_id, lacking[0]))
        return BlockTransfer.of_groups(request_id, pairs, unavailable)

    def _release_match(self, request_id: str) -> None:
        if self._matched.pop(request_id, None) is not None:
            self.engine.cancel_load(request_id)

    # --- saves ---------------------------------------------------------------------------------

    def request_finished(self, request: Request, block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        """`block_ids`: the request's blocks per KV-cache group, as vLLM is about to free them."""
        request_id = request.request_id
        tracked = self._tracked.pop(request_id, None) or _Tracked(request, [])
        self._release_match(request_id)
        self.tiers.forget(request_id)
        if request_id in self._loading:
            return False, None  # its blocks are still being filled; vLLM frees them after the load
        tracked.block_ids = [list(ids) for ids in block_ids]
        save = self._plan_save(tracked, request.num_computed_tokens, request.num_computed_tokens)
        if save is not None:
            self._step.saves.append(save)
        if not any(owner == request_id for owner, _ in self._saving.values()):
            return False, None
        self._held.add(request_id)
        self._step.hold.append(request_id)
        return True, None

    def _plan_save(self, tracked: _Tracked, kv_tokens: int, num_computed: int) -> BlockTransfer | None:
        """Reserve slots for the request's full blocks in `[next_block, kv_tokens)` the tier lacks
        (prompt blocks only under the `prompt` policy); the copy to hand to the workers, or None.
        `num_computed`: tokens computed when vLLM last freed blocks outside a sliding window (or
        more): such blocks' KV is left out of the save."""
        if tracked.stale:
            return None
        request, size = tracked.request, self.block_size
        end = min(kv_tokens // size, len(request.block_hashes), max(map(len, tracked.block_ids)))
        if self.save_policy == "prompt":
            end = min(end, request.num_prompt_tokens // size)
        start = tracked.next_block
        if end <= start:
            return None
        keys = request.block_hashes[start:end]
        parents = [request.block_hashes[start - 1] if start else None, *keys[:-1]]
        save_id = f"{request.request_id}/{self._save_seq}"
        self._save_seq += 1
        masks = None
        if self.hybrid:
            masks = [held_groups(self.groups, tracked.block_ids, i, num_computed, size, NULL_BLOCK_ID)
                     for i in range(start, end)]
        plan = self.engine.prepare_store(save_id, keys, parents, masks)
        # Blocks the tier now holds or is writing need no later save; a block that found no slot
        # (or whose parent is not in the tier yet) is tried again in a later step.
        top_state = self.engine.top_state
        while tracked.next_block < end and top_state(request.block_hashes[tracked.next_block]) is not None:
            tracked.next_block += 1
        if tracked.next_block < end:  # a block was left out: no slot, or its parent is still being written
            parent = request.block_hashes[tracked.next_block - 1] if tracked.next_block else None
            if parent is None or top_state(parent) is BlockState.READY or (plan is not None and parent in plan.keys):
                self._stats.add("allocation_failures", 1)
        if plan is None:
            return None
        position = {key: start + i for i, key in enumerate(keys)}
        indices = [position[key] for key in plan.keys]
        if self.events is not None:
            self._remember_tokens(request, indices, plan.keys)
        self._saving[save_id] = (request.request_id, plan)
        self._save_order[save_id] = self._save_seq
        logger.debug("save scheduled: request=%s save=%s blocks=%d", request.request_id, save_id, len(plan.keys))
        pairs = [[(ids[i], slot) for i, slot in zip(indices, plan.slots) if masks is None or masks[i - start] >> bit & 1]
                 for bit, ids in enumerate(tracked.block_ids)]
        return BlockTransfer.of_groups(request.request_id, pairs, save_id=save_id)

    def _remember_tokens(self, request: Request, indices: list[int], keys) -> None:
        tokens, size = request.all_token_ids, self.block_size
        lora = request.lora_request
        self.events.remember(keys, [tokens[i * size : (i + 1) * size] for i in indices],
                             None if lora is None else (lora.adapter_id, lora.name))

    # --- per step --------------------------------------------------------------------------------

    def build_connector_meta(self, output: SchedulerOutput) -> FlexKVStepMetadata:
        self.computed_tokens += output.total_num_scheduled_tokens
        if self._saving and any(group.window is not None for group in self.groups):
            # an earlier save may still be reading a sliding-window block vLLM freed and hands out now
            self._step.allocated = _allocated_block_ids(output)
        self._save_preempted(output.preempted_req_ids or ())
        self._track_blocks(output)
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            tracked = self._tracked.get(request_id)
            if tracked is None:
                continue
            request = tracked.request
            if self.save_policy != "finished":
                # KV of the steps before this one; the last token's is computed only with the next
                done = min(request.num_computed_tokens, request.num_tokens - 1)
                save = self._plan_save(tracked, done, request.num_computed_tokens)
                if save is not None:
                    self._step.saves.append(save)
            tracked.kv_tokens = request.num_computed_tokens + num_tokens
        self._advance_lower_tiers()
        step, self._step = self._step, FlexKVStepMetadata()
        return step

    def _track_blocks(self, output: SchedulerOutput) -> None:
        """Follow each running request's GPU block ids, which vLLM hands out step by step."""
        for new in output.scheduled_new_reqs:
            if (tracked := self._tracked.get(new.req_id)) is not None:
                tracked.block_ids = [list(ids) for ids in new.block_ids]
        cached = output.scheduled_cached_reqs
        for request_id, new_ids in zip(cached.req_ids, cached.new_block_ids):
            tracked = self._tracked.get(request_id)
            if tracked is None or new_ids is None:
                continue
            if request_id in cached.resumed_req_ids:
                tracked.block_ids = [list(ids) for ids in new_ids]
            else:
                for ids, added in zip(tracked.block_ids, new_ids, strict=True):
                    ids.extend(added)

    def _save_preempted(self, preempted: Iterable[str]) -> None:
        """vLLM freed these requests' blocks in this step: save what they computed before the step
        reuses them (the workers do it in `handle_preemptions`); not what predates a cache reset (the
        requests `reset_running_requests` preempted), which they recompute."""
        for request_id in preempted:
            tracked = self._tracked.get(request_id)
            if tracked is None:
                continue
            self.preemptions += 1
            request = tracked.request
            save = self._plan_save(tracked, min(tracked.kv_tokens, request.num_tokens - 1), tracked.kv_tokens)
            if save is not None:
                self._step.preemption_saves.append(save)
            self._step.preempted.append(request_id)
            logger.info("request preempted: request=%s computed_tokens=%d saved_blocks=%d", request_id,
                        tracked.kv_tokens, len(save.block_ids[0]) if save else 0)
            tracked.block_ids, tracked.kv_tokens, tracked.stale = [[] for _ in self.groups], 0, False

    def _advance_lower_tiers(self) -> None:
        """Hand out the GPU copies of finished stagings; the stack commits spills and starts new ones."""
        tokens_of = None if self.events is None else self.events.persistable_tokens
        for request_id, usable in self.tiers.advance(tokens_of):
            plan, (block_ids, masks) = self._loading[request_id], self._staging.pop(request_id)
            if usable < len(plan.keys):
                logger.warning("staging failed at block %d of %d, recomputing the rest: request=%s",
                               usable, len(plan.keys), request_id)
            self._step.loads.append(self._load_transfer(request_id, plan, block_ids, masks, usable))

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        self.tiers.refresh_writable()  # the commits below plan spills only into tiers that take them
        report = output.kv_connector_worker_meta
        if not isinstance(report, FlexKVWorkerReport):
            report = FlexKVWorkerReport()
        for request_id in report.done_layerwise:
            self._complete_load(self._loading_layerwise.pop(request_id, None), report)
        for request_id in output.finished_recving or ():
            self._complete_load(self._loading.pop(request_id, None), report)
        self._save_failed |= report.failed_saves
        done = []
        for save_id, ranks in report.saves_done.items():
            self._save_acks[save_id] = self._save_acks.get(save_id, 0) + ranks
            if self._save_acks[save_id] >= self.tp_size:
                done.append(save_id)
        # in the order they were planned: a save may extend blocks an earlier one wrote
        for save_id in sorted(done, key=self._save_order.pop):
            self._complete_save(save_id)
        for request_id in output.finished_sending or ():
            self._held.discard(request_id)
        self._advance_lower_tiers()  # start the write-through at once: it holds CPU blocks

    def _complete_save(self, save_id: str) -> None:
        del self._save_acks[save_id]
        ok = save_id not in self._save_failed
        self._save_failed.discard(save_id)
        request_id, plan = self._saving.pop(save_id)
        committed = self.engine.complete_store(save_id, success=ok)
        if not committed and self.events is not None:
            self.events.forget(plan.keys)
        if not ok:
            logger.warning("save failed, slots released: request=%s save=%s", request_id, save_id)
        elif not committed:
            logger.info("save dropped, planned before a cache reset or the block it extends was not stored: "
                        "request=%s save=%s", request_id, save_id)

    def _complete_load(self, plan: LoadPlan | None, report: FlexKVWorkerReport) -> None:
        if plan is None:
            return
        request_id = plan.request_id
        ok = request_id not in report.failed_loads
        lacking = self._lacking.pop(request_id, None)
        if lacking is not None:  # a group found blocks it needs missing: drop them, the request recomputes
            self.engine.complete_load(request_id, success=False, bad_keys=plan.keys[lacking:])
        else:
            self.engine.complete_load(request_id, success=ok, bad_keys=() if ok else plan.keys)
        if not ok:
            logger.warning("load failed, blocks dropped and recomputed: request=%s", request_id)

    def take_events(self) -> Iterable[KVCacheEvent]:
        tier_events = self.engine.take_events()
        if self.events is None:
            return ()
        restored, self._restored_events = self._restored_events, []
        return restored + self.events.translate(tier_events)

    def reset_cache(self) -> bool:
        """vLLM's connector reset (after a weight update, RL loops call `reset_prefix_cache(
        reset_running_requests=True, reset_connector=True)`: vLLM preempts the running requests, then
        calls this). Nothing stored or planned before it is matched or committed after it, in any tier,
        and no request saves KV computed or loaded before it."""
        for request_id in list(self._matched):
            self._release_match(request_id)
        stale = 0
        for request_id, tracked in self._tracked.items():
            tracked.stale = any(tracked.block_ids) or request_id in self._loading
            tracked.next_block = 0
            stale += tracked.stale
        self.tiers.reset()  # every tier, on disk too
        logger.info("cache reset: reset epoch %d, every block dropped, %d saves and %d loads in flight commit "
                    "nothing, %d requests' earlier KV never saved", self.engine.epoch, len(self._saving),
                    len(self._loading), stale)
        return True

    def _tier_io(self) -> dict[str, tuple[int, int, int]]:
        """Bytes each lower tier's backend has read and written so far, and its calls that timed out."""
        return {b.name: (getattr(b.stats, "bytes_read", 0), getattr(b.stats, "bytes_written", 0),
                         getattr(b.stats, "timeouts", 0)) for b in self.tiers.backends}

    def take_stats(self) -> FlexKVStats | None:
        """Lookups, hits, stores, evictions and lower-tier I/O since the last call, and the blocks
        each tier holds now."""
        now, before = self.engine.snapshot(), self._reported
        io_now, io_before = self._tier_io(), self._reported_io
        self._reported, self._reported_io = now, io_now
        stats, self._stats = self._stats, FlexKVStats()
        for tier, held in now.blocks_held.items():
            changed = False
            for name, counts, scale in (("hit_tokens", "hit_blocks", self.block_size),
                                        ("stored_blocks", "stored_blocks", 1),
                                        ("evicted_blocks", "evicted_blocks", 1)):
                delta = getattr(now, counts)[tier] - getattr(before, counts)[tier]
                if delta:
                    stats.add(f"{name}:{tier}", delta * scale)
                    changed = True
            if held != before.blocks_held[tier] or changed:
                stats.data[f"held_blocks:{tier}"] = held
        for tier, (read, written, timeouts) in io_now.items():
            was_read, was_written, timed_out = io_before.get(tier, (0, 0, 0))
            if read > was_read:
                stats.add(f"tier_read_bytes:{tier}", read - was_read)
            if written > was_written:
                stats.add(f"tier_written_bytes:{tier}", written - was_written)
            if timeouts > timed_out:
                stats.add(f"tier_timeouts:{tier}", timeouts - timed_out)
        for backend in self.tiers.backends:  # reported at the first interval, then when it changes
            healthy = int(backend.healthy)
            if self._reported_health.get(backend.name) != healthy:
                self._reported_health[backend.name] = stats.data[f"tier_healthy:{backend.name}"] = healthy
        return None if stats.is_empty() else stats

    @property
    def has_lower_tier_work(self) -> bool:
        return self.tiers.num_pending > 0

    @property
    def num_inflight(self) -> int:
        return (len(self._loading) + len(self._loading_layerwise) + len(self._saving) + len(self._held)
                + self.tiers.num_pending)

    def shutdown(self) -> None:
        """Let in-flight lower-tier writes land (bounded), so a restart finds them."""
        self.tiers.close()


def _allocated_block_ids(output: SchedulerOutput) -> list[int]:
    """The GPU blocks this step may write before or during its forward: every group's blocks of new
    and resumed requests (their prefix-cache hits too: extra safety, never a missed one), the blocks
    running requests gained, and the destinations of vLLM's copy-on-write copies."""
    allocated: list[int] = []
    for new in output.scheduled_new_reqs:
        for ids in new.block_ids:
            allocated += ids
    for added in output.scheduled_cached_reqs.new_block_ids:
        for ids in added or ():
            allocated += ids
    allocated += [copy.dst_block_id for copy in getattr(output, "kv_cache_block_copies", None) or ()]
    return allocated
