"""Which SSD files an instance may use: stable across restarts, never shared by two live instances.

Warm restart wants an engine to find the files it wrote before, so file names derive from the
model/layout identity, not from a per-process id. Two live engines with the same identity and the
same directories must still not write the same files: each claims the lowest free *seat* number by
holding an exclusive `flock` on `<first dir>/flexkv-<identity>.seat<N>.lock` for its lifetime. A
restarted engine (its predecessor's lock died with it) takes seat 0 again and finds its blocks.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

MAX_SEATS = 64


def claim_seat(directory: str, identity: Mapping[str, object]) -> tuple[int, int]:
    """Returns (seat number, lock fd — keep it open while the files are in use)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    for seat in range(MAX_SEATS):
        path = Path(directory) / f"flexkv-{digest}.seat{seat}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return seat, fd
    raise RuntimeError(f"{MAX_SEATS} live instances already use SSD cache files in {directory}")
