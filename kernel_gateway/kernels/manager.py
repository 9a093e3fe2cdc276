"""The jupyter_client kernel manager of every kernel: jupyter_client's, able to reach kernels encrypted with
CurveZMQ whose secret key it does not hold.

jupyter_client keeps a kernel's CurveZMQ key pair in the manager and connects with that same pair (both
ends share the connection file). A remote launcher reports only its kernel's public key, and a kernel
re-attached from the kernel store has only that too (secrets stay out of the store), so this manager
takes a public key alone and connects its own sockets (control channel: shutdown and message-mode
interrupts; heartbeat) with the gateway process's client key pair, like the bridge does.
"""

from __future__ import annotations

from typing import Any

import zmq
from jupyter_client.connect import channel_socket_types
from jupyter_client.ioloop import AsyncIOLoopKernelManager

from ..bridge.session import connect_to_kernel

__all__ = ["GatewayKernelManager"]


class GatewayKernelManager(AsyncIOLoopKernelManager):
    """``AsyncIOLoopKernelManager`` that also serves kernels of which it knows only the CurveZMQ public key."""

    #: tells remote provisioners they may ask for encryption (``provisioners.encryption.SERVER_KEY_ONLY``)
    connects_with_curve_server_key = True

    def load_connection_info(self, info: Any) -> None:
        """jupyter_client's, which takes the curve keys only as a pair; a lone ``curve_publickey`` (a remote
        or re-attached kernel) is taken too, and info without one leaves no stale key behind (a restart)."""
        super().load_connection_info(info)
        if "curve_secretkey" not in info:
            public = info.get("curve_publickey")
            self.curve_publickey = public.encode() if isinstance(public, str) else public or None
            self.curve_secretkey = None

    def get_connection_info(self, session: bool = False) -> dict[str, Any]:
        """jupyter_client's, with ``curve_publickey`` also when the secret key is not known here."""
        info = super().get_connection_info(session=session)
        if self.curve_publickey is not None and "curve_publickey" not in info:
            info["curve_publickey"] = self.curve_publickey.decode()
        return info

    def _create_connected_socket(self, channel: str, identity: bytes | None = None) -> zmq.Socket:
        """A socket connected to the kernel's ``channel``, as a CurveZMQ client with this process's key pair
        when the kernel is encrypted (jupyter_client's would need the kernel's secret key)."""
        sock = self.context.socket(channel_socket_types[channel])
        sock.linger = 1000
        if identity:
            sock.identity = identity
        connect_to_kernel(sock, self.get_connection_info(), channel)
        return sock
