"""What the SSD tier checks of the machine before the engine allocates anything: its directories exist
and are writable, their filesystems have room for `ssd_cache_gb`, and the chosen I/O engine can run.

Returns problems as `(setting, reason)`; `config.load_settings` turns each into the one-line error
that names the setting as the user wrote it (``{ssd_cache_dir}`` in a reason is spelled the same way).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from dynamo_flexkv.config import GIB
from dynamo_flexkv.storage.ssd.engines import uring_available
from dynamo_flexkv.storage.ssd.seats import reclaimable_bytes


def preflight(settings: Any) -> list[tuple[str, str]]:
    """The SSD tier's start-up problems under `settings` (`FlexKVSettings`); empty when it can start."""
    problems: list[tuple[str, str]] = []
    if settings.ssd_io_engine == "uring":
        available, why = uring_available()
        if not available:
            problems.append(("ssd_io_engine", f"the io_uring engine cannot run here: {why}"))
    if settings.ssd_cache_gb > 0 and settings.ssd_cache_dir:
        problems += _directory_problems(settings.ssd_cache_dir) or _space_problems(settings)
    return problems


def _directory_problems(dirs: tuple[str, ...]) -> list[tuple[str, str]]:
    problems = []
    for path in dirs:
        if not os.path.exists(path):
            problems.append(("ssd_cache_dir", f"{path} does not exist"))
        elif not os.path.isdir(path):
            problems.append(("ssd_cache_dir", f"{path} is not a directory"))
        elif not os.access(path, os.W_OK | os.X_OK):
            problems.append(("ssd_cache_dir", f"{path} is not writable"))
    return problems[:1]  # one line per setting


def _space_problems(settings: Any) -> list[tuple[str, str]]:
    # Free space: count each filesystem once even when several directories live on it. Our own
    # files from an earlier run (and those of identities nobody runs) are reused or reclaimed
    # at start-up, so their space counts as free.
    free_by_dev: dict[int, int] = {}
    per_dir: list[str] = []
    for path in settings.ssd_cache_dir:
        try:
            dev = os.stat(path).st_dev
            free = shutil.disk_usage(path).free
        except OSError as exc:
            return [("ssd_cache_dir", f"cannot stat {path}: {exc.strerror or exc}")]
        free_by_dev.setdefault(dev, free)
        ours = reclaimable_bytes(path)
        free_by_dev[dev] += ours
        per_dir.append(f"{path}: {(free + ours) / GIB:.1f} GiB")
    total_free = sum(free_by_dev.values())
    shared = "; a shared filesystem counts once" if len(free_by_dev) < len(per_dir) else ""
    if settings.ssd_cache_gb * GIB > total_free:
        return [("ssd_cache_gb", f"only {total_free / GIB:.1f} GiB is free in {{ssd_cache_dir}} "
                                 f"({', '.join(per_dir)}{shared})")]
    return []
