"""The gateway in its own image, launching sibling kernel containers through the mounted Docker socket,
driven end to end by jupyter_server in gateway mode."""

from __future__ import annotations

import os
import secrets
import uuid
from types import SimpleNamespace

import pytest

from tests.e2e.conftest import start_jupyter_server
from tests.services.client import KernelWS, call
from tests.services.docker_engine import TEST_LABEL
from tests.services.gateway import free_port, wait_until

from .conftest import containers_of, write_container_spec

pytestmark = pytest.mark.cluster


def test_gateway_image_runs_kernels_as_sibling_containers(tmp_path, docker_client, images, instance):
    specs = tmp_path / "specs"
    write_container_spec(specs, "docker-python", "docker-provisioner",
                         {"image": images["kernel"], "network": "bridge", "instance_name": instance,
                          "port_range": "43000..43099"})
    os.chmod(tmp_path, 0o755)
    for path in specs.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    token, port = secrets.token_hex(16), free_port()
    socket_gid = os.stat("/var/run/docker.sock").st_gid
    gateway = docker_client.containers.run(
        images["gateway"], detach=True, name=f"kgw-gateway-{uuid.uuid4().hex[:8]}",
        labels={TEST_LABEL: instance}, ports={"8888/tcp": ("127.0.0.1", port)}, group_add=[socket_gid],
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(specs): {"bind": "/srv/kernelspecs", "mode": "ro"}},
        environment={"GATEWAY_AUTH_TOKEN": token, "JUPYTER_PATH": "/srv/kernelspecs",
                     "GATEWAY_DEFAULT_KERNEL_NAME": "docker-python"},
    )
    server = None
    try:
        def healthy():
            gateway.reload()
            state = gateway.attrs["State"]
            if state["Status"] == "exited":
                raise RuntimeError(f"gateway container exited:\n{gateway.logs().decode()[-3000:]}")
            return state.get("Health", {}).get("Status") == "healthy"

        wait_until(healthy, 90, interval=0.5, what="gateway container healthy")
        assert gateway.attrs["Config"]["User"] not in ("", "0", "root")
        gw = SimpleNamespace(url=f"http://127.0.0.1:{port}", token=token)
        server = start_jupyter_server(gw, tmp_path / "js")
        status, body, _ = call(server, "POST", "/api/sessions",
                               {"path": "n.ipynb", "type": "notebook", "kernel": {"name": "docker-python"}}, timeout=120)
        assert status == 201, (body, gateway.logs().decode()[-3000:])
        kernel_id = body["kernel"]["id"]
        [kernel_container] = containers_of(docker_client, instance)
        assert kernel_container.labels["kernel_gateway.kernel_id"] == kernel_id
        assert kernel_container.id != gateway.id
        with KernelWS(server, kernel_id, session_id=uuid.uuid4().hex) as ws:
            out, _ = ws.run("import socket; print(socket.gethostname())", 60)
        assert kernel_container.id.startswith(out.strip())
        assert call(server, "DELETE", f"/api/sessions/{body['id']}")[0] == 204
        wait_until(lambda: not containers_of(docker_client, instance), 30, what="kernel container removed")
    finally:
        if server is not None:
            server.stop()
        gateway.remove(force=True)
        for leftover in containers_of(docker_client, instance):
            leftover.remove(force=True)
