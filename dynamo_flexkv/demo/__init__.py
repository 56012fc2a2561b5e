"""The dynamo-flexkv demo: a real Dynamo deployment on this machine, with and without FlexKV.

`python -m dynamo_flexkv.demo` (or `bash scripts/demo.sh`, which installs the stack first) starts
Dynamo's frontend with KV-aware routing and two vLLM workers (CPU build, tiny offline model, file
discovery, a small "GPU" cache so blocks really get evicted), replays a multi-user, multi-turn chat
workload through the OpenAI endpoint — once with plain workers, once with FlexKV's CPU tier — and prints,
per worker and tier, the tokens served from cache, the blocks held, the KV events the router applied,
and time-to-first-token percentiles. Every service runs in its own session and is stopped by
process-group signal; the demo checks that no engine process is left behind.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dynamo_flexkv.integration.dynamo import client, processes
from dynamo_flexkv.integration.dynamo.kv_stream import KvEventStream, check_stream, count_events, router_updates

BLOCK = 32
CONTEXT_TOKENS = 192  # each user's own document / system prompt
PHASES = 7


@dataclass(frozen=True)
class Turn:
    user: int
    turn: int
    prompt: list[int]


def chat_workload(users: int, turns: int, seed: int = 0) -> list[Turn]:
    """Recorded conversations, replayed turn by turn across users (so caches churn between a user's turns).

    Each user owns a document; every turn appends the user's message to the history, and the recorded
    assistant answer is appended after it — the next turn's prompt extends the previous one.
    """
    rng = random.Random(seed)
    tokens = lambda n: [rng.randrange(3, 1000) for _ in range(n)]  # noqa: E731 (ids above the special tokens)
    history = [tokens(CONTEXT_TOKENS) for _ in range(users)]
    out = []
    for turn in range(turns):
        for user in range(users):
            history[user] = history[user] + tokens(rng.randrange(24, 48))
            out.append(Turn(user, turn, list(history[user])))
            history[user] = history[user] + tokens(16)  # the recorded answer
    return out


@dataclass
class WorkerStats:
    requests: int = 0
    prompt_tokens: int = 0
    gpu_hit_tokens: float = 0.0  # vLLM's prefix-cache hits (GPU tier)
    flexkv_hit_tokens: float = 0.0  # vLLM's external prefix-cache hits (FlexKV's CPU tier)
    gpu_blocks: int = 0  # held now, from the worker's own KV events
    cpu_blocks: int = 0
    published: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class PassResult:
    name: str
    workers: list[WorkerStats]
    ttft_ms: list[float]  # every request
    ttft_returning_ms: list[float]  # turns after the first: where a cache can help
    router: dict[tuple[str, str], float]  # (event_type, status) -> applied
    router_expected: int  # updates the workers published
    problems: list[str]


def phase(n: int, text: str) -> None:
    print(f"[{n}/{PHASES}] {text}", flush=True)


def run_pass(name: str, flexkv: bool, args: argparse.Namespace, workdir: Path, first_phase: int) -> PassResult:
    root = workdir / name
    dep = processes.Deployment(root)
    http, ports = processes.free_port(), [processes.free_port(), processes.free_port()]
    streams = [KvEventStream(f"ipc://{root}/kv-events-{i}", f"{name}-w{i}") for i in range(2)]
    what = f"with FlexKV (CPU tier {args.cpu_cache_gb} GiB each)" if flexkv else "without FlexKV"
    phase(first_phase, f"{name}: starting frontend (--router-mode kv) + 2 workers {what}; logs in {root / 'logs'}")
    try:
        dep.start("frontend", processes.frontend_argv(http, "kv"))
        for i, port in enumerate(ports):
            worker_args = ["--num-gpu-blocks-override", str(args.gpu_blocks), "--max-model-len", str(args.max_model_len),
                           "--kv-events-config", processes.kv_events_config(streams[i].endpoint)]
            env = {"DYN_SYSTEM_PORT": str(port)}
            if flexkv:
                worker_args += ["--connector", "flexkv"]
                env["FLEXKV_CPU_CACHE_GB"] = str(args.cpu_cache_gb)
            dep.start(f"worker{i}", processes.worker_argv(*worker_args), env)
        oa = client.OpenAIClient(f"http://127.0.0.1:{http}")
        metrics = lambda i: client.scrape(f"http://127.0.0.1:{ports[i]}/metrics")  # noqa: E731
        ids = [dep.wait_for(lambda i=i: client.worker_instance_id(metrics(i)), 600, f"{name} worker{i} up")
               for i in range(2)]
        dep.wait_for(lambda: len(_registered(http)) == 2 and oa.ready(), 120, f"{name}: router sees both workers")

        workload = chat_workload(args.users, args.turns, args.seed)
        phase(first_phase + 1, f"{name}: replaying {len(workload)} chat turns ({args.users} users x {args.turns} turns)")
        ttft, returning = [], []
        served, prompt_tokens = {wid: 0 for wid in ids}, {wid: 0 for wid in ids}
        for turn in workload:
            reply = oa.complete(turn.prompt, max_tokens=args.max_tokens)
            ttft.append(reply.ttft_ms)
            if turn.turn:
                returning.append(reply.ttft_ms)
            served[reply.worker_id] = served.get(reply.worker_id, 0) + 1
            prompt_tokens[reply.worker_id] = prompt_tokens.get(reply.worker_id, 0) + len(turn.prompt)
            dep.wait_for(lambda: _caught_up(http, streams), 30, "router applied the events")  # route on fresh state

        workers = []
        for i, wid in enumerate(ids):
            samples, rules = metrics(i), check_stream(streams[i].batches(), BLOCK)
            workers.append(WorkerStats(
                requests=served.get(wid, 0),
                prompt_tokens=prompt_tokens.get(wid, 0),
                gpu_hit_tokens=client.metric_sum(samples, "vllm:prefix_cache_hits_total"),
                flexkv_hit_tokens=client.metric_sum(samples, "vllm:external_prefix_cache_hits_total"),
                gpu_blocks=len(rules.held.get("GPU", ())), cpu_blocks=len(rules.held.get("CPU", ())),
                published=count_events(streams[i].events())))
        problems = [f"{s.name}: {p}" for s in streams for p in check_stream(s.batches(), BLOCK).problems]
        expected = sum(sum(router_updates(s.batches()).values()) for s in streams)
        applied = client.events_applied(client.scrape(f"http://127.0.0.1:{http}/metrics"))
        return PassResult(name, workers, ttft, returning, applied, expected, problems)
    finally:
        for stream in streams:
            stream.close()
        dep.stop()
        left = dep.members()
        if left:
            raise processes.ServiceError(f"{name}: processes {left} survived the shutdown")


def _registered(http: int) -> set[str]:
    samples = client.scrape(f"http://127.0.0.1:{http}/metrics")
    return {s.labels.get("router_worker_id", "") for s in samples
            if s.name == "dynamo_component_router_worker_registered" and s.value == 1}


def _caught_up(http: int, streams: list[KvEventStream]) -> bool:
    want = sum(sum(router_updates(s.batches()).values()) for s in streams)
    return sum(client.events_applied(client.scrape(f"http://127.0.0.1:{http}/metrics")).values()) >= want


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(results: list[PassResult]) -> None:
    print(f"\n{'pass':9} {'worker':6} {'requests':>8} {'prompt tok':>10} {'GPU-hit tok':>11} {'FlexKV-hit tok':>14} "
          f"{'recomputed':>10} {'GPU blocks':>10} {'CPU blocks':>10} {'events GPU/CPU':>15}")
    for result in results:
        for i, w in enumerate(result.workers):
            gpu_events = sum(n for (_, medium), n in w.published.items() if medium == "GPU")
            cpu_events = sum(n for (_, medium), n in w.published.items() if medium != "GPU")
            recomputed = w.prompt_tokens - w.gpu_hit_tokens - w.flexkv_hit_tokens
            print(f"{result.name:9} w{i:<5} {w.requests:8d} {w.prompt_tokens:10d} {w.gpu_hit_tokens:11.0f} "
                  f"{w.flexkv_hit_tokens:14.0f} {recomputed:10.0f} {w.gpu_blocks:10d} {w.cpu_blocks:10d} "
                  f"{f'{gpu_events}/{cpu_events}':>15}")
    print("\nKV router (frontend metric dynamo_component_kv_cache_events_applied, both workers):")
    for result in results:
        ok = {kind: int(n) for (kind, status), n in sorted(result.router.items()) if status == "ok" and n}
        rejected = {f"{k}/{s}": int(n) for (k, s), n in result.router.items() if s != "ok" and n}
        total = int(sum(result.router.values()))
        print(f"  {result.name:9} applied {total}/{result.router_expected} updates {ok}"
              f"{'; REJECTED ' + str(rejected) if rejected else ''}")
    print(f"\n{'TTFT (ms)':12} {'p50':>8} {'p90':>8}   {'returning turns p50':>20} {'p90':>8}")
    for result in results:
        print(f"{result.name:12} {percentile(result.ttft_ms, .5):8.1f} {percentile(result.ttft_ms, .9):8.1f}   "
              f"{percentile(result.ttft_returning_ms, .5):20.1f} {percentile(result.ttft_returning_ms, .9):8.1f}")
    for result in results:
        for problem in result.problems:
            print(f"EVENT RULE VIOLATION {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynamo_flexkv.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--gpu-blocks", type=int, default=24, help="vLLM cache size per worker, in blocks of 32 tokens")
    parser.add_argument("--cpu-cache-gb", type=float, default=0.25, help="FlexKV CPU tier per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, help="logs and discovery files (default: a temp dir, removed)")
    parser.add_argument("--only", choices=["baseline", "flexkv"], help="run one pass only")
    args = parser.parse_args(argv)
    args.max_model_len = min(1024, (args.gpu_blocks - 1) * BLOCK)  # one request may use the whole cache (less vLLM's null block)
    longest = max(len(t.prompt) for t in chat_workload(args.users, args.turns, args.seed)) + args.max_tokens
    if longest > args.max_model_len:
        parser.error(f"the longest turn needs {longest} tokens; raise --gpu-blocks above {longest // BLOCK + 1} "
                     "or lower --turns")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every service

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dynamo-flexkv-demo-"))
    model = processes.TINY_MODEL
    phase(1, f"setup: model {model}, workdir {workdir}, {args.gpu_blocks} cache blocks per worker")
    if not (model / "model.safetensors").exists():
        from dynamo_flexkv.tiny_model import build

        build(model)
    results, started = [], time.monotonic()
    passes = [(n, f) for n, f in (("baseline", False), ("flexkv", True)) if args.only in (None, n)]
    for name, flexkv in passes:  # each pass stops its services, also on error or SIGTERM
        results.append(run_pass(name, flexkv, args, workdir, 4 if flexkv else 2))
    phase(PHASES - 1, "shutdown: every service stopped by process group; no engine process left")
    phase(PHASES, f"results after {time.monotonic() - started:.0f}s")
    report(results)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.problems for r in results) else 0
