"""The fault matrix: each row a real fault against a real vLLM CPU engine with FlexKV (CPU + SSD).

For every row: every request that completes returns exactly the greedy tokens of a vLLM engine
without any connector, within a bounded time; afterwards the index agrees with what the tiers hold
(`accounting`), and a clean stop leaves no shared memory behind. Faults:

| row | fault |
| --- | --- |
| `sigkill` | SIGKILL of the engine (scheduler and worker) while a batch saves and loads, then a restart |
| `reset` | vLLM's cache reset, the same blocks saved again, then a restart |
| `dir_removed` | the SSD directory removed while serving |
| `disk_full` | the SSD directory on a small tmpfs that cannot hold the tier |
| `flipped_bytes` | flipped bytes in every SSD block, under MultiConnector (vLLM's "fail" policy otherwise) |
| `hung_disk` | the SSD on a FUSE disk whose reads and writes block (tests/faults/blockfs.py) |
| `disk_recovers` | the same disk hangs, then answers again: the tier comes back by itself |
| `small_dev_shm` | a 64 MiB /dev/shm (Docker's default) in a private mount namespace |
| `pool_race` | two instances given the same pool name (FLEXKV_SERVER_RECV_PORT) |

The cluster tier's rows run against real engines on their own network namespaces ("nodes") sharing a
real Mooncake Store, so they live with that set-up in tests/integration/test_cluster_tier.py (same
rule: greedy tokens of an engine without the connector, every request within a bound; the full-store
row drives the tier itself against a real master):

| row | fault |
| --- | --- |
| `test_master_loss_degrades_to_recompute_and_its_return_resumes_sharing` | the store's master killed mid-run (every value lost): misses, the tier unhealthy; then the master back: sharing resumes |
| `test_a_cut_network_is_the_same_as_a_lost_master` | the node's network link cut |
| `test_values_corrupted_in_the_store_are_recomputed_by_a_real_engine` | every value in the store corrupted (Redis): staged reads fail, recomputed, no staging loop |
| `test_a_full_store_declines_puts_and_keeps_serving` | a store too small for what is written: puts declined, the tier healthy |
| `test_an_engine_whose_store_is_unreachable_starts_degraded_or_fails_at_start_up_in_one_line` | no store at start-up: the tier starts degraded (one warning line) and the engine recomputes; with `remote_start_degraded: false`, one error line |
| `test_a_stalled_store_during_traffic_is_recomputed_within_the_deadline_then_serves_again` | during traffic, in turn: the master frozen (SIGSTOP), the store node holding the values frozen, the link rate-limited (`tc tbf`; no netem in this kernel): every request within `remote_timeout_s` + its recompute, then no held slot or pending work, and the tier serves again |
| `test_an_engine_started_while_the_store_stalls_serves_by_recompute_then_from_the_store` | an engine started while the master is frozen (starts degraded, bounded), and one started on a rate-limited link: recompute within the bound, then served from the store |
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dynamo_flexkv.devtools.harness import EngineError, EngineHost
from tests.faults.blockfs import mounted
from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, push_out_of_gpu_cache, random_prompt, wait_until

pytestmark = pytest.mark.engine

BLOCK_BYTES = 2 * 2 * BLOCK * 128 * 2  # the tiny model: layers x kv heads x tokens x head dims x bf16
CPU_GB = str(12 * BLOCK_BYTES / 2**30)  # 12 blocks: prompts are soon only on SSD
SSD_GB = str(400 * BLOCK_BYTES / 2**30)
PROMPT_BLOCKS = 4
REQUEST_BOUND_S = 60.0  # a request of the tiny model takes about a second; a hang would take forever
IO_TIMEOUT_S = "3"
MULTI_CONFIG = {"kv_connector": "MultiConnector", "kv_role": "kv_both",
                "kv_connector_extra_config": {"connectors": [COMPAT_CONFIG]}}
REPO = Path(__file__).resolve().parents[2]


def engine(tiny_model: str, ssd_dirs: list[Path], transfer=COMPAT_CONFIG, **env: str) -> EngineHost:
    env = {"FLEXKV_CPU_CACHE_GB": CPU_GB, "FLEXKV_SSD_CACHE_GB": SSD_GB,
           "FLEXKV_SSD_CACHE_DIR": ";".join(map(str, ssd_dirs)), "FLEXKV_SSD_IO_TIMEOUT_S": IO_TIMEOUT_S, **env}
    return EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": transfer}, env=env)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [random_prompt(rng, PROMPT_BLOCKS * BLOCK + 7) for _ in range(5)]


@pytest.fixture(scope="module")
def expected(reference, prompts) -> list[list[int]]:
    return [c.token_ids for c in reference.generate(prompts, max_tokens=8, one_at_a_time=True)]


def serve_bounded(host: EngineHost, prompts, expected) -> list[float]:
    """Each prompt on its own; identical tokens and a bounded time each. Returns the times."""
    took = []
    for prompt, want in zip(prompts, expected):
        start = time.monotonic()
        [got] = host.generate([prompt], max_tokens=8, timeout_s=REQUEST_BOUND_S)
        took.append(time.monotonic() - start)
        assert got.token_ids == want
    assert max(took) < REQUEST_BOUND_S
    return took


POOLS_SEEN: set[str] = set()  # CPU pools of the engines a test started (other users' are not ours)


def assert_accounting(host: EngineHost) -> dict:
    state = host.flexkv_state()
    POOLS_SEEN.add(state["pool"])
    assert state["accounting"]["problems"] == [], state["accounting"]
    return state


@pytest.fixture
def clean_shm():
    POOLS_SEEN.clear()
    yield
    leftover = [name for pool in POOLS_SEEN for name in (pool, pool + ".owner") if Path("/dev/shm", name).exists()]
    assert not leftover, f"shared memory left behind after a clean stop: {leftover}"


def data_written(dirs: list[Path]) -> bool:
    """True once some block data reached an SSD file (its data region is not all zero)."""
    for f in (f for d in dirs for f in d.glob("*.ssd")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            fh.seek(max(0, size - 400 * BLOCK_BYTES // len(dirs)))
            if any(fh.read()):
                return True
    return False


def test_sigkill_mid_batch_then_restart(tiny_model, reference, prompts, expected, tmp_path, clean_shm):
    ssd = [tmp_path / "ssd"]
    ssd[0].mkdir()
    host = engine(tiny_model, ssd)
    try:
        host.generate(prompts[:2], max_tokens=8)
        assert_accounting(host)  # records its pool: the next start must sweep it after the kill
        push_out_of_gpu_cache(host, random.Random(1))
        # A batch that loads the first prompts back and saves the rest; killed once writes landed.
        host.call_async("generate", prompts=prompts, max_tokens=8, one_at_a_time=False)
        wait_until(lambda: data_written(ssd), 120, "block data reached the SSD file")
        os.kill(host.process.pid, signal.SIGKILL)
        host.process.join(30)
    finally:
        host.close()
    with engine(tiny_model, ssd) as again:  # sweeps the dead pool, restores what the disk holds
        serve_bounded(again, prompts, expected)
        assert_accounting(again)


def test_cache_reset_then_saving_again_then_restart(tiny_model, reference, prompts, expected, tmp_path, clean_shm):
    """vLLM resets the cache (e.g. after a weight update); the same blocks are saved again. The next
    start used to fail on duplicate SSD records ('cannot restore ... at slot N'), and the reset must
    reach the disk: nothing from before it is found after a restart."""
    ssd = [tmp_path / "ssd"]
    ssd[0].mkdir()
    with engine(tiny_model, ssd) as host:
        serve_bounded(host, prompts, expected)
        host.drain()
        assert host.reset_cache() is True
        assert assert_accounting(host)["engine_stats"]["blocks_held"] == {"CPU": 0, "SSD": 0}
        serve_bounded(host, prompts[:2], expected[:2])  # saved again, into other slots
        host.drain()
        held = assert_accounting(host)["engine_stats"]["blocks_held"]["SSD"]
    with engine(tiny_model, ssd) as again:
        state = assert_accounting(again)
        assert state["engine_stats"]["blocks_held"]["SSD"] == held  # only what was saved after the reset
        serve_bounded(again, prompts, expected)


def test_ssd_directory_removed_while_serving(tiny_model, reference, prompts, expected, tmp_path, clean_shm):
    doomed = tmp_path / "doomed"
    doomed.mkdir()
    with engine(tiny_model, [doomed]) as host:
        serve_bounded(host, prompts[:3], expected[:3])
        shutil.rmtree(doomed)
        push_out_of_gpu_cache(host, random.Random(2))
        serve_bounded(host, prompts, expected)
        state = assert_accounting(host)
    assert state["ssd"]["healthy"] is False and "removed" in state["ssd"]["reason"]


def test_disk_full_is_a_clear_start_up_error(tiny_model, tmp_path, clean_shm):
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True, timeout=30)
    try:
        start = time.monotonic()
        with pytest.raises(EngineError) as info:
            engine(tiny_model, [small]).close()
        assert time.monotonic() - start < 300
        assert "FLEXKV_SSD_CACHE_GB" in str(info.value) and "is free in FLEXKV_SSD_CACHE_DIR" in str(info.value)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False, timeout=30)


@pytest.mark.correctness("corrupt block", "recompute under MultiConnector; tokens identical to a no-connector engine")
def test_flipped_bytes_under_multiconnector_are_recomputed(tiny_model, reference, prompts, expected, tmp_path,
                                                           clean_shm):
    """vLLM reads the load-failure policy of the top-level (MultiConnector) config only: unreadable
    blocks must still be a miss, not a failed request."""
    ssd = [tmp_path / "ssd"]
    ssd[0].mkdir()
    with engine(tiny_model, ssd) as host:
        serve_bounded(host, prompts, expected)
        assert_accounting(host)
    [f] = list(ssd[0].glob("*.ssd"))
    data = bytearray(f.read_bytes())
    start = len(data) - 400 * BLOCK_BYTES
    for offset in range(start, len(data), BLOCK_BYTES):
        data[offset + 1000] ^= 0xFF
    f.write_bytes(bytes(data))
    with engine(tiny_model, ssd, transfer=MULTI_CONFIG) as host:
        serve_bounded(host, prompts, expected)
        state = assert_accounting(host)
    assert state["ssd"]["corrupt_blocks"] > 0


def test_hung_disk_degrades_to_recompute_in_bounded_time(tiny_model, reference, prompts, expected, tmp_path,
                                                          clean_shm):
    with mounted(tmp_path / "fuse") as disk:
        host = engine(tiny_model, [disk.mountpoint])
        try:
            serve_bounded(host, prompts, expected)
            push_out_of_gpu_cache(host, random.Random(3))
            disk.set("hang")  # from now on every SSD read and write blocks in the kernel
            serve_bounded(host, prompts, expected)
            push_out_of_gpu_cache(host, random.Random(4))
            serve_bounded(host, prompts, expected)
            state = assert_accounting(host)
            assert state["ssd"]["healthy"] is False and "stuck" in state["ssd"]["reason"]
            start = time.monotonic()
            host.close()  # bounded although I/O threads are still blocked
            assert time.monotonic() - start < REQUEST_BOUND_S
        finally:
            host.close()
            disk.set("ok")


def test_a_hung_disk_that_recovers_brings_the_ssd_tier_back(tiny_model, reference, prompts, expected, tmp_path,
                                                            clean_shm):
    with mounted(tmp_path / "fuse") as disk, engine(tiny_model, [disk.mountpoint]) as host:
        serve_bounded(host, prompts, expected)
        push_out_of_gpu_cache(host, random.Random(3))
        disk.set("hang")
        serve_bounded(host, prompts, expected)
        assert host.flexkv_state()["ssd"]["healthy"] is False
        disk.set("ok")
        deadline = time.monotonic() + REQUEST_BOUND_S
        while not (state := host.flexkv_state())["ssd"]["healthy"]:  # recovery probes in the background
            assert time.monotonic() < deadline, state["ssd"]["reason"]
            time.sleep(0.2)
        assert state["ssd"]["recoveries"] == 1
        # Served again: new blocks spill to the SSD and are loaded back from it, tokens identical.
        rng = random.Random(5)
        fresh = [random_prompt(rng, PROMPT_BLOCKS * BLOCK + 7) for _ in range(3)]
        fresh_expected = [c.token_ids for c in reference.generate(fresh, max_tokens=8, one_at_a_time=True)]
        serve_bounded(host, fresh, fresh_expected)
        push_out_of_gpu_cache(host, random.Random(6))
        read_before = host.flexkv_state()["ssd"]["blocks_read"]
        serve_bounded(host, fresh + prompts, fresh_expected + expected)
        state = assert_accounting(host)
        assert state["ssd"]["healthy"] and state["ssd"]["blocks_read"] > read_before


SMALL_SHM_ENGINE = """
import sys
from dynamo_flexkv.devtools.harness import EngineError, EngineHost
from tests.helpers import COMPAT_CONFIG, ENGINE
try:
    EngineHost(sys.argv[1], {**ENGINE, "kv_transfer_config": COMPAT_CONFIG},
               env={"FLEXKV_CPU_CACHE_GB": "0.25"}, start_timeout_s=300).close()
except EngineError as exc:
    print(str(exc).strip().splitlines()[-1])
    sys.exit(3)
"""


def test_undersized_dev_shm_fails_at_start_naming_the_setting(tiny_model):
    script = f"mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && exec {sys.executable} -c \"$0\" \"$1\""
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                             SMALL_SHM_ENGINE, tiny_model], capture_output=True, text=True, timeout=600,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 3, (result.returncode, result.stdout[-2000:], result.stderr[-3000:])
    assert "cpu_cache_gb" in result.stdout and "--shm-size" in result.stdout, result.stdout[-2000:]


def test_two_instances_racing_for_one_pool_name(tiny_model, reference, prompts, expected, tmp_path, clean_shm):
    pinned = {"FLEXKV_SERVER_RECV_PORT": f"ipc://{tmp_path}/flexkv-pinned"}
    with engine(tiny_model, [tmp_path], **pinned) as first:
        serve_bounded(first, prompts[:2], expected[:2])
        with pytest.raises(EngineError, match="already uses the FlexKV cache"):
            engine(tiny_model, [tmp_path], **pinned).close()
        serve_bounded(first, prompts, expected)  # the loser touched nothing of the winner's
        assert_accounting(first)
