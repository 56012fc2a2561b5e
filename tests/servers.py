"""Real cluster-store servers for the tests, started on loopback and stopped with the test."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dynamo_flexkv.devtools.processes import (
    MOONCAKE_CLIENT,
    MOONCAKE_LOOPBACK_ENV,
    Deployment,
    free_port,
    mooncake_master_argv,
    start_mooncake_master,
)

for _name, _value in MOONCAKE_LOOPBACK_ENV.items():  # in-process Mooncake clients of the tests too
    os.environ.setdefault(_name, _value)


@contextlib.contextmanager
def mooncake_master(workdir: Path) -> Iterator[tuple[Deployment, str]]:
    """A Mooncake master on a free loopback port: (its deployment, the remote_store URL)."""
    with Deployment(workdir) as services:
        yield services, start_mooncake_master(services)


class PrivateNetwork:
    """Network namespaces joined by a bridge: a "store" node (the bridge, .1) and `nodes` engine
    nodes (.2, .3, ...), each with its own loopback. Nothing is reachable from or leaks to the
    host's network. `cut(i)` / `mend(i)` take node i's link down and up."""

    def __init__(self, nodes: int):
        tag = f"{os.getpid() % 10000}{uuid.uuid4().hex[:4]}"
        self.subnet = f"10.{random.randrange(64, 250)}.{random.randrange(1, 250)}"
        self.store = f"fkv-s{tag}"
        self.nodes = [f"fkv-n{i}{tag}" for i in range(nodes)]
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.remove()
            raise

    def _build(self) -> None:
        for ns in (self.store, *self.nodes):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", self.store, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.store, "addr", "add", f"{self.address(-1)}/24", "dev", "br0")
        _ip("-n", self.store, "link", "set", "br0", "up")
        for i, ns in enumerate(self.nodes):
            _ip("-n", self.store, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.store, "link", "set", f"p{i}", "master", "br0")
            _ip("-n", self.store, "link", "set", f"p{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def address(self, node: int) -> str:
        """Node i's address; -1: the store node's."""
        return f"{self.subnet}.{node + 2}"

    def run_in(self, ns: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", ns, *argv]

    def cut(self, node: int) -> None:
        _ip("-n", self.store, "link", "set", f"p{node}", "down")

    def mend(self, node: int) -> None:
        _ip("-n", self.store, "link", "set", f"p{node}", "up")

    def slow(self, node: int, rate: str) -> None:
        """Rate-limit node i's link both ways (a token bucket: this kernel has no netem to add delay),
        so a store call that moves a few blocks takes seconds."""
        for ns, dev in ((self.nodes[node], "eth0"), (self.store, f"p{node}")):
            _run(self.run_in(ns, ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                                  "burst", "16kb", "latency", "60s"]))

    def unslow(self, node: int) -> None:
        for ns, dev in ((self.nodes[node], "eth0"), (self.store, f"p{node}")):
            _run(self.run_in(ns, ["tc", "qdisc", "del", "dev", dev, "root"]))

    def remove(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self._made = []


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@contextlib.contextmanager
def mooncake_cluster(workdir: Path, nodes: int, segment: str = "256MB") -> Iterator[tuple[PrivateNetwork, Deployment, dict[str, str]]]:
    """A private network with a Mooncake master (and its metadata server) and a store node holding
    `segment` of memory in the store namespace. Yields the network, the services and the engines'
    FLEXKV_* settings for the store."""
    network = PrivateNetwork(nodes)
    try:
        host, port, http = network.address(-1), free_port(), free_port()
        with Deployment(workdir) as services:
            env = {"MC_TCP_BIND_ADDRESS": host}
            services.start("mooncake-master", network.run_in(network.store, [
                *mooncake_master_argv(port, host), "-enable_http_metadata_server=true",
                f"-http_metadata_server_host={host}", f"-http_metadata_server_port={http}"]), env)
            probe = network.run_in(network.store, [sys.executable, "-c", _PROBE, host, str(port)])
            services.wait_for(lambda: subprocess.run(probe, timeout=10).returncode == 0, 30, "mooncake_master listening")
            metadata = f"http://{host}:{http}/metadata"
            services.start("mooncake-store", network.run_in(network.store, [
                MOONCAKE_CLIENT, f"-master_server_address={host}:{port}", f"-metadata_server={metadata}",
                f"-host={host}", f"-port={free_port()}", f"-global_segment_size={segment}", "-protocol=tcp"]), env)
            settings = {"FLEXKV_REMOTE_STORE": f"mooncake://{host}:{port}", "FLEXKV_REMOTE_METADATA_SERVER": metadata}
            yield network, services, settings
    finally:
        network.remove()


@contextlib.contextmanager
def redis_cluster(workdir: Path, nodes: int) -> Iterator[tuple[PrivateNetwork, Deployment, dict[str, str]]]:
    """A private network with a redis-server in the store namespace (Debian's, as the contract test
    starts it). Yields the network, the services and the engines' FLEXKV_* settings for the store."""
    network = PrivateNetwork(nodes)
    try:
        host, port = network.address(-1), free_port()
        with Deployment(workdir) as services:
            # Protected mode takes only loopback clients; the engines reach it over the private bridge.
            services.start("redis", network.run_in(network.store, [
                "redis-server", "--bind", host, "--port", str(port), "--protected-mode", "no",
                "--save", "", "--appendonly", "no"]))
            probe = network.run_in(network.store, [sys.executable, "-c", _PROBE, host, str(port)])
            services.wait_for(lambda: subprocess.run(probe, timeout=10).returncode == 0, 30, "redis-server listening")
            yield network, services, {"FLEXKV_REMOTE_STORE": f"redis://{host}:{port}/0"}
    finally:
        network.remove()


_PROBE = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()"


@dataclass(frozen=True)
class TlsFiles:
    """Throwaway PEM files: a CA, a server certificate for 127.0.0.1 and a client certificate it
    signed, and a second CA that signed nothing of these (an untrusted one)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def make_tls_files(directory: Path) -> TlsFiles:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(name: str, key, issuer_name: str, issuer_key, *, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key, other_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    return TlsFiles(
        ca=write("ca.pem", pem(certificate("test ca", ca_key, "test ca", ca_key, ca=True))),
        server_cert=write("server.pem", pem(certificate("redis server", server_key, "test ca", ca_key, ca=False))),
        server_key=write("server.key", pem_key(server_key)),
        client_cert=write("client.pem", pem(certificate("flexkv client", client_key, "test ca", ca_key, ca=False))),
        client_key=write("client.key", pem_key(client_key)),
        other_ca=write("other-ca.pem", pem(certificate("other ca", other_key, "other ca", other_key, ca=True))),
    )
