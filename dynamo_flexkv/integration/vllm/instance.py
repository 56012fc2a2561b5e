"""Facts about this vLLM instance that both connector roles must agree on, derived from its config.

The scheduler process and every worker compute these independently from the same (pickled)
`VllmConfig`, so they need no handshake: the pool's name and geometry come out identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vllm.config import VllmConfig
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheConfig

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.integration.vllm.fingerprint import kv_fingerprint
from dynamo_flexkv.storage.cpu_pool import CpuBlockPool
from dynamo_flexkv.storage.layout import PoolGeometry
from dynamo_flexkv.storage.ssd import SsdBlockStore
from dynamo_flexkv.storage.ssd_claim import claim_seat
from dynamo_flexkv.storage.ssd_io import MAX_TOKENS_PER_BLOCK
from dynamo_flexkv.transfer.tier_io import LowerTierIO


@dataclass(frozen=True)
class InstanceFacts:
    identity: str  # names the shared-memory pool of this instance
    block_size: int  # tokens per vLLM block
    geometry: PoolGeometry
    layout: dict[str, str | int]  # what a stored block's bytes depend on: guards the SSD files


def describe_instance(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, settings: FlexKVSettings
) -> InstanceFacts:
    parallel = vllm_config.parallel_config
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


def open_ssd_tier(facts: InstanceFacts, settings: FlexKVSettings) -> LowerTierIO:
    """Map the CPU pool in this (scheduler) process and open the SSD files behind it."""
    seat, seat_lock = claim_seat(settings.ssd_cache_dir[0], facts.layout)
    store = SsdBlockStore(
        list(settings.ssd_cache_dir),
        settings.ssd_cache_bytes,
        facts.geometry.slot_bytes,
        {**facts.layout, "seat": seat},
        io_threads=settings.ssd_io_threads,
        queue_depth=settings.ssd_queue_depth,
        io_timeout_s=settings.ssd_io_timeout_s,
        engine=settings.ssd_io_engine,
        # Tokens are recorded so a restart can announce its blocks; very large blocks go without.
        tokens_per_block=facts.block_size if facts.block_size <= MAX_TOKENS_PER_BLOCK else 0,
    )
    return LowerTierIO(store, CpuBlockPool(facts.identity, facts.geometry).tensor, seat_lock)
