"""The one settings model of dynamo-flexkv, and where its values come from.

Every knob is a field of :class:`FlexKVSettings`. Its name is the FlexKV name users already type:
``cpu_cache_gb`` in a YAML/JSON file or in ``kv_connector_extra_config``, ``FLEXKV_CPU_CACHE_GB``
in the environment.

Sources and precedence (later wins, key by key)
-----------------------------------------------
1. Defaults (the field defaults below).
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

Errors
------
Every problem is reported as :class:`ConfigError` (a ``ValueError``) with one line per problem that
names the setting the way the user wrote it (``FLEXKV_CPU_CACHE_GB``, ``cpu_cache_gb=… in <file>``,
``kv_connector_extra_config.cpu_cache_gb``), the bad value and what is allowed, e.g.::

    FLEXKV_EVICTION_POLICY='random' is invalid: allowed values are lru, lfu, fifo, mru, slru, filo

Validation never allocates anything; for the SSD tier it only checks that the directories exist, are
writable and have enough free space.

This module must import in milliseconds: no torch, no vllm; yaml/json are imported only when a
config file is read.
"""

from __future__ import annotations

import contextvars
import logging
import os
import typing
from collections.abc import Mapping
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "CONFIG_PATH_ENV",
    "ENV_PREFIX",
    "EVICTION_POLICIES",
    "GIB",
    "LOG_LEVELS",
    "OVERRIDES_NAME",
    "SETTING_NAMES",
    "ConfigError",
    "FlexKVSettings",
    "env_var_name",
    "load_settings",
    "settings_table_markdown",
]

_log = logging.getLogger(__name__)

GIB = 1 << 30
"""Bytes per GiB; every ``*_gb`` setting is in GiB (2**30 bytes)."""

ENV_PREFIX = "FLEXKV_"
CONFIG_PATH_ENV = "FLEXKV_CONFIG_PATH"
OVERRIDES_NAME = "kv_connector_extra_config"

