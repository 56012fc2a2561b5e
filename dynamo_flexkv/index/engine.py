"""The cache engine: vLLM-facing verbs over the tiers, producing plans as plain data.

The verbs follow vLLM's ``v1/kv_offload`` manager: ``lookup`` -> ``prepare_load`` ->
``complete_load``, ``prepare_store`` -> ``complete_store``, plus ``touch``, ``reset`` and
``take_events``. A plan names one tier and the slots to move; the data plane executes it and the
caller acknowledges it exactly once, which commits or rolls back what the plan reserved.

Tiers are ordered fastest first. Stores land in the first tier (lower tiers are filled by a
cascade, not by requests). Not thread-safe: vLLM's scheduler is the one caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TypeAlias

from dynamo_flexkv.index.tier import BlockState, Slot, TierIndex


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Copy ``keys`` from ``slots`` of ``tier`` up to the GPU. The blocks stay locked until the
    plan is completed or cancelled."""

    request_id: str
    tier: str
    keys: tuple[bytes, ...]
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class StorePlan:
    """Copy ``keys`` from the GPU into ``slots`` of ``tier``. The blocks are invisible until the
    plan is completed successfully."""

    request_id: str
    tier: str
    keys: tuple[bytes, ...]
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class Stored:
    """Blocks whose bytes landed in ``tier``. ``parents[i]`` is the block ``keys[i]`` extends;
    each parent was announced before (in an earlier event or earlier in this one) unless it has
    since been removed."""

    tier: str
    keys: tuple[bytes, ...]
    parents: tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class Removed:
    """Announced blocks that left ``tier`` (evicted, or dropped as bad)."""

    tier: str
    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Cleared:
    """``tier`` was reset: forget every block announced in it. ``keys`` are the blocks the reset
    removed; blocks in use survive it and get their own Stored/Removed events later."""

    tier: str
    keys: tuple[bytes, ...] = ()


TierEvent: TypeAlias = Stored | Removed | Cleared


