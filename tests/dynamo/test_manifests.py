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

from dynamo_flexkv.config import SETTING_NAMES, FlexKVSettings, env_var_name, load_settings
from dynamo_flexkv.integration.dynamo.launcher import translate

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "recipes" / "k8s"
STORE_MANIFEST = K8S / "mooncake_store.yaml"  # plain Deployments + Service; the rest are Dynamo deployments
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p != STORE_MANIFEST)
SCRIPTS = ["agg.sh", "agg_router.sh", "disagg.sh", "cluster_mooncake.sh"]


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def env_of(service: dict) -> dict[str, str]:
    return {e["name"]: str(e["value"]) for e in service.get("envs", [])}


def container_of(service: dict) -> dict:
    return service["extraPodSpec"]["mainContainer"]


def store_objects() -> dict[tuple[str, str], dict]:
    """mooncake_store.yaml's objects by (kind, name)."""
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(STORE_MANIFEST.read_text())}


def flags_of(command: list[str]) -> dict[str, str]:
    """`-name=value` flags of a Mooncake binary started by `sh -c '...'`."""
    return dict(re.findall(r"(?:^|\s)-(\w+)=(\S+)", command[-1]))


def test_there_is_a_manifest_per_topology():
    assert [p.name for p in MANIFESTS] == ["agg.yaml", "agg_router.yaml", "agg_router_cluster.yaml", "disagg.yaml"]


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
        flexkv_env = {k: v for k, v in env.items() if k.startswith("FLEXKV_")}
        assert set(flexkv_env) <= {env_var_name(f) for f in SETTING_NAMES}, f"{name}: not a FlexKV setting"
        load_settings(environ=flexkv_env)  # every value valid (a ConfigError names the bad one)
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


def test_the_cluster_manifest_is_agg_router_whose_workers_share_the_mooncake_service():
    cluster = load(K8S / "agg_router_cluster.yaml")["spec"]["services"]
    plain = load(K8S / "agg_router.yaml")["spec"]["services"]
    assert cluster["Frontend"] == plain["Frontend"]
    worker, plain_worker = cluster["VllmDecodeWorker"], plain["VllmDecodeWorker"]
    assert worker["replicas"] == 2 and container_of(worker) == container_of(plain_worker)
    env = env_of(worker)
    assert {k: v for k, v in env.items() if not k.startswith("FLEXKV_REMOTE_")} == env_of(plain_worker)
    settings = load_settings(environ={k: v for k, v in env.items() if k.startswith("FLEXKV_")})
    assert settings.remote_enabled and settings.remote_cache_gb > 0
    objects = store_objects()
    service = objects[("Service", "mooncake-master")]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert settings.remote_store == f"mooncake://{service['metadata']['name']}:{ports['rpc']}"
    assert settings.remote_metadata_server == f"http://{service['metadata']['name']}:{ports['metadata']}/metadata"
    memory_gi = float(worker["resources"]["requests"]["memory"].removesuffix("Gi"))
    assert memory_gi >= float(plain_worker["resources"]["requests"]["memory"].removesuffix("Gi")) + \
        settings.remote_cache_gb, "the pod's memory does not cover the segment it contributes to the store"


