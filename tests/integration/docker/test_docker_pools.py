"""Warm pools of Docker and Swarm kernels: containers wait warm and a request gets one, bound late to its environment
through the launcher's control port; a request for another image starts cold; the pool drains when the gateway
stops. Real gateway, real Docker engine (and Swarm), our kernel image."""

from __future__ import annotations

import pytest

from tests.services.client import call, start_kernel
from tests.services.gateway import wait_until
from tests.services.kernel_store import run
from tests.services.scrape import metric

from . import test_docker_reattach
from .conftest import CONTAINER_PORTS, write_container_spec
from .test_docker_reattach import SWARM, kernel_ids, remove_all

pytestmark = pytest.mark.cluster

engine = test_docker_reattach.engine  # the Docker client; a Swarm manager for the Swarm case


@pytest.mark.parametrize("provisioner", ["docker-provisioner", SWARM])
def test_container_pool_hands_out_warm_containers_late_bound(start_gw, engine, images, instance, provisioner, tmp_path):
    config = {"image": images["kernel"], "port_range": CONTAINER_PORTS, "instance_name": instance, "pool_size": 2,
              "allowed_images": [images["kernel"]]}
    if provisioner == SWARM:  # the task joins the host network so this process, outside any overlay, reaches it
        config.update(network="host", response_host="127.0.0.1")
    write_container_spec(tmp_path / "data", "container", provisioner, config)
    gw = start_gw("--GatewayPolicy.max_kernels_per_user=10", timeout=60,
                  env={"JUPYTER_PATH": str(tmp_path / "data"), "GATEWAY_POOL_CHECK_INTERVAL": "0.5"})
    ready = lambda: metric(gw, "kernel_gateway_pool_kernels", kernelspec="container", state="ready")  # noqa: E731
    try:
        wait_until(lambda: ready() == 2, 180, 0.5, what="two warm containers")
        waiting = set(kernel_ids(engine, provisioner, instance))
        assert len(waiting) == 2

        kid = start_kernel(gw, "container", env={"KERNEL_USERNAME": "alice", "KERNEL_COLOR": "teal"}, timeout=120)
        assert kid in waiting, "the kernel is not one of the warm containers"
        assert f"kernel={kid} started warm kernel container" in gw.log()
        out = run(gw, kid, "import os; print(os.environ['KERNEL_USERNAME'], os.environ['KERNEL_COLOR'], os.environ['KERNEL_ID'])")
        assert out.split() == ["alice", "teal", kid], "the request's environment did not reach the warm container"
        # the client's variables travelled sealed to the launcher: they are in no container's configuration
        container_env = [o.attrs["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env", []) if provisioner == SWARM
                         else o.attrs["Config"]["Env"] for o in test_docker_reattach.kernel_objects(engine, provisioner, instance)]
        assert not any("teal" in entry for env in container_env for entry in env)

        # another image (even the same one, named) cannot be given to a running container: cold
        cold = start_kernel(gw, "container", env={"KERNEL_IMAGE": images["kernel"]}, timeout=120)
        assert cold not in waiting and f"kernel={cold} started kernel container" in gw.log()
        assert "starting cold: the request sets KERNEL_IMAGE" in gw.log()
        assert metric(gw, "kernel_gateway_pool_misses_total", kernelspec="container", reason="request") == 1

        assert call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=120)[0] == 200
        assert run(gw, kid, "import os; print(os.environ['KERNEL_COLOR'])").strip() == "teal"
        wait_until(lambda: ready() == 2, 180, 0.5, what="the pool refilled")
        for k in (kid, cold):
            assert call(gw, "DELETE", f"/api/kernels/{k}")[0] == 204
        gw.stop()
        wait_until(lambda: not kernel_ids(engine, provisioner, instance), 60, 0.5,
                   what="warm containers removed with the gateway")
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()
        remove_all(engine, provisioner, instance)  # a failed test leaves nothing behind
