#!/usr/bin/env python3
"""The Mooncake cluster tier's put/get throughput and lookup latency vs. the raw Mooncake client,
with and without the value MAC (`remote_mac_key_file`).

Starts a Mooncake master and a store node (`mooncake_client`, which holds the store's memory) on
loopback. The peer is a raw `MooncakeDistributedStore` client; the tier (`MooncakeTier`, zero-copy
from a registered /dev/shm CPU pool, header + xxh3 checksum per value, verified on read) is a second
client; neither holds store memory, so both cross the transfer engine to the store node. Both move the
blocks in the same batches with the same number of threads: the raw client with
`batch_put_from_multi_buffers` / `batch_get_into_multi_buffers` (header + data, as the tier frames
them, minus the checksum), the tier through `write`/`read`. Lookups: `batch_is_exist` vs. the tier's
`lookup`, per block. A warm-up round is not counted; rounds alternate who goes first; prints median
and min-max over the rounds. A third client, the tier with a MAC key (keyed BLAKE3 over header and
bytes instead of the xxh3 checksum), moves the same blocks under its own namespace: the table gives
tier/raw and tier+MAC/raw, so the MAC's cost shows apart from the tier's.

    .venv/bin/python benchmarks/remote.py                      # 2 MiB and 128 KiB blocks
    .venv/bin/python benchmarks/remote.py --block-kib 2048 --total-mib 512 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
os.environ.setdefault("MC_LOG_LEVEL", "ERROR")

from dynamo_flexkv.config import FlexKVSettings  # noqa: E402
from dynamo_flexkv.storage.backend import open_backend  # noqa: E402
from dynamo_flexkv.storage.remote.base import IO_THREADS  # noqa: E402
from dynamo_flexkv.storage.remote.common import HEADER_BYTES, Framing  # noqa: E402
from dynamo_flexkv.storage.remote.integrity import ValueMac  # noqa: E402

GB = 1e9


def log(msg: str) -> None:
    print(f"[remote-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.1)


def start_store(segment_bytes: int) -> tuple[list[subprocess.Popen], int, str]:
    """A master (with its metadata server) and a store node holding `segment_bytes`."""
    port, http, node = free_port(), free_port(), free_port()
    metadata = f"http://127.0.0.1:{http}/metadata"
    binaries = Path(sys.executable).parent
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    master = subprocess.Popen([str(binaries / "mooncake_master"), f"-rpc_port={port}", "-rpc_address=127.0.0.1",
                               "-enable_http_metadata_server=true", "-http_metadata_server_host=127.0.0.1",
                               f"-http_metadata_server_port={http}"], **quiet)
    listening(port, master, "mooncake_master")
    store = subprocess.Popen([str(binaries / "mooncake_client"), f"-master_server_address=127.0.0.1:{port}",
                              f"-metadata_server={metadata}", "-host=127.0.0.1", f"-port={node}",
                              f"-global_segment_size={segment_bytes >> 20}MB", "-protocol=tcp"], **quiet)
    listening(node, store, "mooncake_client")
    return [store, master], port, metadata


def make_pool(n: int, slot_bytes: int) -> tuple[torch.Tensor, str]:
    fd, path = tempfile.mkstemp(prefix="flexkv-remote-bench-pool-", dir="/dev/shm")
    os.close(fd)
    pool = torch.from_file(path, shared=True, size=n * slot_bytes, dtype=torch.uint8).view(n, slot_bytes)
    pool.copy_(torch.randint(0, 256, pool.shape, dtype=torch.uint8))
    return pool, path


class RawPeer:
    """The raw client doing the tier's batch operations: same buffers, same batches, same threads."""

    def __init__(self, store, pool: torch.Tensor):
        self.store = store
        rows = pool.numpy()
        self.headers = np.zeros((rows.shape[0], HEADER_BYTES), np.uint8)
        self.base, self.slot = rows.ctypes.data, rows.shape[1]
        for address, size in ((self.base, rows.nbytes), (self.headers.ctypes.data, self.headers.nbytes)):
            assert store.register_buffer(address, size) == 0

    def _ptrs(self, slots):
        h = self.headers.ctypes.data
        return ([[h + s * HEADER_BYTES, self.base + s * self.slot] for s in slots],
                [[HEADER_BYTES, self.slot]] * len(slots))

    def put(self, names, slots) -> list[bool]:
        ptrs, sizes = self._ptrs(slots)
        return self._judge(self.store.batch_put_from_multi_buffers(names, ptrs, sizes), 0)

    def get(self, names, slots) -> list[bool]:
        ptrs, sizes = self._ptrs(slots)
        return self._judge(self.store.batch_get_into_multi_buffers(names, ptrs, sizes), HEADER_BYTES + self.slot)

    def _judge(self, codes: list[int], good: int) -> list[bool]:
        if any(c != good for c in codes):
            raise SystemExit(f"raw client: codes {sorted(set(codes) - {good})}")
        return [True] * len(codes)


