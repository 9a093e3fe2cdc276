"""The kernel registry: start, restart, interrupt and shut down kernels; per-user accounting.

Each kernel is a jupyter_client ``AsyncKernelManager`` whose provisioner the kernelspec picks, so
the registry never knows where a kernel runs. It raises the errors of ``kernel_gateway.errors``
and ``provisioners.errors``; it knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import time
import uuid
from typing import Any

import zmq.asyncio
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import CaselessStrEnum, Float, Instance, Integer, TraitError, Type, Unicode, default, validate

from provisioners.envconfig import EnvConfigurable
from provisioners.errors import LaunchError, LaunchTimeoutError, ProvisionerError
from provisioners.kept import set_kept

from .. import metrics
from ..bridge import BridgeLimits, KernelBridge
from ..errors import ConflictError, NotReadyError, UnknownKernelError, UnknownKernelSpecError
from ..policy import GatewayPolicy
from ..store import KernelRecord, KernelStore, StoreUnavailable
from ._connection_files import ConnectionFiles
from .keeping import adopt, heartbeat, kernel_record
from .managed import ManagedKernel, ManagerLog
from .manager import GatewayKernelManager
from .pools import KernelPools
from .process_watch import ProcessExitRestarter
from .replicas import ReplicaView, peer_model

__all__ = ["KernelRegistry", "ManagedKernel"]

log = logging.getLogger("kernel_gateway.kernels")

#: Seconds past the launch timeout before the registry gives up on a provisioner that did not.
LAUNCH_GRACE = 5.0
#: Seconds a kept kernel has to answer its heartbeat when a gateway re-attaches to it.
REATTACH_HEARTBEAT = 10.0
#: Kernels re-attached at once at start-up (each takes a provisioner call and a heartbeat).
REATTACH_CONCURRENCY = 16


def zmq_socket_cap(context: zmq.Context) -> int:
    """How many sockets the shared ZMQ context may hold: the open-file limit (every ZMQ socket takes a descriptor).

    libzmq's default is 1,024 per context, beyond which ``socket()`` fails with EMFILE ("Too many open files")
    whatever the open-file limit: each kernel holds two (our iopub subscription, jupyter_client's control socket)
    and each websocket three more, so the default stopped a gateway at about 510 kernels."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    ceiling = context.get(zmq.SOCKET_LIMIT)
    return max(1024, min(ceiling, soft) if soft != resource.RLIM_INFINITY else ceiling)


async def _diagnostics(km: AsyncKernelManager) -> str:
    """What the kernel's provisioner can tell about a failed start (an optional provisioner hook)."""
    hook = getattr(km.provisioner, "launch_diagnostics", None)
    if hook is None:
        return ""
    try:
        return await hook()
    except Exception:  # diagnostics are a courtesy; the start's own error is what we report
        return ""


class KernelRegistry(EnvConfigurable):
    """All kernels of this gateway, keyed by id."""

    kernel_manager_class = Type(
        GatewayKernelManager,
        klass=AsyncKernelManager,
        config=True,
        help="The jupyter_client kernel manager class used for every kernel; derive from "
        "kernel_gateway.kernels.manager.GatewayKernelManager to keep remote kernels' transport encryption.",
    )
    default_kernel_name = Unicode(
        "python3",
        config=True,
        help="Kernelspec started when a request names none.",
    ).tag(env="GATEWAY_DEFAULT_KERNEL_NAME")
    buffer_max_messages = Integer(
        100_000,
        config=True,
        help="Messages kept per kernel for clients that read slowly or are disconnected (with a session_id to "
        "come back to); beyond it the slowest client skips its oldest and is told how many on reconnect. "
        "0: no limit.",
    ).tag(env="GATEWAY_BUFFER_MAX_MESSAGES")
    buffer_max_bytes_per_kernel = Integer(
        64 * 2**20,
        config=True,
        help="Bytes of output kept per kernel for clients that read slowly or are disconnected (one copy, shared "
        "by all its clients); beyond it the slowest client skips its oldest messages, and if it is connected it "
        "is closed (code 1013) so it reconnects with its session_id. Default 64 MiB; 0: no limit.",
    ).tag(env="GATEWAY_BUFFER_MAX_BYTES_PER_KERNEL")
    buffer_max_bytes = Integer(
        512 * 2**20,
        config=True,
        help="Bytes of output kept for clients across all kernels; beyond it the client furthest behind, on any "
        "kernel, is treated as for buffer_max_bytes_per_kernel. Default 512 MiB; 0: no limit.",
    ).tag(env="GATEWAY_BUFFER_MAX_BYTES")
    max_detached_sessions_per_kernel = Integer(
        50,
        config=True,
        help="Disconnected client sessions (with a session_id) kept per kernel for their clients' return; each "
        "holds three ZMQ sockets. Beyond it the oldest is discarded. 0: no limit.",
    ).tag(env="GATEWAY_MAX_DETACHED_SESSIONS_PER_KERNEL")
    max_detached_sessions = Integer(
        500,
        config=True,
        help="Disconnected client sessions kept across all kernels; beyond it the oldest is discarded. 0: no limit.",
    ).tag(env="GATEWAY_MAX_DETACHED_SESSIONS")
    max_requests_in_flight = Integer(
        1000,
        config=True,
        help="Shell requests per kernel sent from websockets and not yet answered; more are answered with an "
        "error reply (TooManyRequests) instead of being sent, since a flood wedges ipykernel 7's shell. "
        "0: no limit.",
    ).tag(env="GATEWAY_MAX_REQUESTS_IN_FLIGHT")
    bridge_limits = Instance(BridgeLimits, help="The limits every kernel's websocket bridge shares.")
    detached_session_timeout = Float(
        600.0,
        config=True,
        help="Seconds a disconnected client session keeps buffering before it is discarded.",
    ).tag(env="GATEWAY_DETACHED_SESSION_TIMEOUT")
    shutdown_timeout = Float(
        10.0,
        config=True,
        help="Seconds a kernel gets to exit after shutdown_request before it is killed.",
    ).tag(env="GATEWAY_SHUTDOWN_TIMEOUT")
    on_stop = CaselessStrEnum(
        ["shutdown", "keep"],
        "shutdown",
        config=True,
        help="What a stopping gateway does with its kernels: 'shutdown' ends them; 'keep' leaves them running (local "
        "kernels in their own session, remote ones where they are) for the next gateway on the same kernel store, "
        "which re-attaches to them under the same ids. 'keep' needs the kernel store (KernelStoreOptions.key_file).",
    ).tag(env="GATEWAY_KERNELS_ON_STOP")
    store = Instance(KernelStore, allow_none=True, help="Where kernel records are kept; None: nowhere.")
    replica_sync_interval = Float(
        2.0,
        config=True,
        help="With a shared kernel store (replicas): seconds between reads of the store that show this replica the "
        "kernels its peers started and the ones they shut down or restarted (one query each time, whatever the "
        "number of kernels). A request naming a kernel not yet seen is served at once from its record anyway.",
    ).tag(env="GATEWAY_REPLICA_SYNC_INTERVAL")

    @validate("replica_sync_interval")
    def _positive_sync(self, proposal: dict[str, Any]) -> float:
        if not proposal["value"] > 0:
            raise TraitError(f"replica_sync_interval must be more than 0 seconds, not {proposal['value']}")
        return proposal["value"]

    @validate("buffer_max_messages", "buffer_max_bytes_per_kernel", "buffer_max_bytes",
              "max_detached_sessions_per_kernel", "max_detached_sessions", "max_requests_in_flight")
    def _not_negative(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 0:
            raise TraitError(f"{proposal['trait'].name} must be 0 (no limit) or more, not {proposal['value']}")
        return proposal["value"]

    @default("bridge_limits")
    def _bridge_limits_default(self) -> BridgeLimits:
        return BridgeLimits(
            kernel_bytes=self.buffer_max_bytes_per_kernel,
            total_bytes=self.buffer_max_bytes,
            max_messages=self.buffer_max_messages,
            detached_per_kernel=self.max_detached_sessions_per_kernel,
            detached_total=self.max_detached_sessions,
            requests_in_flight=self.max_requests_in_flight,
        )

    policy = Instance(GatewayPolicy)
    kernel_spec_manager = Instance(KernelSpecManager)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernels: dict[str, ManagedKernel] = {}
        self._starting: dict[str, ManagedKernel] = {}  # starts in flight
        self._context: zmq.asyncio.Context | None = None
        self._expiry: asyncio.Task | None = None
        self._stopping = False
        self._connection_files = ConnectionFiles(jupyter_runtime_dir())
        self.replicas: ReplicaView | None = None
        self._unserved: set[str] = set()  # records kept though not served (their kernelspec is gone)
        self.restoring = False  # kept kernels not re-attached yet: an unknown id may be one of them
        self.pools = KernelPools(self, parent=self)

    def is_kept(self, kernel_id: str) -> bool:
        """Whether the kernel is this gateway's (served, starting, or in the store): never a leftover to reap."""
        return (kernel_id in self.kernels or kernel_id in self._starting or kernel_id in self._unserved
                or self.pools.holds(kernel_id) or (self.replicas is not None and kernel_id in self.replicas.peers))

    @property
    def stopping(self) -> bool:
        """Whether the gateway is shutting down (it starts no kernels)."""
        return self._stopping

    @property
    def starting(self) -> dict[str, ManagedKernel]:
        """Starts in flight, by kernel id."""
        return self._starting

    async def start(self) -> None:
        """Open the ZMQ context and the task that expires detached sessions. Called by the app.

        Also removes the connection files a killed gateway left in the runtime dir (see ``_connection_files``).
        """
        os.makedirs(jupyter_runtime_dir(), mode=0o700, exist_ok=True)
        self._connection_files.open()
        await self._connection_files.sweep()
        self._context = zmq.asyncio.Context()
        self._context.set(zmq.MAX_SOCKETS, zmq_socket_cap(self._context))
        self._expiry = asyncio.create_task(self._expire_sessions())
        if self.store is not None and self.store.shared:
            self.replicas = ReplicaView(self, self.replica_sync_interval)
            self.replicas.start()
        # replicas launch kernels whose records come after: nothing younger than a launch is a leftover
        set_kept(self.is_kept, self.policy.max_launch_timeout + 60 if self.replicas is not None else 0.0)
        self.pools.start()

    async def _expire_sessions(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.detached_session_timeout / 2))
            for kernel in list(self.kernels.values()):
                if kernel.bridge:
                    kernel.bridge.expire_sessions(self.detached_session_timeout)

    async def stop(self) -> None:
        """Shut every kernel down cleanly, then close the context. Called by the app on exit."""
        self._stopping = True
        if self._expiry:
            self._expiry.cancel()
        await self.pools.stop()
        if self.replicas is not None:
            self.replicas.stop()
        await asyncio.gather(*(self._discard(k) for k in list(self._starting.values())), return_exceptions=True)
        deadline = time.monotonic() + self.shutdown_timeout
        while self._starting and time.monotonic() < deadline:  # let abandoned starts answer their clients
            await asyncio.sleep(0.05)
        if self.on_stop == "shutdown":  # ours only: kernels taken over from other replicas are theirs to end
            await asyncio.gather(*(self.shutdown(k.kernel_id) for k in list(self.kernels.values()) if k.owned),
                                 return_exceptions=True)
        self._leave_running()
        if self._context is not None:
            self._context.destroy(linger=0)
        self._connection_files.close()
        if self.replicas is not None:
            await self.replicas.leave()
        if self.store is not None:
            await self.store.close()

    def _leave_running(self) -> None:
        """Let go of every kernel without ending it: their records stay for the next gateway."""
        if self.kernels:
            log.info("left %d kernels running for the next gateway", len(self.kernels))
        for kernel in list(self.kernels.values()):
            self.release(kernel)

    @staticmethod
    def make_keeper(kernel: ManagedKernel, owned: bool = True) -> None:
        """Whether this gateway restarts the kernel when it dies; one that only serves a kernel another replica
        keeps reports its death ('dead') and never restarts it beside its keeper."""
        kernel.owned = owned
        restarter = getattr(kernel.km, "_restarter", None)
        if restarter is None:
            return
        if not owned and kernel.restart_limit is None:
            kernel.restart_limit, restarter.restart_limit = restarter.restart_limit, 0
        elif owned and kernel.restart_limit is not None:
            restarter.restart_limit, kernel.restart_limit = kernel.restart_limit, None

    async def follow(self, kernel: ManagedKernel, record: KernelRecord) -> None:
        """Another replica changed the record of a kernel held here: it became the keeper (nothing to do but note
        it), or restarted the kernel. A restart on the same ports (local kernels) is followed in place, clients
        stay connected; one on new ports is let go, and the next request takes the kernel over afresh."""
        previous, kernel.record = kernel.record, record
        if self.replicas is not None and record.keeper != self.replicas.replica_id and kernel.owned:
            self.make_keeper(kernel, False)
        if record.connection_info != previous.connection_info:
            self.release(kernel, "another replica restarted it on new ports")
        elif record.provisioner_info != previous.provisioner_info:
            try:
                await kernel.km.provisioner.load_provisioner_info(
                    {**record.provisioner_info, "kernel_id": kernel.kernel_id, "connection_info": dict(record.connection_info)})
            except Exception as exc:  # the provisioner cannot follow: let the kernel go; a request takes it over again
                self.release(kernel, f"cannot follow its restart by another replica: {exc}")
                return
            if kernel.execution_state == "dead":  # our watch saw the old process end before the new one was recorded
                kernel.execution_state = "idle"
                kernel.km.start_restarter()

    def release(self, kernel: ManagedKernel, why: str = "") -> None:
        """Stop serving ``kernel`` without ending it (its clients' websockets close; they may come back)."""
        if self.kernels.get(kernel.kernel_id) is not kernel:
            return
        del self.kernels[kernel.kernel_id]
        kernel.km.stop_restarter()  # nobody here restarts it any more
        if kernel.bridge:
            kernel.bridge.close("the kernel keeps running but this gateway let it go: reconnect to the same URL")
        if why:
            kernel.log.info("no longer served here: %s", why)

    # -- re-attaching ------------------------------------------------------------------------------
    async def restore(self) -> None:
        """Serve again the kernels an earlier gateway kept; clean up those that died meanwhile.

        Raises :class:`StoreUnavailable` when the records cannot be read (the app tries again later)."""
        if self.store is None:
            return
        self.restoring = True  # until this returns: an exception leaves it set for the app's next try
        await self._restore()
        self.restoring = False

    async def _restore(self) -> None:
        assert self.store is not None
        if self.replicas is not None:  # replicas: each takes a kernel over when it is asked for it
            await self.replicas.sync()
            log.info("%d kernels in the shared kernel store", len(self.replicas.peers))
            return
        records = [r for r in await self.store.records() if r.kernel_id not in self.kernels]
        if not records:
            return
        started = time.monotonic()
        gate = asyncio.Semaphore(REATTACH_CONCURRENCY)

        async def one(record: KernelRecord) -> bool:
            async with gate:
                return await self.reattach(record)

        served = sum(await asyncio.gather(*(one(r) for r in records)))
        log.info("re-attached %d of %d kept kernels in %.2fs", served, len(records), time.monotonic() - started)

    async def reattach(self, record: KernelRecord, owned: bool = True) -> bool:
        """Take over the kernel of ``record``; True when it is served again.

        ``owned``: this gateway is its keeper from now on (re-attached at start-up): it restarts the kernel when it
        dies, and cleans it up (and its record) when it is found gone. A kernel taken over from another replica
        is only served: its death is reported to clients, and its record is left to its keeper."""
        kid = record.kernel_id
        kernel_log = logging.LoggerAdapter(log, {"kernel_id": kid})
        try:
            name, _ = self.spec(record.kernel_name)
        except UnknownKernelSpecError:
            kernel_log.error("cannot re-attach: its kernelspec %r is gone; the record is kept until the spec is back "
                             "(or remove the kernel by hand)", record.kernel_name)
            self._unserved.add(kid)
            return False
        kernel = ManagedKernel(kid, name, record.user, self.manager(kid, name), created=record.created)
        reason = ""
        try:
            await adopt(kernel.km, record)
            if not await kernel.km.is_alive():
                reason = "its process, container or application has ended"
            elif not await heartbeat(self._context, record.connection_info, REATTACH_HEARTBEAT):
                reason = f"it did not answer its heartbeat within {REATTACH_HEARTBEAT:g}s"
        except Exception as exc:  # the provisioner could not take it over: treated as gone, and cleaned
            reason = f"its provisioner could not take it over: {exc}"
        if reason and not owned:  # its keeper decides what becomes of it: nothing is removed from here
            kernel_log.warning("cannot serve kernel %s of user %r here: %s", name, record.user, reason)
            return False
        if reason:
            kernel_log.warning("kept kernel %s of user %r is not served again: %s; cleaning it up", name, record.user,
                               reason)
            await self._discard(kernel)
            await self._forget_record(kernel)
            return False
        if kid in self.kernels:  # taken over meanwhile by another path (a request, the keeper's sync): served
            return True
        kernel.record = record
        bridge = self._open_bridge(kernel)
        kernel.km.start_restarter()
        self.make_keeper(kernel, owned)
        self._watch_restarts(kernel)
        self.kernels[kid] = kernel
        kernel.execution_state = "busy"  # it may be running a cell: the heartbeat answers even then
        try:
            await bridge.wait_ready(REATTACH_HEARTBEAT / 2, kernel.km.is_alive)
            kernel.execution_state = "idle"
        except (TimeoutError, RuntimeError):
            pass  # still busy: the status message that ends its cell sets it idle
        kernel_log.info("re-attached kernel %s of user %r (%s)", name, record.user, kernel.execution_state)
        return True

    # -- lookups -------------------------------------------------------------------------------
    def get(self, kernel_id: str) -> ManagedKernel:
        """Return the kernel ``kernel_id`` held here; raise :class:`UnknownKernelError` if there is none."""
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            raise UnknownKernelError(f"Kernel does not exist: {kernel_id}", kernel_id=kernel_id)
        return kernel

    async def find(self, kernel_id: str) -> ManagedKernel:
        """Like :meth:`get`, but a kernel another replica started is taken over from its record. While kept
        kernels are being re-attached an unknown id is answered 503, not 404: a client (jupyter_server) forgets
        a kernel it is told does not exist."""
        kernel = self.kernels.get(kernel_id)
        if kernel is None and self.replicas is not None:
            kernel = await self.replicas.find(kernel_id)
        if kernel is None and self.restoring:
            raise self._not_restored()
        if kernel is None:
            raise UnknownKernelError(f"Kernel does not exist: {kernel_id}", kernel_id=kernel_id)
        return kernel

    @staticmethod
    def _not_restored() -> NotReadyError:
        return NotReadyError("the gateway is still re-attaching the kernels it kept; try again in a few seconds")

    def models(self) -> list[dict[str, Any]]:
        """The models of every kernel: held here, and (replicas) held by the others; 503 until the kept ones
        are re-attached (an incomplete list would tell clients that the others are gone)."""
        if self.restoring:
            raise self._not_restored()
        peers = self.replicas.peers.values() if self.replicas is not None else ()
        return [*(k.model() for k in self.kernels.values()), *(peer_model(r) for r in peers if r.kernel_id not in self.kernels)]

    def spec(self, name: str | None):
        """Return the kernelspec ``name`` (default when None); raise :class:`UnknownKernelSpecError`."""
        name = name or self.default_kernel_name
        try:
            return name, self.kernel_spec_manager.get_kernel_spec(name)
        except NoSuchKernel:
            raise UnknownKernelSpecError(f"Kernel spec {name!r} not found") from None

    def count_for(self, user: str) -> tuple[int, int]:
        """Kernels running or starting: in total, and for ``user``."""
        owners = [k.user for k in (*self.kernels.values(), *self._starting.values())]
        if self.replicas is not None:
            owners += [r.user for r in self.replicas.peers.values() if r.kernel_id not in self.kernels]
        return len(owners), owners.count(user)

    # -- lifecycle ------------------------------------------------------------------------------
    async def start_kernel(self, name: str | None, request_env: dict[str, str], user: str) -> ManagedKernel:
        """Start a kernel of spec ``name`` for ``user`` and return it once it answers kernel_info.

        Checks authorization and limits first; a start that fails or times out leaves nothing behind.
        """
        if self._stopping:
            raise NotReadyError("the gateway is shutting down and starts no kernels")
        name, spec = self.spec(name)
        self.policy.check_user(user, spec.metadata or {}, name)
        total, mine = self.count_for(user)
        self.policy.check_limits(total, user, mine)
        timeout = self.policy.launch_timeout_for(request_env)
        warm = self.pools.take(name, self.policy.kernel_env(request_env, user, "", timeout))
        if warm is None and self.policy.max_kernels and total + self.pools.count >= self.policy.max_kernels:
            await self.pools.make_room()
        kernel_id = warm.kernel_id if warm is not None else str(uuid.uuid4())
        env = self.policy.kernel_env(request_env, user, kernel_id, timeout)
        cwd = request_env.get("KERNEL_WORKING_DIR")
        kernel = ManagedKernel(kernel_id, name, user, warm.km if warm is not None else self.manager(kernel_id, name))
        self._starting[kernel_id] = kernel
        started = time.monotonic()
        provisioner = metrics.provisioner_name(spec)
        try:
            await self._launch(kernel, env, cwd if cwd and os.path.isdir(cwd) else None, timeout)
            await self._keep_record(kernel)
        except Exception as exc:
            reason = "not_ready" if self._stopping else metrics.start_failure_reason(exc)
            metrics.START_FAILURES.labels(provisioner, reason).inc()
            if self._stopping:
                raise NotReadyError("the gateway shut down while the kernel was starting", kernel_id=kernel_id) from exc
            raise
        finally:
            del self._starting[kernel_id]
            if warm is not None:
                self.pools.refill()
        self.kernels[kernel_id] = kernel
        metrics.STARTS.labels(provisioner).inc()
        kernel.log.info("started %skernel %s for user %r in %.3fs", "warm " if warm is not None else "", name, user,
                        time.monotonic() - started)
        return kernel

    def manager(self, kernel_id: str, name: str) -> AsyncKernelManager:
        """A kernel manager for kernel ``kernel_id`` of kernelspec ``name``, not started."""
        cls = self.kernel_manager_class
        extra: dict[str, Any] = {}
        shared = self.store is not None and self.store.shared
        if not shared and issubclass(cls, AsyncIOLoopKernelManager) and not any(
                "restarter_class" in self.config.get(c.__name__, {}) for c in cls.mro()):
            # woken by the process's exit, not a 3 s timer per kernel (remote kernels are still polled). Not with
            # replicas: a kernel another replica restarts must not be seen dead before the store says so
            extra["restarter_class"] = ProcessExitRestarter
        km = cls(
            parent=self,
            kernel_id=kernel_id,
            kernel_name=name,
            kernel_spec_manager=self.kernel_spec_manager,
            connection_file=self._connection_files.path_for(kernel_id),
            shutdown_wait_time=self.shutdown_timeout,
            context=self._context,  # one ZMQ context (and I/O thread) for all kernels, not one each
            log=ManagerLog(log, {"kernel_id": kernel_id}),
            **extra,
        )
        return km

    def _open_bridge(self, kernel: ManagedKernel) -> KernelBridge:
        kernel.bridge = KernelBridge(
            kernel.kernel_id,
            kernel.km.get_connection_info(session=False),
            self._context,
            kernel.on_iopub,
            self.bridge_limits,
        )
        kernel.bridge.start()
        return kernel.bridge

    def _watch_restarts(self, kernel: ManagedKernel) -> None:
        kernel.km.add_restart_callback(lambda: self._on_auto_restart(kernel), "restart")
        kernel.km.add_restart_callback(lambda: self._on_dead(kernel), "dead")

    async def _launch(self, kernel: ManagedKernel, env: dict[str, str], cwd: str | None, timeout: float) -> None:
        # the provisioner enforces the timeout with its own diagnostics; ours is the backstop
        started = time.monotonic()
        deadline = started + timeout + LAUNCH_GRACE
        km = kernel.km
        # a kept kernel must not end with this process (jupyter_client's parent-death watch, a shared session)
        independent = self.on_stop == "keep"
        try:
            await asyncio.wait_for(km.start_kernel(env=env, cwd=cwd, independent=independent),
                                   timeout + LAUNCH_GRACE)
            metrics.start_phase_ended(kernel, "launch", started)
            await self._open_bridge(kernel).wait_ready(max(deadline - time.monotonic(), 0.1), km.is_alive)
            metrics.start_phase_ended(kernel, "ready", started)
        except (asyncio.TimeoutError, TimeoutError):
            await self._discard(kernel)
            raise LaunchTimeoutError(
                f"kernel {kernel.name!r} did not become ready within {timeout:g}s", kernel_id=kernel.kernel_id
            ) from None
        except ProvisionerError:
            await self._discard(kernel)
            raise
        except Exception as exc:  # the provisioner or the kernel command failed; report the reason
            detail = await _diagnostics(km)
            await self._discard(kernel)
            raise LaunchError(f"kernel {kernel.name!r} failed to start: {exc}" + (f"; {detail}" if detail else ""),
                              kernel_id=kernel.kernel_id) from exc
        kernel.execution_state = "idle"
        self._watch_restarts(kernel)

    async def _write_record(self, kernel: ManagedKernel) -> None:
        """Write (or rewrite) the kernel's record as it runs now; :class:`StoreUnavailable` when it cannot."""
        if self.store is not None:
            keeper = self.replicas.replica_id if self.replicas is not None and kernel.owned else ""
            kernel.record = await kernel_record(kernel, keeper)
            await self.store.put(kernel.record)

    async def _keep_record(self, kernel: ManagedKernel) -> None:
        """Write a new kernel's record; a start whose record cannot be written is undone and answered 503."""
        try:
            await self._write_record(kernel)
        except StoreUnavailable as exc:
            await self._discard(kernel)
            raise NotReadyError(f"the kernel was stopped again because its record could not be kept: {exc}",
                                kernel_id=kernel.kernel_id) from None

    async def _mark_restarting(self, kernel: ManagedKernel) -> None:
        """With replicas: record that this replica restarts the kernel, so none takes it for dead meanwhile."""
        if self.replicas is None or kernel.record is None:
            return
        kernel.record = dataclasses.replace(kernel.record, keeper=self.replicas.replica_id, restarting_since=time.time())
        try:
            await self.store.put(kernel.record)
        except StoreUnavailable as exc:
            kernel.log.warning("could not mark the kernel as restarting in the store: %s", exc)

    async def update_record(self, kernel: ManagedKernel) -> None:
        """Rewrite the record after a restart (new ports, new launcher); the kernel runs on if that fails."""
        try:
            await self._write_record(kernel)
        except StoreUnavailable as exc:
            kernel.log.warning("the record of the restarted kernel was not updated (a later gateway may not reach "
                               "it): %s", exc)

    async def _discard(self, kernel: ManagedKernel) -> None:
        """Kill whatever a failed start left running."""
        if kernel.bridge:
            kernel.bridge.close()
        try:
            if kernel.km.has_kernel:
                await kernel.km.shutdown_kernel(now=True)
            else:
                await kernel.km.cleanup_resources()
        except Exception:  # best effort: the start already failed, and that is what we report
            kernel.log.warning("cleanup after a failed start did not finish", exc_info=True)

    def _on_auto_restart(self, kernel: ManagedKernel) -> None:
        """The restarter found the kernel dead and is about to start it again (it calls us first)."""
        kernel.log.warning("kernel died; restarting it automatically")
        metrics.RESTARTS.labels(metrics.kernel_provisioner(kernel), "automatic").inc()
        kernel.execution_state = "restarting"
        if kernel.bridge:
            kernel.bridge.broadcast_status("restarting")
        asyncio.ensure_future(self._follow_auto_restart(kernel, kernel.km.ready))

    async def _follow_auto_restart(self, kernel: ManagedKernel, previous: Any) -> None:
        """Once the restarter's new start finishes, point the bridge at the kernel's new ports."""
        km = kernel.km
        deadline = time.monotonic() + self.policy.launch_timeout

        async def restarted() -> bool:
            # the restarter shuts the dead kernel down (shutting_down), then starts it (a new pending `ready`)
            return km.ready is not previous and km.ready.done() and not km.shutting_down and await km.is_alive()

        try:
            while not await restarted():
                if time.monotonic() > deadline or kernel.kernel_id not in self.kernels:
                    raise TimeoutError("the kernel did not come back")
                await asyncio.sleep(0.1)
            if kernel.bridge:
                kernel.bridge.retarget(km.get_connection_info(session=False))
                await kernel.bridge.wait_ready(max(deadline - time.monotonic(), 1.0), km.is_alive)
            kernel.execution_state = "idle"
            kernel.log.info("kernel is back after the automatic restart")
            await self.update_record(kernel)
        except Exception as exc:  # the restarter reports a final failure through the 'dead' callback
            kernel.log.warning("automatic restart did not complete: %s", str(exc) or type(exc).__name__)

    def _on_dead(self, kernel: ManagedKernel) -> None:
        kernel.log.error("kernel died and could not be restarted")
        kernel.execution_state = "dead"
        if kernel.bridge:
            kernel.bridge.broadcast_status("dead")

    async def interrupt(self, kernel_id: str) -> None:
        """Interrupt the kernel (signal or interrupt_request, as its spec says)."""
        kernel = await self.find(kernel_id)
        kernel.log.info("interrupting")
        await kernel.km.interrupt_kernel()

    async def restart(self, kernel_id: str) -> ManagedKernel:
        """Restart under the same id and wait until it answers again."""
        kernel = await self.find(kernel_id)
        if kernel.lock.locked():
            raise ConflictError(f"kernel {kernel_id} is already restarting or shutting down", kernel_id=kernel_id)
        async with kernel.lock:
            kernel.log.info("restarting")
            metrics.RESTARTS.labels(metrics.kernel_provisioner(kernel), "requested").inc()
            # no synthetic 'restarting' status here: JupyterLab takes it for a crash; the kernel itself says
            # shutdown_reply and then starting/busy/idle, as clients expect from a requested restart
            kernel.execution_state = "restarting"
            await self._mark_restarting(kernel)
            try:
                await kernel.km.restart_kernel(now=False)
                assert kernel.bridge is not None
                kernel.bridge.retarget(kernel.km.get_connection_info(session=False))
                await kernel.bridge.wait_ready(self.policy.launch_timeout, kernel.km.is_alive)
            except (asyncio.TimeoutError, TimeoutError):
                kernel.execution_state = "dead"
                raise LaunchTimeoutError(f"kernel did not come back within {self.policy.launch_timeout:g}s after restart",
                                         kernel_id=kernel_id) from None
            except ProvisionerError:
                kernel.execution_state = "dead"
                raise
            except Exception as exc:  # the relaunch failed; the client gets the reason
                kernel.execution_state = "dead"
                raise LaunchError(f"restart failed: {exc}", kernel_id=kernel_id) from exc
            kernel.execution_state = "idle"
            self.make_keeper(kernel)  # restarted here: its keeper now (the others let their copies go)
            await self.update_record(kernel)
            return kernel

    async def shutdown(self, kernel_id: str, now: bool = False) -> None:
        """Shut the kernel down (shutdown_request, then kill after ``shutdown_timeout``) and forget it."""
        kernel = await self._as_recorded(await self.find(kernel_id))
        async with kernel.lock:
            if kernel_id not in self.kernels:
                return
            kernel.log.info("shutting down")
            del self.kernels[kernel_id]
            metrics.SHUTDOWNS.labels(metrics.kernel_provisioner(kernel)).inc()
            try:
                await kernel.km.shutdown_kernel(now=now)
            finally:
                if kernel.bridge:
                    kernel.bridge.close()
            await self._forget_record(kernel)

    async def _as_recorded(self, kernel: ManagedKernel) -> ManagedKernel:
        """With replicas: the kernel as its record says it runs now. Another replica may have restarted it since our
        last store read; ending the process we knew (gone) would leave the new one running."""
        if self.replicas is None or self.store is None or kernel.record is None:
            return kernel
        try:
            record = await self.store.get(kernel.kernel_id)
        except StoreUnavailable:
            return kernel  # the sync catches up later; end what we know
        if record is None or record == kernel.record:
            return kernel
        await self.follow(kernel, record)
        return self.kernels.get(kernel.kernel_id) or await self.find(kernel.kernel_id)

    async def _forget_record(self, kernel: ManagedKernel) -> None:
        if self.store is None:
            return
        try:
            await self.store.remove(kernel.kernel_id)
        except StoreUnavailable as exc:  # the next gateway finds the kernel gone and removes the record then
            kernel.log.warning("the record of the shut-down kernel stays in the store for now: %s", exc)
