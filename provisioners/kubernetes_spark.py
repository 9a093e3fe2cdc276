"""Spark drivers on Kubernetes as kernels: ``spark-submit --master k8s://… --deploy-mode cluster`` with our launcher
as the Python driver; the driver pod is the kernel.

Everything the kubernetes-provisioner does before a pod exists happens here the same way (the client's requests
checked, the namespace picked or made, the pod rendered from ``pod_template``, the launch token put in a Secret),
but spark-submit creates the pod: the rendered pod becomes Spark's driver pod template (its labels, security
context, service account, node selector, tolerations, volumes and the token's ``secretKeyRef``) and, without the
environment and the service account token, the executors' template. spark-submit runs on the gateway host off the
event loop (an asyncio subprocess, ``spark.kubernetes.submission.waitAppCompletion=false``, bounded by
``submit_timeout``); its failure (bad master URL, no Java, a conf it refuses) fails the start with its last lines.

The driver pod is named ``kernel-<id>`` and carries the kernel labels, so the one shared
:class:`~provisioners.kubernetes_watch.PodWatcher` turns its status into launch phases (bad image, unschedulable,
crash, OOM fail the start at once), the reaper finds it and a later gateway re-attaches to it. Spark makes the
driver pod the owner of the executor pods, its Service and ConfigMaps, so deleting the driver pod (shutdown,
restart, reaping) lets the cluster's garbage collector remove them all; the provisioner deletes the Secret.

The driver's service account needs a Role in the kernel's namespace that lets it create, watch and delete pods,
services, configmaps and persistentvolumeclaims (docs/operators/kubernetes-spark.md); the image's entrypoint
(``launchers/images/spark/spark-entrypoint.sh``) gives Spark the pod's IP as the driver's host, so executors need
no cluster DNS. With a port range, Spark's ports are confined to it as in the YARN Spark mode.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import re
import shutil
import tempfile
from typing import Any

from kubernetes.client.rest import ApiException
from traitlets import Float

from ._blocking import run_blocking
from .container import ContainerRequest
from .errors import LaunchError
from .kubernetes import KubernetesProvisioner
from .kubernetes_watch import PodWatcher
from .yarn_spark import YarnSparkProvisioner, spark_port_options

__all__ = ["SparkKubernetesProvisioner"]

_FRAME = re.compile(r"^\s+(at |\.\.\. \d+ (more|common frames omitted))")  # a Java stack trace's frame lines

#: settings the provisioner owns: a kernelspec that sets one is refused (the kernel could not be found or cleaned)
OWNED_SETTINGS = ("spark.kubernetes.namespace", "spark.kubernetes.driver.pod.name",
                  "spark.kubernetes.submission.waitAppCompletion", "spark.kubernetes.driver.podTemplateFile",
                  "spark.kubernetes.executor.podTemplateFile", "spark.kubernetes.container.image")


class SparkKubernetesProvisioner(KubernetesProvisioner):
    """Each kernel is the Python driver of a Spark application in Kubernetes cluster mode; its driver pod is the kernel.

    The kernelspec's argv runs spark-submit with ``--deploy-mode cluster``, our launcher as the primary resource
    (``local://`` path inside the image) and ``--spark-session``; ``--master`` defaults to the API server of
    ``kubeconfig``.
    """

    supports_warm = False  # spark-submit starts the launcher inside the driver: nothing to keep warm

    submit_timeout = Float(
        120.0, config=True,
        help="Seconds spark-submit may take to create the driver pod (it exits then); the launch timeout still "
        "bounds the wait for the kernel.",
    ).tag(env="GATEWAY_KUBERNETES_SPARK_SUBMIT_TIMEOUT")

    # spark-submit runs as in the YARN Spark mode: the same timeout handling, kill and error text
    _run_submit = YarnSparkProvisioner._run_submit
    _stop_submit = YarnSparkProvisioner._stop_submit
    _submit: asyncio.subprocess.Process | None = None
    _submit_env: dict[str, str] | None = None  # set by launch_kernel
    _cmd: list[str] = []
    _request: ContainerRequest | None = None

    @staticmethod
    def _tail(output: str, lines: int = 15) -> str:
        """spark-submit's last ``lines`` lines without Java stack frames: its messages, the exception and causes."""
        return YarnSparkProvisioner._tail("\n".join(line for line in output.splitlines() if not _FRAME.match(line)),
                                          lines)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        """Keeps the gateway-side environment for spark-submit (a local process), then ``super()``."""
        # the client's KERNEL_* values reach the driver through the pod template; spark-submit does not need them
        self._submit_env = {k: v for k, v in kwargs.get("env", {}).items() if not k.startswith("KERNEL_")}
        if self.kubeconfig:
            self._submit_env["KUBECONFIG"] = self.kubeconfig
        return await super().launch_kernel(cmd, **kwargs)

    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        if "--deploy-mode" not in cmd or "cluster" not in cmd:
            raise LaunchError("a spark-kubernetes kernelspec runs spark-submit --deploy-mode cluster",
                              kernel_id=self.kernel_id)
        owned = [key for key in OWNED_SETTINGS if f"{key}=" in " ".join(cmd)]
        if owned:
            raise LaunchError(f"the kernelspec sets {', '.join(owned)}, which the spark-kubernetes-provisioner sets",
                              kernel_id=self.kernel_id)
        self._cmd = cmd
        await super().start_launcher(cmd, env, token)

    def pod_values(self, request: ContainerRequest, namespace: str, service_account: str) -> dict[str, Any]:
        """``super()``'s, for Spark's driver pod template: no args (Spark sets the container's), and the service
        account token mounted (the driver creates its executors through the API)."""
        values = super().pod_values(request, namespace, service_account)
        values.update(args=[], automount_service_account_token=True)
        self._request = request
        return values

    async def _find_app(self, output: str) -> None:
        """The driver pod is known by its name (``spark.kubernetes.driver.pod.name``): nothing to look up."""

    async def create_kernel_pod(self, watcher: PodWatcher, pod: dict, secret: dict) -> str:
        """Create the token's Secret, run spark-submit with ``pod`` as the driver's template; the driver pod's uid."""
        await run_blocking(self._create_replacing, watcher, secret)
        private = tempfile.mkdtemp(prefix="kg-spark-k8s-")  # mode 0700: the templates name the kernel's env
        try:
            argv = self.submit_command(pod, private, watcher.api.configuration.host)
            output = await self._run_submit(argv, dict(self._submit_env or {}))
        finally:
            shutil.rmtree(private, ignore_errors=True)
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        try:
            driver = await run_blocking(watcher.core.read_namespaced_pod, name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            raise LaunchError(f"spark-submit for kernel {self.kernel_id} created no driver pod {namespace}/{name}: "
                              f"{self._tail(output)}", kernel_id=self.kernel_id) from None
        self.log.info("kernel %s: Spark driver pod %s/%s submitted", self.kernel_id, namespace, name)
        return driver.metadata.uid

    def submit_command(self, pod: dict, private: str, api_host: str) -> list[str]:
        """The kernelspec's spark-submit argv with our options after the program: the driver and executor pod
        templates (written into ``private``), namespace, image, pod name, service account, resources, ports."""
        request = self._request
        assert request is not None
        container = _kernel_container(pod)
        executor = copy.deepcopy(pod)  # the executors': no kernel environment, token or API access
        _kernel_container(executor).pop("env", None)
        executor["spec"].update(automountServiceAccountToken=False)
        executor["spec"].pop("serviceAccountName", None)
        paths = {}
        for role, body in (("driver", pod), ("executor", executor)):
            paths[role] = os.path.join(private, f"{role}.yaml")
            with open(paths[role], "w", encoding="utf-8") as file:
                json.dump(body, file)  # JSON is YAML
        conf = {
            "spark.kubernetes.submission.waitAppCompletion": "false",
            "spark.kubernetes.namespace": pod["metadata"]["namespace"],
            "spark.kubernetes.driver.pod.name": pod["metadata"]["name"],
            "spark.kubernetes.container.image": request.image,
            "spark.kubernetes.container.image.pullPolicy": self.image_pull_policy,
            "spark.kubernetes.driver.podTemplateFile": paths["driver"],
            "spark.kubernetes.driver.podTemplateContainerName": container["name"],
            "spark.kubernetes.executor.podTemplateFile": paths["executor"],
            "spark.kubernetes.executor.podTemplateContainerName": container["name"],
        }
        account = pod["spec"].get("serviceAccountName")
        if account:
            conf["spark.kubernetes.authenticate.driver.serviceAccountName"] = account
        if request.cpus:  # the client's KERNEL_CPUS / KERNEL_MEMORY, within the operator's maxima: the driver's
            conf["spark.kubernetes.driver.request.cores"] = conf["spark.kubernetes.driver.limit.cores"] = \
                f"{request.cpus:g}"
        if request.memory:
            conf["spark.driver.memory"] = f"{max(1, request.memory // 2**20)}m"
        cmd, given = self._cmd, " ".join(self._cmd)
        options = [] if "--master" in cmd else ["--master", f"k8s://{api_host}"]
        options += [arg for key, value in conf.items() for arg in ("--conf", f"{key}={value}")]
        return [cmd[0], *options, *spark_port_options(self.port_range, given, service=True), *cmd[1:]]

    async def kill_launcher(self) -> None:
        """Stop a spark-submit still running, then delete the driver pod (its executors, Service and ConfigMaps go
        with it: Spark made the pod their owner) and the Secret."""
        await self._stop_submit()
        await super().kill_launcher()

    async def cleanup(self, restart: bool = False) -> None:
        """Calls ``super()`` (deletes the driver pod and the Secret), then forgets this launch's spark-submit."""
        await super().cleanup(restart)
        self._submit = None


def _kernel_container(pod: dict) -> dict:
    """The pod's container named 'kernel', else its first."""
    containers = pod["spec"].get("containers") or [{}]
    return next((c for c in containers if c.get("name") == "kernel"), containers[0])
