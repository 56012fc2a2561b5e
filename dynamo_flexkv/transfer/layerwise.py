"""Asynchronous transfers and layer-wise loading, with one API on CPU and CUDA.

The connector starts a load of `(slots -> block_ids)` before the forward pass and, inside it, waits for
each layer just before that layer's attention reads the KV cache:

    load = start_layerwise_load(copier, slots, block_ids)   # returns at once on CUDA
    ...
    load.wait_layer(i)        # in vLLM's wait_for_layer_load(layer i)
    ...
    load.wait_all()           # e.g. before reporting the request's load as finished
    load.synchronize()        # host-side: block until every byte landed

On CUDA (`CudaBlockCopier`) the copies are issued, layer by layer, by the caller (or the copier's issuing thread) onto
its side streams, each layer followed by its own CUDA event; the call itself returns at once.
`wait_layer(i)` waits (on the host) only until layer i has been *issued*, then makes the caller's
current stream wait for layer i's event: every kernel enqueued afterwards on that stream (the layer's
attention) runs only once layer i's bytes are in place, and the host keeps running ahead. Pass
`host=True` to block the calling thread until the bytes landed instead. Layers load in model order,
so later layers' copies overlap earlier layers' compute.

On CPU (`BlockCopier`, the CPU build of vLLM) `start_layerwise_load` performs the whole copy at once
and every wait returns immediately afterwards. `ThreadedBlockCopier` (setting `cpu_async_copies`)
runs each CPU transfer on a background thread instead and returns `FutureTransferHandle`s, so a
transfer completes after the call returns, in the order the CUDA copier completes them.

`start_save` / `start_load` are the whole-transfer equivalents. A save is ordered after the work
already queued on the caller's current stream (the forward pass that wrote the blocks) and never makes
that stream wait: poll `done()` or call `synchronize()` before handing the GPU blocks back to vLLM.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dynamo_flexkv.transfer.copier import Copier


class TransferHandle:
    """A transfer that has already completed (CPU path); the CUDA handle has the same methods."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes

    def done(self) -> bool:
        """True once every byte landed (never blocks)."""
        return True

    def wait(self) -> None:
        """Order the caller's current CUDA stream after the transfer (no-op on CPU)."""

    def synchronize(self) -> int:
        """Block the calling thread until the transfer completed; returns the bytes moved."""
        return self.nbytes


class LayerwiseLoad(TransferHandle):
    """A load whose layers land one after another; this base class is the CPU (already done) form."""

    def __init__(self, nbytes: int, num_layers: int):
        super().__init__(nbytes)
        self.num_layers = num_layers

    def _check_layer(self, layer_index: int) -> None:
        if not 0 <= layer_index < self.num_layers:
            raise IndexError(f"layer {layer_index} out of range for a model with {self.num_layers} layers")

    def wait_layer(self, layer_index: int, *, host: bool = False) -> None:
        """Return once layer `layer_index` (in the order the KV caches were registered) landed."""
        self._check_layer(layer_index)

    def wait_all(self, *, host: bool = False) -> int:
        """Return once every layer landed; returns the bytes moved."""
        return self.nbytes


class CudaTransferHandle(TransferHandle):
    """Work that the copier issues on side streams, completed by a CUDA event.

    With a copier that issues from a background thread, the handle first waits, on the host, for
    the issuing to reach it (by the caller, it is issued when the handle is returned). If issuing failed, `error` holds the exception: `done()` turns True, `synchronize()` raises it, and
    the stream-side waits return without ordering anything (the bytes must not be used).
    """

    def __init__(self, nbytes: int, device: torch.device):
        TransferHandle.__init__(self, nbytes)
        self._device = device
        self._issued = threading.Event()
        self._event: torch.cuda.Event | None = None
        self._keepalive: Any = None
        self.error: BaseException | None = None

    # called by the copier when it issued the work (from its issuing thread, if it has one)
    def _set_issued(self, event: torch.cuda.Event, keepalive: Any = None) -> None:
        self._event, self._keepalive = event, keepalive
        self._issued.set()

    def _set_failed(self, error: BaseException) -> None:
        self.error = error
        self._issued.set()

    def done(self) -> bool:
        if not self._issued.is_set():
            return False
        if self.error is not None:
            return True
        finished = self._event.query()
        if finished:
            self._keepalive = None
        return finished

    def wait(self) -> None:
        self._issued.wait()
        if self.error is None:
            torch.cuda.current_stream(self._device).wait_event(self._event)

    def synchronize(self) -> int:
        self._issued.wait()
        if self.error is not None:
            raise RuntimeError(f"transfer failed: {self.error}") from self.error
        self._event.synchronize()
        self._keepalive = None
        return self.nbytes


