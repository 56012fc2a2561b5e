#!/usr/bin/env python3
"""Regenerate the settings reference in docs/configuration.md from dynamo_flexkv.config.

    python scripts/gen_config_docs.py            # rewrite the generated table in place
    python scripts/gen_config_docs.py --check    # exit 1 if the file is out of date

Only the text between the BEGIN/END GENERATED markers is generated; the prose around it is
hand-written and kept as it is. When the file does not exist yet it is created from INTRO below.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import typing  # noqa: E402
from typing import Any, Literal, Optional  # noqa: E402

from dynamo_flexkv.config import FlexKVSettings, env_var_name  # noqa: E402
from dynamo_flexkv.config_errors import allowed_text, literal_values  # noqa: E402

DEFAULT_OUTPUT = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN GENERATED -->"
END = "<!-- END GENERATED -->"

INTRO = """\
# Configuration

dynamo-flexkv reads the settings FlexKV users already know: the same names, the same
`FLEXKV_*` environment variables, the same `FLEXKV_CONFIG_PATH` file.

## Sources and precedence

Each setting is taken from the highest-precedence source that sets it (key by key):

1. **Defaults** (table below).
2. **Environment variables** `FLEXKV_<NAME>`, e.g. `FLEXKV_CPU_CACHE_GB=0.25`. A variable set to an
   empty string counts as unset; other `FLEXKV_*` variables are ignored.
3. **The file named by `FLEXKV_CONFIG_PATH`** (YAML, or JSON when the name ends in `.json`). Keys are
   the lower-case setting names. As in FlexKV, a key in the file wins over its environment
   variable. Unlike FlexKV, environment variables for keys the file does not set still apply.
4. **`kv_connector_extra_config`** from vLLM's `--kv-transfer-config` — highest precedence.

Unknown keys in the file or in `kv_connector_extra_config` are errors, and so are a missing or
unreadable file and malformed YAML/JSON. `DYNAMO_USE_FLEXKV` is read by the launcher, not here.
Sizes are in GiB (2^30 bytes); fractions are allowed.

## Examples

Environment variables:

```bash
export FLEXKV_CPU_CACHE_GB=0.25
export FLEXKV_SSD_CACHE_GB=64
export FLEXKV_SSD_CACHE_DIR="/data0/flexkv;/data1/flexkv"   # ;-separated
export FLEXKV_ENABLE_METRICS=0                               # 0/1, true/false, yes/no, on/off
```

A YAML file (`ssd_cache_dir` may be a list or one `;`-separated string):

```yaml
# flexkv.yaml -- export FLEXKV_CONFIG_PATH=$PWD/flexkv.yaml
cpu_cache_gb: 32
ssd_cache_gb: 1024
ssd_cache_dir:
  - /data0/flexkv
  - /data1/flexkv
eviction_policy: lru
```

Per-engine overrides through vLLM:

```bash
vllm serve MODEL --kv-transfer-config \\
  '{"kv_connector":"FlexKVConnectorV1","kv_role":"kv_both","kv_connector_extra_config":{"cpu_cache_gb":0.5}}'
```

## Errors

Every problem is reported on one line that names the setting as you wrote it, the bad value and
what is allowed, for example:

```text
FLEXKV_EVICTION_POLICY='random' is invalid: allowed values are lru, lfu, fifo, mru, slru, filo
cpu_cache_gb=-1 in /etc/flexkv.yaml (FLEXKV_CONFIG_PATH) is invalid: expected a number > 0 (GiB; fractions such as 0.25 allowed)
kv_connector_extra_config.ssd_cache_gb=500 is invalid: only 120.3 GiB is free in kv_connector_extra_config.ssd_cache_dir (/data0/flexkv: 120.3 GiB)
```

Validation allocates nothing. With `ssd_cache_gb > 0` it checks that every `ssd_cache_dir` exists,
is a writable directory, and that their filesystems have `ssd_cache_gb` free in total.

## Reference

The table is generated from `dynamo_flexkv/config.py` by `scripts/gen_config_docs.py`;
edit the model, not the table.

"""


def _type_text(field: str, annotation: Any) -> str:
    if literal_values(annotation):
        return "string"
    if annotation is bool:
        return "boolean"
    if set(typing.get_args(annotation)) == {Literal["auto"], bool}:
        return "auto or boolean"
    if annotation is int:
        return "integer"
    if annotation is float:
        return "number (GiB)" if field.endswith("_gb") else "number"
    if typing.get_origin(annotation) is tuple:
        return "list of paths"
    if annotation in (str, Optional[str]):
        return "string"
    return str(annotation)


def _default_text(info: Any) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "x-default" in extra:
        return str(extra["x-default"])
    default = info.default
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if default is None:
        return "unset"
    return f"`{default}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_table_markdown() -> str:
    """The settings reference as a Markdown table (no trailing newline)."""
    rows = ["| Setting | Environment variable | Type | Default | Allowed values | Description |",
            "|---|---|---|---|---|---|"]
    for name, info in FlexKVSettings.model_fields.items():
        rows.append("| " + " | ".join(_cell(c) for c in (
            f"`{name}`",
            f"`{env_var_name(name)}`",
            _type_text(name, info.annotation),
            _default_text(info),
            allowed_text(info),
            info.description or "",
        )) + " |")
    return "\n".join(rows)


def generated_block() -> str:
    return f"{BEGIN}\n{settings_table_markdown()}\n{END}"


def render(existing: str | None) -> str:
    """The file as it should be, given its current text (None when it does not exist)."""
    if existing is None:
        return INTRO + generated_block() + "\n"
    start = existing.find(BEGIN)
    stop = existing.find(END, start + len(BEGIN)) if start >= 0 else -1
    if start < 0 or stop < 0:
        raise SystemExit(f"error: the markers {BEGIN} / {END} are missing; restore them "
                         "or delete the file to regenerate it")
    return existing[:start] + generated_block() + existing[stop + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if the file is out of date")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                        help=f"file to write (default: {DEFAULT_OUTPUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)

    existing = args.output.read_text(encoding="utf-8") if args.output.exists() else None
    wanted = render(existing)
    if args.check:
        if existing == wanted:
            return 0
        diff = difflib.unified_diff((existing or "").splitlines(keepends=True),
                                    wanted.splitlines(keepends=True),
                                    fromfile=str(args.output), tofile="generated")
        sys.stderr.write("".join(diff))
        sys.stderr.write(f"\n{args.output} is out of date: run python scripts/gen_config_docs.py\n")
        return 1
    if existing != wanted:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(wanted, encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
