"""SsdBlockStore: round trips, integrity, warm restart, wipes, faults, concurrency.

Files live under pytest's tmp_path (on /tmp, a real disk with O_DIRECT); CPU pools are mmap'd
/dev/shm files as in production. Nothing here sleeps to synchronise: completion is observed through
the futures (with timeouts, so a hang fails the test instead of blocking it).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import threading
import uuid
from pathlib import Path

import pytest
import torch

from dynamo_flexkv.storage.ssd import engines as ssd_io
from dynamo_flexkv.storage.ssd import file_format
from dynamo_flexkv.storage.ssd.store import IoResult, SsdBlockStore
from dynamo_flexkv.storage.ssd.engines import uring_available
from dynamo_flexkv.storage.ssd.file_format import ALIGN, HEADER_BYTES, RECORD_BYTES
from tests.helpers import wait_until

SLOT = 16 * 1024
TIMEOUT = 30
DATA_OFF = 2 * ALIGN  # header page + one metadata page: where data starts in these small test files
IDENT = {"model": "tiny-llama", "dtype": "bfloat16", "layers": 4, "block_size": 16, "tp_rank": 0, "tp_size": 1}

ENGINES = ["threads", pytest.param("uring", marks=pytest.mark.skipif(
    not uring_available()[0], reason=f"io_uring engine unavailable: {uring_available()[1]}"))]


@pytest.fixture
def make_pool():
    paths = []

    def make(n: int, slot: int = SLOT, fill: bool = True) -> torch.Tensor:
        path = f"/dev/shm/flexkv-test-ssd-{uuid.uuid4().hex}"
        paths.append(path)
        pool = torch.from_file(path, shared=True, size=n * slot, dtype=torch.uint8).view(n, slot)
        if fill:
            pool.copy_(torch.randint(0, 256, (n, slot), dtype=torch.uint8))
        return pool

    yield make
    for p in paths:
        os.unlink(p)


@pytest.fixture
def dirs(tmp_path):
    out = []
    for name in ("nvme0", "nvme1"):
        (tmp_path / name).mkdir()
        out.append(str(tmp_path / name))
    return out


def keys_for(slots, salt=b"k"):
    return [salt + s.to_bytes(8, "little") for s in slots]


def ok_all(fut, n=None) -> IoResult:
    res = fut.result(timeout=TIMEOUT)
    assert res.ok == [True] * (n if n is not None else len(res.ok)), res
    return res


def block_offset(store: SsdBlockStore, s: int) -> tuple[Path, int]:
    f, local = store._locate(s)  # noqa: SLF001 - tests poke at the on-disk bytes
    return f.path, f.data_off + local * store.slot_bytes


def read_raw(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(off)
        return fh.read(n)


def flip_byte(path: Path, off: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(off)
        b = fh.read(1)
        fh.seek(off)
        fh.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("engine", ENGINES)
def test_round_trip_stripes_over_two_dirs(dirs, make_pool, engine):
    n = 24
    pool = make_pool(2 * n)
    with SsdBlockStore(dirs, n * SLOT, SLOT, IDENT, engine=engine) as st:
        assert st.num_slots == n and st.engine_name == engine
        ssd = list(range(n))[::-1]  # reversed: exercises coalescing of non-ascending input
        res = ok_all(st.write_blocks(pool, list(range(n)), ssd, keys_for(ssd)), n)
        assert res.bytes == n * SLOT
        # The blocks really are on disk, alternating between the two files.
        files = set()
        for p, s in enumerate(ssd):
            path, off = block_offset(st, s)
            files.add(path.parent)
            assert read_raw(path, off, SLOT) == pool[p].numpy().tobytes()
        assert files == {Path(d) for d in dirs}
        pool[n:].zero_()
        ok_all(st.read_blocks(pool, ssd, list(range(n, 2 * n)), keys_for(ssd)), n)
        assert torch.equal(pool[n:], pool[:n])
        assert st.stats.blocks_written == n and st.stats.blocks_read == n and st.healthy


def test_checksum_corruption_is_a_counted_logged_miss(dirs, make_pool, caplog):
    pool = make_pool(8)
    st = SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT)
    try:
        ok_all(st.write_blocks(pool, range(4), range(4), keys_for(range(4))))
        path, off = block_offset(st, 2)
        flip_byte(path, off + 1000)
        caplog.set_level(logging.WARNING, logger="dynamo_flexkv.storage.ssd.store")
        res = st.read_blocks(pool, range(4), range(4, 8), keys_for(range(4))).result(TIMEOUT)
        assert res.ok == [True, True, False, True] and res.bytes == 3 * SLOT
        assert st.stats.corrupt_blocks == 1
        assert torch.equal(pool[4], pool[0]) and torch.equal(pool[7], pool[3])
        # A second read of the same block is still a miss, not counted or logged again.
        res = st.read_blocks(pool, [2], [6], keys_for([2])).result(TIMEOUT)
        assert res.ok == [False] and st.stats.corrupt_blocks == 1
        lines = [r for r in caplog.records if "checksum mismatch" in r.getMessage()]
        assert len(lines) == 1 and "slot 2" in lines[0].getMessage()
        assert st.healthy  # corruption of one block is not a device fault
        assert [s for _, s in st.recover()] == [0, 1, 3]
    finally:
        st.close()


def test_wrong_key_is_a_miss_without_io(dirs, make_pool):
    pool = make_pool(4)
    calls = []
    with SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT, _fault_injector=lambda op: calls.append(op.offset)) as st:
        calls_data = lambda: [o for o in calls if o >= DATA_OFF]  # noqa: E731 - flushes run async
        ok_all(st.write_blocks(pool, [0], [0], [b"right"]))
        n_ops = len(calls_data())
        res = st.read_blocks(pool, [0, 1], [2, 3], [b"wrong", b"never-written"]).result(TIMEOUT)
        assert res == IoResult([False, False], 0)
        assert len(calls_data()) == n_ops == 1 and st.stats.corrupt_blocks == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_warm_restart_recovers_keys_in_write_order(dirs, make_pool, engine):
    pool = make_pool(16)
    order = [5, 0, 9, 3, 12, 7]
    with SsdBlockStore(dirs, 14 * SLOT, SLOT, IDENT, engine=engine) as st:
        for p, s in enumerate(order):  # one batch each: write order = seq order
            ok_all(st.write_blocks(pool, [p], [s], keys_for([s])))
        st.invalidate([9])
    with SsdBlockStore(dirs, 14 * SLOT, SLOT, dict(IDENT), engine=engine) as st2:
        got = st2.recover()
        want = [(k, s) for s, k in zip(order, keys_for(order)) if s != 9]
        assert got == want
        slots = [s for _, s in got]
        ok_all(st2.read_blocks(pool, slots, range(8, 8 + len(slots)), [k for k, _ in got]))
        for i, s in enumerate(slots):
            assert torch.equal(pool[8 + i], pool[order.index(s)])


def test_crash_between_data_and_metadata_never_serves_torn_data(dirs, make_pool):
    pool = make_pool(4)
    with SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT) as st:
        ok_all(st.write_blocks(pool, [0, 1], [0, 1], [b"old0", b"old1"]))
        path0, off0 = block_offset(st, 0)
        rec_path, _ = block_offset(st, 1)
    # A "crash" mid-overwrite: new bytes landed on slot 0 but its record still names the old key,
    # and slot 1's record page is torn.
    with open(path0, "r+b") as fh:
        fh.seek(off0)
        fh.write(pool[2].numpy().tobytes()[: SLOT // 2])
    flip_byte(rec_path, HEADER_BYTES + 0 * RECORD_BYTES + 40)  # slot 1 = record 0 of file 1
    with SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT) as st:
        assert st.recover() == [(b"old0", 0)]  # the torn record is gone
        res = st.read_blocks(pool, [0], [3], [b"old0"]).result(TIMEOUT)
        assert res.ok == [False] and st.stats.corrupt_blocks == 1


@pytest.mark.parametrize("change", ["slot_bytes", "capacity", "dir_order", "version", "header", "identity"])
def test_layout_or_identity_mismatch_wipes_the_tier(dirs, make_pool, monkeypatch, caplog, change):
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT) as st:
        ok_all(st.write_blocks(make_pool(8), range(8), range(8), keys_for(range(8))))
        paths = [f.path for f in st._files]  # noqa: SLF001
    args = dict(dirs=dirs, capacity_bytes=8 * SLOT, slot_bytes=SLOT, identity=IDENT)
    if change == "slot_bytes":
        args.update(slot_bytes=2 * SLOT, capacity_bytes=8 * 2 * SLOT)
    elif change == "capacity":
        args.update(capacity_bytes=6 * SLOT)
    elif change == "dir_order":
        args.update(dirs=dirs[::-1])
    elif change == "version":
        monkeypatch.setattr(file_format, "FORMAT_VERSION", file_format.FORMAT_VERSION + 1)
    elif change == "header":
        flip_byte(paths[0], 100)  # one file's header: the whole tier goes
    elif change == "identity":
        # Same file name, other identity inside (as after a name-hash collision): must not be trusted.
        other = SsdBlockStore(dirs, 8 * SLOT, SLOT, {**IDENT, "model": "other"})
        other_paths = [f.path for f in other._files]  # noqa: SLF001
        other.close()
        for mine, theirs in zip(paths, other_paths):
            os.replace(theirs, mine)
    caplog.set_level(logging.WARNING, logger="dynamo_flexkv.storage")
    with SsdBlockStore(**args) as st:
        assert st.recover() == []
        res = st.read_blocks(make_pool(8, args["slot_bytes"]), [0, 1], [0, 1], keys_for([0, 1]))
        assert res.result(TIMEOUT).ok == [False, False]
        assert st.healthy
    wipes = [r.getMessage() for r in caplog.records if "wiping" in r.getMessage()]
    assert len(wipes) == 1, wipes


def test_different_identities_never_share_files(dirs, make_pool):
    pool = make_pool(4)
    a = SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT)
    b = SsdBlockStore(dirs, 4 * SLOT, SLOT, {**IDENT, "tp_rank": 1})
    try:
        assert {f.path for f in a._files}.isdisjoint(f.path for f in b._files)  # noqa: SLF001
        ok_all(a.write_blocks(pool, [0], [0], [b"a"]))
        ok_all(b.write_blocks(pool, [1], [0], [b"b"]))
        ok_all(a.read_blocks(pool, [0], [2], [b"a"]))
        assert torch.equal(pool[2], pool[0])
    finally:
        a.close()
        b.close()
    with pytest.raises(RuntimeError, match="in use"):
        with SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT):
            SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT)


def _small_tmpfs(path: Path, size: str) -> None:
    """Mount a small tmpfs (CI runs as root; a missing right is a failure, not a skip)."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True, timeout=TIMEOUT)


