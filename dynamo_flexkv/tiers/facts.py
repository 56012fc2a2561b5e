"""What an instance's stored blocks depend on, and the namespace a shared tier keys them by."""

from __future__ import annotations

import os
from dataclasses import dataclass

from dynamo_flexkv.index.groups import KVGroup
from dynamo_flexkv.storage.layout import PoolGeometry

# vLLM derives the root of every block-hash chain from PYTHONHASHSEED when set; otherwise from a
# fixed seed for its sha256 algorithms and from a random per-process seed for its xxhash ones.
NON_DETERMINISTIC_HASH_ALGOS = ("xxhash", "xxhash_cbor")


@dataclass(frozen=True)
class InstanceFacts:
    identity: str  # names the shared-memory pool of this instance
    block_size: int  # tokens per vLLM block
    geometry: PoolGeometry
    layout: dict[str, str | int]  # what a stored block's bytes depend on: namespaces the lower tiers
    # the model's KV-cache groups, and the layers of each (a slot holds group 0's layers, then group 1's...)
    groups: tuple[KVGroup, ...] = (KVGroup("full_attention"),)
    group_layers: tuple[tuple[str, ...], ...] = ()

    @property
    def hybrid(self) -> bool:
        """Whether a stored block may hold only some groups' KV (a sliding-window group, or several)."""
        return len(self.groups) > 1 or self.groups[0].window is not None


def require_shared_hashes(hash_algo: str, setting: str) -> None:
    """Refuse (one clear error) when this process's block hashes cannot match another process's."""
    if hash_algo in NON_DETERMINISTIC_HASH_ALGOS and os.environ.get("PYTHONHASHSEED") is None:
        raise ValueError(
            f"{setting} shares KV blocks between processes, but prefix_caching_hash_algo={hash_algo} "
            "seeds every process's block hashes randomly: set PYTHONHASHSEED to the same value on "
            "every engine, or use prefix_caching_hash_algo=sha256 / sha256_cbor"
        )


def shared_tier_layout(layout: dict[str, str | int], setting: str) -> dict[str, str | int]:
    """The layout a shared tier namespaces its keys by: the instance's layout plus the block-hash
    seed, so engines whose hashes differ never read each other's values."""
    require_shared_hashes(str(layout.get("hash_algo", "")), setting)
    seed = os.environ.get("PYTHONHASHSEED")
    # Every entry, the weights' content identity included, is the same on every node that serves
    # the same checkpoint (no paths, no mtimes): the namespace shares across nodes, never across weights.
    return {**layout, "hash_seed": seed if seed is not None else "vllm-default"}

