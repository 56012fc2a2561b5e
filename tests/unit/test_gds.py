"""`enable_gds` on a machine without GPUDirect Storage is a start-up error that says why."""

import pytest

pytest.importorskip("vllm")

from dynamo_flexkv.integration.vllm.connector import require_gds  # noqa: E402


def test_enable_gds_without_gds_names_the_setting_and_the_reason():
    with pytest.raises(ValueError, match=r"FLEXKV_ENABLE_GDS.*GPUDirect Storage is not available"):
        require_gds()
