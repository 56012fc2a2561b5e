"""A CPU tier of 12 blocks in a real engine: eviction follows the configured policy, an evicted block is
never served, and concurrent requests under constant eviction still match the reference engine."""

from __future__ import annotations

import random

import pytest

from dynamo_flexkv.devtools.harness import EngineHost
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, push_out_of_gpu_cache, random_prompt

pytestmark = pytest.mark.engine

POOL_BLOCKS = 12
BLOCK_BYTES = 2 * 2 * BLOCK * 128 * 2  # layers x kv heads x tokens x (k+v head dims) x bf16
POOL_GB = str(POOL_BLOCKS * BLOCK_BYTES / 2**30)
PROMPT_BLOCKS = 4  # each prompt fills a third of the pool


def small_pool_engine(tiny_model: str, policy: str) -> EngineHost:
    env = {"FLEXKV_CPU_CACHE_GB": POOL_GB, "FLEXKV_EVICTION_POLICY": policy}
    return EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env)


# A, B, C fill the pool; A is used again; D needs room. Which prompt loses its blocks?
# lfu: A was used twice, B and C once (ties go to the least recent); slru: A was promoted to the
# protected segment, B is the oldest on probation; mru: A was used last (tails first, so its whole chain).
EXPECTED_VICTIM = {"lru": "B", "fifo": "A", "filo": "C", "lfu": "B", "slru": "B", "mru": "A"}


@pytest.mark.parametrize("policy", sorted(EXPECTED_VICTIM))
def test_full_pool_evicts_by_policy_and_never_serves_evicted_blocks(tiny_model, reference, policy):
    rng = random.Random(3)
    prompts = {name: random_prompt(rng, PROMPT_BLOCKS * BLOCK + 10) for name in "ABCD"}
    with small_pool_engine(tiny_model, policy) as host:
        assert host.flexkv_state()["cpu_slots"] == POOL_BLOCKS
        for name in "ABCAD":
            host.generate([prompts[name]], max_tokens=2)
        resident = dict(zip("ABCD", host.cpu_resident_blocks(list(prompts.values()))))
        victim = EXPECTED_VICTIM[policy]
        assert resident == {name: 0 if name == victim else PROMPT_BLOCKS for name in "ABCD"}

        want = reference.generate([prompts[victim]], max_tokens=8)[0]
        got = host.generate([prompts[victim]], max_tokens=8, one_at_a_time=True)[0]
        assert got.flexkv_tokens == 0
        assert got.token_ids == want.token_ids


def test_concurrent_shared_prefixes_under_eviction_match_reference(tiny_model, reference):
    rng = random.Random(4)
    stems = [random_prompt(rng, 3 * BLOCK + 5) for _ in range(4)]
    prompts = [stems[i % 4] + random_prompt(rng, 15 + 9 * i) for i in range(32)]
    want = reference.generate(prompts, max_tokens=6)
    with small_pool_engine(tiny_model, "lru") as host:
        host.generate(prompts[:4], max_tokens=2)
        push_out_of_gpu_cache(host, rng)
        host.generate(prompts[:4], max_tokens=2)  # stems back into the pool, most recent
        got = host.generate(prompts, max_tokens=6)
        state = host.flexkv_state()
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert state["engine_stats"]["evicted_blocks"]["CPU"] > 0
    assert state["cpu_used"] <= POOL_BLOCKS