EvictionPolicy = Literal["lru", "lfu", "fifo", "mru", "slru", "filo"]
SsdIoEngine = Literal["auto", "threads", "uring"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
SavePolicy = Literal["all", "prompt", "finished"]
CudaIssue = Literal["caller", "thread", "caller-loads"]
EVICTION_POLICIES: tuple[str, ...] = typing.get_args(EvictionPolicy)
LOG_LEVELS: tuple[str, ...] = typing.get_args(LogLevel)

MIN_TIER_GB = 4096 / GIB  # one page: anything smaller is a typo, not a cache (a block needs more)
# Settings of FlexKV that dynamo-flexkv does not implement: accepted only when off, so FlexKV config
# files and Dynamo's guide keep working; turned on, start-up fails saying why.
_RETIRED = {
    "enable_gds": "GPUDirect Storage is not supported by dynamo-flexkv (SSD blocks are staged through "
                  "the CPU tier); unset it or set it to false",
}
_FALSE_WORDS = ("", "0", "false", "no", "off")

_REMOTE_SCHEMES = ("mooncake", "redis")
_PORT_SCHEMES = ("ipc://", "tcp://")
_MAX_VALUE_REPR = 400


def env_var_name(setting: str) -> str:
    """``cpu_cache_gb`` -> ``FLEXKV_CPU_CACHE_GB``."""
    return ENV_PREFIX + setting.upper()


class ConfigError(ValueError):
    """Invalid dynamo-flexkv configuration. ``str(err)`` has one line per problem."""

    def __init__(self, problems: str | list[str]):
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# --------------------------------------------------------------------------------------------------
# Internal error plumbing: validators raise these, the converter turns them into ConfigError lines.


class _UseAllowed(ValueError):
    """Raised by a validator to say "report this field's documented allowed values"."""


class _Problem:
    __slots__ = ("field", "reason", "value")

    def __init__(self, field: str, reason: str, value: Any):
        # ``reason`` may contain ``{other_field}`` placeholders; they are replaced by that setting's
        # name in the same spelling (env var / key) the user used for ``field``.
        self.field = field
        self.reason = reason
        self.value = value


class _Problems(ValueError):
    """Cross-field problems found by the model validator."""

    def __init__(self, problems: list[_Problem]):
        self.problems = problems
        super().__init__("; ".join(f"{p.field}: {p.reason}" for p in problems))


def _gb_field(default: float, description: str, *, gt: float | None = None,
              ge: float | None = None, allowed: str) -> Any:
    return Field(default, description=description, gt=gt, ge=ge, allow_inf_nan=False,
                 json_schema_extra={"x-allowed": allowed})


class FlexKVSettings(BaseModel):
    """All dynamo-flexkv settings. Immutable; build it with :func:`load_settings`.

    Constructing it directly (``FlexKVSettings(cpu_cache_gb=2)``) also validates and raises
    :class:`ConfigError`; ``model_copy(update=...)`` does NOT validate -- avoid it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_cache_gb: float = _gb_field(
        1.0,
        "Size of the CPU (host-memory) tier in GiB. FlexKV's Dynamo guide requires "
        "FLEXKV_CPU_CACHE_GB; here it defaults to 1.0 so the package works out of the box -- "
        "size it for production.",
        ge=MIN_TIER_GB,
        allowed="a number of GiB, at least one 4 KiB page (0.0000039); fractions such as 0.25 allowed",
    )
    eviction_policy: EvictionPolicy = Field(
        "lru",
        description="Which cached block is evicted first when a tier is full.",
    )
    server_recv_port: Optional[str] = Field(
        None,
        description="FlexKV-style address that names this instance's cache (its shared-memory "
        "pool). Leave unset: each vLLM instance then derives a unique one. A second live instance "
        "given the same value fails at start-up instead of sharing the cache.",
        json_schema_extra={
            "x-allowed": "unset, or an address starting with ipc:// or tcp:// (tcp://host:port)",
            "x-default": "unset (auto: unique per instance)",
        },
    )
    layerwise_load: Literal["auto"] | bool = Field(
        "auto",
        description="Load CPU-tier hits in the same step as the forward pass, layer by layer (layer i "
        "computes while layer i+1 is still arriving). Off: every hit is loaded between steps. Hits "
        "that must first come up from SSD, and every hit of a hybrid model (several KV-cache groups "
        "or a sliding window), are always loaded between steps. Per-layer waits cannot run inside a "
        "CUDA graph, so on makes vLLM replace full CUDA graphs by piecewise ones, which slows "
        "decoding (docs/gpu.md); auto loads layer by layer only when vLLM runs without full CUDA "
        "graphs (eager, or the CPU build).",
        json_schema_extra={"x-allowed": "auto, or true or false (also 1/0, yes/no, on/off)"},
    )
    cpu_async_copies: bool = Field(
        False,
        description="CPU build of vLLM only: copy blocks between vLLM's cache and the CPU tier on a "
        "background thread, completing after the step that started them as on a GPU (saves overlap "
        "the next forward pass). Off: each copy completes before the step goes on.",
    )
    cuda_issue: CudaIssue = Field(
        "caller",
        description="CUDA only: which thread issues the copies between vLLM's cache and the CPU tier. "
        "`caller`: vLLM's engine thread, within the step (a 4 GiB load takes ~7 ms to issue; the "
        "copies run on their own streams). `thread`: a background thread per direction, so the step "
        "goes on at once; it must win the GIL back for every driver call, which behind vLLM's busy "
        "engine thread made a 4 GiB load take seconds instead of 79 ms (docs/gpu.md). "
        "`caller-loads`: loads by the engine thread, saves by a background thread.",
    )
    save_policy: SavePolicy = Field(
        "all",
        description="When a request's computed blocks are saved to the CPU tier. `all`: every full "
        "block, prompt and generated, in the step after its KV was computed, while the request runs "
        "(a long generation or a later turn of a chat finds its answer cached; vLLM's "
        "OffloadingConnector with offload_prompt_only=false). `prompt`: prompt blocks only, as they "
        "are computed (vLLM's OffloadingConnector default). `finished`: every full block, once the "
        "request finishes. Whatever the policy, a preempted request's computed blocks (prompt blocks "
        "only under `prompt`) are saved before vLLM reuses them and loaded when it resumes.",
    )
    log_level: LogLevel = Field(
        "INFO",
        description="Log level of dynamo-flexkv's own loggers.",
    )
    enable_metrics: bool = Field(
        True,
        description="Collect and export offload metrics (`vllm:flexkv_*`: lookups, hits and misses "
        "per tier, bytes moved, copy times and sizes; docs/dynamo.md lists them with their vLLM "
        "native `vllm:kv_offload_*` equivalents).",
    )
    ssd_cache_gb: float = _gb_field(
        0.0,
        "Size of the SSD tier in GiB, spread over ssd_cache_dir. 0 disables the SSD tier.",
        ge=0,
        allowed="a number >= 0 (GiB); must fit in the free space of ssd_cache_dir",
    )
    ssd_cache_dir: tuple[str, ...] = Field(
        (),
        description="Directories that hold the SSD tier's files, ideally one per NVMe device. "
        "Relative paths are resolved against the working directory. Ignored while "
        "ssd_cache_gb is 0.",
        json_schema_extra={
            "x-allowed": "existing writable directories, given as a list or as one ;-separated "
            "string (/data0/kv;/data1/kv); at least one when ssd_cache_gb > 0",
            "x-default": "empty",
        },
    )
    ssd_io_threads: int = Field(
        8,
        ge=1,
        le=256,
        description="Threads that issue SSD reads and writes.",
        json_schema_extra={"x-allowed": "an integer from 1 to 256"},
    )
    ssd_queue_depth: int = Field(
        32,
        ge=1,
        le=1024,
        description="Most SSD I/O requests in flight at once.",
        json_schema_extra={"x-allowed": "an integer from 1 to 1024"},
    )
    ssd_io_engine: SsdIoEngine = Field(
        "auto",
        description="How SSD reads and writes are issued: threads (vectored syscalls on "
        "ssd_io_threads threads), uring (one io_uring with ssd_queue_depth requests in flight; "
        "needs the liburing==2024.5.3 binding, the [uring] extra) or auto (threads; see "
        "docs/ssd-tier.md).",
    )
    ssd_io_timeout_s: float = Field(
        20.0,
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="Longest an SSD read or write batch may take. A batch still pending then fails "
        "(its blocks are recomputed) and the SSD tier is disabled: the disk is stuck.",
        json_schema_extra={"x-allowed": "a number of seconds > 0 and <= 3600"},
    )
    remote_store: Optional[str] = Field(
        None,
        description="URL of a cluster-wide KV store shared by all instances: a Mooncake master "
        "(mooncake://host:port) or Redis (redis://host:port[/db]). Unset disables the remote "
        "tier.",
        json_schema_extra={
            "x-allowed": "unset, mooncake://host:port or redis://host:port[/db]",
            "x-default": "unset",
        },
    )
    remote_cache_gb: float = _gb_field(
        0.0,
        "Memory in GiB this instance contributes to the remote store (Mooncake: its segment, "
        "at least 16 MiB) and the size of its index view of the store; 0 contributes nothing "
        "(Redis: memory is Redis's own maxmemory) and keeps a default view.",
        ge=0,
        allowed="a number >= 0 (GiB); > 0 needs remote_store",
    )
    remote_metadata_server: str = Field(
        "P2PHANDSHAKE",
        description="Mooncake only: where transfer engines publish their segments, e.g. the master's "
        "embedded server (http://host:port/metadata). P2PHANDSHAKE needs no server.",
        json_schema_extra={"x-allowed": "P2PHANDSHAKE or http://host:port/path"},
    )
    remote_protocol: Literal["tcp", "rdma"] = Field(
        "tcp",
        description="Mooncake only: the transfer protocol between this instance and the store.",
    )
    remote_device: str = Field(
        "",
        description="Mooncake only: RDMA device names (comma-separated) for protocol rdma; empty "
        "lets Mooncake choose.",
        json_schema_extra={"x-allowed": "empty, or device names such as mlx5_0,mlx5_1"},
    )
    remote_local_hostname: Optional[str] = Field(
        None,
        description="Mooncake only: the address other nodes reach this instance's segment at. "
        "Unset: the local address of the route to the master.",
        json_schema_extra={"x-allowed": "unset, or a host name or IP address", "x-default": "unset (auto)"},
    )
    remote_start_degraded: bool = Field(
        True,
        description="When the remote store cannot be reached at start-up (refused, or a master that "
        "never answers): on starts with the tier answering misses (one warning line, "
        "vllm:flexkv_tier_healthy 0) and connects in the background; off fails with one error "
        "line. A malformed URL always fails.",
    )
    remote_timeout_s: float = Field(
        5.0,
        gt=0,
        le=600,
        allow_inf_nan=False,
        description="Deadline of every call to the remote store (read, write, lookup): an "
        "unanswered call is a miss (the request recomputes) and degrades the tier, which probes "
        "the store every remote_timeout_s until it answers. Also the longest a request waits for "
        "remote lookups in all.",
        json_schema_extra={"x-allowed": "a number of seconds > 0 and <= 600"},
    )

    # ---------------------------------------------------------------------------------------------

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _convert_validation_error(exc, data, _ORIGINS.get()) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> FlexKVSettings:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            causes = [(e.get("ctx") or {}).get("error") for e in exc.errors(include_url=False)]
            if len(causes) == 1 and isinstance(causes[0], ConfigError):
                raise causes[0] from None
            raise _convert_validation_error(exc, obj if isinstance(obj, Mapping) else {},
                                            _ORIGINS.get()) from None

    @property
    def cpu_cache_bytes(self) -> int:
        return int(self.cpu_cache_gb * GIB)

    @property
    def ssd_cache_bytes(self) -> int:
        return int(self.ssd_cache_gb * GIB)

    @property
    def remote_cache_bytes(self) -> int:
        return int(self.remote_cache_gb * GIB)

    @property
    def ssd_enabled(self) -> bool:
        return self.ssd_cache_gb > 0

    @property
    def remote_enabled(self) -> bool:
        return self.remote_store is not None

    # ---- field validators -----------------------------------------------------------------------

    @field_validator("cpu_cache_gb", "ssd_cache_gb", "remote_cache_gb", "ssd_io_threads",
                     "ssd_queue_depth", "ssd_io_timeout_s", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any) -> Any:
        # pydantic's lax mode would turn ``cpu_cache_gb: true`` into 1.0.
        if isinstance(value, bool):
            raise _UseAllowed()
        if isinstance(value, str):
            return value.strip()
        return value

    @field_validator("eviction_policy", "save_policy", "ssd_io_engine", "layerwise_load", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @field_validator("ssd_cache_dir", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        if value is None:
            return ()
        if isinstance(value, str):
            items: list[Any] = value.split(";")
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _UseAllowed()
        dirs: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise _UseAllowed()
            item = item.strip()
            if not item:
                continue
            path = os.path.abspath(os.path.expanduser(item))
            if path in dirs:
                raise ValueError(f"lists {path} more than once")
            dirs.append(path)
        return tuple(dirs)

    @field_validator("server_recv_port", mode="before")
    @classmethod
    def _check_port(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise _UseAllowed()
        value = value.strip()
        if not value.startswith(_PORT_SCHEMES) or len(value) <= len("ipc://"):
            raise ValueError("expected an address starting with ipc:// or tcp:// "
                             "(e.g. ipc:///tmp/flexkv_server), or leave it unset for auto")
        if value.startswith("tcp://"):
            host, sep, port = value[len("tcp://"):].rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("a tcp:// address must be tcp://host:port with a port 1-65535")
        return value

    @field_validator("remote_store", mode="before")
    @classmethod
    def _check_remote(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, str):
            raise _UseAllowed()
        from urllib.parse import urlsplit

        value = value.strip()
        shape = "expected mooncake://host:port or redis://host:port[/db]"
        try:
            url = urlsplit(value)
            port = url.port
        except ValueError:
            raise ValueError(f"{shape}; the port must be a number 1-65535") from None
        scheme = url.scheme.lower()
        if scheme not in _REMOTE_SCHEMES:
            got = f"scheme {url.scheme}://" if url.scheme else "no scheme"
            raise ValueError(f"{shape} ({got} is not supported)")
        if not url.hostname or port is None or port == 0:
            raise ValueError(f"{shape}; host and port are required")
        if url.query or url.fragment:
            raise ValueError(f"{shape}; no ?query or #fragment")
        path = url.path.strip("/")
        if scheme == "mooncake" and path:
            raise ValueError(f"{shape}; a mooncake:// address has no path")
        if scheme == "redis" and path and not path.isdigit():
            raise ValueError(f"{shape}; the Redis db must be a number, got /{path}")
        return value

    # ---- cross-field checks (run only when every field is valid) --------------------------------

    @model_validator(mode="after")
    def _check_tiers(self) -> FlexKVSettings:
        problems: list[_Problem] = []
        if 0 < self.ssd_cache_gb < MIN_TIER_GB:
            problems.append(_Problem("ssd_cache_gb", "use 0 (off) or at least one 4 KiB page (0.0000039)",
                                     self.ssd_cache_gb))
        if self.ssd_io_engine == "uring":
            from dynamo_flexkv.storage.ssd.engines import uring_available

            available, why = uring_available()
            if not available:
                problems.append(_Problem("ssd_io_engine", f"the io_uring engine cannot run here: {why}",
                                         self.ssd_io_engine))
        if self.remote_cache_gb > 0 and self.remote_store is None:
            problems.append(_Problem("remote_cache_gb", "the remote tier needs {remote_store}",
                                     self.remote_cache_gb))
        if self.ssd_cache_gb > 0:
            problems.extend(self._ssd_problems())
        if problems:
            raise _Problems(problems)
        return self

    def _ssd_problems(self) -> list[_Problem]:
        import shutil

        if not self.ssd_cache_dir:
            return [_Problem("ssd_cache_gb",
                             "the SSD tier needs at least one directory in {ssd_cache_dir}",
                             self.ssd_cache_gb)]
        dirs = list(self.ssd_cache_dir)
        problems: list[_Problem] = []
        for path in self.ssd_cache_dir:
            if not os.path.exists(path):
                problems.append(_Problem("ssd_cache_dir", f"{path} does not exist", dirs))
            elif not os.path.isdir(path):
                problems.append(_Problem("ssd_cache_dir", f"{path} is not a directory", dirs))
            elif not os.access(path, os.W_OK | os.X_OK):
                problems.append(_Problem("ssd_cache_dir", f"{path} is not writable", dirs))
        if problems:
            return problems
        from dynamo_flexkv.storage.ssd.seats import reclaimable_bytes

        # Free space: count each filesystem once even when several directories live on it. Our own
        # files from an earlier run (and those of identities nobody runs) are reused or reclaimed
        # at start-up, so their space counts as free.
        free_by_dev: dict[int, int] = {}
        per_dir: list[str] = []
        for path in self.ssd_cache_dir:
            try:
                dev = os.stat(path).st_dev
                free = shutil.disk_usage(path).free
            except OSError as exc:
                return [_Problem("ssd_cache_dir", f"cannot stat {path}: {exc.strerror or exc}",
                                 dirs)]
            free_by_dev.setdefault(dev, free)
            ours = reclaimable_bytes(path)
            free_by_dev[dev] += ours
            per_dir.append(f"{path}: {(free + ours) / GIB:.1f} GiB")
        total_free = sum(free_by_dev.values())
        shared = "; a shared filesystem counts once" if len(free_by_dev) < len(per_dir) else ""
        if self.ssd_cache_gb * GIB > total_free:
            return [_Problem(
                "ssd_cache_gb",
                f"only {total_free / GIB:.1f} GiB is free in {{ssd_cache_dir}} "
                f"({', '.join(per_dir)}{shared})",
                self.ssd_cache_gb,
            )]
        return []


SETTING_NAMES: tuple[str, ...] = tuple(FlexKVSettings.model_fields)
"""All setting names, in declaration order (= the allowed file / override keys)."""


# --------------------------------------------------------------------------------------------------
# Sources


class _Source:
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
        shown = repr(value)
        if len(shown) > _MAX_VALUE_REPR:
            shown = shown[:_MAX_VALUE_REPR - 3] + "..."
        if self.kind == "file":
            return f"{field}={shown} in {self.path} ({CONFIG_PATH_ENV})"
        return f"{self.name(field)}={shown}"


_DIRECT = _Source("direct")
# Where each value passed to FlexKVSettings.__init__ came from (set by load_settings).
_ORIGINS: contextvars.ContextVar[Mapping[str, _Source]] = contextvars.ContextVar(
    "dynamo_flexkv_config_origins", default={})


def _suggest(key: Any) -> str:
    if not isinstance(key, str):
        return ""
    import difflib

    candidate = key.strip().lower()
    if candidate.startswith(ENV_PREFIX.lower()):
        candidate = candidate[len(ENV_PREFIX):]
    if candidate in SETTING_NAMES:
        return f"; did you mean {candidate!r}?"
    close = difflib.get_close_matches(candidate, SETTING_NAMES, n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_keys(mapping: Mapping[Any, Any], where: str) -> list[str]:
    allowed = ", ".join(SETTING_NAMES)
    return [f"unknown key {key!r} in {where}{_suggest(key)} (allowed keys are {allowed})"
            for key in mapping if key not in SETTING_NAMES]


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


def _read_config_file(path: str) -> dict[Any, Any]:
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


def load_settings(overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> FlexKVSettings:
    """Build the settings from defaults < env vars < ``FLEXKV_CONFIG_PATH`` file < ``overrides``.

    ``overrides`` is the caller's ``kv_connector_extra_config`` dict (keys = setting names).
    ``environ`` defaults to ``os.environ``. Raises :class:`ConfigError` listing every problem.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origins: dict[str, _Source] = {}
    shadowed: list[str] = []
    problems: list[str] = []

    def put(field: str, value: Any, source: _Source) -> None:
        if field in origins:
            shadowed.append(f"{origins[field].label(field)} is overridden by {source.label(field)}")
        values[field] = value
        origins[field] = source

    def retired(mapping: Mapping[Any, Any], source: _Source) -> dict[Any, Any]:
        """`mapping` without the retired settings; a retired one that is on is a problem."""
        for field, why in _RETIRED.items():
            if field in mapping and str(mapping[field]).strip().lower() not in _FALSE_WORDS:
                problems.append(f"{source.describe(field, mapping[field])} is invalid: {why}")
        return {k: v for k, v in mapping.items() if k not in _RETIRED}

    env_source = _Source("env")
    retired({f: env[env_var_name(f)] for f in _RETIRED if env_var_name(f) in env}, env_source)
    for field in SETTING_NAMES:
        raw = env.get(env_var_name(field))
        if raw is not None and raw.strip():
            put(field, raw.strip(), env_source)

    config_path = (env.get(CONFIG_PATH_ENV) or "").strip()
    if config_path:
        config_path = os.path.expanduser(config_path)
        file_source = _Source("file", config_path)
        file_values = retired(_read_config_file(config_path), file_source)
        problems += _unknown_keys(file_values, f"{config_path} ({CONFIG_PATH_ENV})")
        for key, value in file_values.items():
            if key in SETTING_NAMES:
                put(key, value, file_source)

    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{OVERRIDES_NAME} must be a mapping of setting names to values, "
                              f"not a {type(overrides).__name__}")
        override_source = _Source("override")
        overrides = retired(overrides, override_source)
        problems += _unknown_keys(overrides, OVERRIDES_NAME)
        for key, value in overrides.items():
            if key in SETTING_NAMES:
                put(key, value, override_source)

    token = _ORIGINS.set(origins)
    try:
        settings = FlexKVSettings(**values)
    except ConfigError as exc:
        raise ConfigError(problems + exc.problems) from None
    finally:
        _ORIGINS.reset(token)
    if problems:
        raise ConfigError(problems)
    for line in shadowed:
        _log.info("dynamo-flexkv config: %s", line)
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("dynamo-flexkv config: %s", ", ".join(
            f"{f}={getattr(settings, f)!r} ({origins[f].label(f) if f in origins else 'default'})"
            for f in SETTING_NAMES))
    return settings


