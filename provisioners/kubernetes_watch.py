"""The Kubernetes API client of the kubernetes-provisioner and its ONE watch on kernel pods.

:class:`PodWatcher` holds, per kubeconfig, namespace scope and gateway instance, the API client and
the state of every kernel pod, fed by one watch (label selector: this instance's kernel pods) for all
kernels: resumed from the last resourceVersion when the server ends it, listed afresh on ``410 Gone``.
Pod statuses become launch phases: a pull error, an unschedulable pod, a crash loop or an OOM kill is
a :class:`PodFailure` the provisioner turns into a failed start at once. Every API call runs in the
shared thread pool (:func:`~provisioners._blocking.run_blocking`); the watch has a thread of its own
because it blocks for good, and posts to the event loop with ``call_soon_threadsafe``. Nothing touches
the cluster before :meth:`PodWatcher.start`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

import urllib3
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

from ._blocking import run_blocking
from .api_requests import count_request
from .container import LABEL
from .errors import BackendError
from .kept import is_kept

__all__ = ["INSTANCE_LABEL", "KERNEL_LABEL", "PodFailure", "PodState", "PodWatcher", "api_reason", "apply_pod",
           "delete_if_present",
           "own_namespace"]

log = logging.getLogger("provisioners.kubernetes")

KERNEL_LABEL = f"{LABEL}.kernel_id"
INSTANCE_LABEL = f"{LABEL}.instance"
WATCH_SECONDS = 300  # the server ends each watch request after this; the next resumes from its resourceVersion
#: container waiting reasons that mean the image will not run; kind of failure for each
WAITING_FAILURES = {
    "ErrImagePull": "image", "ImagePullBackOff": "image", "ErrImageNeverPull": "image", "InvalidImageName": "image",
    "CrashLoopBackOff": "crash", "CreateContainerConfigError": "config", "CreateContainerError": "config",
    "RunContainerError": "config",
}


def _created(item: Any) -> float | None:
    """When an API object was created (unix time), if it says."""
    stamp = item.metadata.creation_timestamp
    return stamp.timestamp() if stamp is not None else None


def _transient(waiting: dict[str, Any]) -> bool:
    """A waiting reason the kubelet gets over by itself: just after a pod is created, the node may not yet be
    allowed to read the pod's Secret ("failed to sync secret cache" after its one-second wait); it tries again,
    unlike for a Secret that does not exist ("secret ... not found"), which fails the start at once."""
    return waiting.get("reason") == "CreateContainerConfigError" and \
        (waiting.get("message") or "").startswith("failed to sync")


def api_reason(exc: ApiException) -> str:
    """The API server's message in ``exc`` (its Status body), else its HTTP reason."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return message or f"{exc.status} {exc.reason}"


@dataclass
class PodFailure:
    """Why a kernel pod cannot run: ``kind`` is image, unschedulable, crash, oom or config; the cluster's message."""

    kind: str
    message: str


@dataclass
class PodState:
    """What the watch knows of one kernel's pod."""

    uid: str = ""  # the pod of the current launch; events of an earlier pod of the kernel are ignored
    phase: str = "Pending"
    exit_code: int | None = None
    failure: PodFailure | None = None
    pod_ip: str = ""
    failed: asyncio.Event = field(default_factory=asyncio.Event)  # set with ``failure``
    early: dict[str, dict] = field(default_factory=dict)  # events that came before ``uid`` was known


