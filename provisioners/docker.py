"""Docker containers and Swarm services as kernels, through the docker SDK.

One :class:`DockerHost` per process holds the SDK client and the state of every kernel container,
fed by ONE Docker events stream (and, for Swarm, one batched task query per interval for all
kernels), so watching costs the same for 1 or 500 kernels. Every SDK call runs in the shared
bounded thread pool; the events stream has a thread of its own because it blocks for good.
Kernels re-attached by a later gateway join the same watch; one listing (shared by the
re-attaches made together) gives their current state, including "gone" for a removed object.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Container

import docker
import docker.errors
from docker.types import DeviceRequest, EndpointSpec, Mount, Resources, RestartPolicy, ServiceMode
from traitlets import Float, TraitError, validate

from ._blocking import run_blocking
from .container import LABEL, ContainerProvisioner, ContainerRequest
from .errors import BackendError, LaunchError, LaunchRequestError
from .kept import is_kept

__all__ = ["DockerHost", "DockerProvisioner", "DockerSwarmProvisioner"]

log = logging.getLogger("provisioners.docker")

KERNEL_LABEL = f"{LABEL}.kernel_id"
ENDED = {"exited", "dead", "die", "destroy", "oom"}
#: Swarm task states after which the task will never run again.
TASK_ENDED = {"complete", "failed", "shutdown", "rejected", "orphaned", "remove"}


@dataclass
class KernelState:
    """What the shared watcher knows of one kernel's container or task."""

    status: str = "created"
    exit_code: int | None = None
    error: str = ""  # the engine's reason, when it gave one (a rejected Swarm task)
    exists_since: float | None = None  # monotonic time from which the container/service is known to exist

    def ended(self, code: int | None, error: str = "") -> None:
        """Record the end once: a later report (an older listing, a second event) changes nothing."""
        if self.exit_code is None:
            self.status, self.exit_code, self.error = "exited", -1 if code is None else code, error


