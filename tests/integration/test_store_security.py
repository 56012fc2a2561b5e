"""The Redis cluster tier's connection security against a real redis-server started by the test:
TLS (`rediss://`, a throwaway CA, server and client certificates), an ACL user
(`redis://user:password@...`), and the password never shown in a log line, an error or a tier's name.
A wrong password or an untrusted certificate is one start-up error line, or a degraded start."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator

import pytest
import redis
import torch

from dynamo_flexkv.config import ConfigError, FlexKVSettings, load_settings
from dynamo_flexkv.devtools.processes import Deployment, free_port
from dynamo_flexkv.storage.backend import open_backend
from tests.servers import TlsFiles, make_tls_files

SECRET = "s3cr3t-Pa55@word"  # holds '@': it travels percent-encoded in the URL
SECRET_IN_URL = SECRET.replace("@", "%40")
USER = "flexkv"
SLOT = 4096
LAYOUT = {"model": "tiny-llama", "kv_dtype": "bfloat16", "block_size": 16, "tp_size": 1, "hash_algo": "sha256"}
TIMEOUT = 30


@pytest.fixture(scope="module")
def tls(tmp_path_factory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tls) -> Iterator[int]:
    """A redis-server that speaks only TLS (client certificates required) and knows one ACL user
    limited to FlexKV's keys; the default user is off. Yields the TLS port."""
    port = free_port()
    with Deployment(tmp_path_factory.mktemp("redis-tls")) as services:
        services.start("redis", [
            "redis-server", "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key),
            "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "yes",
            "--user", "default", "off",
            "--user", USER, "on", f">{SECRET}", "~flexkv/*", "+@all",
            "--save", "", "--appendonly", "no"])
        client = redis.Redis(port=port, username=USER, password=SECRET, ssl=True, ssl_ca_certs=str(tls.ca),
                             ssl_certfile=str(tls.client_cert), ssl_keyfile=str(tls.client_key))
        services.wait_for(client.ping, 20, "redis-server answering over TLS")
        yield port


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory) -> Iterator[int]:
    """A plain-TCP redis-server whose only user is the ACL user. Yields its port."""
    port = free_port()
    with Deployment(tmp_path_factory.mktemp("redis-acl")) as services:
        services.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                                 "--user", "default", "off", "--user", USER, "on", f">{SECRET}", "~flexkv/*", "+@all",
                                 "--save", "", "--appendonly", "no"])
        services.wait_for(redis.Redis(port=port, username=USER, password=SECRET).ping, 20, "redis-server answering")
        yield port


def settings_for(port: int, tls: TlsFiles, *, password: str = SECRET_IN_URL, ca=None, **more) -> FlexKVSettings:
    return FlexKVSettings(remote_store=f"rediss://{USER}:{password}@127.0.0.1:{port}/0", remote_timeout_s=2,
                          remote_tls_ca_file=str(ca or tls.ca), remote_tls_cert_file=str(tls.client_cert),
                          remote_tls_key_file=str(tls.client_key), **more)


def test_a_tier_over_tls_as_an_acl_user_round_trips_blocks(server, tls):
    tier = open_backend("rediss", LAYOUT, SLOT, settings_for(server, tls))
    pool = torch.randint(0, 256, (4, SLOT), dtype=torch.uint8)
    keys = [bytes([i]) * 32 for i in range(2)]
    try:
        assert tier.healthy
        assert tier.write(pool, [0, 1], [0, 1], keys).result(timeout=TIMEOUT).ok == [True, True]
        assert tier.lookup(keys).result(timeout=TIMEOUT) == [True, True]
        assert tier.read(pool, [0, 1], [2, 3], keys).result(timeout=TIMEOUT).ok == [True, True]
        assert torch.equal(pool[2:], pool[:2])
    finally:
        tier.close()