class CudaLayerwiseLoad(CudaTransferHandle, LayerwiseLoad):
    """Per-layer CUDA events; `wait_layer` is a stream-side wait unless `host=True`."""

    def __init__(self, nbytes: int, num_layers: int, device: torch.device, event_factory: Any = None):
        CudaTransferHandle.__init__(self, nbytes, device)
        self.num_layers = num_layers
        make_event = event_factory or torch.cuda.Event
        self._layer_events = [make_event() for _ in range(num_layers)]
        self._layer_issued = [threading.Event() for _ in range(num_layers)]

    # called by the copier when it issued the work (from its issuing thread, if it has one), in layer order
    def _layer_event(self, layer_index: int) -> torch.cuda.Event:
        return self._layer_events[layer_index]

    def _set_layer_issued(self, layer_index: int) -> None:
        self._layer_issued[layer_index].set()

    def _set_failed(self, error: BaseException) -> None:
        super()._set_failed(error)
        for flag in self._layer_issued:
            flag.set()

    def wait_layer(self, layer_index: int, *, host: bool = False) -> None:
        self._check_layer(layer_index)
        self._layer_issued[layer_index].wait()
        if self.error is not None:
            return
        event = self._layer_events[layer_index]
        if host:
            event.synchronize()
        else:
            torch.cuda.current_stream(self._device).wait_event(event)

    def wait_all(self, *, host: bool = False) -> int:
        if host:
            return self.synchronize()
        self.wait()
        return self.nbytes


class FutureTransferHandle(LayerwiseLoad):
    """A CPU transfer running on a background thread (`ThreadedBlockCopier`). Every layer lands
    together, so a per-layer wait is a wait for the whole transfer."""

    def __init__(self, future: Future, nbytes: int, num_layers: int):
        super().__init__(nbytes, num_layers)
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> None:
        self._future.exception()  # blocks until finished; an error surfaces in synchronize()

    def synchronize(self) -> int:
        self._future.result()
        return self.nbytes

    def wait_layer(self, layer_index: int, *, host: bool = False) -> None:
        self._check_layer(layer_index)
        self.wait()

    def wait_all(self, *, host: bool = False) -> int:
        self.wait()
        return self.nbytes


class AllOf(TransferHandle):
    """Several transfers awaited as one: a hybrid model's KV-cache groups each have their copier."""

    def __init__(self, handles: Sequence[TransferHandle]):
        super().__init__(sum(h.nbytes for h in handles))
        self.handles = list(handles)

    def done(self) -> bool:
        return all(h.done() for h in self.handles)

    def wait(self) -> None:
        for h in self.handles:
            h.wait()

    def synchronize(self) -> int:
        """Waits for every transfer, then raises the first failure."""
        errors = []
        for h in self.handles:
            try:
                h.synchronize()
            except Exception as exc:  # the others must still land before their blocks are reused
                errors.append(exc)
        if errors:
            raise errors[0]
        return self.nbytes


def start_save(copier: Copier, block_ids: Sequence[int], slots: Sequence[int]) -> TransferHandle:
    """GPU/CPU cache -> pool, asynchronously where the copier can (CUDA, `cpu_async_copies`)."""
    return copier.save_async(block_ids, slots)


def start_load(copier: Copier, slots: Sequence[int], block_ids: Sequence[int]) -> TransferHandle:
    """Pool -> GPU/CPU cache, asynchronously where the copier can."""
    return copier.load_async(slots, block_ids)


def start_layerwise_load(copier: Copier, slots: Sequence[int], block_ids: Sequence[int]) -> LayerwiseLoad:
    """Pool -> cache, landing layer by layer on CUDA; a single whole copy on CPU."""
    return copier.load_layerwise(slots, block_ids)
