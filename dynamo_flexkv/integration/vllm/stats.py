"""Connector statistics through vLLM's `KVConnectorStats` path, and their Prometheus metrics.

Workers report bytes moved and how long each copy took; the scheduler reports lookups, hits, misses,
stores, evictions, blocks held and lower-tier I/O per tier. vLLM merges both into one dict per
interval, keyed `name` or `name:TIER`: a count (summed), a level (latest wins) or a list of
observations (a histogram). Metric names start with `vllm:` because Dynamo forwards only
`vllm:`-prefixed engine metrics to its endpoint. Each has an equivalent among vLLM's native
offloading metrics (`vllm:kv_offload_*`), named in `NATIVE_EQUIVALENT` and in docs/dynamo.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
SIZE_BUCKETS = (1e6, 5e6, 10e6, 20e6, 40e6, 60e6, 80e6, 100e6, 150e6, 200e6)  # bytes, as vLLM's
LOOKUP_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1)  # seconds, as vLLM's


@dataclass(frozen=True)
class MetricSpec:
    name: str
    documentation: str
    kind: str = COUNTER
    buckets: tuple[float, ...] = ()


# stats key (before any ":TIER") -> its Prometheus metric
METRICS = {
    "query_tokens": MetricSpec("vllm:flexkv_query_tokens", "Prompt tokens looked up in FlexKV (full blocks beyond "
                               "vLLM's GPU prefix-cache hit), per lookup."),
    "miss_tokens": MetricSpec("vllm:flexkv_miss_tokens", "Looked-up tokens no FlexKV tier held."),
    "hit_tokens": MetricSpec("vllm:flexkv_hit_tokens", "Prompt tokens served from a FlexKV tier."),
    "lookup_seconds": MetricSpec("vllm:flexkv_lookup_seconds", "Time the scheduler spent in one FlexKV lookup.",
                                 HISTOGRAM, LOOKUP_BUCKETS),
    "stored_blocks": MetricSpec("vllm:flexkv_stored_blocks", "Blocks committed to a FlexKV tier."),
    "allocation_failures": MetricSpec("vllm:flexkv_allocation_failures",
                                      "Saves that found no free slot for a block in the CPU tier."),
    "evicted_blocks": MetricSpec("vllm:flexkv_evicted_blocks", "Blocks evicted from a FlexKV tier to make room."),
    "held_blocks": MetricSpec("vllm:flexkv_held_blocks", "Blocks held in a FlexKV tier.", GAUGE),
    "loaded_bytes": MetricSpec("vllm:flexkv_loaded_bytes", "Bytes copied from FlexKV into vLLM's KV cache."),
    "load_seconds": MetricSpec("vllm:flexkv_load_seconds", "Time spent copying blocks from FlexKV into vLLM's "
                               "KV cache, from the start of each copy until it was seen landed."),
    "load_size_bytes": MetricSpec("vllm:flexkv_load_size_bytes", "Bytes of each copy into vLLM's KV cache.",
                                  HISTOGRAM, SIZE_BUCKETS),
    "saved_bytes": MetricSpec("vllm:flexkv_saved_bytes", "Bytes copied from vLLM's KV cache into FlexKV."),
    "save_seconds": MetricSpec("vllm:flexkv_save_seconds", "Time spent copying blocks from vLLM's KV cache into "
                               "FlexKV, from the start of each copy until it was seen landed."),
    "save_size_bytes": MetricSpec("vllm:flexkv_save_size_bytes", "Bytes of each copy out of vLLM's KV cache.",
                                  HISTOGRAM, SIZE_BUCKETS),
    "tier_read_bytes": MetricSpec("vllm:flexkv_tier_read_bytes", "Bytes read from a lower tier (SSD, cluster)."),
    "tier_written_bytes": MetricSpec("vllm:flexkv_tier_written_bytes", "Bytes written to a lower tier."),
    "failed_loads": MetricSpec("vllm:flexkv_failed_loads", "Loads that failed and were recomputed."),
    "failed_saves": MetricSpec("vllm:flexkv_failed_saves", "Saves that failed and were dropped."),
    "tier_healthy": MetricSpec("vllm:flexkv_tier_healthy", "1 while a lower tier serves, 0 while it is degraded and "
                               "answers misses (a cluster store unreachable at start-up or past remote_timeout_s, "
                               "a failed disk).", GAUGE),
    "tier_timeouts": MetricSpec("vllm:flexkv_tier_timeouts", "Lower-tier calls answered as misses at their deadline "
                                "(remote_timeout_s): their requests recomputed."),
}

# our stats key -> the vLLM native offloading metric it stands in for (docs/dynamo.md lists both)
NATIVE_EQUIVALENT = {
    "query_tokens": "vllm:kv_offload_tiering_chunk_queries",
    "hit_tokens": "vllm:kv_offload_tiering_chunk_hits",
    "lookup_seconds": "vllm:kv_offload_lookup_sync_delay_seconds",
    "allocation_failures": "vllm:kv_offload_allocation_failure",
    "held_blocks": "vllm:kv_offload_cpu_cache_usage_perc",
    "loaded_bytes": "vllm:kv_offload_load_bytes",
    "load_seconds": "vllm:kv_offload_load_time",
    "load_size_bytes": "vllm:kv_offload_load_size",
    "saved_bytes": "vllm:kv_offload_store_bytes",
    "save_seconds": "vllm:kv_offload_store_time",
    "save_size_bytes": "vllm:kv_offload_store_size",
    "tier_read_bytes": "vllm:kv_offload_tiering_read_bytes",
    "tier_written_bytes": "vllm:kv_offload_tiering_write_bytes",
}


def _split(key: str) -> tuple[str, str]:
    name, _, tier = key.partition(":")
    return name, tier


class FlexKVStats(KVConnectorStats):
    """One interval of counters (summed when vLLM aggregates ranks and steps), gauges and
    histogram observations."""

    def reset(self) -> None:
        self.data = {}

    def add(self, key: str, value: int | float) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def observe(self, key: str, value: float) -> None:
        self.data.setdefault(key, []).append(value)

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            kind = METRICS[_split(key)[0]].kind
            if kind == GAUGE:
                self.data[key] = value
            elif kind == HISTOGRAM:
                self.data.setdefault(key, []).extend(value)
            else:
                self.add(key, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        reduced: dict[str, int | float] = {}
        for key, value in self.data.items():
            if isinstance(value, list):
                reduced[f"{key}_count"], reduced[f"{key}_sum"] = len(value), sum(value)
            else:
                reduced[key] = value
        return reduced

    def is_empty(self) -> bool:
        return not self.data


class FlexKVPromMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._metrics = {}
        for key, spec in METRICS.items():
            labels = [*labelnames, "tier"]
            if spec.kind == HISTOGRAM:
                metric = self._histogram_cls(name=spec.name, documentation=spec.documentation,
                                             labelnames=labels, buckets=spec.buckets)
            else:
                cls = self._gauge_cls if spec.kind == GAUGE else self._counter_cls
                metric = cls(name=spec.name, documentation=spec.documentation, labelnames=labels)
            self._metrics[key] = metric

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for key, value in transfer_stats_data.items():
            name, tier = _split(key)
            metric = self._metrics.get(name)
            if metric is None:
                continue
            child = metric.labels(*labels, tier or "all")
            kind = METRICS[name].kind
            if kind == GAUGE:
                child.set(value)
            elif kind == HISTOGRAM:
                for sample in value:
                    child.observe(sample)
            elif value:
                child.inc(value)