def timed(submit, batches) -> float:
    start = time.perf_counter()
    futures = [submit(batch) for batch in batches]
    wait(futures, timeout=600)
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - start
    ok = [r.ok if hasattr(r, "ok") else r for r in results]
    if not all(all(o) for o in ok):
        raise SystemExit(f"{sum(not x for o in ok for x in o)} blocks failed: is the store large enough?")
    return elapsed


def bench(block_kib: int, total_mib: int, batch: int, rounds: int) -> dict:
    # every round's values stay (removing them races Mooncake's read leases): room for all of them,
    # and a quarter more for headers and the allocator (a fixed 256 MiB fell short from ~5 GiB up)
    services, master_port, metadata = start_store(3 * (rounds + 1) * (total_mib << 20) * 5 // 4)
    try:
        return _bench(block_kib, total_mib, batch, rounds, master_port, metadata)
    finally:
        for process in services:
            process.kill()
            process.wait()


def _bench(block_kib: int, total_mib: int, batch: int, rounds: int, master_port: int, metadata: str) -> dict:
    from mooncake.store import MooncakeDistributedStore

    slot = block_kib << 10
    n = (total_mib << 20) // slot
    pool, path = make_pool(2 * n, slot)  # first half: sources; second half: read targets
    url = f"mooncake://127.0.0.1:{master_port}"
    raw_store = MooncakeDistributedStore()
    assert raw_store.setup("127.0.0.1", metadata, 0, 16 << 20, "tcp", "", f"127.0.0.1:{master_port}") == 0
    settings = FlexKVSettings(remote_store=url, remote_metadata_server=metadata, remote_timeout_s=30)
    tier = open_backend("mooncake", {"bench": block_kib}, slot, settings)
    key_file = Path(tempfile.mkdtemp(prefix="flexkv-remote-bench-")) / "mac.key"
    key_file.write_bytes(os.urandom(32).hex().encode())
    key_file.chmod(0o600)
    maced = open_backend("mooncake", {"bench": block_kib, "mac": True}, slot,  # its own namespace
                         settings.model_copy(update={"remote_mac_key_file": str(key_file)}))
    raw, io = RawPeer(raw_store, pool), ThreadPoolExecutor(IO_THREADS)
    figures: dict[str, list[float]] = {f"{who} {what}": [] for what in ("put", "get", "lookup")
                                       for who in ("tier", "mac", "raw")}
    figures.pop("mac lookup")
    try:
        for r in range(rounds + 1):  # round 0 warms up: not counted
            keys = [f"{r}-{i}".encode().ljust(32, b".") for i in range(n)]
            names = [f"raw/{k.hex()}" for k in keys]
            src = [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]
            dst = [[n + s for s in b] for b in src]
            def tier_jobs(backend):
                return {
                    "put": lambda: timed(lambda b: backend.write(pool, b, b, [keys[s] for s in b]), src),
                    "get": lambda: timed(lambda b: backend.read(pool, b, [n + s for s in b], [keys[s] for s in b]),
                                         src),
                }
            raw_jobs = {
                "put": lambda: timed(lambda b: io.submit(raw.put, [names[s] for s in b], b), src),
                "get": lambda: timed(lambda b: io.submit(raw.get, [names[s - n] for s in b], b), dst),
            }
            order = [("tier", tier_jobs(tier)), ("mac", tier_jobs(maced)), ("raw", raw_jobs)]
            order = order[r % 3:] + order[:r % 3]  # who goes first rotates
            for verb in ("put", "get"):
                for who, jobs in order:
                    figures[f"{who} {verb}"].append(n * slot / jobs[verb]() / GB)
            start = time.perf_counter()
            found = [tier.lookup([keys[s] for s in b]).result(timeout=60) for b in src]
            figures["tier lookup"].append((time.perf_counter() - start) / n * 1e6)
            assert all(all(f) for f in found)
            start = time.perf_counter()
            found = [raw_store.batch_is_exist([names[s] for s in b]) for b in src]
            figures["raw lookup"].append((time.perf_counter() - start) / n * 1e6)
            assert all(all(c == 1 for c in f) for f in found)
            if r == 0:
                figures = {k: [] for k in figures}
                continue
            log(f"{block_kib} KiB round {r}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3g}" for k, v in figures.items()))
    finally:
        tier.close()
        maced.close()
        key_file.unlink()
        key_file.parent.rmdir()
        raw_store.close()
        os.unlink(path)
    return figures


