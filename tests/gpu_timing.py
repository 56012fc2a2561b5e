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


def save_reads_after_the_next_forward() -> None:
    """A save longer than a step: on a GPU, a save started in one step may still be reading its
    blocks while the next step's forward runs. Here the worker's saves read nothing until they are
    awaited, or until the next step's forward ran (its `get_finished`): a block vLLM hands out again
    in that step is overwritten first, unless the connector awaits the save before the step."""
    from dynamo_flexkv.integration.vllm import worker

    started: list[_DeferredRead] = []  # since the current step began
    due: list[_DeferredRead] = []  # read once this step's forward ran
    start_save = worker.start_save
    handle_preemptions, get_finished = worker.WorkerSide.handle_preemptions, worker.WorkerSide.get_finished

    def deferred_start_save(copier, block_ids, slots):
        read = _DeferredRead(lambda: start_save(copier, block_ids, slots), len(block_ids) * copier.block_bytes)
        started.append(read)
        return read

    def handle_preemptions_of_a_new_step(self, metadata):  # the first hook of every step
        due.extend(started)
        started.clear()
        handle_preemptions(self, metadata)

    def get_finished_after_the_forward(self):
        for read in due:
            read.start()
        due.clear()
        return get_finished(self)

    worker.start_save = deferred_start_save
    worker.WorkerSide.handle_preemptions = handle_preemptions_of_a_new_step
    worker.WorkerSide.get_finished = get_finished_after_the_forward


class _DeferredRead:
    """A save whose copy starts only when it is awaited or `start`ed."""

    def __init__(self, start, nbytes: int):
        self._start = start
        self._handle = None
        self.nbytes = nbytes

    def start(self):
        if self._handle is None:
            self._handle = self._start()
        return self._handle

    def done(self) -> bool:
        return self._handle is not None and self._handle.done()

    def wait(self) -> None:
        self.start().wait()

    def synchronize(self) -> int:
        return self.start().synchronize()
