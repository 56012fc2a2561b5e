"""Facts about this vLLM instance that both connector roles must agree on, derived from its config
(`InstanceFacts`, defined with the tiers it sizes).

The scheduler process and every worker compute these independently from the same (pickled)
`VllmConfig`, so they need no handshake: the pool's name and geometry come out identical.
"""

from __future__ import annotations

import re

from vllm.config import VllmConfig
from vllm.v1.kv_cache_interface import (
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheSpec,
    MLAAttentionSpec,
    SlidingWindowSpec,
)

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.index.groups import KVGroup
from dynamo_flexkv.integration.vllm.fingerprint import kv_fingerprint
from dynamo_flexkv.storage.layout import PoolGeometry
from dynamo_flexkv.tiers.facts import InstanceFacts, require_shared_hashes


def describe_instance(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: FlexKVSettings
) -> InstanceFacts:
    parallel = vllm_config.parallel_config
    if settings.remote_enabled:  # both roles check it, before vLLM allocates its KV cache
        require_shared_hashes(str(vllm_config.cache_config.prefix_caching_hash_algo), "remote_store")
    if parallel.pipeline_parallel_size > 1:
        raise ValueError("dynamo-flexkv does not support pipeline parallelism yet (pipeline_parallel_size > 1)")
    vllm_groups = kv_cache_config.kv_cache_groups
    found = [_kv_group(g.kv_cache_spec) for g in vllm_groups]
    if None in found:
        raise ValueError(
            "dynamo-flexkv stores KV-cache groups of full attention (FullAttentionSpec, MLAAttentionSpec) "
            "and sliding-window attention (SlidingWindowSpec) only, not kinds that free blocks a prefix still "
            "needs (chunked-local, R-SWA) or hold other state (Mamba, linear attention, sinks, encoders); this "
            f"model's groups are {[type(g.kv_cache_spec).__name__ for g in vllm_groups]}: serve it without the connector"
        )
    groups = tuple(g for g in found if g is not None)
    hybrid = len(groups) > 1 or groups[0].window is not None
    if hybrid and settings.remote_enabled:
        raise ValueError(
            f"remote_store cannot serve this model's KV-cache groups ({', '.join(g.kind for g in groups)}): "
            "which groups a shared block holds is not recorded in the store yet; unset remote_store "
            "(the CPU and SSD tiers serve hybrid models)"
        )
    spec = vllm_groups[0].kv_cache_spec
    if any(g.kv_cache_spec.block_size != spec.block_size for g in vllm_groups):
        raise ValueError("dynamo-flexkv needs one block size for every KV-cache group; this model's are "
                         f"{[g.kv_cache_spec.block_size for g in vllm_groups]}")
    shard_bytes = sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names) for g in vllm_groups)
    geometry = PoolGeometry.for_capacity(
        settings.cpu_cache_bytes, shard_bytes, parallel.tensor_parallel_size
    )
    if settings.server_recv_port:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.server_recv_port)
    else:
        base = vllm_config.kv_transfer_config.engine_id
    identity = f"dynamo-flexkv-{base}-dp{parallel.data_parallel_rank}"
    cache = vllm_config.cache_config
    # Neither the model's path nor its name: the weights' content identity says which weights
    # computed the KV, so the same checkpoint shares across nodes wherever its files live.
    layout = {
        # The torch dtype alone is uint8 for every fp8 format: the requested format decides the bytes.
        # Its scales come from the checkpoint (the weights' identity) or live in the page (vLLM 0.31
        # has no calculate_kv_scales).
        "kv_dtype": str(spec.dtype).removeprefix("torch."),
        "kv_cache_dtype": str(cache.cache_dtype),
        "kv_cache_dtype_skip_layers": ",".join(map(str, cache.kv_cache_dtype_skip_layers)),
        "block_size": spec.block_size,
        "layers": sum(len(g.layer_names) for g in vllm_groups),
        "page_bytes": ",".join(str(g.kv_cache_spec.page_size_bytes) for g in vllm_groups),
        "shard_bytes": shard_bytes,
        "tp_size": parallel.tensor_parallel_size,
        # context parallelism shards a block's tokens over ranks, interleaved by this many tokens
        "dcp_size": parallel.decode_context_parallel_size,
        "pcp_size": parallel.prefill_context_parallel_size,
        "cp_interleave": parallel.cp_kv_cache_interleave_size,
        "hash_algo": str(cache.prefix_caching_hash_algo),
        **kv_fingerprint(vllm_config.model_config, settings.weights_version),  # weights, quantization, RoPE, ...
    }
    if hybrid:  # a slot's bytes are the groups' layers in group order
        layout["groups"] = ",".join(g.kind for g in groups)
    return InstanceFacts(identity=identity, block_size=spec.block_size, geometry=geometry, layout=layout,
                         groups=groups, group_layers=tuple(tuple(g.layer_names) for g in vllm_groups))


def _kv_group(spec: KVCacheSpec) -> KVGroup | None:
    """The index's view of one of vLLM's KV-cache groups; None for a kind it cannot store.

    Exact types only: a subclass may free blocks a prefix still needs (RSWASpec, a FullAttentionSpec,
    evicts decode blocks outside its window; ChunkedLocalAttentionSpec frees past chunks) or hold
    something else than a prefix's KV (CircularBufferSpec's one ring block per request, sink tokens,
    encoder or cross-attention states), so a kind not listed here is refused, never guessed.
    """
    if type(spec) is SlidingWindowSpec:
        # vLLM keeps `extra_retained_tokens` below the window (multi-token prediction)
        window = spec.sliding_window + getattr(spec, "extra_retained_tokens", 0)
        return KVGroup(f"sliding_window({spec.sliding_window})", window)
    if type(spec) in (FullAttentionSpec, MLAAttentionSpec):  # every block of a prefix is kept
        return KVGroup("full_attention")
    return None
