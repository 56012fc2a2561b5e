"""A save still reading sliding-window blocks that vLLM already freed and hands out again.

vLLM frees a running request's sliding-window blocks once they leave the window and hands them out
again at once: vLLM 0.31 gives them to the very step that freed them, ahead of never-used blocks
(seen in every step of this chunked prefill). The connector saves the blocks earlier steps
computed, and on a GPU that copy may still be reading when the step's forward writes the reused
block: the CPU tier would then hold other KV under this prompt's hashes. `tests.gpu_timing.save_reads_after_the_next_forward` makes every save read its
blocks only after the next step's forward (unless the connector awaits it first); the
sliding-window model's prompt is prefilled in chunks of two blocks (its window) in a vLLM cache just
large enough for it.
"""

from __future__ import annotations

import random

import pytest

from dynamo_flexkv.devtools.harness import EngineHost
from tests.helpers import COMPAT_CONFIG, random_prompt
from tests.integration.test_hybrid_models import BLOCK, HYBRID_ENGINE, hybrid_reference  # noqa: F401 (a fixture)

pytestmark = pytest.mark.engine

FULL_BLOCKS = 9
# chunks of two blocks: each step frees the two window blocks the previous step's save reads
TIGHT_ENGINE = {**HYBRID_ENGINE, "num_gpu_blocks_override": 16, "max_num_batched_tokens": 2 * BLOCK,
                "max_model_len": 10 * BLOCK, "kv_transfer_config": COMPAT_CONFIG}


@pytest.mark.correctness("sliding-window save racing block reuse",
                         "tokens identical to the no-connector hybrid engine for a hit ending at every block of a "
                         "chunk-prefilled prompt, whose window KV was saved while vLLM reused its blocks")
def test_a_save_lands_before_vllm_reuses_its_sliding_window_blocks(sliding_model, hybrid_reference):
    rng = random.Random(31)
    prompt = random_prompt(rng, FULL_BLOCKS * BLOCK + 7)
    # Each ends inside the stored prompt: the window of its hit's end is KV saved mid-prefill.
    branches = [prompt[: k * BLOCK] + random_prompt(rng, 9) for k in range(2, FULL_BLOCKS + 1)]
    want = hybrid_reference.generate([prompt, *branches], max_tokens=8, one_at_a_time=True)
    env = {"FLEXKV_CPU_ASYNC_COPIES": "1"}
    with EngineHost(sliding_model, TIGHT_ENGINE, env=env,
                    child_setup="tests.gpu_timing:save_reads_after_the_next_forward") as host:
        [first] = host.generate([prompt], max_tokens=8)
        got = []
        for branch in branches:
            host.reset_gpu_prefix_cache()  # every block of the hit comes from the CPU tier
            got += host.generate([branch], max_tokens=8)
        state = host.flexkv_state()
    assert first.token_ids == want[0].token_ids
    assert [c.flexkv_tokens for c in got] == [k * BLOCK for k in range(2, FULL_BLOCKS + 1)]
    assert [c.token_ids for c in got] == [c.token_ids for c in want[1:]]
    assert state["accounting"]["problems"] == []
