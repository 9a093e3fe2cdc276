"""Kernels as Docker containers and Swarm services on a real Docker engine, through the gateway."""

from __future__ import annotations

import signal
import time

import pytest

from tests.services.client import KernelWS, call, start_kernel
from tests.services.kernel_checks import LISTENING_PORTS, interrupt_busy_loop
from tests.services.gateway import start_gateway, wait_until

from .conftest import CONTAINER_PORTS, containers_of, services_of, write_container_spec

pytestmark = pytest.mark.cluster
LOW, HIGH = (int(p) for p in CONTAINER_PORTS.split(".."))

def docker_gateway(tmp_path, images, instance, provisioner="docker-provisioner", **config):
    base = {"image": images["kernel"], "port_range": CONTAINER_PORTS, "instance_name": instance,
            "max_cpus": 2, "max_memory": "1g", "allowed_images": [images["kernel"], "kgw-missing:none"]}
    base.update(config)
    write_container_spec(tmp_path / "data", "container", provisioner, base)
    write_container_spec(tmp_path / "data", "exits", provisioner, base,
                         argv=["/bin/sh", "-c", "echo launcher-boom >&2; exit 3"])
    return start_gateway(tmp_path=tmp_path, env={"JUPYTER_PATH": str(tmp_path / "data")})


def test_container_lifecycle_and_ports(tmp_path, docker_client, images, instance):
    gw = docker_gateway(tmp_path, images, instance)
    try:
        kid = start_kernel(gw, "container", env={"KERNEL_USERNAME": "alice", "KERNEL_CPUS": "1", "KERNEL_MEMORY": "512m"})
        [container] = containers_of(docker_client, instance)
        assert container.labels["kernel_gateway.kernel_id"] == kid
        assert container.labels["kernel_gateway.user"] == "alice"
        assert container.attrs["HostConfig"]["NanoCpus"] == 10**9
        assert container.attrs["HostConfig"]["Memory"] == 512 * 1024**2
        with KernelWS(gw, kid) as ws:
            out, _ = ws.run("import os, socket; print(os.getuid(), socket.gethostname())")
            uid, hostname = out.split()
            assert uid == "1000" and container.id.startswith(hostname)
            ports = eval(ws.run(LISTENING_PORTS)[0])
            assert len(ports) >= 6 and all(LOW <= p <= HIGH for p in ports), ports
            interrupt_busy_loop(gw, ws, kid)
            status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart")
            assert status == 200 and body["id"] == kid
            assert ws.run("print('after restart')")[0].strip() == "after restart"
        [restarted] = containers_of(docker_client, instance)
        assert restarted.id != container.id, "restart should run a fresh container"
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not containers_of(docker_client, instance), 60, what="no container left after shutdown")
    finally:
        gw.stop()


@pytest.mark.parametrize("env, words", [
    ({"KERNEL_IMAGE": "busybox:latest"}, "not allowed"),
    ({"KERNEL_IMAGE": "kgw-missing:none"}, "not present on the Docker host"),
    ({"KERNEL_CPUS": "64"}, "KERNEL_CPUS=64 is above the limit"),
    ({"KERNEL_MEMORY": "100g"}, "KERNEL_MEMORY=100g is above the limit"),
    ({"KERNEL_MEMORY": "lots"}, "not a memory size"),
    ({"KERNEL_UID": "0"}, "KERNEL_UID=0 is not allowed"),
    ({"KERNEL_GID": "0"}, "KERNEL_GID=0 is not allowed"),
    ({"KERNEL_GPUS": "1"}, "KERNEL_GPUS=1 is above the limit of 0"),
])
def test_bad_requests_start_nothing(tmp_path, docker_client, images, instance, env, words):
    gw = docker_gateway(tmp_path, images, instance)
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "container", "env": env})
        assert status == 400 and words in body["message"], body
        assert not containers_of(docker_client, instance)
    finally:
        gw.stop()


def test_container_that_exits_during_launch_fails_fast(tmp_path, docker_client, images, instance):
    gw = docker_gateway(tmp_path, images, instance)
    try:
        started = time.monotonic()
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "exits"})
        elapsed = time.monotonic() - started
        assert status == 502, body
        assert "exited with status 3" in body["message"] and "launcher-boom" in body["message"], body
        assert elapsed < 15, f"took {elapsed:.1f}s: the exit should be noticed, not timed out"
        wait_until(lambda: not containers_of(docker_client, instance), 60, what="failed container removed")
    finally:
        gw.stop()


def test_crash_restarts_and_sigkill_leftovers_are_reaped(tmp_path, docker_client, images, instance):
    gw = docker_gateway(tmp_path, images, instance)
    try:
        kid = start_kernel(gw, "container")
        with KernelWS(gw, kid, session_id="watcher") as ws:
            [container] = containers_of(docker_client, instance)
            container.kill()
            wait_until(lambda: (lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "restarting")(
                ws.recv(60)), 60, what="clients told the kernel is restarting")
            wait_until(lambda: call(gw, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "idle", 60,
                       what="kernel back after the crash")
            assert ws.run("print('back')", 60)[0].strip() == "back"
        wait_until(lambda: len(containers_of(docker_client, instance)) == 1, 60, what="exactly one container")
        gw.stop(signal.SIGKILL)
        assert len(containers_of(docker_client, instance)) == 1  # the orphan a killed gateway leaves
        again = docker_gateway(tmp_path / "again", images, instance)
        try:
            kid2 = start_kernel(again, "container")
            wait_until(lambda: [c.labels["kernel_gateway.kernel_id"] for c in containers_of(docker_client, instance)] == [kid2],
                       60, what="the earlier run's container removed")
        finally:
            again.stop()
        wait_until(lambda: not containers_of(docker_client, instance), 60, what="nothing left")
    finally:
        gw.stop()


def test_swarm_service_lifecycle(tmp_path, swarm, images, instance):
    # the kernel's task joins the host network so the test, outside any overlay, can reach it
    gw = docker_gateway(tmp_path, images, instance, provisioner="docker-swarm-provisioner", network="host",
                        response_host="127.0.0.1")
    try:
        kid = start_kernel(gw, "container")
        [service] = services_of(swarm, instance)
        assert service.attrs["Spec"]["Labels"]["kernel_gateway.kernel_id"] == kid
        with KernelWS(gw, kid) as ws:
            assert ws.run("print(6 * 7)")[0].strip() == "42"
            ports = eval(ws.run(LISTENING_PORTS)[0])
            assert len(ports) >= 6 and all(LOW <= p <= HIGH for p in ports), ports
            interrupt_busy_loop(gw, ws, kid)
        status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart")
        assert status == 200, body
        with KernelWS(gw, kid) as ws:
            assert ws.run("print('again')")[0].strip() == "again"
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not services_of(swarm, instance), 30, what="service removed")
    finally:
        gw.stop()
        for service in services_of(swarm, instance):
            service.remove()