class DockerHost:
    """The process's Docker client and the state of every kernel container it runs."""

    _instance: DockerHost | None = None

    def __init__(self) -> None:
        self.client: docker.DockerClient | None = None
        self.states: dict[str, KernelState] = {}
        self.swarm_kernels: set[str] = set()
        self.reaped: set[str] = set()
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poller: asyncio.Task | None = None
        self._refresh: asyncio.Future | None = None
        self.poll_interval = 1.0

    @classmethod
    def instance(cls) -> DockerHost:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    async def connect(self) -> docker.DockerClient:
        """The SDK client; the events watcher starts with it. Called by every Docker launch."""
        async with self._lock:
            if self.client is None:
                try:
                    self.client = await run_blocking(docker.from_env)
                    await run_blocking(self.client.ping)
                except docker.errors.DockerException as exc:
                    self.client = None
                    raise LaunchError(f"cannot reach the Docker engine: {exc}") from exc
                self._loop = asyncio.get_running_loop()
                threading.Thread(target=self._watch, name="docker-events", daemon=True).start()
            return self.client

    def _watch(self) -> None:
        """The one events stream for all kernel containers (runs in its own thread, reopened if it ends)."""
        assert self.client is not None
        filters = {"type": "container", "label": [KERNEL_LABEL]}
        while True:
            try:
                self._resync()
                for event in self.client.events(decode=True, filters=filters):
                    attributes = event.get("Actor", {}).get("Attributes", {})
                    kernel_id = attributes.get(KERNEL_LABEL)
                    if kernel_id and self._loop is not None:
                        self._loop.call_soon_threadsafe(self._on_event, kernel_id, event.get("status", ""), attributes)
            except Exception:  # the engine restarted or the connection broke: reopen after a pause
                log.warning("Docker events stream ended; reopening it", exc_info=True)
            time.sleep(1.0)

    def _resync(self) -> None:
        """Catch up with exits that happened while no stream was open (runs in the events thread)."""
        listing = self._listing(swarm=False)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._apply, listing)

    def _listing(self, swarm: bool) -> tuple[float, dict[str, dict], dict[str, dict] | None]:
        """One listing of every kernel container (and, with ``swarm``, every kernel service's latest task): its
        start time, container state by kernel id, and task by kernel id (None: services not listed). Blocking."""
        assert self.client is not None
        started = time.monotonic()
        containers = {c.labels.get(KERNEL_LABEL): c.attrs.get("State", {})
                      for c in self.client.containers.list(all=True, filters={"label": [KERNEL_LABEL]})}
        tasks = None
        if swarm:
            services = self.client.services.list(filters={"label": KERNEL_LABEL})
            latest = self._latest_tasks(self.client.api.tasks(filters={"label": KERNEL_LABEL}))
            # only listed services: a removed service's tasks linger a while with their last state
            tasks = {kernel_id: latest.get(kernel_id, {}) for kernel_id in
                     (s.attrs.get("Spec", {}).get("Labels", {}).get(KERNEL_LABEL) for s in services)}
        return started, containers, tasks

    def _apply(self, listing: tuple[float, dict[str, dict], dict[str, dict] | None]) -> None:
        """Update the tracked kernels from a listing. A container or service missing from it is gone, if it
        existed before the listing began (one being created now is not listed yet)."""
        started, containers, tasks = listing
        for kernel_id, state in self.states.items():
            existed = state.exists_since is not None and state.exists_since <= started
            if kernel_id in self.swarm_kernels:
                if tasks is None:
                    continue
                if kernel_id in tasks:
                    self._apply_task(state, tasks[kernel_id])
                elif existed:
                    state.ended(None)  # the service was removed
            elif kernel_id in containers:
                container = containers[kernel_id]
                if container.get("Running"):
                    state.status = "running" if state.exit_code is None else state.status
                elif container.get("Status") in ENDED:
                    state.ended(container.get("ExitCode"))
            elif existed:
                state.ended(None)  # the container was removed

    async def refresh(self) -> None:
        """Bring every tracked kernel's state up to date with one listing that began after this call (re-attach).

        Concurrent callers (a gateway re-attaching all its kernels) share one listing."""
        if self._refresh is None:
            self._refresh = asyncio.ensure_future(self._refresh_soon())
        await asyncio.shield(self._refresh)

    async def _refresh_soon(self) -> None:
        await asyncio.sleep(0)  # let the re-attaches started together join this listing
        self._refresh = None  # a later caller needs a listing that begins after it tracked its kernel
        swarm = bool(self.swarm_kernels)
        try:
            self._apply(await run_blocking(self._listing, swarm))
        except docker.errors.DockerException as exc:
            raise BackendError(f"cannot list kernel containers on the Docker engine: {exc}") from exc

    def _on_event(self, kernel_id: str, status: str, attributes: dict[str, str]) -> None:
        if kernel_id in self.swarm_kernels:
            return  # services are tracked by task state, which also covers other nodes
        state = self.states.get(kernel_id)
        if state is None:
            return
        if status == "start":
            state.status = "running"
        elif status in ENDED and state.status != "exited":
            state.status = "exited"
            code = attributes.get("exitCode")
            state.exit_code = int(code) if code and code.lstrip("-").isdigit() else -1

    def track(self, kernel_id: str, swarm: bool = False, exists: bool = False) -> KernelState:
        """Watch ``kernel_id``'s container (or, with ``swarm``, service); ``exists``: it is already there (re-attach)."""
        state = self.states[kernel_id] = KernelState(exists_since=time.monotonic() if exists else None)
        if swarm:
            self.swarm_kernels.add(kernel_id)
            if self._poller is None:
                self._poller = asyncio.ensure_future(self._poll_tasks())
        return state

    def forget(self, kernel_id: str) -> None:
        self.states.pop(kernel_id, None)
        self.swarm_kernels.discard(kernel_id)

    async def _poll_tasks(self) -> None:
        """One query for the tasks of every kernel service, each interval, while any exists."""
        assert self.client is not None
        api = self.client.api
        while True:
            await asyncio.sleep(self.poll_interval)
            if not self.swarm_kernels:
                continue
            began = time.monotonic()
            try:
                tasks = await run_blocking(api.tasks, filters={"label": KERNEL_LABEL})
            except docker.errors.DockerException as exc:
                log.warning("swarm task query failed: %s", exc)
                continue
            latest = self._latest_tasks(tasks)
            missing = False
            for kernel_id in list(self.swarm_kernels):
                state, task = self.states.get(kernel_id), latest.get(kernel_id)
                if state is None:
                    continue
                if task is not None:
                    self._apply_task(state, task)
                elif state.exit_code is None and state.exists_since is not None and state.exists_since <= began:
                    missing = True
            if missing:  # a service without tasks may have been removed: one listing of services tells
                try:
                    self._apply(await run_blocking(self._listing, True))
                except docker.errors.DockerException as exc:
                    log.warning("swarm service query failed: %s", exc)

    @staticmethod
    def _latest_tasks(tasks: list[dict]) -> dict[str, dict]:
        """Each kernel's newest task."""
        latest: dict[str, dict] = {}
        for task in tasks:
            kernel_id = task.get("Spec", {}).get("ContainerSpec", {}).get("Labels", {}).get(KERNEL_LABEL)
            if kernel_id and task.get("CreatedAt", "") >= latest.get(kernel_id, {}).get("CreatedAt", ""):
                latest[kernel_id] = task
        return latest

    @staticmethod
    def _apply_task(state: KernelState, task: dict) -> None:
        status = task.get("Status", {})
        if state.exit_code is None:
            state.status = status.get("State", state.status)
        if state.status in TASK_ENDED:
            code = status.get("ContainerStatus", {}).get("ExitCode")
            state.ended(int(code) if code is not None else None, status.get("Err", ""))

    async def reap(self, instance: str, keep: Container[str]) -> None:
        """Remove containers and services a previous run of this gateway instance left behind, except those of
        the kernels in ``keep``; it is read at each removal, so pass a live view (kernels re-attached meanwhile)."""
        if instance in self.reaped:
            return
        self.reaped.add(instance)
        assert self.client is not None
        selector = {"label": [f"{LABEL}.instance={instance}"]}
        containers = await run_blocking(self.client.containers.list, all=True, filters=selector)
        services = []
        if await run_blocking(lambda: self.client.info().get("Swarm", {}).get("ControlAvailable", False)):
            services = await run_blocking(self.client.services.list, filters=selector)
        for kind, items in (("service", services), ("container", containers)):
            for item in items:
                labels = item.attrs.get("Spec", {}).get("Labels", {}) if kind == "service" else item.labels
                created = _docker_time(item.attrs.get("CreatedAt" if kind == "service" else "Created"))
                if labels.get(KERNEL_LABEL) in keep or is_kept(labels.get(KERNEL_LABEL, ""), created):
                    continue
                log.warning("removing %s %s left by an earlier run of gateway %r", kind, item.name, instance)
                try:
                    await run_blocking(item.remove, **({"force": True} if kind == "container" else {}))
                except docker.errors.NotFound:
                    pass


