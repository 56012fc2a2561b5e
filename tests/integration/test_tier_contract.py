"""The `TierBackend` contract, run against every backend: the in-memory example, SSD on a tmpdir,
and the cluster stores against real servers this module starts on loopback.

A new tier passes this suite by adding one parameter: a function that opens the backend and says
how to corrupt one stored value and how to take its medium away. Completion is observed through
futures with timeouts, so a hang fails the test instead of blocking it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import redis
import torch

from dynamo_flexkv.config import FlexKVSettings
from dynamo_flexkv.devtools.processes import Deployment, Service, free_port
from dynamo_flexkv.storage.backend import BACKENDS, IoResult, TierBackend, open_backend
from tests.example_tier import MemoryTier
from tests.servers import mooncake_master

SLOT = 64 * 1024
POOL_SLOTS = 16
TIMEOUT = 30
LAYOUT = {"model": "tiny-llama", "kv_dtype": "bfloat16", "block_size": 16, "layers": 2,
          "shard_bytes": SLOT, "tp_size": 1, "hash_algo": "sha256"}


@dataclass
class Tier:
    backend: TierBackend
    corrupt: Callable[[bytes, int], None]  # (key, address) -> damage the stored value in place
    take_medium_away: Callable[[], None]  # the disk / server disappears
    # shared stores: another client of the same store, opened with these settings changed
    peer: Callable[..., TierBackend] | None = None
    server: Service | None = None  # a cluster store's server process (frozen by the deadline tests)


def mac_key_file(tmp_path, secret: bytes = b"the cluster's shared secret") -> str:
    path = tmp_path / f"mac-{uuid.uuid4().hex[:8]}.key"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return str(path)


def open_memory(tmp_path) -> Iterator[Tier]:
    tier = MemoryTier(num_slots=POOL_SLOTS)

    def corrupt(key: bytes, addr: int) -> None:
        name = tier.framing.name(key)
        tier.values[name] = tier.values[name][:-1] + bytes([tier.values[name][-1] ^ 0xFF])

    yield Tier(tier, corrupt, lambda: setattr(tier, "broken", True))


def open_ssd(tmp_path) -> Iterator[Tier]:
    disk = tmp_path / "nvme0"
    disk.mkdir()
    settings = FlexKVSettings(ssd_cache_gb=POOL_SLOTS * SLOT / (1 << 30), ssd_cache_dir=str(disk))
    tier = open_backend("ssd", LAYOUT, SLOT, settings)

    def corrupt(key: bytes, addr: int) -> None:
        f, local = tier.store._locate(addr)
        fd = os.open(f.path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xff" * 4096, f.data_off + local * SLOT)
        finally:
            os.close(fd)

    yield Tier(tier, corrupt, lambda: shutil.rmtree(disk))


def open_redis(tmp_path, mac: bool = False) -> Iterator[Tier]:
    port = free_port()
    with Deployment(tmp_path) as services:
        server = services.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                                          "--save", "", "--appendonly", "no"])
        client = redis.Redis(port=port)
        services.wait_for(client.ping, 10, "redis-server answering")
        settings = FlexKVSettings(remote_store=f"redis://127.0.0.1:{port}/0", remote_timeout_s=2,
                                  remote_mac_key_file=mac_key_file(tmp_path) if mac else None)
        tier = open_backend("redis", LAYOUT, SLOT, settings)

        def corrupt(key: bytes, addr: int) -> None:
            name = tier._framing.name(key)
            value = client.get(name)
            client.set(name, value[:-1] + bytes([value[-1] ^ 0xFF]))

        yield Tier(tier, corrupt, lambda: server.stop(grace_s=5), peer_of("redis", settings), server)


def peer_of(scheme: str, settings: FlexKVSettings) -> Callable[..., TierBackend]:
    return lambda **changed: open_backend(scheme, LAYOUT, SLOT, settings.model_copy(update=changed))


def open_mooncake(tmp_path, mac: bool = False) -> Iterator[Tier]:
    with mooncake_master(tmp_path) as (services, url):
        settings = FlexKVSettings(remote_store=url, remote_cache_gb=64 / 1024, remote_timeout_s=2,
                                  remote_mac_key_file=mac_key_file(tmp_path) if mac else None)
        tier = open_backend("mooncake", LAYOUT, SLOT, settings)

        def corrupt(key: bytes, addr: int) -> None:
            store, name = tier._store, tier._framing.name(key)
            value = store.get(name)
            assert store.remove(name, True) == 0
            assert store.put(name, value[:-1] + bytes([value[-1] ^ 0xFF])) == 0

        master = services["mooncake-master"]
        yield Tier(tier, corrupt, lambda: master.stop(grace_s=5), peer_of("mooncake", settings), master)


# "+mac": the same store with remote_mac_key_file set, so values carry a MAC instead of a checksum
OPENERS = {"memory": open_memory, "ssd": open_ssd, "redis": open_redis, "mooncake": open_mooncake,
           "redis+mac": lambda tmp_path: open_redis(tmp_path, mac=True),
           "mooncake+mac": lambda tmp_path: open_mooncake(tmp_path, mac=True)}


@pytest.fixture(params=sorted(OPENERS))
def tier(request, tmp_path) -> Iterator[Tier]:
    opened = OPENERS[request.param](tmp_path)
    t = next(opened)
    yield t
    t.backend.close()
    next(opened, None)


@pytest.fixture
def pool() -> Iterator[torch.Tensor]:
    path = f"/dev/shm/flexkv-test-contract-{uuid.uuid4().hex}"
    tensor = torch.from_file(path, shared=True, size=POOL_SLOTS * SLOT, dtype=torch.uint8).view(POOL_SLOTS, SLOT)
    tensor.copy_(torch.randint(0, 256, (POOL_SLOTS, SLOT), dtype=torch.uint8))
    yield tensor
    os.unlink(path)


def keys(n: int, salt: str = "") -> list[bytes]:
    return [uuid.uuid5(uuid.NAMESPACE_OID, f"{salt}{i}").bytes * 2 for i in range(n)]


def done(future) -> IoResult:
    return future.result(timeout=TIMEOUT)


def test_every_backend_is_registered_or_the_example():
    assert {name.removesuffix("+mac") for name in OPENERS} - {"memory"} <= set(BACKENDS)


def test_blocks_round_trip_between_pool_slots(tier, pool):
    b, ks = tier.backend, keys(4)
    assert isinstance(b, TierBackend) and b.healthy and b.degraded_reason is None
    written = done(b.write(pool, [0, 1, 2, 3], [0, 1, 2, 3], ks))
    assert written.ok == [True] * 4 and written.bytes == 4 * SLOT
    read = done(b.read(pool, [2, 0], [10, 11], [ks[2], ks[0]]))
    assert read.ok == [True, True] and read.bytes == 2 * SLOT
    assert torch.equal(pool[10], pool[2]) and torch.equal(pool[11], pool[0])


def test_results_are_per_block_in_the_order_asked(tier, pool):
    b, ks = tier.backend, keys(3)
    assert done(b.write(pool, [0, 2], [0, 2], [ks[0], ks[2]])).ok == [True, True]
    read = done(b.read(pool, [0, 1, 2], [8, 9, 10], ks))
    assert read.ok == [True, False, True]
    assert torch.equal(pool[8], pool[0]) and torch.equal(pool[10], pool[2])
    assert done(b.write(pool, [], [], [])).ok == [] and done(b.read(pool, [], [], [])).ok == []


def test_a_block_is_found_only_under_its_own_key(tier, pool):
    b, ks = tier.backend, keys(2)
    done(b.write(pool, [0], [0], [ks[0]]))
    assert done(b.read(pool, [0], [9], [ks[1]])).ok == [False]  # same address, foreign key


def test_lookup_answers_what_the_tier_holds(tier, pool):
    b, ks = tier.backend, keys(3)
    done(b.write(pool, [0, 1], [0, 1], ks[:2]))
    assert b.lookup(ks).result(timeout=TIMEOUT) == [True, True, False]


def test_a_corrupt_value_is_a_miss(tier, pool):
    b, ks = tier.backend, keys(2)
    done(b.write(pool, [0, 1], [0, 1], ks))
    tier.corrupt(ks[1], 1)
    assert done(b.read(pool, [0, 1], [8, 9], ks)).ok == [True, False]


def test_losing_the_medium_degrades_to_misses_without_raising(tier, pool):
    b, ks = tier.backend, keys(2, "gone")
    done(b.write(pool, [0], [0], ks[:1]))
    tier.take_medium_away()
    assert done(b.read(pool, [0], [8], ks[:1])).ok == [False]
    assert done(b.write(pool, [1], [1], ks[1:])).ok == [False]
    assert b.lookup(ks).result(timeout=TIMEOUT) == [False, False]
    assert not b.healthy and b.degraded_reason


@pytest.fixture(params=["mooncake", "redis"])
def store_tier(request, tmp_path) -> Iterator[Tier]:
    """A cluster store's tier, with its server process."""
    opened = OPENERS[request.param](tmp_path)
    t = next(opened)
    yield t
    t.backend.close()
    next(opened, None)


