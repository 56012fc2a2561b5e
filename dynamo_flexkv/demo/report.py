"""The demo's figures: per-repetition TTFT percentiles (median and min-max), tokens by source, router truth.

Every figure is printed with the run's date and machine, and written as JSON next to the PNG.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

from dynamo_flexkv.demo.passes import PassResult, RequestRecord
from dynamo_flexkv.demo.workload import Spread, percentile

SOURCES = ("GPU hit", "CPU tier", "SSD tier", "cluster tier", "recomputed")


def machine() -> str:
    """Date and machine kind, as every quoted figure must carry them."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} {cpu}, "
            f"{os.cpu_count()} cores, {memory_gib:.0f} GiB")


def sources(record: RequestRecord) -> dict[str, int]:
    return {"GPU hit": record.gpu_hit_tokens, "CPU tier": record.tier_hit_tokens.get("CPU", 0),
            "SSD tier": record.tier_hit_tokens.get("SSD", 0), "cluster tier": record.tier_hit_tokens.get("MOONCAKE", 0),
            "recomputed": record.recomputed_tokens}


def returning_ttft_by_repetition(result: PassResult, q: float) -> list[float]:
    """The q-percentile of returning-turn TTFT (turns after a user's first), once per repetition."""
    repetitions = sorted({r.repetition for r in result.records})
    return [percentile([r.ttft_ms for r in result.records if r.repetition == rep and r.turn > 0], q)
            for rep in repetitions]


# (pass, the pass it is compared with, what the comparison shows)
COMPARISONS = (("flexkv", "baseline", "FlexKV / without"), ("cluster", "flexkv", "cluster tier / without"))


def ttft_by_turn(result: PassResult, turn: int, q: float = 0.5) -> Spread:
    """The q-percentile of one turn index's TTFT (all users), once per repetition."""
    repetitions = sorted({r.repetition for r in result.records})
    return Spread.of([percentile([r.ttft_ms for r in result.records if r.repetition == rep and r.turn == turn], q)
                      for rep in repetitions])


def ratio_by_repetition(result: PassResult, peer: PassResult, q: float = 0.5) -> Spread:
    """A pass's returning-turn TTFT percentile over its peer's, paired by repetition (same prompts)."""
    pairs = zip(returning_ttft_by_repetition(result, q), returning_ttft_by_repetition(peer, q))
    return Spread.of([f / b for f, b in pairs if b])


def prefill_ms_per_token(result: PassResult) -> float:
    """Full recomputes (nothing cached, so TTFT is prefill plus a fixed overhead): ms per prompt token."""
    costs = [r.ttft_ms / r.prompt_tokens for r in result.records if r.gpu_hit_tokens == 0
             and not r.tier_hit_tokens and r.turn == 0]
    return percentile(costs, 0.5)


def answers_match(results: list[PassResult]) -> tuple[int, int]:
    """(identical, compared): each request's answer against the same request in the other passes."""
    if len(results) < 2:
        return 0, 0
    texts = [{r.key: r.text for r in result.records} for result in results]
    keys = set(texts[0]).intersection(*texts[1:])
    return sum(all(t[k] == texts[0][k] for t in texts[1:]) for k in keys), len(keys)


def split(result: PassResult) -> tuple[list[int], int, int]:
    """Requests per worker, and how many returning turns stayed on the worker of the user's previous turn."""
    per_worker = [sum(r.worker == w for r in result.records) for w in (0, 1)]
    previous = {r.key: r.worker for r in result.records}
    returning = [r for r in result.records if r.turn > 0]
    stayed = sum(previous.get((r.repetition, r.user, r.turn - 1)) == r.worker for r in returning)
    return per_worker, stayed, len(returning)


