"""The SSD tier behind the `TierBackend` seam: an `SsdBlockStore` on this instance's claimed seat.

The store does the work (striped O_DIRECT files, checksums, warm restart, degrading on faults);
this adapter names the tier, claims the files for this instance (see seats.py) and holds that
claim until `close()`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from dynamo_flexkv.storage.backend import IoResult, RecoveredBlock, completed
from dynamo_flexkv.storage.ssd.store import SsdBlockStore
from dynamo_flexkv.storage.ssd.seats import claim_seat
from dynamo_flexkv.storage.ssd.file_format import MAX_TOKENS_PER_BLOCK


class SsdTier:
    name = "SSD"
    medium = "STORAGE"
    shared = False

    def __init__(self, store: SsdBlockStore, seat_lock: int | None = None):
        self.store = store
        self.num_slots = store.num_slots
        self._seat_lock = seat_lock  # keeps this instance's SSD files its own until close()

    @classmethod
    def open(cls, layout: Mapping[str, Any], slot_bytes: int, settings: Any) -> SsdTier:
        seat, seat_lock = claim_seat(settings.ssd_cache_dir[0], layout)
        try:
            store = SsdBlockStore(
                list(settings.ssd_cache_dir),
                settings.ssd_cache_bytes,
                slot_bytes,
                {**layout, "seat": seat},
                io_threads=settings.ssd_io_threads,
                queue_depth=settings.ssd_queue_depth,
                io_timeout_s=settings.ssd_io_timeout_s,
                engine=settings.ssd_io_engine,
                # Tokens are recorded so a restart can announce its blocks; very large blocks go without.
                tokens_per_block=block_size if (block_size := int(layout["block_size"])) <= MAX_TOKENS_PER_BLOCK else 0,
            )
        except BaseException:
            os.close(seat_lock)
            raise
        return cls(store, seat_lock)

    @property
    def healthy(self) -> bool:
        return self.store.healthy

    @property
    def degraded_reason(self) -> str | None:
        return self.store.degraded_reason

    @property
    def writable(self) -> bool:
        return self.store.writable

    @property
    def stats(self):
        return self.store.stats

    def write(self, pool, pool_slots: Sequence[int], addrs: Sequence[int], keys: Sequence[bytes],
              parents: Sequence[bytes | None] | None = None,
              tokens: Sequence[Sequence[int]] | None = None) -> Future[IoResult]:
        return self.store.write_blocks(pool, pool_slots, addrs, keys, parents=parents, tokens=tokens)

    def read(self, pool, addrs: Sequence[int], pool_slots: Sequence[int], keys: Sequence[bytes]) -> Future[IoResult]:
        return self.store.read_blocks(pool, addrs, pool_slots, keys)

    def lookup(self, keys: Sequence[bytes]) -> Future[list[bool]]:
        store = self.store
        if store._disabled or store._closed or not store._check_files():  # nothing can be read back
            return completed([False] * len(keys))
        held = {key for key, _ in store.recover()}
        return completed([bytes(key) in held for key in keys])

    def recover(self) -> list[RecoveredBlock]:
        return self.store.recover_blocks()

    def invalidate(self, addrs: Sequence[int]) -> None:
        self.store.invalidate(addrs)

    def invalidate_all(self) -> None:
        self.store.invalidate_all()

    def close(self) -> None:
        self.store.close()
        if self._seat_lock is not None:
            os.close(self._seat_lock)
            self._seat_lock = None
