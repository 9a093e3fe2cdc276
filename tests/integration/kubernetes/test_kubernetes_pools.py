"""Warm pools of pod kernels on the real Kubernetes cluster: pods wait warm and a request gets one, bound late to its
environment through the launcher's control port; a request for a namespace or resources starts cold; the pool drains
when the gateway stops, leaving no pod or Secret."""

from __future__ import annotations

import pytest

from tests.services.client import call, start_kernel
from tests.services.gateway import wait_until
from tests.services.kernel_store import run
from tests.services.scrape import metric

from .test_kubernetes_kernels import START, core, instance, k8s_gateway, nothing_left, pods_of  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster


def test_pod_pool_hands_out_warm_pods_late_bound(tmp_path, k8s_cluster, core, instance):  # noqa: F811 (fixtures)
    gw = k8s_gateway(tmp_path, k8s_cluster, instance, pod={"pool_size": 2})
    ready = lambda: metric(gw, "kernel_gateway_pool_kernels", kernelspec="pod", state="ready")  # noqa: E731
    try:
        wait_until(lambda: ready() == 2, START, 0.5, what="two warm pods")
        waiting = {p.metadata.labels["kernel_gateway.kernel_id"] for p in pods_of(core, instance)}
        assert len(waiting) == 2

        kid = start_kernel(gw, "pod", env={"KERNEL_USERNAME": "alice", "KERNEL_COLOR": "teal"}, timeout=START)
        assert kid in waiting and f"kernel={kid} started warm kernel pod" in gw.log()
        out = run(gw, kid, "import os; print(os.environ['KERNEL_USERNAME'], os.environ['KERNEL_COLOR'], "
                           "'KERNEL_LAUNCH_TOKEN' in os.environ)")
        assert out.split() == ["alice", "teal", "False"]
        # the client's variables travelled sealed to the launcher: they are in no pod's spec
        assert not any("teal" in str(p.spec.containers[0].env) for p in pods_of(core, instance))

        cold = start_kernel(gw, "pod", env={"KERNEL_MEMORY": "512m"}, timeout=START)
        assert cold not in waiting and "starting cold: the request sets KERNEL_MEMORY" in gw.log()

        assert call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=START)[0] == 200
        assert run(gw, kid, "import os; print(os.environ['KERNEL_COLOR'])").strip() == "teal"
        for k in (kid, cold):
            assert call(gw, "DELETE", f"/api/kernels/{k}", timeout=START)[0] == 204
        wait_until(lambda: ready() == 2, START, 0.5, what="the pool refilled")
    finally:
        gw.stop()
    wait_until(lambda: nothing_left(core, instance), 90, 0.5, what="no pod or Secret left once the gateway stopped")
    assert "Traceback" not in gw.log()
