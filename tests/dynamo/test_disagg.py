"""Disaggregated serving through real NIXL (UCX on loopback) with FlexKV on the prefill worker.

Two deployments, one after the other (never more than two engines): `recipes/agg.sh` gives the
aggregated greedy answers, then `recipes/disagg.sh` — the legacy command lines of Dynamo's FlexKV
guide: decode `--connector nixl`, prefill `--is-prefill-worker --connector nixl flexkv` with
`DYN_VLLM_KV_EVENT_PORT` — must give the same answers, and a repeated prompt's prefill must be served
from the prefill worker's FlexKV CPU tier.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from dynamo_flexkv.devtools import client
from dynamo_flexkv.devtools.kv_stream import KvEventStream, check_stream
from dynamo_flexkv.devtools.processes import free_port
from tests.dynamo.conftest import BLOCK, Recipe, random_prompt, start_recipe, stop_and_check_no_orphans

pytestmark = pytest.mark.dynamo

GPU_BLOCKS = 24
WORKER_ARGS = (f"--served-model-name tiny --enforce-eager --block-size {BLOCK} --max-model-len 512 "
               f"--num-gpu-blocks-override {GPU_BLOCKS}")
PROMPTS = [random_prompt(random.Random(7 + i), n) for i, n in enumerate((150, 200, 97))]
MAX_TOKENS = 8


@dataclass
class Aggregated:
    texts: list[str]
    log: str


@pytest.fixture(scope="module")
def aggregated(tmp_path_factory, tiny_model) -> Aggregated:
    """recipes/agg.sh (DYNAMO_USE_FLEXKV=1, --connector flexkv); stopped before disagg starts."""
    recipe = start_recipe(tmp_path_factory.mktemp("agg"), "agg.sh", workers=1,
                          WORKER_ARGS=WORKER_ARGS, FLEXKV_CPU_CACHE_GB="0.1")
    try:
        recipe.wait_ready()
        oa = recipe.openai()
        return Aggregated([oa.complete(p, max_tokens=MAX_TOKENS).text for p in PROMPTS], recipe.service.log_text())
    finally:
        stop_and_check_no_orphans(recipe)


@dataclass
class Disagg:
    recipe: Recipe
    decode_id: int
    prefill_id: int
    prefill_events: KvEventStream


@pytest.fixture(scope="module")
def disagg(aggregated, tmp_path_factory) -> Disagg:
    event_port = free_port()
    events = KvEventStream(f"tcp://127.0.0.1:{event_port}", "prefill")
    recipe = start_recipe(tmp_path_factory.mktemp("disagg"), "disagg.sh", workers=2,
                          WORKER_ARGS=WORKER_ARGS, FLEXKV_CPU_CACHE_GB="0.1",
                          DYN_VLLM_KV_EVENT_PORT=str(event_port),
                          NIXL_PORT1=str(free_port()), NIXL_PORT2=str(free_port()))
    try:
        recipe.wait_ready()
        # decode needs a prefill peer before the model serves: probe with a sub-block prompt (no cache events)
        recipe.deployment.wait_for(lambda: _probe(recipe), 120, "prefill -> decode path serves")
        yield Disagg(recipe, client.worker_instance_id(recipe.worker_metrics(0)),
                     client.worker_instance_id(recipe.worker_metrics(1)), events)
    finally:
        events.close()
        stop_and_check_no_orphans(recipe)


def _probe(recipe: Recipe) -> bool:
    try:
        recipe.openai().complete([5, 6, 7], max_tokens=1)
        return True
    except RuntimeError as err:  # 503 while the frontend waits for the prefill worker
        if "503" in str(err):
            return False
        raise


def test_legacy_command_lines_are_translated(aggregated, disagg):
    log = disagg.recipe.service.log_text()
    assert "--connector nixl (NIXL only) -> --disaggregation-mode decode" in log
    assert "--is-prefill-worker -> --disaggregation-mode prefill" in log
    assert '"kv_connector":"MultiConnector"' in log and "DYNAMO_USE_FLEXKV=1 -> KV events on tcp://*:" in log
    assert "--connector flexkv -> --kv-transfer-config" in aggregated.log
    assert "DYNAMO_USE_FLEXKV=1 -> KV events on ipc://" in aggregated.log


@pytest.mark.correctness("P/D through NIXL", "text identical to the aggregated deployment (Dynamo prefill + decode workers, NIXL)")
def test_prefill_then_decode_gives_the_aggregated_text(aggregated, disagg):
    oa = disagg.recipe.openai()
    for prompt, want in zip(PROMPTS, aggregated.texts):
        got = oa.complete(prompt, max_tokens=MAX_TOKENS)
        assert (got.prefill_worker_id, got.worker_id) == (disagg.prefill_id, disagg.decode_id)
        assert got.text == want


@pytest.mark.correctness("P/D through NIXL", "a repeated prompt's prefill loads from the CPU tier; text identical to the aggregated deployment")
def test_repeated_prompt_prefill_comes_from_the_cpu_tier(aggregated, disagg):
    oa, rng = disagg.recipe.openai(), random.Random(11)
    prompt = PROMPTS[1]
    oa.complete(prompt, max_tokens=MAX_TOKENS)  # cached in the prefill worker's GPU and CPU tier
    full = len(prompt) // BLOCK

    def gpu_blocks_of_prompt() -> int:
        rules = check_stream(disagg.prefill_events.batches(), BLOCK)
        ours = {h for e in disagg.prefill_events.events() if type(e).__name__ == "BlockStored"
                and (e.medium or "GPU") == "GPU" and e.parent_block_hash is None
                and list(e.token_ids[:BLOCK]) == prompt[:BLOCK] for h in list(e.block_hashes)[:full]}
        assert ours, "no GPU event for the prompt on the prefill worker"
        return len(ours & rules.held.get("GPU", set()))

    for _ in range(6):
        if gpu_blocks_of_prompt() == 0:
            break
        oa.complete(random_prompt(rng, 15 * BLOCK), max_tokens=1)
    assert gpu_blocks_of_prompt() == 0, "the prompt is still in the prefill worker's GPU cache"

    before = disagg.recipe.worker_metrics(1)
    again = oa.complete(prompt, max_tokens=MAX_TOKENS)
    assert again.text == aggregated.texts[1]

    def external_hits() -> float:
        after = disagg.recipe.worker_metrics(1)
        return (client.metric_sum(after, "vllm:external_prefix_cache_hits_total")
                - client.metric_sum(before, "vllm:external_prefix_cache_hits_total"))
    client.wait_until(lambda: external_hits() >= full * BLOCK, 30, "prefill worker counts FlexKV hits")
    rules = check_stream(disagg.prefill_events.batches(), BLOCK)
    assert rules.problems == [] and rules.checked > 0
