"""The SSD tier's bytes: block slots in preallocated files, one file per directory.

SSD slot `s` lives in file `s % n_dirs` at index `s // n_dirs`, so consecutive slots stripe across
the directories; the files are named from a hash of the caller's identity (model/layout), and each
header repeats the identity and layout. The on-disk format is in file_format.py, the I/O engines in engines.py. Each
slot has a metadata record: the caller's block key, the xxh3-64 of the block's data, a write sequence,
and optionally the block's parent key and token ids (so a restarted worker can rebuild its chains and
announce what it found on disk; see `recover_blocks`).

Crash safety rests on the data checksum, not on write ordering. A write puts the data in place and
only then the record (key + checksum of the new data). Whatever a crash leaves behind:
- old record + new/torn data: the data does not hash to the old checksum -> a miss at read time;
- new record + old/torn data (the record page reached the disk first): same -> a miss;
- torn record page: the record's own hash fails -> the slot is empty.
So we do not pay a synchronous "invalidate old record" write before each overwrite: the old record is
invalidated in memory at once (reads in this process miss from then on) and its zeroed form reaches
the disk with the next metadata flush. `invalidate()` is lazy the same way: a freed slot whose record
is still on disk after a crash still holds exactly the bytes its key names (keys are content hashes
of the whole prefix, scoped by the identity), so serving it after a restart is correct, not stale.
No fsync is needed for correctness for the same reason; `close()` does one to keep warm restarts warm.

Faults never raise out of the I/O path: a failed block is `ok=False` in its `IoResult`, every future
completes, and the store degrades (`healthy` False, `degraded_reason` set): an I/O error stops writes
(they fail fast without touching the disk); a removed directory or file disables the store.

Every wait is bounded: a batch not finished within `io_timeout_s` (a hung disk, a stuck network
file system) completes as failed and disables the store; `close()` gives up on stuck threads after
the same time. A syscall that returns late must not write into a pool row the caller has reused
since, so reads land in a scratch buffer of the store and are copied into the pool (after checksum
verification) only while their batch is still pending.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dynamo_flexkv.storage.backend import IoResult, RecoveredBlock, TierIOStats
from dynamo_flexkv.storage.private_files import ForeignFileError
from dynamo_flexkv.storage.ssd.batches import (
    Batch,
    BatchCompletion,
    GroupCommit,
    ScratchBuffers,
    as_ints,
    check_slots,
    checked_request,
    max_run_blocks,
    plan_ops,
)
from dynamo_flexkv.storage.ssd.recovery import GiveUp, Recovery
from dynamo_flexkv.storage.ssd.seats import canonical_identity, reclaim_dead_files
from dynamo_flexkv.storage.ssd.engines import FaultInjector, IoOp, make_engine
from dynamo_flexkv.storage.ssd.file_format import ALIGN, MAX_KEY_BYTES, SsdFile, build_header, record_bytes_for, xxh

logger = logging.getLogger(__name__)

DEFAULT_IO_TIMEOUT_S = 20.0


@dataclass
class SsdStats(TierIOStats):
    io_errors: int = 0  # failed syscalls (ops, not blocks)
    recoveries: int = 0  # times the tier came back by itself after a fault


class SsdBlockStore(BatchCompletion):
    """Fixed-size block slots on local disks with per-block checksums and warm restart.

    Slot allocation is the caller's (the index's): it names the SSD slot of every block. All methods
    are thread-safe; `write_blocks` / `read_blocks` return at once with a Future that always completes
    (within `io_timeout_s`). A read writes the caller's pool row only for a block reported ok.
    """

    def __init__(
        self,
        dirs: list[str],
        capacity_bytes: int,
        slot_bytes: int,
        identity: Mapping[str, str | int],
        io_threads: int = 8,
        queue_depth: int = 32,
        *,
        engine: str = "auto",
        io_timeout_s: float = DEFAULT_IO_TIMEOUT_S,
        tokens_per_block: int = 0,
        probe_interval_s: float = 1.0,
        _fault_injector: FaultInjector | None = None,
    ):
        if not dirs:
            raise ValueError("SsdBlockStore needs at least one directory")
        if len({os.path.realpath(d) for d in dirs}) != len(dirs):
            raise ValueError(f"SSD cache directories repeat: {list(dirs)}")
        if slot_bytes <= 0 or slot_bytes % ALIGN:
            raise ValueError(f"slot_bytes must be a positive multiple of {ALIGN}, got {slot_bytes}")
        self.slot_bytes = slot_bytes
        self.num_slots = capacity_bytes // slot_bytes
        if self.num_slots < 1:
            raise ValueError(f"ssd_cache_gb (FLEXKV_SSD_CACHE_GB) = {capacity_bytes / 2**30:.6g} GiB holds "
                             f"no KV block of this model ({slot_bytes} bytes per block): set it to at "
                             f"least {slot_bytes / 2**30:.6g}, or 0 to turn the SSD tier off")
        self.tokens_per_block = tokens_per_block
        self.record_bytes = record_bytes_for(tokens_per_block)
        self.identity, self.identity_hash = canonical_identity(identity)
        self.name = f"ssd[{self.identity_hash[:8]}]"
        self.healthy = True
        self.degraded_reason: str | None = None
        self.stats = SsdStats()
        self._writable = True
        self._disabled = False
        self._closed = False
        self._lock = threading.Lock()  # slot state, stats, health, batch ids
        self._idle = threading.Condition(self._lock)
        self._watch = threading.Condition(self._lock)  # wakes the watchdog
        self._pending: dict[int, Batch] = {}  # batches not yet finalized, by id
        self.io_timeout_s = io_timeout_s
        self._inflight = 0  # batches not yet finalized
        self._next_batch = 1
        self._seq = 1
        self._logged_corrupt: set[int] = set()
        self._faults = 0  # degradations so far: a re-validation that saw a new one does not resume
        self._recovery: Recovery | None = None
        self._inject = _fault_injector
        n = len(dirs)
        self._n = n
        self._keys: list[bytes | None] = [None] * self.num_slots
        self._sums = [0] * self.num_slots
        self._seqs = [0] * self.num_slots
        self._gens = [0] * self.num_slots
        self._parents: list[bytes | None] = [None] * self.num_slots
        self._tokens: list[tuple[int, ...]] = [()] * self.num_slots
        self._files: list[SsdFile] = []
        for d in dirs:
            if not Path(d).is_dir():
                raise ValueError(f"SSD cache directory {d} does not exist")
        file_name = f"flexkv-{self.identity_hash}.ssd"
        try:
            for i, d in enumerate(dirs):
                reclaim_dead_files(d, keep=file_name)
                slots = (self.num_slots - i + n - 1) // n
                header = build_header({
                    "identity": self.identity, "slot_bytes": slot_bytes, "num_slots": self.num_slots,
                    "n_dirs": n, "dir_index": i, "slots_in_file": slots, "record_bytes": self.record_bytes})
                self._files.append(SsdFile(Path(d) / file_name, header, slots, slot_bytes, self.name,
                                           self.record_bytes))
            self._warm_start_or_wipe()
        except (OSError, ForeignFileError) as exc:
            # A bad disk or a planted file must not take the engine down: serve without this tier.
            self._close_files()
            self._keys = [None] * self.num_slots
            self._degrade(f"cannot open the SSD tier: {exc.__class__.__name__}: {exc}", disable=True)
        except BaseException:
            self._close_files()
            raise
        try:
            self._engine = make_engine(engine, io_threads, queue_depth, _fault_injector)
        except BaseException:
            self._close_files()
            raise
        self.engine_name = self._engine.name
        self._records = GroupCommit(self.flush, "flexkv-ssd-meta")
        self._scratch = ScratchBuffers(max_run_blocks(slot_bytes) * slot_bytes)
        self._watchdog = threading.Thread(target=self._watch_batches, name="flexkv-ssd-watchdog", daemon=True)
        self._watchdog.start()
        if self._files:  # a store that could not open its files at start-up stays off
            self._recovery = Recovery(self, probe_interval_s)
            if self._disabled:
                self._recovery.wake()
        n_valid = sum(k is not None for k in self._keys)
        logger.info("%s: %d slots x %d bytes in %s (%s engine, O_DIRECT %s), %d blocks recovered",
                    self.name, self.num_slots, slot_bytes, [str(f.path) for f in self._files],
                    self.engine_name, "on" if all(f.direct for f in self._files) else "off", n_valid)

    def _warm_start_or_wipe(self) -> None:
        """The tier is warm only if every file's header matches this identity and layout; otherwise
        every file is wiped (a partial cache of another layout is never served)."""
        stale = [(f, f.mismatch) for f in self._files if f.mismatch is not None]
        if stale:
            old = [f"{f.path}: {why}" for f, why in stale if why != "new file"]
            if old:
                logger.warning("%s: wiping the SSD tier (%d files), serving nothing from it: %s",
                               self.name, len(self._files), "; ".join(old))
            for f in self._files:
                f.wipe()
                if f.no_space:
                    self._degrade(f.no_space, disable=True)
            return
        n = self._n
        newest: dict[bytes, int] = {}  # key -> its slot with the highest write sequence
        for f in self._files:
            f.load()
            i = self._files.index(f)
            for local, slot, key, dsum, seq, parent, tokens in f.records():
                if slot != local * n + i:
                    f.set_record(local, slot, None)
                    continue
                self._keys[slot], self._sums[slot], self._seqs[slot] = key, dsum, seq
                self._parents[slot], self._tokens[slot] = parent, tokens
                self._seq = max(self._seq, seq + 1)
                other = newest.get(key)
                if other is not None:  # written twice (e.g. by an older release after a reset)
                    older = other if self._seqs[other] < seq else slot
                    self._keys[older] = None
                    self._set_record(older, None)
                    if older == other:
                        newest[key] = slot
                else:
                    newest[key] = slot

    def _locate(self, s: int) -> tuple[SsdFile, int]:
        return self._files[s % self._n], s // self._n

    def _set_record(self, s: int, key: bytes | None, dsum: int = 0, seq: int = 0,
                    parent: bytes | None = None, tokens: tuple[int, ...] = ()) -> None:
        if not self._files:
            return  # disabled at start-up: nothing on disk to update
        f, local = self._locate(s)
        f.set_record(local, s, key, dsum, seq, parent, tokens)

    def _check_files(self) -> bool:
        """False (and the store disabled) when a file or its directory was removed or replaced."""
        if self._disabled:
            return False
        for f in self._files:
            if f.removed():
                self._degrade(f"{f.path} (or its directory) was removed or replaced", disable=True)
                return False
        return True

    # ---------------------------------------------------------------------------------- health
    def _degrade(self, reason: str, disable: bool = False) -> None:
        with self._lock:
            news = self.healthy or (disable and not self._disabled)
            self.healthy = False
            self._writable = False
            if disable:
                self._disabled = True
            if self.degraded_reason is None or disable:
                self.degraded_reason = reason
            self._faults += 1
            recovery = None if self._closed else self._recovery
        if recovery is not None:
            recovery.wake()
        if news:
            logger.error("%s: %s: %s", self.name,
                         "disabled" if disable else "degraded, no more writes", reason)

    def _io_error(self, err: BaseException, where: IoOp | str) -> str:
        if isinstance(where, IoOp):
            where = (f"{'write' if where.write else 'read'} of {where.nbytes} bytes at "
                     f"{where.path}:{where.offset}")
        what = f"{where}: {err.__class__.__name__}: {err}"
        with self._lock:
            self.stats.io_errors += 1
        gone = isinstance(err, OSError) and err.errno in (errno.ENOENT, errno.ESTALE, errno.ENODEV,
                                                          errno.ENXIO, errno.EBADF)
        self._degrade(what, disable=gone)
        return what

    def lift_degradation(self, faults_seen: int) -> None:
        """Serve again (`Recovery` re-validated the files): unless a fault came after `faults_seen`."""
        with self._lock:
            if self._closed:
                raise GiveUp("the store is closing")
            if self._faults != faults_seen:
                raise OSError(errno.EIO, "another fault during re-validation")
            self.healthy = self._writable = True
            self._disabled = False
            self.degraded_reason = None
            self.stats.recoveries += 1

    @property
    def faults(self) -> int:
        return self._faults

    @property
    def writable(self) -> bool:
        """False once a fault stopped writes: plan no spills into this store (they would evict
        readable blocks for writes that fail)."""
        return self._writable and not self._closed

    # ------------------------------------------------------------------------------------- API
    def write_blocks(self, pool, pool_slots: Sequence[int], ssd_slots: Sequence[int],
                     keys: Sequence[bytes], parents: Sequence[bytes | None] | None = None,
                     tokens: Sequence[Sequence[int]] | None = None) -> Future:
        """Copy pool rows `pool_slots` into SSD slots `ssd_slots`, recording `keys` (<= 64 bytes
        each) and, when given, each block's parent key and token ids (at most `tokens_per_block`),
        which `recover_blocks` returns after a restart. A block is readable only after its future
        reports it ok."""
        pool_slots, ssd_slots, rows = checked_request(pool, pool_slots, ssd_slots, self.slot_bytes, self.num_slots)
        keys = [bytes(k) for k in keys]
        n = len(ssd_slots)
        parents = [None if p is None else bytes(p) for p in parents] if parents is not None else [None] * n
        tokens = [tuple(as_ints(t)) for t in tokens] if tokens is not None else [()] * n
        if not len(keys) == len(parents) == len(tokens) == n:
            raise ValueError(f"{len(keys)} keys, {len(parents)} parents, {len(tokens)} token lists "
                             f"for {n} blocks")
        if any(len(k) > MAX_KEY_BYTES for k in keys) or any(p and len(p) > MAX_KEY_BYTES for p in parents):
            raise ValueError(f"block keys are limited to {MAX_KEY_BYTES} bytes")
        if any(len(t) > self.tokens_per_block for t in tokens):
            raise ValueError(f"this store records at most {self.tokens_per_block} tokens per block")
        if len(set(ssd_slots)) != len(ssd_slots):
            raise ValueError("a write batch names the same SSD slot twice")
        if not self._writable or self._closed or not self._check_files():
            return self._fail_fast(n, write=True)
        with self._lock:
            gens = []
            for s in ssd_slots:  # the old contents stop being served now (see module docstring)
                self._keys[s] = None
                self._gens[s] += 1
                gens.append(self._gens[s])
                self._set_record(s, None)
                self._logged_corrupt.discard(s)
        batch = self._new_batch(True, ssd_slots, keys, gens, [0] * n)
        if batch is None:
            return self._fail_fast(n, write=True)
        batch.parents, batch.tokens = parents, tokens
        self._submit(batch, rows, list(range(n)), pool_slots)
        return batch.future

    def read_blocks(self, pool, ssd_slots: Sequence[int], pool_slots: Sequence[int],
                    keys: Sequence[bytes]) -> Future:
        """Copy SSD slots into pool rows; a block is ok only if the slot holds `key` and its data
        matches the checksum written with it."""
        pool_slots, ssd_slots, rows = checked_request(pool, pool_slots, ssd_slots, self.slot_bytes, self.num_slots)
        keys = [bytes(k) for k in keys]
        if len(keys) != len(ssd_slots):
            raise ValueError(f"{len(keys)} keys for {len(ssd_slots)} blocks")
        if len(set(pool_slots)) != len(pool_slots):
            raise ValueError("a read batch names the same pool slot twice")
        n = len(ssd_slots)
        if self._disabled or self._closed or not self._check_files():
            return self._fail_fast(n, write=False)
        todo, sums, gens = [], [0] * n, [0] * n
        with self._lock:
            for i, s in enumerate(ssd_slots):
                if self._keys[s] == keys[i]:
                    todo.append(i)
                    sums[i], gens[i] = self._sums[s], self._gens[s]
        batch = self._new_batch(False, ssd_slots, keys, gens, sums)
        if batch is None:
            return self._fail_fast(n, write=False)
        self._submit(batch, rows, todo, pool_slots)
        return batch.future

    def invalidate(self, ssd_slots: Sequence[int]) -> None:
        """Forget the blocks in these slots (freed or about to be reused). Takes effect at once in
        memory; the zeroed records reach the disk with the next metadata flush (see module doc)."""
        slots = as_ints(ssd_slots)
        check_slots(slots, self.num_slots)
        with self._lock:
            for s in slots:
                self._keys[s] = None
                self._gens[s] += 1
                self._set_record(s, None)

    def invalidate_all(self) -> None:
        """Forget every block (a cache reset: e.g. the model's weights changed, so no stored KV may
        be served again, not even after a restart). The zeroed records reach the disk with the next
        metadata flush, within moments; in-flight writes complete as failed."""
        with self._lock:
            for s in range(self.num_slots):
                if self._keys[s] is not None:
                    self._keys[s] = None
                    self._set_record(s, None)
                self._gens[s] += 1
        self._records.commit()

    def recover(self) -> list[tuple[bytes, int]]:
        """(key, ssd_slot) of every block this store holds, oldest write first — after a warm
        restart, the blocks found on disk. Data is verified lazily, by read_blocks."""
        return [(b.key, b.addr) for b in self.recover_blocks()]

    def recover_blocks(self) -> list[RecoveredBlock]:
        """`recover()` with each block's parent key and tokens as written, oldest write first (so a
        parent written before its child comes first)."""
        with self._lock:
            found = [(self._seqs[s], s) for s, k in enumerate(self._keys) if k is not None]
            found.sort()
            return [RecoveredBlock(self._keys[s], s, self._parents[s], self._tokens[s]) for _, s in found]

    def close(self) -> None:
        """Wait for in-flight batches, persist metadata, release files and threads. Idempotent.
        Bounded: a stuck disk costs a few `io_timeout_s` at most, then its threads are left."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # The watchdog finalizes every batch within io_timeout_s; the margin covers its wake-up.
            self._idle.wait_for(lambda: self._inflight == 0, timeout=self.io_timeout_s + 1)
            self._watch.notify_all()
        probe = None
        if self._recovery is not None:
            self._recovery.stop()
            probe = self._recovery.helper
            if probe is not None:
                probe.join(self.io_timeout_s)  # it may be flushing records: let it finish first
        self._engine.close(self.io_timeout_s)
        self._records.stop(self.io_timeout_s)
        self._watchdog.join(self.io_timeout_s)
        persist = threading.Thread(target=self._persist, name="flexkv-ssd-close", daemon=True)
        persist.start()
        persist.join(self.io_timeout_s)
        if persist.is_alive() or self._records.thread.is_alive() or (probe is not None and probe.is_alive()):
            self._degrade(f"metadata could not be persisted within {self.io_timeout_s:g} s at close",
                          disable=True)
            # A thread is stuck in a syscall on these fds: close them once it returns, if ever.
            threading.Thread(target=self._close_files_after, args=(persist, probe), daemon=True,
                             name="flexkv-ssd-close-later").start()
            return
        self._close_files()

    def _close_files_after(self, persist: threading.Thread, probe: threading.Thread | None) -> None:
        persist.join()
        self._records.thread.join()
        if probe is not None:
            probe.join()
        self._close_files()

    def _persist(self) -> None:
        if self.flush() and not self._disabled:
            for f in self._files:
                try:
                    os.fsync(f.fd)
                except OSError as exc:
                    logger.error("%s: fsync of %s failed: %s", self.name, f.path, exc)

    def __enter__(self) -> SsdBlockStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------------------- internals
    def _close_files(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def _fail_fast(self, n: int, write: bool) -> Future:
        with self._lock:
            if write:
                self.stats.write_failed_blocks += n
            else:
                self.stats.read_failed_blocks += n
        fut: Future = Future()
        fut.set_result(IoResult([False] * n, 0))
        return fut

    def _new_batch(self, write, ssd_slots, keys, gens, sums) -> Batch | None:
        """A registered in-flight batch, or None once close() has begun."""
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        with self._lock:
            if self._closed:
                return None
            bid = self._next_batch
            self._next_batch += 1
            self._inflight += 1
            batch = Batch(bid, write, fut, ssd_slots, keys, gens, sums, [False] * len(ssd_slots), 0,
                           deadline=time.monotonic() + self.io_timeout_s)
            self._pending[bid] = batch
            self._watch.notify()
        return batch

    def _watch_batches(self) -> None:
        """Fail every batch still pending at its deadline, and disable the store: the disk is stuck."""
        while True:
            with self._lock:
                if self._closed and not self._pending:
                    return
                now = time.monotonic()
                expired = [b for b in self._pending.values() if b.deadline <= now]
                if not expired:
                    nxt = min((b.deadline for b in self._pending.values()), default=now + 60)
                    self._watch.wait(timeout=nxt - now)
                    continue
            for batch in expired:
                what = f"{'write' if batch.write else 'read'} batch {batch.id}"
                self._degrade(f"SSD I/O stuck: {what} did not complete within {self.io_timeout_s:g} s",
                              disable=True)
                batch.errors.append(f"timed out after {self.io_timeout_s:g} s")
                self._finalize(batch)

    def _submit(self, batch: Batch, rows: np.ndarray, todo: list[int], pool_slots: list[int]) -> None:
        try:
            ops = plan_ops(batch, rows, todo, pool_slots, self._files, self.slot_bytes,
                           lambda op: self._scratch.lend(op, self.slot_bytes))
            batch.remaining = len(ops)
        except BaseException as exc:  # noqa: BLE001 - a registered batch must always finalize
            logger.exception("%s: batch %d: planning failed", self.name, batch.id)
            batch.errors.append(repr(exc))
            ops = []
        if not ops:
            self._finalize(batch)
            return
        self._engine.submit(ops, self._op_done)  # engines report every op, even when closed

    def _op_done(self, op: IoOp, err: BaseException | None) -> None:
        batch, idx, rows, scratch = op.ctx
        try:
            if err is not None:
                batch.errors.append(self._io_error(err, op))
            elif batch.write:
                for i in idx:
                    batch.ok[i] = True
            else:
                good = [xxh(buf) == batch.sums[i] for i, buf in zip(idx, op.bufs)]
                with batch.lock:
                    if not batch.done:  # a batch given up on never touches the pool again
                        for i, buf, row, ok in zip(idx, op.bufs, rows, good):
                            if ok:
                                row[:] = buf
                                batch.ok[i] = True
                for i, ok in zip(idx, good):
                    if not ok:
                        self._corrupt(batch, i)
        except BaseException as exc:  # noqa: BLE001 - never lose a batch
            logger.exception("%s: batch %d: completion failed", self.name, batch.id)
            batch.errors.append(repr(exc))
            with batch.lock:
                for i in idx:
                    batch.ok[i] = False
        finally:
            if scratch is not None:
                op.bufs = []
                self._scratch.put(scratch)
        with batch.lock:
            batch.remaining -= 1
            last = batch.remaining == 0
        if last:
            self._finalize(batch)

    def _corrupt(self, batch: Batch, i: int) -> None:
        s = batch.ssd_slots[i]
        with self._lock:
            if self._gens[s] != batch.gens[i]:
                return  # overwritten or invalidated while we read it: a plain miss
            self.stats.corrupt_blocks += 1
            self._keys[s] = None
            self._gens[s] += 1
            self._set_record(s, None)
            first = s not in self._logged_corrupt
            self._logged_corrupt.add(s)
        if first:
            f, local = self._locate(s)
            logger.warning("%s: checksum mismatch in slot %d (%s block %d, key %s): treated as a miss",
                           self.name, s, f.path, local, batch.keys[i].hex())

    def flush(self) -> bool:
        """Write all dirty metadata pages now. False (store degraded, one log line) on failure."""
        ok = True
        for f in list(self._files):
            if self._disabled:
                return False
            try:
                f.flush(self._inject)
            except BaseException as exc:  # noqa: BLE001 - reported as degradation
                self._io_error(exc, f"metadata flush of {f.path}")
                ok = False
        return ok
