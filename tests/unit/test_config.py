"""Tests for dynamo_flexkv.config: sources, precedence, errors and the generated docs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from pydantic import ValidationError

from dynamo_flexkv import config
from dynamo_flexkv.config import (
    GIB,
    SETTING_NAMES,
    ConfigError,
    FlexKVSettings,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "configuration.md"
GEN = ROOT / "scripts" / "gen_config_docs.py"
ALL_KEYS = ", ".join(SETTING_NAMES)


def settings_table_markdown() -> str:
    """The table scripts/gen_config_docs.py renders (the renderer lives with the script, not the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_config_docs", GEN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.settings_table_markdown()


def load(env=None, overrides=None):
    return load_settings(overrides, environ=env or {})


def expect_error(env=None, overrides=None, *, lines=1) -> str:
    """Load, expect ConfigError, check it is clean one-line-per-problem text; return message."""
    with pytest.raises(ConfigError) as info:
        load(env, overrides)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "validation error" not in msg.lower() and "pydantic" not in msg
    assert "Value error," not in msg and "input_type" not in msg
    assert msg.splitlines() == info.value.problems
    assert len(info.value.problems) == lines, msg
    return msg


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- defaults ------------------------------------------------------------------------------------


def test_defaults():
    s = load()
    assert s.cpu_cache_gb == 1.0 and s.cpu_cache_bytes == GIB
    assert s.eviction_policy == "lru"
    assert s.server_recv_port is None
    assert s.log_level == "INFO"
    assert s.enable_metrics is True
    assert s.ssd_cache_gb == 0 and s.ssd_cache_dir == () and not s.ssd_enabled
    assert (s.ssd_io_threads, s.ssd_queue_depth) == (8, 32)
    assert s.remote_store is None and s.remote_cache_gb == 0 and not s.remote_enabled
    assert s == FlexKVSettings()


def test_environ_defaults_to_process_environment(monkeypatch):
    monkeypatch.setenv("FLEXKV_CPU_CACHE_GB", "0.5")
    monkeypatch.delenv("FLEXKV_CONFIG_PATH", raising=False)
    assert load_settings().cpu_cache_gb == 0.5


def test_settings_are_frozen_and_hashable():
    s = load()
    with pytest.raises(ValidationError):
        s.cpu_cache_gb = 2.0  # type: ignore[misc]
    assert hash(s) == hash(load())


# ---- environment variables -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "raw", "field", "expected"),
    [
        ("FLEXKV_CPU_CACHE_GB", "0.25", "cpu_cache_gb", 0.25),
        ("FLEXKV_CPU_CACHE_GB", " 3 ", "cpu_cache_gb", 3.0),
        ("FLEXKV_EVICTION_POLICY", "SLRU", "eviction_policy", "slru"),
        ("FLEXKV_EVICTION_POLICY", "filo", "eviction_policy", "filo"),
        ("FLEXKV_LOG_LEVEL", "debug", "log_level", "DEBUG"),
        ("FLEXKV_LOG_LEVEL", "Warning", "log_level", "WARNING"),
        ("FLEXKV_SERVER_RECV_PORT", "ipc:///tmp/flexkv_server", "server_recv_port",
         "ipc:///tmp/flexkv_server"),
        ("FLEXKV_SERVER_RECV_PORT", "tcp://10.0.0.1:5555", "server_recv_port",
         "tcp://10.0.0.1:5555"),
        ("FLEXKV_SSD_IO_THREADS", "16", "ssd_io_threads", 16),
        ("FLEXKV_SSD_QUEUE_DEPTH", "1024", "ssd_queue_depth", 1024),
        ("FLEXKV_REMOTE_STORE", "redis://cache:6379/2", "remote_store", "redis://cache:6379/2"),
        ("FLEXKV_REMOTE_STORE", "mooncake://master:50051", "remote_store",
         "mooncake://master:50051"),
        ("FLEXKV_CUDA_ISSUE", "thread", "cuda_issue", "thread"),
    ],
)
def test_env_var_sets_field(var, raw, field, expected):
    assert getattr(load({var: raw}), field) == expected


