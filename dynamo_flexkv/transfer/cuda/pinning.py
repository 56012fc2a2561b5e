"""Page-locking (pinning) the CPU pool for the GPU, and the few CUDA driver calls the data plane needs.

On a CUDA worker the shared-memory pool must be registered with the driver (`cuMemHostRegister`):
only then do host<->device copies run at bus speed (55 GB/s each way on the lent H200, against
14 GB/s pageable), can copies be asynchronous, and can GPU kernels read and write it directly
(zero-copy). Each TP worker maps the same /dev/shm file, so each registers its own mapping.

The driver is reached through `ctypes` on `libcuda.so.1` (always present where CUDA works, no extra
package): driver calls report their errors as return codes and, unlike runtime calls, never leave a
"last error" behind that a later, unrelated PyTorch kernel launch would raise. Where libcuda cannot
be loaded, registration falls back to `torch.cuda.cudart().cudaHostRegister`.

Why not NVIDIA's `cuda-bindings` (cuda-python), which covers these calls: its wheels are built per
CUDA major version (12.9.x for CUDA 12 drivers, 13.x for CUDA 13; 7.6 and 8.4 MB, plus
`cuda-pathfinder`), and the ABI of a call such as `cuMemcpyBatchAsync` differs between the two, so
one requirement of this package cannot serve torch's cu12x and cu13x builds on every supported driver
without extras the user must pick by hand. The dozen calls used here, resolved with
`cuGetProcAddress` for the running driver's ABI, serve every driver from one wheel.

Registration runs in chunks (1 GiB by default, a whole number of pool slots each, so no slot ever
straddles two registrations) on a few threads: pinning commits and locks every page, which for a pool
of tens of GiB takes seconds, and the chunks let that proceed in parallel.

`pin_host_memory` never takes the process down: on failure it unregisters what it did, logs one clear
error, and returns None (or raises `PinningError` with `strict=True`); the copier then falls back to
pageable copies.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

CU_MEMHOSTREGISTER_PORTABLE = 0x01
CU_MEMHOSTREGISTER_DEVICEMAP = 0x02
CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED = 712
CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED = 713
DEFAULT_CHUNK_BYTES = 1 << 30


class CudaDriverError(RuntimeError):
    def __init__(self, call: str, code: int, message: str):
        super().__init__(f"{call} failed: CUDA driver error {code} ({message})")
        self.call = call
        self.code = code


class PinningError(RuntimeError):
    """The CPU pool could not be page-locked for the GPU."""


class CudaDriver:
    """Thin ctypes binding of the CUDA driver calls the data plane uses. One per process."""

    _instance: CudaDriver | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        c_int, c_uint, c_size_t, c_void_p = ctypes.c_int, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p
        p = ctypes.POINTER
        sigs = {
            "cuInit": [c_uint],
            "cuDriverGetVersion": [p(c_int)],
            "cuGetErrorString": [c_int, p(ctypes.c_char_p)],
            "cuCtxGetCurrent": [p(c_void_p)],
            "cuCtxSetCurrent": [c_void_p],
            "cuDeviceGet": [p(c_int), c_int],
            "cuDevicePrimaryCtxRetain": [p(c_void_p), c_int],
            "cuMemHostRegister_v2": [c_void_p, c_size_t, c_uint],
            "cuMemHostUnregister": [c_void_p],
            "cuMemHostGetDevicePointer_v2": [p(ctypes.c_uint64), c_void_p, c_uint],
            "cuGetProcAddress_v2": [ctypes.c_char_p, p(c_void_p), c_int, ctypes.c_uint64, p(c_int)],
            "cuMemcpyAsync": [ctypes.c_uint64, ctypes.c_uint64, c_size_t, c_void_p],
            "cuMemcpy2DAsync_v2": [c_void_p, c_void_p],
        }
        for name, args in sigs.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = c_int
        self.lib = lib
        self.check(lib.cuInit(0), "cuInit")
        version = c_int()
        self.check(lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        self.version = version.value  # e.g. 13000 for CUDA 13.0

    @classmethod
    def get(cls) -> CudaDriver:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def error_string(self, code: int) -> str:
        msg = ctypes.c_char_p()
        if self.lib.cuGetErrorString(code, ctypes.byref(msg)) != 0 or not msg.value:
            return "unknown error"
        return msg.value.decode()

    def check(self, code: int, call: str) -> None:
        if code != 0:
            raise CudaDriverError(call, code, self.error_string(code))

    def current_context(self) -> int:
        ctx = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        return ctx.value or 0

    def primary_context(self, device_index: int) -> int:
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        self.check(self.lib.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        return ctx.value or 0

    def ensure_context(self, device_index: int) -> None:
        """Make the device's primary context (the one PyTorch uses) current on this thread."""
        if self.current_context() == 0:
            self.check(self.lib.cuCtxSetCurrent(self.primary_context(device_index)), "cuCtxSetCurrent")

    def proc_address(self, symbol: str, cuda_version: int) -> int:
        """The entry point of `symbol` with the ABI of `cuda_version` (e.g. 13000), or 0."""
        pfn, status = ctypes.c_void_p(), ctypes.c_int()
        code = self.lib.cuGetProcAddress_v2(symbol.encode(), ctypes.byref(pfn), cuda_version, 0, ctypes.byref(status))
        if code != 0 or status.value != 0:
            return 0
        return pfn.value or 0


