"""The worker's layer-wise loads: per-layer waits once vLLM calls the per-layer hook, and a whole-load
wait before the forward while it has not (engines whose attention never calls it); a hybrid model's
KV-cache groups each copy their own blocks."""

from __future__ import annotations

import uuid

import pytest
import torch

pytest.importorskip("vllm")

from dynamo_flexkv.index.groups import KVGroup  # noqa: E402
from dynamo_flexkv.integration.vllm import worker as worker_module  # noqa: E402
from dynamo_flexkv.integration.vllm.instance import InstanceFacts  # noqa: E402
from dynamo_flexkv.integration.vllm.metadata import BlockTransfer, FlexKVStepMetadata  # noqa: E402
from dynamo_flexkv.storage.layout import PoolGeometry  # noqa: E402

NUM_BLOCKS, LAYERS = 8, 3


class RecordingLoad:
    """Stands in for a CUDA layer-wise load: records which waits the worker issued."""

    def __init__(self, log: list):
        self.log, self.nbytes = log, 0

    def done(self) -> bool:
        return False  # lands during the forward, as on CUDA

    def wait_layer(self, index: int, *, host: bool = False) -> None:
        self.log.append(("layer", index))

    def wait_all(self, *, host: bool = False) -> int:
        self.log.append("all")
        return 0

    def synchronize(self) -> int:
        return 0


@pytest.fixture
def worker():
    caches = {f"layer.{i}": torch.zeros(NUM_BLOCKS, 2, 16, 128, dtype=torch.bfloat16) for i in range(LAYERS)}
    shard = LAYERS * 2 * 16 * 128 * 2
    facts = InstanceFacts(f"dynamo-flexkv-test-{uuid.uuid4().hex[:8]}", 16, PoolGeometry(4, shard, 1), {})
    side = worker_module.WorkerSide(facts, rank=0, num_blocks=NUM_BLOCKS)
    side.register_kv_caches(caches)
    yield side
    side.shutdown()


def step(worker, monkeypatch, log) -> None:
    monkeypatch.setattr(worker_module, "start_layerwise_load", lambda copier, slots, ids: RecordingLoad(log))
    worker.start_step(FlexKVStepMetadata(layerwise_loads=[BlockTransfer("r", ((1, 2),), ((0, 1),))]))


def test_without_hooks_the_whole_load_lands_before_the_forward(worker, monkeypatch):
    log: list = []
    step(worker, monkeypatch, log)
    assert log == ["all"]


def test_after_a_hook_each_layer_waits_only_for_itself(worker, monkeypatch):
    worker.wait_for_layer_load("layer.0")  # the engine calls the per-layer hook
    log: list = []
    step(worker, monkeypatch, log)
    for name in ("layer.0", "layer.1", "layer.2"):
        worker.wait_for_layer_load(name)
    assert log == [("layer", 0), ("layer", 1), ("layer", 2)]
    worker.get_finished()  # end of step: reported done
    assert worker.take_report().done_layerwise == {"r"}


def test_a_step_without_a_forward_starts_and_reports_its_saves(tmp_path):
    """vLLM 0.26 calls only start_load_kv and get_finished in a step that schedules no tokens: the
    saves handed out in that step must start there, or their GPU blocks are held forever."""
    caches = {f"layer.{i}": torch.randn(NUM_BLOCKS, 2, 16, 128).to(torch.bfloat16) for i in range(LAYERS)}
    shard = LAYERS * 2 * 16 * 128 * 2
    facts = InstanceFacts(f"dynamo-flexkv-test-{uuid.uuid4().hex[:8]}", 16, PoolGeometry(4, shard, 1), {})
    side = worker_module.WorkerSide(facts, rank=0, num_blocks=NUM_BLOCKS, cpu_async_copies=True)
    side.register_kv_caches(caches)
    try:
        # a finished request: vLLM holds its blocks until the save landed
        side.start_step(FlexKVStepMetadata(saves=[BlockTransfer("r", ((3, 5),), ((0, 2),), save_id="r/0")], hold=["r"]))
        saved: set[str] = set()
        for _ in range(1000):  # later steps poll until the background copy finished
            saved |= side.get_finished()[0]
            if saved:
                break
            side._in_flight[0].handle.wait()
        assert saved == {"r"}
        assert side.take_report().saves_done == {"r/0": 1}
        pool = side.pool.tensor
        assert torch.equal(pool[0, :shard], torch.cat([caches[f"layer.{i}"][3].reshape(-1).view(torch.uint8) for i in range(LAYERS)]))
    finally:
        side.shutdown()


def test_each_kv_cache_group_copies_its_own_blocks_into_its_part_of_a_slot():
    """Two groups whose layers share tensors (vLLM's hybrid manager): a block id of group g indexes
    group g's layers only, and each group lands in its own part of the slot and back."""
    shared = [torch.randn(NUM_BLOCKS, 2, 16, 128).to(torch.bfloat16) for _ in range(2)]
    caches = {"full.0": shared[0], "window.0": shared[0], "full.1": shared[1], "window.1": shared[1]}
    layer_bytes = 2 * 16 * 128 * 2
    facts = InstanceFacts(f"dynamo-flexkv-test-{uuid.uuid4().hex[:8]}", 16, PoolGeometry(4, 4 * layer_bytes, 1), {},
                          groups=(KVGroup("full_attention"), KVGroup("sliding_window(32)", 32)),
                          group_layers=(("full.0", "full.1"), ("window.0", "window.1")))
    side = worker_module.WorkerSide(facts, rank=0, num_blocks=NUM_BLOCKS)
    side.register_kv_caches(caches)
    try:
        # slot 0 holds both groups (full: block 1, window: block 2); slot 1 the full group only
        side.start_step(FlexKVStepMetadata(saves=[BlockTransfer("r", ((1, 3), (2,)), ((0, 1), (0,)), save_id="r/0")]))
        side.get_finished()
        pool = side.pool.tensor

        def block_bytes(block: int) -> torch.Tensor:
            return torch.cat([t[block].reshape(-1).view(torch.uint8) for t in shared])

        assert torch.equal(pool[0, : 2 * layer_bytes], block_bytes(1))
        assert torch.equal(pool[0, 2 * layer_bytes : 4 * layer_bytes], block_bytes(2))
        assert torch.equal(pool[1, : 2 * layer_bytes], block_bytes(3))
        want = {block: block_bytes(source) for block, source in ((5, 1), (6, 2), (7, 3))}
        side.start_step(FlexKVStepMetadata(loads=[BlockTransfer("q", ((5, 7), (6,)), ((0, 1), (0,)))]))
        assert side.get_finished()[1] == {"q"}
        for block, expected in want.items():
            assert torch.equal(block_bytes(block), expected)
    finally:
        side.shutdown()
