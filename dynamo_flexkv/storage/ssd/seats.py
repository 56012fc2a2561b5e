"""Which SSD files an instance may use: stable across restarts, never shared by two live instances,
and the files of dead identities reclaimed.

Warm restart wants an engine to find the files it wrote before, so file names derive from the
model/layout identity, not from a per-process id. Two live engines with the same identity and the
same directories must still not write the same files: each claims the lowest free *seat* number by
holding an exclusive `flock` on `<first dir>/flexkv-<identity>.seat<N>.lock` for its lifetime. A
restarted engine (its predecessor's lock died with it) takes seat 0 again and finds its blocks.

Every live store holds an exclusive `flock` on each of its data files, so a `flexkv-*.ssd` file
nobody holds belongs to no running instance: when the identity changed (another model, capacity or
layout), that file would otherwise hold its preallocated space forever. `reclaim_dead_files` removes
such files, only directly inside the configured directories, only regular files this user owns
privately, never following a link (see private_files.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import xxhash

from dynamo_flexkv.storage.private_files import ForeignFileError, lock_unheld, open_private

logger = logging.getLogger(__name__)

MAX_SEATS = 64
DATA_FILE_GLOB = "flexkv-*.ssd"


def canonical_identity(identity: Mapping[str, str | int]) -> tuple[dict[str, str | int], str]:
    """The identity with sorted keys, and the hash that names its data files."""
    out: dict[str, str | int] = {}
    for k, v in identity.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"identity must map str to str|int, got {k!r}: {v!r}")
        out[k] = v
    canonical = dict(sorted(out.items()))
    return canonical, xxhash.xxh3_64_hexdigest(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())


def claim_seat(directory: str, identity: Mapping[str, object]) -> tuple[int, int]:
    """Returns (seat number, lock fd — keep it open while the files are in use). A seat whose lock
    file is not ours (a link, another user's file) is skipped, never used."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    for seat in range(MAX_SEATS):
        path = Path(directory) / f"flexkv-{digest}.seat{seat}.lock"
        try:
            fd, _ = open_private(path)
        except ForeignFileError as exc:
            logger.warning("ssd seat %d skipped: %s", seat, exc)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return seat, fd
    raise RuntimeError(f"{MAX_SEATS} live instances already use SSD cache files in {directory}")


def _dead_files(directory: str, keep: str | None):
    """Yield (path, fd holding an exclusive lock, bytes allocated) for each data file in `directory`
    that no live store holds; the caller closes fd (which releases the lock)."""
    try:
        entries = sorted(Path(directory).glob(DATA_FILE_GLOB))
    except OSError:
        return
    for path in entries:
        if path.name == keep:
            continue
        held = lock_unheld(path)  # an empty file: a store creating it right now
        if held is not None:
            yield path, *held


def reclaimable_bytes(directory: str) -> int:
    """Disk space the data files of dead identities in `directory` hold (checked, not removed)."""
    total = 0
    for _path, fd, st in _dead_files(directory, None):
        total += st.st_blocks * 512
        os.close(fd)
    return total


def reclaim_dead_files(directory: str, keep: str) -> list[str]:
    """Remove the data files in `directory` that no live store holds, except `keep` (our own name,
    which a warm restart reuses). Returns the removed names; one log line each."""
    removed = []
    for path, fd, st in _dead_files(directory, keep):
        try:
            if os.lstat(path).st_ino == st.st_ino:
                path.unlink()
                removed.append(path.name)
                logger.info("ssd: reclaimed %s (%.1f MiB) left by an identity no running instance uses",
                            path, st.st_blocks * 512 / (1 << 20))
        except OSError as exc:
            logger.warning("ssd: cannot reclaim %s: %s", path, exc)
        finally:
            os.close(fd)
    return removed
