"""The cluster tier through Dynamo 1.6.1's frontend: a prefix one worker computed is served from the
shared Mooncake store by the other worker, which never saw it.

One deployment: a Mooncake master on loopback, then `recipes/agg_router.sh` in CPU mode (frontend
`--router-mode kv`, two FlexKV workers) with `FLEXKV_REMOTE_STORE` pointing at it; each worker
contributes a small segment of its memory to the store.
"""

from __future__ import annotations

import random

import pytest

from dynamo_flexkv.devtools import client
from tests.dynamo.conftest import BLOCK, random_prompt, start_recipe, stop_and_check_no_orphans
from tests.servers import mooncake_master

pytestmark = pytest.mark.dynamo

PROMPT_TOKENS = 200  # 6 full blocks + 8 tokens
FULL_BLOCKS = PROMPT_TOKENS // BLOCK


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cluster_routing")
    with mooncake_master(workdir / "store") as (_, url):
        recipe = start_recipe(
            workdir, "agg_router.sh", workers=2,
            WORKER_ARGS=f"--served-model-name tiny --enforce-eager --block-size {BLOCK} --max-model-len 512",
            FLEXKV_CPU_CACHE_GB="0.1", FLEXKV_REMOTE_STORE=url, FLEXKV_REMOTE_CACHE_GB="0.05",
            FLEXKV_REMOTE_TIMEOUT_S="2", KV_EVENTS_ENDPOINT1=f"ipc://{workdir}/kv-events-1",
            KV_EVENTS_ENDPOINT2=f"ipc://{workdir}/kv-events-2",
        )
        try:
            recipe.wait_ready()
            yield recipe, [client.worker_instance_id(recipe.worker_metrics(i)) for i in (0, 1)]
        finally:
            stop_and_check_no_orphans(recipe)


def tier_metric(recipe, worker: int, name: str, tier: str) -> float:
    return sum(s.value for s in recipe.worker_metrics(worker) if s.name == name and s.labels.get("tier") == tier)


def test_a_prefix_one_worker_computed_is_served_from_the_store_by_the_other(cluster):
    recipe, workers = cluster
    oa = recipe.openai()
    prompt = random_prompt(random.Random(7), PROMPT_TOKENS)
    first = oa.complete(prompt, max_tokens=6, nvext={"backend_instance_id": workers[0], "extra_fields": ["worker_id"]})
    assert first.worker_id == workers[0]
    client.wait_until(lambda: tier_metric(recipe, 0, "vllm:flexkv_held_blocks", "MOONCAKE") >= FULL_BLOCKS, 60,
                      "worker 0 wrote the prompt's blocks to the store")

    second = oa.complete(prompt, max_tokens=6, nvext={"backend_instance_id": workers[1], "extra_fields": ["worker_id"]})
    assert second.worker_id == workers[1]
    assert second.text == first.text, "greedy text changed after a load from the store"
    assert second.cached_tokens >= FULL_BLOCKS * BLOCK, second
    served = client.wait_until(lambda: tier_metric(recipe, 1, "vllm:flexkv_hit_tokens_total", "MOONCAKE"), 30,
                               "worker 1's store hits in its metrics")
    assert served >= FULL_BLOCKS * BLOCK
