"""The legacy-flag translation of `python -m dynamo_flexkv.vllm` (pure: no Dynamo, no vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamo_flexkv.integration.dynamo.launcher import FLEXKV, LauncherError, connector_config, translate

MODEL = ["--model", "Qwen/Qwen3-0.6B"]


def run(*argv: str, env: dict[str, str] | None = None, kvbm: bool = False):
    return translate([*MODEL, *argv], env or {}, kvbm_available=kvbm)


def value(argv: list[str], flag: str) -> str | None:
    hits = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == flag]
    assert len(hits) <= 1, f"{flag} given {len(hits)} times in {argv}"
    return hits[0] if hits else None


def kv_config(argv: list[str]) -> dict | None:
    raw = value(argv, "--kv-transfer-config")
    return json.loads(raw) if raw else None


def children(config: dict) -> list[str]:
    return [c["kv_connector"] for c in config["kv_connector_extra_config"]["connectors"]]


# --- connectors -----------------------------------------------------------------------------------

def test_flexkv_alone_is_the_documented_config():
    t = run("--connector", "flexkv")
    assert kv_config(t.argv) == {"kv_connector": "FlexKVConnectorV1", "kv_role": "kv_both"}
    assert "--connector" not in t.argv and "flexkv" not in t.argv
    assert t.uses_flexkv and not t.uses_nixl


@pytest.mark.parametrize("names", [["nixl", "flexkv"], ["flexkv", "nixl"]])
def test_nixl_and_flexkv_make_a_multiconnector_with_flexkv_first(names):
    t = run("--connector", *names, "--is-prefill-worker")
    config = kv_config(t.argv)
    assert config["kv_connector"] == "MultiConnector" and config["kv_role"] == "kv_both"
    assert children(config) == ["FlexKVConnectorV1", "NixlConnector"]
    assert "kv_connector_module_path" not in config
    assert config["kv_load_failure_policy"] == "recompute"  # a FlexKV block that cannot load is a miss
    assert t.uses_flexkv and t.uses_nixl


def test_pdconnector_when_kvbm_is_importable():
    config = kv_config(run("--connector", "nixl", "flexkv", "--is-prefill-worker", kvbm=True).argv)
    assert config["kv_connector"] == "PdConnector"
    assert config["kv_connector_module_path"] == "kvbm.vllm_integration.connector"
    assert children(config) == ["FlexKVConnectorV1", "NixlConnector"]


def test_three_connectors_fall_back_to_multiconnector_even_with_kvbm():
    config = connector_config(["nixl", "lmcache", "flexkv"], kvbm_available=True)
    assert config["kv_connector"] == "MultiConnector"
    assert children(config) == ["LMCacheConnectorV1", "FlexKVConnectorV1", "NixlConnector"]


def test_connector_names_are_case_insensitive_and_comma_separated():
    config = kv_config(run("--connector=NIXL,FlexKV", "--is-prefill-worker").argv)
    assert children(config) == ["FlexKVConnectorV1", "NixlConnector"]


def test_kvbm_and_lmcache_map_as_dynamo_did():
    assert kv_config(run("--connector", "lmcache").argv)["kv_connector"] == "LMCacheConnectorV1"
    kvbm = kv_config(run("--connector", "kvbm").argv)
    assert kvbm["kv_connector"] == "DynamoConnector"
    assert kvbm["kv_connector_module_path"] == "kvbm.vllm_integration.connector"


@pytest.mark.parametrize("names", [["none"], ["null"], []])
def test_no_connector(names):
    t = run("--connector", *names)
    assert kv_config(t.argv) is None and "--connector" not in t.argv


def test_unknown_connector_lists_allowed_names():
    with pytest.raises(LauncherError) as err:
        run("--connector", "flexkv", "mooncake")
    message = str(err.value)
    assert "'mooncake'" in message
    for name in ("flexkv", "nixl", "lmcache", "kvbm", "none"):
        assert name in message


def test_duplicate_and_mixed_none_are_errors():
    with pytest.raises(LauncherError, match="twice"):
        run("--connector", "flexkv", "flexkv")
    with pytest.raises(LauncherError, match="none"):
        run("--connector", "none", "flexkv")


def test_connector_and_kv_transfer_config_conflict():
    with pytest.raises(LauncherError, match="only one"):
        run("--connector", "flexkv", "--kv-transfer-config", '{"kv_connector":"NixlConnector"}')


def test_other_arguments_pass_through_in_order():
    t = run("--enforce-eager", "--connector", "flexkv", "--block-size", "32", "--kv-events-config", "{}")
    assert t.argv[:5] == [*MODEL, "--enforce-eager", "--block-size", "32"]
    assert value(t.argv, "--block-size") == "32" and value(t.argv, "--kv-events-config") == "{}"


# --- DYN_CONNECTOR --------------------------------------------------------------------------------

def test_dyn_connector_env_is_translated_and_removed():
    t = run(env={"DYN_CONNECTOR": "nixl flexkv", "DYN_VLLM_DISAGGREGATION_MODE": "prefill"})
    assert children(kv_config(t.argv)) == ["FlexKVConnectorV1", "NixlConnector"]
    assert t.unset_env == ("DYN_CONNECTOR",)


def test_cli_connector_wins_over_env_and_env_is_still_removed():
    t = run("--connector", "flexkv", env={"DYN_CONNECTOR": "nixl"})
    assert kv_config(t.argv)["kv_connector"] == "FlexKVConnectorV1"
    assert t.unset_env == ("DYN_CONNECTOR",)


def test_unknown_name_in_dyn_connector_names_the_variable():
    with pytest.raises(LauncherError, match="DYN_CONNECTOR"):
        run(env={"DYN_CONNECTOR": "flexkv,bogus"})


# --- roles ----------------------------------------------------------------------------------------

def test_prefill_flag_becomes_disaggregation_mode():
    t = run("--is-prefill-worker", "--connector", "nixl", "flexkv")
    assert value(t.argv, "--disaggregation-mode") == "prefill"
    assert "--is-prefill-worker" not in t.argv


def test_decode_flag_becomes_disaggregation_mode():
    t = run("--is-decode-worker", "--connector", "nixl")
    assert value(t.argv, "--disaggregation-mode") == "decode"


def test_nixl_alone_is_the_guides_decode_worker():
    t = run("--connector", "nixl")
    assert value(t.argv, "--disaggregation-mode") == "decode"
    assert kv_config(t.argv) == {"kv_connector": "NixlConnector", "kv_role": "kv_both"}


def test_explicit_agg_mode_keeps_nixl_alone_aggregated():
    t = run("--connector", "nixl", "--disaggregation-mode", "agg")
    assert value(t.argv, "--disaggregation-mode") == "agg"
    assert "--disable-hybrid-kv-cache-manager" not in t.argv


def test_both_role_flags_are_an_error():
    with pytest.raises(LauncherError, match="exclude"):
        run("--is-prefill-worker", "--is-decode-worker")


def test_role_flag_conflicting_with_mode_is_an_error():
    with pytest.raises(LauncherError, match="conflicts"):
        run("--is-prefill-worker", "--disaggregation-mode", "decode", "--connector", "nixl")


def test_role_flag_agreeing_with_mode_is_kept_once():
    t = run("--is-prefill-worker", "--disaggregation-mode", "prefill", "--connector", "nixl", "flexkv")
    assert value(t.argv, "--disaggregation-mode") == "prefill"


def test_disaggregated_worker_without_nixl_is_an_error():
    with pytest.raises(LauncherError, match="nixl"):
        run("--is-prefill-worker", "--connector", "flexkv")


@pytest.mark.parametrize("role", ["--is-prefill-worker", "--is-decode-worker"])
def test_disaggregated_nixl_workers_keep_the_hybrid_manager(role):
    """FlexKV and NIXL both support vLLM's hybrid manager: both sides keep it, so their hashes agree."""
    assert "--disable-hybrid-kv-cache-manager" not in run(role, "--connector", "nixl", "flexkv").argv


