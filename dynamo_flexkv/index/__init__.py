"""Control plane: per-tier prefix indexes, slot pools, eviction and transfer plans.

Pure standard library and bytes-free: keys are vLLM's chained block hashes, values are slot
numbers. The data plane executes the plans this package produces and acknowledges them back.
"""

from dynamo_flexkv.index.engine import CacheEngine
from dynamo_flexkv.index.plans import (
    Cleared,
    EngineStats,
    LoadPlan,
    Removed,
    SpillPlan,
    Staging,
    Stored,
    StorePlan,
    TierEvent,
)
from dynamo_flexkv.index.policies import POLICY_NAMES, EvictionPolicy, make_policy
from dynamo_flexkv.index.tier import AllocateResult, BlockState, Slot, TierIndex

__all__ = [
    "POLICY_NAMES",
    "AllocateResult",
    "BlockState",
    "CacheEngine",
    "Cleared",
    "EngineStats",
    "EvictionPolicy",
    "LoadPlan",
    "Removed",
    "Slot",
    "SpillPlan",
    "Staging",
    "StorePlan",
    "Stored",
    "TierEvent",
    "TierIndex",
    "make_policy",
]
