"""The shared-memory CPU pool: sizing, sharing between openers, sweeping pools of dead instances, and
refusing what is not ours (links, other users' files) and pools that /dev/shm cannot hold."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from dynamo_flexkv.storage.cpu.pool import CpuBlockPool, claim_pool_owner, release_pool_owner, sweep_stale_pools
from dynamo_flexkv.storage.layout import PoolGeometry
from dynamo_flexkv.storage.private_files import ForeignFileError


def test_geometry_aligns_rank_shards_and_fits_capacity():
    geometry = PoolGeometry.for_capacity(capacity_bytes=10 * 8192 + 100, shard_bytes=5000, world_size=2)
    assert geometry.shard_stride == 8192
    assert geometry.slot_bytes == 16384
    assert geometry.num_slots == 5
    assert geometry.total_bytes <= 10 * 8192 + 100


def test_two_openers_share_bytes(tmp_path):
    geometry = PoolGeometry(num_slots=4, shard_bytes=4096, world_size=1)
    first = CpuBlockPool("dynamo-flexkv-test", geometry, shm_dir=tmp_path)
    second = CpuBlockPool("dynamo-flexkv-test", geometry, shm_dir=tmp_path)
    first.tensor[2].fill_(7)
    assert torch.equal(second.tensor[2], torch.full((4096,), 7, dtype=torch.uint8))
    assert first.tensor.shape == (4, 4096)


def test_size_mismatch_names_the_collision(tmp_path):
    CpuBlockPool("dynamo-flexkv-test", PoolGeometry(4, 4096, 1), shm_dir=tmp_path)
    with pytest.raises(ValueError, match="FLEXKV_SERVER_RECV_PORT"):
        CpuBlockPool("dynamo-flexkv-test", PoolGeometry(8, 4096, 1), shm_dir=tmp_path)


def test_zero_slots_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cpu_cache_gb"):
        CpuBlockPool("dynamo-flexkv-test", PoolGeometry(0, 4096, 1), shm_dir=tmp_path)


def test_sweep_removes_only_pools_nobody_holds(tmp_path):
    live = CpuBlockPool("dynamo-flexkv-live", PoolGeometry(2, 4096, 1), shm_dir=tmp_path)
    dead = tmp_path / "dynamo-flexkv-dead"
    dead.write_bytes(b"x" * 8192)  # a pool whose process died: no lock held
    dead.chmod(0o600)
    creating = tmp_path / "dynamo-flexkv-creating"
    creating.touch(mode=0o600)  # just created, not yet sized and locked
    other = tmp_path / "unrelated"
    other.write_bytes(b"x")
    assert sweep_stale_pools(tmp_path) == ["dynamo-flexkv-dead"]
    assert live.path.exists() and creating.exists() and other.exists() and not dead.exists()


def test_a_held_lock_protects_the_pool(tmp_path):
    path = tmp_path / "dynamo-flexkv-held"
    path.write_bytes(b"x" * 4096)
    path.chmod(0o600)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        assert sweep_stale_pools(tmp_path) == []
    finally:
        os.close(fd)
    assert sweep_stale_pools(tmp_path) == ["dynamo-flexkv-held"]


def test_one_owner_per_pool_identity(tmp_path):
    fd = claim_pool_owner("dynamo-flexkv-pinned", shm_dir=tmp_path)
    with pytest.raises(ValueError, match="FLEXKV_SERVER_RECV_PORT"):
        claim_pool_owner("dynamo-flexkv-pinned", shm_dir=tmp_path)
    os.close(fd)  # the owner died without cleaning up: its lock is gone
    assert sweep_stale_pools(tmp_path) == ["dynamo-flexkv-pinned.owner"]
    fd = claim_pool_owner("dynamo-flexkv-pinned", shm_dir=tmp_path)  # the next instance takes over
    assert sweep_stale_pools(tmp_path) == []  # a held owner file is never swept
    release_pool_owner("dynamo-flexkv-pinned", fd, shm_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- hostile environments: a small /dev/shm, other users' files, planted links ------------------

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


def _in_small_dev_shm(size: str, code: str) -> subprocess.CompletedProcess:
    """Run `code` in a private mount namespace whose /dev/shm is a `size` tmpfs (Docker-like)."""
    script = f"mount -t tmpfs -o size={size},mode=1777 tmpfs /dev/shm && exec {sys.executable} -c \"$0\""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, code],
                          capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


POOL_IN_SHM = """
import sys
from dynamo_flexkv.storage.cpu.pool import CpuBlockPool
from dynamo_flexkv.storage.layout import PoolGeometry
slots = int(sys.argv[1]) if len(sys.argv) > 1 else 0
pool = CpuBlockPool('dynamo-flexkv-small-shm', PoolGeometry({slots}, 1 << 20, 1))
pool.tensor.fill_(1)  # touch every page, as serving eventually does
print('served', int(pool.tensor.sum()))
"""


def test_pool_larger_than_dev_shm_fails_at_start_naming_the_setting_and_the_fix():
    result = _in_small_dev_shm("64m", POOL_IN_SHM.format(slots=128))
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])  # not SIGBUS (-7)
    last = result.stderr.strip().splitlines()[-1]
    assert "cpu_cache_gb" in last and "--shm-size" in last and "MiB" in last, last
    assert "served" not in result.stdout


def test_pool_that_fits_dev_shm_is_reserved_and_served():
    result = _in_small_dev_shm("64m", POOL_IN_SHM.format(slots=48))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["served", str(48 << 20)]


def test_pool_reservation_is_committed_at_start(tmp_path):
    pool = CpuBlockPool("dynamo-flexkv-reserved", PoolGeometry(4, 4096, 1), shm_dir=Path("/dev/shm"))
    try:
        assert os.stat(pool.path).st_blocks * 512 >= 4 * 4096
    finally:
        pool.unlink()


def _foreign(path: Path, mode: int = 0o644) -> None:
    path.write_bytes(b"secret KV bytes of another user".ljust(8192, b"\0"))
    os.chown(path, NOBODY, NOBODY)
    path.chmod(mode)


def test_another_users_pool_file_is_never_adopted_nor_deleted(tmp_path):
    victim = tmp_path / "dynamo-flexkv-pinned"
    _foreign(victim)
    _foreign(tmp_path / "dynamo-flexkv-pinned.owner")
    with pytest.raises(ForeignFileError, match="another user"):
        CpuBlockPool("dynamo-flexkv-pinned", PoolGeometry(2, 4096, 1), shm_dir=tmp_path)
    with pytest.raises(ForeignFileError, match="another user"):
        claim_pool_owner("dynamo-flexkv-pinned", shm_dir=tmp_path)
    assert sweep_stale_pools(tmp_path) == []  # we run as root here: it could delete them, must not
    assert victim.read_bytes().startswith(b"secret KV bytes")
    assert (tmp_path / "dynamo-flexkv-pinned.owner").exists()


def test_a_group_readable_pool_file_of_ours_is_refused(tmp_path):
    path = tmp_path / "dynamo-flexkv-open"
    path.write_bytes(bytes(8192))
    path.chmod(0o644)
    with pytest.raises(ForeignFileError, match="0600"):
        CpuBlockPool("dynamo-flexkv-open", PoolGeometry(2, 4096, 1), shm_dir=tmp_path)


def test_a_planted_symlink_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "precious"
    target.write_bytes(b"do not truncate")
    (tmp_path / "dynamo-flexkv-link").symlink_to(target)
    (tmp_path / "dynamo-flexkv-link.owner").symlink_to(target)
    with pytest.raises(ForeignFileError, match="symbolic link"):
        CpuBlockPool("dynamo-flexkv-link", PoolGeometry(2, 4096, 1), shm_dir=tmp_path)
    with pytest.raises(ForeignFileError, match="symbolic link"):
        claim_pool_owner("dynamo-flexkv-link", shm_dir=tmp_path)
    assert sweep_stale_pools(tmp_path) == []
    assert target.read_bytes() == b"do not truncate"


def test_another_users_file_in_a_shared_dir_never_stops_a_non_root_sweeper():
    """/dev/shm is world-writable and sticky: as an ordinary user, unlinking another user's file
    fails. The sweep must skip it, not raise (which used to stop every instance on the host)."""
    shared = Path(tempfile.mkdtemp(prefix="flexkv-shm-", dir="/tmp"))
    try:
        shared.chmod(0o1777)
        _foreign(shared / "dynamo-flexkv-theirs")
        code = ("import sys; from pathlib import Path; "
                "from dynamo_flexkv.storage.cpu.pool import sweep_stale_pools; "
                "print(sweep_stale_pools(Path(sys.argv[1])))")
        result = subprocess.run(
            ["setpriv", "--reuid", str(NOBODY - 1), "--regid", str(NOBODY - 1), "--clear-groups",
             sys.executable, "-c", code, str(shared)],
            capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == "[]"
        assert (shared / "dynamo-flexkv-theirs").exists()
    finally:
        shutil.rmtree(shared)


def test_a_pool_too_small_for_one_block_names_the_setting_and_the_minimum():
    with pytest.raises(ValueError, match=r"cpu_cache_gb \(FLEXKV_CPU_CACHE_GB\) = .* holds no KV block .* at least"):
        PoolGeometry.for_capacity(capacity_bytes=1 << 20, shard_bytes=2 << 20, world_size=1)
