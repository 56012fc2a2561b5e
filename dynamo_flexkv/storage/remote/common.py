"""What every keyed, shared tier needs: value framing with a checksum or MAC, key namespacing, statistics.

A value is a fixed-size header followed by the block's bytes (one CPU-pool slot). The header names
the layout namespace and the block key and carries the xxh3-64 of the bytes, so a read verifies
that the value is this block of this model/layout and that its bytes are intact: anything else is
a miss. With a MAC key (integrity.py) the header has another magic, no checksum, and ends in a tag
over the rest of the header and the bytes: a value written without the key, with another key, or
changed afterwards is a miss. Object names are `flexkv/<namespace>/<key hex>`; the namespace
hashes the instance's layout (model, KV dtype, block size, layers, TP size, block-hash algorithm
and seed), so two models or layouts never collide in one store. Each cache reset of the instance
moves it to the next *reset epoch*, folded into the namespace: nothing written before a reset is
read after it.
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
from dynamo_flexkv.storage.remote.integrity import TAG_BYTES, ValueMac

HEADER_BYTES = 128
MAX_KEY_BYTES = 64
DEFAULT_VIEW_BLOCKS = 1 << 16  # index entries for a store whose capacity is left to the store
_MAGIC = b"FLEXKV\x01\x00"
_MAC_MAGIC = b"FLEXKV\x02\x00"  # a MAC'd value: readers without the key reject it, and vice versa
_TAGGED = HEADER_BYTES - TAG_BYTES  # the header bytes a MAC covers (then the block's bytes)
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
    def __init__(self, layout: Mapping[str, Any], slot_bytes: int, mac: ValueMac | None = None,
                 reset_epoch: int = 0):
        self.layout = dict(layout)
        self.reset_epoch = reset_epoch
        self.namespace = namespace_of({**layout, "reset_epoch": reset_epoch} if reset_epoch else layout)
        self._digest = bytes.fromhex(self.namespace)
        self.slot_bytes = slot_bytes
        self.value_bytes = HEADER_BYTES + slot_bytes
        self._mac = mac
        self._magic = _MAGIC if mac is None else _MAC_MAGIC

    def after_reset(self) -> Framing:
        """The framing of the next reset epoch (a new namespace)."""
        return Framing(self.layout, self.slot_bytes, self._mac, self.reset_epoch + 1)

    def name(self, key: bytes) -> str:
        return f"flexkv/{self.namespace}/{bytes(key).hex()}"

    def header(self, key: bytes, data: np.ndarray) -> bytes:
        key = bytes(key)
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"block keys are limited to {MAX_KEY_BYTES} bytes")
        checksum = xxhash.xxh3_64_intdigest(data) if self._mac is None else 0  # the tag covers the bytes
        fixed = _FIXED.pack(self._magic, self._digest, checksum, len(data), len(key))
        if self._mac is None:
            return (fixed + key).ljust(HEADER_BYTES, b"\0")
        covered = (fixed + key).ljust(_TAGGED, b"\0")
        return covered + self._mac.tag(covered, data)

    def verify(self, header: bytes | memoryview | np.ndarray, key: bytes, data: np.ndarray) -> bool:
        """The header names this namespace and key, and `data` hashes to its checksum (or, with a
        MAC key, the header's tag is the tag of the header and `data`)."""
        header = bytes(header[:HEADER_BYTES])
        if len(header) < HEADER_BYTES:
            return False
        magic, digest, checksum, length, key_len = _FIXED.unpack_from(header)
        key = bytes(key)
        if not (magic == self._magic and digest == self._digest and length == len(data) == self.slot_bytes
                and header[_FIXED.size:_FIXED.size + key_len] == key and key_len == len(key)):
            return False
        if self._mac is None:
            return xxhash.xxh3_64_intdigest(data) == checksum
        return self._mac.matches(header[_TAGGED:], header[:_TAGGED], data)

