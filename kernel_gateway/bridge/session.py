"""One client session of a kernel: its shell, control and stdin sockets and its place in the backlog.

A session owns shell, control and stdin sockets whose ZMQ identity is the session id, so replies
and ``input_request`` reach the client that asked. A session outlives its websocket: while no
socket is attached its cursor stays put (if the client named the session), so the next socket with
the same id resumes where it left off; a new socket with the same id takes the session over from
an old one.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio

from .. import metrics
from .backlog import Encoder
from .frames import DELIMITER, FrameError, KernelMessage, kernel_message_from_zmq, make_message_parts

if TYPE_CHECKING:
    from .channels import KernelBridge

__all__ = ["ChannelSession", "ChannelSink", "client_keys", "connect_to_kernel", "gateway_message", "read_batches",
           "zmq_address"]


#: Messages taken from a socket in one go before they are handed on (bounds one loop iteration).
BATCH_LIMIT = 500


async def read_batches(sock: zmq.asyncio.Socket):
    """Yield lists of multipart messages: wait for one, then take whatever else is already queued.

    Draining without awaiting each message keeps the per-message cost of an output flood low.
    """
    drain = zmq.Socket.shadow(sock.underlying)
    while True:
        batch = [await sock.recv_multipart()]
        while len(batch) < BATCH_LIMIT:
            try:
                batch.append(drain.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        yield batch


class ChannelSink(Protocol):
    """Where a session's messages go: a websocket connection, which reads them with :meth:`ChannelSession.read`."""

    def wake(self) -> None:
        """New messages are waiting; read them when the socket has room."""

    def end(self, reason: str) -> None:
        """The session moved on (taken over, kernel gone): close with ``reason``."""

    def overrun(self, reason: str) -> None:
        """The client fell too far behind and lost messages: close with ``reason`` so it reconnects."""


def zmq_address(info: dict[str, Any], channel: str) -> str:
    transport = info.get("transport", "tcp")
    ip = info.get("ip", "127.0.0.1")
    port = info[f"{channel}_port"]
    return f"{transport}://{ip}:{port}" if transport == "tcp" else f"{transport}://{ip}-{port}"


_client_keys: tuple[bytes, bytes] | None = None


def client_keys() -> tuple[bytes, bytes]:
    """This process's CurveZMQ client key pair (public, secret), made on first use and never kept anywhere: a
    kernel authenticates itself with its server key but accepts any client key pair, so every gateway process
    (and replica) can have its own."""
    global _client_keys
    if _client_keys is None:
        _client_keys = zmq.curve_keypair()
    return _client_keys


def connect_to_kernel(sock: zmq.Socket, info: dict[str, Any], channel: str) -> None:
    """Connect ``sock`` to the kernel's ``channel``; as a CurveZMQ client when the connection info has the
    kernel's public key (``curve_publickey``), so the channel is encrypted and only that kernel can answer."""
    server_key = info.get("curve_publickey")
    if server_key:
        public, secret = client_keys()
        sock.curve_serverkey = server_key.encode() if isinstance(server_key, str) else server_key
        sock.curve_publickey = public
        sock.curve_secretkey = secret
    sock.connect(zmq_address(info, channel))


#: Seconds shell messages wait for this session's stdin connection before they go anyway.
STDIN_WAIT = 5.0
#: Part of every session's ZMQ identity that is this process's own: a kernel's ROUTER ignores a second peer with an
#: identity it already knows, so a client that reconnects with its session_id through another gateway (a replica,
#: which still holds the session) must not present the same identity there.
_PROCESS_TAG = secrets.token_hex(6)


def zmq_identity(session_id: str) -> bytes:
    """The ZMQ identity of a session's sockets in this process: shared by its shell, control and stdin (the kernel
    answers stdin to the shell request's identity), bounded in length whatever the client's session_id."""
    return f"{hashlib.sha256(session_id.encode()).hexdigest()[:24]}-{_PROCESS_TAG}".encode()


