"""The cache engine: vLLM-facing verbs over the tiers, producing plans as plain data.

The verbs follow vLLM's ``v1/kv_offload`` manager: ``lookup`` -> ``prepare_load`` ->
(``complete_stage``) -> ``complete_load``, ``prepare_store`` -> ``complete_store``, plus
``prepare_spill`` -> ``complete_spill`` for the cascade into lower tiers, ``admit`` for blocks
found in a shared tier, ``touch``, ``reset`` and
``take_events``. A plan names the tiers and slots to move; the data plane executes it and the
caller acknowledges it exactly once, which commits or rolls back what the plan reserved.

A reset is a barrier: every plan belongs to the reset epoch it was made in, and a plan of an earlier
epoch commits nothing (after a weight update, bytes copied before the reset hold the old weights' KV).

Tiers are ordered fastest first. Stores land in the first (top) tier; every lower tier is filled
by its own spills (write-through fanned out from the top tier, so no tier is read to fill another)
and read back by staging into the top tier, from which every load reaches the GPU. Not thread-safe: vLLM's scheduler is the one caller.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

from dynamo_flexkv.index.groups import ALL_GROUPS
from dynamo_flexkv.index.plans import (
    Cleared,
    EngineStats,
    LoadPlan,
    Removed,
    SpillPlan,
    Staging,
    StorePlan,
    Stored,
    TierEvent,
)
from dynamo_flexkv.index.tier import BlockState, TierIndex

# a stored block may extend one that is READY or still being written (see prepare_store)
_LINKABLE = (BlockState.READY, BlockState.WRITING)


@dataclass(frozen=True, slots=True)
class _PendingStore:
    plan: StorePlan
    parents: tuple[bytes | None, ...]
    groups: tuple[int, ...] | None  # KV-cache group masks of the plan's keys (None: every group)
    epoch: int  # the reset epoch it was planned in


@dataclass(slots=True)
class _PendingLoad:
    plan: LoadPlan
    first_parent: bytes | None  # the block before keys[0], for staged blocks' Stored events
    epoch: int  # the reset epoch it was planned in
    locked: list[bytes] = field(default_factory=list)  # keys this load holds locked in the top tier
    staging: bool = False  # staged blocks not yet acknowledged by complete_stage


class CacheEngine:
    """Coordinates ``tiers`` (fastest first) for one vLLM scheduler.

    Every ``prepare_*`` that returns a plan must be followed by exactly one completion
    (``complete_load``/``cancel_load``, ``complete_store``); ``pending_loads()`` and
    ``pending_stores()`` show what is outstanding.
    """

    def __init__(self, tiers: Sequence[TierIndex], *, record_events: bool = True) -> None:
        if not tiers:
            raise ValueError("CacheEngine needs at least one tier")
        names = [tier.name for tier in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self._tiers = tuple(tiers)
        self._by_name = {tier.name: tier for tier in tiers}
        self._record_events = record_events
        self._events: list[TierEvent] = []
        self._loads: dict[str, _PendingLoad] = {}
        self._stores: dict[str, _PendingStore] = {}
        self._spills: dict[int, tuple[SpillPlan, int]] = {}  # spill id -> (plan, its reset epoch)
        self._new_spills: list[SpillPlan] = []
        self._epoch = 0  # resets so far: plans of an earlier epoch commit nothing
        self._spill_ids = itertools.count(1)
        # Lower tiers that cannot take writes now (a degraded disk): no spill is planned into them,
        # since planning evicts readable blocks there for writes that would fail.
        self.unwritable: set[str] = set()
        zero = dict.fromkeys(names, 0)
        self._stats = EngineStats(
            hit_blocks=dict(zero),
            stored_blocks=dict(zero),
            evicted_blocks=dict(zero),
            dropped_blocks=dict(zero),
        )

    @property
    def tiers(self) -> tuple[TierIndex, ...]:
        return self._tiers

    @property
    def epoch(self) -> int:
        """How many resets this engine has seen."""
        return self._epoch

    def top_state(self, key: bytes) -> BlockState | None:
        """The state of ``key`` in the top tier, where stores land (None: absent)."""
        return self._tiers[0].state_of(key)

    # ---- loads ---------------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` READY in some tier. Changes no cache state."""
        self._stats.lookups += 1
        tiers = self._tiers
        if len(tiers) == 1:
            return tiers[0].match(keys)
        n = 0
        for key in keys:
            if not any(tier.is_ready(key) for tier in tiers):
                break
            n += 1
        return n

    def groups_of(self, keys: Sequence[bytes]) -> list[int]:
        """The KV-cache group masks (see ``index.groups``) of the leading ``keys`` some tier holds
        READY, as held by the tier a load reads each from (the first that has it)."""
        masks = []
        for key in keys:
            tier = next((tier for tier in self._tiers if tier.is_ready(key)), None)
            if tier is None:
                break
            masks.append(tier.groups_of(key))
        return masks

    def touch(self, keys: Sequence[bytes]) -> None:
        """Record a hit on ``keys`` in every tier that holds them READY."""
        for tier in self._tiers:
            tier.touch(keys)

    def prepare_load(
        self, request_id: str, keys: Sequence[bytes], first_parent: bytes | None = None
    ) -> LoadPlan | None:
        """Lock ``keys`` (a prefix ``lookup`` counted) and return where to read them; None if no
        block can be loaded. A request has at most one load: a second call first releases the
        previous plan (vLLM's scheduler asks again when its own allocation failed).

        Blocks READY in the top tier are locked there. Blocks only in a lower tier are locked
        there and get a top-tier slot (WRITING) to be staged into; ``first_parent`` is the block
        before ``keys[0]`` (so staged blocks are announced with their true parent). The plan may
        be shorter than ``keys``: it stops before a block the top tier is still writing or has no
        room for. ``ValueError`` (nothing locked) if a key is READY in no tier.
        """
        self.cancel_load(request_id)
        top, lower = self._tiers[0], self._tiers[1:]
        sources: list[TierIndex | None] = []  # None: already in the top tier
        for key in keys:
            if top.is_ready(key):
                sources.append(None)
                continue
            if top.contains(key):
                break  # being written (or dropped) up there: stop rather than race it
            source = next((tier for tier in lower if tier.is_ready(key)), None)
            if source is None:
                raise ValueError(
                    f"request {request_id}: block {len(sources)} of {len(keys)} is in no tier "
                    f"(lookup finds {self.lookup(keys)}); pass what lookup counted"
                )
            sources.append(source)
        keys = list(keys[: len(sources)])
        resident = [key for key, source in zip(keys, sources) if source is None]
        slots_of = dict(zip(resident, top.lock(resident)))
        staged_at = [i for i, source in enumerate(sources) if source is not None]
        if staged_at:
            staged_keys = [keys[i] for i in staged_at]
            parents = [keys[i - 1] if i else first_parent for i in staged_at]
            slots = self._allocate(top, staged_keys, parents)
            placed = len(slots)
            if placed < len(staged_at):  # no room for the rest: load the prefix before it
                cut = staged_at[placed]
                top.unlock([key for key in keys[cut:] if key in slots_of])
                keys, staged_at = keys[:cut], staged_at[:placed]
            slots_of.update(zip(staged_keys, slots))
        if not keys:
            return None
        staged = []
        for i in staged_at:
            source = sources[i]
            assert source is not None
            staged.append(Staging(i, source.name, source.lock([keys[i]])[0]))
        plan = LoadPlan(request_id, top.name, tuple(keys), tuple(slots_of[key] for key in keys), tuple(staged))
        locked = [key for key, source in zip(keys, sources) if source is None]
        self._loads[request_id] = _PendingLoad(plan, first_parent, self._epoch, locked, staging=bool(staged))
        return plan

    def complete_stage(self, request_id: str, ok: Sequence[bool], held: Collection[int] = ()) -> int:
        """Acknowledge the staging reads of the request's load; ``ok[i]`` is for ``staged[i]``.

        Good blocks become READY in the top tier (announced; locked for this load). A bad block is
        dropped from its lower tier (its bytes cannot be trusted) and it and every block after it
        are not loaded. ``held``: positions in ``staged`` of failed reads that may still write into
        their slots (a call past its deadline); those stay WRITING in the top tier, so their slots
        are not reused, until ``release_held``. Returns how many leading blocks of the plan can be
        loaded: none if the plan predates a reset (its blocks hold KV of before it), whose staged
        blocks are never committed.
        """
        pending = self._loads[request_id]
        plan, top = pending.plan, self._tiers[0]
        if not pending.staging or len(ok) != len(plan.staged):
            raise ValueError(f"request {request_id}: expected {len(plan.staged)} staging results")
        pending.staging = False
        if pending.epoch != self._epoch:
            self._release_staged(plan, held)
            return 0
        usable = next((s.index for s, good in zip(plan.staged, ok) if not good), len(plan.keys))
        committed, parents = [], []
        for position, (staging, good) in enumerate(zip(plan.staged, ok)):
            key = plan.keys[staging.index]
            source = self._by_name[staging.tier]
            source.unlock([key])
            if staging.index < usable:
                top.commit([key], [source.groups_of(key)])
                top.lock([key])
                pending.locked.append(key)
                committed.append(key)
                parents.append(plan.keys[staging.index - 1] if staging.index else pending.first_parent)
                self._stats.hit_blocks[source.name] += 1
                continue
            if position not in held:
                top.rollback([key])
            if not good:
                dropped = source.drop([key])
                self._stats.dropped_blocks[source.name] += len(dropped)
                self._announce_removed(source.name, dropped)
        if committed:
            self._stats.stored_blocks[top.name] += len(committed)
            if self._record_events:
                self._events.append(Stored(top.name, tuple(committed), tuple(parents)))
        if usable < len(plan.keys):
            self._stats.load_failures += 1
        return usable

    def release_held(self, keys: Sequence[bytes]) -> None:
        """The late reads of blocks ``complete_stage`` held returned: free their top-tier slots."""
        self._tiers[0].rollback(keys)

    def complete_load(
        self, request_id: str, success: bool, bad_keys: Sequence[bytes] = ()
    ) -> list[bytes]:
        """Finish the request's load: unlock its blocks. After a failure, ``bad_keys`` (blocks
        of this plan whose stored bytes cannot be trusted) are dropped from the top tier; returns
        the dropped keys. ``KeyError`` if the request has no load; ``ValueError`` (nothing
        changed) if a bad key is not in the plan or staging was not acknowledged. A load planned
        before a reset only releases its blocks (dropped by the reset): no hit, nothing else dropped."""
        pending = self._loads[request_id]
        plan = pending.plan
        if pending.staging:
            raise ValueError(f"request {request_id}: complete_stage must come first")
        if bad_keys:
            if success:
                raise ValueError(f"request {request_id}: bad_keys given for a successful load")
            stray = set(bad_keys).difference(plan.keys)
            if stray:
                raise ValueError(f"request {request_id}: {len(stray)} bad keys not in its plan")
        del self._loads[request_id]
        tier = self._by_name[plan.tier]
        tier.unlock(pending.locked)
        if pending.epoch != self._epoch:
            return []
        if success:
            staged = {plan.keys[s.index] for s in plan.staged}
            self._stats.hit_blocks[tier.name] += sum(key not in staged for key in pending.locked)
            return []
        self._stats.load_failures += 1
        dropped = tier.drop(bad_keys)
        self._stats.dropped_blocks[tier.name] += len(dropped)
        self._announce_removed(tier.name, dropped)
        return dropped

    def cancel_load(self, request_id: str) -> None:
        """Release the request's load plan without loading it; no-op if it has none. Only before
        its staging reads were issued: their slots are freed here."""
        pending = self._loads.pop(request_id, None)
        if pending is None:
            return
        self._tiers[0].unlock(pending.locked)
        if pending.staging:
            self._release_staged(pending.plan)

    def _release_staged(self, plan: LoadPlan, held: Collection[int] = ()) -> None:
        """Free the top-tier slots of a load's staged blocks (but those of `held` positions, see
        `complete_stage`), and unlock their sources."""
        top = self._tiers[0]
        for position, staging in enumerate(plan.staged):
            key = plan.keys[staging.index]
            self._by_name[staging.tier].unlock([key])
            if position not in held:
                top.rollback([key])

    # ---- stores --------------------------------------------------------------------------

    def prepare_store(
        self, request_id: str, keys: Sequence[bytes], parents: Sequence[bytes | None],
        groups: Sequence[int] | None = None,
    ) -> StorePlan | None:
        """Reserve slots in the first tier for those ``keys`` it lacks; None if there are none.

        ``parents[i]`` is the block ``keys[i]`` extends (None for the first block); ``groups[i]``
        the mask of the KV-cache groups whose KV the store copies (default: every group). Keys already
        present are skipped (READY ones count as a hit). A key is stored only if its parent is
        None, READY or WRITING in the tier, or planned earlier in this call: a request's last
        blocks are planned while the save of its previous chunk is still in flight (vLLM frees a
        finished request's blocks after that one step). ``complete_store`` commits a plan only once
        its first parent is READY, so a block is never left unreachable and its Stored event never
        precedes its parent's. Planning
        stops at the first missing key that cannot be placed (parent not available, or no slot
        left), so the plan is a prefix of the missing keys, in order. Evictions it causes are
        published at once.

        A request can have one store in flight: ``RuntimeError`` if one is pending.
        """
        if request_id in self._stores:
            raise RuntimeError(f"request {request_id} already has a store in flight")
        if len(keys) != len(parents):
            raise ValueError(f"request {request_id}: {len(keys)} keys but {len(parents)} parents")
        tier = self._tiers[0]
        hits: list[bytes] = []
        new_keys: list[bytes] = []
        new_parents: list[bytes | None] = []
        new_groups: list[int] = []
        planned: set[bytes] = set()
        state_of = tier.state_of
        masks = groups if groups is not None else [ALL_GROUPS] * len(keys)
        for key, parent, mask in zip(keys, parents, masks, strict=True):
            state = state_of(key)
            if state is not None:
                if state is BlockState.READY:
                    hits.append(key)
                continue
            if parent is not None and parent not in planned and state_of(parent) not in _LINKABLE:
                break
            new_keys.append(key)
            new_parents.append(parent)
            new_groups.append(mask)
            planned.add(key)
        tier.touch(hits)
        if not new_keys:
            return None

        slots = self._allocate(tier, new_keys, new_parents)
        placed = len(slots)
        if placed == 0:
            return None
        plan = StorePlan(request_id, tier.name, tuple(new_keys[:placed]), tuple(slots))
        self._stores[request_id] = _PendingStore(plan, tuple(new_parents[:placed]),
                                                 None if groups is None else tuple(new_groups[:placed]), self._epoch)
        return plan

    def complete_store(self, request_id: str, success: bool) -> bool:
        """Finish the request's store: on success its blocks become READY and are announced, and
        their write-through into the next tier is planned (see ``take_spills``); otherwise, or if
        the block the plan extends is not READY (its own store failed, or has not completed yet), or
        the plan predates a reset, they are rolled back (never announced, so nothing is published).
        Returns whether the blocks were committed. ``KeyError`` if the request has no store in flight."""
        pending = self._stores.pop(request_id)
        plan = pending.plan
        tier = self._by_name[plan.tier]
        first_parent = pending.parents[0]
        if (not success or pending.epoch != self._epoch
                or (first_parent is not None and not tier.is_ready(first_parent))):
            tier.rollback(plan.keys)
            return False
        tier.commit(plan.keys, pending.groups)
        self._stats.stored_blocks[tier.name] += len(plan.keys)
        if self._record_events:
            self._events.append(Stored(tier.name, plan.keys, pending.parents))
        for lower in self._tiers[1:]:  # write-through, fanned out from the top tier to every lower one
            spill = self.prepare_spill(plan.keys, pending.parents, lower.name)
            if spill is not None:
                self._new_spills.append(spill)
        return True

    # ---- cascade -------------------------------------------------------------------------

    def prepare_spill(
        self, keys: Sequence[bytes], parents: Sequence[bytes | None], dst_tier: str | None = None
    ) -> SpillPlan | None:
        """Plan the write-through of top-tier blocks into ``dst_tier`` (default: the second tier);
        None if nothing to do.

        Blocks the destination already holds (in any state) are skipped; planning stops at a block
        that is no longer READY above or whose parent the destination will not hold, and at the
        first block it has no room for. Planned blocks are locked above (not evicted while being
        read) and WRITING below. Complete the spills of one destination in the order they were
        prepared, so a parent is always announced before its children in every tier.
        """
        if len(self._tiers) < 2:
            return None
        src = self._tiers[0]
        dst = self._tiers[1] if dst_tier is None else self._by_name[dst_tier]
        if dst is src:
            raise ValueError(f"cannot spill tier {src.name} into itself")
        if dst.name in self.unwritable:
            return None
        new_keys: list[bytes] = []
        new_parents: list[bytes | None] = []
        for key, parent in zip(keys, parents, strict=True):
            if dst.contains(key):
                continue
            if not src.is_ready(key) or not (parent is None or dst.contains(parent) or parent in new_keys[-1:]):
                break
            new_keys.append(key)
            new_parents.append(parent)
        if not new_keys:
            return None
        slots = self._allocate(dst, new_keys, new_parents)
        placed = len(slots)
        if placed == 0:
            return None
        keys_placed = tuple(new_keys[:placed])
        plan = SpillPlan(next(self._spill_ids), src.name, dst.name, keys_placed, tuple(new_parents[:placed]),
                         tuple(src.lock(keys_placed)), tuple(slots))
        self._spills[plan.spill_id] = (plan, self._epoch)
        return plan

    def take_spills(self) -> list[SpillPlan]:
        """Spills planned by committed stores since the last call (write-through), oldest first."""
        spills, self._new_spills = self._new_spills, []
        return spills

    def complete_spill(self, spill_id: int, ok: Sequence[bool]) -> int:
        """Acknowledge a spill; ``ok[i]`` is for ``keys[i]``. Blocks before the first failure become
        READY below and are announced; the rest are rolled back (a child is never kept without its
        parent), and all of them if the spill predates a reset. Returns how many were committed."""
        plan, epoch = self._spills.pop(spill_id)
        src, dst = self._by_name[plan.src], self._by_name[plan.dst]
        good = next((i for i, flag in enumerate(ok) if not flag), len(plan.keys)) if epoch == self._epoch else 0
        src.unlock(plan.keys)
        dst.rollback(plan.keys[good:])
        if good:
            dst.commit(plan.keys[:good], [src.groups_of(key) for key in plan.keys[:good]])
            self._stats.stored_blocks[dst.name] += good
            if self._record_events:
                self._events.append(Stored(dst.name, plan.keys[:good], plan.parents[:good]))
        return good

    def admit(self, tier: str, keys: Sequence[bytes], parents: Sequence[bytes | None]) -> int:
        """Record blocks found in a shared tier (written by another instance) as READY there, so
        they can be matched and staged. Keys already present are skipped; not announced (their
        tokens are unknown here; they are announced when staged up). Returns how many were placed."""
        index = self._by_name[tier]
        new = [(key, parent) for key, parent in zip(keys, parents, strict=True) if not index.contains(key)]
        if not new:
            return 0
        slots = self._allocate(index, [key for key, _ in new], [parent for _, parent in new])
        index.commit([key for key, _ in new[: len(slots)]])
        return len(slots)

    def restore(self, tier: str, blocks: Sequence[tuple[bytes, int, bytes | None]]) -> None:
        """Re-admit blocks a lower tier found on restart, with their parents. No event is recorded:
        tokens are not the index's business; the scheduler announces the blocks whose tokens the
        lower tier recorded."""
        self._by_name[tier].restore(blocks)

    # ---- whole cache ---------------------------------------------------------------------

    def reset(self) -> list[bytes]:
        """A barrier (e.g. the weights changed): nothing stored before it is matched after it, and
        nothing planned before it commits after it, in any tier. Every READY block leaves: unused
        ones at once, those a plan holds when it ends (DROPPED). Plans in flight complete without
        committing (see ``complete_*``); spills not yet taken are released here, so they are never
        written. Each tier publishes one Cleared event; returns the keys that left."""
        self._epoch += 1
        for plan in self._new_spills:
            del self._spills[plan.spill_id]
            self._by_name[plan.src].unlock(plan.keys)
            self._by_name[plan.dst].rollback(plan.keys)
        self._new_spills = []
        removed: list[bytes] = []
        for tier in self._tiers:
            gone = tier.clear()
            removed += gone
            if self._record_events:
                self._events.append(Cleared(tier.name, tuple(gone)))
        return removed

    def take_events(self) -> list[TierEvent]:
        """Return the events recorded since the last call, oldest first, and forget them."""
        events, self._events = self._events, []
        return events

    def snapshot(self) -> EngineStats:
        """Copy of the cumulative counters, with ``blocks_held`` read now."""
        stats = self._stats
        return replace(
            stats,
            hit_blocks=dict(stats.hit_blocks),
            stored_blocks=dict(stats.stored_blocks),
            evicted_blocks=dict(stats.evicted_blocks),
            dropped_blocks=dict(stats.dropped_blocks),
            blocks_held={tier.name: tier.num_used for tier in self._tiers},
        )

    def pending_loads(self) -> dict[str, LoadPlan]:
        return {rid: pending.plan for rid, pending in self._loads.items()}

    def pending_stores(self) -> dict[str, StorePlan]:
        return {rid: pending.plan for rid, pending in self._stores.items()}

    def _allocate(self, tier: TierIndex, keys: list[bytes], parents: list[bytes | None]) -> list:
        """Slots for the longest placeable prefix of ``keys``; evictions are counted and announced."""
        result = tier.allocate(keys, parents)
        self._stats.evicted_blocks[tier.name] += len(result.evicted)
        self._announce_removed(tier.name, result.evicted)
        return result.slots

    def _announce_removed(self, tier: str, keys: list[bytes]) -> None:
        if keys and self._record_events:
            self._events.append(Removed(tier, tuple(keys)))
