"""The CPU tier's bytes: one shared-memory region of fixed-size slots.

The region is a file in /dev/shm named after the vLLM instance, so the scheduler process and every
TP worker map the same bytes without any IPC handshake: whoever comes first creates it, the others
open it. Each slot is `PoolGeometry.slot_bytes` long and starts at a page boundary (mmap'd), so a slot
doubles as an O_DIRECT buffer for the SSD tier.

The whole pool is reserved in /dev/shm at start-up (`posix_fallocate`): a tmpfs that runs out of
pages kills the process touching the page with SIGBUS, mid-serving, so a pool that does not fit
(Docker's default /dev/shm is 64 MiB) must fail at start-up, with one line naming `cpu_cache_gb`,
what is free and the fix. Pool files are private (see private_files.py): never a link, never another
user's file, mode 0600.

Every process that maps a pool holds a shared `flock` on it for as long as it lives. A pool file that
nobody holds a lock on belongs to an instance that died without cleaning up (SIGKILL); the next
instance to start removes it, so killed engines never leak host memory for long.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
from pathlib import Path

import torch

from dynamo_flexkv.storage.layout import PoolGeometry
from dynamo_flexkv.storage.private_files import lock_unheld, open_private

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
POOL_PREFIX = "dynamo-flexkv-"
OWNER_SUFFIX = ".owner"
_MIB = 1 << 20


def sweep_stale_pools(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove this user's pool files that no live process holds; returns their names. Files that
    are not ours (another user's, links, anything odd) are left alone and never stop the sweep."""
    removed = []
    for path in shm_dir.glob(POOL_PREFIX + "*"):
        held = lock_unheld(path, allow_empty=path.name.endswith(OWNER_SUFFIX))  # owner files stay empty
        if held is None:
            continue
        fd, st = held
        try:
            if os.lstat(path).st_ino != st.st_ino:
                continue  # replaced since we opened it
            path.unlink()
            removed.append(path.name)
        except OSError:
            continue  # gone meanwhile
        finally:
            os.close(fd)
    for name in removed:
        logger.info("removed stale cpu pool %s left by a dead instance", name)
    return removed


def claim_pool_owner(name: str, shm_dir: Path = SHM_DIR) -> int:
    """Take the one owner seat of pool `name` (its scheduler's); returns the lock fd to keep open.

    Two live instances with the same identity (a pinned FLEXKV_SERVER_RECV_PORT) would write the same
    slots under two different indexes, so the second one must not start.
    """
    path = shm_dir / f"{name}{OWNER_SUFFIX}"
    while True:
        fd, _ = open_private(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(
                f"another running vLLM instance already uses the FlexKV cache {name!r}: give each instance "
                "its own FLEXKV_SERVER_RECV_PORT (or leave it unset for a unique one)"
            ) from None
        try:
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # a sweeper removed the file between open and lock: take the new one


def release_pool_owner(name: str, fd: int, shm_dir: Path = SHM_DIR) -> None:
    (shm_dir / f"{name}{OWNER_SUFFIX}").unlink(missing_ok=True)
    os.close(fd)


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reserve(fd: int, path: Path, total: int) -> None:
    """Commit the pool's pages now, or fail with one line naming the setting and the fix."""
    st = os.fstat(fd)
    missing = max(0, total - st.st_blocks * 512)  # what an earlier opener has not reserved yet
    vfs = os.statvfs(path.parent)
    free = vfs.f_bavail * vfs.f_frsize
    ram = _mem_available()

    def too_small(where: str, avail: int) -> ValueError:
        return ValueError(
            f"cpu_cache_gb (FLEXKV_CPU_CACHE_GB) needs {total / _MIB:.1f} MiB of shared memory for the CPU "
            f"tier but only {avail / _MIB:.1f} MiB {where}: lower cpu_cache_gb, or give the container more "
            f"shared memory (docker run --shm-size=..., a larger emptyDir medium: Memory in Kubernetes)")

    if missing > free:
        raise too_small(f"is free in {path.parent}", free + total - missing)
    if ram is not None and missing > ram:
        raise too_small("of RAM is available", ram + total - missing)
    try:
        os.posix_fallocate(fd, 0, total)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOMEM):
            vfs = os.statvfs(path.parent)
            raise too_small(f"is free in {path.parent}", vfs.f_bavail * vfs.f_frsize) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
        os.ftruncate(fd, total)  # a filesystem without fallocate (tests): pages come on first touch


class CpuBlockPool:
    """A `[num_slots, slot_bytes]` uint8 tensor over a named shared-memory file."""

    def __init__(self, name: str, geometry: PoolGeometry, shm_dir: Path = SHM_DIR):
        if geometry.num_slots <= 0:
            raise ValueError(
                f"the CPU tier has no room for a single block ({geometry.slot_bytes} bytes per block): "
                "raise cpu_cache_gb"
            )
        self.name = name
        self.geometry = geometry
        if not name.startswith(POOL_PREFIX):
            raise ValueError(f"pool names start with {POOL_PREFIX!r}, got {name!r}")
        self.path = shm_dir / name
        sweep_stale_pools(shm_dir)
        fd, created = open_private(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # held until this process exits: marks the pool in use
            size = os.fstat(fd).st_size
            if size not in (0, geometry.total_bytes):
                raise ValueError(
                    f"shared-memory pool {self.path} exists with {size} bytes, expected "
                    f"{geometry.total_bytes}: another instance uses the same identity "
                    "(unset FLEXKV_SERVER_RECV_PORT or give each instance its own)"
                )
            _reserve(fd, self.path, geometry.total_bytes)
            self._mmap = mmap.mmap(fd, geometry.total_bytes, mmap.MAP_SHARED)
        except BaseException:
            if created:
                self.path.unlink(missing_ok=True)
            os.close(fd)
            raise
        self._lock_fd = fd
        self.tensor = torch.frombuffer(self._mmap, dtype=torch.uint8).view(
            geometry.num_slots, geometry.slot_bytes
        )
        logger.info(
            "cpu pool %s: %d slots x %d bytes (%.2f GiB)",
            name, geometry.num_slots, geometry.slot_bytes, geometry.total_bytes / 2**30,
        )

    def unlink(self) -> None:
        """Remove the name; mappings that other processes still hold stay valid."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
