"""The cluster tier on Mooncake Store: `remote_store: mooncake://MASTER:PORT`.

Every instance joins the store as a client of its master and contributes `remote_cache_gb` of its
memory as a segment; the master places values in the segments, evicts them when full and declines
puts it cannot place (a declined put is a failed spill, never an error). Values are framed (header
with namespace, key and checksum: common.py) and move zero-copy: the CPU pool is registered with
the transfer engine once, and a batch is one `batch_put_from_multi_buffers` /
`batch_get_into_multi_buffers` call straight from / into pool slots, the header going from / to a
small registered array beside the pool. Threads, deadlines, health and start-up are the template's
(base.py); a restarted master has lost every value: they become misses and are dropped from the
index view as they are read.

Security: Mooncake's RPC and transfer engine have no TLS and no authentication; whoever reaches
the master and the store nodes' ports can read and write every value. `remote_mac_key_file`
stops forged or altered values from being used (a miss), not reads; keep the ports private
(recipes/k8s/mooncake_store.yaml's NetworkPolicy). A value lands zero-copy in its pool slot and is
verified there; the index marks the slot valid only if it passed.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, NamedTuple

import numpy as np

from dynamo_flexkv.storage.remote.base import RemoteTier
from dynamo_flexkv.storage.remote.urls import TLS_SETTINGS, split_store_url, url_error

logger = logging.getLogger(__name__)

LOCAL_BUFFER_BYTES = 16 << 20  # Mooncake's staging buffer for non-zero-copy calls; we make none
SETUP_TIMEOUT_FLOOR_S = 10.0  # a reachable master answers setup in milliseconds; a large RDMA segment takes longer
# Mooncake's error codes that matter here (mooncake-store/include/types.h)
NO_AVAILABLE_HANDLE = -200  # the store is full: the put is declined
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
RPC_FAIL = -900  # the master did not answer
RPC_TIMEOUT = -901  # nor within Mooncake's own RPC timeout (30 s)
UNREACHABLE = (RPC_FAIL, RPC_TIMEOUT)
URL_FORM = "mooncake://host:port (the master's RPC address)"


class MooncakeAddress(NamedTuple):
    host: str
    port: int

    @property
    def master(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"mooncake://{self.master}"


def route_address(host: str, port: int) -> str:
    """This host's address on the route to the master (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return probe.getsockname()[0]


