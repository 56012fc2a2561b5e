"""Which vLLM versions the connector is tested with; the one place where version differences go.

Tested: 0.26 on CUDA (the lent H200, benchmarks/e2e_gpu.py), 0.31 and 0.32 on the CPU build (CI,
tests/test_vllm_versions.py). They call the connector's hooks in different orders:
- 0.26's model runners skip `wait_for_save` in a step that schedules no tokens;
- 0.31+ call `start_load_kv` after the forward pass when no load must land before it;
- 0.32 adds optional hooks for hybrid models; their defaults are right for this connector (a load
  restores every prefix-cacheable group: `get_loaded_kv_cache_group_ids`).
The connector needs no version branch for any of them: the worker starts every transfer of a step in
`start_load_kv`, which every version calls once per step, with or without a forward pass, and
reports completions in `get_finished`. A difference that cannot be absorbed that way belongs here,
as do the facts read from vLLM's config that decide how the connector runs.

Hybrid models (several KV-cache groups): the connector declares `SupportsHMA`, so vLLM keeps its
hybrid KV cache manager on. Versions whose scheduler cannot map a failed block back to a request of
a hybrid model (0.31: "not supported for models with multiple KV cache groups") take failed loads
per request (`KVConnectorTransferResults.failed_recving`, via `get_transfer_results`); there the
connector reports them so, and loads hybrid models' hits between steps (a layer-wise load can only
fail per block).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1 import base

logger = logging.getLogger(__name__)

# vLLM's BlockPool reserves block 0 as the null block: what a sliding-window group's table holds
# for blocks outside its window. Never copied into or out of.
NULL_BLOCK_ID = 0

# vLLM without the hybrid-manager interface turns the hybrid manager off for every connector.
SupportsHMA: type = getattr(base, "SupportsHMA", None) or type("SupportsHMA", (), {})

# Whether this vLLM takes failed loads per request (a hybrid model's block ids are per group).
PER_REQUEST_LOAD_FAILURES = hasattr(base, "KVConnectorTransferResults")


def transfer_results(saved: set[str], loaded: set[str], failed_loads: set[str]) -> Any:
    """vLLM's `KVConnectorTransferResults`: a failed load is also a finished one."""
    return base.KVConnectorTransferResults(finished_sending=set(saved), finished_recving=set(loaded) | failed_loads,
                                           failed_recving=set(failed_loads))

TESTED_RANGE = ((0, 26), (0, 32))  # first and last tested minor version


def untested_version_warning(version: str) -> str | None:
    """A one-line warning when `version` (vllm.__version__) is outside the tested range, else None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"dynamo-flexkv cannot read the vLLM version {version!r}; it is tested with vLLM 0.26-0.32"
    minor = (int(match[1]), int(match[2]))
    low, high = TESTED_RANGE
    if low <= minor <= high:
        return None
    return f"dynamo-flexkv is tested with vLLM 0.26-0.32; this is vLLM {version}: report problems with the version"


def loads_layer_by_layer(setting: str | bool, vllm_config: Any, hybrid: bool) -> bool:
    """Whether CPU-tier hits are loaded layer by layer inside the step: the one place `layerwise_load` is
    decided, logged once; the scheduler role is handed the result.

    vLLM skips the per-layer waits of a step it replays as a full CUDA graph, so with `true` the
    connector asks vLLM for piecewise graphs (`requires_piecewise_for_cudagraph`), which cost decode
    speed: measured 0.62-0.67x on the H200 (docs/gpu.md). `auto` keeps vLLM's full graphs and loads
    between steps whenever they are on; eager engines and the CPU build load layer by layer. A hybrid
    model's hits (`hybrid`: several KV-cache groups, or a sliding window) are always loaded between
    steps: a layer-wise load can only fail per block, which vLLM cannot map back to their requests."""
    mode = vllm_config.compilation_config.cudagraph_mode
    wanted = bool(setting) if setting != "auto" else mode is None or not mode.has_full_cudagraphs()
    resolved = wanted and not hybrid
    why = "a hybrid model's hits load between steps" if wanted and hybrid else f"vLLM cudagraph_mode {mode}"
    logger.info("layerwise_load=%s resolved to %s (%s)", setting, resolved, why)
    return resolved
