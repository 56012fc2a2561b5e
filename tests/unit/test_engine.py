"""CacheEngine: load/store round trips, failure paths, events, stats, and leak-free accounting."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from dynamo_flexkv.index import (
    CacheEngine,
    Cleared,
    Removed,
    Stored,
    TierEvent,
    TierIndex,
    make_policy,
)


def chain(tag: str, n: int) -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def parents_of(keys: Sequence[bytes], parent: bytes | None = None) -> list[bytes | None]:
    return [parent, *keys[:-1]]


def make_engine(num_slots: int = 16, policy: str = "lru", **kwargs: bool) -> CacheEngine:
    return CacheEngine([TierIndex("CPU", num_slots, make_policy(policy, num_slots))], **kwargs)


def store(engine: CacheEngine, rid: str, keys: list[bytes], parent: bytes | None = None) -> None:
    plan = engine.prepare_store(rid, keys, parents_of(keys, parent))
    assert plan is not None
    engine.complete_store(rid, True)


def test_store_then_load_round_trip() -> None:
    engine = make_engine()
    keys = chain("a", 5)
    assert engine.lookup(keys) == 0
    plan = engine.prepare_store("r1", keys, parents_of(keys))
    assert plan is not None and plan.keys == tuple(keys) and plan.tier == "CPU"
    assert len(set(plan.slots)) == 5
    assert engine.lookup(keys) == 0, "not matchable before the bytes land"
    assert engine.take_events() == [], "Stored only after commit"
    engine.complete_store("r1", True)
    assert engine.take_events() == [Stored("CPU", tuple(keys), tuple(parents_of(keys)))]
    assert engine.lookup([*keys, b"other"]) == 5

    load = engine.prepare_load("r2", keys[:3])
    assert load is not None and load.slots == plan.slots[:3] and load.keys == tuple(keys[:3])
    assert engine.tiers[0].num_locked == 3 and "r2" in engine.pending_loads()
    assert engine.complete_load("r2", True) == []
    assert engine.tiers[0].num_locked == 0 and engine.pending_loads() == {}
    stats = engine.snapshot()
    assert stats.hit_blocks == {"CPU": 3} and stats.stored_blocks == {"CPU": 5}
    assert stats.blocks_held == {"CPU": 5} and stats.lookups == 3
    engine.tiers[0].verify()


def test_prepare_load_is_idempotent_per_request() -> None:
    engine = make_engine()
    keys = chain("a", 4)
    store(engine, "s", keys)
    engine.prepare_load("r", keys)
    plan = engine.prepare_load("r", keys[:2])  # the scheduler asks again
    assert plan is not None and plan.keys == tuple(keys[:2])
    assert engine.tiers[0].num_locked == 2
    engine.complete_load("r", True)
    assert engine.tiers[0].num_locked == 0
    assert engine.prepare_load("r", []) is None and engine.pending_loads() == {}
    engine.tiers[0].verify()


def test_prepare_load_of_unavailable_keys_raises_and_locks_nothing() -> None:
    engine = make_engine()
    keys = chain("a", 3)
    store(engine, "s", keys[:2])
    with pytest.raises(ValueError, match="lookup finds 2"):
        engine.prepare_load("r", keys)
    assert engine.tiers[0].num_locked == 0 and engine.pending_loads() == {}


def test_failed_load_drops_bad_blocks_and_reports_them() -> None:
    engine = make_engine()
    keys = chain("a", 4)
    store(engine, "s", keys)
    engine.take_events()
    engine.prepare_load("r", keys)
    with pytest.raises(ValueError, match="not in its plan"):
        engine.complete_load("r", False, bad_keys=[b"stranger"])
    with pytest.raises(ValueError, match="successful"):
        engine.complete_load("r", True, bad_keys=[keys[2]])
    assert engine.complete_load("r", False, bad_keys=[keys[2]]) == [keys[2]]
    assert engine.take_events() == [Removed("CPU", (keys[2],))]
    assert engine.lookup(keys) == 2
    stats = engine.snapshot()
    assert stats.load_failures == 1 and stats.dropped_blocks == {"CPU": 1}
    assert stats.hit_blocks == {"CPU": 0}
    assert engine.tiers[0].num_locked == 0
    engine.tiers[0].verify()


def test_failed_load_without_bad_keys_keeps_the_blocks() -> None:
    engine = make_engine()
    keys = chain("a", 2)
    store(engine, "s", keys)
    engine.take_events()
    engine.prepare_load("r", keys)
    assert engine.complete_load("r", False) == []
    assert engine.lookup(keys) == 2 and engine.take_events() == []
    assert engine.tiers[0].num_locked == 0


def test_cancel_and_unknown_completions() -> None:
    engine = make_engine()
    keys = chain("a", 2)
    store(engine, "s", keys)
    engine.cancel_load("nobody")  # no-op
    engine.prepare_load("r", keys)
    engine.cancel_load("r")
    assert engine.tiers[0].num_locked == 0 and engine.snapshot().load_failures == 0
    with pytest.raises(KeyError):
        engine.complete_load("r", True)
    with pytest.raises(KeyError):
        engine.complete_store("r", True)


def test_prepare_store_skips_present_blocks_and_counts_hits() -> None:
    engine = make_engine(8, "lru")
    head = chain("h", 2)
    store(engine, "s1", head)
    store(engine, "s2", chain("x", 4))
    keys = [*head, *chain("t", 2)]
    plan = engine.prepare_store("s3", keys, parents_of(keys))
    assert plan is not None and plan.keys == tuple(keys[2:])
    # s3 reused the head, so the x chain is now the least recently used
    evicted = engine.tiers[0].allocate([b"n0", b"n1"], [None, None]).evicted
    assert evicted == [b"x3", b"x2"]


def test_touch_protects_blocks_from_eviction() -> None:
    engine = make_engine(4)
    store(engine, "s1", [b"a"])
    store(engine, "s2", [b"b"])
    store(engine, "s3", [b"c"])
    engine.touch([b"a", b"missing"])
    engine.prepare_store("s4", [b"d", b"e"], [None, b"d"])
    assert engine.take_events()[-1] == Removed("CPU", (b"b",))


def test_a_store_may_extend_blocks_still_being_written() -> None:
    """A request's last blocks are planned while its previous chunk's save is in flight (vLLM frees a
    finished request's blocks one step later): they are committed once that save has landed."""
    engine = make_engine()
    keys = chain("a", 3)
    engine.prepare_store("w1", keys[:2], parents_of(keys[:2]))
    plan = engine.prepare_store("w2", keys, parents_of(keys))
    assert plan is not None and plan.keys == (keys[2],)  # a0, a1 are WRITING: skipped, not hits
    assert engine.complete_store("w1", True) and engine.complete_store("w2", True)
    assert [e.keys for e in engine.take_events()] == [tuple(keys[:2]), (keys[2],)]  # parents announced first
    assert engine.lookup(keys) == 3


def test_a_store_whose_parent_was_not_stored_is_dropped() -> None:
    engine = make_engine(4)
    keys = chain("a", 3)
    engine.prepare_store("w1", keys[:2], parents_of(keys[:2]))
    engine.prepare_store("w2", keys, parents_of(keys))
    # out of order: a2's parent a1 is still WRITING when its own save lands
    assert engine.complete_store("w2", True) is False
    assert engine.complete_store("w1", False) is False  # the parents' save failed
    assert engine.take_events() == [] and engine.tiers[0].num_free == 4
    engine.tiers[0].verify()
    # and a child planned on a parent that then failed is never committed either
    engine.prepare_store("w3", keys[:2], parents_of(keys[:2]))
    engine.prepare_store("w4", keys, parents_of(keys))
    engine.complete_store("w3", False)
    assert engine.complete_store("w4", True) is False
    assert engine.lookup(keys) == 0 and engine.tiers[0].num_free == 4
    engine.tiers[0].verify()


def test_prepare_store_never_strands_a_block() -> None:
    engine = make_engine()
    keys = chain("a", 3)
    assert engine.prepare_store("r", keys[1:], parents_of(keys[1:], keys[0])) is None
    assert engine.pending_stores() == {}
    assert engine.prepare_store("r", [], []) is None


def test_one_store_in_flight_per_request() -> None:
    engine = make_engine()
    engine.prepare_store("r", [b"a"], [None])
    with pytest.raises(RuntimeError, match="in flight"):
        engine.prepare_store("r", [b"b"], [None])
    engine.complete_store("r", True)
    assert engine.prepare_store("r", [b"b"], [None]) is not None


def test_failed_store_rolls_back_silently() -> None:
    engine = make_engine(4)
    keys = chain("a", 3)
    engine.prepare_store("r", keys, parents_of(keys))
    engine.complete_store("r", False)
    assert engine.take_events() == []
    assert engine.lookup(keys) == 0 and engine.tiers[0].num_free == 4
    assert engine.snapshot().stored_blocks == {"CPU": 0}
    engine.tiers[0].verify()


def test_eviction_publishes_removed_and_store_is_a_prefix_when_full() -> None:
    engine = make_engine(4)
    old = chain("old", 3)
    store(engine, "s1", old)
    engine.take_events()
    engine.prepare_load("busy", old[:1])  # locked: cannot go
    new = chain("new", 5)
    plan = engine.prepare_store("s2", new, parents_of(new))
    assert plan is not None and plan.keys == tuple(new[:3])
    assert engine.take_events() == [Removed("CPU", (old[2], old[1]))]
    assert engine.snapshot().evicted_blocks == {"CPU": 2}
    engine.complete_store("s2", True)
    engine.complete_load("busy", True)
    assert engine.lookup(old) == 1 and engine.lookup(new) == 3
    engine.tiers[0].verify()


def two_tier_engine(num_slots: int = 16) -> CacheEngine:
    return CacheEngine([TierIndex(name, num_slots, make_policy("lru", num_slots)) for name in ("CPU", "SSD")])


def test_reset_takes_out_every_ready_block_even_those_a_load_holds() -> None:
    engine = make_engine()
    a, b = chain("a", 2), chain("b", 2)
    store(engine, "s", a)
    store(engine, "s", b)
    engine.prepare_load("load", b)
    engine.take_events()
    assert sorted(engine.reset()) == sorted(a + b)
    [cleared] = engine.take_events()
    assert isinstance(cleared, Cleared) and cleared.tier == "CPU" and sorted(cleared.keys) == sorted(a + b)
    assert engine.lookup(a) == 0 and engine.lookup(b) == 0, "a block a load holds is not matched after a reset"
    assert engine.tiers[0].num_used == 2  # its slots stay the reader's until it ends
    assert engine.complete_load("load", True) == []
    assert engine.snapshot().hit_blocks == {"CPU": 0}, "no hit on KV of before the reset"
    assert engine.tiers[0].num_used == 0 and engine.take_events() == []
    engine.tiers[0].verify()


def test_a_store_planned_before_a_reset_commits_nothing_after_it() -> None:
    engine = make_engine()
    a, c = chain("a", 2), chain("c", 3)
    store(engine, "s", a)
    engine.prepare_store("store", c, parents_of(c))
    engine.reset()
    engine.take_events()
    assert engine.complete_store("store", True) is False
    assert engine.lookup(c) == 0 and engine.tiers[0].num_used == 0
    assert engine.take_events() == [] and engine.take_spills() == []
    assert engine.snapshot().stored_blocks == {"CPU": 2}
    store(engine, "again", c)  # plans made after the reset commit as usual
    assert engine.lookup(c) == 3
    engine.tiers[0].verify()


def test_spills_planned_before_a_reset_are_never_written_or_committed() -> None:
    engine = two_tier_engine()
    a, b = chain("a", 2), chain("b", 2)
    store(engine, "sa", a)
    [taken] = engine.take_spills()  # handed to the data plane before the reset
    store(engine, "sb", b)  # its spill is planned, not yet taken
    engine.reset()
    engine.take_events()
    assert engine.take_spills() == [], "a spill not yet written is released, never written"
    assert engine.complete_spill(taken.spill_id, [True, True]) == 0
    assert engine.take_events() == []
    cpu, ssd = engine.tiers
    assert engine.lookup(a + b) == 0 and cpu.num_used == 0 and ssd.num_used == 0
    assert cpu.num_locked == 0
    cpu.verify()
    ssd.verify()


def test_a_staging_planned_before_a_reset_delivers_nothing() -> None:
    engine = two_tier_engine()
    keys = chain("k", 3)
    store(engine, "s", keys)
    [spill] = engine.take_spills()
    engine.complete_spill(spill.spill_id, [True] * 3)
    engine.tiers[0].drop(keys[1:])  # only the first block is still in the CPU tier
    plan = engine.prepare_load("r", keys)
    assert [s.index for s in plan.staged] == [1, 2]
    engine.reset()
    engine.take_events()
    assert engine.complete_stage("r", [True, True]) == 0, "none of the plan may be loaded"
    assert engine.complete_load("r", True) == []
    assert engine.take_events() == [] and engine.snapshot().hit_blocks == {"CPU": 0, "SSD": 0}
    cpu, ssd = engine.tiers
    assert cpu.num_used == 0 and ssd.num_used == 0 and engine.lookup(keys) == 0
    cpu.verify()
    ssd.verify()


def test_a_load_cancelled_across_a_reset_frees_its_slots() -> None:
    engine = two_tier_engine()
    keys = chain("k", 2)
    store(engine, "s", keys)
    [spill] = engine.take_spills()
    engine.complete_spill(spill.spill_id, [True, True])
    engine.tiers[0].drop(keys)
    engine.prepare_load("r", keys)
    engine.reset()
    engine.cancel_load("r")
    assert [tier.num_used for tier in engine.tiers] == [0, 0]
    assert engine.epoch == 1


def test_events_can_be_turned_off() -> None:
    engine = make_engine(2, record_events=False)
    store(engine, "s1", chain("a", 2))
    store(engine, "s2", chain("b", 2))
    engine.reset()
    assert engine.take_events() == []
    assert engine.snapshot().evicted_blocks == {"CPU": 2}


def test_snapshot_is_a_copy() -> None:
    engine = make_engine()
    before = engine.snapshot()
    store(engine, "s", [b"a"])
    assert before.stored_blocks == {"CPU": 0} and before.blocks_held == {"CPU": 0}
    assert engine.snapshot().stored_blocks == {"CPU": 1}


def test_engine_validates_its_tiers() -> None:
    with pytest.raises(ValueError, match="at least one"):
        CacheEngine([])
    tiers = [TierIndex("CPU", 2, make_policy("lru", 2)) for _ in range(2)]
    with pytest.raises(ValueError, match="unique"):
        CacheEngine(tiers)


def apply(
    events: list[TierEvent], announced: set[bytes], forgotten: set[bytes], check_parents: bool
) -> None:
    """Replay events as a router would: ``announced`` is what it believes the tier holds,
    ``forgotten`` what a Cleared told it to forget (survivors of a reset may be removed later)."""
    for event in events:
        if isinstance(event, Stored):
            for key, parent in zip(event.keys, event.parents, strict=True):
                assert key not in announced, "announced twice"
                if check_parents:
                    assert parent is None or parent in announced, "child before its parent"
                announced.add(key)
        elif isinstance(event, Removed):
            assert (announced | forgotten).issuperset(event.keys), "removed, never announced"
            announced.difference_update(event.keys)
        else:
            forgotten |= announced
            announced.clear()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("with_faults", [False, True])
def test_random_interleaving_never_leaks(seed: int, with_faults: bool) -> None:
    """Requests sharing prefixes, interleaved at random. Without faults the replayed events must
    equal the tier's READY set exactly; with bad loads and resets they must stay a subset."""
    rng = random.Random(seed)
    policy = ("lru", "lfu", "fifo", "mru", "slru", "filo")[seed]
    engine = make_engine(40, policy)
    tier = engine.tiers[0]
    prefixes = [chain(f"p{i}-", 6) for i in range(3)]
    prompts = [
        prefixes[rng.randrange(3)] + chain(f"q{i}-", rng.randrange(1, 14)) for i in range(12)
    ]
    announced: set[bytes] = set()
    forgotten: set[bytes] = set()
    for step in range(1500):
        rid = f"r{rng.randrange(8)}"
        prompt = rng.choice(prompts)
        op = rng.random()
        if op < 0.3:
            n = engine.lookup(prompt)
            engine.prepare_load(rid, prompt[:n])
        elif op < 0.5 and rid in engine.pending_loads():
            plan = engine.pending_loads()[rid]
            if with_faults and rng.random() < 0.3:
                engine.complete_load(rid, False, bad_keys=[rng.choice(plan.keys)])
            elif rng.random() < 0.5:
                engine.complete_load(rid, True)
            else:
                engine.cancel_load(rid)
        elif op < 0.75 and rid not in engine.pending_stores():
            start = rng.randrange(len(prompt))  # vLLM stores a request's new blocks
            parent = prompt[start - 1] if start else None
            engine.prepare_store(rid, prompt[start:], parents_of(prompt[start:], parent))
        elif rid in engine.pending_stores():
            engine.complete_store(rid, rng.random() < 0.85)
        if with_faults and rng.random() < 0.005:
            engine.reset()
        apply(engine.take_events(), announced, forgotten, check_parents=not with_faults)
        if step % 25 == 0:
            tier.verify()
    for rid in engine.pending_loads():
        engine.complete_load(rid, True)
    for rid in engine.pending_stores():
        engine.complete_store(rid, True)
    apply(engine.take_events(), announced, forgotten, check_parents=not with_faults)
    tier.verify()
    assert tier.num_locked == 0 and engine.pending_loads() == {} == engine.pending_stores()
    ready = {k for p in prompts for k in p if tier.is_ready(k)}
    assert len(ready) == len(tier) == tier.num_used, "every block is READY and accounted for"
    if with_faults:
        assert announced <= ready
    else:
        assert announced == ready
    stats = engine.snapshot()
    assert stats.evicted_blocks["CPU"] > 0 and stats.stored_blocks["CPU"] > 40
