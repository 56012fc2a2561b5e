"""`remote_store` URL grammar per backend (`parse_url`, `parse_store_url`), password redaction, and
the value framing's MAC (pure logic: no server)."""

from __future__ import annotations

import numpy as np
import pytest

from dynamo_flexkv.logs import redact_url
from dynamo_flexkv.storage.backend import parse_store_url
from dynamo_flexkv.storage.remote.common import HEADER_BYTES, Framing
from dynamo_flexkv.storage.remote.integrity import ValueMac
from dynamo_flexkv.storage.remote.mooncake import MooncakeAddress
from dynamo_flexkv.storage.remote.redis import RedisAddress


def test_redis_urls_parse_to_typed_settings():
    parsed = parse_store_url("rediss://alice:p%40ss%3Aw%2Fd@cache.local:6380/3")
    assert parsed == RedisAddress("rediss://alice:p%40ss%3Aw%2Fd@cache.local:6380/3", "cache.local", 6380, 3,
                                  tls=True, username="alice", password="p@ss:w/d")
    assert str(parsed) == "rediss://alice:***@cache.local:6380/3" and "p@ss" not in repr(parsed)
    assert parse_store_url("redis://:legacy-pass@10.0.0.5:6379") == RedisAddress(
        "redis://:legacy-pass@10.0.0.5:6379", "10.0.0.5", 6379, 0, tls=False, username=None, password="legacy-pass")
    assert parse_store_url("REDIS://h:1/0").tls is False


def test_mooncake_urls_parse_to_the_master_address():
    assert parse_store_url("mooncake://10.0.0.5:50051") == MooncakeAddress("10.0.0.5", 50051)
    assert parse_store_url("mooncake://10.0.0.5:50051").master == "10.0.0.5:50051"


@pytest.mark.parametrize(("url", "why"), [
    ("redis://h", "host and port are required"),
    ("redis://u:topsecret@h:port/0", "the port must be a number 1-65535"),
    ("redis://h:70000", "the port must be a number 1-65535"),
    ("redis://h:1/db0", "the Redis db must be a number, got /db0"),
    ("rediss://u:topsecret@h:1/0?ssl_cert_reqs=none", "no ?query or #fragment"),
    ("mooncake://u:topsecret@h:1", "a Mooncake master takes no user or password"),
    ("mooncake://h:1/x", "a mooncake:// address has no path"),
])
def test_a_bad_url_is_one_line_naming_the_setting_and_the_form_never_the_password(url, why):
    with pytest.raises(ValueError) as failed:
        parse_store_url(url)
    message = str(failed.value)
    assert message.startswith(f"remote_store={redact_url(url)} is invalid: {why}; expected ")
    assert ("redis://[user:password@]host:port[/db]" if url.startswith("redis") else "mooncake://host:port") in message
    assert "topsecret" not in message and "\n" not in message


@pytest.mark.parametrize("url", ["http://h:1", "ssd://h:1", "h:6379", "", None])
def test_an_unknown_scheme_lists_the_registered_store_schemes(url):
    with pytest.raises(ValueError, match=r"^remote_store=.* is invalid: unknown scheme; registered store "
                                         r"schemes: mooncake://, redis://, rediss://$"):
        parse_store_url(url)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://u:s@h:1/0", "redis://u:***@h:1/0"),
    ("rediss://:s@h:1", "rediss://:***@h:1"),
    ("redis://u:a/b?c@d@h:1", "redis://u:***@h:1"),  # unencoded '/', '?' and '@' in the password
    ("redis://u@h:1", "redis://u@h:1"),
    ("mooncake://h:1", "mooncake://h:1"),
])
def test_redaction_hides_only_the_password(url, shown):
    assert redact_url(url) == shown


SLOT = 4096


@pytest.fixture
def data() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, SLOT, dtype=np.uint8)


def test_a_maced_value_verifies_only_for_its_own_key_namespace_and_bytes(data):
    mac = ValueMac(b"0123456789abcdef-shared")
    framing = Framing({"model": "a"}, SLOT, mac)
    header = framing.header(b"k" * 32, data)
    assert len(header) == HEADER_BYTES and framing.verify(header, b"k" * 32, data)
    assert not framing.verify(header, b"j" * 32, data)  # replayed under another block's name
    assert not Framing({"model": "b"}, SLOT, mac).verify(header, b"k" * 32, data)  # another layout
    assert not Framing({"model": "a"}, SLOT, ValueMac(b"another-cluster-secret")).verify(header, b"k" * 32, data)
    assert not Framing({"model": "a"}, SLOT).verify(header, b"k" * 32, data)  # a reader without the key
    altered = data.copy()
    altered[SLOT // 2] ^= 1
    assert not framing.verify(header, b"k" * 32, altered)
    for offset in (0, 20, 40, HEADER_BYTES - 1):  # magic, checksum field, key, tag
        forged = bytearray(header)
        forged[offset] ^= 1
        assert not framing.verify(bytes(forged), b"k" * 32, data), offset


def test_a_checksummed_value_is_rejected_by_a_mac_reader(data):
    plain = Framing({"model": "a"}, SLOT)
    header = plain.header(b"k" * 32, data)
    assert plain.verify(header, b"k" * 32, data)
    assert not Framing({"model": "a"}, SLOT, ValueMac(b"0123456789abcdef")).verify(header, b"k" * 32, data)


def test_the_mac_secret_comes_from_a_file_and_must_not_be_trivial(tmp_path):
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    with pytest.raises(ValueError, match=f"remote_mac_key_file={short} is invalid: the secret must be at least 16"):
        ValueMac.from_file(str(short))
    with pytest.raises(ValueError, match="remote_mac_key_file=.*missing is invalid: cannot read it"):
        ValueMac.from_file(str(tmp_path / "missing"))
    good = tmp_path / "key"
    good.write_text("a secret of enough bytes\n")
    assert ValueMac.from_file(str(good)).tag(b"h", b"d") == ValueMac(b"a secret of enough bytes").tag(b"h", b"d")
