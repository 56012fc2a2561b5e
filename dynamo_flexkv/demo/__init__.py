"""The dynamo-flexkv demo: a real Dynamo deployment on this machine, with and without FlexKV.

`python -m dynamo_flexkv.demo` (or `bash scripts/demo.sh`, which installs the stack first) starts
Dynamo's frontend with KV-aware routing and two vLLM workers (CPU build, file discovery) serving a
model built offline whose prefill dominates a request, with a "GPU" cache that holds about one
conversation so vLLM's own cache churns. It replays a multi-user, multi-turn chat workload through
the OpenAI endpoint several times — once with plain workers, once with FlexKV's CPU tier — and prints
tokens by source per worker, the KV events the router applied against those published, and TTFT
(median and min-max over repetitions), writes the same figures as JSON and a PNG, and checks that no
engine process is left behind.

`--cluster` runs the cluster-tier comparison instead (not part of the default run): both workers share
a Mooncake Store started by the demo, and every returning turn is sent to the worker that did not
serve the user's previous turn -- once without the store ("flexkv"), once with it ("cluster") -- and
shows the tokens the other worker loaded from the store and the TTFT against the pass without it.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from dynamo_flexkv.devtools import tiny_model
from dynamo_flexkv.demo.passes import PassConfig, run_pass
from dynamo_flexkv.demo.workload import BLOCK, WorkloadShape
from dynamo_flexkv.devtools import processes

PHASES = 7


def phase(n: int, text: str, started: float) -> None:
    print(f"[{n}/{PHASES}] {time.monotonic() - started:5.0f}s  {text}", flush=True)


def ensure_model(path: Path) -> tuple[tiny_model.ModelShape, str, float]:
    """Build the demo model if missing; returns its shape, a description and the build time."""
    began = time.monotonic()
    stale = path == processes.DEMO_MODEL and (path / "config.json").exists() and \
        tiny_model.ModelShape.of(path)[0] != tiny_model.DEMO  # built by an earlier version
    if stale or not (path / "model.safetensors").exists():
        tiny_model.build(path, tiny_model.DEMO)
    shape, vocab = tiny_model.ModelShape.of(path)
    params = shape.parameters(vocab)
    text = (f"Llama {shape.layers} layers x {shape.hidden} ({shape.heads} heads, {shape.kv_heads} KV heads, "
            f"MLP {shape.intermediate}), {params / 1e6:.0f}M parameters ({params * shape.dtype_bytes / 2**20:.0f} MiB "
            f"{shape.dtype}), KV {shape.kv_bytes_per_token() // 1024} KiB/token, random weights built offline")
    return shape, text, time.monotonic() - began


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dynamo_flexkv.demo", description=__doc__.splitlines()[0])
    defaults = WorkloadShape()
    parser.add_argument("--users", type=int, default=defaults.users)
    parser.add_argument("--turns", type=int, default=defaults.turns)
    parser.add_argument("--context-tokens", type=int, default=defaults.context_tokens,
                        help="each user's document, the start of every one of its prompts")
    parser.add_argument("--repetitions", type=int, default=3, help="replays of the workload per pass")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--gpu-blocks", type=int,
                        help="vLLM cache per worker, in blocks of 32 tokens (default: the longest prompt + 2: "
                             "about one conversation, so a second user's turn evicts the first's blocks)")
    parser.add_argument("--cpu-cache-gb", type=float, default=0.5, help="FlexKV CPU tier per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", type=Path, default=processes.DEMO_MODEL,
                        help="model directory (built there if missing)")
    parser.add_argument("--results", type=Path, default=Path("demo-results"),
                        help="where the table, JSON and PNG go")
    parser.add_argument("--workdir", type=Path, help="logs and discovery files (default: a temp dir, removed)")
    parser.add_argument("--cluster", action="store_true",
                        help="the cluster-tier passes instead: returning turns sent to the other worker, without and "
                             "with a Mooncake Store shared by both workers")
    parser.add_argument("--cluster-cache-gb", type=float, default=0.5,
                        help="memory each worker contributes to the shared store (--cluster)")
    parser.add_argument("--only", choices=["baseline", "flexkv", "cluster"], help="run one pass only")
    args = parser.parse_args(argv)
    passes = ("flexkv", "cluster") if args.cluster else ("baseline", "flexkv")
    if args.only not in (None, *passes):
        parser.error(f"--only {args.only} is not a pass of this run ({', '.join(passes)})")
    args.shape = WorkloadShape(users=args.users, turns=args.turns, context_tokens=args.context_tokens)
    longest = args.shape.longest_prompt() + args.max_tokens
    if args.gpu_blocks is None:
        args.gpu_blocks = -(-longest // BLOCK) + 2
    if (args.gpu_blocks - 1) * BLOCK < longest:
        parser.error(f"the longest turn needs {longest} tokens; raise --gpu-blocks to {-(-longest // BLOCK) + 1} "
                     "or more, or lower --turns / --context-tokens")
    return args


def main(argv: list[str] | None = None) -> int:
    from dynamo_flexkv.demo import plots, report

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop every service
    started = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dynamo-flexkv-demo-"))
    shape, model_text, build_s = ensure_model(args.model)
    phase(1, f"setup: model {args.model} ({build_s:.0f}s); workdir {workdir}", started)
    header = [f"measured: {report.machine()}",
              f"demo model: {model_text}",
              f"workload: {args.users} users x {args.turns} turns x {args.repetitions} repetitions per pass, prompts "
              f"of {args.context_tokens}-{args.shape.longest_prompt()} tokens, {args.max_tokens} tokens generated; "
              f"{args.gpu_blocks} vLLM cache blocks of {BLOCK} tokens per worker"]
    for line in header[1:]:
        print(f"      {line}")
    if args.cluster:
        header.append("cluster passes: every returning turn is sent to the worker that did not serve the user's "
                      f"previous turn; 'cluster' adds a Mooncake Store both workers share ({args.cluster_cache_gb} GiB "
                      "contributed per worker); every process of a worker bound to its own cores")
        print(f"      {header[-1]}")
    results = []
    # (name, FlexKV on, memory each worker contributes to a shared store)
    passes = [("flexkv", True, 0.0), ("cluster", True, args.cluster_cache_gb)] if args.cluster else \
        [("baseline", False, 0.0), ("flexkv", True, 0.0)]
    for position, (name, flexkv, cluster_gb) in enumerate(passes):  # each stops its services, also on error or SIGTERM
        if args.only not in (None, name):
            continue
        first = 2 + 2 * position
        what = f"with FlexKV (CPU tier {args.cpu_cache_gb} GiB per worker)" if flexkv else "without FlexKV"
        if cluster_gb:
            what += " sharing a Mooncake Store"
        phase(first, f"{name}: starting frontend (--router-mode kv) + 2 workers {what}; logs in {workdir / name / 'logs'}",
              started)
        config = PassConfig(name=name, flexkv=flexkv, model=args.model, dtype=shape.dtype, shape=args.shape,
                            repetitions=args.repetitions, seed=args.seed, gpu_blocks=args.gpu_blocks,
                            max_tokens=args.max_tokens, cpu_cache_gb=args.cpu_cache_gb,
                            cluster_cache_gb=cluster_gb, cross_worker=args.cluster,
                            bind_workers=args.cluster)
        results.append(run_pass(config, workdir, lambda text, n=first + 1: phase(n, text, started)))
    phase(PHASES - 1, "shutdown: every service stopped by process group; no engine process left", started)
    baseline = next((r for r in results if r.name == "baseline"), None)
    if baseline is not None:
        per_token = report.prefill_ms_per_token(baseline)
        header.append(f"prefill cost measured here: {per_token:.2f} ms per prompt token (median TTFT / prompt "
                      f"tokens of uncached first turns) = ~{per_token * 2048:.0f} ms for a 2k-token prompt")
    args.results.mkdir(parents=True, exist_ok=True)
    png = plots.write_png(results, f"dynamo-flexkv demo — {header[0][len('measured: '):]}", args.results / "demo.png")
    report.write_json(results, header, args.results / "demo.json")
    phase(PHASES, f"results after {time.monotonic() - started:.0f}s; picture: {png.resolve()}; "
                  f"figures: {(args.results / 'demo.json').resolve()}", started)
    report.print_report(results, header)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.problems for r in results) else 0