def _driver_or_none() -> CudaDriver | None:
    try:
        return CudaDriver.get()
    except (OSError, AttributeError, CudaDriverError) as exc:
        logger.debug("CUDA driver not reachable through ctypes: %s", exc)
        return None


@dataclass
class PinnedRegion:
    """A host range registered with CUDA, as a list of (address, bytes) chunks."""

    ptr: int
    nbytes: int
    chunk_bytes: int
    chunks: list[tuple[int, int]] = field(default_factory=list)
    seconds: float = 0.0
    backend: str = "driver"  # "driver" (ctypes libcuda) or "cudart" (torch.cuda.cudart())
    mapped_same_address: bool = True  # the device sees the region at the host address (UVA)

    def covers(self, ptr: int, nbytes: int) -> bool:
        return self.ptr <= ptr and ptr + nbytes <= self.ptr + self.nbytes

    def chunk_index(self, ptr: int) -> int:
        return (ptr - self.ptr) // self.chunk_bytes

    def unpin(self) -> None:
        """Unregister every chunk (idempotent)."""
        _unregister(self.chunks, self.backend)
        self.chunks = []
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.ptr) is self:
                del _REGISTRY[self.ptr]


_REGISTRY: dict[int, PinnedRegion] = {}
_REGISTRY_LOCK = threading.Lock()


def find_pinned_region(ptr: int, nbytes: int = 1) -> PinnedRegion | None:
    """The region registered by `pin_host_memory` that covers [ptr, ptr + nbytes), if any."""
    with _REGISTRY_LOCK:
        for region in _REGISTRY.values():
            if region.covers(ptr, nbytes):
                return region
    return None


