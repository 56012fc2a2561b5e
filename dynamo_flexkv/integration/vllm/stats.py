"""Connector statistics: tokens hit per tier, bytes moved per direction, load failures.

Workers count bytes; the scheduler counts hits. Both ride vLLM's `KVConnectorStats` path, so vLLM's
own logging and Prometheus plumbing carry them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats


@dataclass
class SchedulerCounters:
    lookups: int = 0
    queried_blocks: int = 0
    hit_blocks: int = 0
    loaded_tokens: int = 0
    saved_blocks: int = 0
    load_failures: int = 0

    def record_lookup(self, queried: int, hits: int) -> None:
        self.lookups += 1
        self.queried_blocks += queried
        self.hit_blocks += hits


class FlexKVStats(KVConnectorStats):
    """Per-interval worker counters; keys are summed when vLLM aggregates ranks and steps."""

    KEYS = ("bytes_loaded", "bytes_saved", "blocks_loaded", "blocks_saved", "failed_loads", "failed_saves")

    def reset(self) -> None:
        self.data = {key: 0 for key in self.KEYS}

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def add(self, key: str, value: int) -> None:
        self.data[key] = self.data.get(key, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            self.add(key, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())

    @classmethod
    def from_data(cls, data: dict[str, Any] | None) -> FlexKVStats:
        return cls(data=dict(data or {}))
