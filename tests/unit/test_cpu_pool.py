"""The shared-memory CPU pool: sizing, sharing between openers, and sweeping pools of dead instances."""

from __future__ import annotations

import fcntl
import os

import pytest
import torch

from dynamo_flexkv.storage.cpu_pool import CpuBlockPool, claim_pool_owner, release_pool_owner, sweep_stale_pools
from dynamo_flexkv.storage.layout import PoolGeometry


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
    creating = tmp_path / "dynamo-flexkv-creating"
    creating.touch()  # just created, not yet sized and locked
    other = tmp_path / "unrelated"
    other.write_bytes(b"x")
    assert sweep_stale_pools(tmp_path) == ["dynamo-flexkv-dead"]
    assert live.path.exists() and creating.exists() and other.exists() and not dead.exists()


def test_a_held_lock_protects_the_pool(tmp_path):
    path = tmp_path / "dynamo-flexkv-held"
    path.write_bytes(b"x" * 4096)
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