def _register_one(ptr: int, size: int, backend: str, ctx: int) -> bool:
    """Register one chunk; False when it was already registered (by someone else: not ours to undo)."""
    if backend == "driver":
        drv = CudaDriver.get()
        if ctx:
            drv.check(drv.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        code = drv.lib.cuMemHostRegister_v2(ptr, size, CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP)
        if code not in (0, CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED):
            drv.check(code, f"cuMemHostRegister({size} bytes)")
        return code == 0
    else:
        cudart = torch.cuda.cudart()
        code = int(cudart.cudaHostRegister(ptr, size, 1 | 2))  # cudaHostRegisterPortable | Mapped
        if code not in (0, CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED):
            raise CudaDriverError(f"cudaHostRegister({size} bytes)", code, "see cudaError_t")
        return code == 0


def _unregister(chunks: list[tuple[int, int]], backend: str) -> None:
    for ptr, _size in chunks:
        try:
            if backend == "driver":
                CudaDriver.get().lib.cuMemHostUnregister(ptr)
            else:
                torch.cuda.cudart().cudaHostUnregister(ptr)
        except Exception:  # unpinning is best effort (process teardown)
            logger.debug("unregistering %#x failed", ptr, exc_info=True)


def pin_host_memory(
    tensor: torch.Tensor,
    *,
    row_bytes: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int = 4,
    device: torch.device | int | None = None,
    strict: bool = False,
) -> PinnedRegion | None:
    """Register a CPU tensor's memory (e.g. `CpuBlockPool.tensor`) as pinned memory for CUDA.

    - `row_bytes`: chunk boundaries fall on multiples of it (default: the tensor's row, i.e. one pool
      slot for a `[num_slots, slot_bytes]` pool), so no slot straddles two registrations.
    - Idempotent: a region already registered here is returned as is; memory registered elsewhere in
      the process (CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED) counts as pinned.
    - On failure: everything registered so far is unregistered, one error is logged, and None is
      returned (`strict=True`: `PinningError` is raised instead). Callers then run pageable copies.
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"only CPU memory can be pinned, got a tensor on {tensor.device}")
    if not torch.cuda.is_available():
        msg = "CUDA is not available: the CPU pool stays pageable"
        if strict:
            raise PinningError(msg)
        logger.info(msg)
        return None
    ptr = tensor.data_ptr()
    nbytes = tensor.numel() * tensor.element_size()
    existing = find_pinned_region(ptr, nbytes)
    if existing is not None:
        return existing
    if row_bytes is None:
        row_bytes = tensor.stride(0) * tensor.element_size() if tensor.dim() >= 2 else nbytes
    row_bytes = max(1, row_bytes)
    per_chunk = max(1, chunk_bytes // row_bytes) * row_bytes
    chunks = [(ptr + off, min(per_chunk, nbytes - off)) for off in range(0, nbytes, per_chunk)]

    dev_index = torch.device(device if device is not None else "cuda").index
    if dev_index is None:
        dev_index = torch.cuda.current_device()
    torch.cuda.init()
    drv = _driver_or_none()
    backend = "driver" if drv is not None else "cudart"
    ctx = 0
    if drv is not None:
        drv.ensure_context(dev_index)
        ctx = drv.current_context()

    start = time.perf_counter()
    done: list[tuple[int, int]] = []
    done_lock = threading.Lock()

    def work(chunk: tuple[int, int]) -> None:
        if _register_one(chunk[0], chunk[1], backend, ctx):
            with done_lock:
                done.append(chunk)

    try:
        if threads <= 1 or len(chunks) == 1:
            for chunk in chunks:
                work(chunk)
        else:
            with ThreadPoolExecutor(max_workers=min(threads, len(chunks)), thread_name_prefix="flexkv-pin") as ex:
                for fut in [ex.submit(work, c) for c in chunks]:
                    fut.result()
    except Exception as exc:
        _unregister(done, backend)
        msg = (
            f"could not pin the CPU pool ({nbytes / 2**30:.2f} GiB at {ptr:#x}) for CUDA: {exc}. "
            "Host<->GPU copies fall back to pageable memory (several times slower). Check that the "
            "host has the memory (pinned pages cannot be swapped) and that the container allows locking it."
        )
        if strict:
            raise PinningError(msg) from exc
        logger.error(msg)
        return None

    # `chunks` lists only what this call registered (and so may unregister); an empty list means the
    # whole range was already registered by someone else in this process.
    region = PinnedRegion(ptr, nbytes, per_chunk, sorted(done), time.perf_counter() - start, backend)
    if drv is not None:
        devptr = ctypes.c_uint64()
        if drv.lib.cuMemHostGetDevicePointer_v2(ctypes.byref(devptr), ptr, 0) == 0:
            region.mapped_same_address = devptr.value == ptr
    with _REGISTRY_LOCK:
        _REGISTRY[ptr] = region
    logger.info(
        "pinned %.2f GiB of host memory in %d chunk(s) in %.2f s (%s)",
        nbytes / 2**30, len(region.chunks), region.seconds, backend,
    )
    return region
