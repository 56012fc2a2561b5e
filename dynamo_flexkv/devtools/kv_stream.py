"""Listen to a worker's vLLM KV-event stream and check it against the rules of Dynamo's KV router.

vLLM publishes `(topic, seq: u64 big-endian, msgpack KVEventBatch)` frames on a ZMQ PUB socket (the
`--kv-events-config` endpoint); Dynamo's worker subscribes and forwards them to the router, and so can
anyone else. The router indexes a lower-tier `BlockStored` only if its `block_size` is the engine's,
its `token_ids` cover every block, and its parent chain continues the worker's own events — so those
are the rules :class:`RouterRules` checks, for every FlexKV (non-GPU) event.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
import zmq

GPU_MEDIA = (None, "GPU")


class KvEventStream:
    """Collects `(seq, KVEventBatch)` from one endpoint on a background thread until closed."""

    def __init__(self, endpoint: str, name: str = ""):
        from vllm.distributed.kv_events import KVEventBatch

        self.name = name or endpoint
        self.endpoint = endpoint.replace("tcp://*:", "tcp://127.0.0.1:")
        self._decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self._context = zmq.Context.instance()
        self._socket = self._context.socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(self.endpoint)  # before the publisher binds: ZMQ connects when it appears
        self._lock = threading.Lock()
        self._batches: list[tuple[int, object]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(100):
                continue
            frames = self._socket.recv_multipart()
            try:
                _topic, seq, payload = frames
                batch = self._decoder.decode(payload)
                entry = (struct.unpack(">Q", seq)[0], batch)
            except (ValueError, msgspec.DecodeError) as err:
                self.errors.append(f"undecodable frame ({len(frames)} parts): {err}")
                continue
            with self._lock:
                self._batches.append(entry)

    def batches(self) -> list[tuple[int, object]]:
        with self._lock:
            return list(self._batches)

    def events(self) -> list[object]:
        return [event for _, batch in self.batches() for event in batch.events]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(0)


def medium_of(event: object) -> str:
    return getattr(event, "medium", None) or "GPU"


def count_events(events: Iterable[object]) -> dict[tuple[str, str], int]:
    """(event type, medium) -> number of events, e.g. ('BlockStored', 'CPU')."""
    counts: dict[tuple[str, str], int] = {}
    for event in events:
        key = (type(event).__name__, medium_of(event))
        counts[key] = counts.get(key, 0) + 1
    return counts


def router_updates(batches: Iterable[tuple[int, object]]) -> dict[str, int]:
    """How many updates the router counts in `dynamo_component_kv_cache_events_applied` for these batches.

    Dynamo's worker forwards each BlockStored as one update and merges a run of consecutive
    BlockRemoved events of one batch (same medium) into one; AllBlocksCleared is one update.
    """
    out = {"stored": 0, "removed": 0, "cleared": 0}
    for _, batch in batches:
        previous = None
        for event in batch.events:
            kind = type(event).__name__
            if kind == "BlockStored":
                out["stored"] += 1
            elif kind == "BlockRemoved":
                if previous is None or type(previous).__name__ != "BlockRemoved" or medium_of(previous) != medium_of(event):
                    out["removed"] += 1
            else:
                out["cleared"] += 1
            previous = event
    return out


@dataclass
class RouterRules:
    """Checks one worker's stream, in order: every lower-tier event must be indexable by the router."""

    block_size: int
    announced: set[int] = field(default_factory=set)  # hashes announced in any tier, ever
    held: dict[str, set[int]] = field(default_factory=dict)  # medium -> hashes held now
    gpu_parent: dict[int, int | None] = field(default_factory=dict)  # from GPU events
    gpu_tokens: dict[int, tuple[int, ...]] = field(default_factory=dict)
    chain: dict[tuple[int | None, tuple[int, ...]], int] = field(default_factory=dict)  # (parent, tokens) -> hash
    problems: list[str] = field(default_factory=list)
    checked: int = 0  # lower-tier events checked

    def feed(self, seq: int, batch: object) -> None:
        for event in batch.events:
            kind, medium = type(event).__name__, medium_of(event)
            if kind == "BlockStored":
                self._stored(seq, event, medium)
            elif kind == "BlockRemoved":
                if medium not in ("GPU",):
                    self.checked += 1
                    unknown = [h for h in event.block_hashes if h not in self.held.get(medium, set())]
                    if unknown:
                        self.problems.append(f"seq={seq} BlockRemoved({medium}) of blocks never stored there: {unknown[:3]}")
                self.held.setdefault(medium, set()).difference_update(event.block_hashes)
            else:
                self.held.clear()

    def held_prefix_blocks(self, prompt: list[int], medium: str) -> int:
        """How many leading full blocks of `prompt` this worker has announced as held in `medium`."""
        size, parent, held = self.block_size, None, self.held.get(medium, set())
        for count in range(len(prompt) // size):
            block = self.chain.get((parent, tuple(prompt[count * size:(count + 1) * size])))
            if block is None or block not in held:
                return count
            parent = block
        return len(prompt) // size

    def _stored(self, seq: int, event: object, medium: str) -> None:
        hashes, parent, tokens = list(event.block_hashes), event.parent_block_hash, list(event.token_ids)
        size = self.block_size
        for i, h in enumerate(hashes):
            self.chain[(parent if i == 0 else hashes[i - 1], tuple(tokens[i * size:(i + 1) * size]))] = h
        if medium == "GPU":
            for i, h in enumerate(hashes):
                self.gpu_parent[h] = parent if i == 0 else hashes[i - 1]
                self.gpu_tokens[h] = tuple(tokens[i * size:(i + 1) * size])
        else:
            self.checked += 1
            where = f"seq={seq} BlockStored({medium}) blocks={len(hashes)}"
            if not hashes:
                self.problems.append(f"{where}: no block hashes")
            if event.block_size != size:
                self.problems.append(f"{where}: block_size {event.block_size} != engine's {size}")
            if len(tokens) != size * len(hashes):
                self.problems.append(f"{where}: {len(tokens)} token ids for {len(hashes)} blocks of {size}")
            if parent is not None and parent not in self.announced:
                self.problems.append(f"{where}: parent {parent} was never announced by this worker")
            for i, h in enumerate(hashes):
                expected_parent = parent if i == 0 else hashes[i - 1]
                if h in self.gpu_parent and self.gpu_parent[h] != expected_parent:
                    self.problems.append(f"{where}: block {h} chains to {expected_parent}, GPU events say "
                                         f"{self.gpu_parent[h]}")
                if h in self.gpu_tokens and self.gpu_tokens[h] != tuple(tokens[i * size:(i + 1) * size]):
                    self.problems.append(f"{where}: block {h} carries other tokens than its GPU event")
        self.announced.update(hashes)
        self.held.setdefault(medium, set()).update(hashes)


def check_stream(batches: Iterable[tuple[int, object]], block_size: int) -> RouterRules:
    rules = RouterRules(block_size)
    for seq, batch in batches:
        rules.feed(seq, batch)
    return rules
