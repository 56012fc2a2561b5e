"""Composition root of the tiers: the CPU pool's index, every lower tier's backend, the cascade.

`TierStack` owns the `CacheEngine` (control plane) and the `LowerTiers` executor (data plane) of one
instance's scheduler, and is engine-neutral: the vLLM adapter only translates requests to keys and
block ids. Lower tiers come from the settings: the SSD tier when `ssd_cache_gb > 0`, the cluster
tier when `remote_store` is set (its URL scheme picks the backend, see storage/backend.py). Tiers are
ordered fastest first; the CPU tier's medium is "CPU", every other tier's comes from its backend.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.index.engine import CacheEngine
from dynamo_flexkv.index.groups import KVGroup
from dynamo_flexkv.index.plans import LoadPlan
from dynamo_flexkv.index.policies import make_policy
from dynamo_flexkv.index.tier import TierIndex
from dynamo_flexkv.storage.backend import RecoveredBlock, TierBackend, backend_scheme, completed, open_backend
from dynamo_flexkv.storage.cpu_pool import CpuBlockPool
from dynamo_flexkv.storage.layout import PoolGeometry
from dynamo_flexkv.transfer.tier_io import LowerTiers

logger = logging.getLogger(__name__)

CPU_TIER = "CPU"
SHUTDOWN_TIMEOUT_S = 30
ABSENT_TTL_S = 1.0  # how long a shared tier's "not there" is believed: a waiting request re-asks after it
MAX_ABSENT_KEYS = 1 << 16
# vLLM derives the root of every block-hash chain from PYTHONHASHSEED when set; otherwise from a
# fixed seed for its sha256 algorithms and from a random per-process seed for its xxhash ones.
NON_DETERMINISTIC_HASH_ALGOS = ("xxhash", "xxhash_cbor")


@dataclass(frozen=True)
class InstanceFacts:
    identity: str  # names the shared-memory pool of this instance
    block_size: int  # tokens per vLLM block
    geometry: PoolGeometry
    layout: dict[str, str | int]  # what a stored block's bytes depend on: namespaces the lower tiers
    # the model's KV-cache groups, and the layers of each (a slot holds group 0's layers, then group 1's...)
    groups: tuple[KVGroup, ...] = (KVGroup("full_attention"),)
    group_layers: tuple[tuple[str, ...], ...] = ()

    @property
    def hybrid(self) -> bool:
        """Whether a stored block may hold only some groups' KV (a sliding-window group, or several)."""
        return len(self.groups) > 1 or self.groups[0].window is not None


def require_shared_hashes(hash_algo: str, setting: str) -> None:
    """Refuse (one clear error) when this process's block hashes cannot match another process's."""
    if hash_algo in NON_DETERMINISTIC_HASH_ALGOS and os.environ.get("PYTHONHASHSEED") is None:
        raise ValueError(
            f"{setting} shares KV blocks between processes, but prefix_caching_hash_algo={hash_algo} "
            "seeds every process's block hashes randomly: set PYTHONHASHSEED to the same value on "
            "every engine, or use prefix_caching_hash_algo=sha256 / sha256_cbor"
        )


def shared_tier_layout(layout: dict[str, str | int], setting: str) -> dict[str, str | int]:
    """The layout a shared tier namespaces its keys by: the instance's layout plus the block-hash
    seed, so engines whose hashes differ never read each other's values."""
    require_shared_hashes(str(layout.get("hash_algo", "")), setting)
    seed = os.environ.get("PYTHONHASHSEED")
    # The weights' fingerprint names this host's files (paths, mtimes): engines of one model on
    # different nodes must still agree; revision, quantization and model config stay in the namespace.
    shared = {key: value for key, value in layout.items() if key != "weights"}
    return {**shared, "hash_seed": seed if seed is not None else "vllm-default"}


