"""Small, cheap kernel websocket client used by the benchmarks.

Speaks the two Jupyter kernel websocket protocols:

* ``legacy``: JSON text frames (``channel`` key added to the message dict);
* ``v1``: ``v1.kernel.websocket.jupyter.org`` binary frames
  (``uint64 LE n``, ``n x uint64 LE offsets``, channel, header, parent_header,
  metadata, content, buffers...).

The client is written to cost as little CPU per received message as possible, so
that the benchmark measures the server: messages are handled in tornado's
``on_message_callback`` (no queue, no task per message), for ``v1`` only the
header and parent header are decoded and the content only when it is needed
(``status`` and replies).

Outgoing requests are tracked by ``msg_id``; every incoming message whose
``parent_header.msg_id`` matches a pending request is fed to it.  A request is
finished when its shell reply arrived and, if asked for, the iopub ``idle`` status
with the same parent arrived too.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from datetime import datetime, timezone

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"

_unpack_n = struct.Struct("<Q").unpack_from
_json_loads = json.loads
_perf = time.perf_counter


class Pending:
    """One outstanding request: collects its reply, the idle status and counts stream messages."""

    __slots__ = ("msg_id", "need_idle", "reply", "reply_type", "t_reply", "t_idle", "streams",
                 "other_streams", "iopub", "future", "t_sent", "t_last")

    def __init__(self, msg_id: str, need_idle: bool, loop: asyncio.AbstractEventLoop):
        self.msg_id = msg_id
        self.need_idle = need_idle
        self.reply = None
        self.reply_type = None
        self.t_reply = None
        self.t_idle = None
        self.streams = 0  # stdout stream messages
        self.other_streams = 0  # stderr (e.g. a server's "rate exceeded" notice)
        self.iopub = 0
        self.future = loop.create_future()
        self.t_sent = 0.0
        self.t_last = 0.0  # time of the last iopub message for this request

    def _check(self):
        if self.t_reply is not None and (self.t_idle is not None or not self.need_idle):
            if not self.future.done():
                self.future.set_result(self)

    def feed(self, channel: str, msg_type: str, content_fn) -> None:
        if channel == "iopub":
            self.iopub += 1
            self.t_last = _perf()
            if msg_type == "stream":
                if content_fn().get("name") == "stdout":
                    self.streams += 1
                else:
                    self.other_streams += 1
            elif msg_type == "status":
                if content_fn().get("execution_state") == "idle":
                    self.t_idle = _perf()
                    self._check()
        elif msg_type.endswith("_reply"):
            self.reply = content_fn()
            self.reply_type = msg_type
            self.t_reply = _perf()
            self._check()

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class KernelWebSocket:
    """A websocket to ``/api/kernels/{id}/channels`` with request tracking."""

    def __init__(self, protocol: str = "legacy", session_id: str | None = None):
        if protocol not in ("legacy", "v1"):
            raise ValueError(protocol)
        self.protocol = protocol
        self.session_id = session_id or uuid.uuid4().hex
        self.conn = None
        self.pending: dict[str, Pending] = {}
        self.received = 0
        self.unmatched = 0
        self.closed = False
        self.selected_subprotocol = None
        self._loop = None

    # -- connection -------------------------------------------------------------------------
    async def connect(self, ws_base: str, kernel_id: str, headers: dict, timeout: float = 30.0):
        self._loop = asyncio.get_running_loop()
        url = f"{ws_base}/api/kernels/{kernel_id}/channels?session_id={self.session_id}"
        req = HTTPRequest(url, headers=dict(headers), connect_timeout=timeout, request_timeout=timeout)
        subprotocols = [V1_SUBPROTOCOL] if self.protocol == "v1" else None
        self.conn = await websocket_connect(
            req,
            subprotocols=subprotocols,
            on_message_callback=self._on_message_legacy if self.protocol == "legacy" else self._on_message_v1,
            max_message_size=512 * 1024 * 1024,
            ping_interval=None,
        )
        # tornado's HTTP client sets TCP_NODELAY for the request, but HTTP1Connection turns Nagle
        # back on once the (upgrade) request finished, and the websocket keeps that socket.
        try:
            self.conn.protocol.set_nodelay(True)
        except Exception:
            pass
        self.selected_subprotocol = self.conn.selected_subprotocol
        if self.protocol == "v1" and self.selected_subprotocol != V1_SUBPROTOCOL:
            self.conn.close()
            raise RuntimeError(f"server did not select {V1_SUBPROTOCOL!r} (selected {self.selected_subprotocol!r})")
        return self

    def nodelay(self) -> bool | None:
        """Whether TCP_NODELAY is set on the client socket (tornado sets it for its HTTP client)."""
        import socket

        try:
            sock = self.conn.protocol.stream.socket
            return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except Exception:
            return None

    def close(self):
        if self.conn is not None and not self.closed:
            self.conn.close()
        self.closed = True

    # -- sending ----------------------------------------------------------------------------
    def request(self, channel: str, msg_type: str, content: dict, need_idle: bool = True) -> Pending:
        msg_id = uuid.uuid4().hex
        header = {
            "msg_id": msg_id,
            "msg_type": msg_type,
            "session": self.session_id,
            "username": "bench",
            "version": "5.3",
            "date": datetime.now(timezone.utc).isoformat(),
        }
        p = Pending(msg_id, need_idle, self._loop)
        self.pending[msg_id] = p
        if self.protocol == "legacy":
            frame = json.dumps({"header": header, "parent_header": {}, "metadata": {}, "content": content,
                                "buffers": [], "channel": channel})
            p.t_sent = _perf()
            self.conn.write_message(frame, binary=False)
        else:
            parts = [json.dumps(header).encode(), b"{}", b"{}", json.dumps(content).encode()]
            ch = channel.encode()
            n = 2 + len(parts)
            offsets = [8 * (n + 1)]
            offsets.append(offsets[-1] + len(ch))
            for part in parts:
                offsets.append(offsets[-1] + len(part))
            frame = struct.pack(f"<{n + 1}Q", n, *offsets) + ch + b"".join(parts)
            p.t_sent = _perf()
            self.conn.write_message(frame, binary=True)
        return p

    def execute(self, code: str, need_idle: bool = True) -> Pending:
        return self.request("shell", "execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True}, need_idle=need_idle)

    def kernel_info(self, need_idle: bool = False) -> Pending:
        return self.request("shell", "kernel_info_request", {}, need_idle=need_idle)

    async def wait(self, p: Pending, timeout: float) -> Pending:
        try:
            return await asyncio.wait_for(p.future, timeout)
        finally:
            self.pending.pop(p.msg_id, None)

    async def settle(self, p: Pending, timeout: float, quiet: float) -> bool:
        """Wait for ``p`` to finish; True if it did.

        Gives up early (False) once the reply arrived and no iopub message for this
        request came for ``quiet`` seconds: the idle status was lost.  Never waits
        longer than ``timeout``.
        """
        deadline = _perf() + timeout
        try:
            while True:
                remaining = deadline - _perf()
                if remaining <= 0:
                    return False
                try:
                    await asyncio.wait_for(asyncio.shield(p.future), min(remaining, 0.5))
                    return True
                except asyncio.TimeoutError:
                    if p.t_reply is not None and _perf() - max(p.t_last, p.t_reply) > quiet:
                        return False
        finally:
            self.pending.pop(p.msg_id, None)

    # -- receiving --------------------------------------------------------------------------
    def _closed(self):
        self.closed = True
        exc = ConnectionError("websocket closed")
        for p in list(self.pending.values()):
            p.fail(exc)

    def _on_message_legacy(self, message):
        if message is None:
            return self._closed()
        self.received += 1
        if isinstance(message, bytes):  # legacy binary frame (message with buffers)
            nbufs = struct.unpack_from(">I", message, 0)[0]
            start = struct.unpack_from(">I", message, 4)[0]
            end = struct.unpack_from(">I", message, 8)[0] if nbufs > 1 else len(message)
            msg = _json_loads(message[start:end])
        else:
            msg = _json_loads(message)
        parent = msg.get("parent_header") or {}
        p = self.pending.get(parent.get("msg_id"))
        if p is None:
            self.unmatched += 1
            return None
        content = msg.get("content") or {}
        p.feed(msg.get("channel"), msg["header"]["msg_type"], lambda: content)
        return None

    def _on_message_v1(self, frame):
        if frame is None:
            return self._closed()
        self.received += 1
        n = _unpack_n(frame, 0)[0]
        o = struct.unpack_from(f"<{n}Q", frame, 8)
        parent = _json_loads(frame[o[2]:o[3]]) if o[3] - o[2] > 2 else {}
        p = self.pending.get(parent.get("msg_id"))
        if p is None:
            self.unmatched += 1
            return None
        channel = frame[o[0]:o[1]].decode()
        header = _json_loads(frame[o[1]:o[2]])
        p.feed(channel, header["msg_type"], lambda: _json_loads(frame[o[4]:o[5]]))
        return None
