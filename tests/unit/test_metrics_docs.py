"""Every exported metric is listed in docs/dynamo.md with its vLLM native equivalent."""

from __future__ import annotations

from pathlib import Path

from dynamo_flexkv.integration.vllm.stats import METRICS, NATIVE_EQUIVALENT

DOC = Path(__file__).resolve().parents[2] / "docs" / "dynamo.md"


def test_every_metric_has_a_row_naming_its_native_equivalent():
    rows = {line.split("|")[1].strip(" `"): line for line in DOC.read_text().splitlines()
            if line.startswith("| `vllm:flexkv_")}
    assert set(rows) == {spec.name for spec in METRICS.values()}
    for key, native in NATIVE_EQUIVALENT.items():
        assert f"`{native}`" in rows[METRICS[key].name], key
