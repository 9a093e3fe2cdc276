"""Kernels as pods on a real Kubernetes v1.34 cluster (``k8s_cluster``), through the gateway: the kubernetes-provisioner."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kubernetes import client, config

from provisioners._blocking import run_blocking
from provisioners.kubernetes_watch import INSTANCE_LABEL, KERNEL_LABEL, PodWatcher
from tests.integration.docker.conftest import write_container_spec  # the same kernelspec shape
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import start_gateway, wait_until
from tests.services.kernel_checks import LISTENING_PORTS, interrupt_busy_loop
from tests.services.kubernetes_cluster import KubernetesCluster

PORTS = "44000..44099"
LOW, HIGH = (int(p) for p in PORTS.split(".."))
PROVISIONER = "kubernetes-provisioner"
MISSING_IMAGE = "localhost/kgw/missing:none"
START = 180  # seconds a kernel start may take on 2 busy cores
LAUNCH_TIMEOUT = 150  # the gateway's: "fails fast" means well before it
HOSTILE = {  # the gateway refuses newlines and control characters in env values (tests/unit covers them in the
    # template); everything else YAML or Jinja2 could read as syntax is here, and a user name too long for a label
    "KERNEL_USERNAME": "ali ce\"' nested: {{ 7*7 }}{% raw %}- x: y #c &a *b !t " + "u" * 80,
    "KERNEL_EXTRA": "kind: Secret --- - item: [1, 2] {{ config }}{% for x in y %}\t}\"]{ ? | > %}",
    "KERNEL_LONG": "x" * 4000 + ": y",
}


@pytest.fixture(scope="module")
def core(k8s_cluster: KubernetesCluster) -> client.CoreV1Api:
    api_client = config.new_client_from_config(config_file=k8s_cluster.kubeconfig)
    yield client.CoreV1Api(api_client)
    api_client.close()


@pytest.fixture
def instance() -> str:
    return f"kgw-test-{uuid.uuid4().hex[:8]}"


def k8s_gateway(tmp_path: Path, cluster: KubernetesCluster, instance: str, pod: dict | None = None,
                metadata: dict | None = None, **overrides):
    """A gateway with kernelspecs 'pod', 'exits' and 'missing'; ``pod``: options of the 'pod' spec alone, ``metadata``:
    added to its metadata."""
    base = {"image": cluster.kernel_image, "image_pull_policy": "Never", "kubeconfig": cluster.kubeconfig,
            "response_host": cluster.node_ip, "port_range": PORTS, "instance_name": instance, "namespace": "default",
            "max_cpus": 64, "max_memory": "1g", "allowed_images": [cluster.kernel_image, MISSING_IMAGE],
            "launch_timeout": LAUNCH_TIMEOUT}
    base.update(overrides)
    write_container_spec(tmp_path / "data", "pod", PROVISIONER, {**base, **(pod or {})}, metadata=metadata)
    write_container_spec(tmp_path / "data", "exits", PROVISIONER, base,
                         argv=["/bin/sh", "-c", "echo launcher-boom >&2; exit 3"])
    write_container_spec(tmp_path / "data", "missing", PROVISIONER, {**base, "image": MISSING_IMAGE})
    return start_gateway(tmp_path=tmp_path, timeout=60,
                         env={"JUPYTER_PATH": str(tmp_path / "data")})


def pods_of(core: client.CoreV1Api, instance: str) -> list:
    return core.list_pod_for_all_namespaces(label_selector=f"kernel_gateway.instance={instance}").items


def secrets_of(core: client.CoreV1Api, instance: str) -> list:
    return core.list_secret_for_all_namespaces(label_selector=f"kernel_gateway.instance={instance}").items


def namespaces_of(core: client.CoreV1Api, instance: str) -> list:
    return core.list_namespace(label_selector=f"kernel_gateway.instance={instance}").items


def nothing_left(core: client.CoreV1Api, instance: str) -> bool:
    return not pods_of(core, instance) and not secrets_of(core, instance) and not namespaces_of(core, instance)


def test_pod_lifecycle_and_ports(tmp_path, k8s_cluster, core, instance):
    gw = k8s_gateway(tmp_path, k8s_cluster, instance)
    try:
        started = time.monotonic()
        kid = start_kernel(gw, "pod", env={"KERNEL_USERNAME": "alice", "KERNEL_CPUS": "0.5", "KERNEL_MEMORY": "512m"},
                           timeout=START)
        print(f"pod kernel start-to-ready: {time.monotonic() - started:.1f}s")
        [pod] = pods_of(core, instance)
        assert pod.metadata.name == f"kernel-{kid}" and pod.metadata.namespace == "default"
        assert pod.metadata.labels["kernel_gateway.kernel_id"] == kid
        assert pod.metadata.labels["kernel_gateway.user"] == "alice"
        container = pod.spec.containers[0]
        assert container.resources.limits == {"cpu": "500m", "memory": str(512 * 1024**2)}
        assert pod.spec.security_context.run_as_non_root and pod.spec.security_context.run_as_user == 1000
        token_env = next(e for e in container.env if e.name == "KERNEL_LAUNCH_TOKEN")
        assert token_env.value is None and token_env.value_from.secret_key_ref.name == pod.metadata.name
        [secret] = secrets_of(core, instance)
        assert secret.metadata.name == pod.metadata.name
        with KernelWS(gw, kid) as ws:
            out, _ = ws.run("import os, socket; print(os.getuid(), socket.gethostname(), "
                            "'KERNEL_LAUNCH_TOKEN' in os.environ)")
            assert out.split() == ["1000", pod.metadata.name, "False"], out
            # the kernel's five ports and the launcher's control port, all inside the range and all distinct (the
            # heartbeat's port, free until its thread binds it, is reserved from the other channels' random binds)
            ports = eval(ws.run(LISTENING_PORTS)[0])
            assert len(ports) >= 6 and all(LOW <= p <= HIGH for p in ports), ports
            interrupt_busy_loop(gw, ws, kid)
        status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=START)
        assert status == 200 and body["id"] == kid, body
        [restarted] = pods_of(core, instance)
        assert restarted.metadata.name == pod.metadata.name and restarted.metadata.uid != pod.metadata.uid
        with KernelWS(gw, kid) as ws:
            assert ws.run("print('after restart')")[0].strip() == "after restart"
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=START)[0] == 204
        wait_until(lambda: nothing_left(core, instance), 60, 0.5, what="no pod or secret left after shutdown")
    finally:
        gw.stop()


def test_per_kernel_namespace_with_role_binding(tmp_path, k8s_cluster, core, instance):
    gw = k8s_gateway(tmp_path, k8s_cluster, instance, namespace_mode="per-kernel", kernel_cluster_role="view")
    try:
        kid = start_kernel(gw, "pod", timeout=START)
        namespace = f"kernel-{kid}"
        [ns] = namespaces_of(core, instance)
        assert ns.metadata.name == namespace and ns.metadata.labels["kernel_gateway.kernel_id"] == kid
        [pod] = pods_of(core, instance)
        assert pod.metadata.namespace == namespace and pod.spec.service_account_name == "kernel"
        rbac = client.RbacAuthorizationV1Api(core.api_client)
        [binding] = rbac.list_namespaced_role_binding(namespace).items
        assert (binding.role_ref.kind, binding.role_ref.name) == ("ClusterRole", "view")
        assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [("ServiceAccount", "kernel", namespace)]
        with KernelWS(gw, kid) as ws:
            assert ws.run("print(6 * 7)")[0].strip() == "42"
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=START)[0] == 204
        wait_until(lambda: nothing_left(core, instance), 120, 0.5, what="the kernel's namespace deleted")
    finally:
        gw.stop()


@pytest.mark.parametrize("kernel, env, status, words", [
    ("pod", {"KERNEL_IMAGE": MISSING_IMAGE}, 400, "ErrImageNeverPull"),  # the client's image
    ("missing", {}, 502, "ErrImageNeverPull"),  # the operator's image
    ("pod", {"KERNEL_CPUS": "32"}, 503, "Insufficient cpu"),  # within max_cpus, above the node's 2 cores
    ("exits", {}, 502, "launcher-boom"),
    ("pod", {"KERNEL_MEMORY": "24m"}, 502, "OOMKilled"),  # Python and ipykernel need more
])
def test_pods_that_cannot_run_fail_fast(tmp_path, k8s_cluster, core, instance, kernel, env, status, words):
    gw = k8s_gateway(tmp_path, k8s_cluster, instance)
    try:
        started = time.monotonic()
        got, body, _ = call(gw, "POST", "/api/kernels", {"name": kernel, "env": env}, timeout=START)
        elapsed = time.monotonic() - started
        assert got == status and words in body["message"], (got, body)
        assert elapsed < LAUNCH_TIMEOUT / 3, f"took {elapsed:.1f}s: the pod's status should end the start"
        print(f"{kernel} {env}: {got} after {elapsed:.1f}s: {body['message'][:200]}")
        wait_until(lambda: nothing_left(core, instance), 60, 0.5, what="the failed pod removed")
    finally:
        gw.stop()


@pytest.mark.parametrize("env, words", [
    ({"KERNEL_CPUS": "65"}, "KERNEL_CPUS=65 is above the limit"),
    ({"KERNEL_MEMORY": "2g"}, "KERNEL_MEMORY=2g is above the limit"),
    ({"KERNEL_UID": "0"}, "KERNEL_UID=0 is not allowed"),
    ({"KERNEL_IMAGE": "busybox:latest"}, "not allowed"),
    ({"KERNEL_NAMESPACE": "kube-system"}, "KERNEL_NAMESPACE 'kube-system' is not allowed"),
])
def test_bad_requests_start_nothing(tmp_path, k8s_cluster, core, instance, env, words):
    gw = k8s_gateway(tmp_path, k8s_cluster, instance)
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "pod", "env": env})
        assert status == 400 and words in body["message"], body
        assert nothing_left(core, instance)
    finally:
        gw.stop()


def test_hostile_values_are_inert(tmp_path, k8s_cluster, core, instance):
    gw = k8s_gateway(tmp_path, k8s_cluster, instance)
    try:
        kid = start_kernel(gw, "pod", env=HOSTILE, timeout=START)
        [pod] = pods_of(core, instance)
        assert [c.name for c in pod.spec.containers] == ["kernel"] and pod.spec.automount_service_account_token is False
        assert pod.spec.restart_policy == "Never" and pod.metadata.namespace == "default"
        assert pod.metadata.annotations["kernel_gateway.user"] == HOSTILE["KERNEL_USERNAME"]
        assert len(pod.metadata.labels["kernel_gateway.user"]) <= 63
        with KernelWS(gw, kid) as ws:
            out, _ = ws.run("import os, json; print(json.dumps({k: os.environ.get(k) for k in %r}))" % sorted(HOSTILE))
            assert json.loads(out) == HOSTILE
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=START)[0] == 204
        wait_until(lambda: nothing_left(core, instance), 60, 0.5, what="nothing left")
    finally:
        gw.stop()


def test_sigkill_leftovers_are_reaped(tmp_path, k8s_cluster, core, instance):
    gw = k8s_gateway(tmp_path, k8s_cluster, instance)
    try:
        kid = start_kernel(gw, "pod", timeout=START)
        gw.stop(signal.SIGKILL)
        assert [p.metadata.labels["kernel_gateway.kernel_id"] for p in pods_of(core, instance)] == [kid]
        again = k8s_gateway(tmp_path / "again", k8s_cluster, instance)
        try:
            kid2 = start_kernel(again, "pod", timeout=START)
            wait_until(lambda: [p.metadata.labels["kernel_gateway.kernel_id"] for p in pods_of(core, instance)] == [kid2]
                       and [s.metadata.name for s in secrets_of(core, instance)] == [f"kernel-{kid2}"],
                       60, 0.5, what="the earlier run's pod and secret removed")
        finally:
            again.stop()
        wait_until(lambda: nothing_left(core, instance), 60, 0.5, what="nothing left")
    finally:
        gw.stop()
        for pod in pods_of(core, instance):
            core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)


def churn(core: client.CoreV1Api, instance: str, count: int) -> None:
    """Create and delete ``count`` pods that never run (bound to no node): pod events and nothing else."""
    for _ in range(count):
        name = f"churn-{uuid.uuid4().hex[:10]}"
        core.create_namespaced_pod("default", {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"kgw-churn": instance}},
            "spec": {"nodeName": "kgw-no-such-node", "containers": [{"name": "c", "image": "none"}]}})
        core.delete_namespaced_pod(name, "default", grace_period_seconds=0)


@pytest.mark.timeout(420, func_only=True)
@pytest.mark.asyncio(loop_scope="session")
async def test_watch_lists_again_after_410_gone_then_resumes(k8s_cluster, core, instance):
    # A real 410: the API server's watch cache forgets events older than ~75 s once its buffer is full, and then
    # answers a watch from before them with "too old resource version". Slow pod churn (~1.5 events/s) fills the
    # buffer (at least 100 events) just as the first events pass 75 s: a larger rate only makes the buffer grow.
    watcher = PodWatcher(k8s_cluster.kubeconfig, "default", instance)  # its own, driven round by round
    watcher.watch_seconds = 1
    await watcher.connect()
    assert await run_blocking(watcher.step) is True
    first = watcher.version
    deadline = time.monotonic() + 300
    while watcher.version is not None:
        assert time.monotonic() < deadline, "the API server kept the old resourceVersion for 5 minutes"
        await run_blocking(churn, core, instance, 1)
        watcher.version = first  # as if the watch had seen nothing since
        assert await run_blocking(watcher.step) is True
    lists = watcher.api.requests["GET /api/v1/namespaces/{name}/pods"]
    kid = str(uuid.uuid4())
    state = watcher.track(kid)
    pod = core.create_namespaced_pod("default", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"kernel-{kid}", "labels": {KERNEL_LABEL: kid, INSTANCE_LABEL: instance}},
        "spec": {"restartPolicy": "Never", "containers": [{
            "name": "kernel", "image": k8s_cluster.kernel_image, "imagePullPolicy": "Never",
            "command": ["python3", "-c", "raise SystemExit(7)"]}]}})
    try:
        watcher.bind(kid, pod.metadata.uid)
        watches = watcher.api.requests["WATCH /api/v1/namespaces/{name}/pods"]
        deadline = time.monotonic() + 120
        while state.exit_code is None and time.monotonic() < deadline:
            assert await run_blocking(watcher.step) is True
        assert state.exit_code == 7 and state.phase == "Failed", state
        # after the 410: one list, then watches resumed from the version each one reached
        assert watcher.api.requests["GET /api/v1/namespaces/{name}/pods"] == lists + 1, watcher.api.requests
        assert watcher.api.requests["WATCH /api/v1/namespaces/{name}/pods"] > watches
    finally:
        core.delete_namespaced_pod(pod.metadata.name, "default", grace_period_seconds=0)
        watcher.api.close()


def test_specs_install_kubernetes_writes_a_working_spec(tmp_path, k8s_cluster, core, instance):
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "kernel_gateway", "specs", "install", "kubernetes", "--name", "k8s-cli",
                    "--prefix", str(prefix), "--image", k8s_cluster.kernel_image, "--image-pull-policy", "Never",
                    "--namespace", "default", "--port-range", PORTS], check=True, capture_output=True, timeout=60)
    spec = json.loads((prefix / "share/jupyter/kernels/k8s-cli/kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == PROVISIONER
    # the rest from the gateway's environment, as an operator's deployment would set it
    gw = start_gateway(tmp_path=tmp_path, timeout=60, env={
        "JUPYTER_PATH": str(prefix / "share/jupyter"), "GATEWAY_KUBECONFIG": k8s_cluster.kubeconfig,
        "GATEWAY_RESPONSE_HOST": k8s_cluster.node_ip, "GATEWAY_INSTANCE_NAME": instance})
    try:
        kid = start_kernel(gw, "k8s-cli", timeout=START)
        with KernelWS(gw, kid) as ws:
            assert ws.run("import socket; print(socket.gethostname())")[0].strip() == f"kernel-{kid}"
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=START)[0] == 204
        wait_until(lambda: nothing_left(core, instance), 60, 0.5, what="nothing left")
    finally:
        gw.stop()


# one loop for the in-process tests: the response listener and the pod watchers are per process
@pytest.mark.asyncio(loop_scope="session")
async def test_a_later_manager_reattaches_from_provisioner_info(tmp_path, k8s_cluster, core, instance, monkeypatch):
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory

    write_container_spec(tmp_path / "data", "pod", PROVISIONER, {
        "image": k8s_cluster.kernel_image, "image_pull_policy": "Never", "kubeconfig": k8s_cluster.kubeconfig,
        "response_host": k8s_cluster.node_ip, "port_range": PORTS, "instance_name": instance, "namespace": "default"})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "data"))
    first = AsyncKernelManager(kernel_name="pod")
    await first.start_kernel()
    try:
        info = await first.provisioner.get_provisioner_info()
        assert info["pod_name"] == f"kernel-{first.kernel_id}" and info["pod_namespace"] == "default", info
        first.provisioner._watcher.stop()  # as in a new gateway process: a watcher that has not reaped yet
        later = AsyncKernelManager(kernel_name="pod", kernel_id=first.kernel_id)
        later.load_connection_info(first.get_connection_info())
        later.provisioner = KernelProvisionerFactory.instance().create_provisioner_instance(
            first.kernel_id, later.kernel_spec, parent=later)
        await later.provisioner.load_provisioner_info(json.loads(json.dumps(info, default=str)))
        assert later.has_kernel and await later.is_alive()
        # the new process's first new kernel reaps the earlier run's leftovers, but not a re-attached kernel
        second = AsyncKernelManager(kernel_name="pod")
        await second.start_kernel()
        assert sorted(p.metadata.name for p in pods_of(core, instance)) == sorted(
            [f"kernel-{first.kernel_id}", f"kernel-{second.kernel_id}"])
        await second.shutdown_kernel(now=True)
        assert await later.is_alive()
        kernel = later.client()
        kernel.start_channels()
        try:
            await kernel.wait_for_ready(timeout=60)
            reply = await kernel.execute_interactive("print(6 * 7)", timeout=60)
            assert reply["content"]["status"] == "ok", reply["content"]
        finally:
            kernel.stop_channels()
        await later.shutdown_kernel(now=True)
        wait_until(lambda: nothing_left(core, instance), 60, 0.5, what="the re-attached kernel's pod deleted")
    finally:
        await first.cleanup_resources()
        for pod in pods_of(core, instance):
            core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
