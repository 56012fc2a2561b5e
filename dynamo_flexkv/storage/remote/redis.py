"""The cluster tier on Redis (or Valkey): `remote_store: redis[s]://[user:password@]host:port[/db]`.

For users who already run one. Each block is one string value (header + bytes, see common.py),
written and read in one pipelined round trip per batch on this tier's own threads; existence is
one pipelined EXISTS per lookup. Redis owns capacity and eviction (its `maxmemory` and policy): a
write it refuses (OOM under `noeviction`) is a declined put, an evicted value a miss. Every call
has the socket timeout `remote_timeout_s`; a connection failure degrades the tier to misses and one
call per `remote_timeout_s` probes whether it is back.

Security: `rediss://` is TLS (server certificate and host name verified against
`remote_tls_ca_file` or the system CAs; a client certificate from `remote_tls_cert_file`/`_key_file`
where the server asks for one); `user:password@` authenticates as a Redis ACL user (the password
alone: the `default` user). The password is never shown: logs, errors and the tier's name carry
the URL with `***` in its place. A read value is verified (checksum or MAC) in the bytes Redis
returned, before it is copied into its pool slot.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis

from dynamo_flexkv.logs import redact_url
from dynamo_flexkv.storage.backend import IoResult, completed, failed_io
from dynamo_flexkv.storage.remote.common import HEADER_BYTES, Framing, Health, RemoteStats, RemoteTierBase, view_blocks
from dynamo_flexkv.storage.remote.integrity import value_mac
from dynamo_flexkv.storage.remote.urls import TLS_SETTINGS, credentials, split_store_url, url_error

logger = logging.getLogger(__name__)

IO_THREADS = 2
URL_FORM = "redis://[user:password@]host:port[/db] or rediss://... (TLS)"


@dataclass(frozen=True)
class RedisAddress:
    """A parsed `remote_store` for Redis. Its text form (`str`, `repr`) never holds the password."""

    url: str = field(repr=False)
    host: str
    port: int
    db: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return redact_url(self.url)


class RedisTier(RemoteTierBase):
    name = "REDIS"
    medium = None  # Redis evicts without telling us: blocks are not announced to the router

    def __init__(self, client: redis.Redis, address: RedisAddress, layout: Mapping[str, Any], slot_bytes: int,
                 capacity_bytes: int, retry_s: float, mac=None):
        self.url = str(address)  # redacted: the password stays in the client only
        self.num_slots = view_blocks(capacity_bytes, slot_bytes)
        self.stats = RemoteStats()
        self._client = client
        self._framing = Framing(layout, slot_bytes, mac)
        self._health = Health(f"{self.name}[{self.url}]", retry_s)
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="flexkv-redis-io")
        self._ask = ThreadPoolExecutor(1, thread_name_prefix="flexkv-redis-lookup")  # never behind a put
        self._closed = False

    @classmethod
    def parse_url(cls, url: str) -> RedisAddress:
        split = split_store_url(url, ("redis", "rediss"), URL_FORM)
        path = split.path.strip("/")
        if path and not path.isdigit():
            raise url_error(url, URL_FORM, f"the Redis db must be a number, got /{path}")
        user, password = credentials(split)
        return RedisAddress(url.strip(), split.hostname, split.port, int(path or 0), split.scheme.lower() == "rediss",
                            user or None, password)

    @classmethod
    def open(cls, layout: Mapping[str, Any], slot_bytes: int, settings: Any) -> RedisTier:
        address = cls.parse_url(settings.remote_store)
        tls_given = [name for name in TLS_SETTINGS if getattr(settings, name, None)]
        if tls_given and not address.tls:
            raise ValueError(f"{tls_given[0]} is set but remote_store={address} is not TLS: use rediss://")
        if bool(settings.remote_tls_cert_file) != bool(settings.remote_tls_key_file):
            raise ValueError("remote_tls_cert_file and remote_tls_key_file go together: set both or neither")
        for name in tls_given:  # a missing file would surface as a vague connection error
            if not os.access(getattr(settings, name), os.R_OK):
                raise ValueError(f"{name}={getattr(settings, name)} is invalid: not a readable file; "
                                 "expected a PEM file")
        timeout = settings.remote_timeout_s
        tls = dict(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True,
                   ssl_ca_certs=settings.remote_tls_ca_file, ssl_certfile=settings.remote_tls_cert_file,
                   ssl_keyfile=settings.remote_tls_key_file)
        client = redis.Redis(host=address.host, port=address.port, db=address.db, username=address.username,
                             password=address.password, socket_timeout=timeout, socket_connect_timeout=timeout,
                             **(tls if address.tls else {}))
        tier = cls(client, address, layout, slot_bytes, settings.remote_cache_bytes, timeout, value_mac(settings))
        try:
            client.ping()
        except redis.RedisError as exc:
            problem = _describe(exc)
            if not settings.remote_start_degraded:
                tier.close()
                raise ConnectionError(f"remote_store {address}: {problem}; start it, fix the URL, credentials or "
                                      "certificates, or set remote_start_degraded to start without it") from None
            tier._health.failed(f"unreachable at start-up: {problem}")
        logger.info("tier %s: %s, namespace %s, %d blocks in this instance's view%s%s", cls.name, address,
                    tier._framing.namespace, tier.num_slots, ", TLS" if address.tls else "",
                    ", values MAC'd" if settings.remote_mac_key_file else "")
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
            self._health.failed(_describe(exc))
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


def _describe(exc: redis.RedisError) -> str:
    """One line for a failed call, saying which kind of failure (credentials, certificate, network).
    redis-py's messages hold host and port, never the password."""
    kind = ("Redis refused the credentials" if isinstance(exc, redis.AuthenticationError)
            else "Redis unreachable")
    return f"{kind} ({exc.__class__.__name__}: {' '.join(str(exc).split())})"
