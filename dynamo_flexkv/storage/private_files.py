"""Opening the files that hold KV bytes and locks (shared-memory pools, SSD files, lock files).

KV bytes are user data, and these files live in directories other users can write to (/dev/shm is
world-writable). So a file is only ever used when this process created it, or when it is a plain
file owned by this user with no group/other permissions: links are never followed (`O_NOFOLLOW`),
new files are created exclusively (`O_EXCL`) with mode 0600, and anything else is refused with an
error that names the file and its owner. Callers that merely scan a directory (sweepers) use
`lock_unheld` and skip what is not theirs instead of failing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


class ForeignFileError(ValueError):
    """A file at one of our names is a link, not a regular file, or belongs to someone else."""


def is_ours(st: os.stat_result) -> bool:
    """A regular file owned by this user that no other user can read or write."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def lock_unheld(path: Path, allow_empty: bool = False) -> tuple[int, os.stat_result] | None:
    """Open `path` and take its exclusive lock if it is ours and no live process holds it: returns
    (fd holding the lock, its stat), the caller closes fd; else None. An empty file is skipped
    unless `allow_empty`: its creator is still sizing it and locks it right after."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if is_ours(st) and (st.st_size > 0 or allow_empty):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd, st
    except OSError:
        pass  # held by a live process (EWOULDBLOCK), or gone meanwhile
    os.close(fd)
    return None


def _refusal(path: Path, st: os.stat_result | None, why: str) -> ForeignFileError:
    owner = f" (owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})" if st is not None else ""
    return ForeignFileError(f"refusing to use {path}{owner}: {why}; remove it if it is stale, or "
                            "configure another name/directory")


def open_private(path: Path, flags: int = os.O_RDWR) -> tuple[int, bool]:
    """Open or create `path` as a private file; returns (fd, created). Raises ForeignFileError for
    a symlink, a non-regular file or a file this user does not own privately; other OSErrors pass."""
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600), True
        except FileExistsError:
            pass
        try:
            fd = os.open(path, flags | _NOFOLLOW)
        except FileNotFoundError:
            continue  # removed between the two opens: try to create it again
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refusal(path, None, "it is a symbolic link") from None
            raise
        st = os.fstat(fd)
        if not is_ours(st):
            os.close(fd)
            why = ("it is not a regular file" if not stat.S_ISREG(st.st_mode) else
                   "it belongs to another user" if st.st_uid != os.geteuid() else
                   "other users can access it (expected mode 0600)")
            raise _refusal(path, st, why)
        return fd, False
