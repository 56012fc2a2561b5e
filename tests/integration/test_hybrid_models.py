"""A hybrid model in a real engine: vLLM keeps its hybrid KV cache manager with our connector (alone
and under MultiConnector with NIXL), each KV-cache group is saved and loaded with its own block
table, and greedy tokens match a no-connector engine that also runs the hybrid manager.

The model (`tiny_model.SLIDING`, Gemma-2 style) alternates sliding-window layers (a 64-token window,
two blocks) and full-attention layers, so vLLM keeps two KV-cache groups and frees the
sliding-window blocks before each request's window: stored blocks far from a prompt's end hold the
full-attention layers' KV only.
"""

from __future__ import annotations

import random
import re

import pytest

from dynamo_flexkv.devtools.harness import EngineError, EngineHost
from tests.helpers import COMPAT_CONFIG, ENGINE, random_prompt

pytestmark = pytest.mark.engine

BLOCK = ENGINE["block_size"]
HYBRID_ENGINE = {**ENGINE, "num_gpu_blocks_override": 40}  # the two groups share vLLM's blocks
GROUPS = ["SlidingWindowSpec", "FullAttentionSpec"]
FLEXKV_GROUPS = ["sliding_window(64)", "full_attention"]
MULTI_CONFIG = {"kv_connector": "MultiConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"connectors": [COMPAT_CONFIG,
                                                             {"kv_connector": "NixlConnector", "kv_role": "kv_both"}]}}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Longer than the window, so vLLM frees sliding-window blocks while each prompt runs."""
    rng = random.Random(21)
    return [random_prompt(rng, 6 * BLOCK + 7 + 11 * i) for i in range(3)]


@pytest.fixture(scope="module")
def hybrid_reference(sliding_model):
    with EngineHost(sliding_model, HYBRID_ENGINE) as host:
        state = host.flexkv_state()
        assert state["hybrid_manager"] and state["kv_cache_groups"] == GROUPS
        yield host


def _push_out(host: EngineHost, rng: random.Random) -> None:
    """Unrelated prompts that fill vLLM's cache twice over: the earlier prompts leave it."""
    host.generate([random_prompt(rng, 8 * BLOCK) for _ in range(5)], max_tokens=2, one_at_a_time=True)


def _serve_twice(host, reference, prompts, seed):
    """Each prompt once, then again after vLLM's cache was emptied: the second time from our CPU tier."""
    want = reference.generate(prompts, max_tokens=8)
    first = host.generate(prompts, max_tokens=8, one_at_a_time=True)
    _push_out(host, random.Random(seed))
    again = host.generate(prompts, max_tokens=8, one_at_a_time=True)
    return want, first, again


@pytest.mark.parametrize("transfer", [COMPAT_CONFIG, MULTI_CONFIG], ids=["flexkv", "multiconnector-nixl"])
@pytest.mark.correctness("sliding-window hybrid model", "tokens identical to a no-connector engine with the hybrid manager on; alone and under MultiConnector with NIXL")
def test_hybrid_manager_stays_on_and_each_group_loads_from_the_cpu_tier(sliding_model, hybrid_reference, prompts,
                                                                       transfer):
    with EngineHost(sliding_model, {**HYBRID_ENGINE, "kv_transfer_config": transfer}) as host:
        state = host.flexkv_state()
        assert state["hybrid_manager"], "vLLM turned its hybrid KV cache manager off"
        assert state["kv_cache_groups"] == GROUPS and state["flexkv_groups"] == FLEXKV_GROUPS
        want, first, again = _serve_twice(host, hybrid_reference, prompts, seed=22)
        state = host.flexkv_state()
    assert [c.token_ids for c in first] == [c.token_ids for c in want]
    assert [c.token_ids for c in again] == [c.token_ids for c in want]
    # every full block of each prompt came back: the full-attention group's and the window's
    assert [c.flexkv_tokens for c in again] == [len(p) // BLOCK * BLOCK for p in prompts]
    assert state["accounting"]["problems"] == []


@pytest.mark.correctness("sliding-window hybrid model", "recompute: a hit whose window blocks are gone is not loaded")
def test_a_hit_the_window_cannot_use_is_recomputed(sliding_model, hybrid_reference, prompts):
    """A prompt sharing only the first blocks of a stored one: those blocks hold the full-attention
    layers' KV, but their sliding-window KV was freed by vLLM before it was saved. The hit is of no
    use to the window's layers, so nothing is loaded — never a block the window would read empty."""
    rng = random.Random(23)
    stored = prompts[0]
    shared = 3 * BLOCK  # ends a window (two blocks) and more before the stored prompt's end
    branch = stored[:shared] + random_prompt(rng, 2 * BLOCK + 5)
    want = hybrid_reference.generate([branch, stored], max_tokens=8)
    with EngineHost(sliding_model, {**HYBRID_ENGINE, "kv_transfer_config": COMPAT_CONFIG}) as host:
        host.generate([stored], max_tokens=8)
        _push_out(host, rng)
        assert host.cpu_resident_blocks([branch]) == [shared // BLOCK]  # the full-attention group's hit
        got_branch, got_stored = host.generate([branch, stored], max_tokens=8, one_at_a_time=True)
    assert got_branch.flexkv_tokens == 0
    assert got_stored.flexkv_tokens == len(stored) // BLOCK * BLOCK
    assert [got_branch.token_ids, got_stored.token_ids] == [c.token_ids for c in want]


def test_each_group_comes_back_from_the_ssd_tier(sliding_model, hybrid_reference, prompts, tmp_path):
    """A CPU tier of 8 blocks: the prompts soon live on SSD only, and a hit is staged back into the
    CPU tier with the groups each block holds, then loaded group by group."""
    block_bytes = 4 * 2 * 2 * BLOCK * 64 * 2  # layers x (k, v) x kv heads x tokens x head dim x bf16
    env = {"FLEXKV_CPU_CACHE_GB": str(8 * block_bytes / 2**30), "FLEXKV_SSD_CACHE_GB": str(200 * block_bytes / 2**30),
           "FLEXKV_SSD_CACHE_DIR": str(tmp_path)}
    with EngineHost(sliding_model, {**HYBRID_ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env) as host:
        assert host.flexkv_state()["cpu_slots"] == 8
        want, first, again = _serve_twice(host, hybrid_reference, prompts, seed=24)
        state = host.flexkv_state()
    assert [c.token_ids for c in first] == [c.token_ids for c in want]
    assert [c.token_ids for c in again] == [c.token_ids for c in want]
    assert [c.flexkv_tokens for c in again] == [len(p) // BLOCK * BLOCK for p in prompts]
    assert state["engine_stats"]["hit_blocks"]["SSD"] > 0
    assert state["accounting"]["problems"] == []


def test_a_hybrid_ssm_model_is_refused_at_start_up_with_one_clear_error(hybrid_ssm_model):
    """Mamba state groups are not stored: the connector names the model's groups and what it stores,
    before vLLM allocates its KV cache (the CPU build cannot run this model's forward anyway)."""
    with pytest.raises(EngineError) as failure:
        EngineHost(hybrid_ssm_model, {**HYBRID_ENGINE, "kv_transfer_config": COMPAT_CONFIG}).close()
    trace = str(failure.value)
    assert "dynamo-flexkv stores KV-cache groups of full attention" in trace and "SlidingWindowSpec" in trace
    assert "this model's groups are" in trace and "MambaSpec" in trace
    assert "initialize_kv_cache" not in re.findall(r", in (\w+)\n", trace)