@pytest.mark.parametrize("fault", ["wrong password", "untrusted server certificate", "no client certificate"])
def test_a_refused_connection_is_one_start_up_line_or_a_degraded_start(server, tls, fault, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = {"wrong password": dict(password="not-the-" + SECRET_IN_URL),
             "untrusted server certificate": dict(ca=tls.other_ca),
             "no client certificate": {}}[fault]
    settings = settings_for(server, tls, **wrong).model_copy(update={"remote_start_degraded": False})
    if fault == "no client certificate":
        settings = settings.model_copy(update={"remote_tls_cert_file": None, "remote_tls_key_file": None})
    kind = "Redis refused the credentials" if fault == "wrong password" else "Redis unreachable"
    with pytest.raises(ConnectionError) as failed:
        open_backend("rediss", LAYOUT, SLOT, settings)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"remote_store rediss://{USER}:***@127.0.0.1:{server}/0: ")
    assert kind in message
    tier = open_backend("rediss", LAYOUT, SLOT, settings.model_copy(update={"remote_start_degraded": True}))
    try:
        assert not tier.healthy and kind in tier.degraded_reason
        assert tier.lookup([b"k" * 32]).result(timeout=TIMEOUT) == [False]
        seen = [message, tier.degraded_reason, tier.url, repr(tier.stats), caplog.text]
    finally:
        tier.close()
    for text in seen:
        assert SECRET not in text and SECRET_IN_URL not in text


@pytest.mark.parametrize("scheme", ["rediss", "redis"])
def test_the_password_is_never_shown_in_a_normal_run(scheme, request, tls, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    server = request.getfixturevalue("server" if scheme == "rediss" else "acl_server")
    monkeypatch.setenv("FLEXKV_REMOTE_STORE", f"{scheme}://{USER}:{SECRET_IN_URL}@127.0.0.1:{server}/0")
    files = {"remote_tls_ca_file": str(tls.ca), "remote_tls_cert_file": str(tls.client_cert),
             "remote_tls_key_file": str(tls.client_key)}
    settings = load_settings(files if scheme == "rediss" else {})  # logs every setting at DEBUG
    tier = open_backend(scheme, LAYOUT, SLOT, settings)
    pool = torch.zeros((2, SLOT), dtype=torch.uint8)
    try:
        tier.write(pool, [0], [0], [b"x" * 32]).result(timeout=TIMEOUT)
        tier.read(pool, [0], [1], [b"x" * 32]).result(timeout=TIMEOUT)
        seen = [caplog.text, tier.url, str(tier.degraded_reason), repr(tier.stats)]
    finally:
        tier.close()
    for text in seen:
        assert SECRET not in text and SECRET_IN_URL not in text
    assert f"{scheme}://{USER}:***@127.0.0.1:{server}/0" in caplog.text  # the start-up line names the store
    assert tier.stats.blocks_read == 1  # authenticated as the ACL user: the round trip worked
    address = tier.parse_url(settings.remote_store)
    assert SECRET_IN_URL not in str(address) + repr(address) and address.password == SECRET


def test_a_bad_store_url_never_echoes_its_password():
    from dynamo_flexkv.config import load_settings
    from dynamo_flexkv.tiers.preflight import preflight

    with pytest.raises(ConfigError) as failed:  # as the connector loads its settings at start-up
        load_settings({"remote_store": f"redis://{USER}:{SECRET_IN_URL}@127.0.0.1:notaport/0"}, environ={},
                      checks=preflight)
    assert SECRET_IN_URL not in str(failed.value) and f"redis://{USER}:***@127.0.0.1:notaport/0" in str(failed.value)


def test_tls_settings_need_a_tls_store(tls):
    settings = FlexKVSettings(remote_store=f"redis://127.0.0.1:{free_port()}/0", remote_tls_ca_file=str(tls.ca))
    with pytest.raises(ValueError, match=r"remote_tls_ca_file is set but remote_store=redis://127\.0\.0\.1:\d+/0 "
                                         r"is not TLS: use rediss://"):
        open_backend("redis", LAYOUT, SLOT, settings)
    settings = FlexKVSettings(remote_store=f"rediss://127.0.0.1:{free_port()}/0", remote_tls_cert_file=str(tls.ca))
    with pytest.raises(ValueError, match="remote_tls_cert_file and remote_tls_key_file go together"):
        open_backend("rediss", LAYOUT, SLOT, settings)
    settings = FlexKVSettings(remote_store=f"rediss://127.0.0.1:{free_port()}/0",
                              remote_tls_ca_file="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match=r"remote_tls_ca_file=/nonexistent/ca.pem is invalid: not a readable file"):
        open_backend("rediss", LAYOUT, SLOT, settings)
    settings = FlexKVSettings(remote_store=f"mooncake://127.0.0.1:{free_port()}", remote_tls_ca_file=str(tls.ca))
    with pytest.raises(ValueError, match=r"remote_tls_ca_file applies to Redis over TLS \(rediss://\) only"):
        open_backend("mooncake", LAYOUT, SLOT, settings)


@pytest.fixture(scope="module")
def plain_redis(tmp_path_factory) -> Iterator[str]:
    port = free_port()
    with Deployment(tmp_path_factory.mktemp("redis-plain")) as services:
        services.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(port),
                                 "--save", "", "--appendonly", "no"])
        services.wait_for(redis.Redis(port=port).ping, 20, "redis-server answering")
        yield f"redis://127.0.0.1:{port}/0"