def test_disk_full_at_preallocation_degrades(tmp_path, make_pool):
    mnt = tmp_path / "tiny"
    _small_tmpfs(mnt, "1m")
    try:
        pool = make_pool(4)
        with SsdBlockStore([str(mnt)], 256 * SLOT, SLOT, IDENT) as st:  # 4 MiB > 1 MiB
            assert not st.healthy and "no space" in st.degraded_reason
            assert st.write_blocks(pool, [0], [0], [b"x"]).result(TIMEOUT) == IoResult([False], 0)
            assert st.read_blocks(pool, [0], [1], [b"x"]).result(TIMEOUT) == IoResult([False], 0)
        assert os.statvfs(mnt).f_bfree == os.statvfs(mnt).f_blocks  # the space was given back
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _inject(kind: str, err: int, after_ops: int = 0):
    """Fault injector failing every op of `kind` ("read"/"write") after `after_ops` such ops."""
    calls = {"read": 0, "write": 0}

    def inject(op: ssd_io.IoOp) -> None:
        k = "write" if op.write else "read"
        if op.path.endswith(".probe"):  # recovery's probes fail while the fault lasts, uncounted
            if k == kind and calls[k] > after_ops:
                raise OSError(err, os.strerror(err), op.path)
            return
        if op.offset < DATA_OFF:
            return  # metadata flushes run on their own thread: leave them out of the count
        calls[k] += 1
        if k == kind and calls[k] > after_ops:
            raise OSError(err, os.strerror(err), op.path)

    return inject, calls


