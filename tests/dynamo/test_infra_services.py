"""Dynamo 1.6.1 against etcd and NATS (JetStream) — the Debian packages, started with the flags of
deploy/docker-compose.yml — instead of the embedded file discovery.

Discovery goes through etcd and requests and KV events through NATS. The worker is Dynamo's own
mocker engine (real Dynamo runtime, no vLLM), which registers in seconds.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import yaml

from dynamo_flexkv.devtools import client, processes
from dynamo_flexkv.devtools.processes import REPO, Deployment, free_port
from tests.dynamo.conftest import random_prompt

pytestmark = [
    pytest.mark.dynamo,
    pytest.mark.skipif(not (shutil.which("etcd") and shutil.which("nats-server")),
                       reason="etcd-server / nats-server Debian packages not installed (scripts/setup.sh)"),
]


def compose_command(service: str) -> list[str]:
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    return list(compose["services"][service]["command"])


def nats_argv(data: Path, port: int, monitor: int) -> list[str]:
    """The compose file's nats-server flags, with this test's data dir and loopback ports."""
    argv, flags = ["nats-server"], compose_command("nats-server")
    values = {"-sd": str(data), "-m": str(monitor)}
    i = 0
    while i < len(flags):
        argv.append(flags[i])
        if flags[i] in values:
            argv.append(values[flags[i]])
            i += 1
        i += 1
    return [*argv, "-a", "127.0.0.1", "-p", str(port)]


def etcd_argv(data: Path, client_port: int, peer_port: int) -> list[str]:
    """The compose file's etcd flags, with this test's data dir and loopback ports."""
    urls = {"--data-dir": str(data),
            "--listen-client-urls": f"http://127.0.0.1:{client_port}",
            "--advertise-client-urls": f"http://127.0.0.1:{client_port}",
            "--listen-peer-urls": f"http://127.0.0.1:{peer_port}",
            "--initial-advertise-peer-urls": f"http://127.0.0.1:{peer_port}"}
    argv = []
    for flag in compose_command("etcd-server"):
        name = flag.split("=", 1)[0]
        if name in urls:
            flag = f"{name}={urls[name]}"
        elif name == "--initial-cluster":
            flag = f"--initial-cluster=etcd-server=http://127.0.0.1:{peer_port}"
        argv.append(flag)
    return argv


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model):
    workdir = tmp_path_factory.mktemp("etcd_nats")
    etcd_port, peer_port, nats_port, nats_monitor, http = (free_port() for _ in range(5))
    env = processes.local_env(workdir)
    env.update({"DYN_DISCOVERY_BACKEND": "etcd", "ETCD_ENDPOINTS": f"http://127.0.0.1:{etcd_port}",
                "NATS_SERVER": f"nats://127.0.0.1:{nats_port}", "DYN_REQUEST_PLANE": "nats",
                "DYN_EVENT_PLANE": "nats"})
    dep = Deployment(workdir, env)
    try:
        dep.start("etcd", etcd_argv(workdir / "etcd", etcd_port, peer_port))
        dep.start("nats", nats_argv(workdir / "nats", nats_port, nats_monitor))
        dep.wait_for(lambda: json.loads(client.http_get(f"http://127.0.0.1:{etcd_port}/health"))["health"] == "true",
                     60, "etcd healthy")
        dep.wait_for(lambda: client.http_get(f"http://127.0.0.1:{nats_monitor}/healthz?js-enabled-only=true"),
                     60, "NATS JetStream healthy")
        dep.start("frontend", processes.frontend_argv(http, "kv"))
        dep.start("mocker", [processes.PYTHON, "-m", "dynamo.mocker", "--model-path", tiny_model,
                             "--model-name", "tiny", "--block-size", "32"])
        oa = client.OpenAIClient(f"http://127.0.0.1:{http}")
        dep.wait_for(oa.ready, 180, "model registered through etcd")
        yield dep, oa, etcd_port, nats_monitor, http
    finally:
        dep.stop()
        assert dep.members() == []


def test_dynamo_runs_on_etcd_and_nats(stack):
    dep, oa, etcd_port, nats_monitor, http = stack
    prompt = random_prompt(__import__("random").Random(1), 100)
    for _ in range(2):
        assert oa.complete(prompt, max_tokens=4).prompt_tokens == 100

    keys = client.post_json(f"http://127.0.0.1:{etcd_port}/v3/kv/range",
                            {"key": base64.b64encode(b"v1/").decode(), "range_end": base64.b64encode(b"v10").decode(),
                             "keys_only": True})
    names = [base64.b64decode(kv["key"]).decode() for kv in keys.get("kvs", [])]
    assert any(name.startswith("v1/instances/") for name in names), names
    assert any(name.startswith("v1/mdc/") for name in names), names

    connections = json.loads(client.http_get(f"http://127.0.0.1:{nats_monitor}/connz"))["num_connections"]
    assert connections >= 2, "frontend and worker should both talk to NATS"
    applied = client.wait_until(
        lambda: client.events_applied(client.scrape(f"http://127.0.0.1:{http}/metrics")).get(("stored", "ok")),
        30, "KV events reached the router over NATS")
    assert applied >= 1
    assert "etcd" in dep["etcd"].log_text().lower()
