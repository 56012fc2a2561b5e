"""Start-up checks of the settings against the machine (tiers/preflight.py): the SSD tier's directories,
free space and I/O engine, the cluster store's URL. Each problem is one line naming the setting as the
user wrote it, as `load_settings(checks=preflight)` reports it in the connector's constructor."""

from __future__ import annotations

import os
import shutil

import pytest

from dynamo_flexkv.config import GIB, ConfigError, load_settings
from dynamo_flexkv.tiers.preflight import preflight


def load(env=None, overrides=None):
    return load_settings(overrides, environ=env or {}, checks=preflight)


def expect_error(env=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load(env, overrides)
    assert len(info.value.problems) == 1, str(info.value)
    return str(info.value)


def test_ssd_dir_must_exist_and_be_a_directory(tmp_path):
    good, missing, afile = tmp_path / "good", tmp_path / "missing", tmp_path / "afile"
    good.mkdir()
    afile.write_text("x")
    raw = f"{good};{missing}"
    msg = expect_error({"FLEXKV_SSD_CACHE_GB": "0.01", "FLEXKV_SSD_CACHE_DIR": raw})
    assert msg == f"FLEXKV_SSD_CACHE_DIR={raw!r} is invalid: {missing} does not exist"
    msg = expect_error(overrides={"ssd_cache_gb": 0.01, "ssd_cache_dir": [str(afile)]})
    assert msg == (f"kv_connector_extra_config.ssd_cache_dir=[{str(afile)!r}] is invalid: "
                   f"{afile} is not a directory")


def test_ssd_dir_must_be_writable(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(d)
                        else real_access(p, mode))
    msg = expect_error({"FLEXKV_SSD_CACHE_GB": "0.01", "FLEXKV_SSD_CACHE_DIR": str(d)})
    assert msg == f"FLEXKV_SSD_CACHE_DIR={str(d)!r} is invalid: {d} is not writable"


def test_ssd_size_must_fit_in_free_space(tmp_path):
    msg = expect_error({"FLEXKV_SSD_CACHE_GB": "1e9", "FLEXKV_SSD_CACHE_DIR": str(tmp_path)})
    free = shutil.disk_usage(tmp_path).free / GIB
    assert msg.startswith("FLEXKV_SSD_CACHE_GB='1e9' is invalid: only ")
    assert f"GiB is free in FLEXKV_SSD_CACHE_DIR ({tmp_path}: {free:.1f} GiB)" in msg


def test_free_space_of_a_shared_filesystem_counts_once(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10 * GIB))
    dirs = [str(a), str(b)]
    assert load(overrides={"ssd_cache_gb": 9, "ssd_cache_dir": dirs}).ssd_cache_gb == 9
    msg = expect_error(overrides={"ssd_cache_gb": 15, "ssd_cache_dir": dirs})
    assert "only 10.0 GiB is free in kv_connector_extra_config.ssd_cache_dir" in msg
    assert "a shared filesystem counts once" in msg


def test_without_checks_the_settings_only_validate(tmp_path):
    """config.py looks at nothing outside the values: a missing directory is the SSD tier's problem."""
    missing = tmp_path / "missing"
    settings = load_settings({"ssd_cache_gb": 0.01, "ssd_cache_dir": [str(missing)]}, environ={})
    assert settings.ssd_cache_dir == (str(missing),)
    assert preflight(settings) == [("ssd_cache_dir", f"{missing} does not exist")]


@pytest.mark.parametrize(("raw", "reason"), [
    ("http://h:1", "unknown scheme; registered store schemes: mooncake://, redis://, rediss://"),
    ("redis://h", "host and port are required; expected redis://[user:password@]host:port[/db]"),
    ("redis://h:70000", "the port must be a number 1-65535"),
    ("redis://h:6379/x", "the Redis db must be a number"),
    ("mooncake://h:1/x", "has no path"),
])
def test_a_store_url_the_registry_cannot_open_is_one_line(raw, reason):
    msg = expect_error({"FLEXKV_REMOTE_STORE": raw})
    assert msg.startswith(f"FLEXKV_REMOTE_STORE='{raw}' is invalid: ") and reason in msg
    assert msg.count("is invalid") == 1


def test_known_store_urls_pass():
    for url in ("redis://cache:6379/2", "redis://cache:6379", "mooncake://master:50051"):
        assert load({"FLEXKV_REMOTE_STORE": url}).remote_store == url


def test_the_uring_engine_is_checked_where_it_would_run(monkeypatch):
    from dynamo_flexkv.storage.ssd import preflight as ssd_preflight

    monkeypatch.setattr(ssd_preflight, "uring_available", lambda: (False, "no ring here"))
    msg = expect_error({"FLEXKV_SSD_IO_ENGINE": "uring"})
    assert msg == "FLEXKV_SSD_IO_ENGINE='uring' is invalid: the io_uring engine cannot run here: no ring here"