@pytest.mark.parametrize("role", ["--is-prefill-worker", "--is-decode-worker"])
def test_with_kvbm_every_nixl_worker_turns_hybrid_manager_off(role):
    """kvbm's PdConnector (the prefill side's connector when kvbm is installed) turns it off."""
    t = run(role, "--connector", "nixl", kvbm=True)
    assert t.argv.count("--disable-hybrid-kv-cache-manager") == 1


def test_explicit_hybrid_choice_is_respected():
    t = run("--is-decode-worker", "--connector", "nixl", "--no-disable-hybrid-kv-cache-manager", kvbm=True)
    assert "--disable-hybrid-kv-cache-manager" not in t.argv


def test_aggregated_flexkv_leaves_hybrid_manager_alone():
    assert "--disable-hybrid-kv-cache-manager" not in run("--connector", "flexkv").argv


# --- DYNAMO_USE_FLEXKV ----------------------------------------------------------------------------

def test_use_flexkv_turns_flexkv_and_events_on():
    t = run(env={"DYNAMO_USE_FLEXKV": "1"})
    assert kv_config(t.argv)["kv_connector"] == "FlexKVConnectorV1"
    events = json.loads(value(t.argv, "--kv-events-config"))
    assert events["enable_kv_cache_events"] is True and events["publisher"] == "zmq"
    assert events["endpoint"].startswith("ipc://")


