"""The SSD store's batches (`store.py`): a batch's bookkeeping, how its blocks become vectored ops, the
scratch buffers reads land in, the checks of a request's arguments (raw offsets follow from them), and
the group commit that persists the records of finished writes, and a batch's end (`BatchCompletion`:
counted, its records published, its future answered)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from dynamo_flexkv.storage.backend import IoResult
from dynamo_flexkv.storage.ssd.engines import IOV_MAX, IoOp
from dynamo_flexkv.storage.ssd.file_format import ALIGN, SsdFile, aligned_buffer, xxh

logger = logging.getLogger(__name__)

MAX_OP_BYTES = 8 << 20  # bytes per vectored syscall (adjacent slots are coalesced up to this)
RECORD_FLUSH_DELAY_S = 0.05  # group-commit window of the record flusher


def as_ints(seq: Sequence[int]) -> list[int]:
    tolist = getattr(seq, "tolist", None)
    return [int(x) for x in (tolist() if tolist is not None else seq)]


@dataclass(eq=False)
class Batch:
    id: int
    write: bool
    future: Future
    ssd_slots: list[int]
    keys: list[bytes]
    gens: list[int]
    sums: list[int]
    ok: list[bool]
    remaining: int
    parents: list[bytes | None] = field(default_factory=list)
    tokens: list[tuple[int, ...]] = field(default_factory=list)
    deadline: float = 0.0
    done: bool = False  # finalized (completed, or given up on by the watchdog): ignore late ops
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ScratchBuffers:
    """Page-aligned read buffers of one op's size, reused; at most one per op in flight."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._free: list = []
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._free:
                return self._free.pop()
        return aligned_buffer(self.nbytes)

    def put(self, buf) -> None:
        with self._lock:
            self._free.append(buf)

    def lend(self, op: IoOp, slot_bytes: int) -> None:
        """Point a read at a scratch buffer (on the I/O thread, right before its syscall); the op
        completion puts it back."""
        buf = self.get()
        op.ctx[3] = buf
        view = memoryview(buf)
        op.bufs = [view[k * slot_bytes:(k + 1) * slot_bytes] for k in range(len(op.ctx[1]))]


def max_run_blocks(slot_bytes: int) -> int:
    """Most blocks one vectored op moves."""
    return max(1, min(IOV_MAX, MAX_OP_BYTES // slot_bytes))


def check_slots(slots: list[int], num_slots: int) -> None:
    bad = [s for s in slots if not 0 <= s < num_slots]
    if bad:
        raise ValueError(f"SSD slots out of range [0, {num_slots}): {bad[:8]}")


def checked_request(pool, pool_slots: Sequence[int], ssd_slots: Sequence[int], slot_bytes: int,
                    num_slots: int) -> tuple[list[int], list[int], np.ndarray]:
    """`(pool_slots, ssd_slots, pool rows)` of a read or write, validated."""
    arr = pool if isinstance(pool, np.ndarray) else pool.numpy()
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] != slot_bytes or not arr.flags.c_contiguous:
        raise ValueError(f"pool must be a contiguous uint8 [num_slots, {slot_bytes}] array, "
                         f"got {arr.dtype} {tuple(arr.shape)}")
    if arr.ctypes.data % ALIGN:
        raise ValueError(f"pool memory must be {ALIGN}-byte aligned for O_DIRECT (use an mmap)")
    pool_slots, ssd_slots = as_ints(pool_slots), as_ints(ssd_slots)
    if len(pool_slots) != len(ssd_slots):
        raise ValueError(f"{len(pool_slots)} pool slots for {len(ssd_slots)} SSD slots")
    check_slots(ssd_slots, num_slots)
    bad = [p for p in pool_slots if not 0 <= p < arr.shape[0]]
    if bad:
        raise ValueError(f"pool slots out of range [0, {arr.shape[0]}): {bad[:8]}")
    return pool_slots, ssd_slots, arr


def plan_ops(batch: Batch, rows: np.ndarray, todo: list[int], pool_slots: list[int], files: Sequence[SsdFile],
             slot_bytes: int, before_read: Callable[[IoOp], None]) -> list[IoOp]:
    """Coalesce blocks adjacent on disk into vectored ops (at most MAX_OP_BYTES each). SSD slot `s` is
    block `s // len(files)` of file `s % len(files)`. A write hashes its blocks right before its
    syscall; a read calls `before_read` (which points it at a scratch buffer) there."""
    stripe = len(files)
    order = sorted(todo, key=lambda i: (batch.ssd_slots[i] % stripe, batch.ssd_slots[i]))
    max_run = max_run_blocks(slot_bytes)
    ops: list[IoOp] = []
    run: list[int] = []

    def flush() -> None:
        s = batch.ssd_slots[run[0]]
        f, local = files[s % stripe], s // stripe
        bufs = [memoryview(rows[pool_slots[i]]) for i in run]
        # ctx: the batch, its block indices, the pool rows, the scratch buffer of a read
        op = IoOp(batch.write, f.fd, str(f.path), f.data_off + local * slot_bytes, bufs,
                  len(run) * slot_bytes, ctx=[batch, list(run), bufs, None])
        op.before = (lambda op=op: _hash_op(op)) if batch.write else (lambda op=op: before_read(op))
        ops.append(op)

    for i in order:
        if run and (batch.ssd_slots[i] != batch.ssd_slots[run[-1]] + stripe or len(run) >= max_run):
            flush()
            run = []
        run.append(i)
    if run:
        flush()
    return ops


def _hash_op(op: IoOp) -> None:
    batch, idx = op.ctx[0], op.ctx[1]
    for i, buf in zip(idx, op.bufs):
        batch.sums[i] = xxh(buf)


class GroupCommit:
    """Runs `flush` (write every dirty record page) on its own thread once records were committed,
    batching all the commits that arrived while the previous flush ran. A block is readable (in this
    process) as soon as its write completes; its record reaches the disk here, shortly after."""

    def __init__(self, flush: Callable[[], object], name: str):
        self._flush = flush
        self._cv = threading.Condition()
        self._pending = False
        self._stop = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def commit(self) -> None:
        with self._cv:
            self._pending = True
            self._cv.notify()

    def stop(self, timeout_s: float) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self.thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._stop)
                # Let commits gather for a moment: with scattered slots every commit dirties its
                # own 4 KiB page, and one flush per batch would add a random write per block.
                self._cv.wait_for(lambda: self._stop, timeout=RECORD_FLUSH_DELAY_S)
                if self._stop:
                    return
                self._pending = False
            self._flush()


