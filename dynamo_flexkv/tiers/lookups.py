"""Shared-tier lookups: asks a cluster store, off the scheduler's thread, which blocks it holds."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from dynamo_flexkv.index.engine import CacheEngine
from dynamo_flexkv.index.plans import LoadPlan
from dynamo_flexkv.storage.backend import TierBackend, completed

logger = logging.getLogger(__name__)

ABSENT_TTL_S = 1.0  # how long a shared tier's "not there" is believed: a waiting request re-asks after it
MAX_ABSENT_KEYS = 1 << 16


@dataclass(eq=False)
class _Question:
    """One existence query to the store: the keys asked, from one block to the end of a prompt."""

    future: Future
    keys: tuple[bytes, ...]
    parent: bytes | None  # the block before its first key
    asked_at: float
    settled: bool = False  # its answer was applied (or it was given up on)

    def covers(self, rest: Sequence[bytes], at: int | None) -> bool:
        """Whether this question asked `rest` (from its block `at` on), or as much of it as it reaches."""
        return at is not None and tuple(rest[: len(self.keys) - at]) == self.keys[at: at + len(rest)]


class SharedLookups:
    """Asks a shared tier, off the scheduler's thread, whether the blocks after a local hit exist.

    `extend` answers None ("ask again later") while the question is in flight; found blocks are
    admitted into the tier's index (a cache of what the store holds), and the first absent key is
    remembered for `absent_ttl_s` so a waiting request does not ask the store every step.

    A request waits at most `timeout_s` in all, from the first step it waited: its un-hit boundary
    may move between steps (vLLM's own hit, another request's saves), and a question still pending
    that covers the new boundary is waited for, never asked again -- the request's own or another
    request's (requests sharing a prefix share one question). Once the budget is spent the request
    counts what the store has not answered as a miss. A block whose read from the tier failed
    (corrupt, lease expired, store gone) is remembered as absent too: the store still says it
    exists, and the request vLLM reschedules after the failed load must recompute it, not stage it
    again and again.
    """

    def __init__(self, engine: CacheEngine, backend: TierBackend, timeout_s: float, absent_ttl_s: float):
        self.engine = engine
        self.backend = backend
        self.timeout_s = timeout_s
        self.absent_ttl_s = absent_ttl_s
        self._waiting: dict[str, float] = {}  # request -> when it first waited: its one budget of `timeout_s`
        self._pending: dict[bytes, tuple[_Question, int]] = {}  # key -> a pending question asking it, where
        self._questions: deque[_Question] = deque()  # pending, oldest first
        self._absent: dict[bytes, float] = {}  # key -> until when it is known absent
        self._staging: dict[str, list[tuple[int, bytes]]] = {}  # request -> (staged position, key) read here

    def extend(self, request_id: str, keys: Sequence[bytes], first_parent: bytes | None, hits: int) -> int | None:
        now = time.monotonic()
        self._forget_old_questions(now)
        since = self._waiting.setdefault(request_id, now)
        if not self._worth_asking(request_id, keys, hits, since, now):
            return hits
        rest = keys[hits:]
        question = self._covering(rest)
        asked = question is None
        if asked:
            question = self._ask(tuple(rest), keys[hits - 1] if hits else first_parent, now)
        if asked or not question.future.done():  # a new question is looked at from the next step on
            return None
        self._apply(question, now)
        hits = self.engine.lookup(keys)
        if self._worth_asking(request_id, keys, hits, since, now):  # the question reached only part of it
            self._ask(tuple(keys[hits:]), keys[hits - 1] if hits else first_parent, now)
            return None
        return hits  # answered: a later ask (vLLM reschedules after a failed load) has a budget of its own

    def _worth_asking(self, request_id: str, keys: Sequence[bytes], hits: int, since: float, now: float) -> bool:
        """Whether the blocks from `hits` on are worth waiting for; if not, the request is forgotten
        (its answer is final)."""
        rest = keys[hits:]
        if rest and self.backend.healthy and self._absent.get(rest[0], 0.0) <= now:
            if now - since < self.timeout_s:
                return True
            logger.warning("tier %s: lookup of %d blocks unanswered after %.1fs, counted as a miss: request=%s",
                           self.backend.name, len(rest), self.timeout_s, request_id)
            self._absent_from(rest[0], now)
        self.forget(request_id)
        return False

    def _covering(self, rest: Sequence[bytes]) -> _Question | None:
        asked = self._pending.get(rest[0])
        if asked is None:
            return None
        question, at = asked
        return question if not question.settled and question.covers(rest, at) else None

    def _ask(self, keys: tuple[bytes, ...], parent: bytes | None, now: float) -> _Question:
        try:
            future = self.backend.lookup(keys)
        except Exception:  # a backend answers False, never raises; if one does, it is a miss
            logger.exception("tier %s: lookup could not be submitted", self.backend.name)
            future = completed([False] * len(keys))
        question = _Question(future, keys, parent, now)
        self._questions.append(question)
        for at, key in enumerate(keys):
            self._pending[key] = (question, at)
        return question

    def _apply(self, question: _Question, now: float) -> None:
        """Admit what a finished question found (once); its first absent key is absent for a while."""
        if question.settled:
            return
        self._drop(question)
        try:
            found = question.future.result()
        except Exception:  # lookups answer False on failure; anything else is a miss too
            logger.exception("tier %s: lookup failed", self.backend.name)
            found = []
        keys = question.keys
        present = next((i for i, there in enumerate(found) if not there), min(len(found), len(keys)))
        if present < len(keys):
            self._absent_from(keys[present], now)
        if present:
            parents = [question.parent, *keys[: present - 1]]
            self.engine.admit(self.backend.name, keys[:present], parents)

    def _forget_old_questions(self, now: float) -> None:
        """Forget questions that were applied or went unanswered past `timeout_s` (no request waits
        longer), so the pending map stays as small as the questions in flight."""
        while self._questions and (self._questions[0].settled or now - self._questions[0].asked_at >= self.timeout_s):
            self._drop(self._questions.popleft())

    def _drop(self, question: _Question) -> None:
        question.settled = True
        for key in question.keys:
            if self._pending.get(key, (None,))[0] is question:
                del self._pending[key]

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

    def _absent_from(self, key: bytes, now: float) -> None:
        if len(self._absent) > MAX_ABSENT_KEYS:  # bounded: drop the expired, then everything if still large
            self._absent = {k: t for k, t in self._absent.items() if t > now}
            if len(self._absent) > MAX_ABSENT_KEYS:
                self._absent.clear()
        self._absent[key] = now + self.absent_ttl_s

    def forget(self, request_id: str) -> None:
        self._waiting.pop(request_id, None)
