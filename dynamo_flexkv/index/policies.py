"""Eviction policies: the order in which a tier gives up its resident blocks.

A policy only orders keys; the tier decides what may go. The tier tells the policy what happens to
its READY blocks (``insert`` when stored, ``touch`` on a hit, ``remove`` when the block leaves) and
*pins* the blocks that cannot go right now: those locked by a load and those that still have
resident children (evicting a parent strands its descendants, because matching stops at the first
miss). A pinned block keeps its history and re-enters the victim order where that history puts it,
so ``victims()`` offers only blocks the tier can evict and no scan walks over the same unevictable
block twice.

Every policy here is a rank per key (lower rank = evicted sooner) kept in a binary heap with lazy
deletion: insert, touch, pin and unpin are O(log n); each victim costs O(log n) amortised.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Generator
from itertools import count
from typing import ClassVar, TypeAlias

# A plain int for the single-criterion policies, (major, minor) for LFU and SLRU.
Rank: TypeAlias = "int | tuple[int, int]"


class EvictionPolicy(ABC):
    """Orders one tier's READY blocks for eviction.

    Keys are opaque ``bytes``. Every tracked key is either a candidate or pinned; only candidates
    are offered by ``victims()``. Misuse (inserting a tracked key, touching or pinning an unknown
    one) raises ``KeyError`` so a tier bookkeeping bug surfaces where it happens.
    """

    name: ClassVar[str]

    @abstractmethod
    def insert(self, key: bytes, *, pinned: bool = False) -> None:
        """Start tracking a just-stored ``key``, as a candidate unless ``pinned``."""

    @abstractmethod
    def touch(self, key: bytes) -> None:
        """Record a hit on a tracked ``key`` (pinned or not)."""

    @abstractmethod
    def remove(self, key: bytes) -> None:
        """Forget a tracked ``key``; it is never offered again."""

    @abstractmethod
    def pin(self, key: bytes) -> None:
        """Withhold a candidate ``key`` from ``victims()``, keeping its history."""

    @abstractmethod
    def unpin(self, key: bytes) -> None:
        """Make a pinned ``key`` a candidate again, ranked by its history."""

    @abstractmethod
    def victims(self) -> Generator[bytes, None, None]:
        """Yield the candidates, the one to evict first first.

        The caller may stop early, skip keys, and ``remove`` a yielded key (or ``unpin`` others,
        which may then be yielded by the same scan) while iterating. Close the generator (or drop
        it) when done: keys it yielded but the caller kept are restored then.
        """

    @abstractmethod
    def __len__(self) -> int:
        """Number of tracked keys, pinned or not."""

    @abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is tracked."""


class _RankedPolicy(EvictionPolicy):
    """Shared machinery: a rank per key, a lazy-deletion min-heap over the candidates.

    Invariant: every tracked, unpinned key has at least one heap entry carrying its current rank.
    Entries whose key is gone, pinned or re-ranked are stale and skipped when popped.
    """

    def __init__(self) -> None:
        self._ranks: dict[bytes, Rank] = {}
        self._pinned: set[bytes] = set()
        self._heap: list[tuple[Rank, bytes]] = []
        self._tick = count().__next__  # logical clock: every insert or hit gets a fresh value

    @abstractmethod
    def _initial_rank(self, key: bytes) -> Rank:
        """Rank of a key just inserted."""

    @abstractmethod
    def _touched_rank(self, key: bytes, rank: Rank) -> Rank | None:
        """Rank after a hit, or None when a hit does not change it."""

    def insert(self, key: bytes, *, pinned: bool = False) -> None:
        if key in self._ranks:
            raise KeyError(f"{self.name}: {key.hex()[:16]} is already tracked")
        rank = self._initial_rank(key)
        self._ranks[key] = rank
        if pinned:
            self._pinned.add(key)
        else:
            self._push(rank, key)

    def touch(self, key: bytes) -> None:
        rank = self._touched_rank(key, self._ranks[key])
        if rank is not None:
            self._ranks[key] = rank
            if key not in self._pinned:
                self._push(rank, key)

    def remove(self, key: bytes) -> None:
        del self._ranks[key]
        self._pinned.discard(key)

    def pin(self, key: bytes) -> None:
        if key not in self._ranks:
            raise KeyError(f"{self.name}: pin of untracked {key.hex()[:16]}")
        self._pinned.add(key)

    def unpin(self, key: bytes) -> None:
        self._pinned.remove(key)
        self._push(self._ranks[key], key)

    def victims(self) -> Generator[bytes, None, None]:
        ranks, pinned = self._ranks, self._pinned
        kept: set[bytes] = set()  # offered but neither removed nor pinned by the caller
        offered: bytes | None = None
        try:
            while self._heap:
                rank, key = heapq.heappop(self._heap)
                if ranks.get(key) != rank or key in pinned or key in kept:
                    continue  # stale entry, or a duplicate of a key already offered
                offered = key
                yield key
                offered = None
                if key in ranks and key not in pinned:
                    kept.add(key)
        finally:
            if offered is not None:
                kept.add(offered)
            for key in kept:
                current = ranks.get(key)
                if current is not None and key not in pinned:
                    heapq.heappush(self._heap, (current, key))

    def __len__(self) -> int:
        return len(self._ranks)

    def __contains__(self, key: object) -> bool:
        return key in self._ranks

    def _rerank(self, key: bytes, rank: Rank) -> None:
        self._ranks[key] = rank
        if key not in self._pinned:
            self._push(rank, key)

    def _push(self, rank: Rank, key: bytes) -> None:
        heapq.heappush(self._heap, (rank, key))
        # Re-ranked and pinned keys leave stale entries behind; rebuilding once they outnumber the
        # tracked keys keeps memory bounded at O(1) amortised per push.
        if len(self._heap) > 2 * len(self._ranks) + 64:
            self._heap = [(r, k) for k, r in self._ranks.items() if k not in self._pinned]
            heapq.heapify(self._heap)


