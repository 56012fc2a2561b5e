"""The cluster tier on Redis (or Valkey): `remote_store: redis://host:port[/db]`.

For users who already run one. Each block is one string value (header + bytes, see common.py),
written and read in one pipelined round trip per batch; existence is one pipelined EXISTS per
lookup. Redis owns capacity and eviction (its `maxmemory` and policy): a write it refuses (OOM
under `noeviction`) is a declined put, an evicted value a miss. Threads, deadlines, health and
start-up are the template's (base.py); the socket timeout `remote_timeout_s` also ends a call
the deadline gave up on.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import redis

from dynamo_flexkv.storage.remote.base import RemoteTier

logger = logging.getLogger(__name__)


class RedisTier(RemoteTier):
    name = "REDIS"

    def __init__(self, url: str, layout, slot_bytes: int, settings: Any):
        super().__init__(url, layout, slot_bytes, settings)
        timeout = settings.remote_timeout_s
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def _connect(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise ConnectionError(f"Redis unreachable ({exc})") from None

    def _put(self, rows: np.ndarray, headers: np.ndarray, slots: list[int], names: list[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for name, slot in zip(names, slots):
            pipe.set(name, headers[slot].tobytes() + rows[slot].tobytes())
        replies = pipe.execute(raise_on_error=False)
        ok = [reply is True for reply in replies]
        if not all(ok):
            refused = next(r for r in replies if r is not True)
            logger.warning("tier %s: %d of %d puts declined: %s", self.name, ok.count(False), len(ok), refused)
        return ok

    def _get(self, rows: np.ndarray, headers: np.ndarray, slots: list[int], names: list[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        ok = []
        for slot, value in zip(slots, pipe.execute(raise_on_error=False)):
            good = isinstance(value, bytes) and len(value) == self._framing.value_bytes
            if good:
                headers[slot] = np.frombuffer(value, np.uint8, count=headers.shape[1])
                rows[slot] = np.frombuffer(value, np.uint8, offset=headers.shape[1])
            ok.append(good)
        return ok

    def _exists(self, names: list[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        return [reply == 1 for reply in pipe.execute(raise_on_error=False)]

    def _disconnect(self) -> None:
        self._client.close()
