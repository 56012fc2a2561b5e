"""TierIndex: matching, locking, allocation and the eviction rules (tails first, never in use)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from dynamo_flexkv.index.policies import POLICY_NAMES, make_policy
from dynamo_flexkv.index.tier import BlockState, TierIndex


def chain(tag: str, n: int) -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def parents_of(keys: Sequence[bytes], parent: bytes | None = None) -> list[bytes | None]:
    return [parent, *keys[:-1]]


def make_tier(num_slots: int, policy: str = "lru") -> TierIndex:
    return TierIndex("CPU", num_slots, make_policy(policy, num_slots))


def store(tier: TierIndex, keys: list[bytes], parent: bytes | None = None) -> list[int]:
    result = tier.allocate(keys, parents_of(keys, parent))
    tier.commit(keys[: len(result.slots)])
    tier.verify()
    return result.slots


def test_store_then_match_and_slots() -> None:
    tier = make_tier(8)
    keys = chain("a", 5)
    result = tier.allocate(keys, parents_of(keys))
    assert sorted(result.slots) == sorted(set(result.slots)) and len(result.slots) == 5
    assert all(0 <= s < 8 for s in result.slots) and result.evicted == []
    assert tier.match(keys) == 0, "WRITING blocks must not match"
    assert tier.contains(keys[0]) and not tier.is_ready(keys[0])
    assert tier.state_of(keys[0]) is BlockState.WRITING
    tier.commit(keys)
    assert tier.match(keys) == 5 and tier.is_ready(keys[4])
    assert [tier.slot_of(k) for k in keys] == result.slots
    assert (tier.num_used, tier.num_free, tier.num_slots) == (5, 3, 8)
    tier.verify()


def test_match_stops_at_first_miss() -> None:
    tier = make_tier(8)
    keys = chain("a", 4)
    store(tier, keys)
    assert tier.match([*keys[:2], b"missing", keys[3]]) == 2
    assert tier.match([b"missing", *keys]) == 0
    assert tier.match([]) == 0


def test_writing_blocks_are_never_evicted() -> None:
    tier = make_tier(4)
    keys = chain("w", 4)
    tier.allocate(keys, parents_of(keys))  # never committed
    result = tier.allocate([b"x"], [None])
    assert result.slots == [] and result.evicted == []
    assert not tier.contains(b"x")
    tier.verify()


def test_locked_blocks_are_never_evicted() -> None:
    tier = make_tier(4)
    for i in range(4):  # four independent single-block sequences: all leaves
        store(tier, [f"k{i}".encode()])
    locked = [b"k0", b"k1"]  # the two oldest
    assert tier.lock(locked) == [tier.slot_of(k) for k in locked]
    assert tier.num_locked == 2
    result = tier.allocate([b"n0", b"n1", b"n2"], [None, None, None])
    assert result.evicted == [b"k2", b"k3"]
    assert len(result.slots) == 2, "prefix: only two slots could be freed"
    assert tier.match([b"k0"]) == 1 and tier.match([b"k1"]) == 1
    assert not tier.contains(b"n2")
    tier.verify()
    tier.unlock(locked)
    assert tier.num_locked == 0
    tier.commit([b"n0", b"n1"])
    # lock() counted as a hit, tail first: k1 is now the least recently used
    assert tier.allocate([b"n2"], [None]).evicted == [b"k1"]
    tier.verify()


def test_lock_requires_ready_and_is_all_or_nothing() -> None:
    tier = make_tier(4)
    store(tier, [b"r"])
    tier.allocate([b"w"], [None])
    with pytest.raises(ValueError, match="not READY"):
        tier.lock([b"r", b"w"])
    with pytest.raises(ValueError, match="not READY"):
        tier.lock([b"r", b"missing"])
    assert tier.num_locked == 0
    tier.verify()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_parent_with_children_is_never_evicted(policy: str) -> None:
    """Stored head first in separate commits, as vLLM stores a growing request: every policy
    that looks only at insertion order or recency would pick the head first."""
    tier = make_tier(3, policy)
    a, b, c = chain("a", 3)
    store(tier, [a])
    store(tier, [b], parent=a)
    store(tier, [c], parent=b)
    for key in (a, a, b):
        tier.touch([key])
    evicted = []
    for i in range(3):
        evicted += tier.allocate([f"n{i}".encode()], [None]).evicted
        tier.verify()
        # whatever is left of the chain is still a matchable prefix
        assert tier.match([a, b, c]) == 3 - len(evicted)
    assert evicted == [c, b, a]


def test_eviction_takes_a_whole_chain_tail_first_in_one_call() -> None:
    tier = make_tier(6)
    old = chain("old", 4)
    store(tier, old)
    store(tier, [b"x", b"y"])
    new = chain("new", 4)
    result = tier.allocate(new, parents_of(new))
    assert result.evicted == old[::-1]
    assert len(result.slots) == 4
    tier.verify()


def test_branching_prefix_survives_until_its_last_branch_goes() -> None:
    tier = make_tier(5)
    trunk = chain("t", 2)
    store(tier, trunk)
    store(tier, [b"left"], parent=trunk[1])
    store(tier, [b"right"], parent=trunk[1])
    tier.touch([*trunk, b"right"])  # right branch hot
    evicted = tier.allocate([b"n0"], [None]).evicted + tier.allocate([b"n1"], [None]).evicted
    assert evicted == [b"left"], "trunk is still needed by the right branch"
    assert tier.match([*trunk, b"right"]) == 3
    tier.verify()


def test_allocate_never_evicts_the_parent_it_extends() -> None:
    tier = make_tier(2)
    store(tier, [b"p"])
    store(tier, [b"x"])  # p is now the least recently used leaf
    result = tier.allocate([b"c"], [b"p"])
    assert result.evicted == [b"x"] and len(result.slots) == 1
    tier.commit([b"c"])
    assert tier.match([b"p", b"c"]) == 2
    tier.verify()


def test_prefix_allocation_when_full() -> None:
    tier = make_tier(4)
    store(tier, chain("a", 2))
    tier.lock(chain("a", 2))
    keys = chain("b", 5)
    result = tier.allocate(keys, parents_of(keys))
    assert len(result.slots) == 2 and result.evicted == []
    assert [tier.contains(k) for k in keys] == [True, True, False, False, False]
    assert tier.num_free == 0
    tier.verify()


def test_rollback_frees_slots_and_the_parent_becomes_evictable_again() -> None:
    tier = make_tier(3)
    store(tier, [b"p"])
    keys = [b"c0", b"c1"]
    tier.allocate(keys, parents_of(keys, b"p"))
    assert tier.allocate([b"x"], [None]).slots == [], "p is pinned by its WRITING children"
    assert tier.rollback(keys) == [b"c1", b"c0"]
    assert tier.num_free == 2 and not tier.contains(b"c0")
    tier.verify()
    tier.allocate([b"x", b"y"], [None, None])
    assert tier.allocate([b"z"], [None]).evicted == [b"p"]
    tier.verify()


def test_commit_and_rollback_require_writing() -> None:
    tier = make_tier(4)
    store(tier, [b"r"])
    tier.allocate([b"w"], [None])
    for call in (tier.commit, tier.rollback):
        with pytest.raises(ValueError, match="not WRITING"):
            call([b"w", b"r"])
    assert tier.state_of(b"w") is BlockState.WRITING, "nothing changed"
    tier.verify()


def test_allocate_rejects_present_keys_without_side_effects() -> None:
    tier = make_tier(4)
    store(tier, [b"r"])
    with pytest.raises(ValueError, match="already present"):
        tier.allocate([b"n", b"r"], [None, b"n"])
    with pytest.raises(ValueError, match="already present"):
        tier.allocate([b"d", b"d"], [None, None])
    assert not tier.contains(b"n") and not tier.contains(b"d") and tier.num_free == 3
    tier.verify()


def test_unlock_never_goes_below_zero_and_ignores_missing_keys() -> None:
    tier = make_tier(2)
    store(tier, [b"a"])
    tier.lock([b"a"])
    tier.unlock([b"a", b"missing"])
    tier.unlock([b"a"])
    assert tier.num_locked == 0
    tier.lock([b"a"])
    assert tier.num_locked == 1
    tier.verify()


def test_drop_unlocked_frees_now_locked_frees_at_last_unlock() -> None:
    tier = make_tier(4)
    store(tier, [b"a", b"b"], parent=None)
    tier.lock([b"a"])
    tier.lock([b"a"])
    assert tier.drop([b"a", b"missing"]) == [b"a"]
    assert tier.match([b"a"]) == 0 and tier.state_of(b"a") is BlockState.DROPPED
    assert tier.num_used == 2, "a reader still holds a's slot"
    tier.verify()
    tier.unlock([b"a"])
    assert tier.num_used == 2
    tier.unlock([b"a"])
    assert not tier.contains(b"a") and tier.num_used == 1
    tier.verify()


def test_orphans_age_out_or_come_back_with_their_parent() -> None:
    tier = make_tier(4)
    keys = chain("a", 3)
    store(tier, keys)
    assert tier.drop([keys[1]]) == [keys[1]]
    assert tier.match(keys) == 1
    tier.verify()  # a2 is an orphan: the ledger must account for it
    store(tier, [keys[1]], parent=keys[0])
    assert tier.match(keys) == 3, "the orphan is reachable again"
    tier.drop([keys[1]])
    store(tier, [b"x", b"y", b"z"])
    assert not tier.contains(keys[2]), "an orphan is an evictable leaf"
    tier.verify()


def test_evict_all_unlocked_keeps_blocks_in_use() -> None:
    tier = make_tier(8)
    store(tier, chain("a", 3))
    store(tier, [b"locked"])
    tier.lock([b"locked"])
    tier.allocate([b"w"], [None])
    removed = tier.evict_all_unlocked()
    assert sorted(removed) == sorted(chain("a", 3))
    assert tier.match([b"locked"]) == 1 and tier.state_of(b"w") is BlockState.WRITING
    assert tier.num_used == 2
    tier.verify()


def test_evict_all_unlocked_orphans_a_locked_child() -> None:
    tier = make_tier(4)
    keys = chain("a", 2)
    store(tier, keys)
    tier.lock([keys[1]])  # e.g. locked by a plan, its parent's lock long gone
    assert tier.evict_all_unlocked() == [keys[0]]
    tier.verify()
    tier.unlock([keys[1]])
    assert tier.evict_all_unlocked() == [keys[1]]
    assert tier.num_used == 0
    tier.verify()


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_random_operations_keep_every_invariant(policy: str) -> None:
    rng = random.Random(POLICY_NAMES.index(policy))
    tier = make_tier(24, policy)
    trees = [chain(f"s{i}-", 12) for i in range(6)]
    child_of = {k: tree[i + 1] for tree in trees for i, k in enumerate(tree[:-1])}
    locks: list[list[bytes]] = []
    writing: list[list[bytes]] = []
    evictions = 0
    for _ in range(1500):
        op = rng.random()
        keys = rng.choice(trees)[: rng.randrange(1, 13)]
        if op < 0.35:
            start = tier.match(keys)
            while start < len(keys) and tier.contains(keys[start]):
                start += 1
            end = start
            while end < len(keys) and not tier.contains(keys[end]):
                end += 1
            new = keys[start:end]
            if new and (start == 0 or tier.is_ready(keys[start - 1])):
                locked = {k for held in locks for k in held}
                result = tier.allocate(new, parents_of(new, keys[start - 1] if start else None))
                writing.append(new[: len(result.slots)])
                evictions += len(result.evicted)
                for key in result.evicted:
                    assert key not in locked, "evicted a locked block"
                    assert not tier.contains(child_of.get(key, b"-")), "evicted a parent"
        elif op < 0.55 and writing:
            done = writing.pop(rng.randrange(len(writing)))
            (tier.commit if rng.random() < 0.8 else tier.rollback)(done)
        elif op < 0.75:
            n = tier.match(keys)
            if n:
                tier.lock(keys[:n])
                locks.append(keys[:n])
        elif op < 0.9 and locks:
            tier.unlock(locks.pop(rng.randrange(len(locks))))
        elif op < 0.95:
            tier.drop([rng.choice(keys)])
        else:
            tier.evict_all_unlocked()
        tier.verify()
    assert evictions > 50, "the test must exercise eviction"
    for done in writing:
        tier.rollback(done)
    for held in locks:
        tier.unlock(held)
    tier.verify()
    assert tier.num_locked == 0
    tier.evict_all_unlocked()
    assert tier.num_used == 0 and len(tier) == 0
