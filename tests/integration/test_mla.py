"""Multi-head latent attention (DeepSeek-V2/V3 style) inside a real vLLM engine (CPU build).

An MLA layer caches one latent vector per token (no K/V split, one "head"), so its KV-cache rows are
a different shape from the tiny Llama's. Prompts pushed out of vLLM's small cache come back from the
CPU tier, layer by layer and between steps, with the greedy tokens of an engine without a connector.

Float32: vLLM's CPU build never resumes an MLA prefill from cached KV itself (it turns prefix caching
off for MLA), and its MLA prefill over loaded context rounds differently from one full prefill, which
in bf16 flipped near-tied greedy tokens of this random model (2 of 6 prompts); in float32 the same
loads give the reference's tokens.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dynamo_flexkv.devtools.harness import EngineHost
from tests.conftest import REPO
from tests.helpers import COMPAT_CONFIG, random_prompt

pytestmark = pytest.mark.engine

MLA_BLOCK = 16  # the CPU build's MLA kernel takes 16-token blocks only
ENGINE = dict(enforce_eager=True, enable_prefix_caching=True, block_size=MLA_BLOCK, num_gpu_blocks_override=40,
              max_model_len=512, max_num_batched_tokens=1024, max_num_seqs=32, dtype="float32", seed=0)


@pytest.fixture(scope="module")
def mla_model() -> str:
    model_dir = Path(REPO) / ".cache" / "tiny-mla"
    if not (model_dir / "model.safetensors").exists():
        from dynamo_flexkv.devtools.tiny_model import build_mla

        build_mla(model_dir)
    return str(model_dir)


@pytest.mark.parametrize("layerwise", ["1", "0"])
@pytest.mark.correctness("MLA model", "tokens identical to a no-connector engine (float32 tiny DeepSeek-V2)")
def test_mla_prompts_evicted_from_vllm_come_back_from_the_cpu_tier(mla_model, layerwise):
    rng = random.Random(11)
    prompts = [random_prompt(rng, 150 + 37 * i) for i in range(6)]  # together 3x vLLM's 640-token cache
    with EngineHost(mla_model, ENGINE) as reference:
        want = [reference.generate([p], max_tokens=8)[0].token_ids for p in prompts]
    env = {"FLEXKV_CPU_CACHE_GB": "0.05", "FLEXKV_LAYERWISE_LOAD": layerwise}
    with EngineHost(mla_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env) as host:
        host.generate(prompts, max_tokens=2, one_at_a_time=True)  # each one pushes earlier ones out
        got = [host.generate([p], max_tokens=8, one_at_a_time=True)[0] for p in prompts]
        state = host.flexkv_state()
    assert [c.token_ids for c in got] == want
    # every full block came from the CPU tier, all but the last token of the block-aligned prompt (224)
    assert [c.flexkv_tokens for c in got] == [min(len(p) // MLA_BLOCK * MLA_BLOCK, len(p) - 1) for p in prompts]
    assert state["accounting"]["problems"] == []
