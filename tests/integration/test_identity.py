"""Stored KV belongs to the weights that computed it, not to the path they were served from (real
vLLM engines, a real redis-server in its own network namespace, real SSD files).

A rolling update replaces the weight files behind one path with a checkpoint of the same config
(here: the tiny model drawn under another seed, copied over with the old files' mtimes). An engine
on that path must then find none of the old weights' KV in the cluster or SSD tier and answer as a
fresh engine on the new weights does; an identical checkpoint at another path (another node's copy)
still shares. Likewise a restart with another fp8 KV format (all are stored as uint8) never
reinterprets the other format's bytes.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from dynamo_flexkv.devtools.harness import EngineHost
from dynamo_flexkv.devtools.tiny_model import SEED, TINY, build
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, random_prompt


pytestmark = pytest.mark.engine

BLOCK_BYTES = 2 * 2 * BLOCK * 128 * 2
CPU_GB = str(12 * BLOCK_BYTES / 2**30)
SSD_GB = str(400 * BLOCK_BYTES / 2**30)
PROMPT_BLOCKS = 4


@pytest.fixture(scope="module")
def fine_tune(tmp_path_factory) -> Path:
    """Another checkpoint of the tiny model's config and tokenizer: other weights, same sizes."""
    return build(tmp_path_factory.mktemp("fine-tune"), TINY, seed=SEED + 1)


@pytest.fixture(scope="module")
def fine_tune_tokens(fine_tune):
    """What a fresh engine on the fine-tune answers, without any connector."""
    with EngineHost(str(fine_tune), ENGINE) as host:
        return tokens(host.generate(make_prompts(51), max_tokens=8, one_at_a_time=True))


def make_prompts(seed: int, n: int = 4) -> list[list[int]]:
    rng = random.Random(seed)
    return [random_prompt(rng, PROMPT_BLOCKS * BLOCK + 7) for _ in range(n)]


def tokens(completions) -> list[list[int]]:
    return [c.token_ids for c in completions]


def copy_of(tiny_model: str, where: Path) -> Path:
    shutil.copytree(tiny_model, where)
    return where


def replace_weights_keeping_mtimes(model: Path, new: Path) -> None:
    """Copy the new checkpoint's weight files over the old ones in place: same names, sizes, mtimes."""
    assert (model / "config.json").read_text() == (new / "config.json").read_text()
    for path in model.glob("*.safetensors"):
        stat = path.stat()
        shutil.copyfile(new / path.relative_to(model), path)
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert path.stat().st_mtime_ns == stat.st_mtime_ns


