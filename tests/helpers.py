"""Small helpers shared by the test modules."""

from __future__ import annotations

import random

from dynamo_flexkv.harness import EngineHost


def random_prompt(rng: random.Random, length: int, vocab: int = 1000) -> list[int]:
    """Token ids above the special tokens (0-2), so prompts never contain an end-of-sequence."""
    return [rng.randrange(3, vocab) for _ in range(length)]


# Engine settings shared by the integration tests: tiny blocks and a tiny "GPU" cache, so that
# prompts of a few hundred tokens span many blocks and get pushed out of vLLM's cache.
BLOCK = 32
GPU_BLOCKS = 24  # a small "GPU" cache, so eviction really happens
ENGINE = dict(
    enforce_eager=True,
    enable_prefix_caching=True,
    block_size=BLOCK,
    num_gpu_blocks_override=GPU_BLOCKS,
    max_model_len=512,
    max_num_batched_tokens=1024,
    max_num_seqs=32,
    dtype="bfloat16",
    seed=0,
)
COMPAT_CONFIG = {"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both"}


def push_out_of_gpu_cache(host: EngineHost, rng: random.Random) -> None:
    """Run unrelated prompts that fill vLLM's small cache twice over."""
    host.generate([random_prompt(rng, GPU_BLOCKS * BLOCK // 2) for _ in range(4)], max_tokens=2, one_at_a_time=True)
