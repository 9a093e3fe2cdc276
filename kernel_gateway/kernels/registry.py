"""The kernel registry: start, restart, interrupt and shut down kernels; per-user accounting.

Each kernel is a jupyter_client ``AsyncKernelManager`` whose provisioner the kernelspec picks, so
the registry never knows where a kernel runs. It raises the errors of ``kernel_gateway.errors``
and ``provisioners.errors``; it knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from typing import Any

import zmq.asyncio
from jupyter_client.ioloop import AsyncIOLoopKernelManager
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from traitlets import Float, Instance, Integer, TraitError, Type, Unicode, default, validate

from provisioners.envconfig import EnvConfigurable
from provisioners.errors import LaunchError, LaunchTimeoutError, ProvisionerError

from ..bridge import BridgeLimits, KernelBridge
from ..errors import ConflictError, NotReadyError, UnknownKernelError, UnknownKernelSpecError
from ..policy import GatewayPolicy
from ._connection_files import ConnectionFiles
from .managed import ManagedKernel, ManagerLog

__all__ = ["KernelRegistry", "ManagedKernel"]

log = logging.getLogger("kernel_gateway.kernels")

#: Seconds past the launch timeout before the registry gives up on a provisioner that did not.
LAUNCH_GRACE = 5.0


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
        AsyncIOLoopKernelManager,
        klass=AsyncKernelManager,
        config=True,
        help="The jupyter_client kernel manager class used for every kernel.",
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

    async def start(self) -> None:
        """Open the ZMQ context and the task that expires detached sessions. Called by the app.

        Also removes the connection files a killed gateway left in the runtime dir (see ``_connection_files``).
        """
        os.makedirs(jupyter_runtime_dir(), mode=0o700, exist_ok=True)
        self._connection_files.open()
        await self._connection_files.sweep()
        self._context = zmq.asyncio.Context()
        self._expiry = asyncio.create_task(self._expire_sessions())

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
        await asyncio.gather(*(self._discard(k) for k in list(self._starting.values())), return_exceptions=True)
        deadline = time.monotonic() + self.shutdown_timeout
        while self._starting and time.monotonic() < deadline:  # let abandoned starts answer their clients
            await asyncio.sleep(0.05)
        await asyncio.gather(*(self.shutdown(kid) for kid in list(self.kernels)), return_exceptions=True)
        if self._context is not None:
            self._context.destroy(linger=0)
        self._connection_files.close()

    # -- lookups -------------------------------------------------------------------------------
    def get(self, kernel_id: str) -> ManagedKernel:
        """Return the kernel ``kernel_id``; raise :class:`UnknownKernelError` if there is none."""
        kernel = self.kernels.get(kernel_id)
        if kernel is None:
            raise UnknownKernelError(f"Kernel does not exist: {kernel_id}", kernel_id=kernel_id)
        return kernel

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
        kernel_id = str(uuid.uuid4())
        env = self.policy.kernel_env(request_env, user, kernel_id, timeout)
        cwd = request_env.get("KERNEL_WORKING_DIR")
        km = self.kernel_manager_class(
            parent=self,
            kernel_name=name,
            kernel_spec_manager=self.kernel_spec_manager,
            connection_file=self._connection_files.path_for(kernel_id),
            shutdown_wait_time=self.shutdown_timeout,
            context=self._context,  # one ZMQ context (and I/O thread) for all kernels, not one each
            log=ManagerLog(log, {"kernel_id": kernel_id}),
        )
        kernel = ManagedKernel(kernel_id, name, user, km)
        self._starting[kernel_id] = kernel
        started = time.monotonic()
        try:
            await self._launch(kernel, env, cwd if cwd and os.path.isdir(cwd) else None, timeout)
        except Exception as exc:
            if self._stopping:
                raise NotReadyError("the gateway shut down while the kernel was starting", kernel_id=kernel_id) from exc
            raise
        finally:
            del self._starting[kernel_id]
        self.kernels[kernel_id] = kernel
        kernel.log.info("started kernel %s for user %r in %.2fs", name, user, time.monotonic() - started)
        return kernel

    async def _launch(self, kernel: ManagedKernel, env: dict[str, str], cwd: str | None, timeout: float) -> None:
        # the provisioner enforces the timeout with its own diagnostics; ours is the backstop
        deadline = time.monotonic() + timeout + LAUNCH_GRACE
        km = kernel.km
        try:
            await asyncio.wait_for(km.start_kernel(kernel_id=kernel.kernel_id, env=env, cwd=cwd), timeout + LAUNCH_GRACE)
            kernel.bridge = KernelBridge(
                kernel.kernel_id,
                km.get_connection_info(session=False),
                self._context,
                kernel.on_iopub,
                self.bridge_limits,
            )
            kernel.bridge.start()
            await kernel.bridge.wait_ready(max(deadline - time.monotonic(), 0.1), km.is_alive)
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
        km.add_restart_callback(lambda: self._on_auto_restart(kernel), "restart")
        km.add_restart_callback(lambda: self._on_dead(kernel), "dead")

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
        except Exception as exc:  # the restarter reports a final failure through the 'dead' callback
            kernel.log.warning("automatic restart did not complete: %s", str(exc) or type(exc).__name__)

    def _on_dead(self, kernel: ManagedKernel) -> None:
        kernel.log.error("kernel died and could not be restarted")
        kernel.execution_state = "dead"
        if kernel.bridge:
            kernel.bridge.broadcast_status("dead")

    async def interrupt(self, kernel_id: str) -> None:
        """Interrupt the kernel (signal or interrupt_request, as its spec says)."""
        kernel = self.get(kernel_id)
        kernel.log.info("interrupting")
        await kernel.km.interrupt_kernel()

    async def restart(self, kernel_id: str) -> ManagedKernel:
        """Restart under the same id and wait until it answers again."""
        kernel = self.get(kernel_id)
        if kernel.lock.locked():
            raise ConflictError(f"kernel {kernel_id} is already restarting or shutting down", kernel_id=kernel_id)
        async with kernel.lock:
            kernel.log.info("restarting")
            # no synthetic 'restarting' status here: JupyterLab takes it for a crash; the kernel itself says
            # shutdown_reply and then starting/busy/idle, as clients expect from a requested restart
            kernel.execution_state = "restarting"
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
            return kernel

    async def shutdown(self, kernel_id: str, now: bool = False) -> None:
        """Shut the kernel down (shutdown_request, then kill after ``shutdown_timeout``) and forget it."""
        kernel = self.get(kernel_id)
        async with kernel.lock:
            if kernel_id not in self.kernels:
                return
            kernel.log.info("shutting down")
            del self.kernels[kernel_id]
            try:
                await kernel.km.shutdown_kernel(now=now)
            finally:
                if kernel.bridge:
                    kernel.bridge.close()
