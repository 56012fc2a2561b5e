"""The template every cluster-store backend fills in: the tier seam's write/read/lookup, deadlines,
health, background probing, start-up and statistics are written once here.

A backend (mooncake.py, redis.py) subclasses `RemoteTier` and implements five blocking calls, run
on this class's threads, never on the scheduler's:

- `_connect()` joins the store (raises with a one-line reason);
- `_put(rows, headers, slots, names)` stores value i = `headers[slots[i]]` + `rows[slots[i]]` under
  `names[i]`: per-block True (stored, or already there) / False (declined, e.g. the store is full);
- `_get(rows, headers, slots, names, accept)` reads value i into `rows[slots[i]]`: per-block True
  where a value of the right size was found and `accept(i, header, data)` (this class's check of its
  checksum or MAC) passed. A backend that copies values calls `accept` before a byte reaches the
  slot; one that reads zero-copy into the slot (Mooncake) calls it on the bytes it landed there, a
  slot the index never marks valid unless accepted;
- `_exists(names)`: per-name True where the store holds it;
- `_disconnect()` releases the client;
- the classmethod `parse_url(url)` owns the backend's URL grammar (storage/backend.py's
  `parse_store_url` calls it at start-up) and returns the address the constructor is given; its
  text form never holds a password.

A call that finds the store unreachable raises (the tier degrades); `_register(rows, headers)` is
the hook for a store that moves bytes zero-copy from registered memory (Mooncake).

The failure contract of storage/backend.py, for every backend at once:
- every call has a deadline, `remote_timeout_s` from its submission: at the deadline its Future is
  answered with misses, the tier turns unhealthy and a background thread probes the store (one
  existence query every `remote_timeout_s`) until it answers and no late call is still running;
  while unhealthy, calls fail fast as misses;
- a read that ran past its deadline may still write into the pool slots it was given: its result
  carries `unsettled`, and the caller keeps those slots out of use until the call returned. Chosen
  over reading through a bounce buffer, which would copy every block once more on every read, the
  fast path: copying a 2 MiB block took 0.34-0.39 ms on the 2-core test machine (~5 GB/s), a
  quarter of a Mooncake get of it over loopback (1.25-1.5 GB/s, benchmarks/remote.py), and would
  break the tier's >= 0.9 of the raw client; holding slots costs nothing until a store stalls, and
  then only the slots of the calls it stalled;
- a late write reads pool slots that may have been reused: the value it stores then fails its
  checksum on every read (a miss), never a wrong block;
- start-up: the store unreachable (refused, or a frozen master that never answers) is one warning
  line and a degraded tier that connects in the background (`remote_start_degraded`, the
  default), or one error line;
- `close()` is bounded: it waits for the calls in flight (each answered by its deadline) and leaves
  the threads of calls that never return.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from dynamo_flexkv.storage.backend import IoResult, completed, failed_io
from dynamo_flexkv.storage.remote.common import HEADER_BYTES, Framing, RemoteStats, view_blocks
from dynamo_flexkv.storage.remote.deadlines import DeadlineCalls
from dynamo_flexkv.storage.remote.integrity import value_mac

logger = logging.getLogger(__name__)

IO_THREADS = 2  # data calls; lookups have their own thread, so a large write never delays a lookup
PROBE_KEY = b"flexkv-probe"


class RemoteTier:
    name: str  # the index tier's name, e.g. "MOONCAKE"
    medium = None  # the store evicts without telling us: blocks are not announced to the router
    shared = True
    writable = True  # a write to an unreachable store fails fast as a miss

    def __init__(self, address: Any, layout: Mapping[str, Any], slot_bytes: int, settings: Any):
        self.url = str(address)  # what logs and errors show: never a password
        self.num_slots = view_blocks(settings.remote_cache_bytes, slot_bytes)
        self.stats = RemoteStats()
        self.timeout_s = settings.remote_timeout_s
        self._settings = settings
        self._framing = Framing(layout, slot_bytes, value_mac(settings))
        self._headers: dict[int, np.ndarray] = {}  # pool address -> one header per pool row
        self._headers_lock = threading.Lock()
        self._closed = False
        self._healthy = False  # until connected
        self._reason: str | None = "not connected yet"
        self._health = threading.Condition()
        self._first_try = threading.Event()
        slug = self.name.lower()
        self._data = DeadlineCalls(IO_THREADS, f"flexkv-{slug}-io", self.timeout_s, self._expired)
        self._ask = DeadlineCalls(1, f"flexkv-{slug}-lookup", self.timeout_s, self._expired)
        self._prober = threading.Thread(target=self._probe_loop, name=f"flexkv-{slug}-probe", daemon=True)

    # ---- hooks ----------------------------------------------------------------------------

    def _connect(self) -> None:
        raise NotImplementedError

    def _put(self, rows: np.ndarray, headers: np.ndarray, slots: list[int], names: list[str]) -> list[bool]:
        raise NotImplementedError

    def _get(self, rows: np.ndarray, headers: np.ndarray, slots: list[int], names: list[str], accept) -> list[bool]:
        raise NotImplementedError

    def _exists(self, names: list[str]) -> list[bool]:
        raise NotImplementedError

    def _disconnect(self) -> None:
        raise NotImplementedError

    def _register(self, rows: np.ndarray, headers: np.ndarray) -> None:
        """A pool and its headers array, once each, before the first call that moves their bytes."""

    @classmethod
    def parse_url(cls, url: str) -> Any:
        raise NotImplementedError

    @classmethod
    def connect_timeout_s(cls, settings: Any) -> float:
        """How long start-up waits for `_connect` before the tier starts degraded (or fails)."""
        return settings.remote_timeout_s

    # ---- start-up and health --------------------------------------------------------------

    @classmethod
    def open(cls, layout: Mapping[str, Any], slot_bytes: int, settings: Any) -> RemoteTier:
        tier = cls(cls.parse_url(settings.remote_store), layout, slot_bytes, settings)
        tier._prober.start()
        waited = cls.connect_timeout_s(settings)
        if not tier._first_try.wait(waited):
            tier._reason = f"{cls.__name__.removesuffix('Tier')} did not answer within {waited:g}s"
        if not tier.healthy:
            problem = tier._reason
            if not settings.remote_start_degraded:
                tier.close()
                raise ConnectionError(f"remote_store {tier.url}: {problem}; start the store, fix the URL, "
                                      "or set remote_start_degraded to start without it")
            tier.stats.started_degraded = 1
            logger.warning("tier %s: remote_store %s unreachable at start-up (%s): STARTING DEGRADED, every "
                           "lookup is a miss until it answers (retrying every %gs in the background)",
                           tier.name, tier.url, problem, tier.timeout_s)
        logger.info("tier %s: %s, namespace %s, %d blocks in this instance's view, %s%s", tier.name, tier.url,
                    tier._framing.namespace, tier.num_slots, "connected" if tier.healthy else "degraded",
                    ", values MAC'd" if settings.remote_mac_key_file else "")
        return tier

    @property
    def healthy(self) -> bool:
        return self._healthy

    @property
    def degraded_reason(self) -> str | None:
        return None if self._healthy else self._reason

    def _failed(self, reason: str) -> None:
        with self._health:
            news = self._healthy
            self._healthy, self._reason = False, reason
            self._health.notify_all()
        if news:
            logger.error("tier %s: degraded, answering misses, probing every %gs: %s", self.name, self.timeout_s, reason)

    def _expired(self, verb: str) -> None:
        self.stats.timeouts += 1
        self._failed(f"{verb} unanswered after {self.timeout_s:g}s (remote_timeout_s)")

    def _probe_loop(self) -> None:
        """While unhealthy: connect if needed, ask the store one question, every `timeout_s`. Healthy
        again once it answers and no call that ran past its deadline is still running."""
        connected, probe = False, [self._framing.name(PROBE_KEY)]
        while True:
            with self._health:
                while not self._closed and self._healthy:
                    self._health.wait()
                if self._closed:
                    return
            try:
                if not connected:
                    self._connect()
                    connected = True
                self._exists(probe)
            except Exception as exc:  # noqa: BLE001 - whatever the client raises, the store is not there
                self._failed(str(exc) or exc.__class__.__name__)
            else:
                if self._data.overdue == 0 and self._ask.overdue == 0:
                    with self._health:
                        news = not self._healthy and self._reason != "not connected yet"
                        self._healthy, self._reason = True, None
                    if news:
                        logger.warning("tier %s: recovered, serving again", self.name)
            self._first_try.set()
            with self._health:
                if not self._healthy and not self._closed:
                    self._health.wait(self.timeout_s)

    # ---- the seam -------------------------------------------------------------------------

    def write(self, pool, pool_slots: Sequence[int], addrs: Sequence[int], keys: Sequence[bytes],
              parents=None, tokens=None) -> Future[IoResult]:
        # parents/tokens are not kept: a shared tier is found by lookups, never recovered. The framing
        # (namespace) is the one of when the write was submitted: one planned before a reset lands in
        # the namespace of before it.
        return self._submit(self._write_batch, pool, pool_slots, keys, "write_failed_blocks", self._framing)

    def read(self, pool, addrs: Sequence[int], pool_slots: Sequence[int], keys: Sequence[bytes]) -> Future[IoResult]:
        return self._submit(self._read_batch, pool, pool_slots, keys, "read_failed_blocks")

    def lookup(self, keys: Sequence[bytes]) -> Future[list[bool]]:
        if not keys or self._closed or not self._healthy:
            return completed([False] * len(keys))
        count = len(keys)
        return self._ask.submit(self._lookup_batch, list(keys), on_timeout=lambda _: [False] * count)

    def _submit(self, batch, pool, pool_slots: Sequence[int], keys: Sequence[bytes], failed_stat: str,
                *args: Any) -> Future[IoResult]:
        count = len(keys)
        if not keys or self._closed or not self._healthy:
            setattr(self.stats, failed_stat, getattr(self.stats, failed_stat) + count)
            return failed_io(count)
        future = self._data.submit(batch, pool, list(pool_slots), list(keys), *args,
                                   on_timeout=lambda settled: IoResult([False] * count, 0, unsettled=settled))
        future.add_done_callback(lambda f: self._count(f, failed_stat, count))
        return future

    def _count(self, future: Future, failed_stat: str, count: int) -> None:
        """Statistics from what the caller was answered (a late call's outcome is not counted)."""
        result = future.result()
        good = sum(result.ok)
        if failed_stat == "write_failed_blocks":
            self.stats.blocks_written += good
            self.stats.bytes_written += good * self._framing.slot_bytes
        else:
            self.stats.blocks_read += good
            self.stats.bytes_read += good * self._framing.slot_bytes
        setattr(self.stats, failed_stat, getattr(self.stats, failed_stat) + count - good)

    def _rows(self, pool) -> tuple[np.ndarray, np.ndarray]:
        """The pool's rows and its headers array (one per row), registered with the store once."""
        rows = pool.numpy()
        with self._headers_lock:  # the data threads' first calls race to register the pool
            headers = self._headers.get(rows.ctypes.data)
            if headers is None:
                headers = np.zeros((rows.shape[0], HEADER_BYTES), np.uint8)
                self._register(rows, headers)
                self._headers[rows.ctypes.data] = headers
        return rows, headers

    def _write_batch(self, pool, pool_slots: list[int], keys: list[bytes], framing: Framing) -> IoResult:
        try:
            rows, headers = self._rows(pool)
            for key, slot in zip(keys, pool_slots):  # the index keeps these slots locked until answered
                headers[slot] = np.frombuffer(framing.header(key, rows[slot]), np.uint8)
            ok = list(self._put(rows, headers, pool_slots, [framing.name(k) for k in keys]))
        except Exception as exc:  # noqa: BLE001 - any failure of the store is per-block misses
            return self._unreachable("write", len(keys), exc)
        return IoResult(ok, sum(ok) * framing.slot_bytes)

    def _read_batch(self, pool, pool_slots: list[int], keys: list[bytes]) -> IoResult:
        framing = self._framing

        def accept(i: int, header, data) -> bool:
            if framing.verify(header, keys[i], data):
                return True
            self.stats.corrupt_blocks += 1
            logger.warning("tier %s: value of block %s failed verification: a miss", self.name, keys[i].hex()[:16])
            return False

        try:
            rows, headers = self._rows(pool)
            ok = list(self._get(rows, headers, pool_slots, [framing.name(k) for k in keys], accept))
        except Exception as exc:  # noqa: BLE001
            return self._unreachable("read", len(keys), exc)
        return IoResult(ok, sum(ok) * framing.slot_bytes)

    def _lookup_batch(self, keys: list[bytes]) -> list[bool]:
        self.stats.lookups += 1
        try:
            return list(self._exists([self._framing.name(k) for k in keys]))
        except Exception as exc:  # noqa: BLE001
            self._unreachable("lookup", len(keys), exc)
            return [False] * len(keys)

    def _unreachable(self, verb: str, count: int, exc: Exception) -> IoResult:
        self.stats.errors += 1
        logger.warning("tier %s: %s of %d blocks failed: %s", self.name, verb, count, exc)
        self._failed(f"{verb} failed: {exc}")
        return IoResult([False] * count, 0)

    # ---- lifecycle ------------------------------------------------------------------------

    def recover(self) -> list:
        return []  # the store outlives this instance: its blocks are found by lookups

    def invalidate(self, addrs: Sequence[int]) -> None:
        pass  # the store decides what to evict; the index only forgets

    def invalidate_all(self) -> None:
        """A cache reset: move to the next reset epoch's namespace (nothing written before is read)."""
        self._framing = self._framing.after_reset()

    def close(self) -> None:
        if self._closed:
            return
        with self._health:
            self._closed = True
            self._health.notify_all()
        idle = self._ask.close() & self._data.close()
        if not idle:  # a call that never returned may still use the client: leave it to the process's exit
            logger.warning("tier %s: closed with store calls still running; the client is left open", self.name)
            return
        try:
            self._disconnect()
        except Exception:  # noqa: BLE001 - closing is best effort
            logger.exception("tier %s: closing the client failed", self.name)
