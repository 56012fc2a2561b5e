"""Real cluster-store servers for the tests, started on loopback and stopped with the test."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from dynamo_flexkv.integration.dynamo.processes import Deployment, free_port

MOONCAKE_MASTER = str(Path(sys.executable).with_name("mooncake_master"))
# Mooncake's transfer engine listens on every interface unless told otherwise; keep it on loopback.
os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
os.environ.setdefault("MC_LOG_LEVEL", "ERROR")


def master_argv(port: int) -> list[str]:
    return [MOONCAKE_MASTER, f"-rpc_port={port}", "-rpc_address=127.0.0.1", "-logtostderr"]


def answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


@contextlib.contextmanager
def mooncake_master(workdir: Path) -> Iterator[tuple[Deployment, str]]:
    """A Mooncake master on a free loopback port: (its deployment, the remote_store URL)."""
    port = free_port()
    with Deployment(workdir) as services:
        services.start("mooncake-master", master_argv(port))
        services.wait_for(lambda: answers(port), 30, "mooncake_master listening")
        yield services, f"mooncake://127.0.0.1:{port}"
