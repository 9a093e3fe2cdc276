"""CurveZMQ transport encryption of kernels in Docker containers and Swarm services (issue 12): the launcher in the kernel image makes
the key pair and reports the public key; the gateway's sockets are CurveZMQ clients. Packets captured with tcpdump
on every interface (the docker bridge included)."""

from __future__ import annotations

import os

import pytest

from tests.api.helpers import assert_error, post_kernel
from tests.services.capture import assert_plaintext_on_the_wire, assert_remote_kernel_encrypted, connection_file
from tests.services.client import call, start_kernel
from tests.services.gateway import start_gateway, wait_until

from .conftest import CONTAINER_PORTS, containers_of, services_of, write_container_spec

pytestmark = pytest.mark.cluster

CURVE = {"supported_encryption": ["curve"]}


def launcher_pid(kernel_id: str) -> int | None:
    """The pid (in this machine's pid namespace) of the container's launcher, by its ``--kernel-id``."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if b"launch_ipykernel.py" in cmdline and kernel_id.encode() in cmdline:
            return int(name)
    return None


@pytest.fixture
def gw(tmp_path, images, instance):
    """A gateway (transport_encryption 'auto') with container specs: 'curve' (declares curve; the spec names the
    image's entry point), 'curve-image-cmd' (declares it; the image's own command runs), 'plain' (declares it,
    turned off in its config), 'required' (does not declare it, but requires it)."""
    base = {"image": images["kernel"], "port_range": CONTAINER_PORTS, "instance_name": instance,
            "allowed_images": [images["kernel"]]}
    data = tmp_path / "data"
    write_container_spec(data, "curve", "docker-provisioner", base, metadata=CURVE)
    write_container_spec(data, "curve-image-cmd", "docker-provisioner", base, argv=["image-command"], metadata=CURVE)
    write_container_spec(data, "plain", "docker-provisioner", {**base, "transport_encryption": "disabled"},
                         metadata=CURVE)
    write_container_spec(data, "required", "docker-provisioner", {**base, "transport_encryption": "required"})
    server = start_gateway("--debug", tmp_path=tmp_path, env={"JUPYTER_PATH": str(data)})
    server.extra["runtime"] = tmp_path / "runtime"
    yield server
    server.stop()


def test_encrypted_container_kernel_and_a_plain_one(gw, docker_client, instance, tmp_path):
    runtime = gw.extra["runtime"]
    encrypted = start_kernel(gw, "curve", timeout=180)
    plain = start_kernel(gw, "plain", timeout=180)
    try:
        assert_remote_kernel_encrypted(gw, runtime, encrypted, tmp_path / "docker-curve.pcap", launcher_pid)
        assert_plaintext_on_the_wire(gw, runtime, plain, tmp_path / "docker-plain.pcap")
    finally:
        call(gw, "DELETE", f"/api/kernels/{encrypted}")
        call(gw, "DELETE", f"/api/kernels/{plain}")
    image_cmd = start_kernel(gw, "curve-image-cmd", timeout=180)  # TRANSPORT_ENCRYPTION for bootstrap-kernel.sh
    try:
        assert_remote_kernel_encrypted(gw, runtime, image_cmd, tmp_path / "docker-image-cmd.pcap", launcher_pid)
    finally:
        call(gw, "DELETE", f"/api/kernels/{image_cmd}")
    wait_until(lambda: not containers_of(docker_client, instance), 60, what="no container left")


def test_restart_keeps_encryption_and_required_refuses(gw, tmp_path):
    runtime = gw.extra["runtime"]
    kid = start_kernel(gw, "curve", timeout=180)
    try:
        before = connection_file(runtime, kid)["curve_publickey"]
        status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=180)
        assert status == 200, body
        assert connection_file(runtime, kid)["curve_publickey"] != before  # a new container, a new key pair
        assert_remote_kernel_encrypted(gw, runtime, kid, tmp_path / "docker-restarted.pcap", launcher_pid)
    finally:
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    assert_error(post_kernel(gw, "required"), 400, "'required'", "transport encryption")


def test_swarm_service_kernel_is_encrypted(tmp_path, swarm, images, instance):
    # the kernel's task joins the host network so the test, outside any overlay, can reach it
    config = {"image": images["kernel"], "port_range": CONTAINER_PORTS, "instance_name": instance, "network": "host",
              "response_host": "127.0.0.1", "allowed_images": [images["kernel"]]}
    write_container_spec(tmp_path / "data", "swarm-curve", "docker-swarm-provisioner", config, metadata=CURVE)
    gw = start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(tmp_path / "data")})
    try:
        kid = start_kernel(gw, "swarm-curve", timeout=180)
        assert_remote_kernel_encrypted(gw, tmp_path / "runtime", kid, tmp_path / "swarm-curve.pcap", launcher_pid)
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    finally:
        gw.stop()
        for service in services_of(swarm, instance):  # none after a clean DELETE; a failed test leaves none either
            service.remove()
