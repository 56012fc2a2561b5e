"""Executes the cascade between the CPU pool and every lower tier: staging reads and spill writes.

Runs in the scheduler's process, which maps the same CPU pool as the workers. Each backend does its
I/O on its own threads; this class only submits plans and hands back what finished, so the
scheduler never blocks on a disk or a network. A staging may read from several tiers (one batch per
tier) and is handed back once all its batches finished. The spills planned in one scheduler step
go to each destination tier as one batch (one round trip to a remote store), and are handed back
strictly in the order they were planned *per destination tier* (the index announces a parent
before its children in each tier); stagings in any order. A staging read answered at its deadline
while its call still runs may yet write into its CPU slots: those slots are held (the index keeps
them WRITING) until the call returned, so they are never reused under a late write.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, wait

import torch

from dynamo_flexkv.index.plans import LoadPlan, SpillPlan
from dynamo_flexkv.storage.backend import IoResult, TierBackend, failed_io

logger = logging.getLogger(__name__)


class LowerTiers:
    def __init__(self, backends: Mapping[str, TierBackend], pool: torch.Tensor):
        self.backends = dict(backends)
        self.pool = pool
        # request id -> [(future, positions in plan.staged)], the plan
        self._stages: dict[str, tuple[list[tuple[Future, list[int]]], LoadPlan]] = {}
        # late reads still running -> the top-tier keys whose slots they may write
        self._unsettled: list[tuple[Future, list[bytes]]] = []
        # destination tier -> (spill id, its batch's future, the batch's size, this spill's blocks in it)
        self._spills: dict[str, deque[tuple[int, Future, int, slice]]] = {name: deque() for name in self.backends}

    def stage(self, plan: LoadPlan) -> None:
        """Read the plan's lower-tier blocks into their CPU slots, one batch per source tier."""
        by_tier: dict[str, list[int]] = {}
        for position, staging in enumerate(plan.staged):
            by_tier.setdefault(staging.tier, []).append(position)
        jobs = []
        for tier, positions in by_tier.items():
            staged = [plan.staged[p] for p in positions]
            keys = [plan.keys[s.index] for s in staged]
            future = self._submit(tier, "read", lambda backend: backend.read(
                self.pool, [s.slot for s in staged], [plan.slots[s.index] for s in staged], keys), len(keys))
            jobs.append((future, positions))
        self._stages[plan.request_id] = (jobs, plan)

    def spill(self, plans: Sequence[SpillPlan],
              tokens_of: Callable[[Sequence[bytes]], list[Sequence[int]]] | None = None) -> None:
        """Write the plans' CPU blocks into their destination tiers: one batch per tier, each block
        with its parent and (from `tokens_of`, where known) its tokens, which a tier that outlives
        the process keeps so a restart rebuilds the chains and announces them."""
        by_tier: dict[str, list[SpillPlan]] = {}
        for plan in plans:
            by_tier.setdefault(plan.dst, []).append(plan)
        for tier, batch in by_tier.items():
            src = [slot for plan in batch for slot in plan.src_slots]
            dst = [slot for plan in batch for slot in plan.dst_slots]
            keys = [key for plan in batch for key in plan.keys]
            parents = [parent for plan in batch for parent in plan.parents]
            tokens = tokens_of(keys) if tokens_of is not None else None
            future = self._submit(tier, "write", lambda backend: backend.write(
                self.pool, src, dst, keys, parents=parents, tokens=tokens), len(keys))
            first = 0
            for plan in batch:
                self._spills[tier].append((plan.spill_id, future, len(keys), slice(first, first + len(plan.keys))))
                first += len(plan.keys)

    def _submit(self, tier: str, verb: str, call: Callable[[TierBackend], Future], count: int) -> Future:
        try:
            return call(self.backends[tier])
        except Exception:  # a backend answers misses, never raises; if one does, it still is a miss
            logger.exception("tier %s: %s of %d blocks could not be submitted", tier, verb, count)
            return failed_io(count)

    def finished_stages(self) -> list[tuple[str, list[bool], list[int]]]:
        """(request id, ok per staged block in plan order, positions whose slots a late read may still
        write) of every staging whose reads were all answered."""
        done = [rid for rid, (jobs, _) in self._stages.items() if all(f.done() for f, _ in jobs)]
        out = []
        for rid in done:
            jobs, plan = self._stages.pop(rid)
            ok, held = [False] * len(plan.staged), []
            for future, positions in jobs:
                for position, good in zip(positions, self._outcome(future, len(positions), "stage", rid)):
                    ok[position] = good
                unsettled = self._unsettled_of(future)
                if unsettled is not None:
                    held += positions
                    self._unsettled.append((unsettled, [plan.keys[plan.staged[p].index] for p in positions]))
            out.append((rid, ok, held))
        return out

    def settled(self) -> list[bytes]:
        """Keys of held slots whose late reads have returned since the last call: free to reuse."""
        done, running = [], []
        for future, keys in self._unsettled:
            (done if future.done() else running).append((future, keys))
        self._unsettled = running
        return [key for _, keys in done for key in keys]

    @property
    def num_held(self) -> int:
        """CPU slots kept out of use while late reads may still write them."""
        return sum(len(keys) for _, keys in self._unsettled)

    @staticmethod
    def _unsettled_of(future: Future) -> Future | None:
        try:
            return getattr(future.result(), "unsettled", None)
        except Exception:  # noqa: BLE001 - a failed future is a miss (`_outcome` logs it)
            return None

    def finished_spills(self) -> list[tuple[int, list[bool]]]:
        done = []
        for queue in self._spills.values():
            while queue and queue[0][1].done():
                spill_id, future, size, blocks = queue.popleft()
                done.append((spill_id, self._outcome(future, size, "spill", spill_id)[blocks]))
        return done

    @staticmethod
    def _outcome(future: Future, count: int, kind: str, job: object) -> list[bool]:
        """Per-block results of a finished batch of `count` blocks."""
        try:
            result: IoResult = future.result()
            ok = list(result.ok)
        except Exception:  # the backend reports failures per block; anything else still degrades to a miss
            logger.exception("lower tier %s %s failed", kind, job)
            return [False] * count
        if len(ok) != count:
            logger.error("lower tier %s %s: %d results for %d blocks, all treated as misses", kind, job, len(ok), count)
            return [False] * count
        return ok

    @property
    def num_pending(self) -> int:
        return len(self._stages) + sum(len(queue) for queue in self._spills.values())

    def wait(self, timeout_s: float) -> None:
        """Block until every submitted job finished, or the timeout passed (shutdown only)."""
        futures = [f for jobs, _ in self._stages.values() for f, _ in jobs]
        futures += [f for queue in self._spills.values() for _, f, _, _ in queue]
        wait(futures, timeout=timeout_s)

    def close(self) -> None:
        for name, backend in self.backends.items():
            try:
                backend.close()
            except Exception:
                logger.exception("tier %s: close failed", name)
