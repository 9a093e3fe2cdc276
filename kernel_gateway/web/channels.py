"""Handler for ``/api/kernels/{id}/channels``: the kernel websocket (legacy JSON/binary and v1)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any
from urllib.parse import urlparse

from tornado import web, websocket
from tornado.iostream import StreamClosedError

from ..bridge import V1_SUBPROTOCOL, FrameError, KernelMessage, client_message_to_parts, to_legacy_frame, to_v1_frame
from ..bridge.frames import ws_frame
from ..bridge.channels import ChannelSession
from .base import GatewayHandlerMixin
from .kernels import KERNEL_ID

log = logging.getLogger("kernel_gateway.web.channels")

#: Bytes a client may leave unread before it is disconnected (its session keeps buffering for its
#: return): one stalled client must neither hold up the others nor grow the gateway without bound.
SLOW_CLIENT_LIMIT = 64 * 1024 * 1024


class KernelChannelsHandler(GatewayHandlerMixin, websocket.WebSocketHandler):
    """One client connection to a kernel's channels, attached to the bridge session ``session_id``."""

    session: ChannelSession | None = None
    _binary_buffers = True
    _flush_handle: asyncio.Handle | None = None
    _unsent = 0  # bytes handed to the stream and not yet sent

    def initialize(self) -> None:
        self._pending: list[tuple[KernelMessage, bytes]] = []

    async def get(self, *args: Any, **kwargs: Any) -> None:
        if not self.settings["allow_unauthenticated_channels"]:
            self.authenticate()
        self.kernel = self.settings["registry"].get(kwargs["kernel_id"])
        if self.kernel.bridge is None:
            raise web.HTTPError(409, "kernel %s is not ready", self.kernel.kernel_id, reason="Conflict")
        await super().get(*args, **kwargs)

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
        client_session = self.get_query_argument("session_id", "")
        session_id = client_session or uuid.uuid4().hex
        self.log = logging.LoggerAdapter(log, {"kernel_id": kernel_id, "session_id": session_id})
        bridge = self.kernel.bridge
        self.session = bridge.session(session_id, retain=bool(client_session))
        replay = self.session.attach(self)
        self.log.info("client connected (%s protocol, %d buffered messages to replay)", self.protocol, len(replay))
        for msg in replay:  # queued in one go, so live output cannot overtake the replay
            self._enqueue(msg)

    def _enqueue(self, msg: KernelMessage) -> None:
        if self.protocol == V1_SUBPROTOCOL:
            frame = ws_frame(to_v1_frame(msg), True)
        else:
            frame = ws_frame(*to_legacy_frame(msg, self._binary_buffers))
        self._pending.append((msg, frame))
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def deliver(self, msg: KernelMessage) -> None:
        """Queue one kernel message for this client; a client too far behind is let go, not waited for."""
        if self._unsent > SLOW_CLIENT_LIMIT and self.session is not None:
            self.log.warning("client left %d bytes unread; disconnecting it, its session keeps buffering", self._unsent)
            session = self.session
            session.detach(self)
            session.keep(msg)
            self.close(1013, "too much unread output; reconnect with the same session_id to resume")
            return
        self._enqueue(msg)

    def _flush(self) -> None:
        """Write every frame queued in this loop iteration with one send: floods cost a syscall per batch."""
        self._flush_handle = None
        pending, self._pending = self._pending, []
        connection = self.ws_connection
        try:
            if connection is None or connection.is_closing():
                raise StreamClosedError()
            data = b"".join(frame for _, frame in pending)
            future = connection.stream.write(data)  # type: ignore[attr-defined]
        except StreamClosedError:
            if self.session is not None:  # keep the messages for the client's return
                self.session.detach(self)
                for msg, _ in pending:
                    self.session.keep(msg)
            return
        self._unsent += len(data)
        future.add_done_callback(lambda f, size=len(data): self._written(f, size))

    def _written(self, future: asyncio.Future, size: int) -> None:
        self._unsent -= size
        if not future.cancelled():
            future.exception()  # a closed stream is handled by on_close; mark the error as seen

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
        session.detach(self)
        if not session.retain and session.sink is None and self.kernel.bridge is not None:
            self.kernel.bridge.drop_session(session.session_id)
        if session.sink is not None:
            self.log.info("client connection closed; a newer one holds the session")
        else:
            self.log.info("client disconnected%s", " (buffering output)" if session.retain else "")


default_handlers = [
    (rf"/api/kernels/{KERNEL_ID}/channels", KernelChannelsHandler),
]
