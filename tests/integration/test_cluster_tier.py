"""The cluster tier on a real Mooncake Store, inside real vLLM engines on separate "nodes".

Each engine runs in its own network namespace (its own loopback and address), joined to a store
namespace holding the Mooncake master, its metadata server and a store node that contributes the
memory. Engine A computes prompts and exits; engine B, which never saw them, loads their KV from the
store and must produce the tokens of an engine without the connector -- on Mooncake and on Redis (a
redis-server in the store namespace). Faults: the master dies (the
tier degrades to recompute, no request hangs, no wrong token) and comes back (sharing resumes); a cut
network link is the same as a lost master; a full store declines puts; values corrupted in the store
are recomputed, never staged again and again. At start-up: an engine whose
block hashes cannot match another's refuses the tier, and an unreachable store starts the tier
degraded (or, with remote_start_degraded off, is one error line). A stalled store -- the master or
the node holding the values frozen (SIGSTOP), the link slowed -- during traffic and at start-up:
every request answers within remote_timeout_s plus its recompute, with the reference tokens, and
the tier serves again once the store returns.
"""

from __future__ import annotations

import random
import re
import subprocess
import time

import pytest

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.devtools.harness import EngineError, EngineHost
from dynamo_flexkv.devtools.processes import free_port
from dynamo_flexkv.storage.backend import open_backend
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, push_out_of_gpu_cache, random_prompt
from tests.servers import mooncake_cluster, mooncake_master

pytestmark = pytest.mark.engine

BLOCK_BYTES = 2 * 2 * BLOCK * 128 * 2
CPU_GB = str(12 * BLOCK_BYTES / 2**30)  # 12 blocks: prompts soon leave the CPU tier
PROMPT_BLOCKS = 4
DEADLINE_S = 180


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with mooncake_cluster(tmp_path_factory.mktemp("cluster"), nodes=2) as running:
        yield running


def node_engine(tiny_model: str, cluster, node: int) -> EngineHost:
    network, _, store = cluster
    env = {"FLEXKV_CPU_CACHE_GB": CPU_GB, "FLEXKV_REMOTE_TIMEOUT_S": "2", **store,
           "MC_TCP_BIND_ADDRESS": network.address(node), "MC_LOG_LEVEL": "ERROR"}
    return EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env,
                      netns=network.nodes[node])


def make_prompts(seed: int, n: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_prompt(rng, PROMPT_BLOCKS * BLOCK + 7) for _ in range(n)]


def tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


@pytest.mark.parametrize(("store", "tier"), [("cluster", "MOONCAKE"), ("redis_store", "REDIS")])
@pytest.mark.correctness("cluster tier across nodes", "tokens identical to a no-connector engine; engine B loads what engine A computed (Mooncake and Redis)")
def test_a_prefix_computed_on_one_node_is_loaded_on_another(tiny_model, store, tier, reference, request):
    cluster = request.getfixturevalue(store)
    prompts = make_prompts(11)
    expected = tokens(reference.generate(prompts, max_tokens=8, one_at_a_time=True))
    with node_engine(tiny_model, cluster, 0) as a:
        computed = a.generate(prompts, max_tokens=8, one_at_a_time=True)
        wrote = a.flexkv_state()[tier.lower()]
    with node_engine(tiny_model, cluster, 1) as b:
        loaded = b.generate(prompts, max_tokens=8, one_at_a_time=True)
        state = b.flexkv_state()
    assert tokens(computed) == expected and tokens(loaded) == expected
    assert wrote["blocks_written"] == PROMPT_BLOCKS * len(prompts) and wrote["healthy"], wrote
    assert [c.flexkv_tokens for c in loaded] == [PROMPT_BLOCKS * BLOCK] * len(prompts), state
    assert state["engine_stats"]["hit_blocks"][tier] == PROMPT_BLOCKS * len(prompts), state
    assert state[tier.lower()]["corrupt_blocks"] == 0


# Flips the last byte of every FlexKV value in a Redis store; returns how many it changed.
FLIP_LAST_BYTE = ("local n = 0 for _, k in ipairs(redis.call('KEYS', 'flexkv/*')) do "
                  "local v = redis.call('GET', k) local b = string.byte(v, #v) "
                  "redis.call('SET', k, string.sub(v, 1, #v - 1) .. string.char((b + 1) % 256)) n = n + 1 end return n")


