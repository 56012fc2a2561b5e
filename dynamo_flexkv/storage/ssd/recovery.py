"""Bringing a degraded SSD store back (`store.py`) once its disks answer again.

A transient fault (a hang that ends, an EIO burst) used to keep the tier off until the engine
restarted. `Recovery` runs one background thread that, while the store is degraded, probes every
directory with backoff (first after `probe_interval_s`, doubling up to `MAX_PROBE_INTERVAL_S`): an
O_DIRECT write, fsync and read-back of one 4 KiB page of a private probe file next to the data file.
When every directory passes, the store's files are re-validated and it serves again (`resume`).

Every probe and the re-validation run on a helper thread that is waited for at most `io_timeout_s`:
a disk that hangs again leaves that thread blocked in the kernel and the store degraded; no new
helper starts while an old one is still stuck, so a hung disk costs one thread, not one per probe.
A data file removed or replaced under the store is not a transient fault: recovery gives up.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from dynamo_flexkv.storage.private_files import open_private
from dynamo_flexkv.storage.ssd.engines import IoOp, run_sync
from dynamo_flexkv.storage.ssd.file_format import ALIGN, aligned_buffer

if TYPE_CHECKING:
    from dynamo_flexkv.storage.ssd.store import SsdBlockStore

logger = logging.getLogger(__name__)

MAX_PROBE_INTERVAL_S = 10.0


class GiveUp(Exception):
    """The fault is not transient (a data file was removed or replaced): stop probing."""


def probe_directory(path: str, inject: Callable[[IoOp], None] | None) -> None:
    """Write, fsync and read back one page of `path` with O_DIRECT where the filesystem allows it;
    raises OSError when the disk does not answer correctly."""
    buf = aligned_buffer(ALIGN)
    try:
        pattern = os.urandom(ALIGN)
        buf[:ALIGN] = pattern
        try:
            fd, _ = open_private(path, os.O_RDWR | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            fd, _ = open_private(path, os.O_RDWR)
        try:
            with memoryview(buf) as view:
                for write in (True, False):
                    op = IoOp(write, fd, path, 0, [view], ALIGN)
                    if inject is not None:
                        inject(op)  # the store's test seam sees probes like any other op
                    if not write:
                        os.fsync(fd)
                        buf[:ALIGN] = bytes(ALIGN)
                    run_sync(op)
            if buf[:ALIGN] != pattern:
                raise OSError(errno.EIO, "probe page read back differs from what was written", path)
        finally:
            os.close(fd)
            os.unlink(path)  # leave nothing behind in the cache directory
    finally:
        buf.close()


class Recovery:
    def __init__(self, store: SsdBlockStore, probe_interval_s: float):
        self._store = store
        self.probe_interval_s = probe_interval_s
        self._cv = threading.Condition()
        self._degraded = False
        self._stopped = False
        self.helper: threading.Thread | None = None  # the last probe; may be stuck in the kernel
        self.thread = threading.Thread(target=self._run, name="flexkv-ssd-recovery", daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """The store just degraded: start probing."""
        with self._cv:
            self._degraded = True
            self._cv.notify()

    def stop(self) -> None:
        """No probe starts after this; one in progress may go on (the store then closes its files only
        once `helper` returned: it may be writing to them)."""
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._degraded or self._stopped)
                if self._stopped:
                    return
                self._degraded = False
            interval, attempts, since = self.probe_interval_s, 0, time.monotonic()
            while True:
                with self._cv:
                    if self._cv.wait_for(lambda: self._stopped, timeout=interval):
                        return
                    self._degraded = False  # a degradation while we probe is this same episode
                attempts += 1
                try:
                    error = self._bounded(self.resume)
                except GiveUp as exc:
                    if not (self._stopped or self._store._closed):  # closing is no failure to report
                        logger.error("%s: not recovering: %s", self._store.name, exc)
                    return
                if error is None:
                    logger.warning("%s: recovered after %.1f s (%d probes): serving again",
                                   self._store.name, time.monotonic() - since, attempts)
                    break
                if attempts == 1:
                    logger.warning("%s: probing the disk every %.1f-%.0f s to bring the tier back: %s",
                                   self._store.name, self.probe_interval_s, MAX_PROBE_INTERVAL_S, error)
                interval = min(interval * 2, MAX_PROBE_INTERVAL_S)

    def resume(self) -> None:
        """Probe each directory, re-validate each file (still ours, same header; record pages the
        disk lost are rewritten from memory), persist every record and fsync, then lift the store's
        degradation. Blocks whose read failed were already dropped by the store; every block's data
        is checked against its checksum on each read, as always, so a block the fault damaged is a
        miss, never served. Raises on failure (GiveUp when the fault is not transient)."""
        store = self._store
        faults = store.faults
        files = list(store._files)
        gone = [f.path for f in files if f.removed()]
        if gone:
            raise GiveUp(f"{gone[0]} (or its directory) was removed or replaced")
        for f in files:
            probe_directory(f"{f.path}.probe", store._inject)
        try:
            lost = sum(f.revalidate() for f in files)
        except RuntimeError as exc:
            raise GiveUp(str(exc)) from exc
        for f in files:
            f.flush(store._inject)
            os.fsync(f.fd)
        store.lift_degradation(faults)
        if lost:
            logger.warning("%s: %d metadata pages on disk differed from the records served; rewritten",
                           store.name, lost)

    def _bounded(self, attempt: Callable[[], None]) -> str | None:
        """Run `attempt` on a helper thread for at most the store's I/O timeout: None on success,
        else why not. Raises GiveUp from `attempt`."""
        if self.helper is not None and self.helper.is_alive():
            return "the previous probe is still blocked in the kernel"
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                attempt()
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - reported to the prober
                outcome.append(exc)

        with self._cv:  # started under the lock: `stop` then either prevents it or sees it
            if self._stopped:
                raise GiveUp("the store is closing")
            self.helper = threading.Thread(target=run, name="flexkv-ssd-probe", daemon=True)
            self.helper.start()
        self.helper.join(self._store.io_timeout_s)
        if not outcome:
            return f"probe did not complete within {self._store.io_timeout_s:g} s"
        if isinstance(outcome[0], GiveUp):
            raise outcome[0]
        return None if outcome[0] is None else f"{outcome[0].__class__.__name__}: {outcome[0]}"