def test_use_flexkv_events_endpoints_are_unique_per_worker():
    first = json.loads(value(run(env={"DYNAMO_USE_FLEXKV": "1"}).argv, "--kv-events-config"))["endpoint"]
    second = json.loads(value(run(env={"DYNAMO_USE_FLEXKV": "1"}).argv, "--kv-events-config"))["endpoint"]
    assert first != second


def test_use_flexkv_legacy_event_port():
    t = run(env={"DYNAMO_USE_FLEXKV": "true", "DYN_VLLM_KV_EVENT_PORT": "20081"})
    # vLLM binds only wildcard TCP endpoints: a port the user asks for is on all interfaces, and says so
    assert json.loads(value(t.argv, "--kv-events-config"))["endpoint"] == "tcp://*:20081"
    assert any("all interfaces" in note for note in t.notes)
    with pytest.raises(LauncherError, match="DYN_VLLM_KV_EVENT_PORT"):
        run(env={"DYNAMO_USE_FLEXKV": "1", "DYN_VLLM_KV_EVENT_PORT": "x"})


def test_use_flexkv_keeps_user_events_config():
    t = run("--kv-events-config", '{"enable_kv_cache_events":true}', env={"DYNAMO_USE_FLEXKV": "1"})
    assert value(t.argv, "--kv-events-config") == '{"enable_kv_cache_events":true}'


def test_use_flexkv_without_prefix_caching_publishes_no_events():
    t = run("--no-enable-prefix-caching", env={"DYNAMO_USE_FLEXKV": "1"})
    assert value(t.argv, "--kv-events-config") is None


def test_use_flexkv_does_not_override_an_explicit_connector():
    t = run("--connector", "nixl", "--is-decode-worker", env={"DYNAMO_USE_FLEXKV": "1"})
    assert kv_config(t.argv)["kv_connector"] == "NixlConnector"


def test_use_flexkv_with_documented_kv_transfer_config():
    documented = '{"kv_connector":"FlexKVConnectorV1","kv_role":"kv_both"}'
    t = run("--kv-transfer-config", documented, env={"DYNAMO_USE_FLEXKV": "1"})
    assert value(t.argv, "--kv-transfer-config") == documented
    assert t.uses_flexkv and value(t.argv, "--kv-events-config")


@pytest.mark.parametrize("flag", ["0", "", "no"])
def test_use_flexkv_off(flag):
    t = run(env={"DYNAMO_USE_FLEXKV": flag})
    assert kv_config(t.argv) is None and value(t.argv, "--kv-events-config") is None


