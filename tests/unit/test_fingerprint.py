"""The SSD identity changes whenever what computed the KV bytes changes: weights updated in place,
RoPE or other config overrides, dtype, revision (real vLLM ModelConfig of the tiny model)."""

from __future__ import annotations

import os
import shutil

import pytest
from vllm.engine.arg_utils import EngineArgs

from dynamo_flexkv.integration.vllm.fingerprint import kv_fingerprint


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_model, path)
    return path


def fingerprint(model_dir, **args):
    return kv_fingerprint(EngineArgs(model=str(model_dir), **args).create_model_config())


def test_stable_for_the_same_model(model_dir):
    assert fingerprint(model_dir) == fingerprint(model_dir)


def test_weights_replaced_in_place_change_it(model_dir):
    before = fingerprint(model_dir)
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new file, same name
    after = fingerprint(model_dir)
    assert after["weights"] != before["weights"]
    assert {k: v for k, v in after.items() if k != "weights"} == {k: v for k, v in before.items() if k != "weights"}


@pytest.mark.parametrize("change", [
    {"hf_overrides": {"rope_theta": 5000.0}},
    {"hf_overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
    {"dtype": "float32"},
    {"revision": "v2"},
])
def test_config_rope_dtype_and_revision_change_it(model_dir, change):
    assert fingerprint(model_dir, **change) != fingerprint(model_dir)