@pytest.mark.parametrize("engine", ENGINES)
def test_enospc_on_write_degrades_and_later_writes_fail_fast(dirs, make_pool, engine, caplog):
    pool = make_pool(8)
    inject, calls = _inject("write", errno.ENOSPC, after_ops=1)
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT, engine=engine, _fault_injector=inject) as st:
        ok_all(st.write_blocks(pool, [0], [0], [b"a"]))  # the first data op passes
        res = st.write_blocks(pool, [1, 2, 3], [1, 2, 3], keys_for([1, 2, 3])).result(TIMEOUT)
        assert res.ok == [False, False, False] and res.bytes == 0
        assert not st.healthy and "No space left" in st.degraded_reason
        before = dict(calls)
        res = st.write_blocks(pool, [4], [4], [b"e"]).result(TIMEOUT)
        assert res.ok == [False] and calls == before  # failed fast: no I/O attempted
        ok_all(st.read_blocks(pool, [0], [5], [b"a"]))  # reads keep working
        assert torch.equal(pool[5], pool[0])
        assert st.recover() == [(b"a", 0)]
        assert st.stats.write_failed_blocks == 4
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("write batch" in m and "3/3 blocks failed" in m and "No space" in m for m in errors)
    assert sum("degraded" in m for m in errors) == 1


