"""Culling: shut down kernels that have been idle too long.

With replicas (a shared kernel store) one replica culls at a time: the one holding the store's ``culler`` lease,
renewed every pass. It culls every kernel of the store, held here or not, by the latest activity any replica
recorded (:mod:`.replicas` writes it in batches).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from traitlets import Bool, Instance, Integer, TraitError, validate

from provisioners.envconfig import EnvConfigurable

from .. import metrics
from ..store import StoreUnavailable
from .registry import KernelRegistry

__all__ = ["KernelCuller"]

log = logging.getLogger("kernel_gateway.culling")


class KernelCuller(EnvConfigurable):
    """Every ``cull_interval`` seconds, shuts down kernels idle for more than ``cull_idle_timeout``."""

    cull_idle_timeout = Integer(
        0,
        config=True,
        help="Seconds without activity after which a kernel is shut down; 0 or less disables culling.",
    ).tag(env="GATEWAY_CULL_IDLE_TIMEOUT")
    cull_interval = Integer(
        300,
        config=True,
        help="Seconds between culling passes.",
    ).tag(env="GATEWAY_CULL_INTERVAL")
    cull_connected = Bool(
        False,
        config=True,
        help="Also cull idle kernels that have a client connected.",
    ).tag(env="GATEWAY_CULL_CONNECTED")
    cull_busy = Bool(
        False,
        config=True,
        help="Also cull kernels that have been busy for longer than the idle timeout.",
    ).tag(env="GATEWAY_CULL_BUSY")

    registry = Instance(KernelRegistry)

    _task: asyncio.Task | None = None
    _leading = False  # whether this replica held the culler lease at the last pass

    @validate("cull_interval")
    def _positive_interval(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] <= 0:
            raise TraitError(f"cull_interval must be a positive number of seconds, not {proposal['value']}")
        return proposal["value"]

    async def start(self) -> None:
        """Start the periodic pass if culling is enabled. Called by the app."""
        if self.cull_idle_timeout > 0:
            log.info("culling kernels idle for %ss, checking every %ss", self.cull_idle_timeout, self.cull_interval)
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.cull_interval)
            try:
                await self.cull_once()
            except StoreUnavailable as exc:
                log.warning("culling pass skipped: %s", exc)
            except Exception:  # a failed pass must not end culling for good
                log.exception("culling pass failed")

    def should_cull(self, kernel: Any, now: float, last_activity: float | None = None) -> bool:
        """Whether ``kernel`` is past the idle timeout under the connected/busy rules (``last_activity``: the
        latest any replica saw, when known)."""
        if kernel.connections and not self.cull_connected:
            return False
        if kernel.execution_state == "busy":
            return self.cull_busy and now - (kernel.busy_since or now) > self.cull_idle_timeout
        return now - max(kernel.last_activity, last_activity or 0.0) > self.cull_idle_timeout

    async def cull_once(self) -> None:
        registry, replicas = self.registry, self.registry.replicas
        shared: dict[str, float] = {}
        if replicas is not None:
            leading = await registry.store.take_lease("culler", replicas.replica_id, 2 * self.cull_interval + 10)
            if leading != self._leading:
                log.info("%s the culling for the replicas", "this replica does" if leading else "another replica does")
                self._leading = leading
            if not leading:
                return
            shared = await registry.store.activity()
        now = time.time()
        for kernel in list(registry.kernels.values()):
            last = shared.get(kernel.kernel_id)
            if self.should_cull(kernel, now, last):
                kernel.log.info("culling: idle for %.0fs (%d connections, %s)",
                                now - max(kernel.last_activity, last or 0.0), kernel.connections, kernel.execution_state)
                metrics.CULLS.inc()
                await registry.shutdown(kernel.kernel_id)
        for record in list(replicas.peers.values()) if replicas is not None else ():
            idle = now - shared.get(record.kernel_id, record.created)
            if idle > self.cull_idle_timeout and record.kernel_id not in registry.kernels:
                log.info("culling kernel %s held by another replica: idle for %.0fs", record.kernel_id, idle,
                         extra={"kernel_id": record.kernel_id})
                if await registry.reattach(record):  # taken over to be shut down; one found dead is cleaned up
                    metrics.CULLS.inc()
                    await registry.shutdown(record.kernel_id)
