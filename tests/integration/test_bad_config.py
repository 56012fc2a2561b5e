"""Bad FlexKV settings stop a real engine at start-up with one clear line, before vLLM allocates its
KV cache (the worker-role connector is built before `initialize_kv_cache`)."""

from __future__ import annotations

import re

import pytest

from dynamo_flexkv.devtools.harness import EngineError, EngineHost
from tests.helpers import COMPAT_CONFIG, ENGINE

pytestmark = pytest.mark.engine


def start_failure(tiny_model: str, env: dict[str, str]) -> str:
    with pytest.raises(EngineError) as failure:
        EngineHost(tiny_model, {**ENGINE, "kv_transfer_config": COMPAT_CONFIG}, env=env).close()
    return str(failure.value)


def assert_before_kv_cache_allocation(trace: str) -> None:
    """The failing stack passes through vLLM's connector set-up, never its cache allocation."""
    functions = re.findall(r", in (\w+)\n", trace)
    assert "ensure_kv_transfer_initialized" in functions
    assert "initialize_kv_cache" not in functions


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("FLEXKV_CPU_CACHE_GB", "-1", ["FLEXKV_CPU_CACHE_GB='-1'", "at least one 4 KiB page"]),
        ("FLEXKV_CPU_CACHE_GB", "1e-9", ["FLEXKV_CPU_CACHE_GB='1e-9'", "at least one 4 KiB page"]),
        ("FLEXKV_CPU_CACHE_GB", "0.00001", ["cpu_cache_gb (FLEXKV_CPU_CACHE_GB)", "holds no KV block"]),
        ("FLEXKV_ENABLE_GDS", "1", ["FLEXKV_ENABLE_GDS='1'", "GPUDirect Storage is not supported"]),
        ("FLEXKV_EVICTION_POLICY", "random", ["FLEXKV_EVICTION_POLICY='random'", "lru, lfu, fifo, mru, slru, filo"]),
    ],
)
def test_bad_env_setting_fails_before_allocation(tiny_model, setting, value, expected):
    trace = start_failure(tiny_model, {setting: value})
    for text in expected:
        assert text in trace
    assert_before_kv_cache_allocation(trace)


def test_unknown_yaml_key_fails_before_allocation(tiny_model, tmp_path):
    config = tmp_path / "flexkv.yml"
    config.write_text("cpu_cache_gb: 0.25\ncpu_cache_size: 4\n")
    trace = start_failure(tiny_model, {"FLEXKV_CONFIG_PATH": str(config)})
    assert "cpu_cache_size" in trace and str(config) in trace and "allowed" in trace
    assert_before_kv_cache_allocation(trace)


def test_unreadable_config_file_fails_before_allocation(tiny_model, tmp_path):
    missing = tmp_path / "absent.yml"
    trace = start_failure(tiny_model, {"FLEXKV_CONFIG_PATH": str(missing)})
    assert "FLEXKV_CONFIG_PATH" in trace and str(missing) in trace
    assert_before_kv_cache_allocation(trace)
