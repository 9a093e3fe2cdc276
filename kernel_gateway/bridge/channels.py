"""Per-kernel ZMQ channels, fanned out to websocket sessions, with buffering while detached.

One :class:`KernelBridge` per kernel owns the iopub subscription (so activity is tracked whether or
not a client is connected) and one :class:`~.session.ChannelSession` per client ``session_id``.
Every message for clients goes into the kernel's :class:`~.backlog.Backlog`, which sessions read
at their own pace. Detached sessions are capped per kernel and in total, and the shell requests in
flight per kernel are bounded (see :meth:`~.session.ChannelSession.send`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, Callable, Iterator

import zmq
import zmq.asyncio

from .. import metrics
from .backlog import Backlog, BridgeLimits
from .frames import DELIMITER, FrameError, KernelMessage, Signer, kernel_message_from_zmq, make_message_parts
from .session import ChannelSession, connect_to_kernel, gateway_message, read_batches

__all__ = ["BridgeLimits", "KernelBridge", "UNTRACKED_PARENTS"]

log = logging.getLogger("kernel_gateway.bridge")

#: Status messages caused by these requests say nothing about user code running.
UNTRACKED_PARENTS = frozenset(
    ("kernel_info_request", "comm_info_request", "shutdown_request", "interrupt_request", "debug_request")
)


class KernelBridge:
    """All websocket-facing channels of one kernel.

    ``on_activity(msg)`` is called for every iopub message, before fan-out; the kernel registry
    uses it to keep ``execution_state`` and ``last_activity`` current. ``limits`` is shared by the
    bridges of all kernels (byte budgets, detached-session caps, requests in flight).
    """

    def __init__(
        self,
        kernel_id: str,
        connection_info: dict[str, Any],
        context: zmq.asyncio.Context,
        on_activity: Callable[[KernelMessage], None],
        limits: BridgeLimits | None = None,
    ) -> None:
        self.kernel_id = kernel_id
        self.context = context
        self.on_activity = on_activity
        self.limits = limits or BridgeLimits()
        self.sessions: dict[str, ChannelSession] = {}
        self.log = logging.LoggerAdapter(log, {"kernel_id": kernel_id})
        self.backlog = Backlog(self.limits, self.sessions, self.log)
        self.in_flight = 0  # shell requests sent whose reply has not come back
        self._refusing = False
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
        self.limits.bridges.add(self)
        sock = self.context.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.setsockopt(zmq.RCVHWM, 0)  # never drop output: back-pressure waits, it does not discard
        sock.setsockopt(zmq.LINGER, 0)
        connect_to_kernel(sock, self.connection_info, "iopub")
        self._iopub = sock
        self._iopub_task = asyncio.create_task(self._read_iopub(sock))

    async def _read_iopub(self, sock: zmq.asyncio.Socket) -> None:
        tally = metrics.relayed("iopub", metrics.KERNEL_TO_CLIENT)
        async for batch in read_batches(sock):
            self.touch()
            tally.add_batch(batch)
            for frames in batch:
                try:
                    msg = kernel_message_from_zmq("iopub", frames, self.signer)
                except FrameError as exc:
                    self.log.warning("dropped an iopub message from the kernel: %s", exc)
                    continue
                if self._iopub_waiters:
                    self._wake_waiter(msg)
                self.on_activity(msg)
                self.backlog.append(msg)
            self._wake_all()

    def _wake_all(self) -> None:
        for session in list(self.sessions.values()):
            if session.sink is not None:
                session.sink.wake()

    def start_request(self) -> bool:
        """Count a shell request about to be sent; False when the kernel has its bound in flight already."""
        limit = self.limits.requests_in_flight
        if limit and self.in_flight >= limit:
            if not self._refusing:
                self._refusing = True
                self.log.warning("%d shell requests are waiting for replies; refusing more until some are answered",
                                 self.in_flight)
            return False
        self.in_flight += 1
        return True

    def request_done(self) -> None:
        """A shell reply came back."""
        self.in_flight = max(self.in_flight - 1, 0)
        if self._refusing and self.in_flight <= self.limits.requests_in_flight // 2:
            self._refusing = False

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
        connect_to_kernel(shell, self.connection_info, "shell")
        iopub_wait = 0.01
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
                        # subscription took, ask again soon (a warm kernel answers within milliseconds of binding,
                        # so the first waits are short) rather than after a full second
                        await asyncio.wait_for(asyncio.shield(iopub_seen), min(iopub_wait, max(deadline - time.monotonic(), 0.01)))
                        return
                    except asyncio.TimeoutError:
                        iopub_wait = min(iopub_wait * 2, 0.2)
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
            self.backlog.trim()

    def detached_sessions(self) -> Iterator[ChannelSession]:
        """Sessions kept for a client that may come back (named, no socket attached)."""
        return (s for s in self.sessions.values() if s.sink is None and s.retain)

    def cap_detached(self) -> None:
        """Discard the oldest detached sessions over the per-kernel and the total caps."""
        limits = self.limits
        for cap, scope, sessions in (
            (limits.detached_per_kernel, "for this kernel", lambda: list(self.detached_sessions())),
            (limits.detached_total, "in the gateway", lambda: list(limits.detached())),
        ):
            if not cap:
                continue
            candidates = sessions()
            if len(candidates) <= cap:
                continue
            candidates.sort(key=lambda s: s.detached_at or 0.0)
            for session in candidates[: len(candidates) - cap]:
                session.bridge.log.info("discarding detached session %s: over %d detached sessions %s",
                                        session.session_id, cap, scope)
                session.bridge.drop_session(session.session_id)

    def expire_sessions(self, max_detached_seconds: float) -> None:
        """Close sessions that have had no socket for longer than ``max_detached_seconds``."""
        now = time.monotonic()
        for sid, session in list(self.sessions.items()):
            if session.sink is None and session.detached_at is not None and now - session.detached_at > max_detached_seconds:
                self.log.info("discarding detached session %s", sid)
                self.drop_session(sid)

    def retarget(self, connection_info: dict[str, Any]) -> None:
        """Point every socket at new connection info (a restart that moved the kernel)."""
        keys = ("ip", "transport", "shell_port", "iopub_port", "stdin_port", "control_port", "key", "curve_publickey")
        self.in_flight = 0  # the old kernel process will not answer what it was sent
        self._refusing = False
        if all(connection_info.get(k) == self.connection_info.get(k) for k in keys):
            return
        self._set_connection(connection_info)
        self._close_iopub()
        self.start()
        for session in self.sessions.values():
            session.reconnect()

    def broadcast_status(self, state: str) -> None:
        """Tell every session the kernel is ``restarting`` or ``dead`` (the kernel cannot say so itself)."""
        self.backlog.append(gateway_message("iopub", "status", {"execution_state": state}))
        self._wake_all()

    def _close_iopub(self) -> None:
        if self._iopub_task is not None:
            self._iopub_task.cancel()
        if self._iopub is not None:
            self._iopub.close(linger=0)
        self._iopub = self._iopub_task = None

    def close(self, reason: str = "the kernel was shut down") -> None:
        """Close every socket, telling clients ``reason``. Called once the kernel is shut down or let go."""
        self._close_iopub()
        for sid in list(self.sessions):
            self.drop_session(sid, reason)
        self.backlog.clear()
        self.limits.bridges.discard(self)


def _msg_id(header: bytes) -> str:
    return json.loads(header)["msg_id"]


async def _reply_to(sock: zmq.asyncio.Socket, msg_id: str) -> None:
    while True:
        frames = await sock.recv_multipart()
        if msg_id.encode() in b"".join(frames[2:4]):
            return
