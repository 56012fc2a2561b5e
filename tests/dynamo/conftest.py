"""Real Dynamo 1.6.1 deployments (frontend + vLLM CPU workers) for the tests in this directory.

Deployments are expensive (a CPU engine starts in 30-60 s on two cores), so each test module starts
one with a module-scoped fixture and shares it; never more than two engines run at once.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dynamo_flexkv.devtools import client, processes
from dynamo_flexkv.devtools.processes import REPO, Deployment, free_port

BLOCK = 32
ENGINE_START_S = 420  # two engines starting side by side on a loaded 2-core machine

STACK_MISSING = importlib.util.find_spec("dynamo") is None or importlib.util.find_spec("vllm") is None


@dataclass
class Recipe:
    """One recipe script running as a supervised service, and where to reach its parts."""

    deployment: Deployment
    http_port: int
    system_ports: list[int]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def service(self) -> processes.Service:
        return self.deployment["recipe"]

    def openai(self) -> client.OpenAIClient:
        return client.OpenAIClient(self.url, "tiny")

    def frontend_metrics(self) -> list[client.Sample]:
        return client.scrape(f"{self.url}/metrics")

    def worker_metrics(self, index: int) -> list[client.Sample]:
        return client.scrape(f"http://127.0.0.1:{self.system_ports[index]}/metrics")

    def flexkv_identities(self) -> list[str]:
        return sorted(set(re.findall(r"scheduler ready: identity=(\S+)", self.service.log_text())))

    def wait_ready(self, timeout_s: float = ENGINE_START_S) -> None:
        """Every worker serves metrics and the frontend lists the model (no request is sent)."""
        dep = self.deployment
        for port in self.system_ports:
            dep.wait_for(lambda port=port: client.worker_instance_id(
                client.scrape(f"http://127.0.0.1:{port}/metrics")), timeout_s, f"worker on system port {port}")
        dep.wait_for(self.openai().ready, 60, "frontend lists the model")


def start_recipe(workdir: Path, script: str, workers: int, **env: str) -> Recipe:
    """Run `recipes/<script>` in CPU mode (tiny model, file discovery) on free loopback ports."""
    http_port = free_port()
    system_ports = [free_port() for _ in range(workers)]
    recipe_env = {
        "DYNAMO_FLEXKV_CPU": "1",
        "PYTHON": processes.PYTHON,
        "MODEL": str(processes.TINY_MODEL),
        "DYN_HTTP_PORT": str(http_port),
        **{f"DYN_SYSTEM_PORT{i + 1}": str(port) for i, port in enumerate(system_ports)},
        **env,
    }
    deployment = Deployment(workdir, processes.local_env(workdir))
    deployment.start("recipe", ["bash", str(REPO / "recipes" / script)], recipe_env)
    return Recipe(deployment, http_port, system_ports, recipe_env)


def stop_and_check_no_orphans(recipe: Recipe) -> None:
    """Stop the recipe's session; every engine process must be gone (no SIGKILL needed)."""
    killed = recipe.deployment.stop(grace_s=60)
    assert recipe.deployment.members() == [], "processes survived the recipe's shutdown"
    processes.log(f"recipe stopped; processes needing SIGKILL: {killed}")


def pytest_configure(config):
    config.addinivalue_line("markers", "dynamo: starts a real Dynamo 1.6.1 deployment (frontend + vLLM CPU workers)")


def pytest_collection_modifyitems(config, items):
    if STACK_MISSING:
        skip = pytest.mark.skip(reason="Dynamo and vLLM are not installed (run scripts/setup.sh)")
        for item in items:
            if item.get_closest_marker("dynamo"):
                item.add_marker(skip)


def random_prompt(rng, length: int, vocab: int = 1000) -> list[int]:
    """Token ids above the tiny tokenizer's special tokens (0-2)."""
    return [rng.randrange(3, vocab) for _ in range(length)]