@pytest.mark.correctness("cluster store stalled or dead",
                         "a store frozen under a tier call: "
                         "every read, write and lookup answered as a miss by remote_timeout_s; serves again once it answers")
def test_a_frozen_store_answers_every_call_by_its_deadline_and_serves_again_when_it_returns(store_tier, pool):
    """The server stops answering (SIGSTOP: its sockets stay open): every call is answered as misses
    by its deadline, the tier degrades, a read's slots are reported unsettled until its call returns;
    after the server resumes the background probe brings the tier back."""
    tier = store_tier
    b, ks = tier.backend, keys(3, "frozen")
    assert done(b.write(pool, [0, 1], [0, 1], ks[:2])).ok == [True, True]
    bound = b.timeout_s + 1  # generous: the deadline plus the watchdog's wake-up
    tier.server.freeze()
    try:
        started = time.monotonic()
        read = b.read(pool, [0, 1], [8, 9], ks[:2])
        lookup = b.lookup(ks)
        assert read.result(timeout=bound).ok == [False, False]
        assert lookup.result(timeout=bound) == [False] * 3
        assert time.monotonic() - started < bound
        # answered by the deadline, or by the client's own socket timeout (Redis: the same seconds)
        assert not b.healthy and b.degraded_reason and b.stats.timeouts + b.stats.errors >= 1
        assert done(b.write(pool, [2], [2], ks[2:])).ok == [False]  # degraded: fails fast
    finally:
        tier.server.thaw()
    unsettled = read.result().unsettled
    if unsettled is not None:  # the late call returns once the server answers again
        unsettled.result(timeout=TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while not b.healthy:
        assert time.monotonic() < deadline, f"not serving again after the store returned: {b.degraded_reason}"
        time.sleep(0.1)
    assert done(b.write(pool, [2], [2], ks[2:])).ok == [True]
    assert done(b.read(pool, [0, 2], [10, 11], [ks[0], ks[2]])).ok == [True, True]
    assert torch.equal(pool[10], pool[0]) and torch.equal(pool[11], pool[2])


def test_close_is_idempotent_and_later_io_misses(tier, pool):
    b, ks = tier.backend, keys(1)
    b.close()
    b.close()
    assert done(b.write(pool, [0], [0], ks)).ok == [False]
    assert done(b.read(pool, [0], [8], ks)).ok == [False]


def test_after_invalidate_all_nothing_written_before_is_found(tier, pool):
    """A cache reset (the weights changed): values written before it, or submitted before it and
    landing after it, are never read or found again; writes after it are."""
    b, ks = tier.backend, keys(3, "reset")
    done(b.write(pool, [0], [0], ks[:1]))
    in_flight = b.write(pool, [1], [1], ks[1:2])
    b.invalidate_all()
    done(in_flight)
    assert done(b.read(pool, [0, 1], [8, 9], ks[:2])).ok == [False, False]
    assert b.lookup(ks[:2]).result(timeout=TIMEOUT) == [False, False]
    assert done(b.write(pool, [2], [2], ks[2:])).ok == [True]
    assert done(b.read(pool, [2], [10], ks[2:])).ok == [True] and torch.equal(pool[10], pool[2])


def test_recover_lists_key_address_parent_triples(tier):
    found = tier.backend.recover()
    assert all(isinstance(k, bytes) and isinstance(a, int) and (p is None or isinstance(p, bytes))
               for k, a, p in found)


@pytest.mark.parametrize("tier", ["redis+mac", "mooncake+mac"], indirect=True)
@pytest.mark.correctness("foreign value planted in the cluster store",
                         "miss (with remote_mac_key_file): a value written without the key, with another key, or "
                         "altered is never loaded into a pool slot as valid")
def test_only_values_written_with_the_mac_key_are_read(tier, pool, tmp_path):
    """A client that can write to the store but lacks the key cannot plant a block others load: its
    values (checksummed, or MAC'd with another key) are misses, as is a MAC'd value changed in the
    store; an unkeyed reader rejects MAC'd values too. Values of the same key are read."""
    ks = keys(4, "mac")
    unkeyed = tier.peer(remote_mac_key_file=None)
    other = tier.peer(remote_mac_key_file=mac_key_file(tmp_path, b"some other cluster's secret"))
    same = tier.peer()
    try:
        assert done(unkeyed.write(pool, [0], [0], ks[:1])).ok == [True]
        assert done(other.write(pool, [1], [1], ks[1:2])).ok == [True]
        assert done(same.write(pool, [2, 3], [2, 3], ks[2:])).ok == [True, True]
        tier.corrupt(ks[3], 3)
        before = tier.backend.stats.corrupt_blocks
        assert done(tier.backend.read(pool, [0, 1, 2, 3], [8, 9, 10, 11], ks)).ok == [False, False, True, False]
        assert tier.backend.stats.corrupt_blocks - before == 3 and torch.equal(pool[10], pool[2])
        assert done(unkeyed.read(pool, [2], [12], ks[2:3])).ok == [False]
    finally:
        for client in (unkeyed, other, same):
            client.close()


UNREACHABLE = {"redis": "redis://127.0.0.1:{port}/0", "mooncake": "mooncake://127.0.0.1:{port}"}  # cluster stores: a URL where nothing listens


@pytest.mark.parametrize("scheme", sorted(UNREACHABLE))
def test_an_unreachable_store_starts_degraded_by_default_or_fails_at_start_up_in_one_line(scheme, caplog):
    url = UNREACHABLE[scheme].format(port=free_port())
    tier = open_backend(scheme, LAYOUT, SLOT, FlexKVSettings(remote_store=url, remote_timeout_s=2))
    try:
        assert not tier.healthy and "unreachable" in tier.degraded_reason and tier.stats.started_degraded == 1
        assert tier.lookup([b"k" * 32]).result(timeout=TIMEOUT) == [False]
    finally:
        tier.close()
    assert [r.levelname for r in caplog.records if "STARTING DEGRADED" in r.getMessage()] == ["WARNING"]
    settings = FlexKVSettings(remote_store=url, remote_timeout_s=2, remote_start_degraded=False)
    with pytest.raises(ConnectionError) as failed:
        open_backend(scheme, LAYOUT, SLOT, settings)
    assert url in str(failed.value) and "\n" not in str(failed.value)


@contextlib.contextmanager
def running_server(scheme: str, tmp_path) -> Iterator[tuple[Service, str]]:
    """A cluster store's server on loopback: (its process, the remote_store URL)."""
    if scheme == "mooncake":
        with mooncake_master(tmp_path) as (services, url):
            yield services["mooncake-master"], url
        return
    port = free_port()
    with Deployment(tmp_path) as services:
        server = services.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                                          "--save", "", "--appendonly", "no"])
        services.wait_for(redis.Redis(port=port).ping, 10, "redis-server answering")
        yield server, f"redis://127.0.0.1:{port}/0"


