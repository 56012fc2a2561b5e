"""Store calls with a deadline: each call's Future completes by its deadline, whatever the store does.

A blocking client call cannot be cancelled (Mooncake's C++ client, a socket read): at the deadline
the caller's Future is answered with the call's timeout value and the call is left to return on its
thread. A call still running then is *overdue*: its timeout value is built with a Future that
completes when the call finally returns (`settled`), so a caller can keep what the late call may
still write (pool slots) out of use until then. A call whose deadline passed while it was still
queued never starts. Threads are daemons: a call that never returns never blocks the process's exit.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Call:
    fn: Callable[..., Any]
    args: tuple
    deadline: float
    on_timeout: Callable[[Future | None], Any]  # the answer at the deadline; given `settled` if it runs
    future: Future = field(default_factory=Future)
    settled: Future | None = None  # set when the call starts; completes when it returned


class DeadlineCalls:
    """`threads` daemon threads running calls in submission order; a watchdog answers every call's
    Future by `timeout_s` after submission. `on_expired(call_name)` runs (watchdog thread) for each
    call answered by its deadline."""

    def __init__(self, threads: int, name: str, timeout_s: float, on_expired: Callable[[str], None]):
        self.name = name
        self.timeout_s = timeout_s
        self._on_expired = on_expired
        self._lock = threading.Lock()
        self._work_ready = threading.Condition(self._lock)
        # Deadlines come in submission order (one timeout): the watchdog is woken only when the
        # earliest one changes, not by every call (a thread switch per call on a busy machine)
        self._watch_ready = threading.Condition(self._lock)
        self._queue: deque[_Call] = deque()
        self._deadlines: list[tuple[float, int, _Call]] = []
        self._order = itertools.count()
        self._running = 0
        self.overdue = 0  # calls past their deadline still running
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        self._threads.append(threading.Thread(target=self._watch, name=f"{name}-deadlines", daemon=True))
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., Any], *args: Any, on_timeout: Callable[[Future | None], Any]) -> Future:
        call = _Call(fn, args, time.monotonic() + self.timeout_s, on_timeout)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: closed")
            self._queue.append(call)
            if not self._deadlines:
                self._watch_ready.notify()
            heapq.heappush(self._deadlines, (call.deadline, next(self._order), call))
            self._work_ready.notify()
        return call.future

    @property
    def running(self) -> int:
        """Calls running now, overdue ones included."""
        return self._running

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._work_ready.wait()
                if not self._queue:
                    return
                call = self._queue.popleft()
                if call.future.done():  # answered by its deadline while queued: never started
                    continue
                call.settled = Future()
                self._running += 1
            try:
                outcome, failed = call.fn(*call.args), None
            except BaseException as exc:  # the callers' functions answer misses; this is a bug, still answered
                outcome, failed = None, exc
            with self._lock:
                self._running -= 1
                late = call.future.done()
                if late:
                    self.overdue -= 1
                elif failed is not None:
                    call.future.set_exception(failed)
                else:
                    call.future.set_result(outcome)
            call.settled.set_result(None)
            if late:
                logger.info("%s: a call answered %.1fs after its deadline; its answer was dropped",
                            self.name, time.monotonic() - call.deadline)

    def _watch(self) -> None:
        while True:
            expired = []
            with self._lock:
                if self._closed and not self._deadlines:
                    return
                now = time.monotonic()
                while self._deadlines and (self._deadlines[0][0] <= now or self._deadlines[0][2].future.done()):
                    call = heapq.heappop(self._deadlines)[2]
                    if not call.future.done():
                        running = call.settled is not None
                        self.overdue += running
                        call.future.set_result(call.on_timeout(call.settled if running else None))
                        expired.append(call)
                if not expired:
                    self._watch_ready.wait(self._deadlines[0][0] - now if self._deadlines else None)
                    continue
            for call in expired:
                self._on_expired(getattr(call.fn, "__name__", "call").strip("_").removesuffix("_batch"))

    def close(self) -> bool:
        """Take no more calls; wait until every submitted call was answered (each by its deadline).
        True when no call is still running (an overdue one may never return: its thread is left)."""
        with self._lock:
            self._closed = True
            self._work_ready.notify_all()
            self._watch_ready.notify_all()
            pending = [call.future for _, _, call in self._deadlines]
        for future in pending:
            try:
                future.exception(timeout=self.timeout_s + 1)
            except Exception:  # noqa: BLE001 - only waiting here
                pass
        deadline = time.monotonic() + 1  # a call answered just now may still be finishing its bookkeeping
        with self._lock:
            while self._running and time.monotonic() < deadline:
                self._work_ready.wait(0.05)
            return self._running == 0