class _CountingApiClient(client.ApiClient):
    """The API client, counting its requests by method and path kind (``requests``)."""

    def __init__(self, configuration: client.Configuration) -> None:
        super().__init__(configuration)
        self.requests: Counter[str] = Counter()

    def call_api(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        path = url.split("?", 1)[0].split("://", 1)[-1].partition("/")[2]
        kind = re.sub(r"/(namespaces|pods|secrets|rolebindings|serviceaccounts)/[^/]+", r"/\1/{name}", "/" + path)
        watching = "watch=true" in url.lower()
        self.requests[f"{'WATCH' if watching else method} {kind}"] += 1
        count_request("kubernetes")
        return super().call_api(method, url, *args, **kwargs)


def new_api_client(kubeconfig: str) -> _CountingApiClient:
    """An API client from ``kubeconfig``; empty: in-cluster config, else the default kubeconfig. Blocking."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
        else:
            try:
                config.load_incluster_config(client_configuration=configuration)
            except ConfigException:  # not in a pod: KUBECONFIG or ~/.kube/config
                config.load_kube_config(client_configuration=configuration)
    except (ConfigException, OSError, ValueError) as exc:
        where = f"kubeconfig {kubeconfig}" if kubeconfig else "in-cluster config or the default kubeconfig"
        raise BackendError(f"cannot configure the Kubernetes client from {where}: {exc}") from exc
    configuration.connection_pool_maxsize = 16  # the shared thread pool's size
    return _CountingApiClient(configuration)


def own_namespace(kubeconfig: str) -> str:
    """The gateway's namespace: its pod's, else the kubeconfig's current context's, else 'default' (blocking)."""
    if not kubeconfig:
        try:
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace", encoding="utf-8") as file:
                return file.read().strip() or "default"
        except OSError:
            pass
    try:
        _, current = config.list_kube_config_contexts(config_file=kubeconfig or None)
        return (current or {}).get("context", {}).get("namespace") or "default"
    except (ConfigException, OSError, ValueError):
        return "default"


class PodWatcher:
    """One API client and one pod watch for the kernel pods of one gateway instance."""

    _instances: ClassVar[dict[tuple[str, str, str], PodWatcher]] = {}

    def __init__(self, kubeconfig: str, namespace: str, instance: str) -> None:
        self.kubeconfig, self.namespace, self.instance = kubeconfig, namespace, instance
        self.selector = f"{KERNEL_LABEL},{INSTANCE_LABEL}={instance}"
        self.api: _CountingApiClient | None = None
        self.states: dict[str, PodState] = {}
        self.reaped = False
        self._reap_lock = asyncio.Lock()
        self.version: str | None = None  # the watch's resourceVersion; None: list afresh
        self.watch_seconds = WATCH_SECONDS
        self._lock = asyncio.Lock()
        self._stopping = threading.Event()
        self._watch: watch.Watch | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def instance(cls, kubeconfig: str, namespace: str, instance: str) -> PodWatcher:
        """The watcher for pods of ``instance`` in ``namespace`` ('' means every namespace)."""
        key = (kubeconfig, namespace, instance)
        if key not in cls._instances:
            cls._instances[key] = cls(kubeconfig, namespace, instance)
        return cls._instances[key]

    @property
    def core(self) -> client.CoreV1Api:
        assert self.api is not None, "PodWatcher.start() first"
        return client.CoreV1Api(self.api)

    @property
    def rbac(self) -> client.RbacAuthorizationV1Api:
        assert self.api is not None, "PodWatcher.start() first"
        return client.RbacAuthorizationV1Api(self.api)

    async def start(self) -> None:
        """Configure the client, list the kernel pods and start the watch thread (once; later calls return)."""
        async with self._lock:
            if self.api is not None:
                return
            await self.connect()
            try:
                await run_blocking(self._relist)  # a first failure (unreachable, forbidden) fails this start
            except BaseException:
                self.api = None
                raise
            threading.Thread(target=self._run, name="kubernetes-pod-watch", daemon=True).start()

    async def connect(self) -> None:
        """Configure the API client (no request yet); :meth:`start` calls it."""
        self.api = await run_blocking(new_api_client, self.kubeconfig)
        self._loop = asyncio.get_running_loop()

    def stop(self) -> None:
        """End the watch thread (within a moment) and forget the client."""
        self._stopping.set()
        if self._watch is not None:
            self._watch.stop()
        self._instances.pop((self.kubeconfig, self.namespace, self.instance), None)

    # -- the watch thread ---------------------------------------------------------------------------
    def _list_call(self) -> Any:
        if self.namespace:
            return self.core.list_namespaced_pod, (self.namespace,)
        return self.core.list_pod_for_all_namespaces, ()

    def _relist(self) -> None:
        """List the kernel pods, post each, and remember the list's resourceVersion (watch thread or start)."""
        func, args = self._list_call()
        try:
            response = func(*args, label_selector=self.selector, _preload_content=False, _request_timeout=30)
            listing = json.loads(response.data)
        except ApiException as exc:
            raise BackendError(f"cannot list kernel pods: {api_reason(exc)}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise BackendError(f"cannot reach the Kubernetes API at {self.api.configuration.host}: {exc}") from exc
        for pod in listing.get("items", []):
            self._post("LISTED", pod)
        self.version = listing.get("metadata", {}).get("resourceVersion")

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self.step():
                self._stopping.wait(1.0)

    def step(self) -> bool:
        """One round of the watch thread: list if needed, then one watch request. False: pause before the next."""
        try:
            if self.version is None:
                self._relist()
            self._watch_once()
        except ApiException as exc:
            if exc.status == 410:  # our resourceVersion is older than the server keeps: list again
                log.info("kernel pod watch expired (410 Gone); listing again")
                self.version = None
                return True
            log.warning("kernel pod watch failed: %s; resuming", api_reason(exc))
            return False
        except (urllib3.exceptions.HTTPError, BackendError) as exc:  # the API server is down or the connection broke
            log.warning("kernel pod watch: %s; resuming", exc)
            return False
        except Exception:  # anything else: resume after a pause, with the traceback for a bug report
            log.warning("kernel pod watch ended; resuming", exc_info=True)
            return False
        return True

    def _watch_once(self) -> None:
        """One watch request from ``version``, until the server ends it (after ``watch_seconds``)."""
        func, args = self._list_call()
        self._watch = watch.Watch()
        for event in self._watch.stream(func, *args, label_selector=self.selector, resource_version=self.version,
                                        timeout_seconds=self.watch_seconds, allow_watch_bookmarks=True,
                                        _request_timeout=(30, self.watch_seconds + 30)):
            # the raw dict: the client's deserialize=False path fails on the server's 410 ERROR event (KeyError)
            pod = event.get("raw_object") or {}
            version = pod.get("metadata", {}).get("resourceVersion")
            if version:
                self.version = version
            if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                self._post(event["type"], pod)
            if self._stopping.is_set():
                break

    def _post(self, kind: str, pod: dict) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_pod, kind, pod)

    # -- on the event loop ------------------------------------------------------------------------------
    def _on_pod(self, kind: str, pod: dict) -> None:
        kernel_id = (pod.get("metadata", {}).get("labels") or {}).get(KERNEL_LABEL, "")
        state = self.states.get(kernel_id)
        uid = pod.get("metadata", {}).get("uid", "")
        if state is None:
            return
        if not state.uid:
            state.early[uid] = dict(pod, _event=kind)
            return
        if uid == state.uid:
            apply_pod(state, pod, deleted=kind == "DELETED")

    def track(self, kernel_id: str) -> PodState:
        """A fresh state for the kernel's next pod (must be called on the event loop)."""
        state = self.states[kernel_id] = PodState()
        return state

    def bind(self, kernel_id: str, uid: str) -> None:
        """The kernel's current pod is ``uid``: apply what the watch already said of it."""
        state = self.states.get(kernel_id)
        if state is not None:
            state.uid = uid
            early = state.early.pop(uid, None)
            state.early.clear()
            if early is not None:
                apply_pod(state, early, deleted=early.get("_event") == "DELETED")

    def forget(self, kernel_id: str) -> None:
        self.states.pop(kernel_id, None)

    async def reap(self, keep: set[str]) -> None:
        """Delete the pods, secrets and namespaces an earlier run of this instance left (once per watcher)."""
        async with self._reap_lock:  # a start that comes meanwhile waits: its pod is not a leftover
            if not self.reaped:
                await run_blocking(self._reap, keep)
                self.reaped = True

    def _reap(self, keep: set[str]) -> None:
        core, scoped = self.core, bool(self.namespace)
        selector = f"{INSTANCE_LABEL}={self.instance}"
        try:
            pods = (core.list_namespaced_pod(self.namespace, label_selector=selector) if scoped
                    else core.list_pod_for_all_namespaces(label_selector=selector)).items
            secrets = (core.list_namespaced_secret(self.namespace, label_selector=selector) if scoped
                       else core.list_secret_for_all_namespaces(label_selector=selector)).items
            namespaces = [] if scoped else core.list_namespace(label_selector=selector).items
            for kind, items, delete in (("pod", pods, core.delete_namespaced_pod),
                                        ("secret", secrets, core.delete_namespaced_secret)):
                for item in items:
                    kernel = (item.metadata.labels or {}).get(KERNEL_LABEL, "")
                    if kernel in keep or is_kept(kernel, _created(item)):
                        continue
                    log.warning("removing %s %s/%s left by an earlier run of gateway %r", kind,
                                item.metadata.namespace, item.metadata.name, self.instance)
                    delete_if_present(delete, item.metadata.name, item.metadata.namespace, grace_period_seconds=0)
            for item in namespaces:
                kernel = (item.metadata.labels or {}).get(KERNEL_LABEL, "")
                if kernel not in keep and not is_kept(kernel, _created(item)):
                    log.warning("removing namespace %s left by an earlier run of gateway %r", item.metadata.name,
                                self.instance)
                    delete_if_present(core.delete_namespace, item.metadata.name)
        except ApiException as exc:
            log.warning("could not remove the kernels of an earlier run of gateway %r: %s", self.instance,
                        api_reason(exc))


def delete_if_present(delete: Any, *args: Any, **kwargs: Any) -> None:
    """Call a blocking delete; an object already gone (404) is fine."""
    try:
        delete(*args, **kwargs)
    except ApiException as exc:
        if exc.status != 404:
            raise


def apply_pod(state: PodState, pod: dict, deleted: bool = False) -> None:
    """Update ``state`` from one pod object (a raw API dict); sets ``state.failed`` on a failure."""
    status = pod.get("status") or {}
    state.phase = status.get("phase") or state.phase
    state.pod_ip = status.get("podIP") or state.pod_ip
    statuses = status.get("containerStatuses") or []
    kernel = next((s for s in statuses if s.get("name") == "kernel"), statuses[0] if statuses else {})
    terminated = (kernel.get("state") or {}).get("terminated") or {}
    waiting = (kernel.get("state") or {}).get("waiting") or {}
    failure = None
    if waiting.get("reason") in WAITING_FAILURES and not _transient(waiting):
        failure = PodFailure(WAITING_FAILURES[waiting["reason"]],
                             f"{waiting['reason']}: {waiting.get('message') or 'no message'}")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
            failure = PodFailure("unschedulable", f"Unschedulable: {condition.get('message') or 'no message'}")
    if terminated.get("reason") == "OOMKilled":
        failure = PodFailure("oom", f"OOMKilled: the kernel used more memory than its limit "
                                    f"(exit code {terminated.get('exitCode')})")
    if state.phase in ("Succeeded", "Failed") and state.exit_code is None:
        code = terminated.get("exitCode")
        state.exit_code = int(code) if isinstance(code, int) else (0 if state.phase == "Succeeded" else -1)
        if failure is None and status.get("reason"):  # evicted, node lost, deadline exceeded
            failure = PodFailure("crash", f"{status['reason']}: {status.get('message') or 'no message'}")
    if deleted and state.exit_code is None:
        state.exit_code = -1
    if failure is not None and state.failure is None:
        state.failure = failure
        state.failed.set()
