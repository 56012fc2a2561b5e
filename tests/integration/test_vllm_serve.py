"""`vllm serve` (vLLM's own OpenAI server, engine core in its own process) with nothing but the
documented FlexKV connector name: re-sent prompts are served from the CPU tier, and the connector's
`vllm:flexkv_*` metrics — the names Dynamo forwards — appear on /metrics, with every metric the Grafana
dashboard (deploy/grafana/dynamo-flexkv.json) reads."""

from __future__ import annotations

import json
import random
import re
import urllib.request

import pytest

from dynamo_flexkv.devtools.processes import PYTHON, Deployment, free_port
from tests.helpers import dashboard_metric_names, exposed_metric_names, random_prompt

pytestmark = pytest.mark.engine


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return response.read().decode()


def metric(text: str, name: str, tier: str) -> float:
    match = re.search(rf'^{re.escape(name)}\{{[^}}]*tier="{tier}"[^}}]*\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def test_vllm_serve_uses_flexkv_and_exports_its_metrics(tiny_model, tmp_path):
    port = free_port()
    argv = [PYTHON, "-m", "vllm.entrypoints.cli.main", "serve", tiny_model, "--host", "127.0.0.1",
            "--port", str(port), "--enforce-eager", "--block-size", "32", "--num-gpu-blocks-override", "24",
            "--max-model-len", "512", "--kv-transfer-config", '{"kv_connector":"FlexKVConnectorV1","kv_role":"kv_both"}']
    rng = random.Random(11)
    prompts = [random_prompt(rng, 300) for _ in range(4)]  # together far more than the 24-block cache
    with Deployment(tmp_path) as deployment:
        deployment.start("vllm", argv, env={"FLEXKV_CPU_CACHE_GB": "0.25"})
        deployment.wait_for(lambda: get(port, "/health") is not None, 300, "vllm serve health")

        def complete(prompt):
            body = {"model": tiny_model, "prompt": prompt, "max_tokens": 6, "temperature": 0}
            return post(port, "/v1/completions", body)["choices"][0]["text"]

        first = [complete(p) for p in prompts]
        again = [complete(p) for p in prompts]

        def metrics_with_hits():
            text = get(port, "/metrics")
            return text if metric(text, "vllm:flexkv_hit_tokens_total", "CPU") else None

        text = deployment.wait_for(metrics_with_hits, 60, "FlexKV hit metrics")
    assert again == first
    assert metric(text, "vllm:flexkv_hit_tokens_total", "CPU") >= len(prompts) * (299 // 32) * 32
    assert metric(text, "vllm:flexkv_held_blocks", "CPU") > 0
    assert metric(text, "vllm:flexkv_saved_bytes_total", "all") > 0
    # the equivalents of vLLM's native vllm:kv_offload_* metrics (docs/dynamo.md)
    hit = metric(text, "vllm:flexkv_hit_tokens_total", "CPU")
    queried = metric(text, "vllm:flexkv_query_tokens_total", "all")
    missed = metric(text, "vllm:flexkv_miss_tokens_total", "all")
    assert missed >= len(prompts) * (300 // 32) * 32  # the first round found nothing
    assert queried >= missed + hit
    assert metric(text, "vllm:flexkv_lookup_seconds_count", "all") >= 2 * len(prompts)
    assert metric(text, "vllm:flexkv_stored_blocks_total", "CPU") >= len(prompts) * (300 // 32)
    assert metric(text, "vllm:flexkv_loaded_bytes_total", "all") > 0
    for kind in ("load", "save"):
        assert metric(text, f"vllm:flexkv_{kind}_seconds_total", "all") > 0
        assert metric(text, f"vllm:flexkv_{kind}_size_bytes_count", "all") >= len(prompts)
        assert metric(text, f"vllm:flexkv_{kind}_size_bytes_sum", "all") > 0
    exposed = exposed_metric_names(text)
    missing = {title: names - exposed for title, names in dashboard_metric_names().items() if names - exposed}
    assert not missing, f"Grafana panels read metrics that /metrics lacks: {missing}"
