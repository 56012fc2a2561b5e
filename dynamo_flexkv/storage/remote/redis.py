"""The cluster tier on Redis (or Valkey): `remote_store: redis[s]://[user:password@]host:port[/db]`.

For users who already run one. Each block is one string value (header + bytes, see common.py),
written and read in one pipelined round trip per batch; existence is one pipelined EXISTS per
lookup. Redis owns capacity and eviction (its `maxmemory` and policy): a write it refuses (OOM
under `noeviction`) is a declined put, an evicted value a miss. Threads, deadlines, health and
start-up are the template's (base.py); the socket timeout `remote_timeout_s` also ends a call
the deadline gave up on.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from dynamo_flexkv.logs import redact_url
from dynamo_flexkv.storage.remote.base import RemoteTier
from dynamo_flexkv.storage.remote.common import HEADER_BYTES
from dynamo_flexkv.storage.remote.urls import TLS_SETTINGS, credentials, split_store_url, url_error

logger = logging.getLogger(__name__)

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


class RedisTier(RemoteTier):
    name = "REDIS"

    def __init__(self, address: RedisAddress, layout, slot_bytes: int, settings: Any):
        tls_given = [name for name in TLS_SETTINGS if getattr(settings, name, None)]
        if tls_given and not address.tls:
            raise ValueError(f"{tls_given[0]} is set but remote_store={address} is not TLS: use rediss://")
        if bool(settings.remote_tls_cert_file) != bool(settings.remote_tls_key_file):
            raise ValueError("remote_tls_cert_file and remote_tls_key_file go together: set both or neither")
        for name in tls_given:  # a missing file would surface as a vague connection error
            if not os.access(getattr(settings, name), os.R_OK):
                raise ValueError(f"{name}={getattr(settings, name)} is invalid: not a readable file; "
                                 "expected a PEM file")
        super().__init__(address, layout, slot_bytes, settings)
        timeout = settings.remote_timeout_s
        tls = dict(ssl=True, ssl_cert_reqs="required", ssl_check_hostname=True,
                   ssl_ca_certs=settings.remote_tls_ca_file, ssl_certfile=settings.remote_tls_cert_file,
                   ssl_keyfile=settings.remote_tls_key_file)
        # One attempt per call: redis-py's default retries with backoff would outlast the call's
        # deadline; the template probes a store that failed (base.py).
        self._client = redis.Redis(host=address.host, port=address.port, db=address.db, username=address.username,
                                   password=address.password, socket_timeout=timeout,
                                   socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                                   **(tls if address.tls else {}))

    @classmethod
    def parse_url(cls, url: str) -> RedisAddress:
        split = split_store_url(url, ("redis", "rediss"), URL_FORM)
        path = split.path.strip("/")
        if path and not path.isdigit():
            raise url_error(url, URL_FORM, f"the Redis db must be a number, got /{path}")
        user, password = credentials(split)
        return RedisAddress(url.strip(), split.hostname, split.port, int(path or 0), split.scheme.lower() == "rediss",
                            user or None, password)

    def _connect(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise ConnectionError(_describe(exc)) from None

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

    def _get(self, rows: np.ndarray, headers: np.ndarray, slots: list[int], names: list[str], accept) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.get(name)
        ok = []
        for i, (slot, value) in enumerate(zip(slots, pipe.execute(raise_on_error=False))):
            good = isinstance(value, bytes) and len(value) == self._framing.value_bytes
            if good:
                data = np.frombuffer(value, np.uint8, offset=HEADER_BYTES)
                good = accept(i, value, data)
                if good:  # verified before a byte reaches the slot
                    rows[slot] = data
            ok.append(good)
        return ok

    def _exists(self, names: list[str]) -> list[bool]:
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        return [reply == 1 for reply in pipe.execute(raise_on_error=False)]

    def _disconnect(self) -> None:
        self._client.close()


def _describe(exc: redis.RedisError) -> str:
    """One line for a failed call, saying which kind of failure (credentials, certificate, network).
    redis-py's messages hold host and port, never the password."""
    kind = ("Redis refused the credentials" if isinstance(exc, redis.AuthenticationError)
            else "Redis unreachable")
    return f"{kind} ({exc.__class__.__name__}: {' '.join(str(exc).split())})"
