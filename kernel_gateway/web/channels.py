"""Handler for ``/api/kernels/{id}/channels``: the kernel websocket (legacy JSON/binary and v1)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid
from typing import Any
from urllib.parse import urlparse

from tornado import web, websocket
from tornado.iostream import StreamClosedError

from .. import metrics
from ..bridge import V1_SUBPROTOCOL, FrameError, client_message_to_parts, to_legacy_frame, to_v1_frame
from ..bridge.session import ChannelSession
from ..bridge.frames import ws_header
from .base import GatewayHandlerMixin
from .kernels import KERNEL_ID

log = logging.getLogger("kernel_gateway.web.channels")

#: Bytes handed to a client's socket and not yet sent, beyond which nothing more is read from the
#: kernel's backlog for it: the backlog holds one copy of the output for every client, so one that
#: stalls costs at most this, and is let go (close code 1013) once the backlog's bound is reached.
WINDOW = 1024 * 1024

#: Bytes per write: small frames are joined up to it; larger payloads are written in slices of it that
#: point into the backlog's copy (every client shares it), and each completed write shows progress.
CHUNK = 256 * 1024

#: Seconds a client may hold more than ``WINDOW`` unsent bytes (one large message) without any write
#: completing before it is let go (1013), like a client that falls behind the backlog's bound.
STALL_TIMEOUT = 10.0

_ENCODERS = {
    "v1": lambda msg: (to_v1_frame(msg), True),
    "binary": lambda msg: to_legacy_frame(msg, True),
    "text": lambda msg: to_legacy_frame(msg, False),
}


class KernelChannelsHandler(GatewayHandlerMixin, websocket.WebSocketHandler):
    """One client connection to a kernel's channels, attached to the bridge session ``session_id``."""

    session: ChannelSession | None = None
    _binary_buffers = True
    _pump_handle: asyncio.Handle | None = None
    _stall_timer: asyncio.TimerHandle | None = None
    _unsent = 0  # bytes handed to the stream and not yet sent
    _unsent_msgs = 0  # messages in those bytes (lost if the connection is let go)
    _progress = 0.0  # loop time of the last completed write

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if not self.settings["allow_unauthenticated_channels"]:
            self.authenticate()
        elif not self.host_allowed():
            raise web.HTTPError(403, "Host %r is not one of this gateway's names; add it to allowed_hosts "
                                "(GATEWAY_ALLOWED_HOSTS) if clients reach the gateway by that name",
                                self.request.host[:100], reason="Forbidden")
        self.kernel = await self.settings["registry"].find(kwargs["kernel_id"])
        if self.kernel.bridge is None:
            raise web.HTTPError(409, "kernel %s is not ready", self.kernel.kernel_id, reason="Conflict")
        await super().get(*args, **kwargs)

    def host_allowed(self) -> bool:
        """Whether the Host header names this gateway (a page from a DNS-rebound name must not get in).

        IP addresses cannot be rebound, so any is accepted; names must be localhost or allowed by
        ``allowed_hosts`` ('*' allows any).
        """
        host = self.request.host.lower()
        if host.startswith("["):  # [IPv6]:port
            name = host[1:].partition("]")[0]
        elif host.count(":") == 1:
            name = host.partition(":")[0]
        else:
            name = host
        allowed = self.settings.get("allowed_hosts", [])
        if "*" in allowed or name in ("localhost", "localhost.localdomain") or name.endswith(".localhost"):
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name in allowed

    def check_origin(self, origin: str) -> bool:
        allowed = self.settings.get("allow_origin", "")
        if allowed == "*" or origin in [o.strip() for o in allowed.split(",") if o.strip()]:
            return True
        return urlparse(origin).netloc.lower() == self.request.host.lower()

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return V1_SUBPROTOCOL if V1_SUBPROTOCOL in subprotocols else None

    def get_compression_options(self) -> None:
        return None

    @property
    def protocol(self) -> str:
        return self.selected_subprotocol or "legacy"

    async def open(self, kernel_id: str) -> None:
        self.set_nodelay(True)  # replies are small and latency-bound: never wait for Nagle
        mode = self.settings["legacy_binary_frames"]
        user_agent = self.request.headers.get("User-Agent", "")
        # jupyter_server's gateway relay decodes every frame as UTF-8 and stops for good on a binary one
        self._binary_buffers = mode == "always" or (mode == "auto" and not user_agent.startswith("Tornado/"))
        self._encoding = "v1" if self.protocol == V1_SUBPROTOCOL else "binary" if self._binary_buffers else "text"
        client_session = self.get_query_argument("session_id", "")
        session_id = client_session or uuid.uuid4().hex
        self.log = logging.LoggerAdapter(log, {"kernel_id": kernel_id, "session_id": session_id})
        bridge = self.kernel.bridge
        self.session = bridge.session(session_id, retain=bool(client_session))
        notice = self.session.attach(self)
        metrics.WEBSOCKETS_OPENED.labels(self._encoding).inc()
        self.log.info("client connected (%s protocol, %d buffered messages to replay)", self.protocol,
                      bridge.backlog.pending(self.session))
        if notice is not None:
            self._write(self._frames([_ENCODERS[self._encoding](notice)]), 1)
        self.wake()

    def wake(self) -> None:
        """New messages for this client: read them from the backlog soon, if the socket has room."""
        if self._pump_handle is None and self._unsent < WINDOW:
            self._pump_handle = asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        """Move messages from the backlog to the socket until ``WINDOW`` bytes are waiting to be sent."""
        self._pump_handle = None
        session, connection = self.session, self.ws_connection
        while session is not None and session.sink is self and connection is not None and not connection.is_closing():
            if self._unsent >= WINDOW:
                return
            payloads = session.read(WINDOW - self._unsent, self._unsent == 0, self._encoding, _ENCODERS[self._encoding])
            if not payloads:
                return
            self._write(self._frames(payloads), len(payloads))

    @staticmethod
    def _frames(payloads: list[tuple[bytes, bool]]) -> list[bytes | memoryview]:
        """Websocket frames around ``payloads`` in writes of about ``CHUNK`` bytes (large payloads not copied)."""
        chunks: list[bytes | memoryview] = []
        small: list[bytes] = []
        size = 0
        for payload, binary in payloads:
            head = ws_header(len(payload), binary)
            small.append(head)
            size += len(head) + len(payload)
            if len(payload) < CHUNK:
                small.append(payload)
                if size < CHUNK:
                    continue
            chunks.append(b"".join(small))
            small, size = [], 0
            if len(payload) >= CHUNK:
                view = memoryview(payload)
                chunks.extend(view[i : i + CHUNK] for i in range(0, len(payload), CHUNK))
        if small:
            chunks.append(b"".join(small))
        return chunks

    def _write(self, chunks: list[bytes | memoryview], messages: int) -> None:
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return
        loop = asyncio.get_running_loop()
        if self._unsent == 0:
            self._progress = loop.time()
        self._unsent_msgs += messages
        for index, chunk in enumerate(chunks):
            try:
                future = connection.stream.write(chunk)  # type: ignore[attr-defined]
            except StreamClosedError:
                return  # on_close detaches the session
            self._unsent += len(chunk)
            done = messages if index == len(chunks) - 1 else 0
            future.add_done_callback(lambda f, size=len(chunk), done=done: self._written(f, size, done))
        if self._unsent > WINDOW and self._stall_timer is None:
            self._stall_timer = loop.call_later(STALL_TIMEOUT, self._check_stall)

    def _written(self, future: asyncio.Future, size: int, messages: int) -> None:
        self._unsent -= size
        self._unsent_msgs -= messages
        self._progress = asyncio.get_running_loop().time()
        if not future.cancelled():
            future.exception()  # a closed stream is handled by on_close; mark the error as seen
        if self._unsent < WINDOW // 2:
            self.wake()

    def _check_stall(self) -> None:
        self._stall_timer = None
        connection, session = self.ws_connection, self.session
        if self._unsent <= WINDOW or connection is None or connection.is_closing() or session is None:
            return
        idle = asyncio.get_running_loop().time() - self._progress
        if idle < STALL_TIMEOUT:
            self._stall_timer = asyncio.get_running_loop().call_later(STALL_TIMEOUT - idle, self._check_stall)
            return
        session.detach(self)
        self.overrun(f"nothing read for {STALL_TIMEOUT:g}s: this client read too slowly; "
                     "reconnect with the same session_id to resume")

    def overrun(self, reason: str) -> None:
        """Let this client go: it read too slowly (its session stays resumable if named, and will be told
        how many messages it lost, those on their way to this socket included)."""
        self.log.warning("closing a client that read too slowly: %s", reason)
        metrics.SLOW_CLIENTS.inc()
        if self.session is not None and self._unsent_msgs:
            self.session.lose(self._unsent_msgs)
        self._unsent_msgs = 0
        self.close(1013, reason[:123])

    def end(self, reason: str) -> None:
        """Close this connection because the session moved on (taken over, kernel gone)."""
        self.log.info("closing client connection: %s", reason)
        self.close(1000, reason[:120])

    def on_message(self, message: str | bytes) -> None:
        if self.session is None:
            return
        try:
            channel, parts = client_message_to_parts(message, self.protocol)
        except FrameError as exc:
            self.log.warning("closing connection after a malformed frame: %s", exc)
            self.close(1007, f"malformed message: {exc}"[:120])
            return
        self.session.send(channel, parts)

    def on_close(self) -> None:
        session = self.session
        if session is None:
            return
        session.detach(self)  # an unnamed session is dropped, a named one kept for the client's return
        if session.sink is not None:
            self.log.info("client connection closed; a newer one holds the session")
        else:
            self.log.info("client disconnected%s", " (buffering output)" if session.retain else "")


default_handlers = [
    (rf"/api/kernels/{KERNEL_ID}/channels", KernelChannelsHandler),
]
