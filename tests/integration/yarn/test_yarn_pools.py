"""Warm pools of native YARN kernels on the real ResourceManager and NodeManager: applications wait warm and a request
gets one, bound late to its environment through the launcher's control port; a request for another queue or size
starts cold; the pool drains when the gateway stops, leaving no live application."""

from __future__ import annotations

import pytest

from tests.services.client import call, start_kernel
from tests.services.gateway import wait_until
from tests.services.kernel_store import run
from tests.services.scrape import metric

from .test_yarn_kernels import instance, proxy, yarn, yarn_gateway  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster


def test_yarn_pool_hands_out_warm_applications_late_bound(tmp_path, yarn, proxy, instance):  # noqa: F811
    gw = yarn_gateway(tmp_path, yarn, proxy, instance, only_yarn={"pool_size": 1})
    ready = lambda: metric(gw, "kernel_gateway_pool_kernels", kernelspec="yarn", state="ready")  # noqa: E731
    try:
        wait_until(lambda: ready() == 1, 180, 0.5, what="a warm YARN application")
        [warm] = [a for a in yarn.apps(instance) if a["state"] == "RUNNING"]
        kid = start_kernel(gw, "yarn", env={"KERNEL_USERNAME": "alice", "KERNEL_COLOR": "teal"}, timeout=120)
        assert warm["name"] == kid and f"kernel={kid} started warm kernel yarn" in gw.log()
        out = run(gw, kid, "import os; print(os.environ['KERNEL_USERNAME'], os.environ['KERNEL_COLOR'], "
                           "os.environ['CONTAINER_ID'].split('_')[2])")
        assert out.split() == ["alice", "teal", warm["id"].split("_")[2]]

        wait_until(lambda: ready() == 1, 180, 0.5, what="the pool refilled")
        cold = start_kernel(gw, "yarn", env={"KERNEL_MEMORY": "512m"}, timeout=120)
        assert "starting cold: the request sets KERNEL_MEMORY" in gw.log()
        for k in (kid, cold):
            assert call(gw, "DELETE", f"/api/kernels/{k}", timeout=120)[0] == 204
        assert ready() == 1, "the cold start took the warm application"
    finally:
        gw.stop()
    wait_until(lambda: not yarn.apps(instance), 60, 0.5, what="no live application once the gateway stopped")
    assert "Traceback" not in gw.log()