@pytest.mark.correctness("corrupt block", "recompute: every value corrupted in Redis is a miss, no retry loop; tokens identical to a no-connector engine")
def test_values_corrupted_in_the_store_are_recomputed_by_a_real_engine(tiny_model, redis_store, reference):
    """A staged read that fails (here every value fails its checksum) is a failed load: the engine
    recomputes those blocks, answers every request within the bound, with the reference tokens."""
    network, _, settings = redis_store
    prompts = make_prompts(41)
    expected = tokens(reference.generate(prompts, max_tokens=8, one_at_a_time=True))
    with node_engine(tiny_model, redis_store, 0) as a:
        assert tokens(a.generate(prompts, max_tokens=8, one_at_a_time=True)) == expected
    host, port = settings["FLEXKV_REMOTE_STORE"].removeprefix("redis://").split("/")[0].split(":")
    flipped = subprocess.run(network.run_in(network.store, ["redis-cli", "-h", host, "-p", port, "EVAL",
                                                            FLIP_LAST_BYTE, "0"]),
                             capture_output=True, text=True, timeout=30, check=True)
    assert int(flipped.stdout) >= PROMPT_BLOCKS * len(prompts), flipped
    with node_engine(tiny_model, redis_store, 1) as b:
        start = time.monotonic()
        loaded = b.generate(prompts, max_tokens=8, one_at_a_time=True, timeout_s=DEADLINE_S)
        elapsed = time.monotonic() - start
        state = b.flexkv_state()
    assert tokens(loaded) == expected and elapsed < DEADLINE_S
    assert state["redis"]["corrupt_blocks"] >= PROMPT_BLOCKS, state
    assert state["engine_stats"]["hit_blocks"].get("REDIS", 0) == 0, state


@pytest.mark.correctness("cluster store stalled or dead", "recompute while the Mooncake master is gone; sharing resumes when it returns; tokens identical to a no-connector engine")
def test_master_loss_degrades_to_recompute_and_its_return_resumes_sharing(tiny_model, cluster, reference):
    network, services, _ = cluster
    before, during, after = make_prompts(21), make_prompts(22), make_prompts(23)
    expected = {id(p): tokens(reference.generate(p, max_tokens=8, one_at_a_time=True)) for p in (before, during, after)}
    master = services["mooncake-master"]
    with node_engine(tiny_model, cluster, 0) as host:
        assert tokens(host.generate(before, max_tokens=8, one_at_a_time=True)) == expected[id(before)]
        master.stop(grace_s=0)  # SIGTERM then SIGKILL: every object in the store is gone
        push_out_of_gpu_cache(host, random.Random(1))
        start = time.monotonic()
        assert tokens(host.generate(before, max_tokens=8, one_at_a_time=True)) == expected[id(before)]
        assert tokens(host.generate(during, max_tokens=8, one_at_a_time=True)) == expected[id(during)]
        degraded = host.flexkv_state()
        assert time.monotonic() - start < DEADLINE_S
        assert degraded["mooncake"]["healthy"] is False and degraded["mooncake"]["reason"], degraded

        written = degraded["mooncake"]["blocks_written"]
        master.start()  # same address and port: this engine reconnects, the store node remounts its memory
        deadline = time.monotonic() + DEADLINE_S
        rng = random.Random(2)
        while not ((tier := host.flexkv_state()["mooncake"])["healthy"] and tier["blocks_written"] > written):
            assert time.monotonic() < deadline, f"the tier did not recover after the master came back: {tier}"
            host.generate([random_prompt(rng, PROMPT_BLOCKS * BLOCK)], max_tokens=1)  # probes the master
        hits_before = host.flexkv_state()["engine_stats"]["hit_blocks"]["MOONCAKE"]
        assert tokens(host.generate(after, max_tokens=8, one_at_a_time=True)) == expected[id(after)]
        push_out_of_gpu_cache(host, random.Random(3))
        again = host.generate(after, max_tokens=8, one_at_a_time=True)
        state = host.flexkv_state()
    assert tokens(again) == expected[id(after)]
    assert state["engine_stats"]["hit_blocks"]["MOONCAKE"] - hits_before >= PROMPT_BLOCKS, state


