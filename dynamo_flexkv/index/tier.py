"""One cache tier's index: which blocks it holds, in which slots, and which it gives up first.

Keys are vLLM's chained block hashes: each encodes its whole prefix, so a prefix match is a dict
walk until the first miss. That makes eviction order the subtle part: a block that still has
resident children is never evicted (its descendants would become unreachable), so a chain is
eaten from its tail. The tier enforces this by pinning such blocks in the policy (see
``policies``), and hands keys to the policy tail-first so a chain's head is its youngest block.

Blocks whose parent is gone anyway (dropped as bad, or cleared by a reset while a child was in
use) are *orphans*: unreachable, still evictable as leaves, and matchable again if the parent is
stored again. An orphan ledger keeps the children counts exact across that.

Every call that removes blocks returns their keys, so the caller can publish removal events.
Not thread-safe: one owner (vLLM's scheduler) drives it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NewType

from dynamo_flexkv.index.groups import ALL_GROUPS
from dynamo_flexkv.index.policies import EvictionPolicy

Slot = NewType("Slot", int)


class BlockState(Enum):
    """Life of a block in one tier: WRITING -> READY -> gone, or READY -> DROPPED -> gone."""

    WRITING = "writing"  # slot reserved, bytes in flight: never matched, never evicted
    READY = "ready"  # bytes landed: matchable, lockable, evictable when unlocked and childless
    DROPPED = "dropped"  # declared bad while locked: unmatchable, slot freed at the last unlock


_WRITING, _READY, _DROPPED = BlockState.WRITING, BlockState.READY, BlockState.DROPPED
_UNPLACED = Slot(-1)


@dataclass(slots=True)
class _Entry:
    slot: Slot
    parent: bytes | None
    children: int  # resident entries (any state) whose parent is this key
    state: BlockState = _WRITING
    readers: int = 0  # locks held by loads
    groups: int = ALL_GROUPS  # which KV-cache groups' KV the block holds (see index.groups)

    @property
    def evictable(self) -> bool:
        return self.state is _READY and self.readers == 0 and self.children == 0


@dataclass(frozen=True, slots=True)
class AllocateResult:
    """Slots for the placed prefix of the requested keys, and the keys evicted to make room."""

    slots: list[Slot]
    evicted: list[bytes]


class TierIndex:
    """Index of one tier (``"CPU"``, ``"SSD"``, ...) with ``num_slots`` block slots."""

    def __init__(self, name: str, num_slots: int, policy: EvictionPolicy) -> None:
        if num_slots < 1:
            raise ValueError(f"tier {name}: num_slots must be >= 1, got {num_slots}")
        if len(policy):
            raise ValueError(f"tier {name}: the policy must start empty")
        self.name = name
        self._num_slots = num_slots
        self._policy = policy
        self._entries: dict[bytes, _Entry] = {}
        self._free: deque[Slot] = deque(Slot(i) for i in range(num_slots))
        self._orphans: dict[bytes, int] = {}  # missing parent key -> resident children
        self._num_locked = 0

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Slots held by blocks in any state."""
        return self._num_slots - len(self._free)

    @property
    def num_locked(self) -> int:
        """Blocks with at least one reader."""
        return self._num_locked

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, key: bytes) -> bool:
        """Whether ``key`` holds a slot here, in any state."""
        return key in self._entries

    def is_ready(self, key: bytes) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.state is _READY

    def state_of(self, key: bytes) -> BlockState | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.state

    def groups_of(self, key: bytes) -> int:
        """The mask of the KV-cache groups whose KV block ``key`` holds (0 if absent)."""
        entry = self._entries.get(key)
        return 0 if entry is None else entry.groups

    def slot_of(self, key: bytes) -> Slot | None:
        entry = self._entries.get(key)
        return None if entry is None or entry.slot == _UNPLACED else entry.slot

    def match(self, keys: Sequence[bytes]) -> int:
        """Number of leading ``keys`` that are READY here."""
        entries = self._entries
        n = 0
        for key in keys:
            entry = entries.get(key)
            if entry is None or entry.state is not _READY:
                break
            n += 1
        return n

    # ---- loads ---------------------------------------------------------------------------

    def lock(self, keys: Sequence[bytes]) -> list[Slot]:
        """Take one read lock on each key (all must be READY; ``ValueError`` otherwise, with
        nothing locked). Locked blocks are never evicted. Returns their slots, in key order."""
        locked: list[_Entry] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.state is not _READY:
                raise ValueError(f"tier {self.name}: cannot lock {key.hex()[:16]}: not READY")
            locked.append(entry)
        policy = self._policy
        for i in range(len(locked) - 1, -1, -1):  # tail first: the head ends up youngest
            entry, key = locked[i], keys[i]
            if entry.readers == 0:
                self._num_locked += 1
                if entry.children == 0:
                    policy.pin(key)
            entry.readers += 1
            policy.touch(key)
        return [entry.slot for entry in locked]

    def unlock(self, keys: Sequence[bytes]) -> None:
        """Release one read lock on each key. A DROPPED block is freed by its last unlock.

        Keys that are missing or not locked are ignored: unlock runs on cleanup paths (cancel,
        failure) that must not raise, and with this class's rules a locked block cannot vanish,
        so a stray unlock can only come from a caller unlocking twice; refusing it would turn one
        bookkeeping slip into a failed cleanup. The count never goes below zero.
        """
        entries = self._entries
        for key in reversed(keys):
            entry = entries.get(key)
            if entry is None or entry.readers == 0:
                continue
            entry.readers -= 1
            if entry.readers:
                continue
            self._num_locked -= 1
            if entry.state is _DROPPED:
                self._remove(key)  # already reported by drop()
            elif entry.children == 0:
                self._policy.unpin(key)

    def touch(self, keys: Sequence[bytes]) -> None:
        """Record a hit on each READY key, tail first; other keys are ignored."""
        entries, policy = self._entries, self._policy
        for key in reversed(keys):
            entry = entries.get(key)
            if entry is not None and entry.state is _READY:
                policy.touch(key)

    # ---- stores --------------------------------------------------------------------------

    def allocate(self, keys: Sequence[bytes], parents: Sequence[bytes | None]) -> AllocateResult:
        """Reserve slots for new blocks ``keys``, evicting blocks if the tier is full.

        ``parents[i]`` is the block ``keys[i]`` extends (None for the first block of a sequence);
        callers link a block only to a parent that is present here or earlier in ``keys``.
        Callers must skip keys already present in any state (``ValueError``, nothing changed).

        Places the longest prefix of ``keys`` it can: ``slots[i]`` is the slot of ``keys[i]`` for
        ``i < len(slots)``; the rest get no entry. Placed blocks are WRITING until ``commit`` or
        ``rollback``. Parents are linked before anything is evicted, so this call never evicts a
        parent of a block it places.
        """
        if len(keys) != len(parents):
            raise ValueError(f"tier {self.name}: {len(keys)} keys but {len(parents)} parents")
        entries, orphans = self._entries, self._orphans
        new: list[_Entry] = []
        prev_key, prev = None, None
        for key, parent in zip(keys, parents, strict=True):
            if key in entries:
                for undo in reversed(keys[: len(new)]):
                    self._remove(undo)
                raise ValueError(f"tier {self.name}: {key.hex()[:16]} is already present")
            entry = _Entry(_UNPLACED, parent, orphans.pop(key, 0) if orphans else 0)
            entries[key] = entry
            if prev is not None and parent == prev_key:
                prev.children += 1  # the common chain case; a WRITING parent needs no pinning
            else:
                self._link(parent)
            new.append(entry)
            prev_key, prev = key, entry

        shortfall = len(keys) - len(self._free)
        evicted = self._evict(shortfall) if shortfall > 0 else []
        placed = min(len(keys), len(self._free))
        free = self._free
        slots: list[Slot] = []
        for entry in new[:placed]:
            entry.slot = slot = free.popleft()
            slots.append(slot)
        for key in reversed(keys[placed:]):
            self._remove(key)
        return AllocateResult(slots, evicted)

    def commit(self, keys: Sequence[bytes], groups: Sequence[int] | None = None) -> None:
        """WRITING -> READY: the blocks become matchable and evictable; ``groups[i]`` is the mask
        of the KV-cache groups ``keys[i]`` holds (default: every group). ``ValueError`` (nothing
        changed) if any key is not WRITING."""
        entries = self._entries
        self._require_writing(keys, "commit")
        if groups is not None and len(groups) != len(keys):
            raise ValueError(f"tier {self.name}: {len(keys)} keys but {len(groups)} group masks")
        policy = self._policy
        for i in reversed(range(len(keys))):  # tail first: the head ends up youngest
            key = keys[i]
            entry = entries[key]
            entry.state = _READY
            if groups is not None:
                entry.groups = groups[i]
            policy.insert(key, pinned=entry.children > 0)

    def rollback(self, keys: Sequence[bytes]) -> list[bytes]:
        """Drop WRITING blocks and free their slots; returns their keys (never announced, so
        callers publish nothing). ``ValueError`` (nothing changed) if any key is not WRITING."""
        self._require_writing(keys, "roll back")
        removed = list(reversed(keys))
        for key in removed:
            self._remove(key)
        return removed

    def restore(self, blocks: Sequence[tuple[bytes, Slot, bytes | None]]) -> None:
        """Re-admit READY blocks found at known slots, e.g. on disk after a restart.

        ``blocks`` are (key, slot, parent key or None) triples; the tier must be empty. Parents that
        are not among them make their children orphans, exactly as after a drop.
        """
        if self._entries:
            raise ValueError(f"tier {self.name}: restore needs an empty tier")
        entries = self._entries
        used: set[int] = set()
        for key, slot, parent in blocks:
            if not 0 <= slot < self._num_slots or slot in used or key in entries:
                raise ValueError(f"tier {self.name}: cannot restore {key.hex()[:16]} at slot {slot}")
            used.add(slot)
            entries[key] = _Entry(slot, parent, 0, _READY)
        for entry in entries.values():
            if entry.parent is None:
                continue
            up = entries.get(entry.parent)
            if up is None:
                self._orphans[entry.parent] = self._orphans.get(entry.parent, 0) + 1
            else:
                up.children += 1
        for key, entry in reversed(entries.items()):
            self._policy.insert(key, pinned=entry.children > 0)
        self._free = deque(Slot(i) for i in range(self._num_slots) if i not in used)

    # ---- removal -------------------------------------------------------------------------

    def drop(self, keys: Sequence[bytes]) -> list[bytes]:
        """Make READY blocks unmatchable now (e.g. their bytes are bad); returns those keys.

        Unlocked blocks are freed at once; locked ones become DROPPED and are freed by their last
        unlock, so no reader's slot is ever reused under it. Keys not READY are ignored: WRITING
        blocks belong to their writer, who rolls them back.
        """
        dropped: list[bytes] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.state is not _READY:
                continue
            if entry.readers:
                self._policy.remove(key)
                entry.state = _DROPPED
            else:
                self._remove(key)
            dropped.append(key)
        return dropped

    def evict_all_unlocked(self) -> list[bytes]:
        """Remove every READY block nobody reads (for a cache reset); returns their keys.

        Locked, WRITING and DROPPED blocks stay and finish normally; a survivor whose parent went
        becomes an orphan (unreachable until the parent is stored again).
        """
        gone = [k for k, e in self._entries.items() if e.state is _READY and e.readers == 0]
        for key in reversed(gone):  # children before parents
            self._remove(key)
        return gone

    def clear(self) -> list[bytes]:
        """Make every READY block unmatchable (a cache reset); returns their keys. Unused ones are
        removed, locked ones DROPPED (freed by their last unlock, so no reader's slot is reused under
        it). WRITING blocks belong to their writers, who roll them back."""
        gone = self.evict_all_unlocked()
        return gone + self.drop([key for key, entry in self._entries.items() if entry.state is _READY])

    # ---- internals -----------------------------------------------------------------------

    def _evict(self, count: int) -> list[bytes]:
        evicted: list[bytes] = []
        entries = self._entries
        victims = self._policy.victims()
        try:
            for key in victims:
                entry = entries[key]
                if entry.readers or entry.children or entry.state is not _READY:
                    continue  # the policy's pins should prevent this; never evict a block in use
                self._remove(key)  # may unpin the parent, which this same scan then sees
                evicted.append(key)
                if len(evicted) == count:
                    break
        finally:
            victims.close()
        return evicted

    def _remove(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        if entry.state is _READY:
            self._policy.remove(key)
        if entry.slot != _UNPLACED:
            self._free.append(entry.slot)
        if entry.children:
            self._orphans[key] = entry.children
        parent = entry.parent
        if parent is None:
            return
        up = self._entries.get(parent)
        if up is None:  # an orphan leaves
            left = self._orphans[parent] - 1
            if left:
                self._orphans[parent] = left
            else:
                del self._orphans[parent]
            return
        up.children -= 1
        if up.children == 0 and up.readers == 0 and up.state is _READY:
            self._policy.unpin(parent)

    def _link(self, parent: bytes | None) -> None:
        if parent is None:
            return
        entry = self._entries.get(parent)
        if entry is None:
            self._orphans[parent] = self._orphans.get(parent, 0) + 1
            return
        if entry.children == 0 and entry.readers == 0 and entry.state is _READY:
            self._policy.pin(parent)
        entry.children += 1

    def _require_writing(self, keys: Sequence[bytes], verb: str) -> None:
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.state is not _WRITING:
                raise ValueError(f"tier {self.name}: cannot {verb} {key.hex()[:16]}: not WRITING")

    def verify(self) -> None:
        """Check every internal invariant, O(n log n); raises ``AssertionError``. For tests."""

        def check(ok: bool, what: str) -> None:
            if not ok:
                raise AssertionError(f"tier {self.name}: {what}")

        entries = self._entries
        used = [e.slot for e in entries.values()]
        check(_UNPLACED not in used, "an entry has no slot")
        slots = used + list(self._free)
        check(sorted(slots) == list(range(self._num_slots)), "slots lost or duplicated")
        children: dict[bytes, int] = {}
        for entry in entries.values():
            if entry.parent is not None:
                children[entry.parent] = children.get(entry.parent, 0) + 1
        for key, entry in entries.items():
            check(entry.children == children.pop(key, 0), f"children of {key.hex()[:16]}")
            check(entry.readers >= 0, "negative readers")
            check(entry.state is not _DROPPED or entry.readers > 0, "unlocked DROPPED entry")
        check(children == self._orphans, "orphan ledger out of sync")
        ready = {k for k, e in entries.items() if e.state is _READY}
        check(len(self._policy) == len(ready), "policy tracks other keys than READY ones")
        check(all(k in self._policy for k in ready), "a READY key is not in the policy")
        candidates = {k for k, e in entries.items() if e.evictable}
        offered = list(self._policy.victims())
        check(set(offered) == candidates, "victims are not exactly the evictable blocks")
        check(len(offered) == len(candidates), "a victim was offered twice")
        check(self._num_locked == sum(e.readers > 0 for e in entries.values()), "locked count")
