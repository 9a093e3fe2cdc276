"""CurveZMQ transport encryption of pod kernels on the real Kubernetes cluster (issue 12): the launcher in the pod makes
the key pair and reports the public key; the gateway's sockets are CurveZMQ clients. Packets captured with tcpdump on
every interface of this machine, the pod network's included."""

from __future__ import annotations

import pytest

from tests.integration.docker.test_docker_encryption import CURVE, launcher_pid
from tests.services.capture import assert_remote_kernel_encrypted, connection_file
from tests.services.client import call, start_kernel
from tests.services.gateway import wait_until

from .test_kubernetes_kernels import START, core, instance, k8s_gateway, nothing_left  # noqa: F401 (fixtures)

pytestmark = pytest.mark.cluster


def test_encrypted_pod_kernel_keeps_encryption_across_a_restart(tmp_path, k8s_cluster, core, instance):  # noqa: F811
    gw = k8s_gateway(tmp_path, k8s_cluster, instance, metadata=CURVE)
    runtime = tmp_path / "runtime"
    try:
        kid = start_kernel(gw, "pod", timeout=START)
        assert_remote_kernel_encrypted(gw, runtime, kid, tmp_path / "pod.pcap", launcher_pid)
        before = connection_file(runtime, kid)["curve_publickey"]
        assert call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=START)[0] == 200
        assert connection_file(runtime, kid)["curve_publickey"] != before, "a new pod, a new key pair"
        assert_remote_kernel_encrypted(gw, runtime, kid, tmp_path / "pod-restarted.pcap", launcher_pid)
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=START)[0] == 204
        wait_until(lambda: nothing_left(core, instance), 60, 0.5, what="no pod or secret left after shutdown")
    finally:
        gw.stop()
