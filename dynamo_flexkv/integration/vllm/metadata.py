"""What the scheduler-role connector tells the workers each step, and what they report back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass(frozen=True)
class BlockTransfer:
    """Copy the blocks of one request, per KV-cache group g: `block_ids[g][i]` (vLLM cache, the
    group's layers) <-> `slots[g][i]` (that group's part of a CPU-pool slot). A group's lists leave
    out the blocks it does not copy (vLLM's null blocks, KV a slot does not hold).

    `unavailable` (loads only) are GPU blocks promised to vLLM that turned out unloadable (a lower
    tier failed them): the worker reports them as load errors, so vLLM recomputes them.
    `save_id` (saves only) names the save in the worker's report: a request may have several.
    """

    request_id: str
    block_ids: tuple[tuple[int, ...], ...]
    slots: tuple[tuple[int, ...], ...]
    unavailable: tuple[int, ...] = ()
    save_id: str = ""

    @classmethod
    def of_groups(cls, request_id: str, pairs: Sequence[Sequence[tuple[int, int]]],
                  unavailable: Sequence[int] = (), save_id: str = "") -> BlockTransfer:
        """From `(block id, slot)` pairs per group."""
        return cls(request_id, tuple(tuple(block_id for block_id, _ in group) for group in pairs),
                   tuple(tuple(slot for _, slot in group) for group in pairs), tuple(unavailable), save_id)


@dataclass
class FlexKVStepMetadata(KVConnectorMetadata):
    layerwise_loads: list[BlockTransfer] = field(default_factory=list)  # pool -> cache, used this step
    loads: list[BlockTransfer] = field(default_factory=list)  # pool -> cache, between steps
    saves: list[BlockTransfer] = field(default_factory=list)  # cache -> pool
    # cache -> pool from requests vLLM preempted in this step: their blocks may be reused by this
    # very step, so these land in `handle_preemptions`, before any load or forward touches them
    preemption_saves: list[BlockTransfer] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)  # their earlier saves are awaited there too
    # finished requests whose GPU blocks vLLM keeps until each of their saves landed (finished_sending)
    hold: list[str] = field(default_factory=list)
    # GPU blocks vLLM handed out in this step, every group's (sent only while a save may still read a
    # sliding-window block: vLLM frees those while the request runs, and may hand them out again at
    # once). A save still reading one lands in `handle_preemptions`, before this step writes it.
    allocated: list[int] = field(default_factory=list)


@dataclass
class FlexKVWorkerReport(KVConnectorWorkerMetadata):
    """What a worker finished that vLLM does not report itself (layer-wise loads complete inside a
    step) and what it could not complete; merged over TP ranks (any rank failing fails it)."""

    failed_loads: set[str] = field(default_factory=set)
    failed_saves: set[str] = field(default_factory=set)  # save ids
    done_layerwise: set[str] = field(default_factory=set)
    # save id -> ranks that finished it (ok or not): a save is over once every rank finished it
    saves_done: dict[str, int] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, FlexKVWorkerReport)
        saves_done = dict(self.saves_done)
        for save_id, ranks in other.saves_done.items():
            saves_done[save_id] = saves_done.get(save_id, 0) + ranks
        return FlexKVWorkerReport(
            self.failed_loads | other.failed_loads,
            self.failed_saves | other.failed_saves,
            self.done_layerwise | other.done_layerwise,
            saves_done,
        )
