"""Transfers that complete after the step that started them, as on a GPU, in a real engine.

On CUDA a save finishes on a side stream after `wait_for_save`/`start_load_kv` returned, and is only
reported by a later step's `get_finished`. With vLLM 0.26's model runners, a step that schedules no
tokens never calls `wait_for_save`; a connector that started saves there left them unstarted, their
GPU blocks were never freed, and a full cache never scheduled again (the engine hung on the H200).
Here the CPU build runs the same completion order (`cpu_async_copies`: copies on a background
thread) with 0.26's no-forward step (tests/vllm_versions.py), under cache pressure.
"""

from __future__ import annotations

import random

import pytest

from dynamo_flexkv.devtools.harness import EngineHost
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, GPU_BLOCKS, random_prompt

pytestmark = pytest.mark.engine

# Each prompt needs more than half of vLLM's cache: two never fit together, so every request after
# the first waits for the previous one's blocks, which an unfinished save keeps.
FULL_BLOCKS = GPU_BLOCKS // 2 + 1
PROMPT_TOKENS = FULL_BLOCKS * BLOCK + 10
HANG_TIMEOUT_S = 240  # generous for 2 cores; a hang never finishes


@pytest.mark.parametrize("layerwise", ["1", "0"], ids=["layerwise", "async-load"])
def test_saves_complete_under_cache_pressure_with_vllm_026_steps(tiny_model, reference, layerwise):
    rng = random.Random(26)
    prompts = [random_prompt(rng, PROMPT_TOKENS) for _ in range(4)]
    want = reference.generate(prompts + prompts, max_tokens=4)
    env = {"FLEXKV_CPU_CACHE_GB": "0.05", "FLEXKV_CPU_ASYNC_COPIES": "1", "FLEXKV_LAYERWISE_LOAD": layerwise}
    with EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env,
                    child_setup="tests.vllm_versions:no_forward_step_without_wait_for_save") as host:
        got = host.generate(prompts, max_tokens=4, timeout_s=HANG_TIMEOUT_S)
        again = [host.generate([p], max_tokens=4, timeout_s=HANG_TIMEOUT_S)[0] for p in prompts]
        state = host.flexkv_state()
    assert [c.token_ids for c in got + again] == [c.token_ids for c in want]
    # The others pushed each prompt out of vLLM's cache: every full block came back from the CPU tier.
    assert [c.flexkv_tokens for c in again] == [FULL_BLOCKS * BLOCK] * 4
    assert state["engine_stats"]["stored_blocks"]["CPU"] >= 4 * FULL_BLOCKS


@pytest.mark.correctness("chunked prefill", "tokens identical to a no-connector engine; the whole prompt, every chunk, loads when re-asked")
def test_a_prompt_prefilled_in_chunks_is_stored_whole(tiny_model, reference):
    """vLLM prefills a long prompt in chunks. When the request finishes with its last chunk, the save
    of that chunk's blocks extends blocks whose save (planned one step earlier) is still in flight on
    a GPU (tests/gpu_timing.py makes it so here). Those blocks must still reach the CPU tier: asked
    again, the whole prompt loads (on the H200 a re-asked 32k prompt loaded only its first 16k)."""
    full_blocks = 12
    prompt = random_prompt(random.Random(8), full_blocks * BLOCK + 5)
    want = reference.generate([prompt], max_tokens=4)[0]
    # chunks of 5 blocks: the last one (2 full blocks and 5 tokens) finishes the request
    engine = {**ENGINE, "max_num_batched_tokens": 5 * BLOCK, "kv_transfer_config": COMPAT_CONFIG}
    env = {"FLEXKV_CPU_CACHE_GB": "0.05"}
    with EngineHost(tiny_model, engine, env=env, child_setup="tests.gpu_timing:saves_land_a_step_late") as host:
        host.generate([prompt], max_tokens=1)  # finishes in the step that computes its last chunk
        host.reset_gpu_prefix_cache()  # after every save landed
        again = host.generate([prompt], max_tokens=4)[0]
    assert again.flexkv_tokens == full_blocks * BLOCK
    assert again.token_ids == want.token_ids
