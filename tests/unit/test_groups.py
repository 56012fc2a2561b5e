"""Which stored blocks a hit of a hybrid model may load, and which groups a save copies (index.groups),
and that the index keeps each block's group mask through stores, spills and staging."""

from __future__ import annotations

import pytest

from dynamo_flexkv.index.engine import CacheEngine
from dynamo_flexkv.index.groups import ALL_GROUPS, KVGroup, held_groups, usable_hit
from dynamo_flexkv.index.policies import make_policy
from dynamo_flexkv.index.tier import TierIndex

BS = 16
FULL = KVGroup("full_attention")
WINDOW = KVGroup("sliding_window(32)", 32)  # two blocks
BOTH, FULL_ONLY, WINDOW_ONLY, NONE = 0b11, 0b01, 0b10, 0b00
NULL = 0


@pytest.mark.parametrize(("num_tokens", "first"), [(0, 0), (31, 0), (32, 0), (47, 1), (48, 1), (100, 4)])
def test_a_window_keeps_the_blocks_of_its_last_tokens(num_tokens, first):
    # vLLM frees the blocks wholly before the window of the next token (position num_tokens)
    assert WINDOW.first_kept_block(num_tokens, BS) == first
    assert FULL.first_kept_block(num_tokens, BS) == 0


def test_full_attention_needs_every_block_of_the_hit():
    assert usable_hit([FULL], [ALL_GROUPS] * 5, 0, BS) == 5
    assert usable_hit([FULL, WINDOW], [BOTH, BOTH, NONE, BOTH], 0, BS) == 2


def test_a_window_needs_only_the_blocks_it_covers_at_the_hit_end():
    # the first blocks lost their window KV before they were saved: a hit of all 6 is usable
    masks = [FULL_ONLY, FULL_ONLY, FULL_ONLY, FULL_ONLY, BOTH, BOTH]
    assert usable_hit([FULL, WINDOW], masks, 0, BS) == 6
    # one block shorter, the window reaches into block 3, which lacks it: back to where it fits
    assert usable_hit([FULL, WINDOW], masks[:5], 0, BS) == 0


def test_the_window_is_taken_one_token_before_the_hit_end():
    # a 33-token window, a hit of 3 blocks (48 tokens): vLLM keeps blocks from 1 (tokens 16..47),
    # but the last token, which vLLM may recompute, reads from token 15: block 0 too
    window = KVGroup("sliding_window(33)", 33)
    assert window.first_kept_block(48, BS) == 1
    assert usable_hit([FULL, window], [FULL_ONLY, BOTH, BOTH], 0, BS) == 0
    assert usable_hit([FULL, window], [BOTH, BOTH, BOTH], 0, BS) == 3
    # a 32-token window needs blocks 1-2 for that hit; without block 1, only a 1-block hit fits
    assert usable_hit([FULL, WINDOW], [BOTH, FULL_ONLY, BOTH], 0, BS) == 1


def test_blocks_before_the_hit_are_vllm_s_own():
    # blocks 0-1 are vLLM's hits; the window of a hit ending after block 3 needs blocks 2-3 from us
    assert usable_hit([FULL, WINDOW], [BOTH, BOTH], 2, BS) == 2
    assert usable_hit([FULL, WINDOW], [FULL_ONLY, BOTH], 2, BS) == 0


def test_a_model_of_sliding_window_layers_only():
    masks = [0b0, 0b0, 0b1, 0b1]  # one group: bit 0 is the window
    assert usable_hit([WINDOW], masks, 0, BS) == 4
    assert usable_hit([WINDOW], masks[:3], 0, BS) == 0


def test_a_save_copies_the_groups_vllm_still_holds():
    block_ids = [[5, 6, 7, 8], [NULL, 9, 10, 11]]  # the window's table: a null block, then pages
    computed = 64  # the window of token 64 starts at block 2: vLLM freed block 1 (the table may lag)
    masks = [held_groups([FULL, WINDOW], block_ids, i, computed, BS, NULL) for i in range(5)]
    assert masks == [FULL_ONLY, FULL_ONLY, BOTH, BOTH, NONE]


def _store(engine: CacheEngine, request_id: str, keys, masks=None) -> None:
    """Store a chain in the top tier and let its write-through into the lower tier land."""
    assert engine.prepare_store(request_id, keys, [None, *keys[:-1]], masks) is not None
    engine.complete_store(request_id, success=True)
    for spill in engine.take_spills():
        engine.complete_spill(spill.spill_id, [True] * len(spill.keys))


def test_the_index_keeps_each_blocks_groups_through_store_spill_and_staging():
    cpu = TierIndex("CPU", 2, make_policy("lru", 2))
    ssd = TierIndex("SSD", 8, make_policy("lru", 8))
    engine = CacheEngine([cpu, ssd])
    keys = [b"a", b"b"]
    _store(engine, "r", keys, [FULL_ONLY, BOTH])
    assert engine.groups_of(keys) == [FULL_ONLY, BOTH]
    assert [ssd.groups_of(k) for k in keys] == [FULL_ONLY, BOTH]
    # two more blocks push a and b out of the CPU tier; a load stages them back with their groups
    _store(engine, "s", [b"c", b"d"])
    assert not cpu.contains(b"a") and engine.groups_of(keys) == [FULL_ONLY, BOTH]
    load = engine.prepare_load("q", keys)
    assert load is not None and len(load.staged) == 2
    engine.complete_stage("q", [True, True])
    assert [cpu.groups_of(k) for k in keys] == [FULL_ONLY, BOTH]
    assert ssd.groups_of(b"c") == ALL_GROUPS  # stored without masks: a single-group model's block
