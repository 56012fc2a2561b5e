"""The driver's copy calls the CUDA copier needs beyond torch: `cuMemcpyBatchAsync` (CUDA >= 12.8 driver),
`cuMemcpy2DAsync` and the per-copy `cuMemcpyAsync` fallback, through the ctypes binding of pinning.py.

`cuMemcpyBatchAsync` is looked up with `cuGetProcAddress` for the ABI of the running driver (CUDA 13
dropped its `failIdx` argument).
"""

from __future__ import annotations

import ctypes
import logging
import threading

import numpy as np

from dynamo_flexkv.transfer.cuda.pinning import CudaDriver

logger = logging.getLogger(__name__)

_CU_MEMORYTYPE_UNIFIED = 4
_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 0x1
_CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE = 0x1


class _Memcpy2D(ctypes.Structure):
    """CUDA_MEMCPY2D."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t),
    ]


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _MemLocation),
        ("dstLocHint", _MemLocation),
        ("flags", ctypes.c_uint),
    ]


class BatchMemcpy:
    """`cuMemcpyBatchAsync(dsts, srcs, sizes, count, attrs, attrsIdxs, numAttrs[, failIdx], stream)`."""

    _instance: BatchMemcpy | None = None
    _probed = False
    _lock = threading.Lock()

    def __init__(self, driver: CudaDriver):
        self.driver = driver
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        if driver.version >= 13000:
            addr = driver.proc_address("cuMemcpyBatchAsync", 13000)
            proto = ctypes.CFUNCTYPE(ctypes.c_int, vp, vp, vp, sz, vp, vp, sz, vp)
            self.with_fail_idx = False
        elif driver.version >= 12080:
            addr = driver.proc_address("cuMemcpyBatchAsync", 12080)
            proto = ctypes.CFUNCTYPE(ctypes.c_int, vp, vp, vp, sz, vp, vp, sz, vp, vp)
            self.with_fail_idx = True
        else:
            addr = 0
        if not addr:
            raise RuntimeError(f"cuMemcpyBatchAsync is not available (driver CUDA version {driver.version})")
        self._fn = proto(addr)
        self._attr_idx = (ctypes.c_size_t * 1)(0)

    @classmethod
    def get(cls) -> BatchMemcpy | None:
        with cls._lock:
            if not cls._probed:
                cls._probed = True
                try:
                    cls._instance = cls(CudaDriver.get())
                except Exception as exc:  # no driver entry point: the other methods still work
                    logger.info("cuMemcpyBatchAsync unavailable: %s", exc)
            return cls._instance

    def __call__(
        self, dst: np.ndarray, src: np.ndarray, size: np.ndarray, stream: int, device_index: int,
        flags: int = _CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE,
    ) -> None:
        count = int(size.size)
        if count == 0:
            return
        self.driver.ensure_context(device_index)
        d = np.ascontiguousarray(dst, dtype=np.uint64)
        s = np.ascontiguousarray(src, dtype=np.uint64)
        n = np.ascontiguousarray(size, dtype=np.uint64)
        attrs = _MemcpyAttributes(_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM, _MemLocation(0, 0), _MemLocation(0, 0), flags)
        args = [d.ctypes.data, s.ctypes.data, n.ctypes.data, count, ctypes.addressof(attrs),
                ctypes.addressof(self._attr_idx), 1]
        fail = ctypes.c_size_t(0)
        if self.with_fail_idx:
            args.append(ctypes.addressof(fail))
        args.append(stream)
        code = self._fn(*args)
        if code != 0:
            self.driver.check(code, f"cuMemcpyBatchAsync({count} copies)")



def memcpy_each_async(dst: np.ndarray, src: np.ndarray, size: np.ndarray, stream: int, device_index: int) -> None:
    """One `cuMemcpyAsync` per copy: drivers without `cuMemcpyBatchAsync`, or the setting off."""
    drv = CudaDriver.get()
    drv.ensure_context(device_index)
    for d, s, n in zip(dst.tolist(), src.tolist(), size.tolist()):
        drv.check(drv.lib.cuMemcpyAsync(d, s, n, stream), "cuMemcpyAsync")


def memcpy_2d_async(stream: int, device_index: int, dst: int, dst_pitch: int, src: int, src_pitch: int,
                    width: int, height: int) -> None:
    """`height` rows of `width` bytes, `*_pitch` bytes apart on each side, as one copy."""
    drv = CudaDriver.get()
    drv.ensure_context(device_index)
    copy = _Memcpy2D(srcMemoryType=_CU_MEMORYTYPE_UNIFIED, srcDevice=src, srcPitch=src_pitch,
                     dstMemoryType=_CU_MEMORYTYPE_UNIFIED, dstDevice=dst, dstPitch=dst_pitch,
                     WidthInBytes=width, Height=height)
    drv.check(drv.lib.cuMemcpy2DAsync_v2(ctypes.byref(copy), stream), f"cuMemcpy2DAsync({height} rows)")
