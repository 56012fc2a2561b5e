"""KV-aware routing over FlexKV's CPU tier, with Dynamo 1.6.1's real router.

One deployment for the module: `recipes/agg_router.sh` in CPU mode — frontend `--router-mode kv`, two
workers `python -m dynamo_flexkv.vllm … --connector flexkv --kv-events-config <ipc://…>`, no FlexKV port
settings. The test subscribes to both workers' vLLM event streams before they start.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from dynamo_flexkv.devtools import client
from dynamo_flexkv.devtools.processes import log
from dynamo_flexkv.devtools.kv_stream import KvEventStream, check_stream, count_events, router_updates
from tests.dynamo.conftest import BLOCK, Recipe, random_prompt, start_recipe, stop_and_check_no_orphans

pytestmark = pytest.mark.dynamo

GPU_BLOCKS = 24
PROMPT_TOKENS = 200  # 6 full blocks + 8 tokens
FILLER_TOKENS = 15 * BLOCK  # two of them push everything else out of a 24-block cache


@dataclass
class Routing:
    recipe: Recipe
    streams: list[KvEventStream]
    worker_ids: list[int]  # Dynamo instance id of worker 0 and 1


@pytest.fixture(scope="module")
def routing(tmp_path_factory, tiny_model) -> Routing:
    workdir: Path = tmp_path_factory.mktemp("agg_router")
    endpoints = [f"ipc://{workdir}/kv-events-{i}" for i in (1, 2)]
    streams = [KvEventStream(endpoint, f"worker{i}") for i, endpoint in enumerate(endpoints)]
    recipe = start_recipe(
        workdir, "agg_router.sh", workers=2,
        WORKER_ARGS=f"--served-model-name tiny --enforce-eager --block-size {BLOCK} --max-model-len 512 "
                    f"--num-gpu-blocks-override {GPU_BLOCKS}",
        FLEXKV_CPU_CACHE_GB="0.1", KV_EVENTS_ENDPOINT1=endpoints[0], KV_EVENTS_ENDPOINT2=endpoints[1],
    )
    try:
        recipe.wait_ready()
        worker_ids = [client.worker_instance_id(recipe.worker_metrics(i)) for i in (0, 1)]
        recipe.deployment.wait_for(lambda: registered(recipe) == set(worker_ids), 60, "router knows both workers")
        yield Routing(recipe, streams, worker_ids)
    finally:
        for stream in streams:
            stream.close()
        stop_and_check_no_orphans(recipe)


def registered(recipe: Recipe) -> set[int]:
    return {int(s.labels["router_worker_id"]) for s in recipe.frontend_metrics()
            if s.name == "dynamo_component_router_worker_registered" and s.value == 1}


def prompt_blocks(stream: KvEventStream, prompt: list[int]) -> list[int] | None:
    """vLLM's hashes of the prompt's full blocks, read off the worker's GPU BlockStored events."""
    for event in stream.events():
        if type(event).__name__ == "BlockStored" and (event.medium or "GPU") == "GPU" \
                and event.parent_block_hash is None and list(event.token_ids[:BLOCK]) == prompt[:BLOCK]:
            hashes = list(event.block_hashes)
            return hashes[: len(prompt) // BLOCK] if len(hashes) >= len(prompt) // BLOCK else None
    return None


def held(stream: KvEventStream, medium: str) -> set[int]:
    rules = check_stream(stream.batches(), BLOCK)
    return rules.held.get(medium, set())


def wait_router_caught_up(routing: Routing) -> tuple[dict[str, int], dict]:
    """Poll the frontend until its router applied exactly the updates the workers published so far
    (saves land after answers, so more may still come): returns (published, applied) of that moment."""
    def caught_up():
        applied = client.events_applied(routing.recipe.frontend_metrics())
        want = {"stored": 0, "removed": 0, "cleared": 0}
        for stream in routing.streams:
            for kind, n in router_updates(stream.batches()).items():
                want[kind] += n
        got = {kind: sum(v for (k, _), v in applied.items() if k == kind) for kind in want}
        return (want, applied) if got == want else None
    return client.wait_until(caught_up, 60, "router applied every published KV event")


@pytest.fixture(scope="module")
def routed_back(routing: Routing):
    """Two prompts per worker (pinned), pushed out of GPU on both workers, then re-sent unpinned."""
    rng = random.Random(42)
    oa = routing.recipe.openai()
    prompts = [random_prompt(rng, PROMPT_TOKENS) for _ in range(4)]
    holders = [routing.worker_ids[i // 2] for i in range(4)]  # prompts 0,1 -> worker 0; 2,3 -> worker 1
    first = [oa.complete(p, max_tokens=6, nvext={"backend_instance_id": w, "extra_fields": ["worker_id"]})
             for p, w in zip(prompts, holders)]
    assert [c.worker_id for c in first] == holders

    streams = [routing.streams[routing.worker_ids.index(w)] for w in holders]
    blocks = [client.wait_until(lambda s=s, p=p: prompt_blocks(s, p), 30, "GPU events of a prompt")
              for s, p in zip(streams, prompts)]
    client.wait_until(lambda: all(set(b) <= held(s, "CPU") for s, b in zip(streams, blocks)), 60,
                      "every prompt's blocks announced in its worker's CPU tier")

    for round_ in range(6):  # fillers pinned to each worker until the prompts left both GPU caches
        if not any(set(b) & held(s, "GPU") for s, b in zip(streams, blocks)):
            break
        for w in routing.worker_ids:
            oa.complete(random_prompt(rng, FILLER_TOKENS), max_tokens=1, nvext={"backend_instance_id": w})
    gpu_left = [len(set(b) & held(s, "GPU")) for s, b in zip(streams, blocks)]
    assert gpu_left == [0, 0, 0, 0], f"prompts still in GPU caches after {round_} filler rounds"
    wait_router_caught_up(routing)

    again = [oa.complete(p, max_tokens=6) for p in prompts]
    log(f"routed back after {round_} filler rounds: holders={holders} served={[c.worker_id for c in again]} "
        f"cached={[c.cached_tokens for c in again]}")
    return prompts, holders, first, again, blocks


def test_evicted_prompts_are_routed_back_to_their_cpu_tier(routing, routed_back):
    prompts, holders, first, again, blocks = routed_back
    assert [c.worker_id for c in again] == holders, "4 of 4 must go back to the worker holding them in CPU"
    for prompt, before, after in zip(prompts, first, again):
        assert after.cached_tokens >= (len(prompt) // BLOCK) * BLOCK, after
        assert after.text == before.text, "greedy text changed after a CPU-tier load"


def test_router_applied_every_event_including_cpu_tier(routing, routed_back):
    want, applied = wait_router_caught_up(routing)  # N of N applied, at one moment
    bad = {key: n for key, n in applied.items() if key[1] != "ok" and n}
    assert bad == {}, f"router rejected events: {bad}"
    published = count_events(e for s in routing.streams for e in s.events())
    assert published.get(("BlockStored", "CPU"), 0) >= 4, published
    warnings = [s for s in routing.recipe.frontend_metrics() if s.name == client.EVENT_WARNINGS and s.value]
    assert warnings == []
    log(f"router applied {want}; workers published {published}")


def test_every_flexkv_event_follows_the_router_rules(routing, routed_back):
    for stream in routing.streams:
        assert stream.errors == []
        rules = check_stream(stream.batches(), BLOCK)
        assert rules.problems == [], f"{stream.name}: {rules.problems[:5]}"
        assert rules.checked > 0, f"{stream.name} published no FlexKV events"


def test_two_workers_without_port_settings_have_their_own_identity(routing):
    identities = routing.recipe.flexkv_identities()
    assert len(identities) == 2, identities
    assert "FLEXKV_SERVER_RECV_PORT" not in routing.recipe.service.env
    for name in identities:
        assert Path("/dev/shm", name).exists(), f"{name}: no shared-memory pool"