class ChannelSession:
    """The shell/control/stdin sockets of one client session, and its place in the kernel's backlog."""

    def __init__(self, bridge: KernelBridge, session_id: str, retain: bool) -> None:
        self.bridge = bridge
        self.session_id = session_id
        self.retain = retain  # the client named this session, so it may come back for its output
        self.sink: ChannelSink | None = None
        self.detached_at: float | None = time.monotonic()
        self.cursor = bridge.backlog.end  # a new session sees output from now on
        self._dropped = 0
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._readers: list[asyncio.Task] = []
        self._held: list[list[Any]] | None = None  # shell messages waiting for the stdin connection
        self._monitor: zmq.asyncio.Socket | None = None  # events of the stdin socket, until it is connected

    @property
    def keeps_output(self) -> bool:
        """Whether the backlog keeps messages for this session (attached, or named and so resumable)."""
        return self.sink is not None or self.retain

    def open(self) -> None:
        identity = zmq_identity(self.session_id)
        self._held = []
        for channel in ("shell", "control", "stdin"):
            sock = self.bridge.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, identity)
            # a request sent just before its client leaves still reaches the kernel (up to a second in the
            # background after close), rather than being discarded with the session
            sock.setsockopt(zmq.LINGER, 1000)
            if channel == "stdin":
                self._monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
                self._readers.append(asyncio.create_task(self._release_when_connected(self._monitor)))
            connect_to_kernel(sock, self.bridge.connection_info, channel)
            self._sockets[channel] = sock
            self._readers.append(asyncio.create_task(self._read(channel, sock)))

    async def _release_when_connected(self, monitor: zmq.asyncio.Socket) -> None:
        """Send the held shell messages once the kernel's stdin socket knows this session.

        The kernel's stdin is a ROUTER, which drops messages for an identity it has not seen yet: an
        ``input_request`` answering a request that overtook our stdin connection would be lost, and
        the cell would wait for ever. On a busy machine that happened to 1 in 5 fresh connections.
        """
        try:
            await asyncio.wait_for(monitor.recv_multipart(), STDIN_WAIT)
        except asyncio.TimeoutError:  # a kernel that does not answer: requests go anyway, as without the wait
            self.bridge.log.info("session %s: stdin not connected after %gs", self.session_id, STDIN_WAIT)
        self._release()

    def _release(self) -> None:
        """Stop watching stdin and send the held shell messages."""
        monitor, self._monitor = self._monitor, None
        if monitor is not None:
            self._sockets["stdin"].disable_monitor()
            monitor.close(linger=0)
        held, self._held = self._held or [], None
        for frames in held:
            self._sockets["shell"].send_multipart(frames, copy=False)

    async def _read(self, channel: str, sock: zmq.asyncio.Socket) -> None:
        tally = metrics.relayed(channel, metrics.KERNEL_TO_CLIENT)
        async for batch in read_batches(sock):
            self.bridge.touch()
            tally.add_batch(batch)
            for frames in batch:
                try:
                    msg = kernel_message_from_zmq(channel, frames, self.bridge.signer)
                except FrameError as exc:
                    self.bridge.log.warning("dropped a %s message from the kernel: %s", channel, exc)
                    continue
                if channel == "shell" and msg.msg_type.endswith("_reply"):
                    self.bridge.request_done()
                self.bridge.backlog.append(msg, self.session_id)
            if self.sink is not None:
                self.sink.wake()

    def read(self, max_bytes: int, first: bool, key: str, encode: Encoder) -> list[tuple[bytes, bool]]:
        """The next messages for this session as websocket payloads (see :meth:`Backlog.read`); the sink
        calls it when its socket has room."""
        return self.bridge.backlog.read(self, max_bytes, first, key, encode)

    def lose(self, count: int) -> None:
        """Note ``count`` messages this session's client will not get, to tell it when it comes back."""
        self._dropped += count
        metrics.DROPPED.messages += count

    def skip(self, cursor: int, lost: int, what: str) -> None:
        """The backlog sheds: move on to ``cursor``, losing ``lost`` messages; an attached client is let go."""
        self.cursor = cursor
        if not lost:
            return
        self.lose(lost)
        sink = self.sink
        if sink is not None:
            self.detach(sink)
            sink.overrun(f"{what} is full: this client read too slowly; reconnect with the same session_id to resume")

    def attach(self, sink: ChannelSink) -> KernelMessage | None:
        """Make ``sink`` the session's socket; return a notice of lost messages for it to send first, if any."""
        if self.sink is not None and self.sink is not sink:
            self.sink.end("replaced by a newer connection with the same session_id")
        self.sink = sink
        self.detached_at = None
        if not self._dropped:
            return None
        limits = self.bridge.limits
        text = (f"[gateway] {self._dropped} messages were dropped while this client was disconnected or reading "
                f"too slowly (output kept for clients: up to {limits.kernel_bytes // 2**20} MiB and "
                f"{limits.max_messages} messages per kernel, {limits.total_bytes // 2**20} MiB in all).\n")
        self._dropped = 0
        return gateway_message("iopub", "stream", {"name": "stderr", "text": text})

    def detach(self, sink: ChannelSink) -> None:
        """Called when ``sink`` closed; a newer socket that took over is left alone."""
        if self.sink is not sink:
            return
        self.sink = None
        self.detached_at = time.monotonic()
        if not self.retain:  # nobody can come back to an unnamed session
            self.bridge.drop_session(self.session_id)
        else:
            self.bridge.cap_detached()

    def send(self, channel: str, parts: list[bytes]) -> None:
        """Sign ``parts`` and send them to the kernel on ``channel``.

        A shell request over the kernel's bound of requests in flight is not sent: it is answered
        with an error reply (and, for execute, an error output) instead. Why not queue it: a notebook
        sends one request per cell it runs, far below the bound, so requests past it come from a
        runaway loop; ipykernel 7 wedges its shell for good under such a flood (both shell threads
        block in a ZMQ send), and a gateway queue would only move the unbounded growth here and put
        the user's next cell behind thousands of junk requests. An error reply settles the client's
        request like any kernel error, and the connection and the kernel stay usable.
        """
        if channel == "shell":
            header = json.loads(parts[0])
            msg_type = header.get("msg_type", "")
            if msg_type.endswith("_request") and not self.bridge.start_request():
                self._refuse(header)
                return
        frames = [DELIMITER, self.bridge.signer.sign(parts), *parts]
        self.bridge.touch()
        metrics.relayed(channel, metrics.CLIENT_TO_KERNEL).add(frames)
        if channel == "shell" and self._held is not None:
            self._held.append(frames)
            return
        self._sockets[channel].send_multipart(frames, copy=False)

    def _refuse(self, request: dict[str, Any]) -> None:
        limit = self.bridge.limits.requests_in_flight
        evalue = (f"the kernel already has {limit} requests waiting for replies (the gateway's limit); "
                  "this request was not sent. Wait for the running ones or interrupt the kernel, then retry.")
        error = {"status": "error", "ename": "TooManyRequests", "evalue": evalue, "traceback": [f"TooManyRequests: {evalue}"]}
        msg_type = request.get("msg_type", "")
        replies = []  # no busy status: clients need only the reply and the idle status to settle a request
        if msg_type == "execute_request":
            replies.append(gateway_message("iopub", "error", {k: v for k, v in error.items() if k != "status"}, request))
            error["execution_count"] = None
        replies.append(gateway_message("shell", msg_type[: -len("_request")] + "_reply", error, request))
        replies.append(gateway_message("iopub", "status", {"execution_state": "idle"}, request))
        for msg in replies:
            self.bridge.backlog.append(msg, self.session_id)
        if self.sink is not None:
            self.sink.wake()

    def reconnect(self) -> None:
        """Reopen the sockets towards new connection info; the attached client and the cursor stay."""
        self._close_sockets()
        self.open()

    def _close_sockets(self) -> None:
        # before the sockets close: a monitor left on a closed socket stalled the sessions opened after it, and
        # held requests still go out (in the background, for up to LINGER) when their client has just left
        self._release()
        for task in self._readers:
            task.cancel()
        for sock in self._sockets.values():
            sock.close()
        self._readers.clear()
        self._sockets.clear()

    def close(self, reason: str = "") -> None:
        """Close the sockets; an attached client is disconnected with ``reason``."""
        if self.sink is not None and reason:
            self.sink.end(reason)
        self.sink = None
        self.retain = False
        self._close_sockets()


def gateway_message(channel: str, msg_type: str, content: dict[str, Any], parent: dict | None = None) -> KernelMessage:
    """A message the gateway itself sends to clients (synthetic status, notices, refusals)."""
    parts = make_message_parts(msg_type, content, "gateway", parent)
    return KernelMessage(channel, parts, json.loads(parts[0]))
