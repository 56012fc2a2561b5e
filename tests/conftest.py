"""Shared fixtures: the tiny offline model, and seeded prompts."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model() -> str:
    model_dir = Path(os.environ.get("DYNAMO_FLEXKV_MODEL_DIR", REPO / ".cache" / "tiny-llama"))
    if not (model_dir / "model.safetensors").exists():
        from dynamo_flexkv.tiny_model import build

        build(model_dir)
    return str(model_dir)


def random_prompt(rng: random.Random, length: int, vocab: int = 1000) -> list[int]:
    """Token ids above the special tokens (0-2), so prompts never contain an end-of-sequence."""
    return [rng.randrange(3, vocab) for _ in range(length)]
