"""Facts about this vLLM instance that both connector roles must agree on, derived from its config
(`InstanceFacts`, defined with the tiers it sizes).

The scheduler process and every worker compute these independently from the same (pickled)
`VllmConfig`, so they need no handshake: the pool's name and geometry come out identical.
"""

from __future__ import annotations

import re

from vllm.config import VllmConfig
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.integration.vllm.fingerprint import kv_fingerprint
from dynamo_flexkv.storage.layout import PoolGeometry
from dynamo_flexkv.tiers import InstanceFacts, require_shared_hashes


def describe_instance(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: FlexKVSettings
) -> InstanceFacts:
    parallel = vllm_config.parallel_config
    if settings.remote_enabled:  # both roles check it, before vLLM allocates its KV cache
        require_shared_hashes(str(vllm_config.cache_config.prefix_caching_hash_algo), "remote_store")
    if parallel.pipeline_parallel_size > 1:
        raise ValueError("dynamo-flexkv does not support pipeline parallelism yet (pipeline_parallel_size > 1)")
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        raise ValueError(
            "dynamo-flexkv supports models with one attention KV-cache group; this model has "
            f"{[type(g.kv_cache_spec).__name__ for g in groups]}"
        )
    spec = groups[0].kv_cache_spec
    shard_bytes = spec.page_size_bytes * len(groups[0].layer_names)
    geometry = PoolGeometry.for_capacity(
        settings.cpu_cache_bytes, shard_bytes, parallel.tensor_parallel_size
    )
    if settings.server_recv_port:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", settings.server_recv_port)
    else:
        base = vllm_config.kv_transfer_config.engine_id
    identity = f"dynamo-flexkv-{base}-dp{parallel.data_parallel_rank}"
    layout = {
        "model": str(vllm_config.model_config.model),
        "kv_dtype": str(spec.dtype).removeprefix("torch."),
        "block_size": spec.block_size,
        "layers": len(groups[0].layer_names),
        "shard_bytes": shard_bytes,
        "tp_size": parallel.tensor_parallel_size,
        "hash_algo": str(vllm_config.cache_config.prefix_caching_hash_algo),
        **kv_fingerprint(vllm_config.model_config),  # weights, quantization, RoPE, ...
    }
    return InstanceFacts(identity=identity, block_size=spec.block_size, geometry=geometry, layout=layout)
