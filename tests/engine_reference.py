"""The reference engine: vLLM without any connector, shared by every integration test module."""

from __future__ import annotations

import pytest

from dynamo_flexkv.harness import EngineHost
from tests.helpers import ENGINE


@pytest.fixture(scope="session")
def reference(tiny_model):
    with EngineHost(tiny_model, ENGINE) as host:
        yield host
