"""Make the CPU build's transfers land as late as they do on a GPU, where the connector depends on it.

Each function runs in an engine process before vLLM starts (`EngineHost(child_setup=...)`).
"""

from __future__ import annotations


def saves_land_a_step_late() -> None:
    """A 2 GiB save takes ~40 ms on the H200, longer than the forward it overlaps: it is still in
    flight when its step ends, and vLLM has already finished the request. A CPU copy is done by then;
    here every save the worker starts counts as landed only once the worker starts its next step."""
    from dynamo_flexkv.integration.vllm import worker

    started_this_step: list[_LateSave] = []
    start_save, start_step = worker.start_save, worker.WorkerSide.start_step

    def late_start_save(*args, **kwargs):
        handle = _LateSave(start_save(*args, **kwargs))
        started_this_step.append(handle)
        return handle

    def start_step_landing_the_last_ones(self, metadata):
        for handle in started_this_step:
            handle.landed = True
        started_this_step.clear()
        start_step(self, metadata)

    worker.start_save = late_start_save
    worker.WorkerSide.start_step = start_step_landing_the_last_ones


class _LateSave:
    def __init__(self, handle):
        self._handle = handle
        self.nbytes = handle.nbytes
        self.landed = False

    def done(self) -> bool:
        return self.landed and self._handle.done()

    def wait(self) -> None:
        self._handle.wait()

    def synchronize(self) -> int:
        return self._handle.synchronize()