class DockerProvisioner(ContainerProvisioner):
    """Each kernel is one container on the Docker engine the gateway talks to (DOCKER_HOST or the socket)."""

    swarm = False
    _object_id: str | None = None

    @property
    def host(self) -> DockerHost:
        return DockerHost.instance()

    async def _client(self) -> docker.DockerClient:
        client = await self.host.connect()
        # the live map, not a copy: a kernel re-attached while the reaper lists is kept too
        await self.host.reap(self.instance_label, self.host.states)
        return client

    async def advertised_host(self) -> str:
        """Our address on the kernels' network: our own container's, or the network's gateway."""
        if self.response_host:
            return self.response_host
        client = await self._client()
        own = await run_blocking(_own_address, client, self.network)
        if own:
            return own
        try:
            network = await run_blocking(client.networks.get, self.network)
        except docker.errors.NotFound:
            raise LaunchError(f"Docker network {self.network!r} does not exist") from None
        configs = network.attrs.get("IPAM", {}).get("Config") or [{}]
        gateway = next((c.get("Gateway") for c in configs if c.get("Gateway")), None)
        subnet = next((c.get("Subnet") for c in configs if c.get("Subnet")), None)
        if not gateway and subnet:
            gateway = str(ipaddress.ip_network(subnet)[1])  # the engine's convention when it does not say
        if not gateway:
            raise LaunchError(f"Docker network {self.network!r} has no gateway address; set response_host")
        return gateway

    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        request = self.container_request(cmd, env, token)
        client = await self._client()
        try:
            image = await run_blocking(client.images.get, request.image)
            if self.swarm:
                request.image = image.id  # by id: Swarm would otherwise ask a registry about the tag
        except docker.errors.ImageNotFound:
            raise LaunchRequestError(f"image {request.image!r} is not present on the Docker host") from None
        except docker.errors.DockerException as exc:
            raise LaunchError(f"Docker engine error looking up image {request.image!r}: {exc}") from exc
        state = self.host.track(self.kernel_id, swarm=self.swarm)
        try:
            self._object_id = await run_blocking(self._create, client, request)
        except docker.errors.DockerException as exc:
            self.host.forget(self.kernel_id)
            raise LaunchError(f"Docker refused the kernel {'service' if self.swarm else 'container'}: {exc}") from exc
        state.status = "running" if state.status == "created" else state.status
        state.exists_since = time.monotonic()
        self.log.info("kernel %s: %s %s started from %s", self.kernel_id, "service" if self.swarm else "container",
                      request.name, request.image)

    def _create(self, client: docker.DockerClient, request: ContainerRequest) -> str:
        stale = client.containers.list(all=True, filters={"name": f"^{request.name}$"})
        for container in stale:  # a leftover of this kernel's previous run (restart)
            container.remove(force=True)
        kwargs: dict[str, Any] = dict(
            image=request.image, command=request.command or None, name=request.name, detach=True,
            environment=request.env, labels=request.labels, user=request.user, network=self.network,
            volumes=request.volumes or None, stop_signal="SIGTERM",
        )
        if request.cpus:
            kwargs["nano_cpus"] = int(request.cpus * 1e9)
        if request.memory:
            kwargs["mem_limit"] = request.memory
        if request.gpus:
            kwargs["device_requests"] = [DeviceRequest(count=request.gpus, capabilities=[["gpu"]])]
        return client.containers.run(**kwargs).id

    def launcher_exit_status(self) -> int | None:
        state = self.host.states.get(self.kernel_id)
        if state is None:
            return None if self._object_id is None else -1
        return state.exit_code if state.exit_code is not None else None

    async def kill_launcher(self) -> None:
        if self._object_id is None:
            return
        client = await self.host.connect()
        try:
            await run_blocking(self._remove, client, self._object_id)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            raise BackendError(f"could not remove kernel {self.kernel_id}'s container: {exc}") from exc

    def _remove(self, client: docker.DockerClient, object_id: str) -> None:
        client.containers.get(object_id).remove(force=True)

    async def launch_diagnostics(self) -> str:
        if self._object_id is None:
            return ""
        client = await self.host.connect()
        try:
            text = await run_blocking(self._logs, client, self._object_id)
        except docker.errors.DockerException:
            return ""
        state = self.host.states.get(self.kernel_id)
        code = f"exit code {state.exit_code}; " if state and state.exit_code is not None else ""
        if state and state.error:
            code += f"the engine says: {state.error}; "
        return f"{code}last lines of its log:\n{text.strip()}" if text.strip() else code.rstrip("; ")

    def _logs(self, client: docker.DockerClient, object_id: str) -> str:
        return client.containers.get(object_id).logs(tail=15).decode(errors="replace")

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart)
        await self.kill_launcher()
        self._object_id = None
        self.host.forget(self.kernel_id)

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Calls ``super()`` first; adds the container's (Swarm: the service's) id."""
        info = await super().get_provisioner_info()
        info["object_id"] = self._object_id
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Calls ``super()`` first; watches the stored container (Swarm: service) again through the shared events
        watch and reads its current state in a listing shared with the other re-attaches; the reaping of this
        gateway's earlier leftovers keeps it."""
        await super().load_provisioner_info(provisioner_info)
        self._object_id = provisioner_info.get("object_id")
        if not self._object_id:
            return
        await self.host.connect()
        self.host.track(self.kernel_id, swarm=self.swarm, exists=True)
        await self.host.refresh()


