"""Talk to a running Dynamo deployment: OpenAI requests, Prometheus metrics, readiness.

Plain `urllib` (no extra dependency), so the demo runs from a bare install of the stack.
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The frontend's KV-router counter of events applied to its index, labelled event_type/status/worker_id.
EVENTS_APPLIED = "dynamo_component_kv_cache_events_applied"
EVENT_WARNINGS = "dynamo_component_kv_cache_event_warnings"
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def http_get(url: str, timeout_s: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def post_json(url: str, body: Mapping[str, Any], timeout_s: float = 300.0) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"POST {url} -> HTTP {err.code}: {err.read().decode(errors='replace')[:500]}") from None


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append(Sample(match.group(1), labels, float(match.group(3))))
    return samples


def metric_sum(samples: Sequence[Sample], name: str, **labels: str) -> float:
    """Sum of `name` over samples whose labels include `labels`."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def scrape(url: str) -> list[Sample]:
    return parse_metrics(http_get(url))


def events_applied(frontend_metrics: Sequence[Sample]) -> dict[tuple[str, str], float]:
    """(event_type, status) -> count, summed over workers, from the frontend's router metrics."""
    out: dict[tuple[str, str], float] = {}
    for s in frontend_metrics:
        if s.name == EVENTS_APPLIED:
            key = (s.labels.get("event_type", ""), s.labels.get("status", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


@dataclass(frozen=True)
class Completion:
    text: str
    cached_tokens: int  # vLLM's prompt_tokens_details.cached_tokens (GPU prefix cache + connector)
    prompt_tokens: int
    ttft_ms: float  # measured by the frontend (nvext timing)
    worker_id: int | None  # the decode (or aggregated) worker that served it
    prefill_worker_id: int | None


class OpenAIClient:
    def __init__(self, base_url: str, model: str = "tiny"):
        self.base_url, self.model = base_url.rstrip("/"), model

    def complete(self, prompt: str | Sequence[int], max_tokens: int = 8, worker_id: int | None = None,
                 **extra: Any) -> Completion:
        """Greedy completion of a text or token-id prompt; `worker_id` pins it to one worker (no routing)."""
        nvext: dict[str, Any] = {"extra_fields": ["worker_id", "timing"]}
        if worker_id is not None:
            nvext["backend_instance_id"] = worker_id
        body = {"model": self.model, "prompt": prompt if isinstance(prompt, str) else list(prompt),
                "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True, "nvext": nvext, **extra}
        return _completion(post_json(f"{self.base_url}/v1/completions", body), text_of=lambda c: c["text"])

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int = 8) -> Completion:
        body = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "nvext": {"extra_fields": ["worker_id", "timing"]}}
        return _completion(post_json(f"{self.base_url}/v1/chat/completions", body),
                           text_of=lambda c: c["message"]["content"] or "")

    def ready(self) -> bool:
        models = json.loads(http_get(f"{self.base_url}/v1/models"))
        return any(m.get("id") == self.model for m in models.get("data", []))


def _completion(reply: dict[str, Any], text_of) -> Completion:
    usage = reply.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    nvext = reply.get("nvext") or {}
    workers = nvext.get("worker_id") or {}
    timing = nvext.get("timing") or {}
    return Completion(
        text=text_of(reply["choices"][0]),
        cached_tokens=int(details.get("cached_tokens") or 0),
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        ttft_ms=float(timing.get("ttft_ms") or 0.0),
        worker_id=workers.get("decode_worker_id"),
        prefill_worker_id=workers.get("prefill_worker_id"),
    )


def worker_instance_id(worker_metrics: Sequence[Sample]) -> int | None:
    """A worker's Dynamo instance id: its system metrics carry it as a hex `worker_id` label."""
    for s in worker_metrics:
        if s.name.startswith("vllm:") and "worker_id" in s.labels:
            return int(s.labels["worker_id"], 16)
    return None


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll a condition (no deployment attached); for waits on metrics and event streams."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
        time.sleep(interval_s)
