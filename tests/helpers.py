"""Small helpers shared by the test modules."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from dynamo_flexkv.devtools.harness import EngineHost


def random_prompt(rng: random.Random, length: int, vocab: int = 1000) -> list[int]:
    """Token ids above the special tokens (0-2), so prompts never contain an end-of-sequence."""
    return [rng.randrange(3, vocab) for _ in range(length)]


# Engine settings shared by the integration tests: tiny blocks and a tiny "GPU" cache, so that
# prompts of a few hundred tokens span many blocks and get pushed out of vLLM's cache.
BLOCK = 32
GPU_BLOCKS = 24  # a small "GPU" cache, so eviction really happens
ENGINE = dict(
    enforce_eager=True,
    enable_prefix_caching=True,
    block_size=BLOCK,
    num_gpu_blocks_override=GPU_BLOCKS,
    max_model_len=512,
    max_num_batched_tokens=1024,
    max_num_seqs=32,
    dtype="bfloat16",
    seed=0,
)
COMPAT_CONFIG = {"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both"}


def push_out_of_gpu_cache(host: EngineHost, rng: random.Random) -> None:
    """Run unrelated prompts that fill vLLM's small cache twice over."""
    host.generate([random_prompt(rng, GPU_BLOCKS * BLOCK // 2) for _ in range(4)], max_tokens=2, one_at_a_time=True)


DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "dynamo-flexkv.json"


def dashboard_metric_names(path: Path = DASHBOARD) -> dict[str, set[str]]:
    """Panel title -> the metric names its PromQL expressions read."""
    panels = json.loads(path.read_text())["panels"]
    return {p["title"]: {name for t in p.get("targets", []) for name in re.findall(r"vllm:[a-z_:]+", t["expr"])}
            for p in panels}


def exposed_metric_names(metrics_text: str) -> set[str]:
    """Metric names a Prometheus /metrics page exposes, with or without samples yet (a labelled counter
    that never counted has only its `# TYPE` line); counters under both their family and `_total` names."""
    names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{|\s)", metrics_text, re.M))
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", metrics_text, re.M):
        names.add(name)
        if kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names


def wait_until(predicate, timeout_s: float, what: str = "the condition"):
    """Poll `predicate` until it returns something truthy, and return that; AssertionError after
    `timeout_s`. For state a background thread changes with no future to wait on."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g}s waiting for {what}"
        time.sleep(0.01)
    return value
