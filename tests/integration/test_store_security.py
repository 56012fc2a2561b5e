"""The Redis cluster tier's connection security against a real redis-server started by the test:
TLS (`rediss://`, a throwaway CA, server and client certificates), an ACL user
(`redis://user:password@...`), and the password never shown in a log line, an error or a tier's name.
A wrong password or an untrusted certificate is one start-up error line, or a degraded start."""

from __future__ import annotations

import logging
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
    settings = settings_for(server, tls, **wrong)
    if fault == "no client certificate":
        settings = settings.model_copy(update={"remote_tls_cert_file": None, "remote_tls_key_file": None})
    with pytest.raises(ConnectionError) as failed:
        open_backend("rediss", LAYOUT, SLOT, settings)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"remote_store rediss://{USER}:***@127.0.0.1:{server}/0: ")
    assert ("Redis refused the credentials" if fault == "wrong password" else "Redis unreachable") in message
    tier = open_backend("rediss", LAYOUT, SLOT, settings.model_copy(update={"remote_start_degraded": True}))
    try:
        assert not tier.healthy and tier.degraded_reason.startswith("unreachable at start-up")
        assert tier.lookup([b"k" * 32]).result(timeout=TIMEOUT) == [False]
        seen = [message, tier.degraded_reason, tier.url, repr(tier.stats), caplog.text]
    finally:
        tier.close()
    for text in seen:
        assert SECRET not in text and SECRET_IN_URL not in text


def test_the_password_is_never_shown_in_a_normal_run(server, tls, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("FLEXKV_REMOTE_STORE", f"rediss://{USER}:{SECRET_IN_URL}@127.0.0.1:{server}/0")
    settings = load_settings({"remote_tls_ca_file": str(tls.ca), "remote_tls_cert_file": str(tls.client_cert),
                              "remote_tls_key_file": str(tls.client_key)})  # logs every setting at DEBUG
    tier = open_backend("rediss", LAYOUT, SLOT, settings)
    pool = torch.zeros((2, SLOT), dtype=torch.uint8)
    try:
        tier.write(pool, [0], [0], [b"x" * 32]).result(timeout=TIMEOUT)
        tier.read(pool, [0], [1], [b"x" * 32]).result(timeout=TIMEOUT)
        seen = [caplog.text, tier.url, tier._health.name, repr(tier.stats), str(tier.parse_url(settings.remote_store)),
                repr(tier.parse_url(settings.remote_store))]
    finally:
        tier.close()
    assert f"rediss://{USER}:***@127.0.0.1:{server}/0" in caplog.text  # the start-up line names the store
    for text in seen:
        assert SECRET not in text and SECRET_IN_URL not in text


def test_a_bad_store_url_never_echoes_its_password():
    with pytest.raises(ConfigError) as failed:
        FlexKVSettings(remote_store=f"redis://{USER}:{SECRET_IN_URL}@127.0.0.1:notaport/0")
    assert SECRET_IN_URL not in str(failed.value) and f"redis://{USER}:***@127.0.0.1:notaport/0" in str(failed.value)


def test_tls_settings_need_a_tls_store(tls):
    settings = FlexKVSettings(remote_store=f"redis://127.0.0.1:{free_port()}/0", remote_tls_ca_file=str(tls.ca))
    with pytest.raises(ValueError, match=r"remote_tls_ca_file is set but remote_store=redis://127\.0\.0\.1:\d+/0 "
                                         r"is not TLS: use rediss://"):
        open_backend("redis", LAYOUT, SLOT, settings)
    settings = FlexKVSettings(remote_store=f"rediss://127.0.0.1:{free_port()}/0", remote_tls_cert_file=str(tls.ca))
    with pytest.raises(ValueError, match="remote_tls_cert_file and remote_tls_key_file go together"):
        open_backend("rediss", LAYOUT, SLOT, settings)
    settings = FlexKVSettings(remote_store=f"mooncake://127.0.0.1:{free_port()}", remote_tls_ca_file=str(tls.ca))
    with pytest.raises(ValueError, match=r"remote_tls_ca_file applies to Redis over TLS \(rediss://\) only"):
        open_backend("mooncake", LAYOUT, SLOT, settings)
