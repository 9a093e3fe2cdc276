"""One kernel as the registry holds it: its jupyter_client manager, websocket bridge, owner, activity."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from ..bridge import KernelBridge, KernelMessage
from ..bridge.channels import UNTRACKED_PARENTS

__all__ = ["ManagedKernel", "ManagerLog", "iso_utc"]

log = logging.getLogger("kernel_gateway.kernels")


class ManagerLog(logging.LoggerAdapter):
    """The log of a kernel's jupyter_client manager, tagged with the kernel id.

    jupyter_client logs every failed start with ``log.exception`` (a traceback of our own launch
    path); the registry reports the failure itself, in one line with the cause, so here it is a
    warning without the traceback.
    """

    def exception(self, msg: object, *args: Any, exc_info: Any = True, **kwargs: Any) -> None:
        self.warning("kernel manager: %s", msg, *args, **kwargs)


@functools.lru_cache(maxsize=8192)
def iso_utc(stamp: float) -> str:
    """Format like jupyter_server expects: ``%Y-%m-%dT%H:%M:%S.%fZ``.

    Cached: ``GET /api/kernels`` formats every kernel's last activity, which for idle kernels does not change
    (with 1,000 kernels the formatting was a third of the request's time)."""
    return datetime.fromtimestamp(stamp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ManagedKernel:
    """One kernel: its jupyter_client manager, websocket bridge, owner and activity."""

    def __init__(self, kernel_id: str, name: str, user: str, km: AsyncKernelManager,
                 created: float | None = None) -> None:
        self.kernel_id = kernel_id
        self.name = name
        self.user = user
        self.created = time.time() if created is None else created
        self.owned = True  # started (or re-attached at start-up) here: this gateway restarts it when it dies
        self.record: Any = None  # the KernelRecord last written or read for it
        self.restart_limit: int | None = None  # the restarter's own limit while another replica keeps the kernel
        self.held_since = time.monotonic()
        self.km = km
        self.bridge: KernelBridge | None = None
        self.execution_state = "starting"
        self.busy_since: float | None = None
        self.log = logging.LoggerAdapter(log, {"kernel_id": kernel_id})
        self.lock = asyncio.Lock()  # one lifecycle action (restart, shutdown) at a time

    @property
    def last_activity(self) -> float:
        return self.bridge.last_activity if self.bridge else time.time()

    @property
    def connections(self) -> int:
        return self.bridge.connections if self.bridge else 0

    def model(self) -> dict[str, Any]:
        """The kernel model as Jupyter clients parse it."""
        return {
            "id": self.kernel_id,
            "name": self.name,
            "last_activity": iso_utc(self.last_activity),
            "execution_state": self.execution_state,
            "connections": self.connections,
        }

    def on_iopub(self, msg: KernelMessage) -> None:
        """Track ``execution_state`` from status messages about user requests."""
        if msg.msg_type != "status":
            return
        try:
            parent_type = json.loads(msg.parts[1]).get("msg_type", "")
            state = json.loads(msg.parts[3]).get("execution_state", "")
        except (ValueError, AttributeError):
            return
        if parent_type in UNTRACKED_PARENTS and self.execution_state != "starting":
            return
        if state == "starting":
            return
        if state in ("idle", "busy"):
            self.execution_state = state
            self.busy_since = time.time() if state == "busy" else None
