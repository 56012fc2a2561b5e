"""CacheEngine across tiers: staging lower-tier hits up, write-through spills, warm restore."""

from __future__ import annotations

import pytest

from dynamo_flexkv.index import CacheEngine, Removed, Stored, TierIndex, make_policy
from tests.unit.test_engine import chain, parents_of, store


def two_tiers(cpu_slots: int = 8, ssd_slots: int = 8) -> CacheEngine:
    return CacheEngine([
        TierIndex("CPU", cpu_slots, make_policy("lru", cpu_slots)),
        TierIndex("SSD", ssd_slots, make_policy("lru", ssd_slots)),
    ])


def finish_spills(engine: CacheEngine) -> None:
    """Complete every write-through the engine planned, successfully."""
    for plan in engine.take_spills():
        assert engine.complete_spill(plan.spill_id, [True] * len(plan.keys)) == len(plan.keys)


def spill_all(engine: CacheEngine, keys: list[bytes]) -> None:
    finish_spills(engine)
    assert engine.tiers[1].match(keys) == len(keys)


def only_on_ssd(engine: CacheEngine, keys: list[bytes]) -> None:
    """Store ``keys``, let them reach the SSD tier, then push them out of the 4-slot CPU tier."""
    store(engine, "s", keys)
    spill_all(engine, keys)
    store(engine, "t", chain("b", 4))
    finish_spills(engine)
    assert engine.tiers[0].match(keys) == 0


def test_committed_store_plans_its_write_through_and_announces_it_after_commit():
    engine = two_tiers()
    keys = chain("a", 3)
    store(engine, "s", keys)
    engine.take_events()
    [plan] = engine.take_spills()
    assert plan.keys == tuple(keys) and plan.dst == "SSD" and engine.take_spills() == []
    assert engine.take_events() == []  # nothing announced while in flight
    assert engine.tiers[0].num_locked == 3  # the source is not evicted while being read
    engine.complete_spill(plan.spill_id, [True, True, True])
    assert engine.take_events() == [Stored("SSD", tuple(keys), (None, keys[0], keys[1]))]
    assert engine.tiers[0].num_locked == 0 and engine.tiers[1].match(keys) == 3
    assert engine.prepare_spill(keys, parents_of(keys)) is None  # already there


def test_failed_spill_keeps_only_the_prefix_before_the_failure():
    engine = two_tiers()
    keys = chain("a", 4)
    store(engine, "s", keys)
    [plan] = engine.take_spills()
    assert engine.complete_spill(plan.spill_id, [True, False, True, True]) == 1
    assert engine.tiers[1].match(keys) == 1 and engine.tiers[1].num_used == 1


def test_ssd_only_hit_is_staged_into_cpu_then_loaded():
    engine = two_tiers(cpu_slots=4)
    old = chain("a", 3)
    only_on_ssd(engine, old)
    assert engine.tiers[0].match(old) == 0 and engine.lookup(old) == 3
    engine.take_events()

    plan = engine.prepare_load("r", old, first_parent=None)
    assert plan is not None and plan.tier == "CPU" and [s.index for s in plan.staged] == [0, 1, 2]
    assert {s.tier for s in plan.staged} == {"SSD"}
    assert engine.complete_stage("r", [True, True, True]) == 3
    assert engine.take_events()[-1] == Stored("CPU", tuple(old), (None, old[0], old[1]))
    engine.complete_load("r", True)
    assert engine.snapshot().hit_blocks == {"CPU": 0, "SSD": 3}
    assert engine.tiers[0].match(old) == 3 and engine.tiers[0].num_locked == 0
    assert engine.tiers[1].num_locked == 0


def test_mixed_prefix_loads_cpu_blocks_and_stages_the_rest():
    engine = two_tiers(cpu_slots=6)
    keys = chain("a", 4)
    store(engine, "s", keys)
    spill_all(engine, keys)
    engine.tiers[0].drop(keys[2:])  # the tail survives only on SSD
    plan = engine.prepare_load("r", keys)
    assert [s.index for s in plan.staged] == [2, 3]
    assert engine.complete_stage("r", [True, True]) == 4
    engine.complete_load("r", True)
    assert engine.snapshot().hit_blocks == {"CPU": 2, "SSD": 2}


def test_corrupt_staged_block_is_dropped_and_cuts_the_load():
    engine = two_tiers(cpu_slots=4)
    keys = chain("a", 3)
    only_on_ssd(engine, keys)
    engine.take_events()
    engine.prepare_load("r", keys)
    assert engine.complete_stage("r", [True, False, True]) == 1
    events = engine.take_events()
    assert Removed("SSD", (keys[1],)) in events
    assert not engine.tiers[1].is_ready(keys[1])  # never served again
    assert engine.tiers[0].match(keys) == 1  # block 0 staged; 1 and 2 rolled back
    engine.complete_load("r", True)
    assert engine.tiers[0].num_locked == engine.tiers[1].num_locked == 0


def test_cancel_before_staging_releases_everything():
    engine = two_tiers(cpu_slots=4)
    keys = chain("a", 3)
    only_on_ssd(engine, keys)
    engine.prepare_load("r", keys)
    engine.cancel_load("r")
    cpu, ssd = engine.tiers
    assert not any(cpu.contains(key) for key in keys)  # staging slots freed
    assert cpu.num_locked == 0 and ssd.num_locked == 0
    cpu.verify()
    ssd.verify()


def test_load_cannot_complete_before_its_staging():
    engine = two_tiers(cpu_slots=4)
    keys = chain("a", 3)
    only_on_ssd(engine, keys)
    engine.prepare_load("r", keys)
    with pytest.raises(ValueError, match="complete_stage"):
        engine.complete_load("r", True)


def test_restore_readmits_blocks_with_their_chain():
    engine = two_tiers()
    keys = chain("a", 3)
    engine.restore("SSD", [(keys[2], 5, keys[1]), (keys[0], 1, None), (keys[1], 3, keys[0])])
    ssd = engine.tiers[1]
    assert engine.lookup(keys) == 3 and ssd.slot_of(keys[1]) == 3
    ssd.verify()
    victims = ssd.allocate(chain("z", 6), parents_of(chain("z", 6))).evicted
    assert victims == [keys[2]]  # the chain's tail goes first


def test_an_unwritable_lower_tier_gets_no_spills_and_keeps_its_readable_blocks():
    engine = two_tiers(cpu_slots=4, ssd_slots=4)
    old = chain("a", 4)
    store(engine, "s", old)
    spill_all(engine, old)
    engine.unwritable.add("SSD")  # the disk degraded: writes would fail
    store(engine, "t", chain("b", 4))
    assert engine.take_spills() == []
    assert engine.tiers[1].match(old) == 4  # nothing evicted below for a write that cannot happen
