"""The one settings model of dynamo-flexkv: every knob is a field of :class:`FlexKVSettings`, named as
FlexKV names it (``cpu_cache_gb`` in a file or ``kv_connector_extra_config``, ``FLEXKV_CPU_CACHE_GB`` in
the environment). Where values come from, and in which order, is `config_sources`.

Every problem is a :class:`ConfigError` line naming the setting as the user wrote it, the bad value and
what is allowed, e.g.::

    FLEXKV_EVICTION_POLICY='random' is invalid: allowed values are lru, lfu, fifo, mru, slru, filo

Validation allocates nothing and looks at nothing outside the values: whether the SSD directories exist
and have room, or a store's URL names a known backend, is checked by the planes that own them
(`tiers/preflight.py`, passed in as `load_settings(checks=...)` at start-up), reported on the same lines.
This module imports no plane, no torch, no vllm; yaml/json only when a config file is read.
"""

from __future__ import annotations

import contextvars
import logging
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dynamo_flexkv.config_errors import (
    Problem,
    Problems,
    UseAllowed,
    problem_line,
    validation_error_lines,
)
from dynamo_flexkv.config_sources import (
    CONFIG_PATH_ENV,
    ENV_PREFIX,
    OVERRIDES_NAME,
    RETIRED,
    ConfigError,
    Source,
    env_var_name,
    read_config_file,
    retired_problems,
    shown_value,
    unknown_keys,
)

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
]

_log = logging.getLogger(__name__)

GIB = 1 << 30
"""Bytes per GiB; every ``*_gb`` setting is in GiB (2**30 bytes)."""

