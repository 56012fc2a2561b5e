"""A restarted scheduler finds its SSD blocks with their parents and tokens: chains stay intact
(mru/filo evict a chain's tail, never its head) and the disk tier is announced to the router with
vLLM's hashes, parents and tokens, as medium STORAGE."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.integration.vllm.scheduler import SchedulerSide
from dynamo_flexkv.storage.cpu.pool import SHM_DIR, CpuBlockPool
from dynamo_flexkv.storage.layout import PoolGeometry
from dynamo_flexkv.storage.ssd.tier import SsdTier
from dynamo_flexkv.tiers.facts import InstanceFacts

BLOCK = 16


def chain(n: int) -> list[bytes]:
    keys, parent = [], b""
    for i in range(n):
        parent = hashlib.sha256(parent + bytes([i])).digest()
        keys.append(parent)
    return keys


def tokens(i: int) -> list[int]:
    return list(range(i * BLOCK, (i + 1) * BLOCK))


@pytest.fixture
def instance(tmp_path):
    facts = InstanceFacts(identity=f"dynamo-flexkv-test-restart-{uuid.uuid4().hex[:8]}", block_size=BLOCK,
                          geometry=PoolGeometry(num_slots=8, shard_bytes=4096, world_size=1),
                          layout={"model": "tiny", "block_size": BLOCK})
    settings = FlexKVSettings(ssd_cache_gb=4 * 4096 / 2**30, ssd_cache_dir=[str(tmp_path)], eviction_policy="mru")
    yield facts, settings
    (SHM_DIR / facts.identity).unlink(missing_ok=True)


def open_ssd(facts, settings) -> SsdTier:
    return SsdTier.open(facts.layout, facts.geometry.slot_bytes, settings)


def write_chain_to_disk(facts, settings, keys: list[bytes]) -> None:
    tier = open_ssd(facts, settings)
    pool = CpuBlockPool(facts.identity, facts.geometry).tensor
    try:
        parents = [None, *keys[:-1]]
        done = tier.write(pool, range(len(keys)), range(len(keys)), keys, parents=parents,
                          tokens=[tokens(i) for i in range(len(keys))]).result(30)
        assert done.ok == [True] * len(keys)
    finally:
        tier.close()


def test_restart_announces_the_disk_tier_with_parents_and_tokens(instance):
    facts, settings = instance
    keys = chain(3)
    write_chain_to_disk(facts, settings, keys)
    side = SchedulerSide(facts, settings, publish_events=True, layerwise=True)
    try:
        [event] = list(side.take_events())
        assert event.medium == "STORAGE" and event.parent_block_hash is None
        assert event.block_hashes == [maybe_convert_block_hash(k) for k in keys]
        assert event.token_ids == [t for i in range(3) for t in tokens(i)] and event.block_size == BLOCK
        assert list(side.take_events()) == []  # announced once
        ssd = side.engine.tiers[1]
        assert ssd.name == "SSD" and ssd.match(keys) == 3
        ssd.verify()
    finally:
        side.shutdown()


def test_restored_chains_evict_their_tail_first_under_mru(instance):
    facts, settings = instance
    keys = chain(4)  # fills the 4-slot SSD tier
    write_chain_to_disk(facts, settings, keys)
    side = SchedulerSide(facts, settings, publish_events=False, layerwise=True)
    try:
        ssd = side.engine.tiers[1]
        other = chain(5)[4:]  # one more block: something must go
        result = ssd.allocate(other, [None])
        assert result.evicted == [keys[-1]]  # the chain's tail, not its head (which strands the rest)
        assert ssd.match(keys) == 3
    finally:
        side.shutdown()


@pytest.mark.parametrize("engine", ["threads", "uring"])
def test_the_io_engine_setting_reaches_the_store(instance, engine):
    facts, settings = instance
    settings = FlexKVSettings(**{**settings.model_dump(), "ssd_io_engine": engine})
    tier = open_ssd(facts, settings)
    try:
        assert tier.store.engine_name == engine
    finally:
        tier.close()
