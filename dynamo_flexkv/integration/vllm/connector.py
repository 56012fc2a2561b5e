"""`FlexKVConnector`: the vLLM KV connector of dynamo-flexkv, one class for both roles.

It subclasses vLLM's own `FlexKVConnectorV1` so `isinstance` checks for FlexKV (kvbm's PdConnector)
accept it, but never calls that class's constructor, which imports Tencent's `flexkv` package.
Every method vLLM's class defines is overridden here. The scheduler role delegates to
`SchedulerSide`, the worker role to `WorkerSide`; this file only adapts vLLM's calls.
It declares `SupportsHMA`, so vLLM keeps its hybrid KV cache manager on (one block table per
KV-cache group: see scheduler.py).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
import vllm
from vllm.config import KVTransferConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.flexkv_connector import FlexKVConnectorV1
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from dynamo_flexkv.config import load_settings
from dynamo_flexkv.integration.vllm.compat import (
    SupportsHMA,
    loads_layer_by_layer,
    transfer_results,
    untested_version_warning,
)
from dynamo_flexkv.integration.vllm.instance import describe_instance
from dynamo_flexkv.integration.vllm.metadata import FlexKVStepMetadata
from dynamo_flexkv.integration.vllm.stats import FlexKVPromMetrics, FlexKVStats
from dynamo_flexkv.logs import configure_logging
from dynamo_flexkv.storage.cpu.pool import claim_pool_owner, release_pool_owner
from dynamo_flexkv.tiers.preflight import preflight

if TYPE_CHECKING:
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)

_COMPOSITES = ("MultiConnector", "PdConnector")
_MAX_FRAMES = 16


def _composite_parents(own: KVTransferConfig) -> list[KVTransferConfig]:
    """The configs of the MultiConnector/PdConnector building this connector as a child.

    vLLM's scheduler reads the failure policy from the top-level config only, and a composite gives
    each child a shallow copy of the VllmConfig with the child's own KVTransferConfig: the parent's
    is reachable only from the frames that are constructing us (bounded walk, read-only)."""
    found: list[KVTransferConfig] = []
    frame = sys._getframe(1)
    for _ in range(_MAX_FRAMES):
        if frame is None:
            break
        for value in frame.f_locals.values():
            config = getattr(value, "kv_transfer_config", None) if isinstance(value, VllmConfig) else None
            if config is not None and config is not own and config.kv_connector in _COMPOSITES \
                    and all(config is not f for f in found):
                found.append(config)
        frame = frame.f_back
    return found


class FlexKVConnector(FlexKVConnectorV1, SupportsHMA):
    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        KVConnectorBase_V1.__init__(self, vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        # Validate every setting, and check them against the machine (SSD directories, the store's URL),
        # first: a bad value fails here, before vLLM allocates its KV cache.
        settings = load_settings(self._kv_transfer_config.kv_connector_extra_config, checks=preflight)
        configure_logging(settings.log_level)
        if (warning := untested_version_warning(vllm.__version__)) is not None:
            logger.warning(warning)
        self._metrics = settings.enable_metrics
        facts = describe_instance(vllm_config, kv_cache_config, settings)
        self._scheduler = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from dynamo_flexkv.integration.vllm.scheduler import SchedulerSide

            # vLLM reads this right after building the connector. Its default, "fail", would fail a
            # request whose cached blocks turned out unreadable; for a cache, that is a miss.
            for config in (self._kv_transfer_config, *_composite_parents(self._kv_transfer_config)):
                if config.kv_load_failure_policy != "recompute":
                    config.kv_load_failure_policy = "recompute"
                    logger.info("kv_load_failure_policy of %s set to recompute: an unreadable block is a "
                                "cache miss", config.kv_connector)

            kv_events = vllm_config.kv_events_config
            publish = bool(kv_events and kv_events.enable_kv_cache_events)
            layerwise = loads_layer_by_layer(settings.layerwise_load, vllm_config, facts.hybrid)
            self._owner_lock = claim_pool_owner(facts.identity)  # held for the life of the process
            self._scheduler = SchedulerSide(facts, settings, publish_events=publish, layerwise=layerwise)
        else:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            from dynamo_flexkv.integration.vllm.worker import WorkerSide

            self._worker = WorkerSide(facts, get_tensor_model_parallel_rank(), kv_cache_config.num_blocks,
                                      cpu_async_copies=settings.cpu_async_copies,
                                      cuda_options={"issue": settings.cuda_issue, "method": settings.cuda_copy_method,
                                                    "batch_memcpy": settings.cuda_batch_memcpy})

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a dropped save is only a future cache miss

    # --- scheduler role ------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        self._scheduler.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, (block_ids,))  # the hybrid manager is off

    def request_finished_all_groups(self, request: Request, block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    def take_events(self) -> Iterable[KVCacheEvent]:
        return self._scheduler.take_events() if self._scheduler else ()

    def has_pending_push_work(self) -> bool:
        """Keeps vLLM stepping while SSD reads/writes are in flight, so they are acknowledged."""
        return self._scheduler is not None and self._scheduler.has_lower_tier_work

    def reset_cache(self) -> bool | None:
        return self._scheduler.reset_cache() if self._scheduler else None

    # --- worker role ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        # vLLM calls this before anything of the step touches the cache: blocks it freed by
        # preempting requests are saved here, before they are reused
        assert isinstance(kv_connector_metadata, FlexKVStepMetadata)
        self._worker.handle_preemptions(kv_connector_metadata)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        # Every vLLM version calls this once per step, with or without a forward pass; steps that
        # schedule no tokens skip `wait_for_save` in some versions (0.26), so saves start here too.
        metadata = self._get_connector_metadata()
        assert isinstance(metadata, FlexKVStepMetadata)
        self._worker.start_step(metadata)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return load_settings(extra_config).layerwise_load is True  # per-layer waits cannot be graph-captured

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        return  # whole blocks are saved in a later step (save_policy), not layer by layer

    def wait_for_save(self) -> None:
        return  # saves started with the step (start_load_kv) and are reported by get_finished

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return self._worker.get_finished()

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """`get_finished`, with the requests whose load failed (vLLM versions that take them so)."""
        saved, loaded = self._worker.get_finished()
        return transfer_results(saved, loaded, self._worker.take_failed_requests(loaded))

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.take_report() if self._worker else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self._worker or self._scheduler
        stats = side.take_stats()
        return stats if self._metrics else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return FlexKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return FlexKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._scheduler is not None:
            self._scheduler.shutdown()
            release_pool_owner(self._scheduler.identity, self._owner_lock)
