"""Where a kernel runs, in a few words for people (the operator page), from its provisioner's state.

The state is what ``get_provisioner_info()`` returns (also kept in the kernel store's records), so this module
needs no provisioner import: each backend leaves its own keys there. Only the keys named below are read; the
rest (connection key, launcher control key) never leaves this module.
"""

from __future__ import annotations

import logging
import socket
import weakref
from collections.abc import Mapping
from typing import Any

__all__ = ["describe_location", "kernel_location"]

log = logging.getLogger("kernel_gateway.kernels")

#: Container and service ids shown as Docker's own CLI shows them.
_SHORT_ID = 12
#: The provisioner whose ``object_id`` is a Swarm service rather than a container.
_SWARM = "docker-swarm-provisioner"


def describe_location(info: Mapping[str, Any], provisioner: str = "", gateway_host: str | None = None) -> str:
    """A short "where" for a kernel whose provisioner reported ``info``; ``provisioner`` is its entry-point name.

    Kubernetes: ``pod <namespace>/<name>``; YARN: ``YARN <application id> on <AM host>``; Docker:
    ``container <id>``, Swarm: ``service <id>``; SSH and other launcher-based kernels: ``pid <pid> on <host>``;
    local kernels: ``pid <pid> on <gateway_host>`` (default: this host's name). ``"unknown"`` when none applies
    (a start that has not got that far).
    """
    if info.get("pod_name"):
        namespace = info.get("pod_namespace")
        return f"pod {namespace}/{info['pod_name']}" if namespace else f"pod {info['pod_name']}"
    if info.get("app_id"):
        host = info.get("am_host")
        return f"YARN {info['app_id']}" + (f" on {host}" if host else "")
    if info.get("object_id"):
        kind = "service" if provisioner == _SWARM else "container"
        return f"{kind} {str(info['object_id'])[:_SHORT_ID]}"
    if info.get("host") and info.get("remote_pid"):  # SSH: the launcher's pid on the host it was started on
        return f"pid {info['remote_pid']} on {info['host']}"
    if info.get("hostname") and info.get("pid"):  # any launcher that reported where it runs
        return f"pid {info['pid']} on {info['hostname']}"
    if info.get("host"):
        return f"host {info['host']}"
    if info.get("pid"):
        return f"pid {info['pid']} on {gateway_host or socket.gethostname()}"
    return "unknown"


async def kernel_location(km: Any, provisioner: str, gateway_host: str | None = None) -> str:
    """:func:`describe_location` of a jupyter_client kernel manager's provisioner as it runs now.

    ``"starting"`` while the manager has no provisioner yet; ``"unknown"`` when the provisioner cannot say.
    """
    if getattr(km, "provisioner", None) is None:
        return "starting"
    ready = getattr(km, "ready", None)  # a new future for every (re)start: the place changes only then
    cached = _known.get(km)
    if cached is not None and cached[0] is ready:
        return cached[1]
    try:
        info = await km.provisioner.get_provisioner_info()
    except Exception as exc:  # a display courtesy: the page must not fail because one backend cannot answer
        log.debug("provisioner info unavailable: %s", exc)
        return "unknown"
    where = describe_location(info, provisioner, gateway_host)
    if ready is not None and ready.done():
        _known[km] = (ready, where)
    return where


#: Where each kernel manager's kernel runs, as found for its current start (a page refresh with 1,000 kernels
#: would otherwise ask 1,000 provisioners every two seconds).
_known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
