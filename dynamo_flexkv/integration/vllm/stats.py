"""Connector statistics through vLLM's `KVConnectorStats` path, and their Prometheus metrics.

Workers report bytes and blocks moved; the scheduler reports hits, evictions and blocks held per tier.
vLLM merges both into one dict per interval, keyed `name` or `name:TIER`. Metric names start with
`vllm:` because Dynamo forwards only `vllm:`-prefixed engine metrics to its endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats


@dataclass(frozen=True)
class MetricSpec:
    name: str
    documentation: str
    gauge: bool = False  # a level (latest value wins), not a count (summed)


# stats key (before any ":TIER") -> its Prometheus metric
METRICS = {
    "hit_tokens": MetricSpec("vllm:flexkv_hit_tokens", "Prompt tokens served from a FlexKV tier."),
    "evicted_blocks": MetricSpec("vllm:flexkv_evicted_blocks", "Blocks evicted from a FlexKV tier to make room."),
    "held_blocks": MetricSpec("vllm:flexkv_held_blocks", "Blocks held in a FlexKV tier.", gauge=True),
    "loaded_bytes": MetricSpec("vllm:flexkv_loaded_bytes", "Bytes copied from FlexKV into vLLM's KV cache."),
    "saved_bytes": MetricSpec("vllm:flexkv_saved_bytes", "Bytes copied from vLLM's KV cache into FlexKV."),
    "failed_loads": MetricSpec("vllm:flexkv_failed_loads", "Loads that failed and were recomputed."),
    "failed_saves": MetricSpec("vllm:flexkv_failed_saves", "Saves that failed and were dropped."),
}


def _split(key: str) -> tuple[str, str]:
    name, _, tier = key.partition(":")
    return name, tier


class FlexKVStats(KVConnectorStats):
    """One interval of counters (summed when vLLM aggregates ranks and steps) and gauges."""

    def reset(self) -> None:
        self.data = {}

    def add(self, key: str, value: int) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if METRICS[_split(key)[0]].gauge:
                self.data[key] = value
            else:
                self.add(key, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not self.data


class FlexKVPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics = {}
        for key, spec in METRICS.items():
            cls = self._gauge_cls if spec.gauge else self._counter_cls
            self._metrics[key] = cls(name=spec.name, documentation=spec.documentation,
                                     labelnames=[*labelnames, "tier"])

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for key, value in transfer_stats_data.items():
            name, tier = _split(key)
            metric = self._metrics.get(name)
            if metric is None:
                continue
            child = metric.labels(*labels, tier or "all")
            if METRICS[name].gauge:
                child.set(value)
            elif value:
                child.inc(value)
