"""SSH hosts in network namespaces, and a gateway whose kernelspecs run kernels on them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from provisioners.specs import LAUNCHER, launcher_argv
from tests.services.gateway import start_gateway
from tests.services.sshd import SSHCluster, start_cluster

PORT_RANGE = "42000..42099"


@pytest.fixture(scope="session")
def ssh_cluster(tmp_path_factory) -> SSHCluster:
    cluster = start_cluster(tmp_path_factory.mktemp("sshd"), count=2)
    yield cluster
    cluster.stop()


def write_ssh_spec(root: Path, name: str, cluster: SSHCluster, metadata: dict | None = None, **config) -> None:
    """A kernelspec under ``root/kernels/name`` running our launcher over SSH on the cluster's hosts; ``metadata``
    is added to its metadata."""
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    base = {
        "remote_hosts": [h.address for h in cluster.hosts],
        "key_filename": str(cluster.key_file),
        "known_hosts_file": str(cluster.known_hosts),
        "remote_user": "root",
        "port_range": PORT_RANGE,
    }
    base.update(config)
    interrupt_mode = base.pop("interrupt_mode", "message")
    spec = {
        "argv": launcher_argv(sys.executable, str(LAUNCHER)),
        "display_name": f"SSH {name}",
        "language": "python",
        "interrupt_mode": interrupt_mode,
        "metadata": {"kernel_provisioner": {"provisioner_name": "ssh-provisioner", "config": base}, **(metadata or {})},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def ssh_gateway(ssh_cluster, tmp_path_factory):
    """A gateway with specs 'ssh' (round-robin), 'ssh-lc' (least-connection), 'ssh-signal' (interrupt by signal)."""
    tmp = tmp_path_factory.mktemp("sshgw")
    data = tmp / "data"
    write_ssh_spec(data, "ssh", ssh_cluster)
    write_ssh_spec(data, "ssh-lc", ssh_cluster, load_balancing="least-connection")
    write_ssh_spec(data, "ssh-signal", ssh_cluster, interrupt_mode="signal")
    server = start_gateway(
        f"--ResponseListener.response_port_range={PORT_RANGE}",
        tmp_path=tmp,
        env={"JUPYTER_PATH": str(data)},
    )
    server.extra["data"] = data
    yield server
    server.stop()
