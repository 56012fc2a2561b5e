"""TierStack over example backends: the cascade fans out to every lower tier, a shared tier is asked
off the scheduler's thread ("ask again later"), and the start-up refusals of a shared tier."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future

import pytest
import torch

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.storage.backend import IoResult, completed, failed_io
from dynamo_flexkv.index import CacheEngine, Stored, TierIndex, make_policy
from dynamo_flexkv.storage.cpu.pool import SHM_DIR
from dynamo_flexkv.storage.layout import PoolGeometry
from dynamo_flexkv.tiers.facts import InstanceFacts, shared_tier_layout
from dynamo_flexkv.tiers.stack import TierStack
from tests.example_tier import MemoryTier
from tests.unit.test_engine import chain, parents_of, store

DEADLINE_S = 10
SHARD = 4096


def make_stack(*backends, timeout_s: float = 5.0) -> TierStack:
    facts = InstanceFacts(f"dynamo-flexkv-test-{uuid.uuid4().hex[:8]}", 16, PoolGeometry(8, SHARD, 1), {})
    stack = TierStack(facts, FlexKVSettings(remote_timeout_s=timeout_s), record_events=True, backends=backends)
    stack.io.pool.copy_(torch.randint(0, 256, stack.io.pool.shape, dtype=torch.uint8))
    return stack


@pytest.fixture
def stacks():
    made: list[TierStack] = []

    def make(*backends, **kwargs) -> TierStack:
        made.append(make_stack(*backends, **kwargs))
        return made[-1]

    yield make
    for stack in made:
        stack.close()
        (SHM_DIR / stack.facts.identity).unlink()


def until(condition, what: str):
    deadline = time.monotonic() + DEADLINE_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return value


def settle(stack: TierStack) -> None:
    """Advance the stack until every spill and staging it started has been acknowledged."""
    until(lambda: (stack.advance(), stack.num_pending == 0)[1], "lower-tier work")


def named(name: str, shared: bool = True, num_slots: int = 16) -> MemoryTier:
    tier = MemoryTier(num_slots)
    tier.name, tier.shared = name, shared
    return tier


def test_committed_store_spills_into_every_lower_tier_from_the_cpu_pool():
    engine = CacheEngine([TierIndex(n, 8, make_policy("lru", 8)) for n in ("CPU", "SSD", "CLUSTER")])
    keys = chain("a", 3)
    store(engine, "s", keys)
    engine.take_events()
    plans = engine.take_spills()
    assert [(p.src, p.dst) for p in plans] == [("CPU", "SSD"), ("CPU", "CLUSTER")]
    assert engine.tiers[0].num_locked == 3
    engine.complete_spill(plans[1].spill_id, [True] * 3)  # destinations finish independently
    engine.complete_spill(plans[0].spill_id, [True, False, True])
    assert engine.take_events() == [Stored("CLUSTER", tuple(keys), tuple(parents_of(keys))),
                                    Stored("SSD", tuple(keys[:1]), (None,))]
    assert engine.tiers[0].num_locked == 0
    assert engine.prepare_spill(keys, parents_of(keys), "CLUSTER") is None  # already there


def test_a_block_another_instance_wrote_is_asked_for_then_staged(stacks):
    cluster = named("CLUSTER")
    writer, reader = stacks(cluster), stacks(cluster)
    keys = chain("p", 3)
    store(writer.engine, "w", keys)
    settle(writer)
    assert cluster.lookup(keys).result() == [True] * 3

    assert reader.lookup("r", keys, None) is None  # asked, not yet answered: vLLM asks again later
    hits = until(lambda: reader.lookup("r", keys, None), "the store's answer")
    assert hits == 3
    plan = reader.engine.prepare_load("r", keys)
    assert [s.tier for s in plan.staged] == ["CLUSTER"] * 3
    reader.stage(plan)
    staged = until(lambda: reader.advance(), "the staging reads")
    assert staged == [("r", 3)]
    written = writer.engine.tiers[0]
    for key, slot in zip(keys, plan.slots):
        assert torch.equal(reader.io.pool[slot], writer.io.pool[written.slot_of(key)])
    reader.engine.complete_load("r", success=True)


def test_an_absent_block_is_believed_briefly_and_not_asked_again(stacks):
    cluster = named("CLUSTER")
    asked = []
    lookup = cluster.lookup
    cluster.lookup = lambda keys: asked.append(list(keys)) or lookup(keys)
    stack = stacks(cluster)
    keys = chain("x", 2)
    assert stack.lookup("r", keys, None) is None
    assert until(lambda: stack.lookup("r", keys, None) is not None, "an answer")
    assert stack.lookup("r2", keys, None) == 0 and len(asked) == 1


def test_a_block_the_shared_tier_failed_to_deliver_is_recomputed_not_staged_again(stacks):
    """The store still says the block exists (a corrupt value, an expired lease): the request vLLM
    reschedules after the failed load must not find it there again, or it would stage it forever."""
    cluster = named("CLUSTER")
    writer, reader = stacks(cluster), stacks(cluster)
    keys = chain("c", 3)
    store(writer.engine, "w", keys)
    settle(writer)
    assert until(lambda: reader.lookup("r", keys, None), "the store's answer") == 3
    plan = reader.engine.prepare_load("r", keys)
    cluster.read = lambda pool, addrs, slots, keys: failed_io(len(keys))
    reader.stage(plan)
    assert until(lambda: reader.advance(), "the staging reads") == [("r", 0)]
    reader.engine.complete_load("r", success=True)  # nothing loaded: vLLM reschedules the request
    assert reader.lookup("r", keys, None) == 0


def test_an_unhealthy_shared_tier_is_not_asked(stacks):
    cluster = named("CLUSTER")
    cluster.broken = True
    stack = stacks(cluster)
    store(stack.engine, "s", chain("a", 1))
    assert stack.lookup("r", [*chain("a", 1), *chain("b", 2)], None) == 1


def test_an_unanswered_lookup_becomes_a_miss_after_the_timeout(stacks):
    cluster = named("CLUSTER")
    cluster.lookup = lambda keys: Future()  # never answers
    stack = stacks(cluster, timeout_s=0.05)
    keys = chain("h", 2)
    assert stack.lookup("r", keys, None) is None
    assert until(lambda: stack.lookup("r", keys, None) == 0, "the lookup timeout")


def test_a_local_tier_is_never_asked(stacks):
    ssd = named("SSD", shared=False)
    ssd.lookup = None  # would raise if called
    stack = stacks(ssd)
    assert stack.lookup("r", chain("n", 2), None) == 0


def test_shared_tier_refuses_per_process_random_block_hashes(monkeypatch):
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    with pytest.raises(ValueError, match="PYTHONHASHSEED.*sha256"):
        shared_tier_layout({"hash_algo": "xxhash"}, "remote_store")
    assert shared_tier_layout({"hash_algo": "sha256"}, "remote_store")["hash_seed"] == "vllm-default"
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    assert shared_tier_layout({"hash_algo": "xxhash_cbor"}, "remote_store")["hash_seed"] == "7"


def test_spills_planned_in_one_step_go_to_each_tier_as_one_batch(stacks):
    cluster, writes = named("CLUSTER"), []
    write = cluster.write
    cluster.write = lambda pool, src, dst, keys, **meta: writes.append(list(keys)) or write(pool, src, dst, keys, **meta)
    stack = stacks(cluster)
    store(stack.engine, "a", chain("a", 2))
    store(stack.engine, "b", chain("b", 3))
    settle(stack)
    assert writes == [chain("a", 2) + chain("b", 3)]
    assert stack.engine.tiers[1].match(chain("a", 2)) == 2 and stack.engine.tiers[1].match(chain("b", 3)) == 3


def test_a_shared_tier_answer_asked_before_a_reset_is_not_believed_after_it(stacks):
    cluster = named("CLUSTER")
    writer, reader = stacks(cluster), stacks(cluster)
    keys = chain("w", 3)
    store(writer.engine, "w", keys)
    settle(writer)
    answer: Future = Future()
    ask = cluster.lookup
    cluster.lookup = lambda keys: answer
    assert reader.lookup("r", keys, None) is None  # asked before the reset
    reader.reset()
    answer.set_result([True] * 3)  # "present": true of the namespace of before the reset
    cluster.lookup = ask
    until(lambda: reader.lookup("r", keys, None) is not None, "an answer")
    assert reader.lookup("r", keys, None) == 0 and reader.engine.tiers[1].num_used == 0


def test_a_spill_in_flight_at_a_reset_is_neither_committed_nor_found_after_it(stacks):
    cluster = named("CLUSTER")
    stack = stacks(cluster)
    gate = threading.Event()
    cluster._io.submit(gate.wait, DEADLINE_S)  # the store's thread is busy: the spill waits behind it
    old, new = chain("old", 2), chain("new", 2)
    store(stack.engine, "s", old)
    stack.advance()
    assert stack.num_pending == 1
    stack.reset()
    gate.set()
    settle(stack)
    cpu, shared = stack.engine.tiers
    assert cpu.num_used == 0 and shared.num_used == 0 and cpu.num_locked == 0
    assert cluster.lookup(old).result() == [False, False], "written before the reset: another namespace"
    assert not any(isinstance(e, Stored) and e.tier == "CLUSTER" for e in stack.engine.take_events())
    store(stack.engine, "s2", new)  # after the reset, the cascade works as before
    settle(stack)
    assert shared.match(new) == 2 and cluster.lookup(new).result() == [True, True]


class CountingLookups:
    """A shared tier's lookups, counted; `answer=False` leaves every question unanswered."""

    def __init__(self, tier: MemoryTier, answer: bool = True):
        self.asked: list[list[bytes]] = []
        self._lookup, self._answer = tier.lookup, answer
        tier.lookup = self

    def __call__(self, keys):
        self.asked.append(list(keys))
        return self._lookup(keys) if self._answer else Future()


