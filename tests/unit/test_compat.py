"""The tested vLLM range and the warning outside it."""

from __future__ import annotations

import pytest

from dynamo_flexkv.integration.vllm.compat import untested_version_warning


@pytest.mark.parametrize("version", ["0.26.0", "0.31.0+cpu", "0.32.0", "0.32.1.dev3+g1234"])
def test_tested_versions_need_no_warning(version):
    assert untested_version_warning(version) is None


@pytest.mark.parametrize("version", ["0.25.1", "0.33.0", "1.0.0", "main"])
def test_other_versions_get_one_line_naming_the_range(version):
    warning = untested_version_warning(version)
    assert warning is not None and "0.26-0.32" in warning and "\n" not in warning


# layerwise_load against vLLM's CUDA-graph mode: real vLLM config objects, no engine needed.

def _config(mode_name: str):
    from types import SimpleNamespace

    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode

    return SimpleNamespace(compilation_config=CompilationConfig(cudagraph_mode=CUDAGraphMode[mode_name]))


@pytest.mark.parametrize("mode, expected", [
    ("NONE", True),  # eager, and the CPU build
    ("PIECEWISE", True),  # attention runs outside the graphs, so the per-layer waits run
    ("FULL_AND_PIECEWISE", False),  # vLLM's default on CUDA: decode steps replay full graphs
    ("FULL_DECODE_ONLY", False),
    ("FULL", False),
])
def test_auto_loads_layer_by_layer_only_without_full_cuda_graphs(mode, expected):
    from dynamo_flexkv.integration.vllm.compat import loads_layer_by_layer

    assert loads_layer_by_layer("auto", _config(mode), hybrid=False) is expected
    assert loads_layer_by_layer(True, _config(mode), hybrid=False) is True
    assert loads_layer_by_layer(False, _config(mode), hybrid=False) is False
    # a hybrid model's hits always load between steps, whatever the setting
    assert loads_layer_by_layer(True, _config(mode), hybrid=True) is False
    assert loads_layer_by_layer("auto", _config(mode), hybrid=True) is False


@pytest.mark.parametrize("extra, piecewise", [({}, False), ({"layerwise_load": "auto"}, False),
                                             ({"layerwise_load": True}, True), ({"layerwise_load": "off"}, False)])
def test_only_an_explicit_layerwise_load_asks_vllm_for_piecewise_graphs(extra, piecewise, monkeypatch):
    from dynamo_flexkv.integration.vllm.connector import FlexKVConnector

    monkeypatch.delenv("FLEXKV_LAYERWISE_LOAD", raising=False)
    monkeypatch.delenv("FLEXKV_CONFIG_PATH", raising=False)
    assert FlexKVConnector.requires_piecewise_for_cudagraph(extra) is piecewise