class MooncakeTier(RemoteTier):
    name = "MOONCAKE"

    def __init__(self, address: MooncakeAddress, layout, slot_bytes: int, settings: Any):
        tls_given = [name for name in TLS_SETTINGS if getattr(settings, name, None)]
        if tls_given:
            raise ValueError(f"{tls_given[0]} applies to Redis over TLS (rediss://) only: Mooncake's "
                             "transfer engine has no TLS; keep its ports on a private network")
        super().__init__(address, layout, slot_bytes, settings)
        self._host, self._port = address
        self.master = address.master
        self._store = None

    @classmethod
    def parse_url(cls, url: str) -> MooncakeAddress:
        split = split_store_url(url, ("mooncake",), URL_FORM)
        if split.username is not None or split.password is not None:
            raise url_error(url, URL_FORM, "a Mooncake master takes no user or password")
        if split.path.strip("/"):
            raise url_error(url, URL_FORM, "a mooncake:// address has no path")
        return MooncakeAddress(split.hostname, split.port)

    @classmethod
    def connect_timeout_s(cls, settings: Any) -> float:
        return max(SETUP_TIMEOUT_FLOOR_S, 3 * settings.remote_timeout_s)

    def _master_answers(self) -> None:
        """Raise unless the master's process answers, within `timeout_s`. Mooncake's `setup` and
        `close` hold the GIL while they wait for the master (30 s per RPC, retried): every thread of
        the engine would stop behind a master that is absent or frozen. A live master closes a
        connection that sends it a malformed header at once; a frozen one (its kernel still accepts
        connections) stays silent."""
        try:
            with socket.create_connection((self._host, self._port), timeout=self.timeout_s) as probe:
                probe.sendall(bytes(64))
                probe.recv(64)
        except TimeoutError:
            raise ConnectionError(f"Mooncake master {self.master} accepts connections but does not answer "
                                  f"within {self.timeout_s:g}s") from None
        except OSError as exc:
            if not isinstance(exc, ConnectionResetError):
                raise ConnectionError(f"Mooncake master unreachable ({exc})") from None

    def _connect(self) -> None:
        self._master_answers()  # the race left (the master freezes during setup) costs Mooncake's RPC timeout
        from mooncake.store import MooncakeDistributedStore

        settings = self._settings
        store = MooncakeDistributedStore()
        local = settings.remote_local_hostname or route_address(self._host, self._port)
        code = store.setup(local, settings.remote_metadata_server, settings.remote_cache_bytes, LOCAL_BUFFER_BYTES,
                           settings.remote_protocol, settings.remote_device, self.master)
        if code != 0:
            raise ConnectionError(f"Mooncake setup failed with code {code} (local address {local}, metadata "
                                  f"{settings.remote_metadata_server}, segment {settings.remote_cache_bytes} bytes)")
        self._store = store

    def _register(self, rows: np.ndarray, headers: np.ndarray) -> None:
        for array in (rows, headers):
            code = self._store.register_buffer(array.ctypes.data, array.nbytes)
            if code != 0:
                raise RuntimeError(f"Mooncake register_buffer of {array.nbytes} bytes failed with code {code}")

    def _buffers(self, rows: np.ndarray, headers: np.ndarray, slots: list[int]) -> tuple[list, list]:
        """Per slot the (header, data) addresses and sizes of its value."""
        base, header_base, slot_bytes = rows.ctypes.data, headers.ctypes.data, self._framing.slot_bytes
        ptrs = [[header_base + s * headers.shape[1], base + s * slot_bytes] for s in slots]
        return ptrs, [[headers.shape[1], slot_bytes]] * len(slots)

    def _put(self, rows: np.ndarray, headers: np.ndarray, slots: list[int], names: list[str]) -> list[bool]:
        codes = self._store.batch_put_from_multi_buffers(names, *self._buffers(rows, headers, slots))
        return self._judge(codes, len(names), (0, OBJECT_ALREADY_EXISTS), "put")

    def _get(self, rows: np.ndarray, headers: np.ndarray, slots: list[int], names: list[str], accept) -> list[bool]:
        codes = self._store.batch_get_into_multi_buffers(names, *self._buffers(rows, headers, slots))
        found = self._judge(codes, len(names), (self._framing.value_bytes,), "get", quiet=(OBJECT_NOT_FOUND,))
        return [ok and accept(i, headers[slot], rows[slot]) for i, (ok, slot) in enumerate(zip(found, slots))]

    def _exists(self, names: list[str]) -> list[bool]:
        codes = self._store.batch_is_exist(names)
        if len(codes) != len(names) or all(code < 0 for code in codes):
            raise ConnectionError(f"lookup failed with code {codes[0] if codes else None}: master {self.master} not answering")
        return [code == 1 for code in codes]

    def _judge(self, codes, count: int, good: tuple[int, ...], verb: str, quiet: tuple[int, ...] = ()) -> list[bool]:
        lost = next((code for code in codes if code in UNREACHABLE), None)
        if len(codes) != count or lost is not None:
            raise ConnectionError(f"{verb} failed with code {lost}: master {self.master} not answering")
        failures = [code for code in codes if code not in good and code not in quiet]
        if failures:
            declined = "store full, " if NO_AVAILABLE_HANDLE in failures else ""
            logger.warning("tier %s: %d of %d %ss failed (%scodes %s)", self.name, len(failures), count,
                           verb, declined, sorted(set(failures)))
        return [code in good for code in codes]

    def _disconnect(self) -> None:
        if self._store is None:
            return
        try:
            self._master_answers()
        except ConnectionError as exc:  # close would hold the GIL until Mooncake's RPC timeout
            logger.warning("tier %s: the client is left to the process's exit: %s", self.name, exc)
            return
        self._store.close()
        self._store = None
