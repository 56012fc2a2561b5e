"""The SSD tier's file format (`SsdFile`) and I/O engines (vectored syscalls on threads, or io_uring).

File layout (one file per directory; `SsdBlockStore` in ssd.py stripes block slots over them):

    [0, 4096)             header: magic, format version, JSON (identity, slot_bytes, slot counts), xxh3
    [4096, data_off)      metadata table: one record per block slot of this file
    [data_off, end)       data: slot i of this file at data_off + i * slot_bytes (4 KiB aligned)

A record (format 2) is (magic, key length, flags, data xxh3-64, write sequence, global slot, parent
length, token count, key <= 64 bytes, parent key <= 64 bytes, token ids as uint32), zero padding, and
in its last 8 bytes the xxh3-64 of everything before; it counts only if that hash matches (a torn
record is an empty slot). The parent and the tokens let a restarted worker rebuild the block chains
and announce its disk tier. Records are 256 bytes, or the next power of two that holds a block's
tokens (at most 4096), so no record straddles a page.
The metadata table is kept in memory (page aligned, so it is also an O_DIRECT buffer) and its dirty
4 KiB pages are written back by `SsdFile.flush`.

An engine executes `IoOp`s — one vectored read or write of a run of whole block slots that are
adjacent in one file — and reports each op exactly once through its `on_done(op, error)` callback,
from one of the engine's own threads. An engine never raises into its threads: every exception
(including one from `op.before` or from the fault injector) becomes that op's `error`.

- `ThreadEngine`: `io_threads` threads calling `os.preadv` / `os.pwritev` (the GIL is released for
  the whole syscall, so the threads overlap on the device).
- `UringEngine`: one thread owning an io_uring (the `liburing` binding on PyPI) that keeps up to
  `queue_depth` readv/writev requests in flight. The binding's calls hold the GIL, so the thread never
  blocks inside the binding: it sleeps on an eventfd (os.eventfd_read releases the GIL) that the ring
  signals on every completion and that `submit` signals for new work.

Test seam: `fault_injector(op)` is called on the I/O thread right before each op's syscall; it may
raise `OSError` (e.g. `OSError(errno.EIO, ...)`) to fail that op as if the kernel had.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import json
import logging
import mmap
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import xxhash

from dynamo_flexkv.storage.private_files import open_private

logger = logging.getLogger(__name__)

ALIGN = 4096
MAGIC = b"DFKVSSD\x00"
FORMAT_VERSION = 2
HEADER_BYTES = ALIGN
RECORD_BYTES = 256  # the smallest record; records holding tokens are larger (record_bytes_for)
MAX_KEY_BYTES = 64
RECORD_MAGIC = 0x5244564B
# magic, key_len, flags, data_hash, seq, slot, parent_len, n_tokens, key, parent (164 bytes)
_REC = struct.Struct("<IHHQQQHH64s64s")
_HAS_PARENT = 1
MAX_TOKENS_PER_BLOCK = (ALIGN - _REC.size - 8) // 4


def record_bytes_for(tokens_per_block: int) -> int:
    """Record size for blocks of `tokens_per_block` tokens: a power of two from 256 to 4096."""
    if not 0 <= tokens_per_block <= MAX_TOKENS_PER_BLOCK:
        raise ValueError(f"tokens_per_block must be 0..{MAX_TOKENS_PER_BLOCK}, got {tokens_per_block}")
    size = RECORD_BYTES
    while size < _REC.size + 4 * tokens_per_block + 8:
        size *= 2
    return size
_HDR = struct.Struct("<8sII")  # magic, format version, JSON length
xxh = xxhash.xxh3_64_intdigest
_META_GAP_PAGES = 2

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

FaultInjector = Callable[["IoOp"], None]
OnDone = Callable[["IoOp", "BaseException | None"], None]


class Record(NamedTuple):
    local: int  # index in this file
    slot: int  # global slot
    key: bytes
    data_hash: int
    seq: int
    parent: bytes | None
    tokens: tuple[int, ...]


@dataclass(eq=False)
class IoOp:
    """One vectored transfer: `bufs` (whole slots) to/from `fd` at `offset`, back to back."""

    write: bool
    fd: int
    path: str
    offset: int
    bufs: list[memoryview]
    nbytes: int
    # Runs on the I/O thread before the syscall (the store hashes write data here).
    before: Callable[[], None] | None = None
    # Opaque to the engine: which blocks of which batch this op carries.
    ctx: Any = None
    done_bytes: int = 0


def _advance(bufs: list[memoryview], n: int) -> list[memoryview]:
    """The part of `bufs` left after the first `n` bytes were transferred."""
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:] if n else b)
        n = 0
    return out


def run_sync(op: IoOp) -> None:
    """Perform `op` with plain vectored syscalls, finishing short transfers; raises OSError."""
    bufs, off, left = op.bufs, op.offset, op.nbytes - op.done_bytes
    if op.done_bytes:
        bufs = _advance(bufs, op.done_bytes)
        off += op.done_bytes
    while left > 0:
        n = os.pwritev(op.fd, bufs, off) if op.write else os.preadv(op.fd, bufs, off)
        if n <= 0:
            raise OSError(5, f"short {'write' if op.write else 'read'} ({n} bytes) at {off}", op.path)
        op.done_bytes += n
        left -= n
        off += n
        if left:
            bufs = _advance(bufs, n)


def _report(on_done: OnDone, op: IoOp, err: BaseException | None) -> None:
    try:
        on_done(op, err)
    except BaseException:  # noqa: BLE001 - an engine thread must survive a buggy callback
        logger.exception("ssd io: completion callback failed for %s op at %s:%d",
                         "write" if op.write else "read", op.path, op.offset)


class ThreadEngine:
    name = "threads"

    def __init__(self, io_threads: int, queue_depth: int, fault_injector: FaultInjector | None = None):
        self._inject = fault_injector
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, name=f"flexkv-ssd-io-{i}", daemon=True)
                         for i in range(max(1, min(io_threads, queue_depth)))]
        for t in self._threads:
            t.start()

    def submit(self, ops: list[IoOp], on_done: OnDone) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                for op in ops:
                    self._queue.put((op, on_done))
        if closed:
            for op in ops:
                _report(on_done, op, RuntimeError("SSD I/O engine closed"))

    def _worker(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            op, on_done = item
            err: BaseException | None = None
            try:
                if op.before is not None:
                    op.before()
                if self._inject is not None:
                    self._inject(op)
                run_sync(op)
            except BaseException as exc:  # noqa: BLE001 - reported through on_done
                err = exc
            _report(on_done, op, err)

    def close(self, timeout_s: float | None = None) -> None:
        """Finish every queued op, then stop the threads; a thread stuck in a syscall (a hung
        disk) is given up on after `timeout_s` in all (it is a daemon thread)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._threads:
                self._queue.put(None)
        _join_all(self._threads, timeout_s)


