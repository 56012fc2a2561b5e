"""Executes the cascade between the CPU pool and every lower tier: staging reads and spill writes.

Runs in the scheduler's process, which maps the same CPU pool as the workers. Each backend does its
I/O on its own threads; this class only submits plans and hands back what finished, so the
scheduler never blocks on a disk or a network. A staging may read from several tiers (one batch per
tier) and is handed back once all its batches finished. Spills are handed back strictly in the
order they were submitted *per destination tier* (the index announces a parent before its
children in each tier); stagings in any order.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, wait

import torch

from dynamo_flexkv.index.plans import LoadPlan, SpillPlan
from dynamo_flexkv.storage.backend import IoResult, TierBackend, failed_io

logger = logging.getLogger(__name__)


class LowerTiers:
    def __init__(self, backends: Mapping[str, TierBackend], pool: torch.Tensor):
        self.backends = dict(backends)
        self.pool = pool
        # request id -> [(future, positions in plan.staged)], number of staged blocks
        self._stages: dict[str, tuple[list[tuple[Future, list[int]]], int]] = {}
        self._spills: dict[str, deque[tuple[int, Future, int]]] = {name: deque() for name in self.backends}

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
        self._stages[plan.request_id] = (jobs, len(plan.staged))

    def spill(self, plan: SpillPlan) -> None:
        """Write the plan's CPU blocks into its destination tier."""
        future = self._submit(plan.dst, "write", lambda backend: backend.write(
            self.pool, plan.src_slots, plan.dst_slots, plan.keys), len(plan.keys))
        self._spills[plan.dst].append((plan.spill_id, future, len(plan.keys)))

    def _submit(self, tier: str, verb: str, call: Callable[[TierBackend], Future], count: int) -> Future:
        try:
            return call(self.backends[tier])
        except Exception:  # a backend answers misses, never raises; if one does, it still is a miss
            logger.exception("tier %s: %s of %d blocks could not be submitted", tier, verb, count)
            return failed_io(count)

    def finished_stages(self) -> list[tuple[str, list[bool]]]:
        """(request id, ok per staged block in plan order) of every staging whose reads all finished."""
        done = [rid for rid, (jobs, _) in self._stages.items() if all(f.done() for f, _ in jobs)]
        out = []
        for rid in done:
            jobs, count = self._stages.pop(rid)
            ok = [False] * count
            for future, positions in jobs:
                for position, good in zip(positions, self._outcome(future, len(positions), "stage", rid)):
                    ok[position] = good
            out.append((rid, ok))
        return out

    def finished_spills(self) -> list[tuple[int, list[bool]]]:
        done = []
        for queue in self._spills.values():
            while queue and queue[0][1].done():
                spill_id, future, count = queue.popleft()
                done.append((spill_id, self._outcome(future, count, "spill", spill_id)))
        return done

    @staticmethod
    def _outcome(future: Future, count: int, kind: str, job: object) -> list[bool]:
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
        futures += [f for queue in self._spills.values() for _, f, _ in queue]
        wait(futures, timeout=timeout_s)

    def close(self) -> None:
        for name, backend in self.backends.items():
            try:
                backend.close()
            except Exception:
                logger.exception("tier %s: close failed", name)