def print_report(results: list[PassResult], header: list[str]) -> None:
    for line in header:
        print(line)
    print(f"\n{'pass':9} {'worker':6} {'requests':>8} {'prompt tok':>10} {'GPU-hit tok':>11} {'CPU-tier tok':>12} "
          f"{'SSD-tier tok':>12} {'cluster tok':>11} {'recomputed':>10} {'events GPU/CPU':>15}")
    for result in results:
        for w in (0, 1):
            mine = [r for r in result.records if r.worker == w]
            by_source = {s: sum(sources(r)[s] for r in mine) for s in SOURCES}
            gpu_events = sum(n for (_, medium), n in result.published[w].items() if medium == "GPU")
            lower_events = sum(n for (_, medium), n in result.published[w].items() if medium != "GPU")
            print(f"{result.name:9} w{w:<5} {len(mine):8d} {sum(r.prompt_tokens for r in mine):10d} "
                  f"{by_source['GPU hit']:11d} {by_source['CPU tier']:12d} {by_source['SSD tier']:12d} "
                  f"{by_source['cluster tier']:11d} {by_source['recomputed']:10d} {f'{gpu_events}/{lower_events}':>15}")

    if all(r.pinned for result in results for r in result.records):
        print("\nRouting (every turn pinned: a user's turn t goes to worker (user + t) % 2, so each returning turn "
              "lands on the worker that did not serve the user's previous turn):")
    else:
        print("\nRouting (a user's first turn is pinned to worker user % 2 in every pass; returning turns are routed):")
    splits = {result.name: split(result) for result in results}
    for name, (per_worker, stayed, returning) in splits.items():
        print(f"  {name:9} requests w0/w1 {per_worker[0]}/{per_worker[1]}; returning turns on their previous "
              f"worker {stayed}/{returning}")
    if len({tuple(s[0]) for s in splits.values()}) > 1:
        print("  NOTE: the passes split their requests differently between the workers (see above)")

    print("\nKV router (frontend metric dynamo_component_kv_cache_events_applied vs updates the workers published,"
          " read once both are at rest):")
    for result in results:
        ok = {kind: int(n) for (kind, status), n in sorted(result.router_applied.items()) if status == "ok" and n}
        rejected = result.router_rejected
        late = [n for n in result.late_updates if n]
        print(f"  {result.name:9} applied {result.router_applied_total}/{result.router_expected} updates {ok}"
              f"{'; REJECTED ' + str(rejected) if rejected else ''}; {len(late)}/{len(result.late_updates)} requests "
              f"had {sum(late)} updates published after their answer arrived")
        for w, relay in enumerate(result.relay):
            published = {kind: sum(n for (k, _), n in result.published[w].items() if k == name)
                         for kind, name in (("stored", "BlockStored"), ("removed", "BlockRemoved"))}
            received = {kind: int(relay.get(f"{kind}/received", 0)) for kind in published}
            print(f"            w{w}: vLLM events seen by our subscriber {published}, by Dynamo's relay {received}, "
                  f"relay-detected gaps {int(relay.get('dropped', 0))}")

    print("\nTTFT, ms: median over repetitions of each repetition's percentile (min-max)")
    print(f"{'pass':9} {'all p50':>20} {'returning p50':>20} {'returning p90':>20}")
    for result in results:
        reps = sorted({r.repetition for r in result.records})
        all_p50 = Spread.of([percentile([r.ttft_ms for r in result.records if r.repetition == rep], 0.5)
                             for rep in reps])
        print(f"{result.name:9} {str(all_p50):>20} {str(Spread.of(returning_ttft_by_repetition(result, 0.5))):>20} "
              f"{str(Spread.of(returning_ttft_by_repetition(result, 0.9))):>20}")
    turns = sorted({r.turn for result in results for r in result.records})
    print(f"{'pass':9} " + " ".join(f"{f'turn {t + 1} p50':>20}" for t in turns))
    for result in results:
        print(f"{result.name:9} " + " ".join(f"{str(ttft_by_turn(result, t)):>20}" for t in turns))
    by_name = {r.name: r for r in results}
    for name, peer, label in COMPARISONS:
        if {name, peer} <= set(by_name):
            ratio = ratio_by_repetition(by_name[name], by_name[peer])
            print(f"returning-turn TTFT p50, {label}: {ratio.median:.2f}x "
                  f"(min-max over repetitions {ratio.low:.2f}-{ratio.high:.2f}); by turn: " + ", ".join(
                      f"{t + 1}: {ttft_by_turn(by_name[name], t).median / ttft_by_turn(by_name[peer], t).median:.2f}x"
                      for t in turns))
    same, compared = answers_match(results)
    if compared:
        feature = "the cluster tier" if "cluster" in by_name else "FlexKV"
        print(f"answers identical with and without {feature}: {same}/{compared}")
    for result in results:
        for problem in result.problems:
            print(f"PROBLEM {result.name}: {problem}")


def write_json(results: list[PassResult], header: list[str], path: Path) -> None:
    body = {"header": header, "passes": [{
        "name": r.name, "wall_s": r.wall_s, "router_applied": {f"{k}/{s}": v for (k, s), v in r.router_applied.items()},
        "router_expected": r.router_expected, "relay": r.relay, "late_updates": r.late_updates, "problems": r.problems,
        "published": [{f"{k}/{m}": n for (k, m), n in p.items()} for p in r.published],
        "records": [asdict(rec) for rec in r.records]} for r in results]}
    path.write_text(json.dumps(body, indent=1))