def node_engine(model: Path, store, node: int) -> EngineHost:
    network, _, settings = store
    env = {"FLEXKV_CPU_CACHE_GB": CPU_GB, "FLEXKV_REMOTE_TIMEOUT_S": "2", **settings}
    return EngineHost(str(model), {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env, netns=network.nodes[node])


def ssd_engine(model: Path, ssd_dir: Path, **engine) -> EngineHost:
    env = {"FLEXKV_CPU_CACHE_GB": CPU_GB, "FLEXKV_SSD_CACHE_GB": SSD_GB, "FLEXKV_SSD_CACHE_DIR": str(ssd_dir)}
    return EngineHost(str(model), {**ENGINE, **engine, "kv_transfer_config": COMPAT_CONFIG}, env=env)


def store_namespaces(store) -> set[str]:
    network, _, settings = store
    host, port = settings["FLEXKV_REMOTE_STORE"].removeprefix("redis://").split("/")[0].split(":")
    keys = subprocess.run(network.run_in(network.store, ["redis-cli", "-h", host, "-p", port, "--scan",
                                                         "--pattern", "flexkv/*"]),
                          capture_output=True, text=True, timeout=30, check=True).stdout.split()
    return {key.split("/")[1] for key in keys}


def test_the_same_checkpoint_at_another_path_on_another_node_shares_the_cluster_tier(tiny_model, redis_store, tmp_path):
    prompts = make_prompts(52)
    with node_engine(copy_of(tiny_model, tmp_path / "node0" / "model"), redis_store, 0) as a:
        computed = a.generate(prompts, max_tokens=8, one_at_a_time=True)
        wrote = a.flexkv_state()["redis"]
    other_copy = tmp_path / "node1" / "weights" / "llama"
    shutil.copytree(tiny_model, other_copy, copy_function=shutil.copy)  # other path, other mtimes
    with node_engine(other_copy, redis_store, 1) as b:
        loaded = b.generate(prompts, max_tokens=8, one_at_a_time=True)
        state = b.flexkv_state()
    assert wrote["blocks_written"] == PROMPT_BLOCKS * len(prompts), wrote
    assert tokens(loaded) == tokens(computed)
    assert [c.flexkv_tokens for c in loaded] == [PROMPT_BLOCKS * BLOCK] * len(prompts), state
    assert state["engine_stats"]["hit_blocks"]["REDIS"] == PROMPT_BLOCKS * len(prompts), state


@pytest.mark.correctness("weights swapped behind one path",
                         "recompute: zero hits on the old weights' KV (cluster and SSD tiers); tokens identical to "
                         "a fresh engine on the new weights")
@pytest.mark.parametrize("tier", ["REDIS", "SSD"])
def test_weights_swapped_behind_one_path_never_load_the_old_weights_kv(tiny_model, fine_tune, fine_tune_tokens,
                                                                      redis_store, tmp_path, tier):
    prompts = make_prompts(51)
    model = copy_of(tiny_model, tmp_path / "served" / "model")
    ssd_dir = tmp_path / "ssd"
    ssd_dir.mkdir()

    def engine() -> EngineHost:
        return node_engine(model, redis_store, 0) if tier == "REDIS" else ssd_engine(model, ssd_dir)

    with engine() as old:
        old_tokens = tokens(old.generate(prompts, max_tokens=8, one_at_a_time=True))
        wrote = old.flexkv_state()[tier.lower()]
    assert wrote["blocks_written"] >= PROMPT_BLOCKS * len(prompts), wrote
    assert old_tokens != fine_tune_tokens  # the two checkpoints answer differently: a stale load would show
    namespaces_before = store_namespaces(redis_store)

    replace_weights_keeping_mtimes(model, fine_tune)
    with engine() as new:
        got = new.generate(prompts, max_tokens=8, one_at_a_time=True)
        state = new.flexkv_state()
    assert tokens(got) == fine_tune_tokens
    assert [c.flexkv_tokens for c in got] == [0] * len(prompts), state
    assert state["engine_stats"]["hit_blocks"].get(tier, 0) == 0, state
    if tier == "REDIS":  # the new weights' KV went to a namespace of its own, beside the old one
        assert len(store_namespaces(redis_store) - namespaces_before) == 1


@pytest.mark.correctness("KV dtype changed",
                         "recompute: a restart from --kv-cache-dtype fp8_e4m3 to fp8_e5m2 (both stored as uint8) "
                         "gets zero hits on the SSD files of the other format; tokens identical to a fresh engine "
                         "with the new format")
def test_a_restart_with_another_fp8_format_never_reinterprets_the_stored_bytes(tiny_model, tmp_path):
    prompts = make_prompts(53)
    ssd_dir = tmp_path / "ssd"
    ssd_dir.mkdir()
    model = Path(tiny_model)
    e5m2 = {**ENGINE, "kv_cache_dtype": "fp8_e5m2"}
    with EngineHost(tiny_model, e5m2) as fresh:
        expected = tokens(fresh.generate(prompts, max_tokens=8, one_at_a_time=True))
    with ssd_engine(model, ssd_dir, kv_cache_dtype="fp8_e4m3") as old:
        old.generate(prompts, max_tokens=8, one_at_a_time=True)
        wrote = old.flexkv_state()["ssd"]
    assert wrote["blocks_written"] >= PROMPT_BLOCKS * len(prompts), wrote
    with ssd_engine(model, ssd_dir, kv_cache_dtype="fp8_e5m2") as new:
        got = new.generate(prompts, max_tokens=8, one_at_a_time=True)
        state = new.flexkv_state()
    assert tokens(got) == expected
    assert [c.flexkv_tokens for c in got] == [0] * len(prompts), state
    assert state["engine_stats"]["hit_blocks"].get("SSD", 0) == 0, state
