"""Kernels that outlive the gateway: the record kept for each kernel, and taking a kernel over from its record.

The registry writes a :class:`~kernel_gateway.store.KernelRecord` when a start succeeds (and after a restart)
and removes it on shutdown. A gateway that starts finds the records of kernels an earlier run kept, rebuilds
each kernel's jupyter_client manager around the provisioner state in it (``load_provisioner_info``, the hook
jupyter_client made for this), and checks the kernel over its heartbeat before serving it again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.manager import AsyncKernelManager
from jupyter_client.provisioning import KernelProvisionerFactory

from ..bridge.session import connect_to_kernel
from ..store import KernelRecord
from .managed import ManagedKernel

__all__ = ["adopt", "heartbeat", "kernel_record"]

#: what a kernel's later restarts need from its first start (KernelManager keeps them as ``_launch_args``)
_LAUNCH_ARGS = ("env", "cwd", "independent")


def _text_key(info: dict[str, Any]) -> dict[str, Any]:
    """``info`` for the record: its HMAC key as text, and no CurveZMQ secret key (a local kernel's is in its
    connection file; the gateway reaches the kernel with the public key and a key pair of its own)."""
    key = info.get("key")
    info = {name: value for name, value in info.items() if name != "curve_secretkey"}
    return {**info, "key": key.decode()} if isinstance(key, bytes) else info


async def kernel_record(kernel: ManagedKernel, keeper: str = "") -> KernelRecord:
    """The record of ``kernel`` as it runs now (its provisioner's state after the latest start or restart)."""
    km = kernel.km
    assert km.provisioner is not None
    info = await km.provisioner.get_provisioner_info()
    info.pop("kernel_id", None)
    info.pop("connection_info", None)  # kept once, below, with its key as text
    launch = {name: value for name, value in getattr(km, "_launch_args", {}).items() if name in _LAUNCH_ARGS}
    return KernelRecord(
        kernel_id=kernel.kernel_id,
        kernel_name=kernel.name,
        user=kernel.user,
        created=kernel.created,
        provisioner_info=info,
        connection_info=_text_key(km.get_connection_info(session=False)),
        launch=launch,
        keeper=keeper,
    )


async def adopt(km: AsyncKernelManager, record: KernelRecord) -> None:
    """Make ``km`` manage the kernel of ``record`` as if it had started it: provisioner state, ports, key,
    the arguments its restarts use. Raises what the provisioner raises when it cannot take the kernel over."""
    km.kernel_id = record.kernel_id
    km.provisioner = KernelProvisionerFactory.instance(parent=km.parent).create_provisioner_instance(
        record.kernel_id, km.kernel_spec, parent=km)
    connection_info = dict(record.connection_info)
    await km.provisioner.load_provisioner_info(
        {**record.provisioner_info, "kernel_id": record.kernel_id, "connection_info": connection_info})
    km.load_connection_info(connection_info)
    km._launch_args = dict(record.launch)  # restart_kernel starts again with these
    km._attempted_start = True
    ready = asyncio.get_running_loop().create_future()
    ready.set_result(None)
    km._ready = ready


async def heartbeat(context: zmq.asyncio.Context, connection_info: dict[str, Any], timeout: float) -> bool:
    """Whether the kernel echoes on its heartbeat channel within ``timeout`` seconds.

    The heartbeat is answered by a thread of its own, so a kernel busy with a long cell still counts as alive
    (a ``kernel_info_request`` would wait behind the cell)."""
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        connect_to_kernel(sock, connection_info, "hb")
        await sock.send(b"gateway-reattach")
        return await asyncio.wait_for(sock.recv(), timeout) == b"gateway-reattach"
    except (asyncio.TimeoutError, zmq.ZMQError):
        return False
    finally:
        sock.close(linger=0)
