"""What the bytes of a stored KV block depend on beyond the layout: which weights, quantization and
model configuration (RoPE scaling and theta, attention settings, ...) computed them.

The SSD tier outlives the process and the cluster tier outlives every engine and is shared between
nodes. A path or hub name does not name weights: a rolling update replaces the files behind one path
with a fine-tune of the same config, and a restarted engine must then never serve the KV the old
weights computed. So the weights are identified by their content, which every node computes
identically wherever its copy lives, and never by paths or modification times:

- safetensors: each file's JSON header (tensor names, dtypes, shapes, offsets) and, of every tensor,
  a few small windows at fixed fractions of its bytes (tensors up to `WHOLE_TENSOR_BYTES`, the norms
  and biases, whole). A fine-tune rewrites most bytes of the tensors it trains, so a sample of each
  tensor differs; reading ~16 KiB per tensor costs a fraction of a second on a cold 16 GB checkpoint
  (`benchmarks/fingerprint.py`), where hashing every byte would cost minutes.
- .bin / .pt / .pth / .gguf (no header we parse): the file's size, its first MiB (GGUF metadata,
  pickle structure) and evenly spaced windows over the rest.
- A hub name with no local snapshot: the name and revision, the most that is known.

A change confined to bytes no window samples (a few edited embedding rows) is not seen: operators
who ship such updates pin `weights_version`, which replaces the content identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from pathlib import Path

import xxhash
from vllm.config import ModelConfig

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WINDOW_BYTES = 4096  # one page: a cold window costs one small read
TENSOR_WINDOWS = 4  # per sampled tensor: its start, end and two points between
WHOLE_TENSOR_BYTES = 64 << 10
FILE_HEAD_BYTES = 1 << 20
FILE_WINDOWS = 256  # per file without a header we parse
MAX_SAFETENSORS_HEADER = 100 << 20  # the format's own limit


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


def _windows(start: int, length: int, count: int) -> list[tuple[int, int]]:
    """`count` windows spread evenly over [start, start + length), the first and last at its ends."""
    if length <= WINDOW_BYTES * count:
        return [(start, length)]
    span = length - WINDOW_BYTES
    return [(start + i * span // (count - 1), WINDOW_BYTES) for i in range(count)]


def _safetensors_windows(fd: int, size: int) -> tuple[bytes, list[tuple[int, int]]] | None:
    """The header and the sampled windows of a safetensors file; None if it is not one."""
    if size < 8:
        return None
    (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
        return None
    header = os.pread(fd, header_len, 8)
    try:
        tensors = json.loads(header)
        spans = sorted(tuple(t["data_offsets"]) for name, t in tensors.items() if name != "__metadata__")
    except (ValueError, TypeError, KeyError):
        return None
    base = 8 + header_len
    windows = []
    for begin, end in spans:
        length = end - begin
        windows += [(base + begin, length)] if length <= WHOLE_TENSOR_BYTES else \
            _windows(base + begin, length, TENSOR_WINDOWS)
    return header, windows


def _hash_file(path: Path, hasher: xxhash.xxh3_128) -> int:
    """Add the file's sampled content to `hasher`; returns the bytes read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around each window
        hasher.update(struct.pack("<Q", size))
        parsed = _safetensors_windows(fd, size) if path.suffix == ".safetensors" else None
        if parsed is not None:
            header, windows = parsed
            hasher.update(header)
        else:
            head = min(size, FILE_HEAD_BYTES)
            windows = [(0, head)] + (_windows(head, size - head, FILE_WINDOWS) if size > head else [])
        read = 0
        for offset, length in windows:
            chunk = os.pread(fd, length, offset)
            hasher.update(chunk)
            read += len(chunk)
        return read
    finally:
        os.close(fd)


def weight_files(root: Path) -> list[Path]:
    """The checkpoint's weight files, in an order every node agrees on."""
    return sorted((p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()),
                  key=lambda p: p.relative_to(root).as_posix())


def weights_identity(model: str, revision: str | None, pinned: str | None = None) -> str:
    """The content identity of the weights `model` names (see the module docstring); `pinned`
    (the `weights_version` setting) replaces it."""
    if pinned is not None:
        return f"pinned:{pinned}"
    root = _local_dir(model, revision)
    files = weight_files(root) if root is not None else []
    if not files:
        return _digest(f"{model}@{revision}")
    start = time.perf_counter()
    hasher = xxhash.xxh3_128()
    read = 0
    for path in files:
        hasher.update(path.relative_to(root).as_posix().encode() + b"\0")
        read += _hash_file(path, hasher)
    identity = hasher.hexdigest()
    logger.info("kv fingerprint: weights of %s identified by content %s (%d files, %.1f MiB sampled, %.2f s)",
                model, identity, len(files), read / 2**20, time.perf_counter() - start)
    return identity


def kv_fingerprint(model_config: ModelConfig, weights_version: str | None = None) -> dict[str, str]:
    """Short, stable values to add to every tier's identity; the same on every node that serves the
    same weights and config, wherever its files live."""
    hf_config = model_config.hf_config
    config = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(vars(hf_config))
    return {
        "revision": str(model_config.revision),
        "weights": weights_identity(str(model_config.model), model_config.revision, weights_version),
        "quantization": str(model_config.quantization),
        "model_dtype": str(model_config.dtype).removeprefix("torch."),
        # RoPE scaling and theta, head counts, sliding windows, hf_overrides: all in the config.
        "model_config": _digest(json.dumps(_without_paths(config), sort_keys=True, default=str)),
    }


def _without_paths(config: object) -> object:
    """The config without `_name_or_path` (where this node's copy lives, not what it holds), also in
    nested configs (a multimodal model's text and vision configs)."""
    if isinstance(config, dict):
        return {key: _without_paths(value) for key, value in config.items() if key != "_name_or_path"}
    return config