def test_guide_pdconnector_becomes_multiconnector_without_kvbm():
    guide = ('{"kv_connector":"PdConnector","kv_role":"kv_both","kv_connector_extra_config":{"connectors":'
             '[{"kv_connector":"FlexKVConnectorV1","kv_role":"kv_both"},{"kv_connector":"NixlConnector",'
             '"kv_role":"kv_both"}]},"kv_connector_module_path":"kvbm.vllm_integration.connector"}')
    t = run("--disaggregation-mode", "prefill", "--kv-transfer-config", guide)
    config = kv_config(t.argv)
    assert config["kv_connector"] == "MultiConnector" and "kv_connector_module_path" not in config
    assert children(config) == ["FlexKVConnectorV1", "NixlConnector"]
    assert "--disable-hybrid-kv-cache-manager" not in t.argv
    assert kv_config(run("--kv-transfer-config", guide, kvbm=True).argv)["kv_connector"] == "PdConnector"


def test_underscore_spelling_of_vllm_flags_is_recognised():
    t = run("--kv_transfer_config", '{"kv_connector":"NixlConnector"}', "--is-decode-worker")
    assert t.uses_nixl and value(t.argv, "--disaggregation-mode") == "decode"


STORE = {"FLEXKV_REMOTE_STORE": "redis://10.0.0.5:6379/0"}


@pytest.mark.parametrize("algo", ["xxhash", "xxhash_cbor"])
def test_hash_seed_is_set_only_for_a_cluster_tier_with_xxhash_block_hashes(algo):
    """vLLM seeds xxhash chains randomly per process (they are not collision resistant) and sha256
    ones identically everywhere: only engines sharing a store with xxhash need a common seed."""
    t = run("--connector", "flexkv", "--prefix-caching-hash-algo", algo, env=STORE)
    assert t.set_env == {"PYTHONHASHSEED": "0"}
    assert [n for n in t.notes if "PYTHONHASHSEED" in n] == [
        f"remote_store with --prefix-caching-hash-algo {algo} -> PYTHONHASHSEED=0, so every engine's block hashes "
        "agree (a known seed lets xxhash collisions be precomputed: set a secret PYTHONHASHSEED shared by every "
        "worker, or use sha256)"]
    extra = json.dumps({**FLEXKV, "kv_connector_extra_config": {"remote_store": STORE["FLEXKV_REMOTE_STORE"]}})
    assert run("--kv-transfer-config", extra, f"--prefix_caching_hash_algo={algo}").set_env == {"PYTHONHASHSEED": "0"}


@pytest.mark.parametrize(("argv", "env"), [
    (["--connector", "flexkv"], STORE),  # sha256 (vLLM's default): one fixed seed in every process
    (["--connector", "flexkv", "--prefix-caching-hash-algo", "sha256_cbor"], STORE),
    (["--connector", "flexkv", "--prefix-caching-hash-algo", "xxhash"], {}),  # no shared tier
    (["--prefix-caching-hash-algo", "xxhash"], STORE),  # no FlexKV
    (["--connector", "flexkv", "--prefix-caching-hash-algo", "xxhash"], {**STORE, "PYTHONHASHSEED": "7"}),  # the user's
    (["--connector", "flexkv", "--prefix-caching-hash-algo", "xxhash"], {**STORE, "FLEXKV_CPU_CACHE_GB": "x"}),
])
def test_hash_seed_is_left_to_vllm_everywhere_else(argv, env):
    t = run(*argv, env=env)
    assert "PYTHONHASHSEED" not in t.set_env and not [n for n in t.notes if "PYTHONHASHSEED" in n]


def test_private_event_socket_is_reported_for_cleanup():
    t = run(env={"DYNAMO_USE_FLEXKV": "1"})
    endpoint = json.loads(value(t.argv, "--kv-events-config"))["endpoint"]
    assert t.private_paths == (endpoint.removeprefix("ipc://"),)
    assert run(env={"DYNAMO_USE_FLEXKV": "1", "DYN_VLLM_KV_EVENT_PORT": "20081"}).private_paths == ()


def test_recipes_publish_kv_events_on_private_sockets_by_default():
    """KV events carry prompt tokens: no recipe publishes them on all interfaces unless asked, and
    nothing in a recipe listens on all interfaces (the Kubernetes store's master: its pod address)."""
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    texts = {p.name: p.read_text() for p in recipes.rglob("*") if p.is_file()}
    assert texts and not [name for name, text in texts.items() if "tcp://*" in text or "0.0.0.0" in text]
    assert "ipc://" in texts["agg_router.sh"]
