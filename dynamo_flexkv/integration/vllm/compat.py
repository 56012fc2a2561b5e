"""Which vLLM versions the connector is tested with; the one place where version differences go.

Tested: 0.26 on CUDA (the lent H200, benchmarks/e2e_gpu.py), 0.31 and 0.32 on the CPU build (CI,
tests/test_vllm_versions.py). They call the connector's hooks in different orders:
- 0.26's model runners skip `wait_for_save` in a step that schedules no tokens;
- 0.31+ call `start_load_kv` after the forward pass when no load must land before it;
- 0.32 adds optional hooks for hybrid models (their defaults are right for one KV-cache group).
The connector needs no version branch for any of them: the worker starts every transfer of a step in
`start_load_kv`, which every version calls once per step, with or without a forward pass, and
reports completions in `get_finished`. A difference that cannot be absorbed that way belongs here.
"""

from __future__ import annotations

import re

TESTED_RANGE = ((0, 26), (0, 32))  # first and last tested minor version


def untested_version_warning(version: str) -> str | None:
    """A one-line warning when `version` (vllm.__version__) is outside the tested range, else None."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"dynamo-flexkv cannot read the vLLM version {version!r}; it is tested with vLLM 0.26-0.32"
    minor = (int(match[1]), int(match[2]))
    low, high = TESTED_RANGE
    if low <= minor <= high:
        return None
    return f"dynamo-flexkv is tested with vLLM 0.26-0.32; this is vLLM {version}: report problems with the version"