class LRUPolicy(_RankedPolicy):
    """Least recently used first."""

    name = "lru"

    def _initial_rank(self, key: bytes) -> Rank:
        return self._tick()

    def _touched_rank(self, key: bytes, rank: Rank) -> Rank | None:
        return self._tick()


class MRUPolicy(_RankedPolicy):
    """Most recently used first (suits cyclic scans larger than the tier)."""

    name = "mru"

    def _initial_rank(self, key: bytes) -> Rank:
        return -self._tick()

    def _touched_rank(self, key: bytes, rank: Rank) -> Rank | None:
        return -self._tick()


class FIFOPolicy(_RankedPolicy):
    """First stored first; hits do not matter."""

    name = "fifo"

    def _initial_rank(self, key: bytes) -> Rank:
        return self._tick()

    def _touched_rank(self, key: bytes, rank: Rank) -> Rank | None:
        return None


class FILOPolicy(_RankedPolicy):
    """Last stored first; hits do not matter."""

    name = "filo"

    def _initial_rank(self, key: bytes) -> Rank:
        return -self._tick()

    def _touched_rank(self, key: bytes, rank: Rank) -> Rank | None:
        return None


class LFUPolicy(_RankedPolicy):
    """Fewest uses first (the store counts as one); ties go to the least recently used."""

    name = "lfu"

    def _initial_rank(self, key: bytes) -> Rank:
        return (1, self._tick())

    def _touched_rank(self, key: bytes, rank: Rank) -> Rank | None:
        assert isinstance(rank, tuple)
        return (rank[0] + 1, self._tick())


class SLRUPolicy(_RankedPolicy):
    """Segmented LRU: new blocks enter a probationary segment; a hit there promotes to a protected
    segment of 80% of ``capacity``; protected overflow drops back to the probationary MRU end.
    Victims come from the probationary segment (LRU first), then from the protected one, so one
    pass over many cold blocks cannot flush blocks that were hit twice.
    """

    name = "slru"
    _PROBATION, _PROTECTED = 0, 1

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.protected_capacity = max(1, capacity * 4 // 5)
        self._protected: OrderedDict[bytes, None] = OrderedDict()  # LRU first

    def _initial_rank(self, key: bytes) -> Rank:
        return (self._PROBATION, self._tick())

    def _touched_rank(self, key: bytes, rank: Rank) -> Rank | None:
        if key in self._protected:
            self._protected.move_to_end(key)
            return (self._PROTECTED, self._tick())
        self._protected[key] = None
        if len(self._protected) > self.protected_capacity:
            demoted, _ = self._protected.popitem(last=False)
            self._rerank(demoted, (self._PROBATION, self._tick()))
        return (self._PROTECTED, self._tick())

    def remove(self, key: bytes) -> None:
        super().remove(key)
        self._protected.pop(key, None)


POLICY_NAMES: tuple[str, ...] = ("lru", "lfu", "fifo", "mru", "slru", "filo")

_SIMPLE: dict[str, type[_RankedPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, FIFOPolicy, MRUPolicy, FILOPolicy)
}


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    """Build the policy called ``name`` (case-insensitive) for a tier of ``capacity`` blocks.

    Only ``slru`` uses ``capacity`` (to size its protected segment). Raises ``ValueError`` for an
    unknown name or a capacity below 1.
    """
    if capacity < 1:
        raise ValueError(f"eviction policy capacity must be >= 1, got {capacity}")
    key = name.strip().lower()
    if key == "slru":
        return SLRUPolicy(capacity)
    if key in _SIMPLE:
        return _SIMPLE[key]()
    raise ValueError(f"unknown eviction policy {name!r}; allowed: {', '.join(POLICY_NAMES)}")