@dataclass
class EngineStats:
    """Counters, cumulative since the engine was built; per-tier ones are keyed by tier name.

    ``CacheEngine.snapshot()`` returns an independent copy; ``blocks_held`` is the one gauge
    (slots in use, read at snapshot time). Rates are the reader's job: diff two snapshots.
    """

    lookups: int = 0
    load_failures: int = 0
    hit_blocks: dict[str, int] = field(default_factory=dict)  # served by successful loads
    stored_blocks: dict[str, int] = field(default_factory=dict)  # committed
    evicted_blocks: dict[str, int] = field(default_factory=dict)  # to make room
    dropped_blocks: dict[str, int] = field(default_factory=dict)  # reported bad by a load
    blocks_held: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _PendingStore:
    plan: StorePlan
    parents: tuple[bytes | None, ...]


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
        self._loads: dict[str, LoadPlan] = {}
        self._stores: dict[str, _PendingStore] = {}
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

    def touch(self, keys: Sequence[bytes]) -> None:
        """Record a hit on ``keys`` in every tier that holds them READY."""
        for tier in self._tiers:
            tier.touch(keys)

    def prepare_load(self, request_id: str, keys: Sequence[bytes]) -> LoadPlan | None:
        """Lock ``keys`` (a prefix ``lookup`` counted) and return where to read them; None for
        no keys. A request has at most one load: a second call first releases the previous plan
        (vLLM's scheduler asks again when its own allocation failed).

        Raises ``ValueError`` if the keys are not all READY in one tier; staging a prefix spread
        over several tiers is not implemented yet.
        """
        self.cancel_load(request_id)
        if not keys:
            return None
        for tier in self._tiers:
            if tier.match(keys) == len(keys):
                plan = LoadPlan(request_id, tier.name, tuple(keys), tuple(tier.lock(keys)))
                self._loads[request_id] = plan
                return plan
        best = max(tier.match(keys) for tier in self._tiers)
        raise ValueError(
            f"request {request_id}: {len(keys)} blocks are not all available in one tier "
            f"(the best tier has the first {best}); pass what lookup counted"
        )

    def complete_load(
        self, request_id: str, success: bool, bad_keys: Sequence[bytes] = ()
    ) -> list[bytes]:
        """Finish the request's load: unlock its blocks. After a failure, ``bad_keys`` (blocks
        of this plan whose stored bytes cannot be trusted) are dropped from the tier; returns
        the dropped keys. ``KeyError`` if the request has no load; ``ValueError`` (nothing
        changed) if a bad key is not in the plan."""
        plan = self._loads[request_id]
        if bad_keys:
            if success:
                raise ValueError(f"request {request_id}: bad_keys given for a successful load")
            stray = set(bad_keys).difference(plan.keys)
            if stray:
                raise ValueError(f"request {request_id}: {len(stray)} bad keys not in its plan")
        del self._loads[request_id]
        tier = self._by_name[plan.tier]
        tier.unlock(plan.keys)
        if success:
            self._stats.hit_blocks[tier.name] += len(plan.keys)
            return []
        self._stats.load_failures += 1
        dropped = tier.drop(bad_keys)
        self._stats.dropped_blocks[tier.name] += len(dropped)
        self._announce_removed(tier.name, dropped)
        return dropped

    def cancel_load(self, request_id: str) -> None:
        """Release the request's load plan without loading it; no-op if it has none."""
        plan = self._loads.pop(request_id, None)
        if plan is not None:
            self._by_name[plan.tier].unlock(plan.keys)

    # ---- stores --------------------------------------------------------------------------

    def prepare_store(
        self, request_id: str, keys: Sequence[bytes], parents: Sequence[bytes | None]
    ) -> StorePlan | None:
        """Reserve slots in the first tier for those ``keys`` it lacks; None if there are none.

        ``parents[i]`` is the block ``keys[i]`` extends (None for the first block). Keys already
        present are skipped (READY ones count as a hit). A key is stored only if its parent is
        None, READY in the tier, or planned earlier in this call: a block is never placed where
        it would be unreachable, and its Stored event never precedes its parent's. Planning
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
        planned: set[bytes] = set()
        state_of, is_ready = tier.state_of, tier.is_ready
        for key, parent in zip(keys, parents, strict=True):
            state = state_of(key)
            if state is not None:
                if state is BlockState.READY:
                    hits.append(key)
                continue
            if parent is not None and parent not in planned and not is_ready(parent):
                break
            new_keys.append(key)
            new_parents.append(parent)
            planned.add(key)
        tier.touch(hits)
        if not new_keys:
            return None

        result = tier.allocate(new_keys, new_parents)
        self._stats.evicted_blocks[tier.name] += len(result.evicted)
        self._announce_removed(tier.name, result.evicted)
        placed = len(result.slots)
        if placed == 0:
            return None
        plan = StorePlan(request_id, tier.name, tuple(new_keys[:placed]), tuple(result.slots))
        self._stores[request_id] = _PendingStore(plan, tuple(new_parents[:placed]))
        return plan

    def complete_store(self, request_id: str, success: bool) -> None:
        """Finish the request's store: on success its blocks become READY and are announced;
        otherwise they are rolled back (never announced, so nothing is published).
        ``KeyError`` if the request has no store in flight."""
        pending = self._stores.pop(request_id)
        plan = pending.plan
        tier = self._by_name[plan.tier]
        if not success:
            tier.rollback(plan.keys)
            return
        tier.commit(plan.keys)
        self._stats.stored_blocks[tier.name] += len(plan.keys)
        if self._record_events:
            self._events.append(Stored(tier.name, plan.keys, pending.parents))

    # ---- whole cache ---------------------------------------------------------------------

    def reset(self) -> list[bytes]:
        """Remove every block no plan is using, in every tier; returns their keys. Each tier
        publishes one Cleared event. Plans in flight finish normally."""
        removed: list[bytes] = []
        for tier in self._tiers:
            gone = tier.evict_all_unlocked()
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
        return dict(self._loads)

    def pending_stores(self) -> dict[str, StorePlan]:
        return {rid: pending.plan for rid, pending in self._stores.items()}

    def _announce_removed(self, tier: str, keys: list[bytes]) -> None:
        if keys and self._record_events:
            self._events.append(Removed(tier, tuple(keys)))