@pytest.mark.parametrize("engine", ENGINES)
def test_eio_on_read_fails_blocks_and_degrades(dirs, make_pool, engine):
    pool = make_pool(8)
    inject, _ = _inject("read", errno.EIO)
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT, engine=engine, _fault_injector=inject) as st:
        ok_all(st.write_blocks(pool, range(4), range(4), keys_for(range(4))))
        res = st.read_blocks(pool, range(4), range(4, 8), keys_for(range(4))).result(TIMEOUT)
        assert res == IoResult([False] * 4, 0)
        assert not st.healthy and "Input/output error" in st.degraded_reason
        assert st.stats.io_errors >= 1 and st.stats.corrupt_blocks == 0
        assert st.write_blocks(pool, [4], [4], [b"x"]).result(TIMEOUT).ok == [False]


def test_metadata_write_failure_degrades(dirs, make_pool):
    def inject(op):
        if op.write and op.offset < DATA_OFF:
            raise OSError(errno.EIO, "injected", op.path)

    pool = make_pool(4)
    with SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT, _fault_injector=inject) as st:
        # The data landed, so the blocks serve this process; their records could not be persisted.
        ok_all(st.write_blocks(pool, [0, 1], [0, 1], [b"a", b"b"]))
        assert st.flush() is False
        assert not st.healthy and "metadata flush" in st.degraded_reason
        assert "Errno 5" in st.degraded_reason
        assert st.write_blocks(pool, [2], [2], [b"c"]).result(TIMEOUT).ok == [False]
        ok_all(st.read_blocks(pool, [0], [3], [b"a"]))
    with SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT) as st:
        assert st.recover() == []  # nothing half-persisted is advertised after a restart


def test_directory_removed_mid_run_disables_store(dirs, make_pool):
    pool = make_pool(8)
    gate, entered = threading.Event(), threading.Event()

    def inject(op):
        if op.write and op.offset >= DATA_OFF and not gate.is_set():
            entered.set()
            assert gate.wait(TIMEOUT)

    st = SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT, _fault_injector=inject)
    try:
        gate.set()
        ok_all(st.write_blocks(pool, [0, 1], [0, 1], keys_for([0, 1])))
        gate.clear()
        fut = st.write_blocks(pool, [2, 3], [2, 3], keys_for([2, 3]))
        assert entered.wait(TIMEOUT)  # the batch is in flight
        shutil.rmtree(dirs[1])
        gate.set()
        assert fut.result(TIMEOUT).ok == [False, False]
        assert not st.healthy and "removed" in st.degraded_reason
        assert st.read_blocks(pool, [0], [4], keys_for([0])).result(TIMEOUT).ok == [False]
        assert st.write_blocks(pool, [5], [5], [b"z"]).result(TIMEOUT).ok == [False]
    finally:
        st.close()


def test_directory_removed_between_batches(dirs, make_pool):
    pool = make_pool(8)
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT) as st:
        ok_all(st.write_blocks(pool, range(4), range(4), keys_for(range(4))))
        shutil.rmtree(dirs[0])
        res = st.read_blocks(pool, range(4), range(4, 8), keys_for(range(4))).result(TIMEOUT)
        assert res.ok == [False] * 4 and not st.healthy and dirs[0] in st.degraded_reason


