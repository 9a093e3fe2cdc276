"""Fixtures of the Kubernetes suites. ``k8s_cluster`` (the real single-node v1.34 cluster of the session, which
marks its tests ``cluster``) lives in ``tests/integration/conftest.py``, shared with the kernel store's tests."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.services.kubernetes_cluster import KubernetesCluster

#: what the Spark driver's service account may do in its namespace: run its executors, their Service and
#: ConfigMaps (and the executors' volume claims Spark would own); docs/operators/kubernetes-spark.md
SPARK_DRIVER_RULES = [{"apiGroups": [""], "resources": ["pods", "services", "configmaps", "persistentvolumeclaims"],
                       "verbs": ["create", "get", "list", "watch", "delete", "deletecollection", "patch", "update"]}]
SPARK_ACCOUNT = "spark"


@pytest.fixture(scope="session")
def spark_tarball() -> tuple[str, Path]:
    """(name, tarball) of the Spark kernel image (:func:`~tests.services.kubernetes_build.spark_image`), built
    when its inputs changed: before ``k8s_cluster``, so no other session waits for the cluster meanwhile."""
    from tests.services.kubernetes_build import spark_image

    return spark_image()


@pytest.fixture(scope="session")
def spark_kernel_image(spark_tarball: tuple[str, Path], k8s_cluster: KubernetesCluster) -> str:
    """The Spark kernel image imported into the cluster (use ``imagePullPolicy: Never``) and, in namespace
    ``default``, the drivers' service account ``spark`` bound to a Role with :data:`SPARK_DRIVER_RULES`, as an
    operator gives it."""
    from kubernetes import client, config

    started = time.monotonic()
    name = k8s_cluster.import_image(*spark_tarball)
    k8s_cluster.timings["spark image import"] = time.monotonic() - started
    api = config.new_client_from_config(config_file=k8s_cluster.kubeconfig)
    meta = {"name": SPARK_ACCOUNT, "namespace": "default"}
    rbac = client.RbacAuthorizationV1Api(api)
    for create, body in (
            (client.CoreV1Api(api).create_namespaced_service_account, {"metadata": meta}),
            (rbac.create_namespaced_role, {"metadata": meta, "rules": SPARK_DRIVER_RULES}),
            (rbac.create_namespaced_role_binding, {
                "metadata": meta, "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                              "name": SPARK_ACCOUNT},
                "subjects": [{"kind": "ServiceAccount", "name": SPARK_ACCOUNT, "namespace": "default"}]})):
        try:
            create("default", body)
        except client.ApiException as exc:
            if exc.status != 409:  # made earlier in this session
                raise
    api.close()
    return name
