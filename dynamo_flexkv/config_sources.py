"""Where dynamo-flexkv's settings come from, and how the user spelled each one there.

Sources and precedence (later wins, key by key)
-----------------------------------------------
1. Defaults (the field defaults of `config.FlexKVSettings`).
2. ``FLEXKV_<UPPER_NAME>`` environment variables, e.g. ``FLEXKV_CPU_CACHE_GB=0.25``,
   ``FLEXKV_SSD_CACHE_DIR="/a;/b"``, ``FLEXKV_ENABLE_METRICS=0``. A variable set to an empty string
   counts as unset. Other ``FLEXKV_*`` variables (FlexKV has many) are ignored.
3. The YAML or JSON file named by ``FLEXKV_CONFIG_PATH`` (keys are the lower-case field names). As in
   FlexKV, a key in the file wins over the matching environment variable; environment variables for
   keys the file does not set still apply. An unknown key, an unreadable file or malformed YAML/JSON
   is an error.
4. Overrides passed by the caller -- the connector passes vLLM's ``kv_connector_extra_config`` dict
   from ``--kv-transfer-config``. Highest precedence; an unknown key is an error.

``DYNAMO_USE_FLEXKV`` is not read here (the launcher owns it).

Every problem names the setting as the user wrote it (``FLEXKV_CPU_CACHE_GB``, ``cpu_cache_gb=… in
<file>``, ``kv_connector_extra_config.cpu_cache_gb``): a `Source` knows that spelling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from dynamo_flexkv.logs import redact_url

ENV_PREFIX = "FLEXKV_"
CONFIG_PATH_ENV = "FLEXKV_CONFIG_PATH"
OVERRIDES_NAME = "kv_connector_extra_config"
MAX_VALUE_REPR = 400
# Settings of FlexKV that dynamo-flexkv does not implement: accepted only when off, so FlexKV config
# files and Dynamo's guide keep working; turned on, start-up fails saying why.
RETIRED = {
    "enable_gds": "GPUDirect Storage is not supported by dynamo-flexkv (SSD blocks are staged through "
                  "the CPU tier); unset it or set it to false",
}
_FALSE_WORDS = ("", "0", "false", "no", "off")


def env_var_name(setting: str) -> str:
    """``cpu_cache_gb`` -> ``FLEXKV_CPU_CACHE_GB``."""
    return ENV_PREFIX + setting.upper()


class ConfigError(ValueError):
    """Invalid dynamo-flexkv configuration. ``str(err)`` has one line per problem."""

    def __init__(self, problems: str | list[str]):
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class Source:
    """Where a value came from; knows how the user spelled a setting there."""

    __slots__ = ("kind", "path")

    def __init__(self, kind: str, path: str | None = None):
        self.kind = kind  # "direct" | "env" | "file" | "override"
        self.path = path

    def name(self, field: str) -> str:
        """The setting as the user typed it, without location (used in hints)."""
        if self.kind == "env":
            return env_var_name(field)
        if self.kind == "override":
            return f"{OVERRIDES_NAME}.{field}"
        return field

    def label(self, field: str) -> str:
        if self.kind == "file":
            return f"{field} in {self.path}"
        return self.name(field)

    def describe(self, field: str, value: Any) -> str:
        shown = repr(shown_value(field, value))
        if len(shown) > MAX_VALUE_REPR:
            shown = shown[:MAX_VALUE_REPR - 3] + "..."
        if self.kind == "file":
            return f"{field}={shown} in {self.path} ({CONFIG_PATH_ENV})"
        return f"{self.name(field)}={shown}"


DIRECT = Source("direct")


def shown_value(field: str, value: Any) -> Any:
    """A value fit for a log line or an error: a store URL's password is never shown."""
    return redact_url(value) if field == "remote_store" and isinstance(value, str) else value


def suggest(key: Any, names: Sequence[str]) -> str:
    if not isinstance(key, str):
        return ""
    import difflib

    candidate = key.strip().lower()
    if candidate.startswith(ENV_PREFIX.lower()):
        candidate = candidate[len(ENV_PREFIX):]
    if candidate in names:
        return f"; did you mean {candidate!r}?"
    close = difflib.get_close_matches(candidate, names, n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def unknown_keys(mapping: Any, where: str, names: Sequence[str]) -> list[str]:
    allowed = ", ".join(names)
    return [f"unknown key {key!r} in {where}{suggest(key, names)} (allowed keys are {allowed})"
            for key in mapping if key not in names]


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        self.key, self.line = key, line


def _unique_key_loader() -> type:
    """PyYAML's SafeLoader, except that a mapping repeating a key is an error (not last-wins)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def read_config_file(path: str) -> dict[Any, Any]:
    where = f"{CONFIG_PATH_ENV}={path!r}"
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the config file is not UTF-8 text") from None
    if path.lower().endswith(".json"):
        import json

        def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            keys = [k for k, _ in pairs]
            twice = sorted({k for k in keys if keys.count(k) > 1})
            if twice:
                raise ConfigError(f"{where}: key {twice[0]!r} appears more than once (which value did "
                                  "you mean?)")
            return dict(pairs)

        try:
            data = json.loads(text, object_pairs_hook=unique) if text.strip() else None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: "
                              f"{exc.msg}") from None
    else:
        import yaml

        try:
            data = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
        except _DuplicateKey as exc:
            raise ConfigError(f"{where}: key {exc.key!r} appears more than once (line {exc.line}; "
                              "which value did you mean?)") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{where}: invalid YAML{at}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the config file must hold a mapping of setting names to "
                          f"values, not a {type(data).__name__}")
    return data


def retired_problems(mapping: Mapping[Any, Any], source: Source) -> list[str]:
    """A line for each retired setting that `mapping` turns on."""
    return [f"{source.describe(field, mapping[field])} is invalid: {why}" for field, why in RETIRED.items()
            if field in mapping and str(mapping[field]).strip().lower() not in _FALSE_WORDS]