@pytest.mark.parametrize("engine", ENGINES)
def test_many_concurrent_batches_all_complete(dirs, make_pool, engine):
    n_threads, per_thread, batch = 8, 12, 6
    n = n_threads * per_thread * batch // 2  # every slot written once, then read back
    pool = make_pool(2 * n)
    errors: list[BaseException] = []
    results: list[IoResult] = []
    lock = threading.Lock()
    with SsdBlockStore(dirs, n * SLOT, SLOT, IDENT, io_threads=4, queue_depth=8, engine=engine) as st:
        def worker(t: int) -> None:
            try:
                futs = []
                base = t * (n // n_threads)
                for b in range(0, n // n_threads, batch):
                    s = list(range(base + b, base + b + batch))
                    futs.append(st.write_blocks(pool, s, s, keys_for(s)))
                for f in futs:
                    assert f.result(TIMEOUT).ok == [True] * batch
                futs = []
                for b in range(0, n // n_threads, batch):
                    s = list(range(base + b, base + b + batch))
                    futs.append(st.read_blocks(pool, s, [n + x for x in s], keys_for(s)))
                with lock:
                    results.extend(f.result(TIMEOUT) for f in futs)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert not any(t.is_alive() for t in threads), "a batch never completed"
        assert not errors, errors
        assert all(r.ok == [True] * batch for r in results) and len(results) == n // batch
        assert torch.equal(pool[n:], pool[:n])


def test_close_releases_fds_and_threads(dirs, make_pool):
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    pool = make_pool(4)
    before_fds, before_threads = fds(), threading.active_count()
    st = SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT)
    futs = [st.write_blocks(pool, [i], [i], [b"%d" % i]) for i in range(4)]
    st.close()  # waits for in-flight batches
    assert all(f.done() for f in futs)
    st.close()
    assert fds() == before_fds and threading.active_count() == before_threads
    assert st.write_blocks(pool, [0], [0], [b"x"]).result(TIMEOUT).ok == [False]


def test_buffered_fallback_when_o_direct_is_refused(dirs, make_pool, monkeypatch, caplog):
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *a)

    monkeypatch.setattr(ssd_io.os, "open", no_direct)
    caplog.set_level(logging.WARNING, logger="dynamo_flexkv.storage")
    pool = make_pool(4)
    with SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT) as st:
        assert not any(f.direct for f in st._files)  # noqa: SLF001
        ok_all(st.write_blocks(pool, [0, 1], [0, 1], [b"a", b"b"]))
        ok_all(st.read_blocks(pool, [0, 1], [2, 3], [b"a", b"b"]))
        assert torch.equal(pool[2:], pool[:2])
    assert sum("refuses O_DIRECT" in r.getMessage() for r in caplog.records) == len(dirs)


def test_argument_errors_raise_at_the_call(dirs, make_pool):
    pool = make_pool(4)
    with SsdBlockStore(dirs, 4 * SLOT, SLOT, IDENT) as st:
        with pytest.raises(ValueError, match="out of range"):
            st.write_blocks(pool, [0], [4], [b"k"])
        with pytest.raises(ValueError, match="64 bytes"):
            st.write_blocks(pool, [0], [0], [b"k" * 65])
        with pytest.raises(ValueError, match="same SSD slot"):
            st.write_blocks(pool, [0, 1], [2, 2], [b"a", b"b"])
        with pytest.raises(ValueError, match="pool must be"):
            st.write_blocks(make_pool(2, 2 * SLOT), [0], [0], [b"k"])
        assert st.write_blocks(pool, [], [], []).result(TIMEOUT) == IoResult([], 0)
    with pytest.raises(ValueError, match="multiple of 4096"):
        SsdBlockStore(dirs, 4 * SLOT, SLOT + 1, IDENT)


def test_invalidate_all_forgets_every_block_across_a_restart(dirs, make_pool):
    """A cache reset (vLLM after a weight update) followed by saving the same blocks again: the next
    start must find each key once, in its new slot, and none of the blocks from before the reset."""
    pool = make_pool(8)
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT) as st:
        ok_all(st.write_blocks(pool, range(4), range(4), keys_for(range(4))))
        st.invalidate_all()
        assert st.recover() == []
        assert st.read_blocks(pool, [0], [5], keys_for([0])).result(TIMEOUT).ok == [False]
        ok_all(st.write_blocks(pool, range(2), [6, 7], keys_for(range(2))))  # saved again elsewhere
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT) as st:
        assert st.recover() == list(zip(keys_for(range(2)), [6, 7]))