def test_a_moving_boundary_never_restarts_the_lookup_clock(stacks):
    """vLLM's own hit or other requests' saves move the request's un-hit boundary every step: the
    request still waits at most `remote_timeout_s` in all for the store (it used to ask anew and
    restart its clock at every move, and never time out while the boundary kept moving)."""
    cluster = named("CLUSTER", num_slots=64)
    CountingLookups(cluster, answer=False)
    stack = stacks(cluster, timeout_s=0.05)
    keys = chain("m", 8)  # the CPU tier's size
    for moved in range(len(keys)):  # one more block held locally at every step, for 3x the budget
        if (answer := stack.lookup("r", keys, None)) is not None:
            break
        store(stack.engine, f"s{moved}", keys[: moved + 1])
        time.sleep(0.02)
    assert answer is not None and answer < len(keys), "the request kept waiting while its boundary moved"


def test_a_pending_question_covering_the_rest_is_not_asked_again(stacks):
    """The boundary moves forward while the question is pending: its answer still covers the rest."""
    cluster = named("CLUSTER", num_slots=64)
    writer = stacks(cluster)
    keys = chain("q", 4)
    store(writer.engine, "w", keys)
    settle(writer)
    counted = CountingLookups(cluster)
    reader = stacks(cluster)
    assert reader.lookup("r", keys, None) is None
    store(reader.engine, "local", keys[:1])  # the boundary moves before the answer was looked at
    assert until(lambda: reader.lookup("r", keys, None), "the store's answer") == 4
    assert counted.asked == [keys]


