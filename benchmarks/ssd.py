#!/usr/bin/env python3
"""SSD tier throughput vs. fio on the same directory, block size and queue depth (O_DIRECT).

For each block size and access pattern (seq: SSD slots in order, fio --rw=write/read; random:
shuffled slots, fio --rw=randwrite/randread), fio (libaio, --direct=1, same block size and queue
depth) and SsdBlockStore with each I/O engine move the same --total-mib: a first write into fresh
files, an overwrite, and a read back into the /dev/shm pool (checksums verified). Per pass, fio and
the engines run back to back (order rotated each round); prints medians and store/fio ratios.

    .venv/bin/python benchmarks/ssd.py                       # 2 MiB and 128 KiB blocks, both engines
    .venv/bin/python benchmarks/ssd.py --block-kib 2048 --engine threads --total-mib 1024
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo_flexkv.storage.ssd.store import SsdBlockStore  # noqa: E402
from dynamo_flexkv.storage.ssd.engines import DEFAULT_ENGINE, uring_available  # noqa: E402

GB = 1e9
# write: first write of every slot into a freshly preallocated file (fio: a fresh file);
# rewrite: the same slots overwritten (fio: the same pass again) — a warm cache's steady state.
DIRECTIONS = ("write", "rewrite", "read")


def log(msg: str) -> None:
    print(f"[ssd-bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fio(directory: Path, rw: str, bs: int, qd: int, total: int) -> float:
    """fio's bandwidth in bytes/s for a sequential O_DIRECT pass over one file."""
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed (apt-get install -y fio)")
    cmd = ["fio", "--name=flexkv-ssd-ref", f"--filename={directory / 'fio.dat'}", f"--size={total}",
           f"--bs={bs}", f"--iodepth={qd}", "--direct=1", "--ioengine=libaio", f"--rw={rw}",
           "--numjobs=1", "--output-format=json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["write" if "write" in rw else "read"]["bw_bytes"])


def make_pool(n: int, slot_bytes: int) -> tuple[torch.Tensor, str]:
    fd, path = tempfile.mkstemp(prefix="flexkv-ssd-bench-pool-", dir="/dev/shm")
    os.close(fd)
    pool = torch.from_file(path, shared=True, size=n * slot_bytes, dtype=torch.uint8).view(n, slot_bytes)
    chunk = torch.randint(0, 256, (min(64 << 20, n * slot_bytes),), dtype=torch.uint8)
    flat = pool.view(-1)
    for off in range(0, flat.numel(), chunk.numel()):  # random, prefaulted; no page-fault cost later
        m = min(chunk.numel(), flat.numel() - off)
        flat[off:off + m] = chunk[:m]
        flat[off] = off // chunk.numel() % 256  # keep chunks distinct
    return pool, path


def run_pass(store: SsdBlockStore, pool: torch.Tensor, ssd_slots: list[int], write: bool, batch: int,
             label: str) -> float:
    n = pool.shape[0]
    keys = [i.to_bytes(8, "little") for i in range(n)]
    done = [0]
    lock = threading.Lock()
    step = max(1, n // 4)

    def progress(_f: Future) -> None:
        with lock:
            before = done[0]
            done[0] += len(_f.result().ok)
            if done[0] // step != before // step:
                log(f"  {label}: {done[0]}/{n} blocks")

    t0 = time.perf_counter()
    futs = []
    for b in range(0, n, batch):
        idx = list(range(b, min(n, b + batch)))
        ssd = ssd_slots[b:b + len(idx)]
        k = keys[b:b + len(idx)]
        f = store.write_blocks(pool, idx, ssd, k) if write else store.read_blocks(pool, ssd, idx, k)
        f.add_done_callback(progress)
        futs.append(f)
    ok = 0
    for f in futs:
        ok += sum(f.result(timeout=600).ok)
    dt = time.perf_counter() - t0
    if ok != n:
        raise SystemExit(f"{label}: only {ok}/{n} blocks ok (degraded: {store.degraded_reason})")
    return n * pool.shape[1] / dt


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory on the disk to test (default: fresh dir under /tmp)")
    ap.add_argument("--block-kib", type=int, nargs="+", default=[2048, 128])
    ap.add_argument("--queue-depth", type=int, default=32)
    ap.add_argument("--io-threads", type=int, default=8)
    ap.add_argument("--total-mib", type=int, default=2048)
    ap.add_argument("--batch-blocks", type=int, default=32, help="blocks per write_blocks/read_blocks call")
    ap.add_argument("--engine", choices=["threads", "uring", "both"], default="both")
    ap.add_argument("--pattern", choices=["seq", "random"], nargs="+", default=["seq", "random"],
                    help="seq: SSD slots in order (fio --rw=write/read); random: shuffled SSD slots "
                         "(fio --rw=randwrite/randread), so no two blocks of a batch coalesce")
    ap.add_argument("--rounds", type=int, default=3,
                    help="fio and store passes alternate this many times; medians are reported "
                         "(a virtual disk's throughput varies a lot from one pass to the next)")
    args = ap.parse_args()

    made = args.dir is None
    directory = Path(args.dir or tempfile.mkdtemp(prefix="flexkv-ssd-bench-", dir="/tmp"))
    directory.mkdir(parents=True, exist_ok=True)
    engines = ["threads", "uring"] if args.engine == "both" else [args.engine]
    if "uring" in engines:
        ok, why = uring_available()
        if not ok:
            log(f"skipping uring engine: {why}")
            engines.remove("uring")
    log(f"load average {os.getloadavg()[0]:.1f}; dir={directory} cpus={os.cpu_count()} qd={args.queue_depth} io_threads={args.io_threads} "
        f"total={args.total_mib} MiB engines={engines} patterns={args.pattern} rounds={args.rounds}")
    rows = []
    try:
        for kib in args.block_kib:
            bs = kib * 1024
            total = args.total_mib * 2**20 // bs * bs
            n = total // bs
            pool, pool_path = make_pool(n, bs)
            try:
                for pattern in args.pattern:
                    slots = list(range(n))
                    if pattern == "random":
                        random.Random(kib).shuffle(slots)
                    rw = ("write", "read") if pattern == "seq" else ("randwrite", "randread")
                    res: dict[str, list[float]] = {}
                    for rnd in range(1, args.rounds + 1):
                        tag = f"{kib} KiB {pattern} round {rnd}/{args.rounds}"
                        stores = {eng: SsdBlockStore([str(directory)], total, bs, {"bench": kib, "engine": eng},
                                                     io_threads=args.io_threads, queue_depth=args.queue_depth,
                                                     engine=eng) for eng in engines}
                        try:
                            # Per direction, fio and each engine run back to back (the order rotates
                            # every round), so each ratio compares passes seconds apart.
                            for direction in DIRECTIONS:
                                runs = ["fio"] + engines
                                shift = (rnd - 1) % len(runs)
                                for who in runs[shift:] + runs[:shift]:
                                    if who == "fio":
                                        bw = fio(directory, rw[direction == "read"], bs, args.queue_depth, total)
                                    else:
                                        bw = run_pass(stores[who], pool, slots, direction != "read",
                                                      args.batch_blocks, f"{who} {direction}")
                                    res.setdefault(f"{who} {direction}", []).append(bw)
                                    log(f"{tag}: {who} {direction} {bw / GB:.2f} GB/s")
                            for st in stores.values():
                                assert st.stats.corrupt_blocks == 0 and st.healthy
                        finally:
                            for st in stores.values():
                                path = st._files[0].path  # noqa: SLF001 - benchmark cleanup
                                st.close()
                                path.unlink(missing_ok=True)
                            (directory / "fio.dat").unlink(missing_ok=True)
                    for eng in engines:
                        for direction in DIRECTIONS:
                            ref, mine = res[f"fio {direction}"], res[f"{eng} {direction}"]
                            ratio = median([m / r for m, r in zip(mine, ref)])
                            rows.append((kib, pattern, eng, direction, median(ref), median(mine), ratio,
                                         min(ref), max(ref), min(mine), max(mine)))
                            log(f"{kib} KiB {pattern} {eng} {direction}: {median(mine) / GB:.2f} GB/s "
                                f"({ratio:.2f}x fio)")
            finally:
                del pool
                os.unlink(pool_path)
    finally:
        if made:
            shutil.rmtree(directory, ignore_errors=True)
    print()
    print(f"SSD tier vs fio, same dir (O_DIRECT, qd={args.queue_depth}, {args.total_mib} MiB per pass, "
          f"median of {args.rounds}, {os.cpu_count()} CPUs, io_threads={args.io_threads}, "
          f"batch={args.batch_blocks} blocks, checksums on, load average {os.getloadavg()[0]:.1f} at the end)")
    # The thread engine keeps one request in flight per thread: say what each engine really reached.
    print(f"default engine (ssd_io_engine=auto): {DEFAULT_ENGINE}; requests in flight: fio {args.queue_depth}, "
          f"threads {min(args.io_threads, args.queue_depth)}, uring {args.queue_depth}")
    print(f"{'block':>7} {'pattern':>7} {'engine':>7} {'pass':>7} | {'fio GB/s':>8} {'store GB/s':>10} "
          f"{'ratio':>5} | {'fio min-max':>11} {'store min-max':>13}")
    for kib, pattern, eng, direction, f, m, ratio, f0, f1, m0, m1 in rows:
        print(f"{kib:>4}KiB {pattern:>7} {eng:>7} {direction:>7} | {f / GB:>8.2f} {m / GB:>10.2f} {ratio:>5.2f} | "
              f"{f0 / GB:>5.2f}-{f1 / GB:<5.2f} {m0 / GB:>7.2f}-{m1 / GB:<5.2f}")
    print("(1 GB = 1e9 bytes; fio/store: medians over rounds; ratio: median over rounds of store/fio "
          "measured seconds apart; write = first write into fresh files, rewrite = overwrite)")



if __name__ == "__main__":
    main()
