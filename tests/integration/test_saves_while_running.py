"""Saves while a request runs (`save_policy`) and on preemption, inside a real vLLM engine.

Counters come from the connector itself: `loaded_tokens` (tokens vLLM did not compute because
FlexKV loaded them), `computed_tokens` (tokens vLLM scheduled for computing) and `preemptions`.
"""

from __future__ import annotations

import random
import time

import pytest

from dynamo_flexkv.devtools.harness import EngineHost
from dynamo_flexkv.devtools.kv_stream import KvEventStream, check_stream
from dynamo_flexkv.devtools.processes import free_port
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, push_out_of_gpu_cache, random_prompt

pytestmark = pytest.mark.engine


def flexkv_engine(tiny_model, events_endpoint: str | None = None, **env: str) -> EngineHost:
    engine = {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}
    if events_endpoint is not None:
        engine["kv_events_config"] = {"enable_kv_cache_events": True, "publisher": "zmq",
                                      "endpoint": events_endpoint}
    return EngineHost(tiny_model, engine, env={"FLEXKV_CPU_CACHE_GB": "0.25", **env})


def wait_for_cpu_blocks(stream: KvEventStream, count: int, timeout_s: float = 60):
    """The router's view of the stream once the CPU tier announced `count` blocks (or the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rules = check_stream(stream.batches(), BLOCK)
        if len(rules.held.get("CPU", ())) >= count or time.monotonic() > deadline:
            return rules
        time.sleep(0.1)


@pytest.mark.parametrize("async_copies", ["0", "1"])
@pytest.mark.correctness("preemption and resume", "tokens identical to a no-connector engine; preempted requests resume from what they saved")
def test_preempted_requests_resume_with_loaded_tokens(tiny_model, reference, async_copies):
    """Four requests that together need more blocks than vLLM's cache has: vLLM preempts some and
    frees their blocks; their computed blocks are saved first and loaded when they resume. With
    `cpu_async_copies` saves land a step later, as on a GPU."""
    rng = random.Random(21)
    prompts = [random_prompt(rng, 100) for _ in range(4)]
    max_tokens = 160  # 260 tokens = 9 blocks each: 36 blocks wanted, 24 in the cache
    want = reference.generate(prompts, max_tokens=max_tokens)
    with flexkv_engine(tiny_model, FLEXKV_CPU_ASYNC_COPIES=async_copies) as host:
        got = host.generate(prompts, max_tokens=max_tokens)
        state = host.flexkv_state()
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert state["preemptions"] > 0, state
    # Distinct prompts and an empty tier: every loaded token is one a preempted request computed.
    assert state["loaded_tokens"] > 0, state
    # Without preemption each request computes its prompt and all but its last output token; what
    # vLLM computed beyond that was recomputed after a preemption, and is less than what was loaded.
    recomputed = state["computed_tokens"] - sum(len(p) + max_tokens - 1 for p in prompts)
    assert 0 <= recomputed < state["loaded_tokens"], state


@pytest.mark.parametrize("policy", ["all", "prompt"])
def test_next_turn_of_a_chat_finds_the_previous_answer(tiny_model, reference, policy):
    """Turn 2 sends turn 1's prompt, its long answer and a new question. With `all` the answer's
    blocks were saved while it was generated; with `prompt` only the first prompt's blocks were."""
    rng = random.Random(22)
    question = random_prompt(rng, 40)
    answer_tokens = 200
    [first] = reference.generate([question], max_tokens=answer_tokens)
    turn2 = question + first.token_ids + random_prompt(rng, 30)
    [want] = reference.generate([turn2], max_tokens=8)
    # the KV of every token but the answer's last one was computed, in whole blocks
    with_answer = (len(question) + answer_tokens - 1) // BLOCK * BLOCK
    expected = with_answer if policy == "all" else len(question) // BLOCK * BLOCK
    endpoint = f"tcp://*:{free_port()}"
    stream = KvEventStream(endpoint)
    try:
        with flexkv_engine(tiny_model, endpoint, FLEXKV_SAVE_POLICY=policy) as host:
            [answer] = host.generate([question], max_tokens=answer_tokens)
            assert answer.token_ids == first.token_ids
            # The CPU tier announced the blocks it saved mid-request, each chained to its parent
            # and carrying the tokens vLLM's own GPU event gave that block.
            rules = wait_for_cpu_blocks(stream, expected // BLOCK)
            assert rules.problems == [] and stream.errors == []
            assert len(rules.held.get("CPU", ())) == expected // BLOCK
            push_out_of_gpu_cache(host, rng)
            [got] = host.generate([turn2], max_tokens=8)
    finally:
        stream.close()
    assert got.token_ids == want.token_ids
    assert got.flexkv_tokens == expected, got
