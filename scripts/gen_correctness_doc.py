#!/usr/bin/env python3
"""Regenerate docs/correctness.md, the correctness matrix, from the tests that prove its rows.

    python scripts/gen_correctness_doc.py            # rewrite docs/correctness.md
    python scripts/gen_correctness_doc.py --check    # exit 1 if it is out of date

A CPU-build row is a test decorated `@pytest.mark.correctness("<situation>", "<outcome>")`; the
situation must be one of SITUATIONS, so a row cannot be invented in a test without naming it here.
GPU-machine rows are runs of benchmarks/e2e_gpu.py on the lent GPU: the command and the JSON it wrote
under docs/results/ (tests/unit/test_correctness_doc.py checks that the file exists). The tests are
read with `ast`, not imported: generating the matrix starts no engine.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = ROOT / "docs" / "correctness.md"

# Every situation production meets where KV could be reused; each needs at least one proving row.
SITUATIONS = (
    "plain model",
    "sliding-window hybrid model",
    "sliding-window save racing block reuse",
    "MLA model",
    "tensor parallel (TP=2)",
    "preemption and resume",
    "chunked prefill",
    "P/D through NIXL",
    "SSD warm restart",
    "cluster tier across nodes",
    "reset with work in flight",
    "weights swapped behind one path",
    "KV dtype changed",
    "corrupt block",
    "foreign value planted in the cluster store",
    "cluster store stalled or dead",
)


@dataclass(frozen=True)
class Row:
    situation: str
    outcome: str
    proof: str  # a test node id, or a command
    where: str  # "CPU build" or "GPU machine"


@dataclass(frozen=True)
class GpuRun:
    situation: str
    outcome: str
    command: str
    result: str  # JSON under docs/results/ written by that command


GPU_RUNS = (
    GpuRun("plain model", "identical to vLLM's OffloadingConnector on 16/16 prompts, both load modes, and "
           "to the no-connector engine under cache pressure (Llama-3-8B shape, H200)",
           "python3 benchmarks/e2e_gpu.py --table all --parts correctness,ttft --reps 7 "
           "--configs recompute,flexkv-layerwise,flexkv-async,vllm-offloading",
           "docs/results/e2e_gpu-all-eager.json"),
    GpuRun("plain model", "tiny model under cache pressure, both model runners, layer-wise and async loads: "
           "the no-connector engine's tokens on 8/8 prompts asked again and 8/8 under pressure (H100, "
           "the layout's moved tree)",
           "python3 benchmarks/e2e_gpu.py --table smoke --out smoke.json",
           "docs/results/e2e_gpu-smoke-h100-layout-moves.json"),
    GpuRun("MLA model", "identical to vLLM's OffloadingConnector on 16/16 prompts (DeepSeek-V2-Lite attention shape)",
           "python3 benchmarks/e2e_gpu.py --table all --model mla --parts correctness,ttft "
           "--configs recompute,flexkv-layerwise,vllm-offloading",
           "docs/results/e2e_gpu-all-mla.json"),
    GpuRun("tensor parallel (TP=2)", "identical to the same engine's GPU prefix hit on 12/16; the other 4 diverge "
           "after 9-27 identical tokens (bf16 rounding; vLLM's own hit agrees with its recompute on 1/16)",
           "python3 benchmarks/e2e_gpu.py --table all --tp 2 --parts correctness,ttft "
           "--configs recompute,flexkv-layerwise",
           "docs/results/e2e_gpu-all-tp2.json"),
)


# GPU runs the matrix still lacks: (situation, the command that will prove it).
PENDING_GPU_RUNS = (
    ("sliding-window save racing block reuse", "python3 benchmarks/e2e_gpu.py --table sliding"),
)


def _marker_args(decorator: ast.expr) -> tuple[str, str] | None:
    """("situation", "outcome") of a `pytest.mark.correctness(...)` decorator, else None."""
    if not (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "correctness"):
        return None
    values = [a.value for a in decorator.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if len(values) != 2 or len(decorator.args) != 2:
        raise SystemExit(f"correctness marker at line {decorator.lineno} needs two string literals "
                         "(situation, outcome)")
    return values[0], values[1]


def test_rows(tests_dir: Path = ROOT / "tests") -> list[Row]:
    rows = []
    for path in sorted(tests_dir.rglob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for decorator in node.decorator_list:
                found = _marker_args(decorator)
                if found:
                    node_id = f"{path.relative_to(tests_dir.parent)}::{node.name}"
                    rows.append(Row(found[0], found[1], node_id, "CPU build"))
    return rows


def all_rows(tests_dir: Path = ROOT / "tests") -> list[Row]:
    rows = test_rows(tests_dir) + [Row(r.situation, r.outcome, f"`{r.command}` → {r.result}", "GPU machine")
                          for r in GPU_RUNS]
    order = {s: i for i, s in enumerate(SITUATIONS)}
    unknown = sorted({r.situation for r in rows} - set(order))
    if unknown:
        raise SystemExit(f"unknown situation(s) {unknown}: use one of SITUATIONS in {Path(__file__).name}")
    return sorted(rows, key=lambda r: (order[r.situation], r.where, r.proof))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    rows = all_rows()
    covered = {r.situation for r in rows}
    lines = [
        "# Correctness matrix",
        "",
        "The rule: **identical tokens, or recompute — never stale or foreign KV, never a hang.** Each row is",
        "a situation where KV could be reused, what the connector does there, and the test or device run",
        "that proves it. CPU-build rows are tests of the suite (`bash scripts/test.sh`; one alone:",
        "`.venv/bin/python -m pytest '<test id>'`), against a real vLLM engine and, where named, a real store;",
        "GPU-machine rows are runs of `benchmarks/e2e_gpu.py` inside vLLM on the lent GPU, with the JSON",
        "they wrote.",
        "",
        "Generated by `scripts/gen_correctness_doc.py` from the tests' `@pytest.mark.correctness` markers;",
        "`tests/unit/test_correctness_doc.py` fails when this file and the tests disagree.",
        "",
        "| situation | outcome | proved by | where |",
        "|---|---|---|---|",
    ]
    for r in rows:
        proof = r.proof if r.where == "GPU machine" else f"`{r.proof}`"
        lines.append(f"| {_cell(r.situation)} | {_cell(r.outcome)} | {_cell(proof)} | {r.where} |")
    missing = [s for s in SITUATIONS if s not in covered]
    if missing:
        lines += ["", "Not yet proved: " + ", ".join(missing) + "."]
    if PENDING_GPU_RUNS:
        lines += ["", "Not yet run on the GPU machine (no machine was lent since the code changed):"]
        lines += [f"- {situation}: `{command}`" for situation, command in PENDING_GPU_RUNS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if out of date")
    args = parser.parse_args(argv)
    wanted = render()
    existing = DEFAULT_OUTPUT.read_text(encoding="utf-8") if DEFAULT_OUTPUT.exists() else ""
    if args.check:
        if existing == wanted:
            return 0
        sys.stderr.write("".join(difflib.unified_diff(existing.splitlines(keepends=True),
                                                      wanted.splitlines(keepends=True),
                                                      fromfile=str(DEFAULT_OUTPUT), tofile="generated")))
        sys.stderr.write(f"\n{DEFAULT_OUTPUT} is out of date: run python scripts/gen_correctness_doc.py\n")
        return 1
    if existing != wanted:
        DEFAULT_OUTPUT.write_text(wanted, encoding="utf-8")
        print(f"wrote {DEFAULT_OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
