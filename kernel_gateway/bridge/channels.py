"""Per-kernel ZMQ channels, fanned out to websocket sessions, with buffering while detached.

One :class:`KernelBridge` per kernel owns the iopub subscription (so activity is tracked whether or
not a client is connected) and one :class:`ChannelSession` per client ``session_id``. A session
owns shell, control and stdin sockets whose ZMQ identity is the session id, so replies and
``input_request`` reach the client that asked. A session outlives its websocket: while no socket
is attached its messages are buffered and replayed to the next socket with the same id; a new
socket with the same id takes the session over from an old one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any, Callable, Protocol

import zmq
import zmq.asyncio

from .frames import DELIMITER, FrameError, KernelMessage, Signer, kernel_message_from_zmq, make_message_parts

__all__ = ["ChannelSession", "ChannelSink", "KernelBridge"]

log = logging.getLogger("kernel_gateway.bridge")

#: Status messages caused by these requests say nothing about user code running.
UNTRACKED_PARENTS = frozenset(
    ("kernel_info_request", "comm_info_request", "shutdown_request", "interrupt_request", "debug_request")
)


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
    """Where a session's messages go: a websocket connection."""

    def deliver(self, msg: KernelMessage) -> None: ...

    def end(self, reason: str) -> None: ...


def _address(info: dict[str, Any], channel: str) -> str:
    transport = info.get("transport", "tcp")
    ip = info.get("ip", "127.0.0.1")
    port = info[f"{channel}_port"]
    return f"{transport}://{ip}:{port}" if transport == "tcp" else f"{transport}://{ip}-{port}"


class ChannelSession:
    """The shell/control/stdin sockets of one client session, and its buffer while detached."""

    def __init__(self, bridge: KernelBridge, session_id: str, retain: bool) -> None:
        self.bridge = bridge
        self.session_id = session_id
        self.retain = retain  # the client named this session, so it may come back for its output
        self.sink: ChannelSink | None = None
        self.detached_at: float | None = time.monotonic()
        self._buffer: deque[KernelMessage] = deque()
        self._dropped = 0
        self._sockets: dict[str, zmq.asyncio.Socket] = {}
        self._readers: list[asyncio.Task] = []

    def open(self) -> None:
        identity = self.session_id.encode()
        for channel in ("shell", "control", "stdin"):
            sock = self.bridge.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(_address(self.bridge.connection_info, channel))
            self._sockets[channel] = sock
            self._readers.append(asyncio.create_task(self._read(channel, sock)))

    async def _read(self, channel: str, sock: zmq.asyncio.Socket) -> None:
        async for batch in read_batches(sock):
            self.bridge.touch()
            for frames in batch:
                try:
                    msg = kernel_message_from_zmq(channel, frames, self.bridge.signer)
                except FrameError as exc:
                    self.bridge.log.warning("dropped a %s message from the kernel: %s", channel, exc)
                    continue
                self.deliver(msg)

    def deliver(self, msg: KernelMessage) -> None:
        """Send ``msg`` to the attached socket, or buffer it while none is attached. Never waits."""
        if self.sink is not None:
            self.sink.deliver(msg)
        else:
            self.keep(msg)

    def keep(self, msg: KernelMessage) -> None:
        """Buffer ``msg`` for the client's return (if it named its session) while no socket is attached."""
        if not self.retain:
            return
        self._buffer.append(msg)
        if len(self._buffer) > self.bridge.buffer_max_messages:
            self._buffer.popleft()
            self._dropped += 1

    def attach(self, sink: ChannelSink) -> list[KernelMessage]:
        """Make ``sink`` the session's socket; return what was buffered for it to replay first."""
        if self.sink is not None and self.sink is not sink:
            self.sink.end("replaced by a newer connection with the same session_id")
        self.sink = sink
        self.detached_at = None
        replay = list(self._buffer)
        self._buffer.clear()
        if self._dropped:
            notice = make_message_parts(
                "stream",
                {"name": "stderr", "text": f"[gateway] {self._dropped} messages were dropped while disconnected "
                 f"(buffer limit {self.bridge.buffer_max_messages} messages).\n"},
                "gateway",
            )
            replay.insert(0, KernelMessage("iopub", notice, {"msg_type": "stream", "msg_id": ""}))
            self._dropped = 0
        return replay

    def detach(self, sink: ChannelSink) -> None:
        """Called when ``sink`` closed; a newer socket that took over is left alone."""
        if self.sink is sink:
            self.sink = None
            self.detached_at = time.monotonic()

    def send(self, channel: str, parts: list[bytes]) -> None:
        """Sign ``parts`` and send them to the kernel on ``channel``."""
        signature = self.bridge.signer.sign(parts)
        self.bridge.touch()
        self._sockets[channel].send_multipart([DELIMITER, signature, *parts], copy=False)

    def reconnect(self) -> None:
        """Reopen the sockets towards new connection info; the attached client and the buffer stay."""
        self._close_sockets()
        self.open()

    def _close_sockets(self) -> None:
        for task in self._readers:
            task.cancel()
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._readers.clear()
        self._sockets.clear()

    def close(self, reason: str = "") -> None:
        """Close the sockets and forget the buffer; an attached client is disconnected with ``reason``."""
        if self.sink is not None and reason:
            self.sink.end(reason)
        self.sink = None
        self._close_sockets()
        self._buffer.clear()