def uring_available() -> tuple[bool, str]:
    """Whether the io_uring engine can run here (binding importable and a ring can be set up)."""
    try:
        import liburing  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"the liburing Python binding is not installed ({exc})"
    if not hasattr(liburing, "io_uring"):
        # liburing >= 2026 is a different (Zig) API whose wheels also die with SIGILL on CPUs
        # without AVX-512: never touch it.
        return False, "liburing's Cython API (liburing==2024.5.3) is required"
    try:
        ring = liburing.io_uring()
        liburing.io_uring_queue_init(8, ring)
        liburing.io_uring_queue_exit(ring)
    except Exception as exc:  # noqa: BLE001
        return False, f"io_uring setup failed: {exc}"
    return True, "ok"


class UringEngine:
    name = "uring"

    def __init__(self, io_threads: int, queue_depth: int, fault_injector: FaultInjector | None = None):
        import liburing as L

        self._L = L
        self._depth = max(1, queue_depth)
        entries = 1
        while entries < self._depth:
            entries *= 2
        self._ring = L.io_uring()
        L.io_uring_queue_init(entries, self._ring)
        self._cqe = L.io_uring_cqe()
        self._efd = os.eventfd(0, os.EFD_CLOEXEC)
        L.io_uring_register_eventfd(self._ring, self._efd)
        self._inject = fault_injector
        self._lock = threading.Lock()
        self._pending: collections.deque[tuple[IoOp, OnDone]] = collections.deque()
        self._inflight: dict[int, tuple[IoOp, OnDone, Any]] = {}
        self._next_id = 1
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="flexkv-ssd-uring", daemon=True)
        self._thread.start()

    def submit(self, ops: list[IoOp], on_done: OnDone) -> None:
        with self._lock:
            if self._stopping:
                stopped = True
            else:
                stopped = False
                self._pending.extend((op, on_done) for op in ops)
        if stopped:
            for op in ops:
                _report(on_done, op, RuntimeError("io_uring engine closed"))
            return
        os.eventfd_write(self._efd, 1)

    def _loop(self) -> None:
        L = self._L
        ring, cqe = self._ring, self._cqe
        try:
            while True:
                os.eventfd_read(self._efd)  # sleeps with the GIL released
                # Reap every completion already posted.
                while L.io_uring_peek_cqe(ring, cqe) == 0:
                    uid, res = cqe.user_data, cqe.res
                    L.io_uring_cqe_seen(ring, cqe)
                    self._complete(uid, res)
                # Fill the ring from the pending queue.
                prepped = 0
                while len(self._inflight) < self._depth:
                    with self._lock:
                        if not self._pending:
                            break
                        op, on_done = self._pending.popleft()
                    if self._prep(op, on_done):
                        prepped += 1
                if prepped:
                    L.io_uring_submit(ring)
                with self._lock:
                    if self._stopping and not self._pending and not self._inflight:
                        return
        except BaseException as exc:  # noqa: BLE001 - fail everything rather than hang callers
            logger.exception("ssd io: io_uring loop failed; failing every queued op")
            with self._lock:
                self._stopping = True
                items = [(op, cb) for op, cb, _ in self._inflight.values()] + list(self._pending)
                self._inflight.clear()
                self._pending.clear()
            for op, cb in items:
                _report(cb, op, exc)

    def _prep(self, op: IoOp, on_done: OnDone) -> bool:
        L = self._L
        try:
            if op.before is not None:
                op.before()
                op.before = None
            if self._inject is not None:
                self._inject(op)
            bufs = _advance(op.bufs, op.done_bytes) if op.done_bytes else op.bufs
            iov = L.iovec(bufs)
            uid = self._next_id
            self._next_id += 1
            sqe = L.io_uring_get_sqe(self._ring)
            if op.write:
                L.io_uring_prep_writev(sqe, op.fd, iov, len(bufs), op.offset + op.done_bytes)
            else:
                L.io_uring_prep_readv(sqe, op.fd, iov, op.offset + op.done_bytes)
            L.io_uring_sqe_set_data64(sqe, uid)
        except BaseException as exc:  # noqa: BLE001
            _report(on_done, op, exc)
            return False
        self._inflight[uid] = (op, on_done, iov)
        return True

    def _complete(self, uid: int, res: int) -> None:
        item = self._inflight.pop(uid, None)
        if item is None:
            return
        op, on_done, _iov = item
        if res < 0:
            _report(on_done, op, OSError(-res, os.strerror(-res), op.path))
            return
        op.done_bytes += res
        if op.done_bytes < op.nbytes:
            # Short transfer (rare with O_DIRECT): finish it synchronously here.
            try:
                if res == 0:
                    raise OSError(5, "short transfer (0 bytes)", op.path)
                run_sync(op)
            except OSError as exc:
                _report(on_done, op, exc)
                return
        _report(on_done, op, None)

    def close(self, timeout_s: float | None = None) -> None:
        with self._lock:
            self._stopping = True
        os.eventfd_write(self._efd, 1)
        if not _join_all([self._thread], timeout_s):
            return  # requests stuck in the kernel: the ring must outlive them, leave it to exit
        try:
            self._L.io_uring_unregister_eventfd(self._ring)
        except Exception:  # noqa: BLE001
            pass
        self._L.io_uring_queue_exit(self._ring)
        os.close(self._efd)