def framing_cost(block_kib: int, rounds: int, reps: int = 20) -> dict[str, list[float]]:
    """CPU µs per block of sealing (header) and verifying a value, with the checksum and with the
    MAC: this thread's CPU time, so a loaded machine inflates it less than wall time."""
    slot = block_kib << 10
    data = np.random.default_rng(0).integers(0, 256, slot, dtype=np.uint8)
    framings = {"checksum": Framing({}, slot), "mac": Framing({}, slot, ValueMac(os.urandom(32)))}
    costs: dict[str, list[float]] = {f"{kind} {step}": [] for kind in framings for step in ("seal", "verify")}
    for _ in range(rounds):
        for kind, framing in framings.items():
            start = time.thread_time()
            for _ in range(reps):
                header = framing.header(b"k" * 32, data)
            costs[f"{kind} seal"].append((time.thread_time() - start) / reps * 1e6)
            start = time.thread_time()
            for _ in range(reps):
                assert framing.verify(header, b"k" * 32, data)
            costs[f"{kind} verify"].append((time.thread_time() - start) / reps * 1e6)
    return costs


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-kib", type=int, action="append", help="block size(s) in KiB (default 2048 and 128)")
    parser.add_argument("--total-mib", type=int, default=128, help="data per pass")
    parser.add_argument("--batch", type=int, default=32, help="blocks per batch operation")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = [(kib, bench(kib, args.total_mib, args.batch, args.rounds)) for kib in args.block_kib or [2048, 128]]
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n| block | verb | GB/s tier | GB/s tier+MAC | GB/s raw | tier/raw | tier+MAC/raw |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for kib, f in rows:
        size = f"{kib // 1024} MiB" if kib >= 1024 else f"{kib} KiB"
        for verb in ("put", "get"):
            ratio = {who: statistics.median(a / b for a, b in zip(f[f"{who} {verb}"], f[f"raw {verb}"]))
                     for who in ("tier", "mac")}
            print(f"| {size} | {verb} | {spread(f[f'tier {verb}'])} | {spread(f[f'mac {verb}'])} "
                  f"| {spread(f[f'raw {verb}'])} | {ratio['tier']:.2f} | {ratio['mac']:.2f} |")
    print("\n| block | CPU µs/block: checksum seal | checksum verify | MAC seal | MAC verify | MAC GB/s (verify) |")
    print("|---|---:|---:|---:|---:|---:|")
    for kib, _ in rows:
        c = framing_cost(kib, args.rounds)
        size = f"{kib // 1024} MiB" if kib >= 1024 else f"{kib} KiB"
        mac_gbps = (kib << 10) / (statistics.median(c["mac verify"]) * 1e-6) / GB
        print(f"| {size} | {spread(c['checksum seal'])} | {spread(c['checksum verify'])} | {spread(c['mac seal'])} "
              f"| {spread(c['mac verify'])} | {mac_gbps:.2f} |")
    print("\n| block | lookup µs/block tier | lookup µs/block raw |")
    print("|---|---:|---:|")
    for kib, f in rows:
        size = f"{kib // 1024} MiB" if kib >= 1024 else f"{kib} KiB"
        print(f"| {size} | {spread(f['tier lookup'])} | {spread(f['raw lookup'])} |")

if __name__ == "__main__":
    main()
