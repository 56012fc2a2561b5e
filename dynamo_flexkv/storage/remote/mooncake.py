"""The cluster tier on Mooncake Store: `remote_store: mooncake://MASTER:PORT`.

Every instance joins the store as a client of its master and contributes `remote_cache_gb` of its
memory as a segment; the master places values in the segments, evicts them when full and declines
puts it cannot place (a declined put is a failed spill, never an error). Values are framed (header
with namespace, key and checksum: common.py) and move zero-copy: the CPU pool is registered with
the transfer engine once, and a batch is one `batch_put_from_multi_buffers` /
`batch_get_into_multi_buffers` call straight from / into pool slots, the header going from / to a
small registered array beside the pool. Data calls run on this tier's threads, lookups
(`batch_is_exist`) on their own, so a large put never delays a lookup and nothing blocks vLLM's
scheduler. A master that stops answering degrades the tier to misses; one call per
`remote_timeout_s` probes whether it is back (a restarted master has lost every value: they
become misses and are dropped from the index view as they are read).

Security: Mooncake's RPC and transfer engine have no TLS and no authentication; whoever reaches
the master and the store nodes' ports can read and write every value. `remote_mac_key_file`
stops forged or altered values from being used (a miss), not reads; keep the ports private
(recipes/k8s/mooncake_store.yaml's NetworkPolicy).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np

from dynamo_flexkv.storage.backend import IoResult, completed, failed_io
from dynamo_flexkv.storage.remote.common import HEADER_BYTES, Framing, Health, RemoteStats, RemoteTierBase, view_blocks
from dynamo_flexkv.storage.remote.integrity import value_mac
from dynamo_flexkv.storage.remote.urls import TLS_SETTINGS, split_store_url, url_error

logger = logging.getLogger(__name__)

IO_THREADS = 2
LOCAL_BUFFER_BYTES = 16 << 20  # Mooncake's staging buffer for non-zero-copy calls; we make none
SETUP_TIMEOUT_FLOOR_S = 10.0  # a reachable master answers setup in milliseconds
# Mooncake's error codes that matter here (mooncake-store/include/types.h)
NO_AVAILABLE_HANDLE = -200  # the store is full: the put is declined
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
RPC_FAIL = -900  # the master did not answer


URL_FORM = "mooncake://host:port (the master's RPC address)"


class MooncakeAddress(NamedTuple):
    host: str
    port: int

    @property
    def master(self) -> str:
        return f"{self.host}:{self.port}"


def route_address(host: str, port: int) -> str:
    """This host's address on the route to the master (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


