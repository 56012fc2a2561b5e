"""The tier-backend seam: what a lower tier (SSD, a cluster store, ...) does, and how one is chosen.

Bytes always move between a lower tier and the CPU pool (a `[num_slots, slot_bytes]` uint8 tensor
every process of the instance maps); the GPU is reached only through the pool. The index
(`index/`) decides which blocks go where and names an *address* for each block in each tier: a slot
number the tier's `TierIndex` hands out within `num_slots`. A slot-addressed tier (SSD) stores the
block at that address; a key-addressed tier (a cluster store) may ignore it and use the key.

The failure contract every backend keeps, checked by `tests/unit/test_tier_contract.py`:
- `write`/`read` return at once with a Future that always completes, within a bounded time, with an
  `IoResult`; a failed block is `ok=False` (a miss), never an exception; a read answered before its
  call returned says so (`IoResult.unsettled`): its pool slots are kept out of use until then;
- `read` verifies what it read (key and checksum): a corrupt or foreign value is `ok=False`, and the
  pool slot of a failed block holds garbage;
- a backend that cannot reach its medium degrades (`healthy=False`, `degraded_reason` set) and keeps
  answering misses; `close()` is idempotent.

Backends are opened by scheme through `open_backend`; adding a tier is one module plus one line in
`BACKENDS` (see docs/architecture.md, "Adding a tier"). A backend reached by URL (`remote_store`)
also owns its URL grammar: a classmethod `parse_url(url)` returning its typed settings, which
`parse_store_url` calls by scheme.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

# scheme -> "module:Class"; imported only when a setting names the scheme
BACKENDS = {
    "ssd": "dynamo_flexkv.storage.ssd.tier:SsdTier",
    "redis": "dynamo_flexkv.storage.remote.redis:RedisTier",
    "rediss": "dynamo_flexkv.storage.remote.redis:RedisTier",  # Redis over TLS
    "mooncake": "dynamo_flexkv.storage.remote.mooncake:MooncakeTier",
}


@dataclass
class IoResult:
    ok: list[bool]  # per block, in the order asked; a failed block is a miss
    bytes: int  # bytes moved by the blocks that succeeded
    # Set when the batch was answered at its deadline while its call still runs: a read may still
    # write into the pool slots it was given until this completes, so they must not be reused before.
    unsettled: Future | None = None


@dataclass
class TierIOStats:
    """Counters every tier backend keeps (backends add their own); read by the metrics."""

    blocks_written: int = 0
    blocks_read: int = 0
    bytes_written: int = 0
    bytes_read: int = 0
    write_failed_blocks: int = 0
    read_failed_blocks: int = 0  # every failed read: misses, corruption, errors
    corrupt_blocks: int = 0  # data did not match its checksum (or header)


class RecoveredBlock(NamedTuple):
    """A block a tier kept from an earlier run."""

    key: bytes
    addr: int
    parent: bytes | None  # None: a chain head, or written without its parent
    tokens: tuple[int, ...]  # empty when written without tokens (then it cannot be announced)


@runtime_checkable
class TierBackend(Protocol):
    name: str  # the index tier's name ("SSD", "MOONCAKE", ...): unique in an instance
    medium: str | None  # KV-event medium announced to the router; None: not announced
    shared: bool  # other instances write it too: existence must be asked (`lookup`)
    num_slots: int  # addresses the tier's index may hand out (a capacity or, if shared, a view size)

    @property
    def writable(self) -> bool:
        """False while the tier takes no writes (a disk that failed a write): no spill is planned into
        it, since planning would evict readable blocks there for writes that cannot land."""

    @property
    def healthy(self) -> bool: ...

    @property
    def degraded_reason(self) -> str | None: ...

    @property
    def stats(self) -> Any:
        """A dataclass of counters (blocks and bytes moved, failures), shown by diagnostics."""

    def write(self, pool: torch.Tensor, pool_slots: Sequence[int], addrs: Sequence[int], keys: Sequence[bytes],
              parents: Sequence[bytes | None] | None = None,
              tokens: Sequence[Sequence[int]] | None = None) -> Future[IoResult]:
        """CPU pool rows -> the tier. A block is readable only after its future reports it ok. A tier
        that outlives the process keeps `parents` and `tokens` (empty: unknown) for `recover`."""

    def read(self, pool: torch.Tensor, addrs: Sequence[int], pool_slots: Sequence[int],
             keys: Sequence[bytes]) -> Future[IoResult]:
        """The tier -> CPU pool rows, verified."""

    def lookup(self, keys: Sequence[bytes]) -> Future[list[bool]]:
        """Which keys the tier holds now (shared tiers; never raises, a failure answers False)."""

    def recover(self) -> list[RecoveredBlock]:
        """Blocks kept from an earlier run, oldest write first (a parent before its children)."""

    def invalidate(self, addrs: Sequence[int]) -> None:
        """Forget the blocks at these addresses (the index freed them)."""

    def invalidate_all(self) -> None:
        """A cache reset (e.g. the weights changed): nothing this instance stored may be served again,
        not even after a restart. A shared store moves this instance to its next reset epoch, a new
        namespace (values stay for instances that have not reset); a write submitted before the call
        lands in the namespace of before it."""

    def close(self) -> None:
        """Let in-flight work finish (bounded), release everything. Idempotent."""


def completed(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


def failed_io(count: int) -> Future[IoResult]:
    """A finished Future where every block missed."""
    return completed(IoResult([False] * count, 0))


def backend_scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else url.lower()


class StoreUrlError(ValueError):
    """A `remote_store` URL refused: the message names the setting; `reason` alone is what the start-up
    preflight reports under the setting's name as the user spelled it."""

    def __init__(self, shown_url: str, reason: str):
        self.reason = reason
        super().__init__(f"remote_store={shown_url} is invalid: {reason}")


def _backend_class(scheme: str) -> type:
    module_name, class_name = BACKENDS[scheme].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def parse_store_url(url: str) -> Any:
    """`remote_store`'s URL checked against the backend its scheme names: that backend's typed
    settings (`parse_url`), or a one-line ValueError naming the setting and the allowed forms."""
    from dynamo_flexkv.logs import redact_url

    scheme = backend_scheme(url) if isinstance(url, str) and "://" in url else None
    store_schemes = [s for s in sorted(BACKENDS) if s != "ssd"]  # the SSD tier is not reached by URL
    if scheme not in store_schemes:
        shown = redact_url(url) if isinstance(url, str) else repr(url)
        raise StoreUrlError(shown, "unknown scheme; registered store schemes: "
                            f"{', '.join(s + '://' for s in store_schemes)}")
    return _backend_class(scheme).parse_url(url)


def open_backend(scheme: str, layout: Mapping[str, Any], slot_bytes: int, settings: Any) -> TierBackend:
    """Open the backend registered for ``scheme`` with the instance's layout (what a stored block's
    bytes depend on: model, KV dtype, block size, TP...), its CPU-pool slot size and the settings
    (`FlexKVSettings`). Raises a one-line error when the tier cannot start."""
    if scheme not in BACKENDS:
        raise ValueError(f"no tier backend for scheme {scheme!r}; known: {sorted(BACKENDS)}")
    return _backend_class(scheme).open(layout, slot_bytes, settings)