@pytest.mark.parametrize("scheme", sorted(UNREACHABLE))
@pytest.mark.correctness("cluster store stalled or dead",
                         "a store frozen at start-up (accepts connections, never answers): "
                         "the tier starts degraded within its connect deadline, one warning line; serves once it answers")
def test_a_store_frozen_at_start_up_starts_degraded_in_bounded_time_then_serves(scheme, tmp_path, pool):
    with running_server(scheme, tmp_path) as (server, url):
        settings = FlexKVSettings(remote_store=url, remote_cache_gb=64 / 1024, remote_timeout_s=2)
        server.freeze()
        try:
            started = time.monotonic()
            tier = open_backend(scheme, LAYOUT, SLOT, settings)
            opened_s = time.monotonic() - started
        finally:
            server.thaw()
        try:
            assert opened_s < type(tier).connect_timeout_s(settings) + 5, opened_s  # bounded, never minutes
            assert tier.stats.started_degraded == 1 and tier.degraded_reason
            deadline = time.monotonic() + TIMEOUT
            while not tier.healthy:
                assert time.monotonic() < deadline, f"not serving after the store answered: {tier.degraded_reason}"
                time.sleep(0.1)
            ks = keys(1, "thawed")
            assert done(tier.write(pool, [0], [0], ks)).ok == [True]
            assert done(tier.read(pool, [0], [8], ks)).ok == [True] and torch.equal(pool[8], pool[0])
        finally:
            tier.close()
