"""Fixtures shared by the integration suites: the real single-node Kubernetes v1.34 cluster of the session
(``tests/services/kubernetes_cluster.py``), used by ``kubernetes/`` (pod kernels, the Helm chart) and ``store/``
(the Kubernetes kernel store) alike, so one session starts one cluster.

Every test that uses ``k8s_cluster`` is marked ``cluster`` (``-m "not cluster"`` skips them). The first
session on a machine builds the binaries and images (~13 minutes on 2 cores; cached in
``${KGW_CACHE_DIR:-/var/cache/kgw}``), so pytest's timeout counts only the tests' own time there: the
cluster's start-up has its own deadlines. Needs root.
"""

from __future__ import annotations

import pytest

from tests.services.kubernetes_cluster import KubernetesCluster, log, start_cluster


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if "k8s_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
            item.add_marker(pytest.mark.timeout(300, func_only=True))


@pytest.fixture(scope="session")
def k8s_cluster(tmp_path_factory) -> KubernetesCluster:
    """The API server (``api_url``), an admin kubeconfig (``kubeconfig``), the project's kernel image
    imported into containerd (``kernel_image``, use ``imagePullPolicy: Never``), the node's ``node_ip``."""
    cluster = start_cluster(tmp_path_factory.mktemp("kubernetes"))
    yield cluster
    cluster.stop()
    log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items()))