def test_a_full_store_declines_puts_and_keeps_serving(tmp_path):
    import torch

    slot, segment_mb = 256 * 1024, 16
    with mooncake_master(tmp_path) as (_, url):
        settings = FlexKVSettings(remote_store=url, remote_cache_gb=segment_mb / 1024, remote_timeout_s=2)
        tier = open_backend("mooncake", {"model": "full-store-test"}, slot, settings)
        pool = torch.randint(0, 256, (8, slot), dtype=torch.uint8)
        try:
            results = []
            for batch in range(3 * segment_mb * (1 << 20) // slot // 8):  # three times what fits
                keys = [f"{batch}-{i}".encode() for i in range(8)]
                results.append((keys, tier.write(pool, range(8), range(8), keys).result(timeout=60).ok))
            declined = sum(not ok for _, ok in results for ok in ok)
            assert declined > 0 and tier.healthy, tier.degraded_reason
            keys, ok = next((k, ok) for k, ok in reversed(results) if all(ok))
            read = tier.read(pool, range(8), range(8), keys).result(timeout=60)
            assert read.ok == [True] * 8
        finally:
            tier.close()


@pytest.mark.correctness("cluster store stalled or dead", "recompute while the link is cut; tokens identical to a no-connector engine")
def test_a_cut_network_is_the_same_as_a_lost_master(tiny_model, cluster, reference):
    network, _, _ = cluster
    prompts = make_prompts(31)
    expected = tokens(reference.generate(prompts, max_tokens=8, one_at_a_time=True))
    with node_engine(tiny_model, cluster, 1) as host:
        assert tokens(host.generate(prompts, max_tokens=8, one_at_a_time=True)) == expected
        push_out_of_gpu_cache(host, random.Random(4))
        network.cut(1)
        try:
            start = time.monotonic()
            assert tokens(host.generate(prompts, max_tokens=8, one_at_a_time=True)) == expected
            state = host.flexkv_state()
            assert time.monotonic() - start < DEADLINE_S
        finally:
            network.mend(1)
    assert state["mooncake"]["healthy"] is False, state


def start_failure(tiny_model: str, env: dict[str, str | None], **engine) -> str:
    with pytest.raises(EngineError) as failure:
        EngineHost(tiny_model, {**ENGINE, **engine, "kv_transfer_config": COMPAT_CONFIG}, env=env).close()
    return str(failure.value)


def test_an_engine_with_per_process_random_block_hashes_refuses_the_cluster_tier(tiny_model):
    trace = start_failure(tiny_model, {"FLEXKV_REMOTE_STORE": "redis://127.0.0.1:6379/0", "PYTHONHASHSEED": None},
                          prefix_caching_hash_algo="xxhash")
    assert "remote_store shares KV blocks between processes" in trace and "PYTHONHASHSEED" in trace
    assert "initialize_kv_cache" not in re.findall(r", in (\w+)\n", trace)  # before vLLM allocated its cache


def test_an_engine_whose_store_is_unreachable_starts_degraded_or_fails_at_start_up_in_one_line(tiny_model, reference):
    """By default the engine starts with the tier degraded (one warning line) and serves by recompute;
    with remote_start_degraded off it refuses to start, in one line."""
    url = f"mooncake://127.0.0.1:{free_port()}"
    start = time.monotonic()
    trace = start_failure(tiny_model, {"FLEXKV_REMOTE_STORE": url, "FLEXKV_REMOTE_TIMEOUT_S": "2",
                                       "FLEXKV_REMOTE_START_DEGRADED": "false"})
    lines = [line for line in trace.splitlines() if line.startswith("ConnectionError")]
    assert lines == [f"ConnectionError: remote_store {url}: Mooncake master unreachable ([Errno 111] Connection "
                     "refused); start the store, fix the URL, or set remote_start_degraded to start without it"]
    assert time.monotonic() - start < DEADLINE_S
    prompts = make_prompts(51, n=2)
    expected = tokens(reference.generate(prompts, max_tokens=8, one_at_a_time=True))
    env = {"FLEXKV_CPU_CACHE_GB": CPU_GB, "FLEXKV_REMOTE_STORE": url, "FLEXKV_REMOTE_TIMEOUT_S": "2"}
    with EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env) as host:
        assert tokens(host.generate(prompts, max_tokens=8, one_at_a_time=True)) == expected
        state = host.flexkv_state()
    assert state["mooncake"]["healthy"] is False and state["mooncake"]["started_degraded"] == 1, state
    assert "unreachable" in state["mooncake"]["reason"]


# -- a stalled store: frozen (SIGSTOP: sockets open, nothing answers) or slowed ---------------------

TIMEOUT_S = 2  # the engines' remote_timeout_s (node_engine)
MARGIN_S = 20  # generous: a correctness bound on a shared 2-core machine, not a speed claim


def recompute_bound(reference, prompts) -> tuple[list[list[int]], float]:
    """The reference tokens, and how long a request may take: the deadline plus its recompute."""
    done = reference.generate(prompts, max_tokens=8, one_at_a_time=True)
    return tokens(done), TIMEOUT_S + max(c.finish_s for c in done) + MARGIN_S


