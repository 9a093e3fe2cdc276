"""The Kubernetes test cluster itself, through the official ``kubernetes`` client: the server's version,
the node, a pod from the project's kernel image followed by a watch, and its deletion."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client, config, watch

from tests.services.gateway import wait_until
from tests.services.kubernetes_cluster import KubernetesCluster

NAMESPACE = "default"
TIMEOUT = 180  # seconds for a pod to run to completion (2 busy cores)


@pytest.fixture(scope="module")
def core(k8s_cluster: KubernetesCluster) -> client.CoreV1Api:
    api_client = config.new_client_from_config(config_file=k8s_cluster.kubeconfig)
    yield client.CoreV1Api(api_client)
    api_client.close()


def test_server_version(core: client.CoreV1Api) -> None:
    version = client.VersionApi(core.api_client).get_code()
    assert version.git_version.startswith("v1.34."), version
    assert (version.major, version.minor) == ("1", "34")


def test_node_ready(k8s_cluster: KubernetesCluster, core: client.CoreV1Api) -> None:
    node = core.read_node(k8s_cluster.node_name)
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
    assert {a.type: a.address for a in node.status.addresses}["InternalIP"] == k8s_cluster.node_ip
    assert node.status.node_info.kubelet_version.startswith("v1.34.")


def watch_pods(core: client.CoreV1Api, selector: str, version: str, until, timeout: float) -> list[tuple[str, str]]:
    """(event type, pod phase) of the pods matching ``selector`` from ``version`` on, up to and including
    the first event for which ``until(type, pod)`` is true (or ``timeout`` seconds)."""
    seen = []
    stream = watch.Watch()
    for event in stream.stream(core.list_namespaced_pod, NAMESPACE, label_selector=selector,
                               resource_version=version, timeout_seconds=int(timeout)):
        seen.append((event["type"], event["object"].status.phase))
        if until(event["type"], event["object"]):
            stream.stop()
    return seen


def test_kernel_image_pod_runs_and_is_watched(k8s_cluster: KubernetesCluster, core: client.CoreV1Api) -> None:
    name = f"kgw-smoke-{uuid.uuid4().hex[:8]}"
    selector = f"kgw-test={name}"
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels={"kgw-test": name}),
        spec=client.V1PodSpec(restart_policy="Never", containers=[client.V1Container(
            name="kernel", image=k8s_cluster.kernel_image, image_pull_policy="Never",  # nothing can be pulled
            command=["python", "-c", "import ipykernel; print('ipykernel', ipykernel.__version__)"])]))
    # each watch starts from the list's version: no event between the list and the watch is missed
    version = core.list_namespaced_pod(NAMESPACE, label_selector=selector).metadata.resource_version
    core.create_namespaced_pod(NAMESPACE, pod)
    try:
        seen = watch_pods(core, selector, version, lambda _, p: p.status.phase in ("Succeeded", "Failed"), TIMEOUT)
        logs = core.read_namespaced_pod_log(name, NAMESPACE)
        assert seen[0] == ("ADDED", "Pending"), seen
        assert seen[-1] == ("MODIFIED", "Succeeded"), (seen, logs)
        assert logs.startswith("ipykernel "), logs

        version = core.list_namespaced_pod(NAMESPACE, label_selector=selector).metadata.resource_version
        core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
        seen = watch_pods(core, selector, version, lambda kind, _: kind == "DELETED", 60)
        assert seen[-1][0] == "DELETED", seen
    finally:
        if core.list_namespaced_pod(NAMESPACE, label_selector=selector).items:  # a failed assertion above
            core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
    assert core.list_namespaced_pod(NAMESPACE, label_selector=selector).items == []
    # and on the node: no sandbox or container of the pod left running
    wait_until(lambda: not k8s_cluster.crictl("pods", "--name", name, "--state", "ready", "-q").stdout.strip()
               and not k8s_cluster.crictl("ps", "--label", f"io.kubernetes.pod.name={name}", "-q").stdout.strip(),
               60, 0.5, what=f"pod {name} to leave the node")