def test_requests_sharing_a_prefix_share_one_question(stacks):
    cluster = named("CLUSTER", num_slots=64)
    counted = CountingLookups(cluster, answer=False)
    stack = stacks(cluster)
    keys = chain("s", 4)
    assert stack.lookup("a", keys, None) is None
    assert stack.lookup("b", keys[:3], None) is None  # a prefix of what "a" asked
    assert counted.asked == [keys]


def test_a_slot_a_late_read_may_still_write_is_not_reused_until_the_read_returned(stacks):
    """A staging read answered at its deadline while its call still runs: the request recomputes at
    once, but the CPU slot the call may still write stays out of use until the call returned."""
    cluster = named("CLUSTER")
    writer, reader = stacks(cluster), stacks(cluster)
    keys = chain("l", 2)
    store(writer.engine, "w", keys)
    settle(writer)
    assert until(lambda: reader.lookup("r", keys, None), "the store's answer") == 2
    returned: Future = Future()
    cluster.read = lambda pool, addrs, slots, keys: completed(IoResult([False] * len(keys), 0, unsettled=returned))
    plan = reader.engine.prepare_load("r", keys)
    reader.stage(plan)
    assert until(lambda: reader.advance(), "the staging answer") == [("r", 0)]
    reader.engine.complete_load("r", success=True)
    cpu = reader.engine.tiers[0]
    held = set(plan.slots)
    assert reader.num_held == 2 and reader.num_pending == 0 and cpu.num_used == 2
    store(reader.engine, "other", chain("o", cpu.num_slots))  # fills every other slot, never a held one
    assert not held & {cpu.slot_of(k) for k in chain("o", cpu.num_slots) if cpu.contains(k)}
    returned.set_result(None)
    reader.advance()
    assert reader.num_held == 0 and not any(cpu.contains(k) for k in keys)