def test_cuda_issue_values_are_the_copiers():
    from typing import get_args

    from dynamo_flexkv.transfer.cuda.copier import ISSUE_MODES, METHODS

    assert get_args(config.CudaIssue) == ISSUE_MODES
    assert get_args(config.CudaCopyMethod) == ("auto", *METHODS)
    with pytest.raises(ValueError, match="FLEXKV_CUDA_ISSUE.*caller"):
        load({"FLEXKV_CUDA_ISSUE": "later"})


@pytest.mark.parametrize(("raw", "expected"), [
    ("0", False), ("1", True), ("true", True), ("false", False), ("False", False),
    ("no", False), ("on", True),
])
def test_enable_metrics_env_booleans(raw, expected):
    assert load({"FLEXKV_ENABLE_METRICS": raw}).enable_metrics is expected


def test_ssd_cache_dir_semicolon_separated(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    s = load({"FLEXKV_SSD_CACHE_GB": "0.001", "FLEXKV_SSD_CACHE_DIR": f" {a} ;{b};"})
    assert s.ssd_cache_dir == (str(a), str(b))
    assert s.ssd_enabled and s.ssd_cache_bytes == int(0.001 * GIB)


def test_ssd_cache_dir_relative_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load({"FLEXKV_SSD_CACHE_DIR": "x;y"}).ssd_cache_dir == (
        str(tmp_path / "x"), str(tmp_path / "y"))


def test_empty_env_vars_count_as_unset():
    s = load({"FLEXKV_CPU_CACHE_GB": "", "FLEXKV_EVICTION_POLICY": "  ", "FLEXKV_CONFIG_PATH": ""})
    assert (s.cpu_cache_gb, s.eviction_policy) == (1.0, "lru")


def test_other_flexkv_env_vars_are_ignored():
    s = load({"FLEXKV_INSTANCE_NUM": "2", "FLEXKV_MASTER_HOST": "x", "DYNAMO_USE_FLEXKV": "1",
              "FLEXKV_CPU_CACHE_GB": "2"})
    assert s.cpu_cache_gb == 2.0


# ---- config file ---------------------------------------------------------------------------------


def test_yaml_file(tmp_path):
    d = tmp_path / "ssd"
    d.mkdir()
    path = write(tmp_path / "flexkv.yml",
                 f"cpu_cache_gb: 32\nssd_cache_gb: 0.01\nssd_cache_dir:\n  - {d}\n"
                 "enable_gds: off\neviction_policy: LFU\nenable_metrics: no\n")
    s = load({"FLEXKV_CONFIG_PATH": path})
    assert (s.cpu_cache_gb, s.ssd_cache_gb, s.ssd_cache_dir) == (32.0, 0.01, (str(d),))
    assert (s.eviction_policy, s.enable_metrics) == ("lfu", False)


def test_yaml_file_semicolon_string_dirs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    path = write(tmp_path / "c.yaml", f"ssd_cache_gb: 0.01\nssd_cache_dir: {a}/;{b}/\n")
    assert load({"FLEXKV_CONFIG_PATH": path}).ssd_cache_dir == (str(a), str(b))


def test_json_file(tmp_path):
    path = write(tmp_path / "c.json", json.dumps({"cpu_cache_gb": 0.5, "log_level": "error",
                                                  "ssd_io_threads": 4}))
    s = load({"FLEXKV_CONFIG_PATH": path})
    assert (s.cpu_cache_gb, s.log_level, s.ssd_io_threads) == (0.5, "ERROR", 4)


def test_empty_file_means_no_keys(tmp_path):
    path = write(tmp_path / "c.yaml", "# nothing here\n")
    assert load({"FLEXKV_CONFIG_PATH": path, "FLEXKV_CPU_CACHE_GB": "3"}).cpu_cache_gb == 3.0


def test_file_wins_over_env_key_by_key(tmp_path):
    path = write(tmp_path / "c.yaml", "cpu_cache_gb: 8\n")
    s = load({"FLEXKV_CONFIG_PATH": path, "FLEXKV_CPU_CACHE_GB": "2",
              "FLEXKV_EVICTION_POLICY": "mru"})
    assert s.cpu_cache_gb == 8.0  # the file wins where both set a key
    assert s.eviction_policy == "mru"  # env still applies to keys the file does not set


def test_file_shadowing_env_is_logged(tmp_path, caplog):
    path = write(tmp_path / "c.yaml", "cpu_cache_gb: 8\n")
    with caplog.at_level(logging.INFO, logger="dynamo_flexkv.config"):
        load({"FLEXKV_CONFIG_PATH": path, "FLEXKV_CPU_CACHE_GB": "2"})
    assert f"FLEXKV_CPU_CACHE_GB is overridden by cpu_cache_gb in {path}" in caplog.text


# ---- overrides and full precedence ---------------------------------------------------------------


def test_overrides_alone():
    s = load(overrides={"cpu_cache_gb": 0.5, "enable_metrics": False,
                        "ssd_cache_dir": ["/nonexistent/but/unused"]})
    assert (s.cpu_cache_gb, s.enable_metrics) == (0.5, False)
    assert s.ssd_cache_dir == ("/nonexistent/but/unused",)  # not checked while the tier is off


def test_precedence_defaults_env_file_overrides(tmp_path):
    path = write(tmp_path / "c.yaml", "cpu_cache_gb: 3\neviction_policy: fifo\n")
    env = {"FLEXKV_CONFIG_PATH": path, "FLEXKV_CPU_CACHE_GB": "2",
           "FLEXKV_EVICTION_POLICY": "lfu", "FLEXKV_LOG_LEVEL": "debug"}
    s = load(env, overrides={"cpu_cache_gb": 4})
    assert s.cpu_cache_gb == 4.0  # override > file > env
    assert s.eviction_policy == "fifo"  # file > env
    assert s.log_level == "DEBUG"  # env > default
    assert s.ssd_io_threads == 8  # default


def test_override_fixes_bad_lower_source(tmp_path):
    # A value overridden by a higher source is never used, so it is not an error.
    path = write(tmp_path / "c.yaml", "cpu_cache_gb: -1\n")
    assert load({"FLEXKV_CONFIG_PATH": path}, {"cpu_cache_gb": 1}).cpu_cache_gb == 1.0


# ---- errors --------------------------------------------------------------------------------------


def test_unknown_eviction_policy_message():
    msg = expect_error({"FLEXKV_EVICTION_POLICY": "random"})
    assert msg == ("FLEXKV_EVICTION_POLICY='random' is invalid: allowed values are "
                   "lru, lfu, fifo, mru, slru, filo")


Source = namedtuple("Source", "env overrides label")


@pytest.fixture(params=["env", "file", "override"])
def cpu_source(request, tmp_path):
    """Build (env, overrides, label-prefix) that set cpu_cache_gb to VALUE from one source."""

    def make(value):
        if request.param == "env":
            return Source({"FLEXKV_CPU_CACHE_GB": str(value)}, None,
                          f"FLEXKV_CPU_CACHE_GB='{value}'")
        if request.param == "file":
            path = write(tmp_path / "c.yaml", f"cpu_cache_gb: {value}\n")
            return Source({"FLEXKV_CONFIG_PATH": path}, None,
                          f"cpu_cache_gb={value} in {path} (FLEXKV_CONFIG_PATH)")
        return Source({}, {"cpu_cache_gb": value}, f"kv_connector_extra_config.cpu_cache_gb={value}")

    return make


@pytest.mark.parametrize("value", [-1, 0])
def test_non_positive_cpu_cache_names_setting_and_source(cpu_source, value):
    src = cpu_source(value)
    msg = expect_error(src.env, src.overrides)
    assert msg == f"{src.label} is invalid: expected a number of GiB, at least one 4 KiB page (0.0000039); fractions such as 0.25 allowed"


@pytest.mark.parametrize("raw", ["inf", "nan", "lots", "1GB"])
def test_cpu_cache_not_a_finite_number(raw):
    msg = expect_error({"FLEXKV_CPU_CACHE_GB": raw})
    assert msg.startswith(f"FLEXKV_CPU_CACHE_GB='{raw}' is invalid: expected a number of GiB, at least")


def test_boolean_is_not_a_size():
    msg = expect_error(overrides={"cpu_cache_gb": True})
    assert msg.startswith("kv_connector_extra_config.cpu_cache_gb=True is invalid: expected a number")


@pytest.mark.parametrize(("var", "raw", "allowed"), [
    ("FLEXKV_SSD_CACHE_GB", "-0.5", "expected a number >= 0"),
    ("FLEXKV_REMOTE_CACHE_GB", "-1", "expected a number >= 0"),
    ("FLEXKV_LOG_LEVEL", "verbose", "allowed values are DEBUG, INFO, WARNING, ERROR"),
    ("FLEXKV_ENABLE_METRICS", "maybe", "expected true or false"),
    ("FLEXKV_ENABLE_GDS", "true", "GPUDirect Storage is not supported"),
    ("FLEXKV_SSD_IO_ENGINE", "aio", "allowed values are auto, threads, uring"),
    ("FLEXKV_SSD_IO_THREADS", "0", "expected an integer from 1 to 256"),
    ("FLEXKV_SSD_IO_THREADS", "257", "expected an integer from 1 to 256"),
    ("FLEXKV_SSD_IO_THREADS", "2.5", "expected an integer from 1 to 256"),
    ("FLEXKV_SSD_QUEUE_DEPTH", "2000", "expected an integer from 1 to 1024"),
    ("FLEXKV_SERVER_RECV_PORT", "/tmp/flexkv", "starting with ipc:// or tcp://"),
    ("FLEXKV_SERVER_RECV_PORT", "ipc://", "starting with ipc:// or tcp://"),
    ("FLEXKV_SERVER_RECV_PORT", "tcp://host", "tcp://host:port"),
    ("FLEXKV_REMOTE_STORE", "redis//h:1", "expected scheme://host:port"),
    ("FLEXKV_CUDA_COPY_METHOD", "fast", "allowed values are auto, staged, batch, zerocopy, torch"),
    ("FLEXKV_CUDA_BATCH_MEMCPY", "sometimes", "expected true or false"),
])
def test_env_value_errors_name_setting_value_and_allowed(var, raw, allowed):
    msg = expect_error({var: raw})
    assert msg.startswith(f"{var}='{raw}' is invalid: ")
    assert allowed in msg


def test_remote_cache_needs_remote_store():
    msg = expect_error(overrides={"remote_cache_gb": 2})
    assert msg == ("kv_connector_extra_config.remote_cache_gb=2 is invalid: the remote tier "
                   "needs kv_connector_extra_config.remote_store")
    assert load(overrides={"remote_cache_gb": 2, "remote_store": "redis://h:1"}).remote_enabled


def test_several_problems_one_line_each():
    msg = expect_error({"FLEXKV_CPU_CACHE_GB": "-1", "FLEXKV_EVICTION_POLICY": "x"},
                       {"ssd_io_threads": 0, "bogus": 1}, lines=4)
    assert "unknown key 'bogus' in kv_connector_extra_config" in msg
    assert "FLEXKV_CPU_CACHE_GB='-1'" in msg and "FLEXKV_EVICTION_POLICY='x'" in msg
    assert "kv_connector_extra_config.ssd_io_threads=0" in msg


def test_unknown_override_key_lists_allowed_keys():
    msg = expect_error(overrides={"cpu_cache_size": 1})
    assert msg.startswith("unknown key 'cpu_cache_size' in kv_connector_extra_config")
    assert "did you mean 'cpu_cache_gb'?" in msg
    assert msg.endswith(f"(allowed keys are {ALL_KEYS})")


def test_unknown_yaml_key_lists_allowed_keys(tmp_path):
    path = write(tmp_path / "c.yaml", "cpu_cache_gb: 2\nnum_log_interval_requests: 200\n")
    msg = expect_error({"FLEXKV_CONFIG_PATH": path})
    assert msg == (f"unknown key 'num_log_interval_requests' in {path} (FLEXKV_CONFIG_PATH) "
                   f"(allowed keys are {ALL_KEYS})")


def test_env_style_key_in_file_gets_a_hint(tmp_path):
    path = write(tmp_path / "c.yaml", "FLEXKV_CPU_CACHE_GB: 2\n")
    assert "did you mean 'cpu_cache_gb'?" in expect_error({"FLEXKV_CONFIG_PATH": path})


def test_bad_value_in_file_names_key_and_path(tmp_path):
    path = write(tmp_path / "c.yaml", "eviction_policy: random\n")
    msg = expect_error({"FLEXKV_CONFIG_PATH": path})
    assert msg == (f"eviction_policy='random' in {path} (FLEXKV_CONFIG_PATH) is invalid: "
                   "allowed values are lru, lfu, fifo, mru, slru, filo")


def test_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    msg = expect_error({"FLEXKV_CONFIG_PATH": path})
    assert msg == f"FLEXKV_CONFIG_PATH={path!r}: cannot read the config file: No such file or directory"


def test_unreadable_config_file(tmp_path):
    msg = expect_error({"FLEXKV_CONFIG_PATH": str(tmp_path)})  # a directory cannot be read
    assert msg.startswith(f"FLEXKV_CONFIG_PATH={str(tmp_path)!r}: cannot read the config file")
    binary = tmp_path / "c.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    assert "is not UTF-8 text" in expect_error({"FLEXKV_CONFIG_PATH": str(binary)})


def test_bad_yaml(tmp_path):
    path = write(tmp_path / "c.yaml", "cpu_cache_gb: 1\nssd_cache_dir: [a, b\n")
    msg = expect_error({"FLEXKV_CONFIG_PATH": path})
    assert msg.startswith(f"FLEXKV_CONFIG_PATH={path!r}: invalid YAML at line ")


def test_bad_json(tmp_path):
    path = write(tmp_path / "c.json", '{"cpu_cache_gb": 1,}')
    msg = expect_error({"FLEXKV_CONFIG_PATH": path})
    assert msg.startswith(f"FLEXKV_CONFIG_PATH={path!r}: invalid JSON at line 1, column ")


def test_file_must_hold_a_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "- cpu_cache_gb\n")
    assert "must hold a mapping of setting names to values, not a list" in expect_error(
        {"FLEXKV_CONFIG_PATH": path})


