"""What the scheduler-role connector tells the workers each step, and what they report back."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass(frozen=True)
class BlockTransfer:
    """Copy the blocks of one request: `block_ids[i]` (vLLM cache) <-> `slots[i]` (CPU pool).

    `unavailable` (loads only) are GPU blocks promised to vLLM that turned out unloadable (a lower
    tier failed them): the worker reports them as load errors, so vLLM recomputes them.
    """

    request_id: str
    block_ids: tuple[int, ...]
    slots: tuple[int, ...]
    unavailable: tuple[int, ...] = ()


@dataclass
class FlexKVStepMetadata(KVConnectorMetadata):
    layerwise_loads: list[BlockTransfer] = field(default_factory=list)  # pool -> cache, used this step
    loads: list[BlockTransfer] = field(default_factory=list)  # pool -> cache, between steps
    saves: list[BlockTransfer] = field(default_factory=list)  # cache -> pool


@dataclass
class FlexKVWorkerReport(KVConnectorWorkerMetadata):
    """What a worker finished that vLLM does not report itself (layer-wise loads complete inside a
    step) and what it could not complete; merged over TP ranks (any rank failing fails it)."""

    failed_loads: set[str] = field(default_factory=set)
    failed_saves: set[str] = field(default_factory=set)
    done_layerwise: set[str] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, FlexKVWorkerReport)
        return FlexKVWorkerReport(
            self.failed_loads | other.failed_loads,
            self.failed_saves | other.failed_saves,
            self.done_layerwise | other.done_layerwise,
        )