# --------------------------------------------------------------------------------------------------
# pydantic ValidationError -> ConfigError


def _allowed_text(field: str) -> str:
    info = FlexKVSettings.model_fields[field]
    literal = _literal_values(info.annotation)
    if literal:
        return ", ".join(literal) + " (case-insensitive)"
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "x-allowed" in extra:
        return str(extra["x-allowed"])
    if info.annotation is bool:
        return "true or false (also 1/0, yes/no, on/off)"
    return ""


def _expected(field: str) -> str:
    literal = _literal_values(FlexKVSettings.model_fields[field].annotation)
    if literal:
        return "allowed values are " + ", ".join(literal)
    return "expected " + _allowed_text(field)


def _literal_values(annotation: Any) -> tuple[str, ...]:
    if typing.get_origin(annotation) is Literal:
        return tuple(str(v) for v in typing.get_args(annotation))
    return ()


def _convert_validation_error(exc: ValidationError, raw: Mapping[str, Any],
                              origins: Mapping[str, _Source]) -> ConfigError:
    lines: list[str] = []
    seen: set[str] = set()

    def add(field: str, reason: str, value: Any) -> None:
        if field in seen:
            return
        seen.add(field)
        lines.append(f"{origins.get(field, _DIRECT).describe(field, value)} is invalid: {reason}")

    for err in exc.errors(include_url=False):
        loc = err.get("loc") or ()
        field = loc[0] if loc and isinstance(loc[0], str) else None
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, _Problems):
            for problem in cause.problems:
                source = origins.get(problem.field, _DIRECT)
                reason = problem.reason
                for name in SETTING_NAMES:
                    reason = reason.replace("{" + name + "}", source.name(name))
                add(problem.field, reason, raw.get(problem.field, problem.value))
            continue
        if field is None or field not in SETTING_NAMES:
            if err.get("type") == "extra_forbidden":
                lines.append(f"unknown setting {field!r}{_suggest(field)} "
                             f"(allowed settings are {', '.join(SETTING_NAMES)})")
            else:
                lines.append(err.get("msg", str(err)))
            continue
        if isinstance(cause, ValueError) and not isinstance(cause, _UseAllowed):
            reason = str(cause)
        else:
            reason = _expected(field)
        add(field, reason, raw.get(field, err.get("input")))
    return ConfigError(lines or [str(exc).splitlines()[0]])


# --------------------------------------------------------------------------------------------------
# Reference table for docs/configuration.md (scripts/gen_config_docs.py)


def _type_text(field: str, annotation: Any) -> str:
    if _literal_values(annotation):
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
            _allowed_text(name),
            info.description or "",
        )) + " |")
    return "\n".join(rows)