class KernelBridge:
    """All websocket-facing channels of one kernel.

    ``on_activity(msg)`` is called for every iopub message, before fan-out; the kernel registry
    uses it to keep ``execution_state`` and ``last_activity`` current.
    """

    def __init__(
        self,
        kernel_id: str,
        connection_info: dict[str, Any],
        context: zmq.asyncio.Context,
        on_activity: Callable[[KernelMessage], None],
        buffer_max_messages: int = 100_000,
    ) -> None:
        self.kernel_id = kernel_id
        self.context = context
        self.on_activity = on_activity
        self.buffer_max_messages = buffer_max_messages
        self.sessions: dict[str, ChannelSession] = {}
        self.log = logging.LoggerAdapter(log, {"kernel_id": kernel_id})
        self.last_activity = time.time()
        self._iopub: zmq.asyncio.Socket | None = None
        self._iopub_task: asyncio.Task | None = None
        self._iopub_waiters: dict[str, asyncio.Future] = {}
        self._set_connection(connection_info)

    def _set_connection(self, info: dict[str, Any]) -> None:
        self.connection_info = dict(info)
        key = info.get("key", b"")
        self.signer = Signer(key.encode() if isinstance(key, str) else key, info.get("signature_scheme", "hmac-sha256"))

    def touch(self) -> None:
        self.last_activity = time.time()

    @property
    def connections(self) -> int:
        return sum(1 for s in self.sessions.values() if s.sink is not None)

    def start(self) -> None:
        """Subscribe to iopub. Called once the kernel's ports are known."""
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVHWM, 0)  # never drop output: back-pressure waits, it does not discard
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(_address(self.connection_info, "iopub"))
        self._iopub = sock
        self._iopub_task = asyncio.create_task(self._read_iopub(sock))

    async def _read_iopub(self, sock: zmq.asyncio.Socket) -> None:
        async for batch in read_batches(sock):
            self.touch()
            for frames in batch:
                try:
                    msg = kernel_message_from_zmq("iopub", frames, self.signer)
                except FrameError as exc:
                    self.log.warning("dropped an iopub message from the kernel: %s", exc)
                    continue
                if self._iopub_waiters:
                    self._wake_waiter(msg)
                self.on_activity(msg)
                for session in list(self.sessions.values()):
                    session.deliver(msg)

    def _wake_waiter(self, msg: KernelMessage) -> None:
        parent = msg.parts[1]
        for msg_id, future in list(self._iopub_waiters.items()):
            if msg_id.encode() in parent and not future.done():
                future.set_result(True)

    async def wait_ready(self, timeout: float, alive: Callable[[], Any]) -> None:
        """Return once the kernel answers ``kernel_info_request`` and its iopub reaches us.

        Asks again every second (the first requests may go out before the kernel or our
        subscription is up); raises ``TimeoutError`` after ``timeout`` seconds and
        ``RuntimeError`` as soon as ``alive()`` says the kernel has died.
        """
        deadline = time.monotonic() + timeout
        shell = self.context.socket(zmq.DEALER)
        shell.setsockopt(zmq.LINGER, 0)
        shell.connect(_address(self.connection_info, "shell"))
        try:
            while True:
                parts = make_message_parts("kernel_info_request", {}, "gateway-ready")
                msg_id = _msg_id(parts[0])
                iopub_seen = asyncio.get_running_loop().create_future()
                self._iopub_waiters[msg_id] = iopub_seen
                try:
                    await shell.send_multipart([DELIMITER, self.signer.sign(parts), *parts])
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError
                    try:
                        await asyncio.wait_for(_reply_to(shell, msg_id), min(1.0, remaining))
                        # the reply came, so the kernel is up; if its iopub answer went out before our
                        # subscription took, ask again soon rather than after a full second
                        await asyncio.wait_for(asyncio.shield(iopub_seen), min(0.2, max(deadline - time.monotonic(), 0.01)))
                        return
                    except asyncio.TimeoutError:
                        if time.monotonic() >= deadline:
                            raise TimeoutError from None
                        if not await alive():
                            raise RuntimeError("the kernel process exited before it was ready") from None
                finally:
                    self._iopub_waiters.pop(msg_id, None)
        finally:
            shell.close(linger=0)

    def session(self, session_id: str, retain: bool) -> ChannelSession:
        """Return the session ``session_id``, opening it on first use."""
        session = self.sessions.get(session_id)
        if session is None:
            session = ChannelSession(self, session_id, retain)
            session.open()
            self.sessions[session_id] = session
        return session

    def drop_session(self, session_id: str, reason: str = "") -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            session.close(reason)

    def expire_sessions(self, max_detached_seconds: float) -> None:
        """Close sessions that have had no socket for longer than ``max_detached_seconds``."""
        now = time.monotonic()
        for sid, session in list(self.sessions.items()):
            if session.sink is None and session.detached_at is not None and now - session.detached_at > max_detached_seconds:
                self.log.info("discarding detached session %s", sid)
                self.drop_session(sid)

    def retarget(self, connection_info: dict[str, Any]) -> None:
        """Point every socket at new connection info (a restart that moved the kernel)."""
        keys = ("ip", "transport", "shell_port", "iopub_port", "stdin_port", "control_port", "key")
        if all(connection_info.get(k) == self.connection_info.get(k) for k in keys):
            return
        self._set_connection(connection_info)
        self._close_iopub()
        self.start()
        for session in self.sessions.values():
            session.reconnect()

    def broadcast_status(self, state: str) -> None:
        """Tell every session the kernel is ``restarting`` or ``dead`` (the kernel cannot say so itself)."""
        parts = make_message_parts("status", {"execution_state": state}, "gateway")
        msg = KernelMessage("iopub", parts, {"msg_type": "status", "msg_id": _msg_id(parts[0])})
        for session in list(self.sessions.values()):
            session.deliver(msg)

    def _close_iopub(self) -> None:
        if self._iopub_task is not None:
            self._iopub_task.cancel()
        if self._iopub is not None:
            self._iopub.close(linger=0)
        self._iopub = self._iopub_task = None

    def close(self) -> None:
        """Close every socket. Called once the kernel is shut down."""
        self._close_iopub()
        for sid in list(self.sessions):
            self.drop_session(sid, "the kernel was shut down")


def _msg_id(header: bytes) -> str:
    return json.loads(header)["msg_id"]


async def _reply_to(sock: zmq.asyncio.Socket, msg_id: str) -> None:
    while True:
        frames = await sock.recv_multipart()
        if msg_id.encode() in b"".join(frames[2:4]):
            return
