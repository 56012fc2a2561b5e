"""Run a local Dynamo deployment (frontend, vLLM workers, etcd, NATS…) as supervised services.

Every service runs in its own session (`setsid`), so the service and every process it forks
(vLLM's EngineCore and workers) share one process group; stopping sends SIGTERM to the group,
waits, then SIGKILLs whatever of the session is left. Nothing outlives a stopped service — a
SIGKILLed `dynamo.vllm` would otherwise orphan its engine processes.

Shared by the demo, the recipe tests and the Dynamo tests. One log line per event, with ids.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]  # the checkout: devtools run from one (tests, demo, recipes)
TINY_MODEL = Path(os.environ.get("DYNAMO_FLEXKV_MODEL_DIR", REPO / ".cache" / "tiny-llama"))
# The demo's model (tiny_model.DEMO): prefill dominates a request, so a KV cache has something to save.
DEMO_MODEL = Path(os.environ.get("DYNAMO_FLEXKV_DEMO_MODEL_DIR", REPO / ".cache" / "demo-llama"))
# CPU engine defaults for the tiny model: eager mode starts in ~25 s; block size 32 (multiple of 32).
TINY_ENGINE_ARGS = ("--enforce-eager", "--block-size", "32", "--max-model-len", "1024", "--dtype", "bfloat16")
# Settings that would make two test workers share a FlexKV identity or pick a connector implicitly.
_CLEARED_ENV = ("FLEXKV_SERVER_RECV_PORT", "FLEXKV_CONFIG_PATH", "DYN_CONNECTOR", "DYNAMO_USE_FLEXKV",
                "DYN_VLLM_KV_EVENT_PORT", "DYN_SYSTEM_PORT", "DYN_HTTP_PORT", "VLLM_NIXL_SIDE_CHANNEL_PORT")


MOONCAKE_MASTER = str(Path(PYTHON).with_name("mooncake_master"))
MOONCAKE_CLIENT = str(Path(PYTHON).with_name("mooncake_client"))  # a store node: holds a segment
# Mooncake's transfer engine listens on every interface unless told otherwise: keep it on loopback.
MOONCAKE_LOOPBACK_ENV = {"MC_TCP_BIND_ADDRESS": "127.0.0.1", "MC_LOG_LEVEL": "ERROR"}


def log(message: str) -> None:
    print(f"[dynamo-flexkv {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class ServiceError(RuntimeError):
    pass


def free_port() -> int:
    """A free loopback TCP port below 32768: Dynamo 1.6.1 parses DYN_SYSTEM_PORT as an i16, so the
    kernel's ephemeral ports (32768+) are refused."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServiceError("no free TCP port in 20000-32000")


