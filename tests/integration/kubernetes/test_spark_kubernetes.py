"""Spark drivers as kernels on a real Kubernetes v1.34 cluster (``k8s_cluster``): the spark-kubernetes-provisioner.

The kernelspecs come from ``kernel-gateway specs install spark-kubernetes``; spark-submit is pyspark's, on this
host; the driver and executors run the Spark kernel image (``launchers/images/spark``) as service account
``spark`` (``spark_kernel_image`` gives it its Role).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from kubernetes import client

from tests.integration.kubernetes import test_kubernetes_kernels
from tests.integration.kubernetes.conftest import SPARK_ACCOUNT
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import start_gateway, wait_until
from tests.services.kernel_checks import LISTENING_PORTS, interrupt_busy_loop
from tests.services.kubernetes_cluster import KubernetesCluster

PORTS = "44100..44199"
LOW, HIGH = (int(p) for p in PORTS.split(".."))
core, instance = test_kubernetes_kernels.core, test_kubernetes_kernels.instance  # fixtures: the API, a fresh name
PROVISIONER = "spark-kubernetes-provisioner"
MISSING_IMAGE = "localhost/kgw/missing:none"
START = 300  # seconds a Spark kernel start may take on 2 busy cores (three JVMs)
LAUNCH_TIMEOUT = 240  # the gateway's: "fails fast" means well before it
#: small requests: the node has 2 cores and the driver and its executors ask for 1 each by default
SPARK_CONF = ["spark.executor.instances=2", "spark.executor.memory=512m", "spark.driver.memory=768m",
              "spark.kubernetes.driver.request.cores=100m", "spark.kubernetes.executor.request.cores=100m"]
#: every listening non-loopback port of the driver pod's processes (the launcher, the kernel, the driver's JVM);
#: prints nothing when one ended while it was read (Hadoop's code in the JVM runs short-lived shell commands)
POD_PORTS = LISTENING_PORTS.replace("[os.getpid()]", "[p for p in os.listdir('/proc') if p.isdigit()]")
SUM = "print(sc.range(100).sum(), spark.range(100).groupBy().sum().first()[0])"  # on the executors: Python and JVM
HOSTS = ("import json, socket; print(json.dumps(sorted(set(sc.parallelize(range(8), 8).map("
         "lambda _: __import__('socket').gethostname()).collect())))); print(socket.gethostname())")


@pytest.fixture(scope="module")
def spark_kubeconfig(k8s_cluster: KubernetesCluster, tmp_path_factory) -> str:
    """The admin kubeconfig with its EC key in SEC1 PEM ('BEGIN EC PRIVATE KEY'): spark-submit's client (fabric8)
    takes a PKCS#8 key ('BEGIN PRIVATE KEY', as the test PKI writes them) for RSA and fails."""
    data = yaml.safe_load(Path(k8s_cluster.kubeconfig).read_text())
    for user in data["users"]:
        key = serialization.load_pem_private_key(base64.b64decode(user["user"]["client-key-data"]), None)
        user["user"]["client-key-data"] = base64.b64encode(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption())).decode()
    path = tmp_path_factory.mktemp("spark") / "admin-sec1.kubeconfig"
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o600)
    return str(path)


def install_spec(prefix: Path, name: str, image: str, *extra: str,
                 where: tuple[str, ...] = ("--namespace", "default", "--service-account", SPARK_ACCOUNT)) -> dict:
    """``kernel-gateway specs install spark-kubernetes`` into ``prefix``; the kernel.json it wrote."""
    subprocess.run([sys.executable, "-m", "kernel_gateway", "specs", "install", "spark-kubernetes", "--name", name,
                    "--prefix", str(prefix), "--image", image, "--image-pull-policy", "Never", *where,
                    "--port-range", PORTS, *(arg for item in SPARK_CONF for arg in ("--spark-conf", item)), *extra],
                   check=True, capture_output=True, timeout=60)
    return json.loads((prefix / f"share/jupyter/kernels/{name}/kernel.json").read_text())


