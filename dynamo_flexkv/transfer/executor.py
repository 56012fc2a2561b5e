"""Runs transfers off the engine's step: one background thread, results collected by polling."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferResult:
    job_id: str
    kind: str  # "load" or "save"
    ok: bool
    bytes_moved: int


class TransferExecutor:
    """FIFO executor for transfer jobs; `poll()` returns the jobs that finished since the last call.

    Jobs never raise into the engine: a failing job is logged once and reported with ok=False, so the
    caller degrades to recompute.
    """

    def __init__(self, name: str = "flexkv-transfer"):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: list[tuple[str, str, Future[int]]] = []

    def submit(self, job_id: str, kind: str, fn: Callable[[], int]) -> None:
        self._pending.append((job_id, kind, self._pool.submit(fn)))

    def poll(self, wait: bool = False) -> list[TransferResult]:
        done, still = [], []
        for job_id, kind, future in self._pending:
            if wait or future.done():
                done.append(self._result(job_id, kind, future))
            else:
                still.append((job_id, kind, future))
        self._pending = still
        return done

    @staticmethod
    def _result(job_id: str, kind: str, future: Future[int]) -> TransferResult:
        try:
            return TransferResult(job_id, kind, True, future.result())
        except Exception:  # a failed copy must degrade to recompute, never crash the engine
            logger.exception("transfer %s of request %s failed", kind, job_id)
            return TransferResult(job_id, kind, False, 0)

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def shutdown(self) -> None:
        self.poll(wait=True)
        self._pool.shutdown(wait=True)
