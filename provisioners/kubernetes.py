"""Kubernetes pods as kernels: one pod per kernel, rendered from a Jinja2 template, watched by one shared watch.

A start checks the client's requests (:meth:`ContainerProvisioner.container_request`), picks the
namespace (the shared one, one made for the kernel with its service account and a RoleBinding, or a
client-named one on the operator's allow-list), renders the pod
(:func:`~provisioners.kubernetes_pod.render_pod`: every value written as JSON, so nothing a client
sends can change the pod's structure), and creates a Secret with the launch token and the pod.
:class:`~provisioners.kubernetes_watch.PodWatcher` turns the pod's status into launch phases: a
bad image fails the start at once (400 if the client chose the image, else 502), an unschedulable
pod with 503, a crash or an OOM kill with 502, each with the cluster's message. Restart deletes and recreates the pod under the same kernel id; shutdown deletes the pod, the
Secret and a namespace made for the kernel (with what is in it).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import urlparse

import jinja2
import urllib3
from kubernetes.client.rest import ApiException
from traitlets import Bool, CaselessStrEnum, Dict, Integer, List, TraitError, Unicode, validate

from ._blocking import run_blocking
from .container import LABEL, ContainerProvisioner, ContainerRequest
from .errors import BackendError, CapacityError, LaunchError, LaunchRequestError
from .handshake import LaunchInfo
from .kubernetes_pod import dns_label, load_template, parse_toleration, render_pod
from .kubernetes_watch import PodFailure, PodState, PodWatcher, api_reason, apply_pod, delete_if_present, own_namespace
from .remote import route_address

__all__ = ["KubernetesProvisioner"]

TOKEN_KEY = "launch-token"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


def _failure_error(failure: PodFailure, client_image: bool, kernel_id: str) -> LaunchError | LaunchRequestError:
    message = f"kernel {kernel_id}: the kernel pod cannot run: {failure.message}"
    if failure.kind == "image" and client_image:
        return LaunchRequestError(message, kernel_id=kernel_id)  # the image the client asked for
    if failure.kind == "unschedulable":
        return CapacityError(message, kernel_id=kernel_id)
    return LaunchError(message, kernel_id=kernel_id)


class KubernetesProvisioner(ContainerProvisioner):
    """Each kernel is one pod (kernelspec argv: the image's bootstrap-kernel.sh, passed as the container's args)."""

    cold_start_envs = (*ContainerProvisioner.cold_start_envs, "KERNEL_NAMESPACE")

    kubeconfig = Unicode(
        "", config=True,
        help="Kubeconfig file for the cluster's API; empty: the in-cluster service account when the gateway runs in a "
        "pod, else KUBECONFIG or ~/.kube/config.",
    ).tag(env="GATEWAY_KUBECONFIG")
    namespace = Unicode(
        "", config=True,
        help="Namespace of kernel pods in 'shared' namespace_mode; empty: the gateway's own (its pod's namespace, "
        "else the kubeconfig context's, else 'default').",
    ).tag(env="GATEWAY_KUBERNETES_NAMESPACE")
    namespace_mode = CaselessStrEnum(
        ["shared", "per-kernel"], "shared", config=True,
        help="'shared': every kernel pod in 'namespace'; 'per-kernel': a namespace made for each kernel (kernel-<id>), "
        "with a service account and, when kernel_cluster_role is set, a RoleBinding to it; deleted with the kernel.",
    ).tag(env="GATEWAY_KUBERNETES_NAMESPACE_MODE")
    allowed_namespaces = List(
        Unicode(), config=True,
        help="Existing namespaces a client may name with KERNEL_NAMESPACE; empty: a client cannot choose.",
    ).tag(env="GATEWAY_KUBERNETES_ALLOWED_NAMESPACES")
    kernel_cluster_role = Unicode(
        "", config=True,
        help="ClusterRole bound, by a RoleBinding inside each per-kernel namespace (so only there), to the kernel's "
        "service account; empty: no binding, the kernel gets no API permissions.",
    ).tag(env="GATEWAY_KUBERNETES_KERNEL_CLUSTER_ROLE")
    service_account = Unicode(
        "", config=True,
        help="Service account of kernel pods; empty: the namespace's 'default' ('kernel' in per-kernel namespaces, "
        "where the gateway creates it).",
    ).tag(env="GATEWAY_KUBERNETES_SERVICE_ACCOUNT")
    mount_service_account_token = Bool(
        False, config=True,
        help="Mount the service account's API token into kernel pods; off: kernels cannot call the API.",
    ).tag(env="GATEWAY_KUBERNETES_MOUNT_SA_TOKEN")
    node_selector = Dict(
        value_trait=Unicode(), config=True, help="Node labels kernel pods must run on, key=value.",
    ).tag(env="GATEWAY_KUBERNETES_NODE_SELECTOR")
    tolerations = List(
        Unicode(), config=True,
        help="Taints kernel pods tolerate, 'key[=value][:NoSchedule|PreferNoSchedule|NoExecute]'; 'key' alone "
        "tolerates any value.",
    ).tag(env="GATEWAY_KUBERNETES_TOLERATIONS")
    pod_template = Unicode(
        "", config=True,
        help="Jinja2 template of the kernel pod (copy provisioners/templates/kernel-pod.yaml.j2); empty: that one.",
    ).tag(env="GATEWAY_KUBERNETES_POD_TEMPLATE")
    image_pull_policy = CaselessStrEnum(
        ["Always", "IfNotPresent", "Never"], "IfNotPresent", config=True,
        help="imagePullPolicy of the kernel container ('Never' for images loaded onto the nodes).",
    ).tag(env="GATEWAY_KUBERNETES_IMAGE_PULL_POLICY")
    gpu_resource = Unicode(
        "nvidia.com/gpu", config=True, help="Extended resource name KERNEL_GPUS asks for.",
    ).tag(env="GATEWAY_KUBERNETES_GPU_RESOURCE")
    volumes = List(
        Unicode(), config=True,
        help="Volumes mounted into every kernel pod, 'source:target[:ro]': an absolute source is a hostPath, any other "
        "the name of a PersistentVolumeClaim in the pod's namespace; only from operator configuration.",
    ).tag(env="GATEWAY_KERNEL_VOLUMES")
    network = Unicode("", help="Not used: pods join the cluster's network.")  # the Docker option, hidden here
    termination_grace_period = Integer(
        3, config=True, help="Seconds a kernel pod has to stop on a graceful delete (kill deletes with 0).",
    ).tag(env="GATEWAY_KUBERNETES_TERMINATION_GRACE_PERIOD")

    pod_name: str | None = None
    pod_namespace: str | None = None
    namespace_created = False  # the pod's namespace was made for this kernel (deleted at shutdown)
    _client_image = False
    _watcher: PodWatcher | None = None
    _namespaces: dict[str, str] = {}  # kubeconfig -> the gateway's own namespace, found at the first start

    @validate("pod_template")
    def _template(self, proposal: dict[str, Any]) -> str:
        try:
            load_template(proposal["value"])
        except (OSError, jinja2.TemplateError) as exc:
            raise TraitError(f"pod_template {proposal['value']!r}: {exc}") from None
        return proposal["value"]

    @validate("tolerations")
    def _tolerations(self, proposal: dict[str, Any]) -> list[str]:
        for item in proposal["value"]:
            try:
                parse_toleration(item)
            except ValueError as exc:
                raise TraitError(str(exc)) from None
        return proposal["value"]

    @validate("namespace", "allowed_namespaces")
    def _namespace_names(self, proposal: dict[str, Any]) -> Any:
        value = proposal["value"]
        for name in [value] if isinstance(value, str) else value:
            if name and not _DNS_LABEL.match(name):
                raise TraitError(f"namespace {name!r} is not a DNS label (a-z, 0-9, '-', at most 63)")
        return value

    # -- the shared watcher ---------------------------------------------------------------------------
    async def _shared_namespace(self) -> str:
        if self.namespace:
            return self.namespace
        if self.kubeconfig not in self._namespaces:
            self._namespaces[self.kubeconfig] = await run_blocking(own_namespace, self.kubeconfig)
        return self._namespaces[self.kubeconfig]

    async def watcher(self, reap: bool = False) -> PodWatcher:
        """The started watcher for this spec's scope. ``reap`` (a new kernel's start): first remove what an earlier
        run of this instance left, except the kernels this process tracks (re-attached ones included)."""
        shared = self.namespace_mode == "shared" and not self.allowed_namespaces
        watcher = PodWatcher.instance(self.kubeconfig, await self._shared_namespace() if shared else "",
                                      dns_label(self.instance_label))
        await watcher.start()
        if reap:  # never when re-attaching: the kernels a store re-attaches after this one are not tracked yet
            await watcher.reap(keep=set(watcher.states))
        self._watcher = watcher
        return watcher

    # -- RemoteProvisioner hooks ----------------------------------------------------------------------
    async def advertised_host(self) -> str:
        """Our address on the route to the API server (pods reach us there), unless response_host says."""
        if self.response_host:
            return self.response_host
        watcher = await self.watcher(reap=True)
        api = urlparse(watcher.api.configuration.host)
        host = await run_blocking(route_address, api.hostname, api.port or 443)
        if host.startswith("127.") or host == "::1":
            raise LaunchError(f"the Kubernetes API is reached over loopback ({api.hostname}), so pods could not reach "
                              "this gateway at the same address; set response_host to an address pods can reach")
        return host

    def _pod_namespace(self, env: dict[str, str], shared: str) -> tuple[str, bool]:
        """(namespace, whether the gateway creates it) for this launch."""
        wanted = env.get("KERNEL_NAMESPACE", "")
        if wanted:
            if wanted not in self.allowed_namespaces:
                raise LaunchRequestError(f"KERNEL_NAMESPACE {wanted!r} is not allowed; allowed: "
                                         f"{', '.join(self.allowed_namespaces) or 'none'}", kernel_id=self.kernel_id)
            return wanted, False
        if self.namespace_mode == "per-kernel":
            return f"kernel-{self.kernel_id}", True
        return shared, False

    def pod_values(self, request: ContainerRequest, namespace: str, service_account: str) -> dict[str, Any]:
        """What the pod template is rendered with; raises :class:`LaunchRequestError` for an unusable env name."""
        bad = sorted(name for name in request.env if not _ENV_NAME.match(name))
        if bad:
            raise LaunchRequestError(f"environment variable names {bad!r} are not valid in a pod",
                                     kernel_id=self.kernel_id)
        env = [{"name": k, "value": v} for k, v in sorted(request.env.items()) if k != "KERNEL_LAUNCH_TOKEN"]
        env.append({"name": "KERNEL_LAUNCH_TOKEN",  # the token stays out of the pod spec: a Secret holds it
                    "valueFrom": {"secretKeyRef": {"name": request.name, "key": TOKEN_KEY}}})
        limits: dict[str, str] = {}
        if request.cpus:
            limits["cpu"] = f"{max(1, round(request.cpus * 1000))}m"
        if request.memory:
            limits["memory"] = str(request.memory)
        if request.gpus:
            limits[self.gpu_resource] = str(request.gpus)
        volumes, mounts = [], []
        for index, spec in enumerate(request.volumes):
            source, target, *mode = spec.split(":")
            name = f"volume-{index}"
            volumes.append({"name": name, **({"hostPath": {"path": source}} if source.startswith("/")
                                            else {"persistentVolumeClaim": {"claimName": source}})})
            mounts.append({"name": name, "mountPath": target, "readOnly": mode == ["ro"]})
        uid, gid = (int(part) for part in request.user.split(":"))
        return {
            "kernel_id": self.kernel_id, "pod_name": request.name, "namespace": namespace, "image": request.image,
            "image_pull_policy": self.image_pull_policy, "args": request.command, "env": env,
            "labels": {key: dns_label(value) for key, value in request.labels.items()},
            "annotations": {f"{LABEL}.user": request.env.get("KERNEL_USERNAME", "")},
            "service_account": service_account, "automount_service_account_token": self.mount_service_account_token,
            "uid": uid, "gid": gid, "resources": {"limits": limits, "requests": dict(limits)},
            "node_selector": dict(self.node_selector), "tolerations": [parse_toleration(t) for t in self.tolerations],
            "volumes": volumes, "volume_mounts": mounts, "termination_grace_period": self.termination_grace_period,
        }

    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        # every check before the first API request: a refused start creates nothing
        request = self.container_request(cmd, env, token)
        self._client_image = bool(env.get("KERNEL_IMAGE")) and env["KERNEL_IMAGE"] != self.image
        namespace, create = self._pod_namespace(env, await self._shared_namespace())
        account = self.service_account or ("kernel" if create else "")
        values = self.pod_values(request, namespace, account)
        pod = self.render_pod(values)
        watcher = await self.watcher(reap=True)
        labels = values["labels"]
        secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "stringData": {TOKEN_KEY: token},
                  "metadata": {"name": request.name, "namespace": namespace, "labels": labels}}
        self.pod_name, self.pod_namespace = request.name, namespace
        self.namespace_created = self.namespace_created or create
        watcher.track(self.kernel_id)
        try:
            if create:
                await run_blocking(self._create_namespace, watcher, namespace, account, labels)
            uid = await self.create_kernel_pod(watcher, pod, secret)
        except ApiException as exc:
            reason = api_reason(exc)
            if exc.status in (400, 422):  # a value the API server does not accept (e.g. from the client)
                raise LaunchRequestError(f"the API server refused the kernel pod: {reason}",
                                         kernel_id=self.kernel_id) from exc
            raise LaunchError(f"the API server refused the kernel pod ({exc.status}): {reason}",
                              kernel_id=self.kernel_id) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise LaunchError(f"the Kubernetes API did not answer: {exc}", kernel_id=self.kernel_id) from exc
        watcher.bind(self.kernel_id, uid)
        self.log.info("kernel %s: pod %s/%s created from %s", self.kernel_id, namespace, request.name, request.image)

    def render_pod(self, values: dict[str, Any]) -> dict[str, Any]:
        """The pod ``pod_template`` renders with ``values``; :class:`LaunchError` when it does not render to a Pod."""
        try:
            return render_pod(load_template(self.pod_template), values)
        except ValueError as exc:
            raise LaunchError(f"pod_template {self.pod_template or 'kernel-pod.yaml.j2'}: {exc}") from None

    async def create_kernel_pod(self, watcher: PodWatcher, pod: dict, secret: dict) -> str:
        """Create the launch token's ``secret`` and the kernel ``pod`` (replacing leftovers of the same kernel);
        the pod's uid. Called from :meth:`start_launcher`; may raise ``ApiException`` or urllib3's errors."""
        return await run_blocking(self._create_replacing, watcher, secret, pod)

    def _create_namespace(self, watcher: PodWatcher, namespace: str, account: str, labels: dict[str, str]) -> None:
        """The kernel's own namespace, its service account and RoleBinding (blocking; existing ones are kept)."""
        meta = {"name": namespace, "labels": labels}
        objects = [(watcher.core.create_namespace, (), {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}),
                   (watcher.core.create_namespaced_service_account, (namespace,),
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account, "labels": labels}})]
        if self.kernel_cluster_role:
            objects.append((watcher.rbac.create_namespaced_role_binding, (namespace,), {
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": "kernel", "labels": labels},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                            "name": self.kernel_cluster_role},
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]}))
        for create, args, body in objects:
            try:
                create(*args, body)
            except ApiException as exc:
                if exc.status != 409:  # a restart: made at the first start
                    raise

    @staticmethod
    def _create_replacing(watcher: PodWatcher, *objects: dict) -> str:
        """Create Secrets and Pods in order, replacing leftovers of the same names; the last one's uid (blocking)."""
        core, uid = watcher.core, ""
        for body in objects:
            create, delete = {"Secret": (core.create_namespaced_secret, core.delete_namespaced_secret),
                              "Pod": (core.create_namespaced_pod, core.delete_namespaced_pod)}[body["kind"]]
            namespace = body["metadata"]["namespace"]
            try:
                created = create(namespace, body)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                delete_if_present(delete, body["metadata"]["name"], namespace, grace_period_seconds=0)
                created = create(namespace, body)
            uid = created.metadata.uid
        return uid

    async def _await_handshake(self, timeout: float) -> LaunchInfo:
        """The base's wait, ended at once by a pod failure the watch reports."""
        watcher = await self.watcher()
        state = watcher.states.get(self.kernel_id)
        if state is None:
            return await super()._await_handshake(timeout)
        handshake = asyncio.ensure_future(super()._await_handshake(timeout))
        failed = asyncio.ensure_future(state.failed.wait())
        try:
            done, _ = await asyncio.wait({handshake, failed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            failed.cancel()
            if not handshake.done():
                handshake.cancel()
        if handshake not in done:
            assert state.failure is not None
            error = _failure_error(state.failure, self._client_image, self.kernel_id)
            text = await self._log_tail()
            if text:
                error.args = (f"{error.args[0]}; last lines of its log:\n{text}",)
            raise error
        return handshake.result()

    def launcher_exit_status(self) -> int | None:
        state = self._state()
        if state is None:  # no pod yet: starting, unless the gateway ended the launch before it made one
            return None if self.pod_name is None and not self._stop_requested else -1
        return state.exit_code

    def _state(self) -> PodState | None:
        return self._watcher.states.get(self.kernel_id) if self._watcher is not None else None

    async def kill_launcher(self) -> None:
        if self.pod_name is None or self.pod_namespace is None:
            return
        watcher = await self.watcher()
        try:
            await run_blocking(self._delete, watcher, self.pod_namespace, self.pod_name)
        except ApiException as exc:
            raise BackendError(f"could not delete kernel {self.kernel_id}'s pod: {api_reason(exc)}") from exc

    @staticmethod
    def _delete(watcher: PodWatcher, namespace: str, name: str) -> None:
        delete_if_present(watcher.core.delete_namespaced_pod, name, namespace, grace_period_seconds=0)
        delete_if_present(watcher.core.delete_namespaced_secret, name, namespace)

    async def launch_diagnostics(self) -> str:
        state = self._state()
        code = f"exit code {state.exit_code}; " if state and state.exit_code is not None else ""
        if state and state.failure:
            code += f"{state.failure.message}; "
        text = await self._log_tail()
        return f"{code}last lines of its log:\n{text}" if text else code.rstrip("; ")

    async def _log_tail(self) -> str:
        """The last lines the kernel container wrote; '' when it has none (not started, or gone)."""
        if self.pod_name is None or self.pod_namespace is None:
            return ""
        watcher = await self.watcher()
        try:
            text = await run_blocking(watcher.core.read_namespaced_pod_log, self.pod_name, self.pod_namespace,
                                      tail_lines=15, _request_timeout=10)
        except (ApiException, urllib3.exceptions.HTTPError):  # no node yet, gone, or the API is unreachable
            return ""
        return (text or "").strip()

    async def cleanup(self, restart: bool = False) -> None:
        """Calls ``super()`` first; deletes the pod and its Secret, and (not on restart) a namespace made for it."""
        await super().cleanup(restart)
        try:
            await self.kill_launcher()
            if self.namespace_created and not restart and self.pod_namespace:
                watcher = await self.watcher()
                await run_blocking(delete_if_present, watcher.core.delete_namespace, self.pod_namespace)
                self.namespace_created = False
        except ApiException as exc:
            raise BackendError(f"could not delete kernel {self.kernel_id}'s namespace: {api_reason(exc)}") from exc
        finally:
            if self._watcher is not None:
                self._watcher.forget(self.kernel_id)
            self.pod_name = None

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Calls ``super()`` first; adds the pod's name and namespace and whether the namespace is the kernel's."""
        info = await super().get_provisioner_info()
        info.update(pod_name=self.pod_name, pod_namespace=self.pod_namespace, namespace_created=self.namespace_created)
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Calls ``super()`` first (which restores the launch, control key included, so signals work as for a kernel
        this gateway started); watches the stored pod again, its current state read once."""
        await super().load_provisioner_info(provisioner_info)
        self.pod_name, self.pod_namespace = provisioner_info.get("pod_name"), provisioner_info.get("pod_namespace")
        self.namespace_created = bool(provisioner_info.get("namespace_created"))
        if not self.pod_name or not self.pod_namespace:
            return
        watcher = await self.watcher()
        state = watcher.track(self.kernel_id)
        try:
            pod = await run_blocking(watcher.core.read_namespaced_pod, self.pod_name, self.pod_namespace,
                                     _preload_content=False)
            raw = json.loads(pod.data)
            watcher.bind(self.kernel_id, raw["metadata"]["uid"])
            apply_pod(state, raw)
        except ApiException as exc:
            if exc.status != 404:
                raise BackendError(f"cannot read kernel {self.kernel_id}'s pod: {api_reason(exc)}") from exc
            state.exit_code = -1

