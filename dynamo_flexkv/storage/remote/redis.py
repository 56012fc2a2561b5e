"""The cluster tier on Redis (or Valkey): `remote_store: redis://host:port[/db]`.

For users who already run one. Each block is one string value (header + bytes, see common.py),
written and read in one pipelined round trip per batch on this tier's own threads; existence is
one pipelined EXISTS per lookup. Redis owns capacity and eviction (its `maxmemory` and policy): a
write it refuses (OOM under `noeviction`) is a declined put, an evicted value a miss. Every call
has the socket timeout `remote_timeout_s`; a connection failure degrades the tier to misses and one
call per `remote_timeout_s` probes whether it is back.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import redis

from dynamo_flexkv.storage.backend import IoResult, completed, failed_io
from dynamo_flexkv.storage.remote.common import HEADER_BYTES, Framing, Health, RemoteStats, RemoteTierBase, view_blocks

logger = logging.getLogger(__name__)

IO_THREADS = 2


class RedisTier(RemoteTierBase):
    name = "REDIS"
    medium = None  # Redis evicts without telling us: blocks are not announced to the router

    def __init__(self, client: redis.Redis, url: str, layout: Mapping[str, Any], slot_bytes: int,
                 capacity_bytes: int, retry_s: float):
        self.url = url
        self.num_slots = view_blocks(capacity_bytes, slot_bytes)
        self.stats = RemoteStats()
        self._client = client
        self._framing = Framing(layout, slot_bytes)
        self._health = Health(f"{self.name}[{url}]", retry_s)
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="flexkv-redis-io")
        self._ask = ThreadPoolExecutor(1, thread_name_prefix="flexkv-redis-lookup")  # never behind a put
        self._closed = False

    @classmethod
    def open(cls, layout: Mapping[str, Any], slot_bytes: int, settings: Any) -> RedisTier:
        url = settings.remote_store
        timeout = settings.remote_timeout_s
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        tier = cls(client, url, layout, slot_bytes, settings.remote_cache_bytes, timeout)
        try:
            client.ping()
        except redis.RedisError as exc:
            if not settings.remote_start_degraded:
                tier.close()
                raise ConnectionError(f"remote_store {url}: Redis unreachable ({exc}); start it, fix "
                                      "the URL, or set remote_start_degraded to start without it") from None
            tier._health.failed(f"unreachable at start-up: {exc}")
        logger.info("tier %s: %s, namespace %s, %d blocks in this instance's view", cls.name, url,
                    tier._framing.namespace, tier.num_slots)
        return tier

    def write(self, pool, pool_slots: Sequence[int], addrs: Sequence[int], keys: Sequence[bytes],
              parents=None, tokens=None) -> Future[IoResult]:
        # parents/tokens are not kept: a shared tier is found by lookups, never recovered
        if not self._usable(keys):
            self.stats.write_failed_blocks += len(keys)
            return failed_io(len(keys))
        return self._io.submit(self._put, pool.numpy(), list(pool_slots), list(keys), self._framing)

    def read(self, pool, addrs: Sequence[int], pool_slots: Sequence[int], keys: Sequence[bytes]) -> Future[IoResult]:
        if not self._usable(keys):
            self.stats.read_failed_blocks += len(keys)
            return failed_io(len(keys))
        return self._io.submit(self._get, pool.numpy(), list(pool_slots), list(keys))

    def lookup(self, keys: Sequence[bytes]) -> Future[list[bool]]:
        if not self._usable(keys):
            return completed([False] * len(keys))
        return self._ask.submit(self._exists, list(keys))

    def _usable(self, keys: Sequence[bytes]) -> bool:
        return bool(keys) and not self._closed and self._health.may_try()

    def _put(self, rows: np.ndarray, pool_slots: list[int], keys: list[bytes], framing: Framing) -> IoResult:
        # `framing` is the namespace of when the write was submitted: one planned before a reset lands
        # in the namespace of before it
        pipe = self._client.pipeline(transaction=False)
        for key, slot in zip(keys, pool_slots):
            row = rows[slot]  # locked by the index until this write is acknowledged
            pipe.set(framing.name(key), framing.header(key, row) + row.tobytes())
        replies = self._call(pipe, len(keys))
        ok = [reply is True for reply in replies]
        if not all(ok):
            refused = next(r for r in replies if r is not True)
            logger.warning("tier %s: %d of %d puts declined: %s", self.name, ok.count(False), len(ok), refused)
        written = sum(ok)
        self.stats.blocks_written += written
        self.stats.bytes_written += written * framing.slot_bytes
        self.stats.write_failed_blocks += len(ok) - written
        return IoResult(ok, written * framing.slot_bytes)

    def _get(self, rows: np.ndarray, pool_slots: list[int], keys: list[bytes]) -> IoResult:
        framing = self._framing
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.get(framing.name(key))
        ok = []
        for key, slot, value in zip(keys, pool_slots, self._call(pipe, len(keys))):
            good = isinstance(value, bytes) and len(value) == framing.value_bytes
            if good:
                data = np.frombuffer(value, np.uint8, offset=HEADER_BYTES)
                good = framing.verify(value, key, data)
                if good:
                    rows[slot] = data
                else:
                    self.stats.corrupt_blocks += 1
                    logger.warning("tier %s: value of block %s failed verification: a miss", self.name, key.hex()[:16])
            ok.append(good)
        read = sum(ok)
        self.stats.blocks_read += read
        self.stats.bytes_read += read * framing.slot_bytes
        self.stats.read_failed_blocks += len(ok) - read
        return IoResult(ok, read * framing.slot_bytes)

    def _exists(self, keys: list[bytes]) -> list[bool]:
        self.stats.lookups += 1
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._framing.name(key))
        return [reply == 1 for reply in self._call(pipe, len(keys))]

    def _call(self, pipe, count: int) -> list:
        """Run a pipeline; per-command errors come back as exceptions in the list, a lost
        connection degrades the tier and answers every command with None."""
        try:
            replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            self.stats.errors += 1
            self._health.failed(f"{exc.__class__.__name__}: {exc}")
            return [None] * count
        self._health.succeeded()
        return replies

    def recover(self) -> list:
        return []  # the store outlives this instance: its blocks are found by lookups

    def invalidate(self, addrs: Sequence[int]) -> None:
        pass  # Redis decides what to evict; the index only forgets

    def invalidate_all(self) -> None:
        self._framing = self._framing.after_reset()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ask.shutdown(wait=True)
        self._io.shutdown(wait=True)
        self._client.close()
