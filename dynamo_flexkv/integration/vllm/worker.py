"""Worker-role half of the connector: owns this rank's KV tensors and moves the bytes.

Three kinds of transfer arrive in each step's metadata, and all of them start in `start_step`
(vLLM's `start_load_kv`), the one hook every vLLM version calls in every step — including steps that
schedule no tokens, where vLLM 0.26 never calls `wait_for_save`:
- *layer-wise loads* (CPU-tier hits the scheduler let vLLM compute on in this very step): started
  before the forward; `wait_for_layer_load(layer)` makes that layer's attention wait for its bytes
  only. If the engine never calls the per-layer hook (some attention backends do not), the whole load
  is awaited up front instead — slower, never wrong.
- *async loads* (hits not loaded in-step, or staged from SSD): the request waits outside the batch
  until `get_finished` reports them.
- *saves* (full blocks computed by earlier steps, of running or finished requests; no forward
  writes them any more): ordered after the work already queued, all of a step's saves as one
  transfer (one gather and one copy for every request, not one each). Each is reported by its save id in
  the `FlexKVWorkerReport`; a finished request's GPU blocks are held by vLLM (`hold`) until none of
  its saves is in flight, then `get_finished` reports the request as sent. A save that is never
  started would hold its GPU blocks forever, and a full cache would then never schedule again.
- *preemption saves* (requests vLLM preempted in this step, whose freed blocks this very step may
  reuse): started and awaited in `handle_preemptions`, which vLLM calls before anything of the step
  touches the cache; earlier saves of those requests still in flight are awaited there too.
- *reused sliding-window blocks*: vLLM frees a running request's sliding-window blocks once they
  leave the window and may hand them out again in the next step, while an earlier save still reads
  them. A save whose sliding-window blocks are among the step's `allocated` blocks is awaited in
  `handle_preemptions` too (on CUDA the compute stream waits for it; the host does not).
`get_finished` (called at the end of every step) closes the step's layer-wise loads and reports
finished transfers. A failed load reports its blocks as load errors, so vLLM recomputes them (a
hybrid model's, whose block ids are per KV-cache group, as a failed request: see compat.py); a failed
save is reported back so the scheduler releases the slots unannounced.

A hybrid model has one copier per KV-cache group (each group's layers, addressed by the group's
block ids, into the group's part of a slot); a transfer runs them together.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from itertools import chain
from typing import Any

import torch

from dynamo_flexkv.tiers.facts import InstanceFacts
from dynamo_flexkv.integration.vllm.compat import PER_REQUEST_LOAD_FAILURES
from dynamo_flexkv.integration.vllm.metadata import BlockTransfer, FlexKVStepMetadata, FlexKVWorkerReport
from dynamo_flexkv.integration.vllm.stats import FlexKVStats
from dynamo_flexkv.storage.cpu.pool import CpuBlockPool
from dynamo_flexkv.storage.layout import KVCacheLayout
from dynamo_flexkv.transfer.copier import Copier, make_copier
from dynamo_flexkv.transfer.layerwise import (
    AllOf,
    TransferHandle,
    start_layerwise_load,
    start_load,
    start_save,
)

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    job: BlockTransfer
    kind: str  # "load" or "save"
    handle: TransferHandle | None  # None: it failed to start; a step's saves share one
    started: float  # time.perf_counter() when it was started
    landed: float | None  # when it was seen landed (None: not yet)
    nbytes: int  # this job's bytes


@dataclass(frozen=True)
class _WindowRead:
    """A save in flight that reads sliding-window blocks, which vLLM may hand out again meanwhile."""

    label: str  # the request id, or "N requests" for a step's merged saves
    handle: TransferHandle
    blocks: frozenset[int]


def _finished_ok(handle: TransferHandle | None) -> bool:
    """Whether a finished transfer landed every byte (CUDA handles raise their error here)."""
    if handle is None:
        return False
    try:
        handle.synchronize()
        return True
    except Exception:  # a failed copy degrades to recompute, never crashes the engine
        logger.exception("transfer failed")
        return False


class WorkerSide:
    def __init__(self, facts: InstanceFacts, rank: int, num_blocks: int, cpu_async_copies: bool = False,
                 cuda_options: dict[str, Any] | None = None):
        """`cuda_options`: the CUDA copier's settings (`make_copier`): issue, method, batch_memcpy."""
        self.facts = facts
        self.rank = rank
        self.num_blocks = num_blocks
        self.cpu_async_copies = cpu_async_copies
        self.cuda_options = dict(cuda_options or {})
        self.pool: CpuBlockPool | None = None
        self.copiers: list[Copier] = []  # one per KV-cache group
        self._layer_index: dict[str, int] = {}
        self._in_flight: list[_InFlight] = []
        self._window_groups = [g for g, group in enumerate(facts.groups) if group.window is not None]
        # saves reading sliding-window blocks, with those blocks: vLLM may reuse them while we read
        self._window_reads: list[_WindowRead] = []
        self._layerwise: list[_InFlight] = []  # handles are LayerwiseLoads
        self._hooks_seen = False
        self._load_errors: set[int] = set()
        # several KV-cache groups: vLLM takes a failed load per request, not per block
        self.per_request_failures = len(facts.groups) > 1 and PER_REQUEST_LOAD_FAILURES
        self._failed_requests: set[str] = set()
        self._report = FlexKVWorkerReport()
        self._held: set[str] = set()  # finished requests whose blocks vLLM keeps for our saves
        self._preemptions_handled: FlexKVStepMetadata | None = None
        self.stats = FlexKVStats()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layouts = self._group_layouts(kv_caches)
        self.pool = CpuBlockPool(self.facts.identity, self.facts.geometry)
        self.copiers = [make_copier(layout, self.pool.tensor, self.facts.geometry, self.rank,
                                    cpu_async=self.cpu_async_copies, **self.cuda_options) for layout in layouts]
        self._layer_index = {name: i for i, name in enumerate(layouts[0].layer_names)}
        logger.info(
            "worker ready: rank=%d groups=%d layers=%d block_bytes=%d copier=%s device=%s",
            self.rank, len(layouts), sum(len(layout.layer_names) for layout in layouts),
            sum(layout.shard_bytes for layout in layouts), type(self.copiers[0]).__name__, layouts[0].device,
        )

    def _group_layouts(self, kv_caches: dict[str, torch.Tensor]) -> list[KVCacheLayout]:
        """One layout per KV-cache group, side by side in a slot. Layers of different groups may
        share one tensor (vLLM's hybrid manager): each group addresses it with its own block ids."""
        if len(self.facts.group_layers) <= 1:
            return [KVCacheLayout(kv_caches, self.num_blocks)]
        layouts, offset = [], 0
        for names in self.facts.group_layers:
            layout = KVCacheLayout({name: kv_caches[name] for name in names}, self.num_blocks, offset)
            layouts.append(layout)
            offset += layout.shard_bytes
        if offset != self.facts.geometry.shard_bytes:
            raise ValueError(f"KV cache holds {offset} bytes per block on this rank but the pool was sized for "
                             f"{self.facts.geometry.shard_bytes}: the scheduler and worker disagree on the KV layout")
        return layouts

    def _start_groups(self, job: BlockTransfer, save: bool) -> TransferHandle:
        """Start the copies of every group of `job`, awaited as one."""
        handles = [start_save(copier, ids, slots) if save else start_load(copier, slots, ids)
                   for copier, ids, slots in zip(self.copiers, job.block_ids, job.slots, strict=True) if ids]
        return handles[0] if len(handles) == 1 else AllOf(handles)

    def _load_failed(self, job: BlockTransfer, block_ids) -> None:
        """vLLM recomputes these blocks of the request (all of its load where it takes failures per request)."""
        if self.per_request_failures:
            self._failed_requests.add(job.request_id)
        else:
            self._load_errors.update(block_ids)

    def _start(self, job: BlockTransfer, kind: str, start) -> _InFlight:
        started = time.perf_counter()
        nbytes = self._job_bytes(job)
        try:
            handle = start()
        except Exception:  # e.g. a bad block id: fail this transfer, keep serving
            logger.exception("%s of request %s could not start", kind, job.request_id)
            return _InFlight(job, kind, None, started, None, nbytes)
        # a copy that completed inside start (CPU) is timed now, not when the step ends
        return _InFlight(job, kind, handle, started, time.perf_counter() if handle.done() else None, nbytes)

    def _job_bytes(self, job: BlockTransfer) -> int:
        return sum(len(ids) * copier.block_bytes for copier, ids in zip(self.copiers, job.block_ids))

    def _record(self, t: _InFlight) -> None:
        """Bytes, duration and size of a transfer that landed."""
        nbytes = t.nbytes
        self.stats.add("loaded_bytes" if t.kind == "load" else "saved_bytes", nbytes)
        self.stats.add(f"{t.kind}_seconds", (t.landed or time.perf_counter()) - t.started)
        self.stats.observe(f"{t.kind}_size_bytes", nbytes)

    # --- per step --------------------------------------------------------------------------------

    def handle_preemptions(self, metadata: FlexKVStepMetadata) -> None:
        """Save what preempted requests computed, and let every save of theirs land, before this
        step reuses their blocks; so too any save still reading a block this step reuses."""
        self._preemptions_handled = metadata
        self._fence_reused_blocks(metadata.allocated)
        self._start_saves(metadata.preemption_saves)
        preempted = set(metadata.preempted)
        for t in self._in_flight:
            if t.kind == "save" and t.job.request_id in preempted and t.handle is not None:
                t.handle.wait()

    def _fence_reused_blocks(self, allocated: list[int]) -> None:
        """Await the saves still reading a sliding-window block that vLLM handed out again in this
        step, before the step writes it (a load, vLLM's zeroing, the forward)."""
        if not self._window_reads:
            return
        reading = []
        for read in self._window_reads:
            if read.handle.done():
                continue
            if read.blocks.isdisjoint(allocated):
                reading.append(read)
                continue
            # awaited once: everything the compute stream runs from now on comes after it
            read.handle.wait()
            logger.debug("save awaited before vLLM reuses its sliding-window blocks: request=%s reused=%d",
                         read.label, len(read.blocks.intersection(allocated)))
        self._window_reads = reading

    def _start_saves(self, jobs: list[BlockTransfer]) -> None:
        """One transfer for all of `jobs`; each stays in flight, and is reported, under its own save id."""
        if not jobs:
            return
        if len(jobs) == 1:
            step = self._start(jobs[0], "save", lambda: self._start_groups(jobs[0], save=True))
            self._in_flight.append(step)
        else:
            merged = BlockTransfer(f"{len(jobs)} requests", *(tuple(tuple(x for job in jobs for x in getattr(job, side)[g])
                                               for g in range(len(self.copiers))) for side in ("block_ids", "slots")))
            step = self._start(merged, "save", lambda: self._start_groups(merged, save=True))
            for job in jobs:
                self._in_flight.append(replace(step, job=job, nbytes=self._job_bytes(job)))
        window_blocks = frozenset(chain.from_iterable(step.job.block_ids[g] for g in self._window_groups))
        if window_blocks and step.handle is not None and not step.handle.done():
            self._window_reads.append(_WindowRead(step.job.request_id, step.handle, window_blocks))

    def start_step(self, metadata: FlexKVStepMetadata) -> None:
        """Start every transfer of this step: layer-wise loads first (this forward waits for them),
        then loads between steps, then saves."""
        if self._preemptions_handled is not metadata:  # an engine that never calls the hook
            self.handle_preemptions(metadata)
        for job in metadata.layerwise_loads:  # one KV-cache group: the scheduler loads hybrid models between steps
            load = self._start(job, "load", lambda job=job: start_layerwise_load(self.copiers[0], job.slots[0],
                                                                                 job.block_ids[0]))
            if load.handle is not None and not self._hooks_seen:
                load.handle.wait_all()  # no per-layer hook seen yet: the forward must find every layer landed
            self._layerwise.append(load)
        for job in metadata.loads:
            if job.unavailable:
                self._load_failed(job, job.unavailable)
            self._in_flight.append(self._start(job, "load", lambda job=job: self._start_groups(job, save=False)))
        self._start_saves(metadata.saves)
        self._held.update(metadata.hold)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._hooks_seen = True
        if self._layerwise:
            index = self._layer_index[layer_name]
            for load in self._layerwise:
                if load.handle is not None:
                    load.handle.wait_layer(index)

    def _finish_layerwise_loads(self) -> None:
        """End of the step: the forward consumed them; record failures for vLLM to recompute."""
        for load in self._layerwise:
            job = load.job
            self._report.done_layerwise.add(job.request_id)
            if _finished_ok(load.handle):
                self._record(load)
            else:
                self._load_errors.update(job.block_ids[0])
                self._report.failed_loads.add(job.request_id)
                self.stats.add("failed_loads", 1)
        self._layerwise.clear()

    # --- completions ---------------------------------------------------------------------------

    def get_finished(self) -> tuple[set[str], set[str]]:
        self._finish_layerwise_loads()
        loaded = set()
        still = []
        for t in self._in_flight:
            if t.handle is not None and not t.handle.done():
                still.append(t)
                continue
            ok = _finished_ok(t.handle)
            request_id = t.job.request_id
            if t.kind == "load":
                loaded.add(request_id)
                if ok:
                    self._record(t)
                else:
                    self._load_failed(t.job, [i for ids in t.job.block_ids for i in ids])
                    self._report.failed_loads.add(request_id)
                    self.stats.add("failed_loads", 1)
            else:
                self._report.saves_done[t.job.save_id] = 1
                if ok:
                    self._record(t)
                else:
                    self._report.failed_saves.add(t.job.save_id)
                    self.stats.add("failed_saves", 1)
        self._in_flight = still
        saving = {t.job.request_id for t in still if t.kind == "save"}
        saved = self._held - saving
        self._held -= saved
        return saved, loaded

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def take_failed_requests(self, finished: set[str]) -> set[str]:
        """Requests among `finished` (their loads just ended) whose load failed in part or whole."""
        failed = self._failed_requests & finished
        self._failed_requests -= failed
        return failed

    def take_report(self) -> FlexKVWorkerReport | None:
        report = self._report
        if not (report.failed_loads or report.failed_saves or report.done_layerwise or report.saves_done):
            return None
        self._report = FlexKVWorkerReport()
        return report

    def take_stats(self) -> FlexKVStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, FlexKVStats()
        return stats

    def shutdown(self) -> None:
        for t in self._in_flight:
            _finished_ok(t.handle)
        for copier in self.copiers:
            copier.close()
        if self.pool is not None:
            self.pool.unlink()
