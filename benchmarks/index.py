"""Control-plane cost per block: store and load round trips through CacheEngine.

For each prompt size (blocks of random 32-byte chained keys) and each repeat, a fresh prompt is
stored (lookup + prepare_store + complete_store) and then loaded (lookup + prepare_load +
complete_load). The tier holds --slots blocks, so larger prompts evict earlier ones. Being a pure
in-memory index it has no physical limit to compare with; the reference measured in the same run
is a bare dict insert + lookup of the same keys.

    python benchmarks/index.py --sizes 1024,4096,16384,32768 --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

from dynamo_flexkv.index import POLICY_NAMES, CacheEngine, TierIndex, make_policy

PHASES = (
    "lookup-miss",
    "prepare_store",
    "complete_store",
    "lookup-hit",
    "prepare_load",
    "complete_load",
)


def make_prompt(rng: random.Random, blocks: int) -> tuple[list[bytes], list[bytes | None]]:
    keys = [rng.randbytes(32) for _ in range(blocks)]
    return keys, [None, *keys[:-1]]


def dict_baseline_ns(keys: list[bytes]) -> int:
    start = time.perf_counter_ns()
    table: dict[bytes, int] = {}
    for i, key in enumerate(keys):
        table[key] = i
    for key in keys:
        if key not in table:
            break
    return time.perf_counter_ns() - start


def round_trip(
    engine: CacheEngine, rid: str, keys: list[bytes], parents: list[bytes | None]
) -> dict[str, int]:
    """One store and one load of a fresh prompt; nanoseconds per phase."""
    t: list[int] = [time.perf_counter_ns()]
    assert engine.lookup(keys) == 0
    t.append(time.perf_counter_ns())
    plan = engine.prepare_store(rid, keys, parents)
    t.append(time.perf_counter_ns())
    engine.complete_store(rid, True)
    t.append(time.perf_counter_ns())
    hit = engine.lookup(keys)
    t.append(time.perf_counter_ns())
    engine.prepare_load(rid, keys[:hit])
    t.append(time.perf_counter_ns())
    engine.complete_load(rid, True)
    t.append(time.perf_counter_ns())
    assert plan is not None and hit == len(plan.keys) == len(keys), "prompt did not fit"
    return {phase: t[i + 1] - t[i] for i, phase in enumerate(PHASES)}


def run(sizes: list[int], repeat: int, slots: int, policy: str, seed: int) -> None:
    rng = random.Random(seed)
    print(f"tier: {slots} slots, policy {policy}; {repeat} fresh prompts per size; median shown")
    header = f"{'blocks':>7} {'evicted':>8} " + " ".join(f"{p:>14}" for p in PHASES)
    header += f" {'total':>8} {'dict':>6} {'x dict':>7}"
    rows: list[str] = []
    totals: list[tuple[int, float, float]] = []
    for size in sizes:
        if size > slots:
            raise SystemExit(f"--slots {slots} cannot hold a {size}-block prompt")
        engine = CacheEngine([TierIndex("CPU", slots, make_policy(policy, slots))])
        samples: dict[str, list[float]] = {p: [] for p in PHASES}
        baseline: list[float] = []
        for r in range(repeat):
            keys, parents = make_prompt(rng, size)
            gc.collect()  # start each round trip without a backlog; collections inside count
            for phase, ns in round_trip(engine, f"req{r}", keys, parents).items():
                samples[phase].append(ns / size / 1e3)
            baseline.append(dict_baseline_ns(keys) / size / 1e3)
            engine.take_events()
            print(f"  {size} blocks: repeat {r + 1}/{repeat} done", flush=True)
        median = {p: statistics.median(v) for p, v in samples.items()}
        total = sum(median.values())
        base = statistics.median(baseline)
        totals.append((size, total, total / base))
        evicted = engine.snapshot().evicted_blocks["CPU"]
        row = f"{size:>7} {evicted:>8} " + " ".join(f"{median[p]:>14.3f}" for p in PHASES)
        rows.append(row + f" {total:>8.3f} {base:>6.3f} {total / base:>6.1f}x")
    print("\nmicroseconds per block (store = lookup-miss + prepare/complete_store, load = rest)")
    print(header)
    print("\n".join(rows))
    worst = max(totals, key=lambda t: t[1])
    print(
        f"\nsummary: a full store+load round trip costs {min(t[1] for t in totals):.2f}-"
        f"{worst[1]:.2f} us/block (worst at {worst[0]} blocks, {worst[2]:.0f}x slower than a "
        f"bare dict insert+lookup of the same keys)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1024,4096,16384,32768", help="comma-separated prompt sizes in blocks"
    )
    parser.add_argument("--repeat", type=int, default=7, help="fresh prompts per size")
    parser.add_argument(
        "--slots",
        type=int,
        default=40960,
        help="tier capacity in blocks (smaller than repeat x size -> eviction)",
    )
    parser.add_argument("--policy", default="lru", choices=POLICY_NAMES)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    run(sizes, args.repeat, args.slots, args.policy, args.seed)


if __name__ == "__main__":
    main()
