"""The SSD store on a disk that hangs, fails or corrupts (tests/faults/blockfs.py, a real FUSE file
system on the real I/O path): every future completes within the I/O timeout, the store degrades
instead of raising, close() is bounded, and a late or corrupt read never lands in the CPU pool."""

from __future__ import annotations

import os
import threading
import time
import uuid

import pytest
import torch

from dynamo_flexkv.storage.ssd.store import SsdBlockStore
from tests.faults.blockfs import mounted
from tests.helpers import wait_until

SLOT = 16 * 1024
IDENT = {"model": "tiny-llama", "layers": 4}
IO_TIMEOUT_S = 2.0
SLACK_S = 10.0  # scheduling slack on a loaded 2-core machine; the bound under test is IO_TIMEOUT_S


@pytest.fixture
def disk(tmp_path):
    with mounted(tmp_path) as d:
        yield d


@pytest.fixture
def pool():
    path = f"/dev/shm/flexkv-test-faults-{uuid.uuid4().hex}"
    tensor = torch.from_file(path, shared=True, size=8 * SLOT, dtype=torch.uint8).view(8, SLOT)
    tensor[:4].copy_(torch.randint(0, 256, (4, SLOT), dtype=torch.uint8))
    yield tensor
    os.unlink(path)


def keys(slots):
    return [b"k%d" % s for s in slots]


def open_store(disk) -> SsdBlockStore:
    return SsdBlockStore([str(disk.mountpoint)], 8 * SLOT, SLOT, IDENT, io_threads=2,
                         io_timeout_s=IO_TIMEOUT_S)


def io_threads_alive() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("flexkv-ssd-io")]


def test_a_hung_disk_fails_reads_in_bounded_time_and_a_late_read_never_lands(disk, pool):
    st = open_store(disk)
    assert st.write_blocks(pool, range(4), range(4), keys(range(4))).result(SLACK_S).ok == [True] * 4
    pool[4:].fill_(0x5A)  # the rows the stuck read targets: a later block may live there
    disk.set("hang")
    started = time.monotonic()
    result = st.read_blocks(pool, range(4), range(4, 8), keys(range(4))).result(IO_TIMEOUT_S + SLACK_S)
    assert result.ok == [False] * 4 and time.monotonic() - started < IO_TIMEOUT_S + SLACK_S
    assert not st.healthy and "stuck" in st.degraded_reason
    assert st.read_blocks(pool, [0], [4], keys([0])).result(1).ok == [False]  # fails fast now
    started = time.monotonic()
    st.close()  # bounded although a thread is still blocked in the kernel
    assert time.monotonic() - started < 2 * IO_TIMEOUT_S + SLACK_S
    disk.set("ok")  # the disk comes back: the stuck syscall returns, late
    assert wait_until(lambda: not io_threads_alive(), SLACK_S), io_threads_alive()
    assert bool((pool[4:] == 0x5A).all()), "a read given up on wrote into the pool"


def test_a_hung_disk_fails_writes_in_bounded_time(disk, pool):
    st = open_store(disk)
    disk.set("hang")
    result = st.write_blocks(pool, range(4), range(4), keys(range(4))).result(IO_TIMEOUT_S + SLACK_S)
    assert result.ok == [False] * 4 and not st.writable
    st.close()
    disk.set("ok")
    assert wait_until(lambda: not io_threads_alive(), SLACK_S)


def test_eio_reading_the_header_at_start_disables_the_tier(disk, pool):
    with open_store(disk) as st:
        assert st.write_blocks(pool, [0], [0], keys([0])).result(SLACK_S).ok == [True]
    disk.set("eio")
    with open_store(disk) as st:  # used to raise out of the engine's start-up
        assert not st.healthy and "Input/output error" in st.degraded_reason
        assert st.recover() == []
        assert st.read_blocks(pool, [0], [4], keys([0])).result(1).ok == [False]


def test_flipped_bytes_are_a_miss_and_never_reach_the_pool(disk, pool):
    with open_store(disk) as st:
        assert st.write_blocks(pool, range(2), range(2), keys(range(2))).result(SLACK_S).ok == [True] * 2
        pool[4:6].fill_(0x5A)
        disk.set("flip")  # the first byte each read returns is flipped: block 0 of this 2-block read
        assert st.read_blocks(pool, range(2), range(4, 6), keys(range(2))).result(SLACK_S).ok == [False, True]
        assert st.stats.corrupt_blocks == 1 and st.healthy
        assert bool((pool[4] == 0x5A).all()) and torch.equal(pool[5], pool[1])
        disk.set("ok")  # the corrupt block stays a miss; the other one is still served
        assert st.read_blocks(pool, range(2), range(4, 6), keys(range(2))).result(SLACK_S).ok == [False, True]


@pytest.mark.parametrize("fault", ["hang", "eio"])
def test_a_disk_that_recovers_brings_the_tier_back_by_itself(disk, pool, fault):
    st = SsdBlockStore([str(disk.mountpoint)], 8 * SLOT, SLOT, IDENT, io_threads=2,
                       io_timeout_s=IO_TIMEOUT_S, probe_interval_s=0.1)
    try:
        before = pool[:4].clone()
        assert st.write_blocks(pool, range(4), range(4), keys(range(4))).result(SLACK_S).ok == [True] * 4
        disk.set(fault)
        result = st.read_blocks(pool, [0, 1], [4, 5], keys([0, 1])).result(IO_TIMEOUT_S + SLACK_S)
        assert result.ok == [False, False] and not st.healthy
        disk.set("ok")
        assert wait_until(lambda: st.healthy, 2 * IO_TIMEOUT_S + SLACK_S), st.degraded_reason
        assert st.writable and st.stats.recoveries == 1
        # Blocks from before the fault: the ones whose read failed are dropped, the rest verified-good.
        assert sorted(k for k, _ in st.recover()) == keys([2, 3])
        pool[4:].fill_(0x5A)
        result = st.read_blocks(pool, range(4), range(4, 8), keys(range(4))).result(SLACK_S)
        assert result.ok == [False, False, True, True]
        assert bool((pool[4:6] == 0x5A).all()) and torch.equal(pool[6:8], before[2:4])
        # Blocks written after the recovery read back bit-exact.
        pool[:4].copy_(torch.randint(0, 256, (4, SLOT), dtype=torch.uint8))
        assert st.write_blocks(pool, range(4), range(4, 8), keys(range(4, 8))).result(SLACK_S).ok == [True] * 4
        assert st.read_blocks(pool, range(4, 8), range(4, 8), keys(range(4, 8))).result(SLACK_S).ok == [True] * 4
        assert torch.equal(pool[4:8], pool[:4])
    finally:
        st.close()