class MooncakeTier(RemoteTierBase):
    name = "MOONCAKE"
    medium = None  # the master evicts without telling us: blocks are not announced to the router

    def __init__(self, url: str, layout: Mapping[str, Any], slot_bytes: int, settings: Any):
        address = self.parse_url(url)
        self.url = url
        self.master = address.master
        self._host, self._port = address
        self.num_slots = view_blocks(settings.remote_cache_bytes, slot_bytes)
        self.stats = RemoteStats()
        self._settings = settings
        self._timeout_s = settings.remote_timeout_s
        self._framing = Framing(layout, slot_bytes, value_mac(settings))
        self._health = Health(f"{self.name}[{self.master}]", settings.remote_timeout_s)
        self._store = None  # set up once the master answered
        self._setup_lock = threading.Lock()
        self._pools: dict[int, tuple[int, np.ndarray]] = {}  # pool address -> (its rows' headers' address, headers)
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="flexkv-mooncake-io")
        self._ask = ThreadPoolExecutor(1, thread_name_prefix="flexkv-mooncake-lookup")
        self._closed = False

    @classmethod
    def parse_url(cls, url: str) -> MooncakeAddress:
        split = split_store_url(url, ("mooncake",), URL_FORM)
        if split.username is not None or split.password is not None:
            raise url_error(url, URL_FORM, "a Mooncake master takes no user or password")
        if split.path.strip("/"):
            raise url_error(url, URL_FORM, "a mooncake:// address has no path")
        return MooncakeAddress(split.hostname, split.port)

    @classmethod
    def open(cls, layout: Mapping[str, Any], slot_bytes: int, settings: Any) -> MooncakeTier:
        tls_given = [name for name in TLS_SETTINGS if getattr(settings, name, None)]
        if tls_given:
            raise ValueError(f"{tls_given[0]} applies to Redis over TLS (rediss://) only: Mooncake's "
                             "transfer engine has no TLS; keep its ports on a private network")
        tier = cls(settings.remote_store, layout, slot_bytes, settings)
        problem = tier._connect()
        if problem is not None:
            if not settings.remote_start_degraded:
                tier.close()
                raise ConnectionError(f"remote_store {tier.url}: {problem}; start the master, fix the URL, "
                                      "or set remote_start_degraded to start without it")
            tier._health.failed(f"unreachable at start-up: {problem}")
        logger.info("tier %s: master %s, namespace %s, %d blocks in this instance's view, %s",
                    cls.name, tier.master, tier._framing.namespace, tier.num_slots,
                    "connected" if problem is None else "degraded")
        return tier

    def _connect(self) -> str | None:
        """Join the store (bounded in time); None when connected, else what went wrong."""
        with self._setup_lock:
            if self._store is not None:
                return None
            try:  # Mooncake's setup waits ~90 s for a master that is not there: ask the port first
                socket.create_connection((self._host, self._port), timeout=self._timeout_s).close()
            except OSError as exc:
                return f"Mooncake master unreachable ({exc})"
            from mooncake.store import MooncakeDistributedStore

            settings = self._settings
            store = MooncakeDistributedStore()
            local = settings.remote_local_hostname or route_address(self._host, self._port)
            outcome: list[int] = []
            setup = threading.Thread(target=lambda: outcome.append(store.setup(
                local, settings.remote_metadata_server, settings.remote_cache_bytes, LOCAL_BUFFER_BYTES,
                settings.remote_protocol, settings.remote_device, self.master)), daemon=True)
            setup.start()
            setup.join(max(SETUP_TIMEOUT_FLOOR_S, 3 * self._timeout_s))
            if not outcome:
                return f"Mooncake setup with master {self.master} did not finish"
            if outcome[0] != 0:
                return (f"Mooncake setup failed with code {outcome[0]} (local address {local}, metadata "
                        f"{settings.remote_metadata_server}, segment {settings.remote_cache_bytes} bytes)")
            self._store = store
            return None

    # ---- I/O ------------------------------------------------------------------------------

    def write(self, pool, pool_slots: Sequence[int], addrs: Sequence[int], keys: Sequence[bytes],
              parents=None, tokens=None) -> Future[IoResult]:
        # parents/tokens are not kept: a shared tier is found by lookups, never recovered
        if not self._usable(keys):
            self.stats.write_failed_blocks += len(keys)
            return failed_io(len(keys))
        return self._io.submit(self._guarded, self._put, pool, list(pool_slots), list(keys), self._framing)

    def read(self, pool, addrs: Sequence[int], pool_slots: Sequence[int], keys: Sequence[bytes]) -> Future[IoResult]:
        if not self._usable(keys):
            self.stats.read_failed_blocks += len(keys)
            return failed_io(len(keys))
        return self._io.submit(self._guarded, self._get, pool, list(pool_slots), list(keys))

    def lookup(self, keys: Sequence[bytes]) -> Future[list[bool]]:
        if not self._usable(keys):
            return completed([False] * len(keys))
        return self._ask.submit(self._exists, list(keys))

    def _usable(self, keys: Sequence[bytes]) -> bool:
        return bool(keys) and not self._closed and self._health.may_try()

    def _guarded(self, op, pool, pool_slots: list[int], keys: list[bytes], *args) -> IoResult:
        """Run a data call; whatever goes wrong, the answer is per-block misses."""
        try:
            if self._store is None:
                problem = self._connect()
                if problem is not None:
                    self._health.failed(problem)
                    return IoResult([False] * len(keys), 0)
            return op(pool, pool_slots, keys, *args)
        except Exception as exc:
            self.stats.errors += 1
            logger.exception("tier %s: %s of %d blocks failed", self.name, op.__name__.strip("_"), len(keys))
            self._health.failed(f"{exc.__class__.__name__}: {exc}")
            return IoResult([False] * len(keys), 0)

    def _buffers(self, pool, pool_slots: list[int]) -> tuple[np.ndarray, list[list[int]], list[list[int]]]:
        """The pool's rows, and per slot the (header, data) addresses and sizes of its value."""
        rows = pool.numpy()
        base = rows.ctypes.data
        with self._setup_lock:  # the I/O threads' first calls race to register the pool
            registered = self._pools.get(base)
            if registered is None:
                headers = np.zeros((rows.shape[0], HEADER_BYTES), np.uint8)
                for address, size in ((base, rows.nbytes), (headers.ctypes.data, headers.nbytes)):
                    code = self._store.register_buffer(address, size)
                    if code != 0:
                        raise RuntimeError(f"Mooncake register_buffer of {size} bytes failed with code {code}")
                registered = self._pools[base] = (headers.ctypes.data, headers)
        header_base, _ = registered
        slot_bytes = self._framing.slot_bytes
        ptrs = [[header_base + s * HEADER_BYTES, base + s * slot_bytes] for s in pool_slots]
        return rows, ptrs, [[HEADER_BYTES, slot_bytes]] * len(pool_slots)

    def _put(self, pool, pool_slots: list[int], keys: list[bytes], framing: Framing) -> IoResult:
        # `framing` is the namespace of when the write was submitted: one planned before a reset lands
        # in the namespace of before it
        rows, ptrs, sizes = self._buffers(pool, pool_slots)
        headers = self._pools[rows.ctypes.data][1]
        for key, slot in zip(keys, pool_slots):  # the index keeps these slots locked until acknowledged
            headers[slot] = np.frombuffer(framing.header(key, rows[slot]), np.uint8)
        codes = self._store.batch_put_from_multi_buffers([framing.name(k) for k in keys], ptrs, sizes)
        ok = self._judge(codes, (0, OBJECT_ALREADY_EXISTS), "put")
        written = sum(ok)
        self.stats.blocks_written += written
        self.stats.bytes_written += written * framing.slot_bytes
        self.stats.write_failed_blocks += len(ok) - written
        return IoResult(ok, written * framing.slot_bytes)

    def _get(self, pool, pool_slots: list[int], keys: list[bytes]) -> IoResult:
        framing = self._framing
        rows, ptrs, sizes = self._buffers(pool, pool_slots)
        headers = self._pools[rows.ctypes.data][1]
        codes = self._store.batch_get_into_multi_buffers([framing.name(k) for k in keys], ptrs, sizes)
        ok = self._judge(codes, (framing.value_bytes,), "get", quiet=(OBJECT_NOT_FOUND,))
        # Zero copy: the value already sits in its pool slot, so it is verified there (checksum or
        # MAC). That is safe because a staged slot is nothing until this read answers ok: the index
        # commits it and the GPU copy is issued only then, and a failed block's slot is free again.
        # A scratch buffer would add a copy of every block and a second registered region.
        for i, (key, slot) in enumerate(zip(keys, pool_slots)):
            if ok[i] and not framing.verify(headers[slot], key, rows[slot]):
                ok[i] = False
                self.stats.corrupt_blocks += 1
                logger.warning("tier %s: value of block %s failed verification: a miss", self.name, key.hex()[:16])
        read = sum(ok)
        self.stats.blocks_read += read
        self.stats.bytes_read += read * framing.slot_bytes
        self.stats.read_failed_blocks += len(ok) - read
        return IoResult(ok, read * framing.slot_bytes)

    def _exists(self, keys: list[bytes]) -> list[bool]:
        self.stats.lookups += 1
        if self._store is None and self._connect() is not None:
            return [False] * len(keys)
        codes = self._store.batch_is_exist([self._framing.name(k) for k in keys])
        if len(codes) == len(keys) and all(code < 0 for code in codes):
            self._unreachable("lookup", codes[0])
            return [False] * len(keys)
        self._health.succeeded()
        return [code == 1 for code in codes]

    def _judge(self, codes: Sequence[int], good: tuple[int, ...], verb: str,
               quiet: tuple[int, ...] = ()) -> list[bool]:
        ok = [code in good for code in codes]
        if len(ok) != len(codes) or RPC_FAIL in codes:
            self._unreachable(verb, RPC_FAIL)
            return [False] * len(ok)
        self._health.succeeded()
        failures = [code for code in codes if code not in good and code not in quiet]
        if failures:
            declined = "store full, " if NO_AVAILABLE_HANDLE in failures else ""
            logger.warning("tier %s: %d of %d %ss failed (%scodes %s)", self.name, len(failures), len(codes),
                           verb, declined, sorted(set(failures)))
        return ok

    def _unreachable(self, verb: str, code: int) -> None:
        self.stats.errors += 1
        self._health.failed(f"{verb} failed with code {code}: master {self.master} not answering")

    # ---- lifecycle ------------------------------------------------------------------------

    def recover(self) -> list:
        return []  # the store outlives this instance: its blocks are found by lookups

    def invalidate(self, addrs: Sequence[int]) -> None:
        pass  # the master decides what to evict; the index only forgets

    def invalidate_all(self) -> None:
        self._framing = self._framing.after_reset()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ask.shutdown(wait=True)
        self._io.shutdown(wait=True)
        if self._store is not None:
            self._store.close()
            self._store = None
