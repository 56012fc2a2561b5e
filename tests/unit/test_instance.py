"""What names the stored KV (`describe_instance`'s layout) changes with everything that decides the KV
bytes, and only KV-cache group kinds known to keep every block of a prefix are accepted (real vLLM
config objects and KV-cache specs, the tiny model's ModelConfig; no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.config import CacheConfig, KVTransferConfig, ParallelConfig
from vllm.engine.arg_utils import EngineArgs
from vllm.v1.kv_cache_interface import (
    ChunkedLocalAttentionSpec,
    CircularBufferSpec,
    CrossAttentionSpec,
    EncoderOnlyAttentionSpec,
    FullAttentionSpec,
    HiddenStateCacheSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
    MLAAttentionSpec,
    RSWASpec,
    SinkFullAttentionSpec,
    SlidingWindowMLASpec,
    SlidingWindowSpec,
)

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.integration.vllm.instance import describe_instance

BLOCK = 16
SETTINGS = FlexKVSettings(cpu_cache_gb=0.01)


@pytest.fixture(scope="module")
def model_config(tiny_model):
    return EngineArgs(model=tiny_model).create_model_config()


def full(heads: int = 2, dtype: torch.dtype = torch.bfloat16) -> FullAttentionSpec:
    return FullAttentionSpec(block_size=BLOCK, num_kv_heads=heads, head_size=64, dtype=dtype)


def layout(model_config, specs=None, cache: dict | None = None, parallel: dict | None = None) -> dict:
    specs = specs or [full()]
    vllm_config = SimpleNamespace(
        model_config=model_config,
        cache_config=CacheConfig(block_size=BLOCK, **(cache or {})),
        parallel_config=ParallelConfig(**(parallel or {})),
        kv_transfer_config=KVTransferConfig(kv_connector="FlexKVConnectorV1", kv_role="kv_both", engine_id="e"),
    )
    groups = [KVCacheGroupSpec([f"layer.{i}"], spec) for i, spec in enumerate(specs)]
    return describe_instance(vllm_config, KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=groups),
                             SETTINGS).layout


def test_every_fp8_format_has_its_own_layout_though_all_are_uint8(model_config):
    """fp8, fp8_e4m3 and fp8_e5m2 all store uint8: a restart after switching --kv-cache-dtype must
    not reinterpret the bytes."""
    uint8 = [full(dtype=torch.uint8)]
    layouts = [layout(model_config, uint8, cache={"cache_dtype": d}) for d in ("fp8", "fp8_e4m3", "fp8_e5m2")]
    assert {lay["kv_dtype"] for lay in layouts} == {"uint8"}
    assert len({tuple(sorted(lay.items())) for lay in layouts}) == 3


def test_layers_skipped_from_kv_quantization_change_it(model_config):
    uint8 = [full(dtype=torch.uint8)]
    assert layout(model_config, uint8, cache={"cache_dtype": "fp8", "kv_cache_dtype_skip_layers": ["0"]}) != \
        layout(model_config, uint8, cache={"cache_dtype": "fp8"})


@pytest.mark.parametrize("parallel", [
    {"decode_context_parallel_size": 2},
    {"prefill_context_parallel_size": 2},
    {"cp_kv_cache_interleave_size": BLOCK},
])
def test_context_parallel_sizes_change_it(model_config, parallel):
    """Context parallelism shards a block's tokens over ranks: another sharding, other bytes per rank."""
    tp = {"tensor_parallel_size": 2}
    assert layout(model_config, parallel={**tp, **parallel}) != layout(model_config, parallel=tp)


def test_each_groups_page_size_is_in_it(model_config):
    """Two groups whose page sizes trade places: same kinds, layers and bytes per block in total."""
    def specs(full_heads: int, window_heads: int) -> list:
        window = SlidingWindowSpec(block_size=BLOCK, num_kv_heads=window_heads, head_size=64,
                                   dtype=torch.bfloat16, sliding_window=64)
        return [full(full_heads), window]

    a, b = layout(model_config, specs(2, 4)), layout(model_config, specs(4, 2))
    assert a["shard_bytes"] == b["shard_bytes"] and a["groups"] == b["groups"]
    assert a != b


def test_the_layout_names_no_path(model_config, tiny_model):
    assert not any(tiny_model in str(value) for value in layout(model_config).values())


@pytest.mark.parametrize("spec", [
    full(),
    MLAAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.bfloat16),
    SlidingWindowSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.bfloat16, sliding_window=64),
], ids=lambda spec: type(spec).__name__)
def test_kinds_that_keep_every_block_are_accepted(model_config, spec):
    assert layout(model_config, [spec])["layers"] == 1


COMMON = dict(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.bfloat16)


@pytest.mark.parametrize("spec", [
    RSWASpec(**COMMON, rswa_window=64),  # evicts decode blocks behind its window
    ChunkedLocalAttentionSpec(**COMMON, attention_chunk_size=64),  # frees past chunks
    SinkFullAttentionSpec(**COMMON, sink_len=4),
    CircularBufferSpec(**COMMON),
    CrossAttentionSpec(**COMMON),
    EncoderOnlyAttentionSpec(**COMMON),
    HiddenStateCacheSpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.bfloat16),
    SlidingWindowMLASpec(block_size=BLOCK, num_kv_heads=1, head_size=576, dtype=torch.bfloat16, sliding_window=64),
], ids=lambda spec: type(spec).__name__)
def test_a_single_group_of_another_attention_kind_is_refused_in_one_line(model_config, spec):
    with pytest.raises(ValueError) as refused:
        layout(model_config, [spec])
    message = str(refused.value)
    assert "\n" not in message and "dynamo-flexkv stores KV-cache groups of full attention" in message
    assert f"this model's groups are ['{type(spec).__name__}']" in message
