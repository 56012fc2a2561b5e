"""The CPU tier inside a real vLLM engine (CPU build) with the tiny model.

Each engine runs in its own process (see dynamo_flexkv.devtools.harness). The reference engine has no
connector; every FlexKV engine must produce token-for-token the same greedy outputs.
"""

from __future__ import annotations

import random

import pytest

from dynamo_flexkv.devtools.harness import EngineHost
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, push_out_of_gpu_cache, random_prompt

pytestmark = pytest.mark.engine

LENGTHS = [70, 96, 200, 333]  # block-aligned and ragged tails


def cpu_hit(prompt: list[int]) -> int:
    """Tokens a CPU-tier hit spares vLLM: every full block, but never the last prompt token, from
    which vLLM samples the first output token (a block-aligned prompt loads its last block whole and
    recomputes only that token)."""
    return min(len(prompt) // BLOCK * BLOCK, len(prompt) - 1)


@pytest.fixture(scope="module")
def flexkv(tiny_model):
    """Started with nothing but the documented FlexKV connector name."""
    with EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG},
                    env={"FLEXKV_CPU_CACHE_GB": "0.25"}) as host:
        yield host


def test_compat_name_resolves_to_our_connector(flexkv):
    state = flexkv.flexkv_state()
    assert state["connector"] == "dynamo_flexkv.integration.vllm.connector.FlexKVConnector"
    from vllm.distributed.kv_transfer.kv_connector.v1.flexkv_connector import FlexKVConnectorV1

    from dynamo_flexkv.integration.vllm.connector import FlexKVConnector

    assert issubclass(FlexKVConnector, FlexKVConnectorV1)


@pytest.mark.correctness("plain model", "tokens identical to a no-connector engine; prompts vLLM evicted load from the CPU tier")
def test_evicted_prompts_are_served_from_cpu_tier(reference, flexkv):
    rng = random.Random(1)
    prompts = [random_prompt(rng, n) for n in LENGTHS]
    expected = reference.generate(prompts, max_tokens=12, one_at_a_time=True)

    first = flexkv.generate(prompts, max_tokens=12, one_at_a_time=True)
    assert [c.token_ids for c in first] == [c.token_ids for c in expected]
    assert all(c.flexkv_tokens == 0 for c in first)

    push_out_of_gpu_cache(flexkv, rng)
    again = flexkv.generate(prompts, max_tokens=12, one_at_a_time=True)
    for prompt, completion, want in zip(prompts, again, expected):
        assert completion.flexkv_tokens == cpu_hit(prompt), (len(prompt), completion)
        assert completion.num_cached_tokens >= completion.flexkv_tokens
        assert completion.token_ids == want.token_ids, f"prompt of {len(prompt)} tokens diverged"


def test_shared_prefix_concurrency_matches_reference(reference, flexkv):
    rng = random.Random(2)
    stems = [random_prompt(rng, 150) for _ in range(4)]
    prompts = [stems[i % 4] + random_prompt(rng, 20 + 7 * i) for i in range(32)]
    want = reference.generate(prompts, max_tokens=6)
    flexkv.generate(prompts[:4], max_tokens=2)  # seeds the CPU tier with the stems
    push_out_of_gpu_cache(flexkv, rng)
    got = flexkv.generate(prompts, max_tokens=6)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert flexkv.flexkv_state()["loaded_tokens"] > 0


@pytest.mark.correctness("tensor parallel (TP=2)", "tokens identical to a no-connector engine; each rank saves and loads its own shard")
def test_two_tensor_parallel_ranks_each_save_and_load_their_shard(tiny_model):
    """TP=2: every slot holds both ranks' shards. Outputs served from the CPU tier must equal the
    same engine's own first answers (TP changes the arithmetic, so the TP=1 reference differs)."""
    rng = random.Random(9)
    prompts = [random_prompt(rng, n) for n in (70, 200, 333)]
    engine = {**ENGINE, "tensor_parallel_size": 2, "kv_transfer_config": COMPAT_CONFIG}
    with EngineHost(tiny_model, engine, env={"FLEXKV_CPU_CACHE_GB": "0.25"}) as host:
        first = host.generate(prompts, max_tokens=8, one_at_a_time=True)
        push_out_of_gpu_cache(host, rng)
        again = host.generate(prompts, max_tokens=8, one_at_a_time=True)
    assert [c.flexkv_tokens for c in again] == [cpu_hit(p) for p in prompts]
    assert [c.token_ids for c in again] == [c.token_ids for c in first]


def test_loads_between_steps_when_layerwise_loading_is_off(tiny_model, reference):
    rng = random.Random(10)
    prompts = [random_prompt(rng, n) for n in LENGTHS]
    expected = reference.generate(prompts, max_tokens=8, one_at_a_time=True)
    env = {"FLEXKV_CPU_CACHE_GB": "0.25", "FLEXKV_LAYERWISE_LOAD": "0"}
    with EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env) as host:
        host.generate(prompts, max_tokens=8, one_at_a_time=True)
        push_out_of_gpu_cache(host, rng)
        again = host.generate(prompts, max_tokens=8, one_at_a_time=True)
    # Loaded before the request is scheduled, a hit covers the whole prompt (vLLM recomputes only
    # the last token).
    assert [c.flexkv_tokens for c in again] == [cpu_hit(p) for p in prompts]
    assert [c.token_ids for c in again] == [c.token_ids for c in expected]