class SharedLookups:
    """Asks a shared tier, off the scheduler's thread, whether the blocks after a local hit exist.

    `extend` answers None ("ask again later") while the question is in flight; found blocks are
    admitted into the tier's index (a cache of what the store holds), and the first absent key is
    remembered for `absent_ttl_s` so a waiting request does not ask the store every step. A question
    unanswered after `timeout_s` counts as a miss. A block whose read from the tier failed (corrupt,
    lease expired, store gone) is remembered as absent too: the store still says it exists, and the
    request vLLM reschedules after the failed load must recompute it, not stage it again and again.
    """

    def __init__(self, engine: CacheEngine, backend: TierBackend, timeout_s: float, absent_ttl_s: float):
        self.engine = engine
        self.backend = backend
        self.timeout_s = timeout_s
        self.absent_ttl_s = absent_ttl_s
        self._asking: dict[str, tuple[Future, tuple[bytes, ...], float]] = {}
        self._absent: dict[bytes, float] = {}  # key -> until when it is known absent
        self._staging: dict[str, list[tuple[int, bytes]]] = {}  # request -> (staged position, key) read here

    def extend(self, request_id: str, keys: Sequence[bytes], first_parent: bytes | None, hits: int) -> int | None:
        rest = tuple(keys[hits:])
        now = time.monotonic()
        if not rest or not self.backend.healthy or self._absent.get(rest[0], 0.0) > now:
            self.forget(request_id)
            return hits
        asked = self._asking.get(request_id)
        if asked is None or asked[1] != rest:
            self._asking[request_id] = (self._ask(rest), rest, now)
            return None
        future, _, since = asked
        if not future.done():
            if now - since < self.timeout_s:
                return None
            logger.warning("tier %s: lookup of %d blocks unanswered after %.1fs, counted as a miss: request=%s",
                           self.backend.name, len(rest), self.timeout_s, request_id)
            self._absent_from(rest[0], now)
            self.forget(request_id)
            return hits
        del self._asking[request_id]
        try:
            found = future.result()
        except Exception:  # lookups answer False on failure; anything else is a miss too
            logger.exception("tier %s: lookup failed: request=%s", self.backend.name, request_id)
            found = []
        present = next((i for i, there in enumerate(found) if not there), min(len(found), len(rest)))
        if present < len(rest):
            self._absent_from(rest[present], now)
        if present:
            parents = [keys[hits - 1] if hits else first_parent, *rest[: present - 1]]
            self.engine.admit(self.backend.name, rest[:present], parents)
        return self.engine.lookup(keys)

    def staging(self, plan: LoadPlan) -> None:
        """A load plan's reads started: remember which of them come from this tier."""
        mine = [(position, plan.keys[s.index]) for position, s in enumerate(plan.staged)
                if s.tier == self.backend.name]
        if mine:
            self._staging[plan.request_id] = mine

    def staged(self, request_id: str, ok: Sequence[bool]) -> None:
        """A load plan's reads finished (`ok` per staged block): the first block this tier failed to
        deliver is absent for `absent_ttl_s`, so the rescheduled request recomputes from there."""
        failed = next((key for position, key in self._staging.pop(request_id, ()) if not ok[position]), None)
        if failed is not None:
            self._absent_from(failed, time.monotonic())

    def _ask(self, keys: tuple[bytes, ...]) -> Future:
        try:
            return self.backend.lookup(keys)
        except Exception:  # a backend answers False, never raises; if one does, it is a miss
            logger.exception("tier %s: lookup could not be submitted", self.backend.name)
            return completed([False] * len(keys))

    def _absent_from(self, key: bytes, now: float) -> None:
        if len(self._absent) > MAX_ABSENT_KEYS:  # bounded: drop the expired, then everything if still large
            self._absent = {k: t for k, t in self._absent.items() if t > now}
            if len(self._absent) > MAX_ABSENT_KEYS:
                self._absent.clear()
        self._absent[key] = now + self.absent_ttl_s

    def forget(self, request_id: str) -> None:
        self._asking.pop(request_id, None)


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
        self.shared: SharedLookups | None = None
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
        shared = [b for b in self.backends if b.shared]
        if shared:  # one shared tier: the cluster store
            self.shared = SharedLookups(self.engine, shared[0], settings.remote_timeout_s, ABSENT_TTL_S)

    @property
    def names(self) -> list[str]:
        return [tier.name for tier in self.engine.tiers]

    def lookup(self, request_id: str, keys: Sequence[bytes], first_parent: bytes | None) -> int | None:
        """Leading ``keys`` some tier holds; None while a shared tier is still being asked."""
        hits = self.engine.lookup(keys) if keys else 0
        if self.shared is None or hits == len(keys):
            return hits
        return self.shared.extend(request_id, keys, first_parent, hits)

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
        for rid, ok in self.io.finished_stages():
            if self.shared is not None:
                self.shared.staged(rid, ok)
            staged.append((rid, self.engine.complete_stage(rid, ok)))
        for spill_id, ok in self.io.finished_spills():
            self.engine.complete_spill(spill_id, ok)
        self.io.spill(self.engine.take_spills(), tokens_of)
        self.refresh_writable()
        return staged

    def refresh_writable(self) -> None:
        """Plan no spill into a tier that takes no writes now (commits plan spills)."""
        self.engine.unwritable = {b.name for b in self.backends if not b.writable}

    def reset(self) -> None:
        """Drop every unlocked block from every tier, on disk too: after a weight update no stored KV
        may be served, not even after a restart."""
        self.engine.reset()
        for backend in self.backends:
            backend.invalidate_all()

    @property
    def num_pending(self) -> int:
        return self.io.num_pending if self.io is not None else 0

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