@pytest.mark.engine
@pytest.mark.correctness("foreign value planted in the cluster store",
                         "same key: every prompt block loaded, tokens identical; other key: zero hits, every "
                         "value a miss, tokens identical to an engine without the connector")
def test_engines_sharing_a_mac_key_share_kv_and_others_recompute(tiny_model, plain_redis, reference, tmp_path):
    from dynamo_flexkv.devtools.harness import EngineHost
    from tests.helpers import BLOCK, COMPAT_CONFIG, ENGINE, random_prompt

    ours, theirs = tmp_path / "ours.key", tmp_path / "theirs.key"
    ours.write_text("one cluster's shared secret\n")
    theirs.write_text("another cluster's secret\n")
    rng = random.Random(7)
    prompts = [random_prompt(rng, 4 * BLOCK + 5) for _ in range(3)]
    expected = [c.token_ids for c in reference.generate(prompts, max_tokens=8, one_at_a_time=True)]

    def engine(key_file) -> EngineHost:
        env = {"FLEXKV_CPU_CACHE_GB": "0.001", "FLEXKV_REMOTE_STORE": plain_redis, "FLEXKV_REMOTE_TIMEOUT_S": "2",
               "FLEXKV_REMOTE_MAC_KEY_FILE": str(key_file)}
        return EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env)

    with engine(ours) as writer:
        assert [c.token_ids for c in writer.generate(prompts, max_tokens=8, one_at_a_time=True)] == expected
        assert writer.flexkv_state()["redis"]["blocks_written"] == 4 * len(prompts)
    with engine(ours) as peer:
        shared = peer.generate(prompts, max_tokens=8, one_at_a_time=True)
        shared_state = peer.flexkv_state()
    with engine(theirs) as stranger:  # last: what it recomputes overwrites the values under its own key
        foreign = stranger.generate(prompts, max_tokens=8, one_at_a_time=True)
        foreign_state = stranger.flexkv_state()
    assert [c.token_ids for c in foreign] == expected and [c.token_ids for c in shared] == expected
    assert foreign_state["engine_stats"]["hit_blocks"].get("REDIS", 0) == 0, foreign_state
    assert foreign_state["redis"]["corrupt_blocks"] >= 4, foreign_state
    assert shared_state["engine_stats"]["hit_blocks"]["REDIS"] == 4 * len(prompts), shared_state
    assert shared_state["redis"]["corrupt_blocks"] == 0, shared_state
