"""The worker awaits a save still reading a sliding-window block before the step that reuses it.

A save reads its blocks after the call that started it returned (`tests.gpu_timing`'s deferred
read: nothing is read until the save is awaited or started), as a long save does on a GPU."""

from __future__ import annotations

import uuid

import pytest
import torch

pytest.importorskip("vllm")

from dynamo_flexkv.index.groups import KVGroup  # noqa: E402
from dynamo_flexkv.integration.vllm import worker as worker_module  # noqa: E402
from dynamo_flexkv.integration.vllm.metadata import BlockTransfer, FlexKVStepMetadata  # noqa: E402
from dynamo_flexkv.storage.layout import PoolGeometry  # noqa: E402
from dynamo_flexkv.tiers.facts import InstanceFacts  # noqa: E402
from tests.gpu_timing import _DeferredRead  # noqa: E402

NUM_BLOCKS = 8
LAYER_BYTES = 2 * 16 * 128 * 2


@pytest.fixture
def hybrid(monkeypatch):
    """A full-attention and a sliding-window group whose layers share tensors (vLLM's hybrid manager),
    and every save's read deferred; yields (worker, tensors, reads started)."""
    reads: list[_DeferredRead] = []
    start_save = worker_module.start_save

    def deferred(copier, block_ids, slots):
        reads.append(_DeferredRead(lambda: start_save(copier, block_ids, slots), len(block_ids) * copier.block_bytes))
        return reads[-1]

    monkeypatch.setattr(worker_module, "start_save", deferred)
    shared = [torch.randn(NUM_BLOCKS, 2, 16, 128).to(torch.bfloat16) for _ in range(2)]
    caches = {"full.0": shared[0], "window.0": shared[0], "full.1": shared[1], "window.1": shared[1]}
    facts = InstanceFacts(f"dynamo-flexkv-test-{uuid.uuid4().hex[:8]}", 16, PoolGeometry(4, 4 * LAYER_BYTES, 1), {},
                          groups=(KVGroup("full_attention"), KVGroup("sliding_window(32)", 32)),
                          group_layers=(("full.0", "full.1"), ("window.0", "window.1")))
    side = worker_module.WorkerSide(facts, rank=0, num_blocks=NUM_BLOCKS)
    side.register_kv_caches(caches)
    yield side, shared, reads
    side.shutdown()


def block_bytes(shared, block: int) -> torch.Tensor:
    return torch.cat([t[block].reshape(-1).view(torch.uint8) for t in shared])


def save_full_1_and_window_2(side) -> None:
    side.start_step(FlexKVStepMetadata(saves=[BlockTransfer("r", ((1,), (2,)), ((0,), (0,)), save_id="r/0")]))


def test_a_save_reading_a_reused_window_block_lands_before_the_step_writes_it(hybrid):
    side, shared, reads = hybrid
    save_full_1_and_window_2(side)
    planned = block_bytes(shared, 2)
    side.handle_preemptions(FlexKVStepMetadata(allocated=[6, 2]))  # vLLM hands window block 2 out again
    for t in shared:  # this step's forward writes another request's KV into it
        t[2].normal_()
    side.get_finished()
    assert torch.equal(side.pool.tensor[0, 2 * LAYER_BYTES:], planned)


def test_no_wait_when_the_step_reuses_none_of_its_blocks(hybrid):
    side, _, reads = hybrid
    save_full_1_and_window_2(side)
    side.handle_preemptions(FlexKVStepMetadata(allocated=[5, 6]))
    assert not reads[0].done()  # still reading, as the step runs
    side.handle_preemptions(FlexKVStepMetadata(allocated=[2]))
    assert reads[0].done()


def test_full_attention_blocks_are_not_fenced(hybrid):
    """A running request keeps its full-attention blocks (a finished one's are held until its saves
    landed): vLLM giving block 1 to another request is a prefix hit, which only reads it."""
    side, _, reads = hybrid
    save_full_1_and_window_2(side)
    side.handle_preemptions(FlexKVStepMetadata(allocated=[1]))
    assert not reads[0].done()
