"""A faulty disk for tests: a FUSE file system that passes every call through to a backing directory,
except that data reads and writes obey a mode read from a control file at each call:

- ``ok``: pass through;
- ``hang``: block (as a hung NVMe or a hard NFS mount does) until the mode changes;
- ``eio``: fail with EIO;
- ``flip``: reads return the data with one byte flipped (silent corruption).

The kernel serves every read and write through this process (``direct_io``), so the modes act on the
real I/O path of the code under test: its syscalls really block or fail. Run as
``python -m tests.faults.blockfs BACKING MOUNTPOINT CONTROL_FILE`` (root, or fusermount3); unmount
with ``fusermount3 -u MOUNTPOINT``. `mounted` does all of that for a test.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_POLL_S = 0.02


class FaultyPassthrough:
    use_ns = True

    def __init__(self, backing: str, control: str):
        self.backing = backing
        self.control = control

    def _path(self, path: str) -> str:
        return os.path.join(self.backing, path.lstrip("/"))

    def _mode(self) -> str:
        try:
            with open(self.control) as fh:
                return fh.read().strip() or "ok"
        except OSError:
            return "ok"

    def _gate(self) -> str:
        mode = self._mode()
        while mode == "hang":
            time.sleep(_POLL_S)
            mode = self._mode()
        if mode == "eio":
            raise _fuse_error(errno.EIO)
        return mode

    # --- metadata: plain pass-through ---------------------------------------------------------------
    def getattr(self, path, fh=None):
        try:
            st = os.lstat(self._path(path))
        except OSError as exc:
            raise _fuse_error(exc.errno) from None
        keys = ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
                "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_ino")
        out = {k: getattr(st, k) for k in keys}
        out.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        return out

    def readdir(self, path, fh):
        return [".", "..", *os.listdir(self._path(path))]

    def statfs(self, path):
        sv = os.statvfs(self._path(path))
        return {k: getattr(sv, k) for k in ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail",
                                            "f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")}

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except OSError as exc:
            raise _fuse_error(exc.errno) from None

    def chmod(self, path, mode):
        return self._call(os.chmod, self._path(path), mode)

    def chown(self, path, uid, gid):
        return self._call(os.chown, self._path(path), uid, gid)

    def utimens(self, path, times=None):
        return self._call(os.utime, self._path(path), None if times is None else None)

    def mkdir(self, path, mode):
        return self._call(os.mkdir, self._path(path), mode)

    def rmdir(self, path):
        return self._call(os.rmdir, self._path(path))

    def unlink(self, path):
        return self._call(os.unlink, self._path(path))

    def rename(self, old, new):
        return self._call(os.rename, self._path(old), self._path(new))

    def symlink(self, target, source):
        return self._call(os.symlink, source, self._path(target))

    def readlink(self, path):
        return self._call(os.readlink, self._path(path))

    def truncate(self, path, length, fh=None):
        return self._call(os.truncate, self._path(path), length)

    # --- files ------------------------------------------------------------------------------------------
    def create(self, path, mode, fi=None):
        return self._call(os.open, self._path(path), os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def open(self, path, flags):
        return self._call(os.open, self._path(path), flags & ~(os.O_DIRECT | os.O_CREAT | os.O_EXCL))

    def read(self, path, size, offset, fh):
        mode = self._gate()
        data = self._call(os.pread, fh, size, offset)
        if mode == "flip" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def write(self, path, data, offset, fh):
        self._gate()
        return self._call(os.pwrite, fh, data, offset)

    def fsync(self, path, datasync, fh):
        self._gate()
        return self._call(os.fsync, fh)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        return self._call(os.close, fh)


def _fuse_error(code: int | None):
    from mfusepy import FuseOSError

    return FuseOSError(code or errno.EIO)


def serve(backing: str, mountpoint: str, control: str) -> None:
    from mfusepy import FUSE

    FUSE(FaultyPassthrough(backing, control), mountpoint, foreground=True, nothreads=False,
         direct_io=True, allow_other=True, default_permissions=True)


class FaultyDisk:
    """A mounted FaultyPassthrough; `set(mode)` switches its behaviour for every later call."""

    def __init__(self, root: Path):
        self.backing = root / "backing"
        self.mountpoint = root / "mnt"
        self.control = root / "mode"
        root.mkdir(parents=True, exist_ok=True)
        self.backing.mkdir()
        self.mountpoint.mkdir()
        self.set("ok")

    def set(self, mode: str) -> None:
        tmp = self.control.with_suffix(".tmp")
        tmp.write_text(mode)
        tmp.replace(self.control)


@contextlib.contextmanager
def mounted(root: Path, timeout_s: float = 30) -> Iterator[FaultyDisk]:
    disk = FaultyDisk(root)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.blockfs", str(disk.backing),
                             str(disk.mountpoint), str(disk.control)], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while not os.path.ismount(disk.mountpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the FUSE disk did not mount: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(_POLL_S)
        yield disk
    finally:
        disk.set("ok")  # release anything still blocked, so the unmount can proceed
        subprocess.run(["fusermount3", "-u", "-z", str(disk.mountpoint)], check=False,
                       capture_output=True, timeout=timeout_s)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


if __name__ == "__main__":
    serve(*sys.argv[1:4])
