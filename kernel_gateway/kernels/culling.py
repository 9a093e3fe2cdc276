"""Culling: shut down kernels that have been idle too long."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from traitlets import Bool, Instance, Integer, TraitError, validate

from provisioners.envconfig import EnvConfigurable

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
            except Exception:  # a failed pass must not end culling for good
                log.exception("culling pass failed")

    def should_cull(self, kernel: Any, now: float) -> bool:
        """Whether ``kernel`` is past the idle timeout under the connected/busy rules."""
        if kernel.connections and not self.cull_connected:
            return False
        if kernel.execution_state == "busy":
            return self.cull_busy and now - (kernel.busy_since or now) > self.cull_idle_timeout
        return now - kernel.last_activity > self.cull_idle_timeout

    async def cull_once(self) -> None:
        now = time.time()
        for kernel in list(self.registry.kernels.values()):
            if self.should_cull(kernel, now):
                kernel.log.info("culling: idle for %.0fs (%d connections, %s)", now - kernel.last_activity,
                                kernel.connections, kernel.execution_state)
                await self.registry.shutdown(kernel.kernel_id)
