"""Fixtures that start real shard server processes on loopback and always stop them, and a
self-signed certificate for 127.0.0.1 / localhost (its own CA) for the TLS tests."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from embedding_service.process import launch
from protos.process import ServerProcess
from protos.shard_client import ShardClient


@pytest.fixture
def shard_factory(tmp_path):
    started: list[tuple[ServerProcess, ShardClient]] = []

    def start(config: dict, name: str = "shard", **kwargs) -> tuple[ServerProcess, ShardClient]:
        proc = launch(config, workdir=tmp_path / f"{name}-{len(started)}", **kwargs)
        client = ShardClient(proc.address, plan_version=config.get("plan_version", 0))
        started.append((proc, client))
        return proc, client

    yield start
    for proc, client in started:
        client.close()
        proc.kill()


def _self_signed(directory: Path, name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("certs")
    cert, key = _self_signed(d, "server")
    other_ca, other_key = _self_signed(d, "other")
    # mutual TLS: "cert"/"key" also serve as the client certificate of the "ca" (it signs itself);
    # "other_ca"/"other_key" are a client certificate from another CA
    return {"cert": cert, "key": key, "ca": cert, "other_ca": other_ca, "other_key": other_key}


@pytest.fixture
def job_factory(tmp_path):
    """Coordinated jobs (tests/coordinated.py: a coordinator, its shards, two trainers), each closed at the end."""
    from tests.coordinated import Job

    jobs: list[Job] = []

    def make(*args: str, **kwargs) -> Job:
        jobs.append(Job(tmp_path, *args, **kwargs))
        return jobs[-1]

    yield make
    for j in jobs:
        j.close()
