"""Static checks of deploy/ and recipes/: Kubernetes manifests, docker-compose file, launch scripts,
FlexKV config example. Fast (no deployment); the scripts themselves run in test_kv_routing/test_disagg."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from dynamo_flexkv.config import FlexKVSettings, load_settings
from dynamo_flexkv.integration.dynamo.launcher import translate

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "recipes" / "k8s").glob("*.yaml"))
SCRIPTS = ["agg.sh", "agg_router.sh", "disagg.sh", "cluster_mooncake.sh"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def env_of(service: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in service.get("envs", [])}


def test_there_is_a_manifest_per_topology():
    assert [p.name for p in MANIFESTS] == ["agg.yaml", "agg_router.yaml", "disagg.yaml"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_has_what_the_dynamo_operator_requires(path):
    doc = load(path)
    assert doc["apiVersion"] == "nvidia.com/v1alpha1"
    assert doc["kind"] == "DynamoGraphDeployment"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    services = doc["spec"]["services"]
    assert services["Frontend"]["componentType"] == "frontend"
    workers = {name: s for name, s in services.items() if s["componentType"] == "worker"}
    assert workers, "no worker service"
    for name, service in services.items():
        assert isinstance(service["replicas"], int) and service["replicas"] >= 1, name
        container = service["extraPodSpec"]["mainContainer"]
        assert container["image"], name
        assert isinstance(container["command"], list) and container["command"], name
        assert isinstance(container["args"], list), name
    for name, service in workers.items():
        container = service["extraPodSpec"]["mainContainer"]
        assert container["command"] == ["python3", "-m", "dynamo_flexkv.vllm"], name
        env = env_of(service)
        translation = translate(container["args"], env)  # the legacy flags must translate cleanly
        if translation.uses_flexkv:
            assert env.get("DYNAMO_USE_FLEXKV") == "1", name
            cache_gb = float(env["FLEXKV_CPU_CACHE_GB"])
            shm = service["sharedMemory"]["size"]
            assert shm.endswith("Gi") and float(shm[:-2]) > cache_gb, f"{name}: /dev/shm smaller than the CPU tier"


def test_agg_router_routes_on_kv_with_two_workers():
    services = load(REPO / "recipes" / "k8s" / "agg_router.yaml")["spec"]["services"]
    frontend = services["Frontend"]
    assert env_of(frontend).get("DYN_ROUTER_MODE") == "kv"
    assert services["VllmDecodeWorker"]["replicas"] == 2


def test_disagg_roles_match_the_worker_flags():
    services = load(REPO / "recipes" / "k8s" / "disagg.yaml")["spec"]["services"]
    for name, role in (("VllmDecodeWorker", "decode"), ("VllmPrefillWorker", "prefill")):
        service = services[name]
        assert service["subComponentType"] == role
        argv = translate(service["extraPodSpec"]["mainContainer"]["args"], env_of(service)).argv
        assert argv[argv.index("--disaggregation-mode") + 1] == role
    prefill = translate(services["VllmPrefillWorker"]["extraPodSpec"]["mainContainer"]["args"], {})
    assert prefill.uses_flexkv and prefill.uses_nixl


def test_compose_runs_etcd_nats_jetstream_and_the_mooncake_store_safely():
    compose = load(REPO / "deploy" / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {"etcd-server", "nats-server", "mooncake-master", "mooncake-store"}
    assert "mooncake_master" in services["mooncake-master"]["command"][-1]
    assert "mooncake-master:50051" in services["mooncake-store"]["command"][-1]
    assert "-js" in services["nats-server"]["command"]
    for name, service in services.items():
        image = service["image"]
        assert re.search(r":v?\d+\.\d+\.\d+", image), f"{name}: image {image} is not pinned to a version"
        assert service["healthcheck"]["test"], name
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published beyond loopback"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source in compose["volumes"], f"{name}: {source} is not a named volume"


@pytest.mark.parametrize("script", SCRIPTS)
def test_recipe_script_parses_and_uses_the_launcher(script):
    path = REPO / "recipes" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "-m dynamo_flexkv.vllm" in text and "-m dynamo.frontend" in text
    assert "--connector" in text and "DYNAMO_USE_FLEXKV=1" in text


def test_flexkv_config_example_is_valid():
    path = REPO / "recipes" / "flexkv_config.yml"
    data = load(path)
    assert {"cpu_cache_gb", "ssd_cache_gb", "ssd_cache_dir"} <= set(data)
    assert set(data) <= set(FlexKVSettings.model_fields)
    with tempfile.TemporaryDirectory() as ssd:  # the example's /data0, /data1 do not exist here
        settings = load_settings({"ssd_cache_dir": ssd, "ssd_cache_gb": 0.001},
                                 environ={"FLEXKV_CONFIG_PATH": str(path)})
    assert settings.cpu_cache_gb == data["cpu_cache_gb"] and settings.ssd_enabled


def test_unknown_connector_exits_with_the_allowed_names():
    result = subprocess.run([sys.executable, "-m", "dynamo_flexkv.vllm", "--model", "m", "--connector", "flexkvv"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown connector 'flexkvv'" in result.stderr and "flexkv, nixl" in result.stderr
