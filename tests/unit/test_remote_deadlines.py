"""The cluster-store template's deadlines (storage/remote/deadlines.py, base.py) over a store whose
calls block until the test lets them return: every Future is answered by its deadline, a late call
is reported unsettled until it returned, a queued call past its deadline never starts, the tier
degrades and comes back through its background probe, and start-up is bounded."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.storage.remote.base import RemoteTier
from dynamo_flexkv.storage.remote.deadlines import DeadlineCalls
from tests.helpers import wait_until

TIMEOUT_S = 0.2
WAIT_S = 10  # a generous bound on what must happen within TIMEOUT_S


def test_a_blocked_call_is_answered_at_its_deadline_and_reported_settled_when_it_returns():
    release, expired = threading.Event(), []
    calls = DeadlineCalls(1, "test", TIMEOUT_S, expired.append)
    ran = []

    def blocked():
        release.wait()
        return "late"

    first = calls.submit(blocked, on_timeout=lambda settled: ("timed out", settled))
    queued = calls.submit(lambda: ran.append(1), on_timeout=lambda settled: ("timed out", settled))
    answer, settled = first.result(timeout=WAIT_S)
    assert answer == "timed out" and settled is not None and not settled.done() and calls.overdue == 1
    assert queued.result(timeout=WAIT_S) == ("timed out", None)  # expired while queued
    release.set()
    settled.result(timeout=WAIT_S)
    assert calls.close() and calls.overdue == 0 and ran == [] and expired == ["blocked", "<lambda>"]


def test_close_is_bounded_with_a_call_that_never_returns():
    calls = DeadlineCalls(1, "test", TIMEOUT_S, lambda verb: None)
    calls.submit(threading.Event().wait, on_timeout=lambda settled: None)
    time.sleep(0.05)  # let it start
    started = time.monotonic()
    assert calls.close() is False and time.monotonic() - started < TIMEOUT_S + 2


class BlockingStore(RemoteTier):
    """A store whose every call waits for `gate` (set: it answers at once)."""

    name = "BLOCKING"

    def __init__(self, *args):
        super().__init__(*args)
        self.gate = threading.Event()
        self.values: dict[str, bytes] = {}

    @classmethod
    def parse_url(cls, url):
        return url

    def _connect(self):
        self.gate.wait()

    def _put(self, rows, headers, slots, names):
        self.gate.wait()
        for name, slot in zip(names, slots):
            self.values[name] = headers[slot].tobytes() + rows[slot].tobytes()
        return [True] * len(names)

    def _get(self, rows, headers, slots, names, accept):
        self.gate.wait()
        for name, slot in zip(names, slots):
            value = np.frombuffer(self.values[name], np.uint8)
            headers[slot], rows[slot] = value[: headers.shape[1]], value[headers.shape[1]:]
        return [accept(i, headers[slot], rows[slot]) for i, slot in enumerate(slots)]

    def _exists(self, names):
        self.gate.wait()
        return [name in self.values for name in names]

    def _disconnect(self):
        pass


def open_blocking() -> BlockingStore:
    settings = FlexKVSettings(remote_store="redis://localhost:1/0", remote_timeout_s=TIMEOUT_S)
    tier = BlockingStore("blocking://", {"model": "m"}, 1024, settings)
    tier.gate.set()
    tier._prober.start()
    return tier


def test_a_stalled_store_degrades_at_the_deadline_and_a_probe_brings_it_back():
    tier = open_blocking()
    pool = torch.randint(0, 256, (4, 1024), dtype=torch.uint8)
    try:
        wait_until(lambda: tier.healthy, WAIT_S, "connected")
        assert tier.write(pool, [0], [0], [b"k0"]).result(timeout=WAIT_S).ok == [True]
        tier.gate.clear()  # the store stalls
        read = tier.read(pool, [0], [1], [b"k0"]).result(timeout=WAIT_S)
        assert read.ok == [False] and read.unsettled is not None and not tier.healthy
        assert tier.stats.timeouts == 1 and "unanswered" in tier.degraded_reason
        assert tier.lookup([b"k0"]).result(timeout=WAIT_S) == [False]  # degraded: answered at once
        tier.gate.set()  # the store answers again: the late read returns, the probe succeeds
        read.unsettled.result(timeout=WAIT_S)
        wait_until(lambda: tier.healthy, WAIT_S, "serving again")
        assert tier.read(pool, [0], [2], [b"k0"]).result(timeout=WAIT_S).ok == [True]
        assert torch.equal(pool[2], pool[0]) and tier.stats.blocks_read == 1  # the late answer was not counted
    finally:
        tier.close()


@pytest.mark.parametrize("start_degraded", [True, False])
def test_a_store_that_never_answers_at_start_up_is_degraded_or_refused_in_bounded_time(start_degraded):
    settings = FlexKVSettings(remote_store="redis://localhost:1/0", remote_timeout_s=TIMEOUT_S,
                              remote_start_degraded=start_degraded)
    started = time.monotonic()
    if start_degraded:
        tier = BlockingStore.open({"model": "m"}, 1024, settings)
        try:
            assert not tier.healthy and tier.stats.started_degraded == 1 and "did not answer" in tier.degraded_reason
            tier.gate.set()
            wait_until(lambda: tier.healthy, WAIT_S, "connected in the background")
        finally:
            tier.close()
    else:
        with pytest.raises(ConnectionError, match="did not answer within"):
            BlockingStore.open({"model": "m"}, 1024, settings)
    assert time.monotonic() - started < TIMEOUT_S + WAIT_S
