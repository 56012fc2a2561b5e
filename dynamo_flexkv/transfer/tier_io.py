"""Executes the cascade between the CPU pool and the SSD tier: staging reads and spill writes.

Runs in the scheduler's process, which maps the same CPU pool as the workers. The SSD store does
the I/O on its own threads; this class only submits plans and hands back what finished, so the
scheduler never blocks on a disk. Spills are handed back strictly in the order they were submitted
(the index announces a parent before its children); stagings in any order.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, wait

import torch

from dynamo_flexkv.index.plans import LoadPlan, SpillPlan
from dynamo_flexkv.storage.ssd import SsdBlockStore

logger = logging.getLogger(__name__)


class LowerTierIO:
    def __init__(self, store: SsdBlockStore, pool: torch.Tensor, seat_lock: int):
        self.store = store
        self.pool = pool
        self._seat_lock = seat_lock  # keeps this instance's SSD files its own until close()
        self._stages: dict[str, tuple[Future, int]] = {}
        self._spills: deque[tuple[int, Future, int]] = deque()

    def stage(self, plan: LoadPlan) -> None:
        """Read the plan's lower-tier blocks into their CPU slots."""
        keys = [plan.keys[s.index] for s in plan.staged]
        future = self.store.read_blocks(self.pool, [s.slot for s in plan.staged], [plan.slots[s.index] for s in plan.staged], keys)
        self._stages[plan.request_id] = (future, len(keys))

    def spill(self, plan: SpillPlan, tokens=None) -> None:
        """Write the plan's CPU blocks into their SSD slots, recording parents (and tokens, when
        known) so a restart rebuilds the chains and can announce them."""
        future = self.store.write_blocks(self.pool, plan.src_slots, plan.dst_slots, plan.keys,
                                         parents=plan.parents, tokens=tokens)
        self._spills.append((plan.spill_id, future, len(plan.keys)))

    def finished_stages(self) -> list[tuple[str, list[bool]]]:
        done = [rid for rid, (future, _) in self._stages.items() if future.done()]
        return [(rid, self._outcome(*self._stages.pop(rid), "stage", rid)) for rid in done]

    def finished_spills(self) -> list[tuple[int, list[bool]]]:
        done = []
        while self._spills and self._spills[0][1].done():
            spill_id, future, count = self._spills.popleft()
            done.append((spill_id, self._outcome(future, count, "spill", spill_id)))
        return done

    @staticmethod
    def _outcome(future: Future, count: int, kind: str, job: object) -> list[bool]:
        try:
            return list(future.result().ok)
        except Exception:  # the store reports failures per block; anything else still degrades to a miss
            logger.exception("ssd %s %s failed", kind, job)
            return [False] * count

    @property
    def num_pending(self) -> int:
        return len(self._stages) + len(self._spills)

    def wait(self, timeout_s: float) -> None:
        """Block until every submitted job finished, or the timeout passed (shutdown only)."""
        wait([f for f, _ in self._stages.values()] + [f for _, f, _ in self._spills], timeout=timeout_s)

    def close(self) -> None:
        self.store.close()
        os.close(self._seat_lock)
