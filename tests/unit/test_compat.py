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
