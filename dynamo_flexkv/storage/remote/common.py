"""What every keyed, shared tier needs: value framing with a checksum, key namespacing, statistics.

A value is a fixed-size header followed by the block's bytes (one CPU-pool slot). The header names
the layout namespace and the block key and carries the xxh3-64 of the bytes, so a read verifies
that the value is this block of this model/layout and that its bytes are intact: anything else is
a miss. Object names are `flexkv/<namespace>/<key hex>`; the namespace hashes the instance's layout
(model, KV dtype, block size, layers, TP size, block-hash algorithm and seed), so two models or
layouts never collide in one store.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

from dynamo_flexkv.storage.backend import TierIOStats

HEADER_BYTES = 128
MAX_KEY_BYTES = 64
DEFAULT_VIEW_BLOCKS = 1 << 16  # index entries for a store whose capacity is left to the store
_MAGIC = b"FLEXKV\x01\x00"
_FIXED = struct.Struct("<8s8sQQH")  # magic, namespace digest, checksum, data length, key length


def namespace_of(layout: Mapping[str, Any]) -> str:
    return xxhash.xxh3_64_hexdigest(json.dumps(dict(layout), sort_keys=True, default=str).encode())


def view_blocks(capacity_bytes: int, slot_bytes: int) -> int:
    """Addresses of this instance's index view of a store: its quota in blocks, or a default."""
    return max(1, capacity_bytes // slot_bytes) if capacity_bytes > 0 else DEFAULT_VIEW_BLOCKS


@dataclass
class RemoteStats(TierIOStats):
    lookups: int = 0
    errors: int = 0  # failed calls to the store
    timeouts: int = 0  # calls answered as misses at their deadline (remote_timeout_s)
    started_degraded: int = 0  # 1: the store was unreachable when the tier started


class Framing:
    def __init__(self, layout: Mapping[str, Any], slot_bytes: int):
        self.namespace = namespace_of(layout)
        self._digest = bytes.fromhex(self.namespace)
        self.slot_bytes = slot_bytes
        self.value_bytes = HEADER_BYTES + slot_bytes

    def name(self, key: bytes) -> str:
        return f"flexkv/{self.namespace}/{bytes(key).hex()}"

    def header(self, key: bytes, data: np.ndarray) -> bytes:
        key = bytes(key)
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"block keys are limited to {MAX_KEY_BYTES} bytes")
        fixed = _FIXED.pack(_MAGIC, self._digest, xxhash.xxh3_64_intdigest(data), len(data), len(key))
        return (fixed + key).ljust(HEADER_BYTES, b"\0")

    def verify(self, header: bytes | memoryview | np.ndarray, key: bytes, data: np.ndarray) -> bool:
        """The header names this namespace and key, and `data` hashes to its checksum."""
        header = bytes(header[:HEADER_BYTES])
        if len(header) < HEADER_BYTES:
            return False
        magic, digest, checksum, length, key_len = _FIXED.unpack_from(header)
        key = bytes(key)
        return (magic == _MAGIC and digest == self._digest and length == len(data) == self.slot_bytes
                and header[_FIXED.size:_FIXED.size + key_len] == key and key_len == len(key)
                and xxhash.xxh3_64_intdigest(data) == checksum)