def test_a_key_recorded_twice_on_disk_is_recovered_once(dirs, make_pool):
    """Files written by a release without invalidate_all hold duplicates after a reset; the start
    must not fail on them (it used to: 'cannot restore ... at slot N', on every start)."""
    pool = make_pool(8)
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT) as st:
        ok_all(st.write_blocks(pool, [0, 1], [0, 1], [b"dup", b"other"]))
        ok_all(st.write_blocks(pool, [2], [5], [b"dup"]))  # the same key again, newer, elsewhere
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT) as st:
        assert st.recover() == [(b"other", 1), (b"dup", 5)]
        ok_all(st.read_blocks(pool, [5], [6], [b"dup"]))
        assert torch.equal(pool[6], pool[2])
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT) as st:  # the stale record was cleared on disk
        assert st.recover() == [(b"other", 1), (b"dup", 5)]


def test_parents_and_tokens_survive_a_restart(dirs, make_pool):
    """What a restarted worker needs to rebuild chains and announce its disk tier (tokens of a
    128-token block need a 1 KiB record; the store sizes records from tokens_per_block)."""
    pool = make_pool(4)
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    toks = [list(range(i, i + 128)) for i in (0, 1000, 2000)]
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT, tokens_per_block=128) as st:
        assert st.record_bytes == 1024
        ok_all(st.write_blocks(pool, [0, 1], [3, 0], [a, b], parents=[None, a], tokens=toks[:2]))
        ok_all(st.write_blocks(pool, [2], [5], [c], parents=[b], tokens=toks[2:]))
        with pytest.raises(ValueError, match="at most 128 tokens"):
            st.write_blocks(pool, [3], [6], [b"d"], tokens=[list(range(129))])
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT, tokens_per_block=128) as st:
        got = st.recover_blocks()
        assert [(x.key, x.addr, x.parent, list(x.tokens)) for x in got] == [
            (a, 3, None, toks[0]), (b, 0, a, toks[1]), (c, 5, b, toks[2])]
        assert st.recover() == [(a, 3), (b, 0), (c, 5)]
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT, tokens_per_block=16) as st:
        assert st.recover() == []  # another record layout: the tier is wiped, never misread


@pytest.mark.parametrize("engine", ENGINES)
def test_a_disk_that_recovers_brings_the_tier_back(dirs, make_pool, engine, caplog):
    failing = threading.Event()
    probes = []

    def inject(op):
        if op.path.endswith(".probe"):
            probes.append(op.path)
        if failing.is_set() and (op.offset >= DATA_OFF or op.path.endswith(".probe")):
            raise OSError(errno.EIO, "injected", op.path)

    pool = make_pool(12)
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT, engine=engine, probe_interval_s=0.05,
                       _fault_injector=inject) as st:
        ok_all(st.write_blocks(pool, range(4), range(4), keys_for(range(4))))
        failing.set()
        assert st.read_blocks(pool, [0, 1], [8, 9], keys_for([0, 1])).result(TIMEOUT).ok == [False, False]
        assert not st.healthy and not st.writable
        assert wait_until(lambda: len(probes) >= 2, TIMEOUT)  # probing, and failing while the disk fails
        assert not st.healthy and st.write_blocks(pool, [4], [4], [b"x"]).result(TIMEOUT).ok == [False]
        failing.clear()
        assert wait_until(lambda: st.healthy, TIMEOUT)
        assert st.writable and st.degraded_reason is None and st.stats.recoveries == 1
        # Blocks whose read failed were dropped; the others are still served, verified.
        assert [k for k, _ in st.recover()] == keys_for([2, 3])
        res = st.read_blocks(pool, range(4), range(8, 12), keys_for(range(4))).result(TIMEOUT)
        assert res.ok == [False, False, True, True]
        assert torch.equal(pool[10:12], pool[2:4])
        # New writes land and read back bit-exact.
        ok_all(st.write_blocks(pool, [4, 5], [4, 5], keys_for([4, 5])))
        ok_all(st.read_blocks(pool, [4, 5], [8, 9], keys_for([4, 5])))
        assert torch.equal(pool[8:10], pool[4:6])
    with SsdBlockStore(dirs, 8 * SLOT, SLOT, IDENT) as st:  # what a restart finds matches what was served
        assert sorted(k for k, _ in st.recover()) == keys_for([2, 3, 4, 5])
    assert any("recovered after" in r.getMessage() for r in caplog.records)
    assert not [p for d in dirs for p in os.listdir(d) if p.endswith(".probe")]  # probes leave nothing
