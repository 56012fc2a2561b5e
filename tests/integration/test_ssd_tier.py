"""The SSD tier inside a real vLLM engine: served when the CPU tier lost a block, striped over two
directories, warm after a restart, never serving corrupt bytes, and degrading to recompute when its
directory disappears mid-run. Each test makes its own SSD files (no test depends on another's)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

from dynamo_flexkv.devtools.harness import EngineHost
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, push_out_of_gpu_cache, random_prompt

pytestmark = pytest.mark.engine

BLOCK_BYTES = 2 * 2 * BLOCK * 128 * 2
CPU_GB = str(12 * BLOCK_BYTES / 2**30)  # 12 blocks: every prompt below is soon gone from the CPU tier
SSD_SLOTS = 400
SSD_GB = str(SSD_SLOTS * BLOCK_BYTES / 2**30)
PROMPT_BLOCKS = 4


def ssd_engine(tiny_model: str, dirs: list[Path]) -> EngineHost:
    env = {
        "FLEXKV_CPU_CACHE_GB": CPU_GB,
        "FLEXKV_SSD_CACHE_GB": SSD_GB,
        "FLEXKV_SSD_CACHE_DIR": ";".join(str(d) for d in dirs),
    }
    return EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env)


@pytest.fixture
def ssd_dirs(tmp_path) -> list[Path]:
    dirs = [tmp_path / "nvme0", tmp_path / "nvme1"]  # on the real disk, not tmpfs
    for d in dirs:
        d.mkdir()
    return dirs


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [random_prompt(rng, PROMPT_BLOCKS * BLOCK + 7) for _ in range(6)]


@pytest.fixture(scope="module")
def expected(reference, prompts):
    return [c.token_ids for c in reference.generate(prompts, max_tokens=8, one_at_a_time=True)]


def ssd_files(dirs: list[Path]) -> list[Path]:
    return sorted(f for d in dirs for f in d.glob("*.ssd"))


def block_offsets(f: Path, num_dirs: int) -> list[int]:
    """File offsets of the block slots: the data area is the file's tail (after header and records)."""
    slots = SSD_SLOTS // num_dirs
    start = f.stat().st_size - slots * BLOCK_BYTES
    return [start + i * BLOCK_BYTES for i in range(slots)]


def test_lost_cpu_blocks_are_served_from_ssd_across_two_dirs(tiny_model, ssd_dirs, prompts, expected):
    with ssd_engine(tiny_model, ssd_dirs) as host:
        first = host.generate(prompts, max_tokens=8, one_at_a_time=True)
        push_out_of_gpu_cache(host, random.Random(6))
        again = host.generate(prompts, max_tokens=8, one_at_a_time=True)
        state = host.flexkv_state()
    assert [c.token_ids for c in first] == expected
    assert [c.token_ids for c in again] == expected
    assert [c.flexkv_tokens for c in again] == [PROMPT_BLOCKS * BLOCK] * len(prompts), state
    stats = state["engine_stats"]
    assert stats["hit_blocks"]["SSD"] >= 2 * PROMPT_BLOCKS  # the CPU tier (12 blocks) lost most of them
    files = ssd_files(ssd_dirs)
    assert len(files) == 2 and {f.parent for f in files} == set(ssd_dirs)
    for f in files:  # blocks are striped: both files hold block data
        data = f.read_bytes()
        written = [o for o in block_offsets(f, 2) if any(data[o : o + BLOCK_BYTES])]
        assert len(written) >= 4, f"no block data in {f}"


def fill_ssd_tier(tiny_model, ssd_dirs, prompts, expected) -> None:
    """One engine run that leaves every prompt on the SSD tier (a clean stop lands every write)."""
    with ssd_engine(tiny_model, ssd_dirs) as host:
        assert [c.token_ids for c in host.generate(prompts, max_tokens=8, one_at_a_time=True)] == expected


@pytest.mark.correctness("SSD warm restart", "tokens identical to a no-connector engine; a restarted engine loads earlier prompts from disk")
def test_restarted_engine_serves_earlier_prompts_from_ssd_on_first_request(tiny_model, ssd_dirs, prompts, expected):
    fill_ssd_tier(tiny_model, ssd_dirs, prompts, expected)
    with ssd_engine(tiny_model, ssd_dirs) as host:
        got = host.generate(prompts, max_tokens=8, one_at_a_time=True)
        state = host.flexkv_state()
    assert [c.token_ids for c in got] == expected
    assert all(c.flexkv_tokens == PROMPT_BLOCKS * BLOCK for c in got)
    assert state["engine_stats"]["hit_blocks"]["SSD"] >= len(prompts) * PROMPT_BLOCKS - 12


@pytest.mark.correctness("corrupt block", "recompute: a block whose checksum fails on disk is a miss; tokens identical to a no-connector engine")
def test_flipped_bytes_are_detected_and_recomputed(tiny_model, ssd_dirs, prompts, expected):
    fill_ssd_tier(tiny_model, ssd_dirs, prompts, expected)
    for f in ssd_files(ssd_dirs):
        data = bytearray(f.read_bytes())
        for offset in block_offsets(f, 2):  # one flipped byte in every block slot
            data[offset + 1000] ^= 0xFF
        f.write_bytes(bytes(data))
    with ssd_engine(tiny_model, ssd_dirs) as host:
        got = host.generate(prompts, max_tokens=8, one_at_a_time=True)
        state = host.flexkv_state()
    assert [c.token_ids for c in got] == expected
    assert state["ssd"]["corrupt_blocks"] > 0
    assert state["engine_stats"]["dropped_blocks"]["SSD"] == state["ssd"]["corrupt_blocks"]


def test_directory_removed_mid_run_degrades_to_recompute(tiny_model, tmp_path, prompts, expected):
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    with ssd_engine(tiny_model, [doomed]) as host:
        host.generate(prompts[:3], max_tokens=8, one_at_a_time=True)
        shutil.rmtree(doomed)
        push_out_of_gpu_cache(host, random.Random(8))
        got = host.generate(prompts, max_tokens=8, one_at_a_time=True)
        state = host.flexkv_state()
    assert [c.token_ids for c in got] == expected
    assert state["ssd"]["healthy"] is False and "removed" in state["ssd"]["reason"]