def serves_again(host: EngineHost, rng: random.Random, reference) -> tuple[dict, list[list[int]], list[list[int]]]:
    """After the store returned: the tier turns healthy, no CPU slot stays held and no work pending,
    the index agrees with itself, and prompts written now are loaded back from the store. Returns
    the state, those prompts and their tokens."""
    deadline = time.monotonic() + DEADLINE_S
    while not ((state := host.flexkv_state())["mooncake"]["healthy"] and state["held_slots"] == 0):
        assert time.monotonic() < deadline, f"the tier did not serve again after the store returned: {state}"
        host.generate([random_prompt(rng, PROMPT_BLOCKS * BLOCK)], max_tokens=1)  # steps the engine
    assert state["inflight"] == 0 and not state["accounting"]["problems"], state
    prompts = make_prompts(rng.randrange(1 << 30))
    expected = tokens(reference.generate(prompts, max_tokens=8, one_at_a_time=True))
    hits = state["engine_stats"]["hit_blocks"].get("MOONCAKE", 0)
    assert tokens(host.generate(prompts, max_tokens=8, one_at_a_time=True)) == expected
    push_out_of_gpu_cache(host, rng)
    assert tokens(host.generate(prompts, max_tokens=8, one_at_a_time=True)) == expected
    state = host.flexkv_state()
    assert state["engine_stats"]["hit_blocks"]["MOONCAKE"] - hits >= PROMPT_BLOCKS, state
    return state, prompts, expected


@pytest.mark.correctness("cluster store stalled or dead",
                         "during traffic (master frozen, the node holding the values frozen, the link slowed): "
                         "recompute within remote_timeout_s; tokens identical to an engine without the connector; "
                         "no held slot or pending work once it returns, and the tier serves again")
def test_a_stalled_store_during_traffic_is_recomputed_within_the_deadline_then_serves_again(tiny_model, cluster,
                                                                                            reference):
    network, services, _ = cluster
    stalls = {  # name -> (stall, resume)
        "master frozen": (services["mooncake-master"].freeze, services["mooncake-master"].thaw),
        "segment node frozen": (services["mooncake-store"].freeze, services["mooncake-store"].thaw),
        "link slowed": (lambda: network.slow(0, "200kbit"), lambda: network.unslow(0)),
    }
    rng = random.Random(61)
    with node_engine(tiny_model, cluster, 0) as host:
        for seed, (name, (stall, resume)) in enumerate(stalls.items(), start=62):
            prompts = make_prompts(seed)
            expected, bound = recompute_bound(reference, prompts)
            assert tokens(host.generate(prompts, max_tokens=8, one_at_a_time=True)) == expected  # into the store
            push_out_of_gpu_cache(host, rng)  # and out of the GPU and CPU tiers: a hit must come from the store
            timeouts = host.flexkv_state()["mooncake"]["timeouts"]
            stall()
            try:
                stalled = host.generate(prompts, max_tokens=8, one_at_a_time=True, timeout_s=DEADLINE_S)
                during = host.flexkv_state()
            finally:
                resume()
            assert tokens(stalled) == expected, name
            assert max(c.finish_s for c in stalled) < bound, (name, [c.finish_s for c in stalled], bound)
            assert during["mooncake"]["timeouts"] > timeouts and not during["mooncake"]["healthy"], (name, during)
            serves_again(host, rng, reference)


@pytest.mark.correctness("cluster store stalled or dead",
                         "at an engine's start-up (master frozen; the link slowed): "
                         "the engine starts in bounded time, degraded or slow; recompute within remote_timeout_s; "
                         "tokens identical; serves from the store once it returns")
def test_an_engine_started_while_the_store_stalls_serves_by_recompute_then_from_the_store(tiny_model, cluster,
                                                                                          reference):
    network, services, _ = cluster
    master = services["mooncake-master"]
    rng = random.Random(71)
    prompts = make_prompts(72)
    expected, bound = recompute_bound(reference, prompts)
    master.freeze()
    try:
        started = time.monotonic()
        with node_engine(tiny_model, cluster, 0) as host:
            start_s = time.monotonic() - started
            try:
                stalled = host.generate(prompts, max_tokens=8, one_at_a_time=True, timeout_s=DEADLINE_S)
                during = host.flexkv_state()
            finally:
                master.thaw()
            assert start_s < DEADLINE_S and during["mooncake"]["started_degraded"] == 1, (start_s, during)
            assert tokens(stalled) == expected and max(c.finish_s for c in stalled) < bound
            _, written, expected = serves_again(host, rng, reference)  # these are in the store now
    finally:
        master.thaw()
    network.slow(1, "200kbit")  # engine B starts on a slow link: its reads of what A wrote pass the deadline
    try:
        with node_engine(tiny_model, cluster, 1) as host:
            slowed = host.generate(written, max_tokens=8, one_at_a_time=True, timeout_s=DEADLINE_S)
            during = host.flexkv_state()
            network.unslow(1)
            assert tokens(slowed) == expected and max(c.finish_s for c in slowed) < bound, (slowed, bound)
            assert during["mooncake"]["timeouts"] > 0, during
            serves_again(host, rng, reference)
    finally:
        for ns, dev in ((network.nodes[1], "eth0"), (network.store, "p1")):
            subprocess.run(network.run_in(ns, ["tc", "qdisc", "del", "dev", dev, "root"]), capture_output=True)