# ---- SSD tier checks -----------------------------------------------------------------------------


def test_ssd_size_without_dir():
    msg = expect_error({"FLEXKV_SSD_CACHE_GB": "10"})
    assert msg == ("FLEXKV_SSD_CACHE_GB='10' is invalid: the SSD tier needs at least one directory "
                   "in FLEXKV_SSD_CACHE_DIR")


def test_ssd_dirs_without_size_are_fine():
    s = load({"FLEXKV_SSD_CACHE_DIR": "/does/not/exist"})
    assert not s.ssd_enabled and s.ssd_cache_dir == ("/does/not/exist",)


def test_ssd_dir_listed_twice(tmp_path):
    msg = expect_error({"FLEXKV_SSD_CACHE_DIR": f"{tmp_path};{tmp_path}/"})
    assert f"is invalid: lists {tmp_path} more than once" in msg


def test_validation_allocates_nothing():
    # A petabyte-sized CPU tier validates instantly: sizes are only recorded, never allocated.
    assert load({"FLEXKV_CPU_CACHE_GB": "1e6"}).cpu_cache_bytes == int(1e6 * GIB)


# ---- direct construction -------------------------------------------------------------------------


def test_direct_construction_raises_config_error():
    with pytest.raises(ConfigError) as info:
        FlexKVSettings(cpu_cache_gb=-1)
    assert str(info.value).startswith("cpu_cache_gb=-1 is invalid: expected a number of GiB, at least")
    with pytest.raises(ConfigError, match=r"^cpu_cache_gb=0 is invalid"):
        FlexKVSettings.model_validate({"cpu_cache_gb": 0})
    with pytest.raises(ConfigError, match=r"unknown setting 'cpu_cache_gbb'; did you mean"):
        FlexKVSettings(cpu_cache_gbb=1)


