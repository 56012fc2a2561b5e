"""FlexKV's tier events, as vLLM KV events, against the router rules (no deployment: fast)."""

from __future__ import annotations

import hashlib

from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

from dynamo_flexkv.index.plans import Cleared, Removed, Stored
from dynamo_flexkv.devtools.kv_stream import check_stream, router_updates
from dynamo_flexkv.integration.vllm.events import EventTranslator

BLOCK = 32
MEDIA = {"CPU": "CPU", "SSD": "STORAGE", "CLUSTER": None}  # tier -> medium, as the backends announce them


def chain(n: int, salt: bytes = b"") -> list[bytes]:
    return [hashlib.sha256(salt + bytes([i])).digest() for i in range(n)]


def tokens(i: int) -> list[int]:
    return list(range(i * BLOCK, (i + 1) * BLOCK))


def gpu_event(keys: list[bytes]) -> BlockStored:
    return BlockStored(block_hashes=[maybe_convert_block_hash(k) for k in keys], parent_block_hash=None,
                       token_ids=[t for i in range(len(keys)) for t in tokens(i)], block_size=BLOCK,
                       lora_id=None, medium="GPU", lora_name=None)


def batch(*events) -> tuple[int, KVEventBatch]:
    batch.seq = getattr(batch, "seq", 0) + 1
    return batch.seq, KVEventBatch(ts=0.0, events=list(events))


def stored_cpu(translator: EventTranslator, keys: list[bytes]):
    translator.remember(keys, [tokens(i) for i in range(len(keys))])
    return translator.translate([Stored("CPU", tuple(keys), (None, *keys[:-1]))])


def test_cpu_store_continues_the_gpu_chain_and_passes_the_rules():
    keys = chain(4)
    translator = EventTranslator(BLOCK, MEDIA)
    cpu = stored_cpu(translator, keys)
    assert [type(e) for e in cpu] == [BlockStored] and cpu[0].medium == "CPU"
    rules = check_stream([batch(gpu_event(keys)), batch(*cpu)], BLOCK)
    assert rules.problems == [] and rules.checked == 1


def test_partial_store_chains_onto_an_announced_parent():
    keys = chain(4)
    translator = EventTranslator(BLOCK, MEDIA)
    first = stored_cpu(translator, keys[:2])
    translator.remember(keys[2:], [tokens(2), tokens(3)])
    rest = translator.translate([Stored("CPU", tuple(keys[2:]), (keys[1], keys[2]))])
    assert rest[0].parent_block_hash == maybe_convert_block_hash(keys[1])
    rules = check_stream([batch(gpu_event(keys)), batch(*first), batch(*rest)], BLOCK)
    assert rules.problems == []


def test_removed_blocks_leave_only_their_tier():
    keys = chain(3)
    translator = EventTranslator(BLOCK, MEDIA)
    cpu = stored_cpu(translator, keys)
    removed = translator.translate([Removed("CPU", (keys[2],))])
    assert removed == [BlockRemoved(block_hashes=[maybe_convert_block_hash(keys[2])], medium="CPU")]
    rules = check_stream([batch(gpu_event(keys)), batch(*cpu), batch(*removed)], BLOCK)
    assert rules.problems == []
    assert maybe_convert_block_hash(keys[2]) in rules.held["GPU"]


def test_a_tier_reset_removes_that_tiers_blocks_not_all_of_the_workers():
    """vLLM's AllBlocksCleared has no medium: the router would drop the worker's GPU blocks too."""
    keys = chain(3)
    translator = EventTranslator(BLOCK, MEDIA)
    cpu = stored_cpu(translator, keys)
    cleared = translator.translate([Cleared("CPU", tuple(keys[:2]))])  # keys[2] was in use and survived
    assert not any(isinstance(e, AllBlocksCleared) for e in cleared)
    assert cleared == [BlockRemoved(block_hashes=[maybe_convert_block_hash(k) for k in keys[:2]], medium="CPU")]
    rules = check_stream([batch(gpu_event(keys)), batch(*cpu), batch(*cleared)], BLOCK)
    assert rules.problems == []
    assert rules.held["CPU"] == {maybe_convert_block_hash(keys[2])}
    assert len(rules.held["GPU"]) == 3
    assert translator.translate([Cleared("CPU", ())]) == []


def test_rules_catch_what_the_router_drops():
    keys = chain(2)
    good = gpu_event(keys)
    wrong_size = BlockStored(block_hashes=good.block_hashes, parent_block_hash=None, token_ids=good.token_ids,
                             block_size=16, lora_id=None, medium="CPU", lora_name=None)
    no_tokens = BlockStored(block_hashes=good.block_hashes, parent_block_hash=None, token_ids=[],
                            block_size=BLOCK, lora_id=None, medium="CPU", lora_name=None)
    orphan = BlockStored(block_hashes=[maybe_convert_block_hash(chain(1, b"x")[0])], parent_block_hash=12345,
                         token_ids=tokens(0), block_size=BLOCK, lora_id=None, medium="CPU", lora_name=None)
    broken_chain = BlockStored(block_hashes=[good.block_hashes[1]], parent_block_hash=None,
                               token_ids=tokens(1), block_size=BLOCK, lora_id=None, medium="CPU", lora_name=None)
    rules = check_stream([batch(good), batch(wrong_size, no_tokens, orphan, broken_chain)], BLOCK)
    text = "\n".join(rules.problems)
    assert "block_size 16" in text and "0 token ids for 2 blocks" in text
    assert "never announced" in text and "GPU events say" in text


def test_router_update_count_merges_runs_of_removals():
    keys = chain(3)
    events = [BlockRemoved(block_hashes=[maybe_convert_block_hash(k)], medium="GPU") for k in keys]
    counted = router_updates([batch(*events, gpu_event(keys), events[0]), batch(AllBlocksCleared())])
    assert counted == {"stored": 1, "removed": 2, "cleared": 1}


def test_a_block_never_announced_leaves_without_an_event():
    """Blocks restored from disk without recorded tokens are never announced; their eviction must
    not send the router a BlockRemoved for something it never saw."""
    translator = EventTranslator(BLOCK, MEDIA)
    keys = chain(3, b"disk")
    assert translator.translate([Stored("SSD", tuple(keys), (None, *keys[:-1]))]) == []
    assert translator.translate([Removed("SSD", tuple(keys[1:]))]) == []
    assert translator.translate([Cleared("SSD", (keys[0],))]) == []
    announced = stored_cpu(translator, keys[:1])
    assert len(announced) == 1
    assert translator.translate([Removed("SSD", (keys[0],))]) == []  # announced on CPU, not on SSD
    [removed] = translator.translate([Removed("CPU", (keys[0],))])
    assert removed.medium == "CPU"


def test_events_carry_the_lora_adapter_like_vllms_own():
    translator = EventTranslator(BLOCK, MEDIA)
    base, adapted = chain(2, b"base"), chain(2, b"lora")
    translator.remember(base, [tokens(0), tokens(1)])
    translator.remember(adapted, [tokens(0), tokens(1)], lora=(7, "sql-adapter"))
    events = translator.translate([Stored("CPU", (*base, *adapted), (None, base[0], None, adapted[0]))])
    assert [(e.lora_id, e.lora_name, len(e.block_hashes)) for e in events] == [
        (None, None, 2), (7, "sql-adapter", 2)]
    assert translator.persistable_tokens([base[0], adapted[0]]) == [tokens(0), ()]
