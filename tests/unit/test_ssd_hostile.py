"""The SSD tier against a hostile or broken environment: planted links and other users' files,
files of dead identities, and start-up I/O faults. Each case must leave the engine serving (the
tier disabled, one log line), never follow a link, and never touch a file that is not ours."""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import pytest
import torch

from dynamo_flexkv.storage.ssd.store import IoResult, SsdBlockStore
from dynamo_flexkv.storage.ssd.seats import claim_seat, reclaim_dead_files, reclaimable_bytes

SLOT = 16 * 1024
TIMEOUT = 30
IDENT = {"model": "tiny-llama", "layers": 4, "block_size": 16}
NOBODY = 65534


@pytest.fixture
def pool():
    path = f"/dev/shm/flexkv-test-hostile-{uuid.uuid4().hex}"
    tensor = torch.from_file(path, shared=True, size=8 * SLOT, dtype=torch.uint8).view(8, SLOT)
    tensor.copy_(torch.randint(0, 256, (8, SLOT), dtype=torch.uint8))
    yield tensor
    os.unlink(path)


def data_file(directory: Path, identity=IDENT) -> Path:
    with SsdBlockStore([str(directory)], 4 * SLOT, SLOT, identity) as st:
        return st._files[0].path  # noqa: SLF001 - the name this identity uses


def assert_disabled_but_serving(st: SsdBlockStore, pool, reason: str) -> None:
    assert not st.healthy and not st.writable and reason in st.degraded_reason
    assert st.write_blocks(pool, [0], [0], [b"k"]).result(TIMEOUT) == IoResult([False], 0)
    assert st.read_blocks(pool, [0], [1], [b"k"]).result(TIMEOUT) == IoResult([False], 0)
    assert st.recover() == []
    st.invalidate([0])


def test_a_planted_symlink_disables_the_tier_and_its_target_is_untouched(tmp_path, pool, caplog):
    name = data_file(tmp_path)
    name.unlink()
    target = tmp_path / "precious"
    target.write_bytes(b"do not truncate")
    name.symlink_to(target)
    caplog.set_level(logging.ERROR, logger="dynamo_flexkv.storage.ssd.store")
    with SsdBlockStore([str(tmp_path)], 4 * SLOT, SLOT, IDENT) as st:
        assert_disabled_but_serving(st, pool, "symbolic link")
    assert target.read_bytes() == b"do not truncate" and name.is_symlink()
    assert len([r for r in caplog.records if "disabled" in r.getMessage()]) == 1


def test_another_users_file_at_our_name_is_not_read_nor_truncated(tmp_path, pool):
    name = data_file(tmp_path)
    before = name.read_bytes()
    os.chown(name, NOBODY, NOBODY)
    with SsdBlockStore([str(tmp_path)], 4 * SLOT, SLOT, IDENT) as st:
        assert_disabled_but_serving(st, pool, "another user")
    assert name.read_bytes() == before and name.stat().st_uid == NOBODY


def test_a_foreign_seat_lock_is_skipped(tmp_path):
    seat, fd = claim_seat(str(tmp_path), IDENT)
    lock0 = next(tmp_path.glob("*.seat0.lock"))
    os.close(fd)
    os.chown(lock0, NOBODY, NOBODY)
    seat, fd = claim_seat(str(tmp_path), IDENT)
    os.close(fd)
    assert seat == 1 and lock0.stat().st_uid == NOBODY


def test_files_of_dead_identities_are_reclaimed_and_live_ones_kept(tmp_path, pool):
    live = SsdBlockStore([str(tmp_path)], 4 * SLOT, SLOT, {**IDENT, "model": "neighbour"})
    old = data_file(tmp_path, {**IDENT, "model": "last-week"})  # an identity nobody runs any more
    theirs = tmp_path / "flexkv-0000000000000000.ssd"
    theirs.write_bytes(b"x" * 4096)
    os.chown(theirs, NOBODY, NOBODY)
    outside = tmp_path / "sub"
    outside.mkdir()
    elsewhere = data_file(outside, {**IDENT, "model": "elsewhere"})
    link = tmp_path / "flexkv-1111111111111111.ssd"
    link.symlink_to(elsewhere)
    try:
        held = old.stat().st_blocks * 512
        assert held > 0 and reclaimable_bytes(str(tmp_path)) == held
        with SsdBlockStore([str(tmp_path)], 4 * SLOT, SLOT, IDENT) as st:
            assert st.healthy
        assert not old.exists()
        assert live._files[0].path.exists()  # noqa: SLF001 - held by a running store
        assert theirs.exists() and link.is_symlink() and elsewhere.exists()
        assert reclaim_dead_files(str(tmp_path), keep="none") == [data_file(tmp_path).name]
    finally:
        live.close()


def test_unexpected_fallocate_error_at_start_degrades_instead_of_aborting(tmp_path, pool, monkeypatch):
    import errno

    def broken(fd, offset, length):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "posix_fallocate", broken)
    with SsdBlockStore([str(tmp_path)], 4 * SLOT, SLOT, IDENT) as st:
        assert_disabled_but_serving(st, pool, "Input/output error")


WARM_RESTART_ON_SMALL_DISK = """
import sys
from dynamo_flexkv.config import GIB, load_settings
from dynamo_flexkv.storage.ssd.store import SsdBlockStore
from dynamo_flexkv.tiers.preflight import preflight
env = {"FLEXKV_SSD_CACHE_GB": str(12 / 1024), "FLEXKV_SSD_CACHE_DIR": sys.argv[1]}
for run in range(3):  # the first start and two warm restarts, each validating its settings first
    settings = load_settings(environ=env, checks=preflight)
    with SsdBlockStore(list(settings.ssd_cache_dir), settings.ssd_cache_bytes, 16384, {"m": 1}) as st:
        assert st.healthy, st.degraded_reason
print("restarted", run)
"""


def test_a_warm_restart_passes_the_free_space_check_with_its_own_files(tmp_path):
    """12 MiB tier on a 16 MiB disk: the tier's own preallocated file must count as free."""
    import subprocess
    import sys

    mnt = tmp_path / "disk"
    mnt.mkdir()
    repo = Path(__file__).resolve().parents[2]
    script = f'mount -t tmpfs -o size=16m tmpfs "$1" && exec {sys.executable} -c "$0" "$1"'
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                             WARM_RESTART_ON_SMALL_DISK, str(mnt)], capture_output=True, text=True,
                            timeout=120, cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["restarted", "2"]