def local_env(workdir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a one-node deployment on loopback with Dynamo's file discovery (no etcd/NATS)."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _CLEARED_ENV}
    env.update({
        "DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(workdir / "discovery"),
        "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
        "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1",
        "VLLM_HOST_IP": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONHASHSEED": "0", "PYTHONUNBUFFERED": "1",
        # UCX (NIXL): loopback only; without ^ib every process that made a UCX backend segfaults at exit.
        "UCX_MODULES": "^ib", "UCX_NET_DEVICES": "lo",
        **MOONCAKE_LOOPBACK_ENV,
    })
    return env


def kv_events_config(endpoint: str) -> str:
    return json.dumps({"publisher": "zmq", "topic": "kv-events", "endpoint": endpoint,
                       "enable_kv_cache_events": True}, separators=(",", ":"))


def frontend_argv(http_port: int, router_mode: str = "kv", *extra: str) -> list[str]:
    return [PYTHON, "-m", "dynamo.frontend", "--router-mode", router_mode,
            "--http-host", "127.0.0.1", "--http-port", str(http_port), *extra]


def worker_argv(*args: str, model: Path | str = TINY_MODEL, served_name: str = "tiny") -> list[str]:
    """`python -m dynamo_flexkv.vllm` with the tiny model's CPU defaults, then `args`."""
    return [PYTHON, "-m", "dynamo_flexkv.vllm", "--model", str(model), "--served-model-name", served_name,
            *TINY_ENGINE_ARGS, *args]


def bound_to(cpus: str, argv: Sequence[str]) -> list[str]:
    """`argv` with it and every process and thread it starts allowed only on `cpus` ("1", "2-3")."""
    return ["taskset", "--cpu-list", cpus, *argv]


def mooncake_master_argv(port: int, host: str = "127.0.0.1") -> list[str]:
    # The master's admin/metrics server defaults to 0.0.0.0:9003: give each master its own port,
    # on the master's address, so two masters (two test sessions, a demo) never collide.
    return [MOONCAKE_MASTER, f"-rpc_port={port}", f"-rpc_address={host}", f"-metrics_host={host}",
            f"-metrics_port={free_port()}", "-logtostderr"]


def answers(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections at host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def start_mooncake_master(deployment: Deployment, name: str = "mooncake-master") -> str:
    """A Mooncake master on a free loopback port, as a service of `deployment`; returns the
    `remote_store` URL once it listens. Workers contribute the store's memory (`remote_cache_gb`)."""
    port = free_port()
    deployment.start(name, mooncake_master_argv(port))
    deployment.wait_for(lambda: answers(port), 30, f"{name} listening on port {port}")
    return f"mooncake://127.0.0.1:{port}"


def session_members(sid: int) -> list[int]:
    """Live processes of session `sid` (zombies excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            members.append(int(entry.name))
    return members


class Service:
    """One command in its own session, logging to `log_path`."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
                 cwd: Path = REPO):
        self.name, self.argv, self.env, self.log_path, self.cwd = name, list(argv), dict(env), log_path, cwd
        self.process: subprocess.Popen | None = None

    def start(self) -> Service:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=out,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)
        log(f"started service={self.name} pid={self.pid} log={self.log_path}")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was not started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def check(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise ServiceError(f"service {self.name} (pid {self.pid}) exited with code "
                               f"{self.process.returncode}; last log lines:\n{self.log_tail()}")

    def freeze(self) -> None:
        """SIGSTOP its process group: it keeps its sockets (the kernel still accepts connections) but
        never answers, as a hung or overloaded server."""
        _signal_group(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        _signal_group(self.pid, signal.SIGCONT)

    def stop(self, grace_s: float = 20.0) -> list[int]:
        """SIGTERM the session's process group, then SIGKILL what is left; returns pids that needed SIGKILL."""
        if self.process is None:
            return []
        sid = self.pid
        if self.running():
            _signal_group(sid, signal.SIGTERM)
            _signal_group(sid, signal.SIGCONT)  # a frozen one handles its SIGTERM
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self.running() or session_members(sid)):
            time.sleep(0.2)
        leftovers = session_members(sid)
        for pid in leftovers:  # a member that left the process group still belongs to the session
            _signal_pid(pid, signal.SIGKILL)
        _signal_group(sid, signal.SIGKILL)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        log(f"stopped service={self.name} pid={sid} code={self.process.returncode} killed={leftovers}")
        return leftovers


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Deployment:
    """Services started together and stopped together (last started, first stopped)."""

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None):
        self.workdir = Path(workdir)
        self.env = dict(env) if env is not None else local_env(self.workdir)
        self.services: dict[str, Service] = {}

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Service:
        if name in self.services:
            raise ValueError(f"service {name} already exists")
        service = Service(name, argv, {**self.env, **(env or {})}, self.workdir / "logs" / f"{name}.log")
        self.services[name] = service
        return service.start()

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def check(self) -> None:
        for service in self.services.values():
            service.check()

    def wait_for(self, condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
        """Poll `condition` until it returns a truthy value; fail fast if a service died."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check()
            try:
                value = condition()
            except (OSError, ValueError):  # not listening yet, half-written answer
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")
            time.sleep(interval_s)

    def stop(self, grace_s: float = 20.0) -> dict[str, list[int]]:
        """Stop every service; returns, per service, the pids that had to be SIGKILLed."""
        killed = {}
        for name in reversed(list(self.services)):
            killed[name] = self.services[name].stop(grace_s)
        return killed

    def members(self) -> list[int]:
        """Live processes still in any service's session (should be empty after stop)."""
        return [pid for s in self.services.values() if s.process is not None for pid in session_members(s.pid)]

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