# ---- import hygiene ------------------------------------------------------------------------------


def test_import_is_light():
    code = ("import sys, dynamo_flexkv, dynamo_flexkv.config\n"
            "assert dynamo_flexkv.__version__ == '0.1.0'\n"
            "heavy = {'torch', 'vllm', 'yaml', 'numpy'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- docs ----------------------------------------------------------------------------------------


def _generated_part(text: str) -> str:
    begin, end = "<!-- BEGIN GENERATED -->\n", "\n<!-- END GENERATED -->"
    assert begin in text and end in text
    return text.split(begin, 1)[1].split(end, 1)[0]


def test_docs_table_matches_model():
    assert _generated_part(DOCS.read_text(encoding="utf-8")) == settings_table_markdown(), (
        "docs/configuration.md is stale: run python scripts/gen_config_docs.py")


def test_table_has_a_row_per_setting():
    rows = settings_table_markdown().splitlines()[2:]
    assert len(rows) == len(SETTING_NAMES)
    for name, row in zip(SETTING_NAMES, rows):
        info = FlexKVSettings.model_fields[name]
        assert row.startswith(f"| `{name}` | `FLEXKV_{name.upper()}` |")
        assert info.description and " ".join(info.description.split()) in row
    assert "unset (auto: unique per instance)" in rows[SETTING_NAMES.index("server_recv_port")]
    assert "lru, lfu, fifo, mru, slru, filo" in rows[SETTING_NAMES.index("eviction_policy")]


def test_gen_config_docs_check_passes_on_committed_docs():
    proc = subprocess.run([sys.executable, str(GEN), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gen_config_docs_check_detects_and_fixes_stale_docs(tmp_path):
    stale = tmp_path / "configuration.md"
    text = DOCS.read_text(encoding="utf-8")
    stale.write_text(text.replace("| `lru` |", "| `lfu` |"), encoding="utf-8")
    check = [sys.executable, str(GEN), "--check", "--output", str(stale)]
    proc = subprocess.run(check, capture_output=True, text=True)
    assert proc.returncode == 1 and "out of date" in proc.stderr
    subprocess.run([sys.executable, str(GEN), "--output", str(stale)], check=True,
                   capture_output=True)
    assert stale.read_text(encoding="utf-8") == text
    assert subprocess.run(check, capture_output=True).returncode == 0


def test_docs_error_example_is_what_the_code_says():
    msg = expect_error({"FLEXKV_EVICTION_POLICY": "random"})
    assert msg in DOCS.read_text(encoding="utf-8").splitlines()


def test_module_exports():
    assert set(config.__all__) <= set(dir(config))


# --- issue 11: what a hostile review found ----------------------------------------------------------


@pytest.mark.parametrize("suffix,text", [
    (".yml", "cpu_cache_gb: 8\neviction_policy: lru\ncpu_cache_gb: 0.5\n"),
    (".json", '{"cpu_cache_gb": 8, "cpu_cache_gb": 0.5}'),
])
def test_a_key_given_twice_in_a_file_is_an_error_not_last_wins(tmp_path, suffix, text):
    path = tmp_path / f"flexkv{suffix}"
    path.write_text(text)
    msg = expect_error({"FLEXKV_CONFIG_PATH": str(path)})
    assert "'cpu_cache_gb' appears more than once" in msg and str(path) in msg


@pytest.mark.parametrize("env,named", [
    ({"FLEXKV_CPU_CACHE_GB": "1e-9"}, "FLEXKV_CPU_CACHE_GB='1e-9' is invalid"),
    ({"FLEXKV_SSD_CACHE_GB": "1e-9", "FLEXKV_SSD_CACHE_DIR": "/tmp"}, "FLEXKV_SSD_CACHE_GB='1e-9' is invalid"),
])
def test_absurdly_small_tiers_are_rejected_naming_the_setting(env, named):
    assert expect_error(env).startswith(named)


def test_enable_gds_off_is_accepted_on_is_a_clear_error(tmp_path):
    path = tmp_path / "flexkv.yml"
    path.write_text("cpu_cache_gb: 0.5\nenable_gds: false\n")  # as FlexKV's own config files have it
    assert load({"FLEXKV_CONFIG_PATH": str(path), "FLEXKV_ENABLE_GDS": "0"}).cpu_cache_gb == 0.5
    path.write_text("enable_gds: true\n")
    msg = expect_error({"FLEXKV_CONFIG_PATH": str(path)})
    assert msg.startswith(f"enable_gds=True in {path}") and "GPUDirect Storage is not supported" in msg
    assert "GPUDirect" in expect_error(overrides={"enable_gds": True})


def test_the_io_engine_is_selectable():
    assert load({"FLEXKV_SSD_IO_ENGINE": "Threads"}).ssd_io_engine == "threads"
