"""Worker-role half of the connector: owns this rank's KV tensors and moves the bytes.

Copies run on a background thread (see `TransferExecutor`) so the engine's step never waits for them;
`get_finished` reports what completed. A failed load reports its blocks as load errors, so vLLM
recomputes them; a failed save is reported back so the scheduler releases the slots unannounced.
"""

from __future__ import annotations

import logging

import torch

from dynamo_flexkv.integration.vllm.instance import InstanceFacts
from dynamo_flexkv.integration.vllm.metadata import FlexKVStepMetadata, FlexKVWorkerReport
from dynamo_flexkv.integration.vllm.stats import FlexKVStats
from dynamo_flexkv.storage.cpu_pool import CpuBlockPool
from dynamo_flexkv.storage.layout import KVCacheLayout
from dynamo_flexkv.transfer.copier import BlockCopier
from dynamo_flexkv.transfer.executor import TransferExecutor

logger = logging.getLogger(__name__)


class WorkerSide:
    def __init__(self, facts: InstanceFacts, rank: int, num_blocks: int):
        self.facts = facts
        self.rank = rank
        self.num_blocks = num_blocks
        self.pool: CpuBlockPool | None = None
        self.copier: BlockCopier | None = None
        self.executor = TransferExecutor()
        self._load_blocks: dict[str, tuple[int, ...]] = {}
        self._load_errors: set[int] = set()
        self._report = FlexKVWorkerReport()
        self.stats = FlexKVStats()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout = KVCacheLayout(kv_caches, self.num_blocks)
        self.pool = CpuBlockPool(self.facts.identity, self.facts.geometry)
        self.copier = BlockCopier(layout, self.pool.tensor, self.facts.geometry, self.rank)
        logger.info(
            "worker ready: rank=%d layers=%d block_bytes=%d batched=%s device=%s",
            self.rank, len(layout.layer_names), layout.shard_bytes, layout.stacked is not None, layout.device,
        )

    def start_loads(self, metadata: FlexKVStepMetadata) -> None:
        copier = self.copier
        assert copier is not None, "register_kv_caches was not called"
        for job in metadata.loads:
            self._load_blocks[job.request_id] = job.block_ids
            self._load_errors.update(job.unavailable)
            self.executor.submit(job.request_id, "load", lambda job=job: copier.load(job.slots, job.block_ids))

    def start_saves(self, metadata: FlexKVStepMetadata) -> None:
        copier = self.copier
        assert copier is not None, "register_kv_caches was not called"
        for job in metadata.saves:
            self.executor.submit(job.request_id, "save", lambda job=job: copier.save(job.block_ids, job.slots))

    def get_finished(self) -> tuple[set[str], set[str]]:
        saved, loaded = set(), set()
        for result in self.executor.poll():
            if result.kind == "load":
                loaded.add(result.job_id)
                block_ids = self._load_blocks.pop(result.job_id, ())
                if result.ok:
                    self.stats.add("loaded_bytes", result.bytes_moved)
                else:
                    self._load_errors.update(block_ids)
                    self._report.failed_loads.add(result.job_id)
                    self.stats.add("failed_loads", 1)
            else:
                saved.add(result.job_id)
                if result.ok:
                    self.stats.add("saved_bytes", result.bytes_moved)
                else:
                    self._report.failed_saves.add(result.job_id)
                    self.stats.add("failed_saves", 1)
        return saved, loaded

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_report(self) -> FlexKVWorkerReport | None:
        if not (self._report.failed_loads or self._report.failed_saves):
            return None
        report, self._report = self._report, FlexKVWorkerReport()
        return report

    def take_stats(self) -> FlexKVStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, FlexKVStats()
        return stats

    def shutdown(self) -> None:
        self.executor.shutdown()
        if self.pool is not None:
            self.pool.unlink()