def test_store_manifest_runs_master_metadata_server_and_a_store_node_on_the_services_ports():
    objects = store_objects()
    assert set(objects) == {("Service", "mooncake-master"), ("Deployment", "mooncake-master"),
                            ("Deployment", "mooncake-store"), ("NetworkPolicy", "mooncake-master"),
                            ("NetworkPolicy", "mooncake-store")}
    service = objects[("Service", "mooncake-master")]
    master = objects[("Deployment", "mooncake-master")]
    store = objects[("Deployment", "mooncake-store")]
    for deployment in (master, store):
        assert deployment["apiVersion"] == "apps/v1"
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        probe_port = container["readinessProbe"]["tcpSocket"]["port"]
        assert probe_port in {p["name"] for p in container["ports"]}, deployment["metadata"]["name"]
    assert master["spec"]["replicas"] == 1 and master["spec"]["strategy"]["type"] == "Recreate"  # one master
    assert service["spec"]["selector"].items() <= master["spec"]["template"]["metadata"]["labels"].items()
    (master_container,) = master["spec"]["template"]["spec"]["containers"]
    container_ports = {p["name"]: p["containerPort"] for p in master_container["ports"]}
    service_ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    for port in service["spec"]["ports"]:
        assert container_ports[port["targetPort"]] == port["port"], port
    master_flags = flags_of(master_container["command"])
    assert "mooncake_master" in master_container["command"][-1]
    assert master_flags["rpc_port"] == str(service_ports["rpc"])
    assert master_flags["enable_http_metadata_server"] == "true"
    assert master_flags["http_metadata_server_port"] == str(service_ports["metadata"])
    (store_container,) = store["spec"]["template"]["spec"]["containers"]
    store_flags = flags_of(store_container["command"])
    assert "mooncake_client" in store_container["command"][-1]
    assert store_flags["master_server_address"] == f"mooncake-master:{service_ports['rpc']}"
    assert store_flags["metadata_server"] == f"http://mooncake-master:{service_ports['metadata']}/metadata"
    assert store_flags["port"] == str(store_container["ports"][0]["containerPort"])
    assert store_flags["host"] == '"$POD_IP"' and store_container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "status.podIP", "the store node must register an address other pods reach"
    segment_gb = float(store_flags["global_segment_size"].removesuffix("GB"))
    assert float(store_container["resources"]["requests"]["memory"].removesuffix("Gi")) > segment_gb


def test_only_the_cluster_workers_and_store_nodes_reach_the_store():
    """Mooncake has no authentication: the master listens on its pod address only, and a
    NetworkPolicy per store Deployment admits the cluster manifest's worker pods and the store nodes."""
    objects = store_objects()
    cluster = load(K8S / "agg_router_cluster.yaml")
    workers = {"nvidia.com/dynamo-graph-deployment-name": cluster["metadata"]["name"],  # set by the Dynamo operator
               "nvidia.com/dynamo-component-type": "worker"}
    assert {name for name, s in cluster["spec"]["services"].items() if s["componentType"] == "worker"} == \
        {"VllmDecodeWorker"}
    store_labels = objects[("Deployment", "mooncake-store")]["spec"]["template"]["metadata"]["labels"]
    for name in ("mooncake-master", "mooncake-store"):
        policy = objects[("NetworkPolicy", name)]
        assert policy["apiVersion"] == "networking.k8s.io/v1" and policy["spec"]["policyTypes"] == ["Ingress"]
        pod_labels = objects[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        (rule,) = policy["spec"]["ingress"]
        peers = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
        assert all(set(peer) == {"podSelector"} for peer in rule["from"]), "no namespace- or IP-wide peers"
        assert peers == [workers, {"app.kubernetes.io/name": store_labels["app.kubernetes.io/name"]}]
    (master,) = objects[("Deployment", "mooncake-master")]["spec"]["template"]["spec"]["containers"]
    assert {p["port"] for p in objects[("NetworkPolicy", "mooncake-master")]["spec"]["ingress"][0]["ports"]} == \
        {p["name"] for p in master["ports"]}
    flags = flags_of(master["command"])
    assert flags["rpc_address"] == flags["http_metadata_server_host"] == '"$POD_IP"'
    assert master["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_store_manifest_installs_mooncake_as_the_compose_file_does():
    compose = load(REPO / "deploy" / "docker-compose.yml")["services"]
    objects = store_objects()
    for name in ("mooncake-master", "mooncake-store"):
        (container,) = objects[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        assert container["image"] == compose[name]["image"], name
        install = re.compile(r"pip install .*?&&")
        assert install.findall(container["command"][-1]) == install.findall(compose[name]["command"][-1]), name


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
