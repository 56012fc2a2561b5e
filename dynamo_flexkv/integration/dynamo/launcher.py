"""`python -m dynamo_flexkv.vllm`: Dynamo 1.6.1's vLLM worker, plus the legacy flags of Dynamo's FlexKV guide.

Dynamo 1.6.1 rejects `--connector`, `DYN_CONNECTOR`, `--is-prefill-worker` and `--is-decode-worker`.
This launcher accepts everything `python -m dynamo.vllm` accepts and those legacy spellings,
rewrites them into 1.6.1's flags (:func:`translate`, pure, unit-tested) and then runs Dynamo's worker
in this process, the way `python -m dynamo.vllm` does (:func:`main`).

    --connector flexkv             -> --kv-transfer-config {"kv_connector":"FlexKVConnectorV1",...}
    --connector nixl flexkv        -> MultiConnector [FlexKVConnectorV1, NixlConnector]
                                      (kvbm's PdConnector when `kvbm` is importable)
    DYN_CONNECTOR="nixl flexkv"    -> the same, from the environment
    --is-prefill-worker            -> --disaggregation-mode prefill
    --is-decode-worker             -> --disaggregation-mode decode (also implied by NIXL alone)
    DYNAMO_USE_FLEXKV=1            -> FlexKV for a worker given no connector, and vLLM KV events on

FlexKV comes first among several connectors: vLLM's MultiConnector loads from the first child that
reports hits and saves to all of them. Each worker gets its own FlexKV identity from vLLM's per-engine
`engine_id` (see integration/vllm/instance.py) unless FLEXKV_SERVER_RECV_PORT pins one.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.util import find_spec

FLEXKV = {"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both"}
NIXL = {"kv_connector": "NixlConnector", "kv_role": "kv_both"}
KVBM_MODULE = "kvbm.vllm_integration.connector"
# legacy name -> the child config it stands for (Dynamo's own legacy mapping, kv_role as in 1.6 examples)
CONNECTORS: dict[str, dict[str, str]] = {
    "flexkv": FLEXKV,
    "nixl": NIXL,
    "lmcache": {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"},
    "kvbm": {"kv_connector": "DynamoConnector", "kv_connector_module_path": KVBM_MODULE, "kv_role": "kv_both"},
}
FLEXKV_CLASS_NAMES = ("FlexKVConnectorV1", "DynamoFlexKVConnector")
NO_CONNECTOR = ("none", "null")
ALLOWED_NAMES = (*CONNECTORS, *NO_CONNECTOR)
PD_FIRST_CHILDREN = ("flexkv", "lmcache", "kvbm")  # what kvbm's PdConnector accepts before NIXL
TRUTHY = ("1", "true", "yes", "on")

LEGACY_HELP = """\
dynamo-flexkv legacy worker flags (translated to Dynamo 1.6.1's flags, then `python -m dynamo.vllm`):
  --connector NAME [NAME ...]   KV connectors: {names}; env DYN_CONNECTOR
  --is-prefill-worker           same as --disaggregation-mode prefill
  --is-decode-worker            same as --disaggregation-mode decode (implied by --connector nixl alone)
  DYNAMO_USE_FLEXKV=1           FlexKV for a worker given no connector; turns vLLM KV events on
                                (a private ipc:// path; tcp://*:$DYN_VLLM_KV_EVENT_PORT, all
                                interfaces, only when that variable is set)
""".format(names=", ".join(ALLOWED_NAMES))


class LauncherError(ValueError):
    """A command line this launcher cannot translate; the message says what to change."""


@dataclass(frozen=True)
class Translation:
    argv: list[str]  # what Dynamo's worker parses
    set_env: dict[str, str] = field(default_factory=dict)
    unset_env: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # one line per rewrite, for the log
    uses_flexkv: bool = False
    uses_nixl: bool = False
    private_paths: tuple[str, ...] = ()  # ipc socket files this launcher chose; removed at exit


def _flag(token: str) -> tuple[str, str | None]:
    """'--kv_transfer_config=x' -> ('--kv-transfer-config', 'x'); vLLM accepts '_' for '-'."""
    name, eq, value = token.partition("=")
    return name.replace("_", "-"), (value if eq else None)


def _find(argv: Sequence[str], flag: str) -> tuple[int, str | None] | None:
    """Index and value of the last `flag VALUE` / `flag=VALUE` in argv."""
    found = None
    for i, token in enumerate(argv):
        name, value = _flag(token)
        if name == flag:
            if value is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
            found = (i, value)
    return found


def _split_names(values: Sequence[str]) -> list[str]:
    return [name.lower() for value in values for name in re.split(r"[\s,]+", value) if name]


def _take_legacy(argv: Sequence[str]) -> tuple[list[str], list[str] | None, bool, bool]:
    """Remove --connector/--is-prefill-worker/--is-decode-worker; returns the rest and their values."""
    rest: list[str] = []
    connectors: list[str] | None = None
    prefill = decode = False
    i = 0
    while i < len(argv):
        name, value = _flag(argv[i])
        if name == "--connector":
            values = [value] if value is not None else []
            while value is None and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                values.append(argv[i])
            connectors = _split_names(values)
        elif name == "--is-prefill-worker" and value is None:
            prefill = True
        elif name == "--is-decode-worker" and value is None:
            decode = True
        else:
            rest.append(argv[i])
        i += 1
    return rest, connectors, prefill, decode


def connector_config(names: Sequence[str], *, kvbm_available: bool) -> dict | None:
    """The `--kv-transfer-config` dict for legacy connector names (already validated)."""
    if not names:
        return None
    if len(names) == 1:
        return dict(CONNECTORS[names[0]])
    ordered = [n for n in names if n != "nixl"] + [n for n in names if n == "nixl"]  # NIXL last
    children = [dict(CONNECTORS[n]) for n in ordered]
    # vLLM reads the failure policy of the top-level config only; FlexKV sets its own when it is the
    # top level. Chained, a block that cannot be loaded must still be a miss, not a failed request.
    policy = {"kv_load_failure_policy": "recompute"} if "flexkv" in ordered else {}
    if kvbm_available and len(ordered) == 2 and ordered[0] in PD_FIRST_CHILDREN and ordered[1] == "nixl":
        return {"kv_connector": "PdConnector", "kv_role": "kv_both", **policy,
                "kv_connector_extra_config": {"connectors": children}, "kv_connector_module_path": KVBM_MODULE}
    return {"kv_connector": "MultiConnector", "kv_role": "kv_both", **policy,
            "kv_connector_extra_config": {"connectors": children}}


def _child_names(config: Mapping) -> list[str]:
    if config.get("kv_connector") in ("MultiConnector", "PdConnector"):
        return [c.get("kv_connector") for c in (config.get("kv_connector_extra_config") or {}).get("connectors", [])]
    return [config.get("kv_connector")]


def _validate_names(names: list[str], source: str) -> None:
    unknown = [n for n in names if n not in ALLOWED_NAMES]
    if unknown:
        raise LauncherError(f"unknown connector {', '.join(map(repr, unknown))} in {source}: "
                            f"allowed names are {', '.join(ALLOWED_NAMES)}")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LauncherError(f"connector {', '.join(duplicates)} given twice in {source}")
    if any(n in NO_CONNECTOR for n in names) and len(names) > 1:
        raise LauncherError(f"{source}: 'none'/'null' means no connector and cannot be combined with others")


def default_kv_events_endpoint(environ: Mapping[str, str]) -> str:
    """A private ipc:// path, or tcp://*:PORT when the user sets the legacy DYN_VLLM_KV_EVENT_PORT.

    The events carry prompt tokens and Dynamo's worker reads them on the same host, so the default
    is a Unix socket only this user can connect to. vLLM's publisher binds only wildcard TCP
    endpoints (a specific address makes it connect instead), so a TCP port means all interfaces:
    only when the user asks for one, with a warning."""
    port = (environ.get("DYN_VLLM_KV_EVENT_PORT") or "").strip()
    if port:
        if not port.isdigit():
            raise LauncherError(f"DYN_VLLM_KV_EVENT_PORT={port!r} is not a port number")
        return f"tcp://*:{port}"
    return f"ipc://{tempfile.gettempdir()}/dynamo-flexkv-kv-events-{uuid.uuid4().hex[:12]}"


def translate(argv: Sequence[str], environ: Mapping[str, str], *, kvbm_available: bool = False) -> Translation:
    """Rewrite a legacy worker command line into Dynamo 1.6.1's; raises LauncherError on a conflict."""
    rest, cli_names, prefill, decode = _take_legacy(argv)
    notes: list[str] = []
    set_env: dict[str, str] = {}
    unset_env: tuple[str, ...] = ()

    names, source = cli_names, "--connector"
    env_connector = environ.get("DYN_CONNECTOR")
    if env_connector is not None:
        unset_env = ("DYN_CONNECTOR",)  # Dynamo 1.6.1 refuses to start while it is set
        if names is None:
            names, source = _split_names([env_connector]), "DYN_CONNECTOR"
    names = names or []
    _validate_names(names, source)
    if any(n in NO_CONNECTOR for n in names):
        names = []

    # --- disaggregation mode ---
    if prefill and decode:
        raise LauncherError("--is-prefill-worker and --is-decode-worker exclude each other")
    legacy_mode = "prefill" if prefill else "decode" if decode else None
    given_mode = _find(rest, "--disaggregation-mode")
    mode = given_mode[1] if given_mode else environ.get("DYN_VLLM_DISAGGREGATION_MODE")
    if legacy_mode:
        if given_mode and given_mode[1] != legacy_mode:
            raise LauncherError(f"--is-{legacy_mode}-worker conflicts with --disaggregation-mode {given_mode[1]}")
        if not given_mode:
            rest += ["--disaggregation-mode", legacy_mode]
            notes.append(f"--is-{legacy_mode}-worker -> --disaggregation-mode {legacy_mode}")
        mode = legacy_mode
    elif names == ["nixl"] and mode is None:
        # The guide's decode worker is `--connector nixl` with no role flag; Dynamo 1.6.1 only pairs
        # a prefill worker with a worker in decode mode, and NIXL alone has no use in an aggregated one.
        rest += ["--disaggregation-mode", "decode"]
        mode = "decode"
        notes.append("--connector nixl (NIXL only) -> --disaggregation-mode decode "
                     "(add --disaggregation-mode agg to keep an aggregated worker)")

    # --- connectors ---
    use_flexkv_env = (environ.get("DYNAMO_USE_FLEXKV") or "").strip().lower() in TRUTHY
    given_config = _find(rest, "--kv-transfer-config")
    if names and given_config:
        raise LauncherError(f"{source} and --kv-transfer-config both choose the KV connector; give only one")
    if not names and not given_config and use_flexkv_env:
        names, source = ["flexkv"], "DYNAMO_USE_FLEXKV=1"
    config = connector_config(names, kvbm_available=kvbm_available)
    if config is not None:
        rest += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
        notes.append(f"{source} {' '.join(names)} -> --kv-transfer-config {rest[-1]}")
    elif given_config and given_config[1]:
        config = json.loads(given_config[1])
        if config.get("kv_connector") == "PdConnector" and not kvbm_available:
            config = {key: value for key, value in config.items() if key != "kv_connector_module_path"}
            config["kv_connector"] = "MultiConnector"
            rest[given_config[0]:given_config[0] + (1 if "=" in rest[given_config[0]] else 2)] = []
            rest += ["--kv-transfer-config", json.dumps(config, separators=(",", ":"))]
            notes.append("PdConnector needs kvbm, which is not installed -> vLLM MultiConnector with the same children")
    children = _child_names(config) if config else []
    uses_flexkv = any(name in FLEXKV_CLASS_NAMES for name in children)
    uses_nixl = "NixlConnector" in children

    if mode in ("prefill", "decode"):
        if not uses_nixl and names:
            raise LauncherError(f"a {mode} worker moves KV through NIXL: add nixl (e.g. --connector nixl flexkv)")
        # NIXL's handshake compares a compatibility hash that includes the hybrid-manager switch.
        # FlexKV and NIXL keep the manager on; kvbm's PdConnector, which a prefill worker gets when
        # kvbm is installed, turns it off — then every NIXL worker turns it off (Dynamo's guide).
        if uses_nixl and kvbm_available and not (_find(rest, "--disable-hybrid-kv-cache-manager")
                                                 or _find(rest, "--no-disable-hybrid-kv-cache-manager")):
            rest.append("--disable-hybrid-kv-cache-manager")
            notes.append(f"{mode} worker with NIXL and kvbm installed -> --disable-hybrid-kv-cache-manager")

    # --- KV events for the router ---
    private_paths: tuple[str, ...] = ()
    if use_flexkv_env and not _find(rest, "--kv-events-config") and not _find(rest, "--no-enable-prefix-caching"):
        events = {"publisher": "zmq", "topic": "kv-events", "endpoint": default_kv_events_endpoint(environ),
                  "enable_kv_cache_events": True}
        rest += ["--kv-events-config", json.dumps(events, separators=(",", ":"))]
        notes.append(f"DYNAMO_USE_FLEXKV=1 -> KV events on {events['endpoint']}" + (
            " (all interfaces, prompt tokens included: firewall the port, or unset DYN_VLLM_KV_EVENT_PORT "
            "for a private ipc:// path)" if events["endpoint"].startswith("tcp://*") else ""))
        if events["endpoint"].startswith("ipc://"):
            private_paths += (events["endpoint"].removeprefix("ipc://"),)

    seed_note = _shared_hash_seed(rest, environ, config if uses_flexkv else None)
    if seed_note:
        set_env["PYTHONHASHSEED"] = "0"
        notes.append(seed_note)
    return Translation(rest, set_env, unset_env, tuple(notes), uses_flexkv, uses_nixl, private_paths)


def _flexkv_extra_config(config: Mapping) -> Mapping:
    if config.get("kv_connector") in ("MultiConnector", "PdConnector"):
        children = (config.get("kv_connector_extra_config") or {}).get("connectors", [])
        config = next((c for c in children if c.get("kv_connector") in FLEXKV_CLASS_NAMES), {})
    return config.get("kv_connector_extra_config") or {}


def _shared_hash_seed(argv: Sequence[str], environ: Mapping[str, str], flexkv_config: Mapping | None) -> str | None:
    """Why PYTHONHASHSEED must be set for this worker, or None where vLLM's own seed is right.

    vLLM 0.31 roots every block-hash chain in NONE_HASH (v1/core/kv_cache_utils.py): from
    PYTHONHASHSEED when set, else from a fixed seed for sha256/sha256_cbor (the default; identical
    in every process already) and from random bytes per process for xxhash/xxhash_cbor, which are
    not collision resistant, so a predictable seed would let prompts be crafted to collide. Only a
    cluster tier (`remote_store`) needs engines to agree on block hashes; there, with an xxhash
    algorithm, every engine must share a seed, and 0 is the one Dynamo's `python -m dynamo.vllm`
    sets. Everywhere else the variable is left alone, keeping vLLM's per-process random seed."""
    from dynamo_flexkv.config import ConfigError, load_settings
    from dynamo_flexkv.tiers.facts import NON_DETERMINISTIC_HASH_ALGOS

    if flexkv_config is None or "PYTHONHASHSEED" in environ:
        return None
    found = _find(argv, "--prefix-caching-hash-algo")
    algo = found[1] if found and found[1] else "sha256"
    if algo not in NON_DETERMINISTIC_HASH_ALGOS:
        return None
    try:
        shared = load_settings(_flexkv_extra_config(flexkv_config), environ).remote_enabled
    except ConfigError:
        return None  # the worker reports the bad configuration itself, at start-up
    if not shared:
        return None
    return (f"remote_store with --prefix-caching-hash-algo {algo} -> PYTHONHASHSEED=0, so every engine's "
            "block hashes agree (a known seed lets xxhash collisions be precomputed: set a secret "
            "PYTHONHASHSEED shared by every worker, or use sha256)")


def _register_class_name_alias() -> None:
    """vLLM's MultiConnector rebuilds a child's stats by the child's *class* name (`FlexKVConnector`);
    make that name resolve in this process (where Dynamo's AsyncLLM rebuilds them)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_general_plugins

    from dynamo_flexkv.integration.vllm import plugin

    load_general_plugins()
    if plugin.CONNECTOR_CLASS not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(plugin.CONNECTOR_CLASS, plugin.CONNECTOR_MODULE, plugin.CONNECTOR_CLASS)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(LEGACY_HELP, file=sys.stderr)
    try:
        translation = translate(argv, os.environ, kvbm_available=find_spec("kvbm") is not None)
    except (LauncherError, json.JSONDecodeError) as err:
        print(f"dynamo-flexkv-vllm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for name in translation.unset_env:
        os.environ.pop(name, None)
    for name, value in translation.set_env.items():
        os.environ.setdefault(name, value)
    for note in translation.notes:
        print(f"dynamo-flexkv-vllm: {note}", file=sys.stderr, flush=True)
    for path in translation.private_paths:  # vLLM leaves its ipc socket file behind
        atexit.register(lambda path=path: os.path.exists(path) and os.unlink(path))

    from dynamo.common.snapshot.restore_context import maybe_run_restore_standby_mode

    maybe_run_restore_standby_mode()  # as `python -m dynamo.vllm` does, before importing its main
    if translation.uses_flexkv:
        _register_class_name_alias()
    if translation.uses_nixl:
        from dynamo.vllm.args import ensure_side_channel_host

        ensure_side_channel_host()  # Dynamo does this for NixlConnector/PdConnector, not MultiConnector
    from dynamo.vllm.main import main as dynamo_vllm_main

    sys.argv = [sys.argv[0], *translation.argv]
    dynamo_vllm_main()
