"""Eviction policies: victim order per policy, pinning, and the victims() iteration contract."""

from __future__ import annotations

import random

import pytest

from dynamo_flexkv.index.policies import POLICY_NAMES, EvictionPolicy, make_policy

A, B, C, D, E, F = (bytes([c]) * 8 for c in b"abcdef")


def order(policy: EvictionPolicy) -> list[bytes]:
    return list(policy.victims())


def script(policy: EvictionPolicy) -> EvictionPolicy:
    """Insert a, b, c, d; hit a twice, then b, then d. Uses: a=3, b=2, c=1, d=2."""
    for key in (A, B, C, D):
        policy.insert(key)
    for key in (A, A, B, D):
        policy.touch(key)
    return policy


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lru", [C, A, B, D]),  # last use: c at insert, then a, b, d
        ("mru", [D, B, A, C]),
        ("fifo", [A, B, C, D]),  # hits ignored
        ("filo", [D, C, B, A]),
        ("lfu", [C, B, D, A]),  # b and d tie on 2 uses: b was used less recently
        ("slru", [C, A, B, D]),  # c never hit: probation; a, b, d protected (cap 8), LRU order
    ],
)
def test_victim_order(name: str, expected: list[bytes]) -> None:
    assert order(script(make_policy(name, capacity=10))) == expected


def test_policy_names_are_exactly_the_supported_ones() -> None:
    assert POLICY_NAMES == ("lru", "lfu", "fifo", "mru", "slru", "filo")
    for name in POLICY_NAMES:
        policy = make_policy(name.upper(), 4)
        assert policy.name == name


def test_unknown_policy_names_the_allowed_values() -> None:
    with pytest.raises(ValueError, match="lru, lfu, fifo, mru, slru, filo"):
        make_policy("arc", 4)
    with pytest.raises(ValueError, match=">= 1"):
        make_policy("lru", 0)


def test_slru_protects_blocks_hit_twice_from_a_scan() -> None:
    policy = make_policy("slru", 10)
    policy.insert(A)
    policy.touch(A)  # promoted
    for key in (B, C, D):  # a scan of cold blocks
        policy.insert(key)
    assert order(policy) == [B, C, D, A]
    lru = make_policy("lru", 10)
    lru.insert(A)
    lru.touch(A)
    for key in (B, C, D):
        lru.insert(key)
    assert order(lru) == [A, B, C, D]


def test_slru_protected_overflow_demotes_to_probation_mru_end() -> None:
    policy = make_policy("slru", 5)  # protected segment: 4
    for key in (A, B, C, D, E):
        policy.insert(key)
    for key in (A, B, C, D, E):
        policy.touch(key)  # the fifth promotion demotes a
    policy.insert(F)  # probation, newer than a's demotion
    assert order(policy) == [A, F, B, C, D, E]


def test_slru_hit_in_protected_refreshes_it() -> None:
    policy = make_policy("slru", 10)
    for key in (A, B):
        policy.insert(key)
        policy.touch(key)
    policy.touch(A)
    assert order(policy) == [B, A]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_pinned_keys_are_never_offered(name: str) -> None:
    policy = script(make_policy(name, 10))
    policy.pin(B)
    policy.pin(C)
    assert set(order(policy)) == {A, D}
    policy.insert(E, pinned=True)
    assert E not in order(policy) and E in policy and len(policy) == 5


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_unpin_restores_the_key_at_its_historical_place(name: str) -> None:
    expected = order(script(make_policy(name, 10)))
    policy = script(make_policy(name, 10))
    for key in (A, B, C, D):
        policy.pin(key)
    for key in (D, C, B, A):
        policy.unpin(key)
    assert order(policy) == expected


def test_lru_hits_while_pinned_still_count() -> None:
    policy = make_policy("lru", 10)
    for key in (A, B, C):
        policy.insert(key)
    policy.pin(A)
    policy.touch(A)  # e.g. locked by a load, hit meanwhile
    policy.unpin(A)
    assert order(policy) == [B, C, A]


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_victims_is_non_destructive_when_stopped_early(name: str) -> None:
    policy = script(make_policy(name, 10))
    full = order(policy)
    victims = policy.victims()
    assert next(victims) == full[0]
    assert next(victims) == full[1]
    victims.close()
    assert order(policy) == full
    assert order(policy) == full


def test_remove_and_unpin_while_iterating() -> None:
    """The tier's eviction pattern: remove each victim; removing a child unpins its parent, which
    the same scan must then offer if it ranks first."""
    policy = make_policy("fifo", 10)
    for key in (A, B, C):
        policy.insert(key)
    policy.pin(A)  # a is the parent of d, stored later
    policy.insert(D)
    taken = []
    for key in policy.victims():
        taken.append(key)
        policy.remove(key)
        if key == D:
            policy.unpin(A)
    assert taken == [B, C, D, A]
    assert len(policy) == 0 and order(policy) == []


def test_removed_keys_are_never_offered() -> None:
    policy = script(make_policy("lru", 10))
    policy.remove(A)
    assert order(policy) == [C, B, D]
    assert A not in policy


def test_misuse_raises() -> None:
    policy = make_policy("lru", 4)
    policy.insert(A)
    with pytest.raises(KeyError):
        policy.insert(A)
    with pytest.raises(KeyError):
        policy.touch(B)
    with pytest.raises(KeyError):
        policy.pin(B)
    with pytest.raises(KeyError):
        policy.unpin(A)  # not pinned


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_heap_stays_bounded_under_many_hits(name: str) -> None:
    policy = make_policy(name, 16)
    keys = [bytes([i]) * 8 for i in range(16)]
    for key in keys:
        policy.insert(key)
    rng = random.Random(0)
    for _ in range(20_000):
        key = rng.choice(keys)
        policy.touch(key)
        if rng.random() < 0.1:
            policy.pin(key)
            policy.unpin(key)
    assert len(policy._heap) <= 2 * len(keys) + 64  # type: ignore[attr-defined]
    assert sorted(order(policy)) == sorted(keys)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_random_operations_agree_with_a_reference_model(name: str) -> None:
    """Against a brute-force model: candidates sorted by the policy's definition."""
    rng = random.Random(POLICY_NAMES.index(name))
    policy = make_policy(name, 1000)  # slru: protected 800, never overflows here
    inserted: dict[bytes, int] = {}
    used: dict[bytes, int] = {}
    uses: dict[bytes, int] = {}
    hit_twice: set[bytes] = set()
    pinned: set[bytes] = set()
    for clock in range(3000):
        op = rng.random()
        key = bytes([rng.randrange(40)]) * 4
        if key not in inserted:
            policy.insert(key)
            inserted[key] = used[key] = clock
            uses[key] = 1
        elif op < 0.5:
            policy.touch(key)
            used[key] = clock
            uses[key] += 1
            hit_twice.add(key)
        elif op < 0.7:
            policy.remove(key)
            for table in (inserted, used, uses):
                del table[key]
            hit_twice.discard(key)
            pinned.discard(key)
        elif key in pinned:
            policy.unpin(key)
            pinned.remove(key)
        else:
            policy.pin(key)
            pinned.add(key)
        if clock % 50 == 0:
            rank = {
                "lru": lambda k: used[k],
                "mru": lambda k: -used[k],
                "fifo": lambda k: inserted[k],
                "filo": lambda k: -inserted[k],
                "lfu": lambda k: (uses[k], used[k]),
                "slru": lambda k: (k in hit_twice, used[k]),
            }[name]
            assert order(policy) == sorted(set(inserted) - pinned, key=rank)