def spark_gateway(tmp_path: Path, cluster: KubernetesCluster, kubeconfig: str, image: str, instance: str):
    """A gateway with the kernelspecs 'spark', 'missing' (an image the node does not have), 'badconf' (a Spark
    setting spark-submit refuses) and 'own-namespace' (a namespace per kernel whose service account 'kernel' the
    built-in ClusterRole 'edit' is bound to), configured from its environment as an operator's deployment would be."""
    prefix = tmp_path / "prefix"
    spec = install_spec(prefix, "spark", image)
    assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == PROVISIONER
    install_spec(prefix, "missing", MISSING_IMAGE)
    install_spec(prefix, "badconf", image, "--spark-conf", "spark.driver.memory=lots")
    install_spec(prefix, "own-namespace", image, where=("--namespace-mode", "per-kernel"))
    return start_gateway(tmp_path=tmp_path, timeout=60, env={
        "JUPYTER_PATH": str(prefix / "share/jupyter"), "GATEWAY_KUBECONFIG": kubeconfig,
        "GATEWAY_RESPONSE_HOST": cluster.node_ip, "GATEWAY_INSTANCE_NAME": instance,
        "GATEWAY_KERNEL_LAUNCH_TIMEOUT": str(LAUNCH_TIMEOUT), "GATEWAY_KUBERNETES_KERNEL_CLUSTER_ROLE": "edit"})


def labelled(core: client.CoreV1Api, kind: str, selector: str) -> list:
    return getattr(core, f"list_{kind}_for_all_namespaces")(label_selector=selector).items


def left_over(core: client.CoreV1Api, instance: str, drivers: set[str]) -> list[str]:
    """What is left of the instance's kernels: pods and secrets with its label, and what the driver pods with uids
    ``drivers`` owned (executor pods, the driver's Service and ConfigMaps)."""
    names = [f"{kind} {item.metadata.name}" for kind in ("pod", "secret")
             for item in labelled(core, kind, f"kernel_gateway.instance={instance}")]
    for kind in ("pod", "service", "config_map"):
        names += [f"{kind} {item.metadata.name}" for item in labelled(core, kind, "")
                  if {ref.uid for ref in item.metadata.owner_references or []} & drivers]
    return names


def executors(core: client.CoreV1Api, kid: str) -> list:
    return labelled(core, "pod", f"spark-role=executor,kernel_gateway.kernel_id={kid}")


