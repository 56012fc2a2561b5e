"""Composition root of the tiers: the CPU pool's index, every lower tier's backend, the cascade.

`TierStack` owns the `CacheEngine` (control plane) and the `LowerTiers` executor (data plane) of one
instance's scheduler, and is engine-neutral: the vLLM adapter only translates requests to keys and
block ids. Lower tiers come from the settings: the SSD tier when `ssd_cache_gb > 0`, the cluster
tier when `remote_store` is set (its URL scheme picks the backend, see storage/backend.py). Tiers are
ordered fastest first; the CPU tier's medium is "CPU", every other tier's comes from its backend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.index.engine import CacheEngine
from dynamo_flexkv.index.plans import LoadPlan
from dynamo_flexkv.index.policies import make_policy
from dynamo_flexkv.index.tier import TierIndex
from dynamo_flexkv.storage.backend import RecoveredBlock, TierBackend, backend_scheme, open_backend
from dynamo_flexkv.storage.cpu.pool import CpuBlockPool
from dynamo_flexkv.tiers.cascade import LowerTiers
from dynamo_flexkv.tiers.facts import InstanceFacts, shared_tier_layout
from dynamo_flexkv.tiers.lookups import ABSENT_TTL_S, SharedLookups

logger = logging.getLogger(__name__)

CPU_TIER = "CPU"
SHUTDOWN_TIMEOUT_S = 30


class TierStack:
    """The tiers of one instance's scheduler: CPU pool index first, then every lower backend."""

    def __init__(self, facts: InstanceFacts, settings: FlexKVSettings, record_events: bool,
                 backends: Sequence[TierBackend] | None = None):
        self.facts = facts
        policy = settings.eviction_policy
        num_slots = facts.geometry.num_slots
        self.backends = list(backends) if backends is not None else open_lower_tiers(facts, settings)
        indexes = [TierIndex(CPU_TIER, num_slots, make_policy(policy, num_slots))]
        indexes += [TierIndex(b.name, b.num_slots, make_policy(policy, b.num_slots)) for b in self.backends]
        self.engine = CacheEngine(indexes, record_events=record_events)
        self.media: dict[str, str | None] = {CPU_TIER: "CPU", **{b.name: b.medium for b in self.backends}}
        self.io = None
        if self.backends:
            try:
                pool = CpuBlockPool(facts.identity, facts.geometry).tensor
            except BaseException:
                for backend in self.backends:
                    backend.close()
                raise
            self.io = LowerTiers({b.name: b for b in self.backends}, pool)
        # blocks found from an earlier run, per tier: the scheduler announces those with tokens
        self.recovered: dict[str, list[RecoveredBlock]] = {}
        for backend in self.backends:
            # which groups' KV a block holds is not recorded on disk: a hybrid model's blocks from an
            # earlier run cannot be trusted to hold every group, so they are overwritten instead
            found = [] if facts.hybrid else backend.recover()
            if found:  # with their parents: chains stay intact for eviction
                self.engine.restore(backend.name, [(b.key, b.addr, b.parent) for b in found])
                self.recovered[backend.name] = found
            logger.info("tier %s: %d addresses, %d blocks found from an earlier run", backend.name,
                        backend.num_slots, len(found))
        self._remote_timeout_s = settings.remote_timeout_s
        self.shared = self._shared_lookups()

    def _shared_lookups(self) -> SharedLookups | None:
        shared = [b for b in self.backends if b.shared]  # one shared tier at most: the cluster store
        return SharedLookups(self.engine, shared[0], self._remote_timeout_s, ABSENT_TTL_S) if shared else None

    @property
    def names(self) -> list[str]:
        return [tier.name for tier in self.engine.tiers]

    def lookup(self, request_id: str, keys: Sequence[bytes], first_parent: bytes | None) -> int | None:
        """Leading ``keys`` some tier holds; None while a shared tier is still being asked."""
        hits = self.engine.lookup(keys) if keys else 0
        if self.shared is None:
            return hits
        return self.shared.extend(request_id, keys, first_parent, hits)  # answers at once when nothing is left

    def forget(self, request_id: str) -> None:
        if self.shared is not None:
            self.shared.forget(request_id)

    def stage(self, plan: LoadPlan) -> None:
        if self.shared is not None:
            self.shared.staging(plan)
        self.io.stage(plan)

    def advance(self, tokens_of: Callable[[Sequence[bytes]], list[Sequence[int]]] | None = None) -> list[tuple[str, int]]:
        """Acknowledge finished stagings and spills, start new spills (`tokens_of` gives the blocks'
        tokens a persistent tier records). Returns (request id, how many leading blocks of its load
        are usable) for every staging that finished."""
        if self.io is None:
            return []
        staged = []
        for rid, ok, held in self.io.finished_stages():
            if self.shared is not None:
                self.shared.staged(rid, ok)
            staged.append((rid, self.engine.complete_stage(rid, ok, held)))
        settled = self.io.settled()
        if settled:
            self.engine.release_held(settled)
        for spill_id, ok in self.io.finished_spills():
            self.engine.complete_spill(spill_id, ok)
        self.io.spill(self.engine.take_spills(), tokens_of)
        self.refresh_writable()
        return staged

    def refresh_writable(self) -> None:
        """Plan no spill into a tier that takes no writes now (commits plan spills)."""
        self.engine.unwritable = {b.name for b in self.backends if not b.writable}

    def reset(self) -> None:
        """A barrier (after a weight update): no stored KV is served again, not even after a restart, and
        nothing planned before it commits after it (`CacheEngine.reset`). Each backend forgets what it
        holds (a shared store moves this instance to a new namespace), and shared-tier answers asked
        before the reset are not believed after it."""
        self.engine.reset()
        for backend in self.backends:
            backend.invalidate_all()
        self.shared = self._shared_lookups()

    @property
    def num_pending(self) -> int:
        return self.io.num_pending if self.io is not None else 0

    @property
    def num_held(self) -> int:
        """CPU slots held while reads answered at their deadline may still write them (not pending
        work: vLLM need not step for them; they are freed at the first step after the reads return)."""
        return self.io.num_held if self.io is not None else 0

    def close(self) -> None:
        """Let in-flight writes land (bounded), so a restart finds them; close every backend."""
        if self.io is None:
            return
        self.io.wait(SHUTDOWN_TIMEOUT_S)
        self.advance()
        self.io.close()


def open_lower_tiers(facts: InstanceFacts, settings: FlexKVSettings) -> list[TierBackend]:
    """The lower tiers the settings ask for, fastest first; closes what it opened if one fails."""
    wanted: list[tuple[str, dict]] = []
    if settings.ssd_enabled:
        wanted.append(("ssd", facts.layout))
    if settings.remote_enabled:
        wanted.append((backend_scheme(settings.remote_store), shared_tier_layout(facts.layout, "remote_store")))
    opened: list[TierBackend] = []
    try:
        for scheme, layout in wanted:
            opened.append(open_backend(scheme, layout, facts.geometry.slot_bytes, settings))
    except BaseException:
        for backend in opened:
            backend.close()
        raise
    return opened
