"""The plain data the control plane hands out: plans to execute, events to publish, counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from dynamo_flexkv.index.tier import Slot


@dataclass(frozen=True, slots=True)
class Staging:
    """Block ``LoadPlan.keys[index]`` is first read from ``slot`` of the lower ``tier`` into its
    slot of the plan's (top) tier."""

    index: int
    tier: str
    slot: Slot


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """Copy ``keys`` from ``slots`` of ``tier`` (the top tier) up to the GPU. Blocks listed in
    ``staged`` must first be read into those slots from a lower tier (see
    ``CacheEngine.complete_stage``). Every block stays locked until the plan is completed or
    cancelled."""

    request_id: str
    tier: str
    keys: tuple[bytes, ...]
    slots: tuple[Slot, ...]
    staged: tuple[Staging, ...] = ()


@dataclass(frozen=True, slots=True)
class StorePlan:
    """Copy ``keys`` from the GPU into ``slots`` of ``tier``. The blocks are invisible until the
    plan is completed successfully."""

    request_id: str
    tier: str
    keys: tuple[bytes, ...]
    slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class SpillPlan:
    """Copy ``keys`` from ``src_slots`` of ``src`` down into ``dst_slots`` of ``dst`` (a
    write-through cascade). The source blocks stay locked, the destination ones invisible, until
    the plan is completed."""

    spill_id: int
    src: str
    dst: str
    keys: tuple[bytes, ...]
    parents: tuple[bytes | None, ...]
    src_slots: tuple[Slot, ...]
    dst_slots: tuple[Slot, ...]


@dataclass(frozen=True, slots=True)
class Stored:
    """Blocks whose bytes landed in ``tier``. ``parents[i]`` is the block ``keys[i]`` extends;
    each parent was announced before (in an earlier event or earlier in this one) unless it has
    since been removed."""

    tier: str
    keys: tuple[bytes, ...]
    parents: tuple[bytes | None, ...]


@dataclass(frozen=True, slots=True)
class Removed:
    """Announced blocks that left ``tier`` (evicted, or dropped as bad)."""

    tier: str
    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Cleared:
    """``tier`` was reset: forget every block announced in it. ``keys`` are the blocks the
    reset took out (every READY one; those a plan still reads are freed when it ends)."""

    tier: str
    keys: tuple[bytes, ...] = ()


TierEvent: TypeAlias = Stored | Removed | Cleared


@dataclass
class EngineStats:
    """Counters, cumulative since the engine was built; per-tier ones are keyed by tier name.

    ``CacheEngine.snapshot()`` returns an independent copy; ``blocks_held`` is the one gauge
    (slots in use, read at snapshot time). Rates are the reader's job: diff two snapshots.
    """

    lookups: int = 0
    load_failures: int = 0
    hit_blocks: dict[str, int] = field(default_factory=dict)  # served by successful loads
    stored_blocks: dict[str, int] = field(default_factory=dict)  # committed
    evicted_blocks: dict[str, int] = field(default_factory=dict)  # to make room
    dropped_blocks: dict[str, int] = field(default_factory=dict)  # reported bad by a load
    blocks_held: dict[str, int] = field(default_factory=dict)
