"""What the bytes of a stored KV block depend on beyond the layout: which weights, quantization and
model configuration (RoPE scaling and theta, attention settings, ...) computed them.

The SSD tier outlives the process. If a model is updated in place (new weights in the same directory
or under the same hub name, another quantization, a RoPE override), a restarted worker must not serve
KV computed by the old one, so these facts join the identity that names and guards the SSD files.
Weights are fingerprinted by name, size and modification time (hashing gigabytes at every start would
be too slow); a hub model's snapshot directory is named by its commit, which covers it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from vllm.config import ModelConfig

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _local_dir(model: str, revision: str | None) -> Path | None:
    if os.path.isdir(model):
        return Path(model)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - no local snapshot: name and revision must do
        logger.info("kv fingerprint: no local snapshot of %s (%s); weights identified by name and revision",
                    model, exc.__class__.__name__)
        return None


def weights_fingerprint(model: str, revision: str | None) -> str:
    """Names, sizes and mtimes of the weight files (and the snapshot path, which holds a hub commit)."""
    root = _local_dir(model, revision)
    if root is None:
        return _digest(f"{model}@{revision}")
    entries = [str(root.resolve())]
    for path in sorted(root.rglob("*")):
        if path.suffix in _WEIGHT_SUFFIXES or path.name.endswith(".index.json"):
            st = path.stat()
            entries.append(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    return _digest("\n".join(entries))


def kv_fingerprint(model_config: ModelConfig) -> dict[str, str]:
    """Short, stable values to add to the SSD identity."""
    hf_config = model_config.hf_config
    config_json = hf_config.to_json_string(use_diff=False) if hasattr(hf_config, "to_json_string") \
        else json.dumps(vars(hf_config), sort_keys=True, default=str)
    return {
        "revision": str(model_config.revision),
        "weights": weights_fingerprint(str(model_config.model), model_config.revision),
        "quantization": str(model_config.quantization),
        "model_dtype": str(model_config.dtype).removeprefix("torch."),
        # RoPE scaling and theta, head counts, sliding windows, hf_overrides: all in the config.
        "model_config": _digest(config_json),
    }
