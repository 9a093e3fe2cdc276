"""A real Docker engine with our images, and gateways whose kernelspecs run kernels as containers."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.services.docker_engine import build_images, ensure_docker, ensure_swarm

CONTAINER_PORTS = "43000..43099"
BOOTSTRAP = "/usr/local/share/kernel-gateway/bootstrap-kernel.sh"


@pytest.fixture(scope="session")
def docker_client():
    return ensure_docker()


@pytest.fixture(scope="session")
def images(docker_client) -> dict[str, str]:
    return build_images(docker_client)


@pytest.fixture(scope="session")
def swarm(docker_client):
    ensure_swarm(docker_client)
    return docker_client


def write_container_spec(root: Path, name: str, provisioner: str, config: dict, argv: list[str] | None = None,
                         metadata: dict | None = None) -> None:
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "argv": argv or [BOOTSTRAP],
        "display_name": f"Container {name}",
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {"kernel_provisioner": {"provisioner_name": provisioner, "config": config}, **(metadata or {})},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def containers_of(client, instance: str) -> list:
    return client.containers.list(all=True, filters={"label": f"kernel_gateway.instance={instance}"})


def services_of(client, instance: str) -> list:
    return client.services.list(filters={"label": f"kernel_gateway.instance={instance}"})


@pytest.fixture
def instance() -> str:
    return f"kgw-test-{uuid.uuid4().hex[:8]}"