@pytest.mark.timeout(1200, func_only=True)
def test_spark_kernel_lifecycle(tmp_path, spark_kernel_image, k8s_cluster, spark_kubeconfig, core, instance):
    gw = spark_gateway(tmp_path, k8s_cluster, spark_kubeconfig, spark_kernel_image, instance)
    drivers: set[str] = set()
    try:
        started = time.monotonic()
        kid = start_kernel(gw, "spark", env={"KERNEL_USERNAME": "alice"}, timeout=START)
        print(f"Spark kernel start-to-ready: {time.monotonic() - started:.1f}s")
        [driver] = labelled(core, "pod", f"spark-role=driver,kernel_gateway.instance={instance}")
        drivers.add(driver.metadata.uid)
        assert driver.metadata.name == f"kernel-{kid}" and driver.metadata.namespace == "default"
        assert driver.metadata.labels["kernel_gateway.kernel_id"] == kid
        assert driver.metadata.labels["kernel_gateway.user"] == "alice"
        assert driver.spec.service_account_name == SPARK_ACCOUNT
        assert driver.spec.security_context.run_as_non_root and driver.spec.security_context.run_as_user == 1000
        container = driver.spec.containers[0]
        token_env = next(e for e in container.env if e.name == "KERNEL_LAUNCH_TOKEN")
        assert token_env.value is None and token_env.value_from.secret_key_ref.name == driver.metadata.name
        assert not any("KERNEL_LAUNCH_TOKEN" in arg for arg in container.args or [])
        with KernelWS(gw, kid) as ws:
            out, _ = ws.run("import os, socket; print(socket.gethostname(), os.environ['SPARK_DRIVER_BIND_ADDRESS'], "
                            "spark.conf.get('spark.driver.host'), 'KERNEL_LAUNCH_TOKEN' in os.environ)")
            assert out.split() == [driver.metadata.name, driver.status.pod_ip, driver.status.pod_ip, "False"], out
            assert ws.run(SUM, timeout=240)[0].split() == ["4950", "4950"]
            running = executors(core, kid)
            assert len(running) == 2 and all(p.status.phase == "Running" for p in running), \
                [(p.metadata.name, p.status.phase) for p in running]
            assert all(p.metadata.owner_references[0].uid == driver.metadata.uid for p in running)
            assert all(p.metadata.labels["kernel_gateway.instance"] == instance for p in running)
            owned = [f"{kind} {item.metadata.name}" for kind in ("service", "config_map")
                     for item in labelled(core, kind, "")
                     if driver.metadata.uid in {ref.uid for ref in item.metadata.owner_references or []}]
            assert any(o.startswith("service") for o in owned) and any(o.startswith("config_map") for o in owned), owned
            out = ws.run(HOSTS, timeout=120)[0].splitlines()
            workers, driver_host = json.loads(out[0]), out[1]
            assert driver_host not in workers and set(workers) <= {p.spec.hostname or p.metadata.name
                                                                   for p in running}, (workers, running)
            ports = eval(wait_until(lambda: ws.run(POD_PORTS)[0].strip(), 60, 1, what="the driver pod's ports"))
            assert len(ports) >= 8 and all(LOW <= p <= HIGH for p in ports), ports  # kernel 5 + control + Spark's
            interrupt_busy_loop(gw, ws, kid)
        status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=START)
        assert status == 200 and body["id"] == kid, body
        [restarted] = labelled(core, "pod", f"spark-role=driver,kernel_gateway.instance={instance}")
        drivers.add(restarted.metadata.uid)
        assert restarted.metadata.name == driver.metadata.name and restarted.metadata.uid != driver.metadata.uid
        with KernelWS(gw, kid) as ws:
            assert ws.run("print(sc.range(10).sum())", timeout=240)[0].strip() == "45"
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=START)[0] == 204
        started = time.monotonic()
        wait_until(lambda: not left_over(core, instance, drivers), 180, 1,
                   what="no driver, executor, service, configmap or secret left after shutdown")
        print(f"Spark kernel's objects gone {time.monotonic() - started:.1f}s after shutdown")
    finally:
        gw.stop()
        for pod in labelled(core, "pod", f"kernel_gateway.instance={instance}"):
            core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)


@pytest.mark.timeout(600, func_only=True)
def test_spark_kernel_in_its_own_namespace(tmp_path, spark_kernel_image, k8s_cluster, spark_kubeconfig, core, instance):
    gw = spark_gateway(tmp_path, k8s_cluster, spark_kubeconfig, spark_kernel_image, instance)
    try:
        kid = start_kernel(gw, "own-namespace", timeout=START)
        [driver] = labelled(core, "pod", f"spark-role=driver,kernel_gateway.instance={instance}")
        assert driver.metadata.namespace == f"kernel-{kid}" and driver.spec.service_account_name == "kernel"
        with KernelWS(gw, kid) as ws:
            assert ws.run("print(sc.range(100).sum())", timeout=240)[0].strip() == "4950"
        assert {p.metadata.namespace for p in executors(core, kid)} == {f"kernel-{kid}"}
        assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=START)[0] == 204
        wait_until(lambda: not left_over(core, instance, {driver.metadata.uid})
                   and not core.list_namespace(label_selector=f"kernel_gateway.instance={instance}").items,
                   180, 1, what="the kernel's namespace and everything in it deleted")
    finally:
        gw.stop()


