"""Shared fixtures: the tiny offline model, and the reference engine (vLLM without any connector)
that the integration and fault tests compare against (started once per session, when first used)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model() -> str:
    model_dir = Path(os.environ.get("DYNAMO_FLEXKV_MODEL_DIR", REPO / ".cache" / "tiny-llama"))
    if not (model_dir / "model.safetensors").exists():
        from dynamo_flexkv.devtools.tiny_model import build

        build(model_dir)
    return str(model_dir)



@pytest.fixture(scope="session")
def sliding_model(tmp_path_factory) -> str:
    """A Gemma-2-style model: sliding-window and full-attention layers, two KV-cache groups in vLLM
    (built in seconds)."""
    from dynamo_flexkv.devtools.tiny_model import SLIDING, build

    return str(build(tmp_path_factory.mktemp("sliding-window-model"), SLIDING))


@pytest.fixture(scope="session")
def hybrid_ssm_model(tmp_path_factory) -> str:
    """A Jamba-style model: a Mamba and an attention layer (a MambaSpec and a FullAttentionSpec group)."""
    from dynamo_flexkv.devtools.tiny_model import HYBRID_SSM, build

    return str(build(tmp_path_factory.mktemp("hybrid-ssm-model"), HYBRID_SSM))


@pytest.fixture(scope="session")
def reference(tiny_model):
    from dynamo_flexkv.devtools.harness import EngineHost
    from tests.helpers import ENGINE

    with EngineHost(tiny_model, ENGINE) as host:
        yield host


def pytest_collection_modifyitems(items):
    """Fast unit tests first, so a broken build fails in seconds, not after the engine tests."""
    items.sort(key=lambda item: 0 if "/unit/" in str(item.fspath) else 1)


def pytest_configure(config):
    """A nested run against another vLLM (tests/test_vllm_versions.py) must really import it."""
    expected = os.environ.get("DYNAMO_FLEXKV_EXPECT_VLLM")
    if expected:
        import vllm

        if not vllm.__version__.startswith(expected):
            raise pytest.UsageError(f"expected vLLM {expected} on the path, imported {vllm.__version__} from {vllm.__file__}")
