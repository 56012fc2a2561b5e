#!/usr/bin/env python3
"""End to end on one vLLM CPU engine (no Dynamo): recompute vs FlexKV's CPU tier vs its SSD tier.

The demo's workload (`dynamo_flexkv.demo.workload`: users' chat turns replayed turn by turn, a
fresh seed per repetition) and the demo's model (`tiny_model.DEMO`, built offline if missing), sent
one request at a time to one engine in a child process (`dynamo_flexkv.devtools.harness.EngineHost`), with
vLLM's own cache sized to about one conversation so it churns between a user's turns:

- recompute: vLLM alone; whatever its own cache lost is computed again.
- cpu:       FlexKV with a CPU tier that holds the whole workload.
- ssd:       FlexKV with a CPU tier smaller than the working set between a user's turns and an SSD
             tier behind it, so returning turns come back from disk (staged through the CPU tier).

Per mode and repetition: the p50/p90 of TTFT over returning turns (turns after a user's first),
measured inside the engine process from `add_request` to the first token; then the median and
min-max over repetitions, and the per-repetition ratio against recompute (same prompts). Answers
are compared with recompute's. Writes JSON and prints a table.

    .venv/bin/python benchmarks/e2e_cpu.py                         # all three modes, 3 repetitions
    .venv/bin/python benchmarks/e2e_cpu.py --modes recompute cpu --repetitions 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynamo_flexkv.devtools import tiny_model  # noqa: E402
from dynamo_flexkv.demo.report import machine  # noqa: E402
from dynamo_flexkv.demo.workload import BLOCK, Spread, WorkloadShape, chat_workload, percentile  # noqa: E402
from dynamo_flexkv.devtools.harness import EngineHost  # noqa: E402
from dynamo_flexkv.devtools.processes import DEMO_MODEL  # noqa: E402

MODES = ("recompute", "cpu", "ssd")
FLEXKV = {"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both"}


def engine_kwargs(mode: str, gpu_blocks: int, dtype: str) -> dict:
    kwargs = dict(enforce_eager=True, enable_prefix_caching=True, block_size=BLOCK, dtype=dtype, seed=0,
                  num_gpu_blocks_override=gpu_blocks, max_model_len=(gpu_blocks - 1) * BLOCK)
    if mode != "recompute":
        kwargs["kv_transfer_config"] = FLEXKV
    return kwargs


def engine_env(mode: str, shape: WorkloadShape, model: tiny_model.ModelShape, ssd_dir: Path) -> dict[str, str]:
    if mode == "cpu":
        return {"FLEXKV_CPU_CACHE_GB": "1"}
    if mode == "ssd":
        # A CPU tier of about one conversation: the other users' turns push a user's blocks down to SSD.
        cpu_gb = shape.longest_prompt() * model.kv_bytes_per_token() / 2**30
        return {"FLEXKV_CPU_CACHE_GB": f"{cpu_gb:.3f}", "FLEXKV_SSD_CACHE_GB": "2",
                "FLEXKV_SSD_CACHE_DIR": str(ssd_dir)}
    return {}


def run_mode(mode: str, model: Path, shape: WorkloadShape, args: argparse.Namespace, workdir: Path) -> dict:
    started = time.monotonic()
    ssd_dir = workdir / f"ssd-{mode}"
    ssd_dir.mkdir(parents=True, exist_ok=True)
    records = []
    model_shape, _ = tiny_model.ModelShape.of(model)
    with EngineHost(str(model), engine_kwargs(mode, args.gpu_blocks, model_shape.dtype),
                    env=engine_env(mode, shape, model_shape, ssd_dir)) as host:
        warm = chat_workload(shape, seed=args.seed + 7919)
        host.generate([t.prompt for t in warm if t.user == 0 and t.turn < 2], args.max_tokens, one_at_a_time=True)
        for repetition in range(args.repetitions):
            workload = chat_workload(shape, args.seed, repetition)
            done = host.generate([t.prompt for t in workload], args.max_tokens, one_at_a_time=True)
            for turn, completion in zip(workload, done):
                records.append({"repetition": repetition, "user": turn.user, "turn": turn.turn,
                                "prompt_tokens": len(turn.prompt), "ttft_ms": completion.ttft_s * 1000,
                                "cached_tokens": completion.num_cached_tokens,
                                "flexkv_tokens": completion.flexkv_tokens, "token_ids": completion.token_ids})
            print(f"  {mode}: repetition {repetition + 1}/{args.repetitions} done "
                  f"({time.monotonic() - started:.0f}s)", flush=True)
        state = host.flexkv_state() if mode != "recompute" else {}
    return {"mode": mode, "records": records, "flexkv_state": state, "wall_s": time.monotonic() - started}


def returning_by_repetition(result: dict, q: float) -> list[float]:
    reps = sorted({r["repetition"] for r in result["records"]})
    return [percentile([r["ttft_ms"] for r in result["records"] if r["repetition"] == rep and r["turn"] > 0], q)
            for rep in reps]


def summarize(results: list[dict]) -> list[dict]:
    baseline = next((r for r in results if r["mode"] == "recompute"), None)
    reference = {(r["repetition"], r["user"], r["turn"]): r["token_ids"] for r in baseline["records"]} if baseline else {}
    rows = []
    for result in results:
        p50 = returning_by_repetition(result, 0.5)
        ratio = (Spread.of([m / b for m, b in zip(p50, returning_by_repetition(baseline, 0.5)) if b])
                 if baseline and result is not baseline else None)
        returning = [r for r in result["records"] if r["turn"] > 0]
        same = sum(reference.get((r["repetition"], r["user"], r["turn"])) == r["token_ids"] for r in result["records"])
        rows.append({
            "mode": result["mode"], "p50": Spread.of(p50), "p90": Spread.of(returning_by_repetition(result, 0.9)),
            "ratio": ratio, "answers_same": same, "answers": len(result["records"]),
            "cached_share": sum(r["cached_tokens"] for r in returning) / max(1, sum(r["prompt_tokens"] for r in returning)),
            "flexkv_tokens": sum(r["flexkv_tokens"] for r in returning), "wall_s": result["wall_s"]})
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(f"\n{header}")
    print(f"{'mode':10} {'returning TTFT p50 ms':>24} {'p90 ms':>22} {'p50 / recompute':>22} "
          f"{'cached share':>12} {'FlexKV tok':>10} {'same answers':>12}")
    for row in rows:
        ratio = row["ratio"]
        ratio_text = f"{ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f})" if ratio else "-"
        print(f"{row['mode']:10} {str(row['p50']):>24} {str(row['p90']):>22} {ratio_text:>22} "
              f"{row['cached_share']:12.0%} {row['flexkv_tokens']:10d} {row['answers_same']:>6}/{row['answers']:<5}")
    print("(median over repetitions of each repetition's percentile, min-max in brackets)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--users", type=int, default=WorkloadShape.users)
    ap.add_argument("--turns", type=int, default=WorkloadShape.turns)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, default=DEMO_MODEL, help="built there (tiny_model.DEMO) if missing")
    ap.add_argument("--json", type=Path, default=Path("e2e_cpu.json"))
    args = ap.parse_args()
    shape = WorkloadShape(users=args.users, turns=args.turns)
    args.gpu_blocks = -(-(shape.longest_prompt() + args.max_tokens) // BLOCK) + 2
    if not (args.model / "model.safetensors").exists():
        tiny_model.build(args.model, tiny_model.DEMO)
    model_shape, vocab = tiny_model.ModelShape.of(args.model)
    header = (f"{machine()}; model {model_shape.layers} layers x {model_shape.hidden} {model_shape.dtype}, "
              f"{model_shape.parameters(vocab) / 1e6:.0f}M parameters; "
              f"{args.users} users x {args.turns} turns x {args.repetitions} repetitions; "
              f"{args.gpu_blocks} vLLM cache blocks of {BLOCK} tokens")
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="e2e-cpu-") as workdir:
        results = [run_mode(mode, args.model, shape, args, Path(workdir)) for mode in args.modes]
    rows = summarize(results)
    print_table(rows, header)
    args.json.write_text(json.dumps({
        "header": header,
        "summary": [{**row, **{k: row[k].__dict__ if row[k] else None for k in ("p50", "p90", "ratio")}}
                    for row in rows],
        "results": results}, indent=1, default=list))
    print(f"JSON: {args.json.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
