"""The weights' identity is their content: it changes whenever the bytes do (weights swapped behind
one path, same names, sizes and mtimes) and never with where a copy lives or when it was written;
the rest of the fingerprint changes with RoPE or other config overrides, dtype, revision (real vLLM
ModelConfig of the tiny model)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm.engine.arg_utils import EngineArgs

from dynamo_flexkv.integration.vllm.fingerprint import (
    FILE_HEAD_BYTES,
    WHOLE_TENSOR_BYTES,
    kv_fingerprint,
    weights_identity,
)


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_model, path)
    return path


def fingerprint(model_dir, weights_version=None, **args):
    return kv_fingerprint(EngineArgs(model=str(model_dir), **args).create_model_config(), weights_version)


def rewrite_keeping_mtime(path, tensors) -> None:
    """Replace a safetensors file in place (a rolling update), with the old file's mtime."""
    stat = path.stat()
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_stable_for_the_same_model(model_dir):
    assert fingerprint(model_dir) == fingerprint(model_dir)


def test_the_same_checkpoint_at_another_path_has_the_same_fingerprint(model_dir, tmp_path):
    """Another node's copy (another path, other mtimes) shares: nothing path-dependent is in it."""
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(model_dir, other, copy_function=shutil.copy)  # new mtimes
    assert fingerprint(other) == fingerprint(model_dir)


def test_a_new_mtime_alone_does_not_change_it(model_dir):
    before = fingerprint(model_dir)
    weights = model_dir / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert fingerprint(model_dir) == before


def test_weights_swapped_behind_one_path_with_the_same_header_and_mtime_change_it(model_dir):
    """A fine-tune of the same config: same tensor names, dtypes, shapes and offsets, same file size
    and mtime; only the bytes differ."""
    weights = model_dir / "model.safetensors"
    before, size = fingerprint(model_dir), weights.stat().st_size
    generator = torch.Generator().manual_seed(1)
    tuned = {name: t + (torch.randn(t.shape, generator=generator) * 1e-2).to(t.dtype)
             for name, t in load_file(str(weights)).items()}
    rewrite_keeping_mtime(weights, tuned)
    after = fingerprint(model_dir)
    assert weights.stat().st_size == size
    assert after["weights"] != before["weights"]
    assert {k: v for k, v in after.items() if k != "weights"} == {k: v for k, v in before.items() if k != "weights"}


@pytest.mark.parametrize("pick", ["smallest", "largest"])
def test_one_tensor_changed_changes_it(model_dir, pick):
    """A norm (hashed whole) or the biggest matrix (sampled windows; here its first element, in the
    first window) retrained alone still changes the identity."""
    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    name = (min if pick == "smallest" else max)(sizes, key=sizes.get)
    assert (sizes[name] <= WHOLE_TENSOR_BYTES) == (pick == "smallest")
    before = weights_identity(str(model_dir), None)
    tensors[name].view(-1)[0] += 1
    rewrite_keeping_mtime(weights, tensors)
    assert weights_identity(str(model_dir), None) != before


@pytest.mark.parametrize("suffix", [".gguf", ".bin"])
def test_files_without_a_parsed_header_are_sampled_whole(tmp_path, suffix):
    """A GGUF or pickle checkpoint: its first MiB (metadata) and windows over the rest count."""
    model = tmp_path / "m"
    model.mkdir()
    data = bytearray(os.urandom(3 * FILE_HEAD_BYTES))
    path = model / f"model{suffix}"
    path.write_bytes(data)
    before = weights_identity(str(model), None)
    data[100] ^= 0xFF
    path.write_bytes(data)
    changed_head = weights_identity(str(model), None)
    data[-1] ^= 0xFF
    path.write_bytes(data)
    assert len({before, changed_head, weights_identity(str(model), None)}) == 3


def test_a_hub_name_without_local_files_is_identified_by_name_and_revision():
    name = "no-such-org/no-such-model-for-tests"
    assert weights_identity(name, "v1") == weights_identity(name, "v1")
    assert weights_identity(name, "v1") != weights_identity(name, "v2")
    assert weights_identity(name, "v1") != weights_identity("no-such-org/another-model", "v1")


def test_a_pinned_weights_version_replaces_the_content_identity(model_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    weights = other / "model.safetensors"
    rewrite_keeping_mtime(weights, {name: t * 2 for name, t in load_file(str(weights)).items()})
    assert fingerprint(model_dir)["weights"] != fingerprint(other)["weights"]
    assert fingerprint(model_dir, "2026-12-01")["weights"] == fingerprint(other, "2026-12-01")["weights"]
    assert fingerprint(model_dir, "2026-12-01")["weights"] != fingerprint(model_dir, "2026-12-02")["weights"]


@pytest.mark.parametrize("change", [
    {"hf_overrides": {"rope_theta": 5000.0}},
    {"hf_overrides": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}},
    {"dtype": "float32"},
    {"revision": "v2"},
])
def test_config_rope_dtype_and_revision_change_it(model_dir, change):
    assert fingerprint(model_dir, **change) != fingerprint(model_dir)
