"""One pass of the demo: a Dynamo deployment (KV-routing frontend + two vLLM workers) replaying the workload.

Requests go one at a time, so each one's cache hits can be read as the change in its worker's
counters. After every request the pass waits (bounded) until the state the next request is routed on
is complete: the worker's stats for the request are recorded, FlexKV has announced the request's
blocks in its CPU tier (its save runs after the answer is sent), with the cluster tier on its writes
to the shared store have landed, and the router has applied every KV event both workers published.
So the router's count is compared with the publishers' at rest.

The cluster pass (`--cluster`) starts a Mooncake master for the pass; both workers contribute memory
to that one store and send every user's turn to the worker that did not serve the user's previous
turn, so the blocks a returning turn's previous turn added live only in the other worker's caches --
or in the store.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from dynamo_flexkv.demo.workload import BLOCK, Turn, WorkloadShape, chat_workload
from dynamo_flexkv.devtools import client, processes
from dynamo_flexkv.devtools.kv_stream import KvEventStream, check_stream, count_events, router_updates

SERVED_NAME = "demo-llama"
SETTLE_S = 60  # per request: stats recorded, saves announced, events applied
PUBLISHER_METRIC_PREFIX = "dynamo_component_kv_publisher_"  # Dynamo's relay in each worker
TIERS = ("CPU", "SSD", "MOONCAKE")  # FlexKV tiers as named in its metrics; MOONCAKE is the cluster tier


@dataclass(frozen=True)
class PassConfig:
    name: str
    flexkv: bool
    model: Path
    dtype: str  # the model's own (see tiny_model.DEMO)
    shape: WorkloadShape
    repetitions: int
    seed: int
    gpu_blocks: int
    max_tokens: int
    cpu_cache_gb: float
    cluster_cache_gb: float = 0.0  # > 0: the workers share a Mooncake store, each contributing this much
    cross_worker: bool = False  # every turn goes to the worker that did not serve the user's previous one
    bind_workers: bool = False  # every process of a worker on its cores, not only its OpenMP threads

    @property
    def cluster(self) -> bool:
        return self.cluster_cache_gb > 0

    @property
    def max_model_len(self) -> int:
        return (self.gpu_blocks - 1) * BLOCK  # one request may use the whole cache (less vLLM's null block)


@dataclass(frozen=True)
class RequestRecord:
    repetition: int
    user: int
    turn: int
    worker: int  # index of the worker that served it (0 or 1)
    pinned: bool  # sent to a chosen worker instead of routed
    prompt_tokens: int
    ttft_ms: float
    text: str
    gpu_hit_tokens: int  # vLLM's own prefix cache
    tier_hit_tokens: dict[str, int]  # FlexKV tier (see TIERS) -> tokens loaded from it

    @property
    def key(self) -> tuple[int, int, int]:
        return self.repetition, self.user, self.turn

    @property
    def recomputed_tokens(self) -> int:
        return self.prompt_tokens - self.gpu_hit_tokens - sum(self.tier_hit_tokens.values())


@dataclass
class PassResult:
    name: str
    records: list[RequestRecord]
    router_applied: dict[tuple[str, str], float]  # (event_type, status) -> updates applied
    router_expected: int  # updates the workers published (counted on our own subscription)
    published: list[dict[tuple[str, str], int]]  # per worker: (event type, medium) -> events
    relay: list[dict[str, float]]  # per worker: Dynamo's publisher counters
    late_updates: list[int] = field(default_factory=list)  # per request, see _Settler.late_updates
    problems: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def router_applied_total(self) -> int:
        return int(sum(self.router_applied.values()))

    @property
    def router_rejected(self) -> dict[str, int]:
        return {f"{kind}/{status}": int(n) for (kind, status), n in self.router_applied.items() if status != "ok" and n}


def run_pass(config: PassConfig, workdir: Path, progress) -> PassResult:
    root = workdir / config.name
    dep = processes.Deployment(root)
    http, ports = processes.free_port(), [processes.free_port(), processes.free_port()]
    streams = [KvEventStream(f"ipc://{root}/kv-events-{i}", f"{config.name}-w{i}") for i in range(2)]
    started = time.monotonic()
    try:
        store = processes.start_mooncake_master(dep) if config.cluster else None
        dep.start("frontend", processes.frontend_argv(http, "kv"))
        for i, port in enumerate(ports):
            cores = _worker_cores(i)
            argv = _worker_argv(config, streams[i].endpoint)
            dep.start(f"worker{i}", processes.bound_to(cores, argv) if config.bind_workers else argv,
                      _worker_env(config, port, cores, store))
        openai = client.OpenAIClient(f"http://127.0.0.1:{http}", SERVED_NAME)
        metrics = [lambda port=port: client.scrape(f"http://127.0.0.1:{port}/metrics") for port in ports]
        ids = [dep.wait_for(lambda i=i: client.worker_instance_id(metrics[i]()), 600, f"{config.name} worker{i} up")
               for i in range(2)]
        dep.wait_for(lambda: len(_registered(http)) == 2 and openai.ready(), 120,
                     f"{config.name}: router sees both workers")
        settle = _Settler(dep, http, streams, metrics, config.flexkv, config.cluster)
        progress(f"{config.name}: workers up after {time.monotonic() - started:.0f}s; warming each worker up")
        # First requests pay one-time kernel set-up: keep them out of the figures. Two turns of one
        # conversation per worker: a whole prefill, then one that extends a cached prefix.
        warm_up = chat_workload(config.shape, seed=config.seed + 7919)
        for i, wid in enumerate(ids):
            for turn in (t for t in warm_up if t.user == 0 and t.turn < 2):
                openai.complete(turn.prompt, max_tokens=config.max_tokens, worker_id=wid)
                settle.after(i, turn.prompt)

        records: list[RequestRecord] = []
        for repetition in range(config.repetitions):
            workload = chat_workload(config.shape, config.seed, repetition)
            progress(f"{config.name}: repetition {repetition + 1}/{config.repetitions}: {len(workload)} turns "
                     f"({config.shape.users} users x {config.shape.turns} turns)")
            for turn in workload:
                records.append(_send(turn, openai, ids, settle, config))
        applied = client.events_applied(client.scrape(f"http://127.0.0.1:{http}/metrics"))
        expected = settle.published()
        return PassResult(
            name=config.name, records=records, router_applied=applied, router_expected=expected,
            published=[count_events(s.events()) for s in streams],
            relay=[_relay_counters(m()) for m in metrics], late_updates=settle.late_updates,
            problems=settle.problems + [f"{s.name}: {p}" for s in streams
                                        for p in check_stream(s.batches(), BLOCK).problems],
            wall_s=time.monotonic() - started)
    finally:
        for stream in streams:
            stream.close()
        dep.stop()
        left = dep.members()
        if left:
            raise processes.ServiceError(f"{config.name}: processes {left} survived the shutdown")


def _worker_argv(config: PassConfig, events_endpoint: str) -> list[str]:
    args = ["--num-gpu-blocks-override", str(config.gpu_blocks), "--max-model-len", str(config.max_model_len),
            "--dtype", config.dtype,
            "--kv-events-config", processes.kv_events_config(events_endpoint)]
    if config.flexkv:
        args += ["--connector", "flexkv"]
    return processes.worker_argv(*args, model=config.model, served_name=SERVED_NAME)


def _worker_cores(worker: int) -> str:
    """The worker's half of the cores ("0", "2-3"): on a 2-core machine, one core each."""
    cores = os.cpu_count() or 2
    half = max(1, cores // 2)
    first = worker * half % cores
    return f"{first}-{first + half - 1}" if half > 1 else str(first)


def _worker_env(config: PassConfig, system_port: int, cores: str, store: str | None) -> dict[str, str]:
    # Each worker computes on its own half of the cores. Requests go one at a time, so this costs the
    # busy worker half the machine, but no OpenMP thread of one worker ever waits at a barrier for a
    # thread that the other worker (or anything else) preempted. The cluster passes bind the whole
    # worker (config.bind_workers): a store read waits by spinning (Mooncake polls its transfer), and
    # while it waits vLLM's engine steps every millisecond, which keeps its worker process spinning too;
    # unbound, the spinning thread ran on the other worker's core and starved that worker -- which
    # serves the read from its share of the store, and whose Dynamo runtime then missed its discovery
    # lease (see docs/cluster-tier.md).
    env = {"DYN_SYSTEM_PORT": str(system_port), "VLLM_CPU_OMP_THREADS_BIND": cores}
    if config.flexkv:
        env["FLEXKV_CPU_CACHE_GB"] = str(config.cpu_cache_gb)
    if store:
        env.update(FLEXKV_REMOTE_STORE=store, FLEXKV_REMOTE_CACHE_GB=str(config.cluster_cache_gb))
    return env


def _send(turn: Turn, openai: client.OpenAIClient, ids: list[int], settle: _Settler, config: PassConfig) -> RequestRecord:
    # A user's first turn goes to a fixed worker in every pass, so passes start from the same split;
    # returning turns are routed by the KV router, or alternate between the workers (cross_worker).
    pinned = turn.turn == 0 or config.cross_worker
    before = [settle.counters(i) for i in range(2)]
    reply = openai.complete(turn.prompt, max_tokens=config.max_tokens,
                            worker_id=ids[(turn.user + turn.turn) % 2] if pinned else None)
    published_at_answer = settle.published()
    worker = ids.index(reply.worker_id)
    after = settle.after(worker, turn.prompt)
    settle.late_updates.append(settle.published() - published_at_answer)
    tiers = {tier: int(after.get(f"hit:{tier}", 0) - before[worker].get(f"hit:{tier}", 0)) for tier in TIERS}
    return RequestRecord(
        repetition=turn.repetition, user=turn.user, turn=turn.turn, worker=worker, pinned=pinned,
        prompt_tokens=len(turn.prompt), ttft_ms=reply.ttft_ms, text=reply.text,
        gpu_hit_tokens=int(after["gpu_hits"] - before[worker]["gpu_hits"]),
        tier_hit_tokens={tier: n for tier, n in tiers.items() if n})


class _Settler:
    """Waits, after a request, until the state the next request is routed on is complete."""

    def __init__(self, dep: processes.Deployment, http: int, streams: list[KvEventStream], metrics, flexkv: bool,
                 cluster: bool):
        self.dep, self.http, self.streams, self.metrics, self.flexkv = dep, http, streams, metrics, flexkv
        self.cluster = cluster
        # per worker: the prompt blocks it served (by token prefix); each is in its view of the store
        # once its write (or the load that found it there) has landed
        self._store_view: dict[int, set[int]] = {i: set() for i in range(len(streams))}
        self.problems: list[str] = []
        # per request: router updates published after its answer reached us (a FlexKV save, a last
        # block filled by the final decode step); a count read at the answer would miss them
        self.late_updates: list[int] = []
        self._queries = {i: self.counters(i)["queries"] for i in range(len(streams))}  # prompt tokens seen

    def counters(self, worker: int) -> dict[str, float]:
        samples = self.metrics[worker]()
        out = {"queries": client.metric_sum(samples, "vllm:prefix_cache_queries_total"),
               "gpu_hits": client.metric_sum(samples, "vllm:prefix_cache_hits_total")}
        for tier in TIERS:
            out[f"hit:{tier}"] = client.metric_sum(samples, "vllm:flexkv_hit_tokens_total", tier=tier)
        out["held:MOONCAKE"] = client.metric_sum(samples, "vllm:flexkv_held_blocks", tier="MOONCAKE")
        return out

    def after(self, worker: int, prompt: list[int]) -> dict[str, float]:
        """Counters of `worker` once its stats for `prompt` are recorded; then wait for saves and events."""
        queries = self._queries[worker] + len(prompt)
        now = self._wait(lambda: (c := self.counters(worker))["queries"] >= queries and c,
                         f"worker{worker} recorded the request's stats")
        self._queries[worker] = now["queries"] if now else queries
        if self.flexkv:
            full = len(prompt) // BLOCK
            self._wait(lambda: check_stream(self.streams[worker].batches(), BLOCK).held_prefix_blocks(prompt, "CPU")
                       >= full, f"worker{worker} announced the prompt's {full} blocks in its CPU tier")
        if self.cluster:  # the store is not announced to the router: read the worker's view of it
            view = self._store_view[worker]
            view.update(hash(tuple(prompt[:(n + 1) * BLOCK])) for n in range(len(prompt) // BLOCK))
            self._wait(lambda: self.counters(worker)["held:MOONCAKE"] >= len(view),
                       f"worker{worker} wrote the prompt's blocks to the cluster store ({len(view)} blocks in its view)")
        self._wait(self._router_caught_up, "router applied every published KV event")
        return now or self.counters(worker)

    def published(self) -> int:
        """Router updates both workers have published so far, as counted on our own subscription."""
        return sum(sum(router_updates(s.batches()).values()) for s in self.streams)

    def _router_caught_up(self) -> bool:
        want = self.published()
        applied = client.events_applied(client.scrape(f"http://127.0.0.1:{self.http}/metrics"))
        return sum(applied.values()) == want

    def _wait(self, condition, what: str):
        try:
            return self.dep.wait_for(condition, SETTLE_S, what, interval_s=0.05)
        except TimeoutError as err:
            self.problems.append(str(err))
            return None


def _registered(http: int) -> set[str]:
    samples = client.scrape(f"http://127.0.0.1:{http}/metrics")
    return {s.labels.get("router_worker_id", "") for s in samples
            if s.name == "dynamo_component_router_worker_registered" and s.value == 1}


def _relay_counters(samples: list[client.Sample]) -> dict[str, float]:
    """Dynamo's own counts in the worker's relay: vLLM events it received and accepted per type
    ("stored/received", ...), and events it found missing from vLLM's sequence ("dropped")."""
    out: dict[str, float] = {}
    for s in samples:
        if s.name == f"{PUBLISHER_METRIC_PREFIX}zmq_events_total":
            key = f"{s.labels.get('event_type', '?')}/{s.labels.get('stage', '?')}"
        elif s.name == f"{PUBLISHER_METRIC_PREFIX}engines_dropped_events_total":
            key = "dropped"
        else:
            continue
        out[key] = out.get(key, 0.0) + s.value
    return out