def _join_all(threads: list[threading.Thread], timeout_s: float | None) -> bool:
    """Join `threads` within `timeout_s` in all; False (one log line) if some are still running."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    if stuck:
        logger.error("ssd io: %d I/O thread(s) still stuck in a syscall after %.0f s, left behind: %s",
                     len(stuck), timeout_s, ", ".join(stuck))
    return not stuck


def aligned_buffer(nbytes: int) -> mmap.mmap:
    return mmap.mmap(-1, max(ALIGN, nbytes))  # anonymous mappings are page aligned


def build_header(fields: dict) -> bytes:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    head = _HDR.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    page = head + struct.pack("<Q", xxh(head))
    if len(page) > HEADER_BYTES:
        raise ValueError(f"identity too large for the {HEADER_BYTES}-byte SSD file header")
    return page.ljust(HEADER_BYTES, b"\0")


def _header_mismatch(actual: bytes, expected: bytes) -> str | None:
    if actual == expected:
        return None
    magic, version, n = _HDR.unpack_from(actual)
    if magic != MAGIC:
        return "bad magic (not a dynamo-flexkv SSD file, or a torn header)"
    if version != FORMAT_VERSION:
        return f"format version {version} != {FORMAT_VERSION}"
    end = _HDR.size + n
    if end + 8 > HEADER_BYTES or struct.unpack_from("<Q", actual, end)[0] != xxh(actual[:end]):
        return "header checksum mismatch (corrupt header)"
    try:
        theirs = json.loads(actual[_HDR.size:end])
    except ValueError:
        return "unreadable header"
    mine = json.loads(expected[_HDR.size:_HDR.size + _HDR.unpack_from(expected)[2]])
    return f"header differs in {sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))}"


class SsdFile:
    """One preallocated file of `slots` block slots. Opening it either loads a warm cache (header
    identical to `header`) or wipes it (one log line saying why). `no_space` is set, and the file left
    empty, when preallocation hit ENOSPC/EDQUOT."""

    def __init__(self, path: Path, header: bytes, slots: int, slot_bytes: int, label: str,
                 record_bytes: int = RECORD_BYTES):
        self.path = path
        self.slots = slots
        self.record_bytes = record_bytes
        self.no_space: str | None = None
        meta_bytes = -(-slots * record_bytes // ALIGN) * ALIGN
        self.data_off = HEADER_BYTES + meta_bytes
        size = self.data_off + slots * slot_bytes
        self.direct = True
        try:  # never a link, never another user's file (see private_files.py)
            self.fd, _ = open_private(path, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.direct = False
            self.fd, _ = open_private(path, os.O_RDWR)
            logger.warning("%s: %s refuses O_DIRECT; using buffered I/O for %s", label, path.parent, path)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{path} is in use by another SSD store with the same identity "
                                   "(another engine instance?); give each instance its own identity "
                                   "or directory") from None
            self.ino = os.fstat(self.fd).st_ino
            self.meta = aligned_buffer(meta_bytes)
            self.meta_view = memoryview(self.meta)[:meta_bytes]
            self.flush_lock = threading.Lock()  # orders this file's metadata writes
            self._lock = threading.Lock()  # guards the in-memory table and `dirty`
            self.dirty: set[int] = set()
            self._size = size
            self._header = header
            actual = os.fstat(self.fd).st_size
            self.mismatch: str | None  # None: a warm cache of this exact identity and layout
            if actual == 0:
                self.mismatch = "new file"
            elif actual != size:
                self.mismatch = f"file size {actual} != expected {size} (capacity or layout changed)"
            else:
                self.mismatch = _header_mismatch(self._pread(HEADER_BYTES, 0), header)
        except BaseException:
            os.close(self.fd)
            raise

    def load(self) -> None:
        """Read the metadata table of a warm file into memory."""
        assert self.mismatch is None
        self._pread_into(self.meta_view, HEADER_BYTES)

    def _pread_into(self, view: memoryview, offset: int) -> None:
        if len(view) and os.preadv(self.fd, [view], offset) != len(view):
            raise OSError(errno.EIO, f"short read at {offset}", str(self.path))

    def _pread(self, nbytes: int, offset: int) -> bytes:
        buf = aligned_buffer(nbytes)
        try:
            with memoryview(buf) as whole, whole[:nbytes] as view:
                self._pread_into(view, offset)
            return bytes(buf[:nbytes])
        finally:
            buf.close()

    def wipe(self) -> None:
        """Empty the file and preallocate it afresh; the new header is written last."""
        size, header = self._size, self._header
        self.mismatch = None
        os.ftruncate(self.fd, 0)  # drops every old block and record
        try:
            os.posix_fallocate(self.fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                os.ftruncate(self.fd, 0)
                self.no_space = f"no space to preallocate {size} bytes for {self.path} ({exc})"
                return
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(self.fd, size)  # sparse: a later ENOSPC fails that write and degrades
        buf = aligned_buffer(HEADER_BYTES)
        try:
            buf[:HEADER_BYTES] = header  # written last: a crash before this leaves "bad magic"
            with memoryview(buf) as whole, whole[:HEADER_BYTES] as view:
                os.pwritev(self.fd, [view], 0)
            os.fsync(self.fd)
        finally:
            buf.close()

    def records(self) -> list[Record]:
        """Every valid record of this file; clears the rest (in memory; flushed later)."""
        out = []
        size = self.record_bytes
        table = np.frombuffer(self.meta, dtype=np.uint8, count=self.slots * size)
        magics = table.reshape(self.slots, size)[:, :4].copy().view("<u4").ravel()
        for local in np.nonzero(magics == RECORD_MAGIC)[0].tolist():
            rec = self.meta_view[local * size:(local + 1) * size]
            _, klen, flags, dsum, seq, slot, plen, ntok, key, parent = _REC.unpack_from(rec)
            if (klen > MAX_KEY_BYTES or plen > MAX_KEY_BYTES or _REC.size + 4 * ntok > size - 8
                    or struct.unpack_from("<Q", rec, size - 8)[0] != xxh(rec[:size - 8])):
                rec[:] = bytes(size)  # torn or garbage: the slot is empty
                self.dirty.add(local * size // ALIGN)
                continue
            tokens = struct.unpack_from(f"<{ntok}I", rec, _REC.size)
            out.append(Record(local, slot, key[:klen], dsum, seq,
                              parent[:plen] if flags & _HAS_PARENT else None, tokens))
        return out

    def set_record(self, local: int, slot: int, key: bytes | None, dsum: int = 0, seq: int = 0,
                   parent: bytes | None = None, tokens: tuple[int, ...] = ()) -> None:
        """Update one record in memory (None clears it); it reaches the disk with the next flush."""
        size = self.record_bytes
        off = local * size
        if key is None:
            rec = bytes(size)
        else:
            body = (_REC.pack(RECORD_MAGIC, len(key), 0 if parent is None else _HAS_PARENT, dsum, seq,
                              slot, len(parent or b""), len(tokens), key, parent or b"")
                    + struct.pack(f"<{len(tokens)}I", *tokens)).ljust(size - 8, b"\0")
            rec = body + struct.pack("<Q", xxh(body))
        with self._lock:
            self.meta_view[off:off + size] = rec
            self.dirty.add(off // ALIGN)

    def flush(self, inject: FaultInjector | None = None) -> None:
        """Write the dirty metadata pages (coalesced); raises OSError. Flushes of one file are
        serialized, so the last to land carries the newest image of every page it wrote."""
        with self.flush_lock:
            with self._lock:
                pages = sorted(self.dirty)
                self.dirty.clear()
            try:
                i = 0
                while i < len(pages):
                    j = i
                    while j + 1 < len(pages) and pages[j + 1] - pages[j] <= _META_GAP_PAGES:
                        j += 1  # rewriting a few clean pages beats another random 4 KiB write
                    view = self.meta_view[pages[i] * ALIGN:(pages[j] + 1) * ALIGN]
                    op = IoOp(True, self.fd, str(self.path), HEADER_BYTES + pages[i] * ALIGN, [view], len(view))
                    if inject is not None:
                        inject(op)
                    run_sync(op)
                    i = j + 1
            except BaseException:
                with self._lock:
                    self.dirty.update(pages)
                raise

    def revalidate(self) -> int:
        """After a fault: raise RuntimeError unless this is still our file with our header (OSError
        if the disk fails again); mark dirty
        every metadata page the disk does not hold as last written (the next flush rewrites it from
        memory, which is what this process serves). Returns how many such pages there were."""
        if self.removed():
            raise RuntimeError(f"{self.path} (or its directory) was removed or replaced")
        why = _header_mismatch(self._pread(HEADER_BYTES, 0), self._header)
        if why is not None:
            raise RuntimeError(f"{self.path}: header changed during the fault: {why}")
        disk = aligned_buffer(len(self.meta_view))
        try:
            with memoryview(disk) as whole, whole[:len(self.meta_view)] as view:
                self._pread_into(view, HEADER_BYTES)
                with self._lock:
                    differ = np.frombuffer(view, np.uint8).reshape(-1, ALIGN) != \
                        np.frombuffer(self.meta_view, np.uint8).reshape(-1, ALIGN)
                    stale = set(np.nonzero(differ.any(axis=1))[0].tolist()) - self.dirty
                    self.dirty |= stale
                    del differ
        finally:
            disk.close()
        return len(stale)

    def removed(self) -> bool:
        """True when the file (or its directory) was deleted or replaced under us."""
        try:
            return os.stat(self.path).st_ino != self.ino
        except OSError:
            return True

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.meta_view.release()
        try:
            self.meta.close()
        except BufferError:  # a view is still referenced somewhere (a traceback?): GC frees it
            pass


def make_engine(kind: str, io_threads: int, queue_depth: int,
                fault_injector: FaultInjector | None = None) -> ThreadEngine | UringEngine:
    """`kind`: "threads", "uring", or "auto" (the default engine; see docs/ssd-tier.md)."""
    if kind == "auto":
        kind = DEFAULT_ENGINE
    if kind == "uring":
        ok, why = uring_available()
        if not ok:
            raise RuntimeError(f"io_uring engine unavailable: {why}")
        return UringEngine(io_threads, queue_depth, fault_injector)
    if kind == "threads":
        return ThreadEngine(io_threads, queue_depth, fault_injector)
    raise ValueError(f"unknown SSD I/O engine {kind!r}: use 'threads', 'uring' or 'auto'")


# Chosen from benchmarks/ssd.py; see docs/ssd-tier.md.
DEFAULT_ENGINE = "threads"
