"""The SSD tier's I/O engines (vectored syscalls on threads, or io_uring).

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
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

FaultInjector = Callable[["IoOp"], None]
OnDone = Callable[["IoOp", "BaseException | None"], None]


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