class BatchCompletion:
    """The end of a batch's life in `SsdBlockStore` (mixed into it; uses its slots, records, stats and
    lock): counted, a write's records published, the future answered once."""

    def _finalize(self, batch: Batch) -> None:
        """Complete the batch's future, once: when its last op reports, or at its deadline."""
        with batch.lock:
            if batch.done:
                return
            batch.done = True
        try:
            if batch.write:
                self._commit_write(batch)
        except BaseException as exc:  # noqa: BLE001
            logger.exception("%s: batch %d: finalize failed", self.name, batch.id)
            batch.errors.append(repr(exc))
            batch.ok = [False] * len(batch.ok)
        n_ok = sum(batch.ok)
        n_bad = len(batch.ok) - n_ok
        with self._lock:
            if batch.errors and not batch.write:
                self._drop_unread(batch)
            st = self.stats
            if batch.write:
                st.blocks_written += n_ok
                st.bytes_written += n_ok * self.slot_bytes
                st.write_failed_blocks += n_bad
            else:
                st.blocks_read += n_ok
                st.bytes_read += n_ok * self.slot_bytes
                st.read_failed_blocks += n_bad
        if batch.errors:
            logger.error("%s: %s batch %d: %d/%d blocks failed: %s", self.name,
                         "write" if batch.write else "read", batch.id, n_bad, len(batch.ok),
                         "; ".join(batch.errors[:3]))
        batch.future.set_result(IoResult(batch.ok, n_ok * self.slot_bytes))
        with self._lock:
            self._pending.pop(batch.id, None)
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def _drop_unread(self, batch: Batch) -> None:
        """A block the disk failed (or hung) to read may be damaged: forget it (the caller's index
        drops it too, as for every failed read). Holds the lock."""
        for i, s in enumerate(batch.ssd_slots):
            if not batch.ok[i] and self._keys[s] == batch.keys[i] and self._gens[s] == batch.gens[i]:
                self._keys[s] = None
                self._gens[s] += 1
                self._set_record(s, None)

    def _commit_write(self, batch: Batch) -> None:
        """Data is on disk: publish the records in memory; the flusher persists them."""
        if not self._check_files():
            batch.errors.append(self.degraded_reason or "store disabled")
            batch.ok = [False] * len(batch.ok)
            return
        with self._lock:
            for i, s in enumerate(batch.ssd_slots):
                if not batch.ok[i]:
                    continue
                if self._gens[s] != batch.gens[i]:
                    batch.ok[i] = False  # superseded by a later write/invalidate of this slot
                    continue
                seq = self._seq
                self._seq += 1
                self._keys[s], self._sums[s], self._seqs[s] = batch.keys[i], batch.sums[i], seq
                self._parents[s], self._tokens[s] = batch.parents[i], batch.tokens[i]
                self._set_record(s, batch.keys[i], batch.sums[i], seq, batch.parents[i], batch.tokens[i])
        self._records.commit()
