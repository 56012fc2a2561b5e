"""A weight update in place, then vLLM's cache reset with work in flight, as RL loops (verl, OpenRLHF)
do after each training step: `reset_prefix_cache(reset_running_requests=True, reset_connector=True)`.

The engine's weights are replaced through a worker extension by those of a second tiny model (another
seed) while requests run and their saves are still in flight (`saves_land_a_step_late`, as on a GPU).
vLLM preempts the running requests, then resets the connector; the preempted requests resume and
recompute. Nothing computed before the reset may be served after it.
"""

from __future__ import annotations

import random

import pytest

from dynamo_flexkv.devtools.harness import WEIGHT_SWAP, EngineHost
from dynamo_flexkv.devtools.tiny_model import SEED, build
from tests.helpers import COMPAT_CONFIG, ENGINE, random_prompt

pytestmark = pytest.mark.engine

# A small step budget prefills prompts in chunks. Steps 1-2 prefill the first prompt; step 3 the
# second's first 63 tokens; step 4 the rest of it and the third's first 46. At the reset the save of
# the second prompt's first block is in flight and the third's first block is computed but not yet
# saved. After it the first request, resumed first, takes the whole budget for two steps: the others
# look their prompts up in the tiers only then, when whatever was wrongly kept would be found.
BUDGET = dict(ENGINE, max_num_batched_tokens=64)
PROMPT_TOKENS = (128, 80, 150)
STEPS_BEFORE_RESET = 4
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def updated_model(tmp_path_factory) -> str:
    """The weights after the "training step": the tiny model's shape, drawn under another seed."""
    return str(build(tmp_path_factory.mktemp("updated-weights"), seed=SEED + 1))


@pytest.mark.parametrize("tiers", ["cpu", "cpu+ssd"])
@pytest.mark.correctness(
    "reset with work in flight",
    "recompute: weights updated in place, then reset_prefix_cache(reset_running_requests, reset_connector) with "
    "saves in flight: zero hits on KV of before the reset; tokens identical to a fresh engine on the new weights")
def test_weights_updated_in_place_then_reset_with_saves_in_flight(tiny_model, updated_model, tiers, tmp_path):
    rng = random.Random(41)
    prompts = [random_prompt(rng, n) for n in PROMPT_TOKENS]
    engine = {**BUDGET, "kv_transfer_config": COMPAT_CONFIG, "worker_extension_cls": WEIGHT_SWAP}
    env = {"FLEXKV_CPU_CACHE_GB": "0.25"}
    if tiers == "cpu+ssd":  # the write-through into the disk tier is in flight at the reset too
        env.update(FLEXKV_SSD_CACHE_GB="0.25", FLEXKV_SSD_CACHE_DIR=str(tmp_path))
    with EngineHost(tiny_model, engine, env=env,
                    child_setup="tests.gpu_timing:saves_land_a_step_late") as host:
        run = host.generate_across_weight_update(prompts, MAX_TOKENS, STEPS_BEFORE_RESET, updated_model)
        state = host.flexkv_state()
    # the situation: requests were running, and a save of a prompt's first block had not landed yet
    assert run["saves_in_flight"]["heads"] >= 1, run
    assert min(run["before_reset"][:2]) > 0, run
    assert run["lower_tier_jobs"] >= (tiers == "cpu+ssd"), run
    # nothing stored or planned before the reset was loaded after it (distinct prompts: every hit
    # after the reset would be a prompt's own KV, computed by the old weights)
    assert set(run["hit_blocks"].values()) == {0} and run["loaded_tokens"] == 0, run
    assert state["accounting"]["problems"] == [], state

    # A fresh engine on the new weights, given what each request had generated before the reset,
    # generates exactly what the reset engine generated after it.
    done = run["before_reset"]
    with EngineHost(updated_model, BUDGET) as fresh:
        want = fresh.generate([p + t[:k] for p, t, k in zip(prompts, run["token_ids"], done)],
                              max_tokens=[MAX_TOKENS - k for k in done])
    assert [t[k:] for t, k in zip(run["token_ids"], done)] == [c.token_ids for c in want]