@pytest.mark.parametrize("kernel, status, words", [
    ("missing", 502, "ErrImageNeverPull"),  # the driver pod's image is not on the node
    ("badconf", 502, "Driver memory must be a positive number"),  # spark-submit refuses spark.driver.memory=lots
])
def test_spark_kernels_that_cannot_run_fail_fast(tmp_path, spark_kernel_image, k8s_cluster, spark_kubeconfig, core,
                                                 instance, kernel, status, words):
    gw = spark_gateway(tmp_path, k8s_cluster, spark_kubeconfig, spark_kernel_image, instance)
    try:
        started = time.monotonic()
        got, body, _ = call(gw, "POST", "/api/kernels", {"name": kernel}, timeout=START)
        elapsed = time.monotonic() - started
        print(f"{kernel}: {got} after {elapsed:.1f}s: {body['message'][-600:]}")
        assert got == status and words in body["message"], (got, body)
        assert elapsed < LAUNCH_TIMEOUT / 3, f"took {elapsed:.1f}s: it should fail at once"
        wait_until(lambda: not left_over(core, instance, set()), 90, 1, what="the failed kernel's objects removed")
    finally:
        gw.stop()


async def execute(manager, code: str) -> str:
    """Run ``code`` in ``manager``'s kernel; the reply's status."""
    kernel = manager.client()
    kernel.start_channels()
    try:
        await kernel.wait_for_ready(timeout=60)
        return (await kernel.execute_interactive(code, timeout=240))["content"]["status"]
    finally:
        kernel.stop_channels()


# one loop for the in-process test: the response listener and the pod watchers are per process
@pytest.mark.timeout(900, func_only=True)
@pytest.mark.asyncio(loop_scope="session")
async def test_a_later_manager_reattaches_to_a_spark_kernel(tmp_path, spark_kernel_image, k8s_cluster, spark_kubeconfig,
                                                           core, instance, monkeypatch):
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_client.provisioning import KernelProvisionerFactory

    spec = install_spec(tmp_path / "prefix", "spark", spark_kernel_image)
    spec["metadata"]["kernel_provisioner"]["config"].update(
        kubeconfig=spark_kubeconfig, response_host=k8s_cluster.node_ip, instance_name=instance,
        launch_timeout=LAUNCH_TIMEOUT)
    (tmp_path / "prefix/share/jupyter/kernels/spark/kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "prefix/share/jupyter"))
    first = AsyncKernelManager(kernel_name="spark")
    await first.start_kernel()
    try:
        [driver] = labelled(core, "pod", f"spark-role=driver,kernel_gateway.instance={instance}")
        assert first.provisioner.connection_info["ip"] == driver.status.pod_ip  # the driver pod is the kernel
        info = json.loads(json.dumps(await first.provisioner.get_provisioner_info(), default=str))  # as stored
        assert info["pod_name"] == f"kernel-{first.kernel_id}" and info["pod_namespace"] == "default", info
        first.provisioner._watcher.stop()  # as in a new gateway process
        later = AsyncKernelManager(kernel_name="spark", kernel_id=first.kernel_id)
        factory = KernelProvisionerFactory.instance()
        later.provisioner = factory.create_provisioner_instance(first.kernel_id, later.kernel_spec, parent=later)
        later.load_connection_info(first.get_connection_info())
        await later.provisioner.load_provisioner_info(info)
        assert later.has_kernel and await later.is_alive()
        assert await execute(later, "assert sc.range(100).sum() == 4950") == "ok"
        await later.shutdown_kernel(now=True)
        drivers = {driver.metadata.uid}
        wait_until(lambda: not left_over(core, instance, drivers), 180, 1, what="the re-attached kernel's objects gone")
    finally:
        await first.cleanup_resources()
        for pod in labelled(core, "pod", f"kernel_gateway.instance={instance}"):
            core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
