"""A complete `TierBackend` in ~60 lines: a process-local dict playing a shared store.

It is the worked example docs/architecture.md ("Adding a tier") points to and the pure-logic
parameter of the contract suite; production tiers live in dynamo_flexkv/storage/. Keyed like a
cluster store (the index's address is ignored), asynchronous like every backend (one I/O thread),
and every value is framed like a cluster store's (a header with namespace, key and checksum,
verified on read: storage/remote/common.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from dynamo_flexkv.storage.backend import IoResult, completed, failed_io
from dynamo_flexkv.storage.remote.common import HEADER_BYTES, Framing


@dataclass
class MemoryStats:
    blocks_written: int = 0
    blocks_read: int = 0


class MemoryTier:
    name = "MEMORY"
    medium = None  # a shared tier this instance cannot see evictions of: not announced
    shared = True
    writable = True  # a write to an unreachable store fails fast as a miss

    def __init__(self, num_slots: int = 64):
        self.num_slots = num_slots
        self.framing: Framing | None = None  # sized by the first pool it sees
        self.values: dict[str, bytes] = {}  # object name (namespace and key) -> header + block bytes
        self.broken = False  # a test's "medium unreachable" switch
        self.stats = MemoryStats()
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(1, thread_name_prefix="memory-tier")
        self._closed = False

    @property
    def healthy(self) -> bool:
        return not self.broken

    @property
    def degraded_reason(self) -> str | None:
        return "medium unreachable" if self.broken else None

    def write(self, pool, pool_slots: Sequence[int], addrs: Sequence[int], keys: Sequence[bytes],
              parents=None, tokens=None) -> Future[IoResult]:
        # parents/tokens are not kept: a shared tier is found by lookups, never recovered
        if self._closed or self.broken:
            return failed_io(len(keys))
        framing = self._framing(pool)

        def put() -> IoResult:  # the index keeps the source slots locked until this is acknowledged
            rows = [pool[s].numpy() for s in pool_slots]
            values = [framing.header(k, row) + row.tobytes() for k, row in zip(keys, rows)]
            with self._lock:
                self.values.update(zip(map(framing.name, keys), values))
                self.stats.blocks_written += len(keys)
            return IoResult([True] * len(keys), sum(row.nbytes for row in rows))
        return self._io.submit(put)

    def read(self, pool, addrs: Sequence[int], pool_slots: Sequence[int], keys: Sequence[bytes]) -> Future[IoResult]:
        if self._closed or self.broken:
            return failed_io(len(keys))
        framing = self._framing(pool)

        def get() -> IoResult:
            ok, moved = [], 0
            for key, slot in zip(keys, pool_slots):
                with self._lock:
                    value = self.values.get(framing.name(key))
                data = None if value is None else np.frombuffer(value, np.uint8, offset=HEADER_BYTES)
                good = data is not None and framing.verify(value, key, data)
                if good:
                    pool[slot].numpy()[:] = data
                    moved += data.nbytes
                ok.append(good)
            self.stats.blocks_read += sum(ok)
            return IoResult(ok, moved)
        return self._io.submit(get)

    def _framing(self, pool) -> Framing:
        if self.framing is None:
            self.framing = Framing({"example": True}, pool.shape[1])
        return self.framing

    def lookup(self, keys: Sequence[bytes]) -> Future[list[bool]]:
        with self._lock:
            framing = self.framing
            return completed([not self.broken and framing is not None and framing.name(k) in self.values
                              for k in keys])

    def recover(self) -> list:
        return []  # the store outlives us; its blocks are found by lookup, not at start-up

    def invalidate(self, addrs: Sequence[int]) -> None:
        pass  # keyed and shared: the store decides what to evict

    def invalidate_all(self) -> None:
        if self.framing is not None:  # the next reset epoch: a new namespace; writes in flight keep theirs
            self.framing = self.framing.after_reset()

    def close(self) -> None:
        self._closed = True
        self._io.shutdown(wait=True)