def _docker_time(text: str | None) -> float | None:
    """Docker's RFC 3339 time (nanoseconds, 'Z') as unix time; None if it is not one."""
    if not text:
        return None
    head, _, rest = text.rstrip("Z").partition(".")
    try:
        return datetime.fromisoformat(head).replace(tzinfo=timezone.utc).timestamp() + float(f"0.{rest or 0}"[:10])
    except ValueError:
        return None


def _own_address(client: docker.DockerClient, network: str) -> str | None:
    """Our IP on ``network`` when the gateway itself runs in a container there (sibling containers)."""
    try:
        me = client.containers.get(socket.gethostname())
    except docker.errors.DockerException:
        return None
    return (me.attrs.get("NetworkSettings", {}).get("Networks", {}).get(network) or {}).get("IPAddress") or None


class DockerSwarmProvisioner(DockerProvisioner):
    """Each kernel is one Swarm service with a single task; the network must be an attachable overlay."""

    swarm = True
    stop_timeout = Float(
        5.0, config=True,
        help="Seconds Swarm gives a kernel's task to stop before killing it.",
    ).tag(env="GATEWAY_DOCKER_STOP_TIMEOUT")

    @validate("network")
    def _overlay(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] in ("", "bridge"):
            raise TraitError("a Swarm kernelspec needs 'network': an attachable overlay network (or 'host')")
        return proposal["value"]

    def container_request(self, cmd: list[str], env: dict[str, str], token: str) -> ContainerRequest:
        request = super().container_request(cmd, env, token)
        if request.gpus:
            raise LaunchRequestError("KERNEL_GPUS: GPUs are not available to Swarm kernels; use the docker provisioner")
        return request

    def _create(self, client: docker.DockerClient, request: ContainerRequest) -> str:
        for service in client.services.list(filters={"name": request.name}):
            if service.name == request.name:
                service.remove()
        mounts = [Mount(target=v.split(":")[1], source=v.split(":")[0], type="bind", read_only=v.endswith(":ro"))
                  for v in request.volumes]
        resources = Resources(cpu_limit=int(request.cpus * 1e9) or None, mem_limit=request.memory or None)
        service = client.services.create(
            request.image, command=request.command or None, name=request.name, env=request.env,
            labels=request.labels, container_labels=request.labels, user=request.user, networks=[self.network],
            endpoint_spec=EndpointSpec(mode="dnsrr"), restart_policy=RestartPolicy(condition="none"),
            mode=ServiceMode("replicated", replicas=1), resources=resources, mounts=mounts, stop_grace_period=int(self.stop_timeout * 1e9),
        )
        return service.id

    def _remove(self, client: docker.DockerClient, object_id: str) -> None:
        client.services.get(object_id).remove()

    def _logs(self, client: docker.DockerClient, object_id: str) -> str:
        chunks = client.api.service_logs(object_id, stdout=True, stderr=True, tail=15)
        return b"".join(chunks).decode(errors="replace")
