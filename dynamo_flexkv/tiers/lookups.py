"""Shared-tier lookups: asks a cluster store, off the scheduler's thread, which blocks it holds."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

from dynamo_flexkv.index.engine import CacheEngine
from dynamo_flexkv.index.plans import LoadPlan
from dynamo_flexkv.storage.backend import TierBackend, completed

logger = logging.getLogger(__name__)

ABSENT_TTL_S = 1.0  # how long a shared tier's "not there" is believed: a waiting request re-asks after it
MAX_ABSENT_KEYS = 1 << 16


class SharedLookups:
    """Asks a shared tier, off the scheduler's thread, whether the blocks after a local hit exist.

    `extend` answers None ("ask again later") while the question is in flight; found blocks are
    admitted into the tier's index (a cache of what the store holds), and the first absent key is
    remembered for `absent_ttl_s` so a waiting request does not ask the store every step. A question
    unanswered after `timeout_s` counts as a miss. A block whose read from the tier failed (corrupt,
    lease expired, store gone) is remembered as absent too: the store still says it exists, and the
    request vLLM reschedules after the failed load must recompute it, not stage it again and again.
    """

    def __init__(self, engine: CacheEngine, backend: TierBackend, timeout_s: float, absent_ttl_s: float):
        self.engine = engine
        self.backend = backend
        self.timeout_s = timeout_s
        self.absent_ttl_s = absent_ttl_s
        self._asking: dict[str, tuple[Future, tuple[bytes, ...], float]] = {}
        self._absent: dict[bytes, float] = {}  # key -> until when it is known absent
        self._staging: dict[str, list[tuple[int, bytes]]] = {}  # request -> (staged position, key) read here

    def extend(self, request_id: str, keys: Sequence[bytes], first_parent: bytes | None, hits: int) -> int | None:
        rest = tuple(keys[hits:])
        now = time.monotonic()
        if not rest or not self.backend.healthy or self._absent.get(rest[0], 0.0) > now:
            self.forget(request_id)
            return hits
        asked = self._asking.get(request_id)
        if asked is None or asked[1] != rest:
            self._asking[request_id] = (self._ask(rest), rest, now)
            return None
        future, _, since = asked
        if not future.done():
            if now - since < self.timeout_s:
                return None
            logger.warning("tier %s: lookup of %d blocks unanswered after %.1fs, counted as a miss: request=%s",
                           self.backend.name, len(rest), self.timeout_s, request_id)
            self._absent_from(rest[0], now)
            self.forget(request_id)
            return hits
        del self._asking[request_id]
        try:
            found = future.result()
        except Exception:  # lookups answer False on failure; anything else is a miss too
            logger.exception("tier %s: lookup failed: request=%s", self.backend.name, request_id)
            found = []
        present = next((i for i, there in enumerate(found) if not there), min(len(found), len(rest)))
        if present < len(rest):
            self._absent_from(rest[present], now)
        if present:
            parents = [keys[hits - 1] if hits else first_parent, *rest[: present - 1]]
            self.engine.admit(self.backend.name, rest[:present], parents)
        return self.engine.lookup(keys)

    def staging(self, plan: LoadPlan) -> None:
        """A load plan's reads started: remember which of them come from this tier."""
        mine = [(position, plan.keys[s.index]) for position, s in enumerate(plan.staged)
                if s.tier == self.backend.name]
        if mine:
            self._staging[plan.request_id] = mine

    def staged(self, request_id: str, ok: Sequence[bool]) -> None:
        """A load plan's reads finished (`ok` per staged block): the first block this tier failed to
        deliver is absent for `absent_ttl_s`, so the rescheduled request recomputes from there."""
        failed = next((key for position, key in self._staging.pop(request_id, ()) if not ok[position]), None)
        if failed is not None:
            self._absent_from(failed, time.monotonic())

    def _ask(self, keys: tuple[bytes, ...]) -> Future:
        try:
            return self.backend.lookup(keys)
        except Exception:  # a backend answers False, never raises; if one does, it is a miss
            logger.exception("tier %s: lookup could not be submitted", self.backend.name)
            return completed([False] * len(keys))

    def _absent_from(self, key: bytes, now: float) -> None:
        if len(self._absent) > MAX_ABSENT_KEYS:  # bounded: drop the expired, then everything if still large
            self._absent = {k: t for k, t in self._absent.items() if t > now}
            if len(self._absent) > MAX_ABSENT_KEYS:
                self._absent.clear()
        self._absent[key] = now + self.absent_ttl_s

    def forget(self, request_id: str) -> None:
        self._asking.pop(request_id, None)