EvictionPolicy = Literal["lru", "lfu", "fifo", "mru", "slru", "filo"]
SsdIoEngine = Literal["auto", "threads", "uring"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
SavePolicy = Literal["all", "prompt", "finished"]
CudaIssue = Literal["caller", "thread", "caller-loads"]
CudaCopyMethod = Literal["auto", "staged", "batch", "zerocopy", "torch"]
EVICTION_POLICIES: tuple[str, ...] = typing.get_args(EvictionPolicy)
LOG_LEVELS: tuple[str, ...] = typing.get_args(LogLevel)

MIN_TIER_GB = 4096 / GIB  # one page: anything smaller is a typo, not a cache (a block needs more)

_PORT_SCHEMES = ("ipc://", "tcp://")

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
    cuda_copy_method: CudaCopyMethod = Field(
        "auto",
        description="CUDA only: how blocks are copied between vLLM's cache and the pinned CPU tier. "
        "`auto`: the fastest one available here (staged, then batch, zerocopy, torch). The others "
        "force one for measurements (docs/gpu-data-plane.md): `staged` gathers blocks on the GPU and "
        "copies whole rows; `batch` copies every block's layers straight; `zerocopy` lets a kernel "
        "read and write the pinned pool; `torch` takes the pageable path. One that cannot run here "
        "falls back to auto with a warning.",
    )
    cuda_batch_memcpy: bool = Field(
        True,
        description="CUDA only: issue copies with the driver's batched cuMemcpyBatchAsync (CUDA 12.8 "
        "drivers and later). Off: one cuMemcpyAsync per copy, as on older drivers (to measure that "
        "path on a new driver).",
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
    weights_version: Optional[str] = Field(
        None,
        min_length=1,
        description="Names the model's weights in every tier's identity, replacing the content "
        "identity computed at start-up (safetensors headers and sampled bytes of every tensor), for "
        "operators who pin versions themselves. Engines with the same value share stored KV; set a "
        "new value whenever the weights change, or stale KV is served.",
        json_schema_extra={"x-allowed": "unset, or any non-empty string", "x-default": "unset (content identity)"},
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
        "(its blocks are recomputed) and the SSD tier stops serving until a background probe finds the "
        "disk answering again.",
        json_schema_extra={"x-allowed": "a number of seconds > 0 and <= 3600"},
    )
    remote_store: Optional[str] = Field(
        None,
        description="URL of a cluster-wide KV store shared by all instances: a Mooncake master "
        "(mooncake://host:port) or Redis (redis://[user:password@]host:port[/db], or rediss:// "
        "for TLS, see remote_tls_ca_file). A password (percent-encoded where it holds @ : /) is "
        "shown as *** in every log line and error. Unset disables the remote tier.",
        json_schema_extra={
            "x-allowed": "unset, mooncake://host:port or redis[s]://[user:password@]host:port[/db]",
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

    remote_tls_ca_file: Optional[str] = Field(
        None,
        description="Redis over TLS (rediss://) only: PEM file of the CA(s) the server's certificate "
        "must chain to (its host name or IP is checked too). Unset: the system's trusted CAs.",
        json_schema_extra={"x-allowed": "unset, or a path to a PEM file", "x-default": "unset"},
    )
    remote_tls_cert_file: Optional[str] = Field(
        None,
        description="Redis over TLS (rediss://) only: PEM client certificate, for a server that "
        "requires one (redis-server --tls-auth-clients yes); needs remote_tls_key_file.",
        json_schema_extra={"x-allowed": "unset, or a path to a PEM file", "x-default": "unset"},
    )
    remote_tls_key_file: Optional[str] = Field(
        None,
        description="Redis over TLS (rediss://) only: PEM private key of remote_tls_cert_file.",
        json_schema_extra={"x-allowed": "unset, or a path to a PEM file", "x-default": "unset"},
    )
    remote_mac_key_file: Optional[str] = Field(
        None,
        description="File holding a secret (at least 16 bytes, e.g. `openssl rand -hex 32`) shared by "
        "every instance of the store: each value then carries a keyed MAC over its header and bytes, "
        "and a value written without this secret or changed in the store is a miss. Unset: values "
        "carry a checksum, which any client that can write to the store can forge.",
        json_schema_extra={"x-allowed": "unset, or a path to a file readable by this user",
                           "x-default": "unset"},
    )

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise _config_error(exc, data, _ORIGINS.get()) from None

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> FlexKVSettings:  # type: ignore[override]
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as exc:
            causes = [(e.get("ctx") or {}).get("error") for e in exc.errors(include_url=False)]
            if len(causes) == 1 and isinstance(causes[0], ConfigError):
                raise causes[0] from None
            raise _config_error(exc, obj if isinstance(obj, Mapping) else {},
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
            raise UseAllowed()
        if isinstance(value, str):
            return value.strip()
        return value

    @field_validator("eviction_policy", "save_policy", "ssd_io_engine", "layerwise_load", "cuda_copy_method",
                     mode="before")
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
            raise UseAllowed()
        dirs: list[str] = []
        for item in items:
            if not isinstance(item, str):
                raise UseAllowed()
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
            raise UseAllowed()
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
        """The URL's shape only; its scheme and the rest are the store's (`storage.backend.parse_store_url`,
        at start-up)."""
        if value is None:
            return None
        if not isinstance(value, str):
            raise UseAllowed()
        value = value.strip()
        if "://" not in value:
            raise ValueError("expected scheme://host:port, e.g. mooncake://host:port or redis://host:port[/db]")
        return value

    # ---- cross-field checks (run only when every field is valid) --------------------------------

    @model_validator(mode="after")
    def _check_tiers(self) -> FlexKVSettings:
        problems: list[Problem] = []
        if 0 < self.ssd_cache_gb < MIN_TIER_GB:
            problems.append(Problem("ssd_cache_gb", "use 0 (off) or at least one 4 KiB page (0.0000039)",
                                     self.ssd_cache_gb))
        if self.remote_cache_gb > 0 and self.remote_store is None:
            problems.append(Problem("remote_cache_gb", "the remote tier needs {remote_store}",
                                     self.remote_cache_gb))
        if self.ssd_cache_gb > 0 and not self.ssd_cache_dir:
            problems.append(Problem("ssd_cache_gb", "the SSD tier needs at least one directory in {ssd_cache_dir}",
                                     self.ssd_cache_gb))
        if problems:
            raise Problems(problems)
        return self


SETTING_NAMES: tuple[str, ...] = tuple(FlexKVSettings.model_fields)
"""All setting names, in declaration order (= the allowed file / override keys)."""


# Where each value passed to FlexKVSettings.__init__ came from (set by load_settings).
_ORIGINS: contextvars.ContextVar[Mapping[str, Source]] = contextvars.ContextVar(
    "dynamo_flexkv_config_origins", default={})


StartUpChecks = Callable[[FlexKVSettings], Iterable[tuple[str, str]]]
"""Checks of valid settings against the machine (directories, free space, a store's URL): each problem
is ``(setting, reason)``; ``{other_setting}`` in a reason names that setting as the user spelled it."""


def load_settings(overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None,
                  checks: StartUpChecks | None = None) -> FlexKVSettings:
    """Build the settings from defaults < env vars < ``FLEXKV_CONFIG_PATH`` file < ``overrides``.

    ``overrides`` is the caller's ``kv_connector_extra_config`` dict (keys = setting names).
    ``environ`` defaults to ``os.environ``. ``checks`` (start-up: `tiers.preflight.preflight`) run
    once every value is valid. Raises :class:`ConfigError` listing every problem.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    origins: dict[str, Source] = {}
    shadowed: list[str] = []
    problems: list[str] = []

    def put(field: str, value: Any, source: Source) -> None:
        if field in origins:
            shadowed.append(f"{origins[field].label(field)} is overridden by {source.label(field)}")
        values[field] = value
        origins[field] = source

    def retired(mapping: Mapping[Any, Any], source: Source) -> dict[Any, Any]:
        problems.extend(retired_problems(mapping, source))
        return {k: v for k, v in mapping.items() if k not in RETIRED}

    env_source = Source("env")
    retired({f: env[env_var_name(f)] for f in RETIRED if env_var_name(f) in env}, env_source)
    for field in SETTING_NAMES:
        raw = env.get(env_var_name(field))
        if raw is not None and raw.strip():
            put(field, raw.strip(), env_source)

    config_path = (env.get(CONFIG_PATH_ENV) or "").strip()
    if config_path:
        config_path = os.path.expanduser(config_path)
        file_source = Source("file", config_path)
        file_values = retired(read_config_file(config_path), file_source)
        problems += unknown_keys(file_values, f"{config_path} ({CONFIG_PATH_ENV})", SETTING_NAMES)
        for key, value in file_values.items():
            if key in SETTING_NAMES:
                put(key, value, file_source)

    if overrides:
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{OVERRIDES_NAME} must be a mapping of setting names to values, "
                              f"not a {type(overrides).__name__}")
        override_source = Source("override")
        overrides = retired(overrides, override_source)
        problems += unknown_keys(overrides, OVERRIDES_NAME, SETTING_NAMES)
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
    for field, reason in checks(settings) if checks is not None else ():
        problems.append(problem_line(field, reason, values.get(field, getattr(settings, field)), origins,
                                     SETTING_NAMES))
    if problems:
        raise ConfigError(problems)
    for line in shadowed:
        _log.info("dynamo-flexkv config: %s", line)
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("dynamo-flexkv config: %s", ", ".join(
            f"{f}={shown_value(f, getattr(settings, f))!r} ({origins[f].label(f) if f in origins else 'default'})"
            for f in SETTING_NAMES))
    return settings


def _config_error(exc: ValidationError, raw: Mapping[str, Any], origins: Mapping[str, Source]) -> ConfigError:
    return ConfigError(validation_error_lines(exc, raw, origins, FlexKVSettings.model_fields) or
                       [str(exc).splitlines()[0]])
