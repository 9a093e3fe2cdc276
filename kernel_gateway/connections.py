"""Connection admission for the HTTP server: descriptor limit, connection caps, accept back-off.

Every client connection holds a descriptor, and a kernel websocket holds seven (its socket and the
three ZMQ sockets of its session, each a TCP socket plus a signalling descriptor); kernels need
descriptors too. Unbounded, ~1,000 idle connections exhaust a 1,024 limit, and then every accept
fails with EMFILE: tornado's accept handler neither pauses nor quiets it, so the event loop spins on
the readable listening socket and logs a traceback per attempt.

:class:`GatewayHTTPServer` keeps that from happening:

- connections count against ``max_connections`` (weighted as above) and, per client address,
  against ``max_connections_per_peer``; at a cap the oldest connection still waiting for a request
  is closed to make room, and when none waits the new one is answered 503 and closed;
- websocket upgrades may not use the last :func:`plain_margin` of ``max_connections``, so plain
  requests such as ``/healthz`` still get in when websockets fill the rest;
- a failing accept (EMFILE, ENFILE, ...) pauses accepting for :data:`ACCEPT_PAUSE` seconds;
  refusals, evictions and accept failures are logged at most once per :data:`REPORT_INTERVAL`.
"""

from __future__ import annotations

import json
import logging
import resource
import socket
import time
from typing import Any, Callable, Iterable

from tornado import httputil
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.iostream import IOStream

__all__ = ["CHANNELS_WEIGHT", "GatewayHTTPServer", "default_max_connections", "raise_descriptor_limit"]

log = logging.getLogger("kernel_gateway.connections")

#: Seconds accepting stays paused after an accept failed (the failure would repeat at once).
ACCEPT_PAUSE = 0.1
#: Seconds between two log lines about the same kind of event; the line carries the count.
REPORT_INTERVAL = 10.0
#: Connections accepted per readiness event, so a flood cannot starve other callbacks.
ACCEPT_BATCH = 128
#: Descriptors a kernel websocket holds: its socket, and shell/control/stdin ZMQ sockets (2 each).
CHANNELS_WEIGHT = 7
#: Soft limit assumed when the hard limit is unlimited (Linux refuses more than fs.nr_open anyway).
UNLIMITED_TARGET = 1 << 20

_BODY = json.dumps({"reason": "Service Unavailable",
                    "message": "the gateway is at its connection limit; retry shortly"}).encode()
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(_BODY), _BODY))


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit, log both, and return the soft limit now in force.

    Called once by the app before it listens. When the system refuses, the limit stays as it was.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit to %s: %s", target, exc)
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    log.info("open-file limit: soft %s (was %s), hard %s", _shown(now), _shown(soft), _shown(hard))
    return now


def _shown(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def default_max_connections(descriptor_limit: int) -> int:
    """``max_connections`` when unset: the limit minus a reserve for kernels (a quarter, at least 64)."""
    if descriptor_limit == resource.RLIM_INFINITY:
        descriptor_limit = UNLIMITED_TARGET
    return max(16, descriptor_limit - max(64, descriptor_limit // 4))


def plain_margin(max_connections: int) -> int:
    """The share of ``max_connections`` websocket upgrades may not take (1/16, at least 8)."""
    return max(8, max_connections // 16)


class _Report:
    """Counts one kind of event and logs it at most once per REPORT_INTERVAL, with the count.

    The first event is logged at once; later ones in the interval are logged together at its end.
    """

    def __init__(self, message: str) -> None:
        self.message = message  # "%d" for the count, then "%s" for the latest event's detail
        self.count = 0
        self.detail = ""
        self.next_at = 0.0
        self.flush_pending = False

    def __call__(self, detail: str) -> None:
        self.count += 1
        self.detail = detail
        now = time.monotonic()
        if now >= self.next_at:
            self._flush()
        elif not self.flush_pending:
            self.flush_pending = True
            IOLoop.current().call_later(self.next_at - now, self._flush)

    def _flush(self) -> None:
        self.flush_pending = False
        if self.count:
            log.warning(self.message, self.count, self.detail)
            self.count = 0
            self.next_at = time.monotonic() + REPORT_INTERVAL


class _TrackedStream(IOStream):
    """An IOStream that gives its place back to the server when its descriptor is closed."""

    def __init__(self, sock: socket.socket, server: GatewayHTTPServer, peer: str, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        self.server = server
        self.peer = peer
        self.weight = 1

    def close_fd(self) -> None:
        try:
            super().close_fd()
        finally:
            self.server._release(self)


class _Acceptor:
    """Accepts connections on one listening socket; a failing accept pauses it instead of spinning.

    Replaces ``tornado.netutil.add_accept_handler``, which lets an ``OSError`` from ``accept``
    escape to the event loop (a traceback) and is called again at once while the socket stays readable.
    """

    def __init__(self, sock: socket.socket, on_connection: Callable[[socket.socket, Any], None],
                 on_failure: Callable[[OSError], None]) -> None:
        self.sock = sock
        self.on_connection = on_connection
        self.on_failure = on_failure
        self.loop = IOLoop.current()
        self.listening = False
        self.stopped = False
        self.timer: object | None = None

    def start(self) -> None:
        self.loop.add_handler(self.sock, self._ready, IOLoop.READ)
        self.listening = True

    def stop(self) -> None:
        """Stop accepting for good (``TCPServer.stop`` calls this before it closes the socket)."""
        self.stopped = True
        if self.listening:
            self.loop.remove_handler(self.sock)
            self.listening = False
        if self.timer is not None:
            self.loop.remove_timeout(self.timer)
            self.timer = None

    def _ready(self, fd: Any, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.stopped:
                return
            try:
                connection, address = self.sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE/ENFILE/ENOBUFS/ENOMEM: retrying at once fails the same way
                self.on_failure(exc)
                self.loop.remove_handler(self.sock)
                self.listening = False
                self.timer = self.loop.call_later(ACCEPT_PAUSE, self._resume)
                return
            self.on_connection(connection, address)

    def _resume(self) -> None:
        self.timer = None
        if not self.stopped:
            self.start()


class _RequestWatch(httputil.HTTPMessageDelegate):
    """Wraps one request's delegate: marks the connection busy once headers arrive, admits upgrades."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, server: GatewayHTTPServer,
                 stream: _TrackedStream) -> None:
        self.delegate = delegate
        self.server = server
        self.stream = stream
        self.refused = False

    def headers_received(self, start_line: Any, headers: httputil.HTTPHeaders) -> Any:
        self.server._forget_waiting(self.stream)
        if headers.get("Upgrade", "").lower() == "websocket" and not self.server._admit_upgrade(self.stream):
            self.refused = True
            self.stream.write(_REFUSAL)  # short: written at once, before the close below
            self.stream.close()
            return None
        return self.delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        if not self.refused:
            return self.delegate.data_received(chunk)
        return None

    def finish(self) -> None:
        if not self.refused:
            self.delegate.finish()

    def on_connection_close(self) -> None:
        if not self.refused:
            self.delegate.on_connection_close()


def _refuse(connection: socket.socket) -> None:
    """Answer 503 if the socket takes it at once, and close; never waits, never raises."""
    try:
        connection.setblocking(False)
        connection.send(_REFUSAL)
    except OSError:
        pass
    finally:
        connection.close()


class GatewayHTTPServer(HTTPServer):
    """An HTTPServer that caps connections (in total and per client address) and backs off a failing accept.

    Takes HTTPServer's arguments plus ``max_connections`` (descriptors client connections may hold,
    a kernel websocket counting :data:`CHANNELS_WEIGHT`) and ``max_connections_per_peer``
    (connections per client address, 0 for no cap). Plain TCP only: the gateway terminates no TLS.
    """

    def initialize(self, *args: Any, max_connections: int, max_connections_per_peer: int, **kwargs: Any) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer
        self.used = 0  # weighted
        self._per_peer: dict[str, int] = {}
        # streams waiting for a request, oldest first (dicts keep insertion order)
        self._waiting: dict[_TrackedStream, None] = {}
        self._waiting_by_peer: dict[str, dict[_TrackedStream, None]] = {}
        self._refused = _Report("refused %d connection(s) since the last report; latest: %s")
        self._evicted = _Report("closed %d connection(s) waiting for a request to make room; latest: %s")
        self._accept_failed = _Report("accept failed %d time(s) since the last report, accepting paused "
                                      f"{ACCEPT_PAUSE}s after each; latest: %s")

    # -- accepting ---------------------------------------------------------------------------
    def add_sockets(self, sockets: Iterable[socket.socket]) -> None:
        for sock in sockets:
            acceptor = _Acceptor(sock, self._handle_connection, self._on_accept_failure)
            self._sockets[sock.fileno()] = sock
            self._handlers[sock.fileno()] = acceptor.stop
            acceptor.start()

    def _on_accept_failure(self, exc: OSError) -> None:
        self._accept_failed(f"{exc.strerror or exc} ({self.used} descriptors held by {len(self._per_peer)} "
                            f"client address(es); max_connections={self.max_connections})")

    def _handle_connection(self, connection: socket.socket, address: Any) -> None:
        peer = address[0] if isinstance(address, tuple) else str(address)
        refusal = self._make_room(peer)
        if refusal is not None:
            _refuse(connection)
            self._refused(refusal)
            return
        stream = _TrackedStream(connection, self, peer, max_buffer_size=self.max_buffer_size,
                                read_chunk_size=self.read_chunk_size)
        self.used += 1
        self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
        self.handle_stream(stream, address)

    # -- accounting ----------------------------------------------------------------------------
    def _make_room(self, peer: str) -> str | None:
        """Close waiting connections until one more fits under both caps; None, or why it cannot."""
        cap = self.max_connections_per_peer
        if cap and self._per_peer.get(peer, 0) >= cap and not self._evict(self._waiting_by_peer.get(peer, {}), peer):
            return f"{peer} holds max_connections_per_peer={cap} connections, none waiting for a request"
        while self.used + 1 > self.max_connections:
            if not self._evict(self._waiting, peer):
                return f"max_connections={self.max_connections} in use, no connection waiting for a request"
        return None

    def _evict(self, waiting: dict[_TrackedStream, None], newcomer: str) -> bool:
        """Close the oldest connection in ``waiting``; False when there is none."""
        if not waiting:
            return False
        oldest = next(iter(waiting))
        self._forget_waiting(oldest)  # each call removes one, whatever close() does
        self._evicted(f"from {oldest.peer}, for a new connection from {newcomer}")
        oldest.close()  # releases its place synchronously (close_fd)
        return True

    def _admit_upgrade(self, stream: _TrackedStream) -> bool:
        """Charge a websocket upgrade its full weight if it fits below the plain-request margin."""
        limit = self.max_connections - plain_margin(self.max_connections)
        extra = CHANNELS_WEIGHT - stream.weight
        while self.used + extra > limit:
            if not self._evict(self._waiting, stream.peer):
                self._refused(f"websocket from {stream.peer}: websockets may hold {limit} of "
                              f"max_connections={self.max_connections} descriptors, {self.used} in use")
                return False
        stream.weight += extra
        self.used += extra
        return True

    def _forget_waiting(self, stream: _TrackedStream) -> None:
        self._waiting.pop(stream, None)
        by_peer = self._waiting_by_peer.get(stream.peer)
        if by_peer is not None:
            by_peer.pop(stream, None)
            if not by_peer:
                del self._waiting_by_peer[stream.peer]

    def _release(self, stream: _TrackedStream) -> None:
        """Called once per stream, when its descriptor closes."""
        self._forget_waiting(stream)
        self.used -= stream.weight
        left = self._per_peer.get(stream.peer, 1) - 1
        if left:
            self._per_peer[stream.peer] = left
        else:
            self._per_peer.pop(stream.peer, None)

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # called when a connection starts waiting for its next request (HTTP1ServerConnection loop)
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(server_conn, "stream", None)
        if not isinstance(stream, _TrackedStream) or stream.closed():
            return delegate
        self.used -= stream.weight - 1  # a refused upgrade gives its websocket weight back
        stream.weight = 1
        self._waiting[stream] = None
        self._waiting_by_peer.setdefault(stream.peer, {})[stream] = None
        return _RequestWatch(delegate, self, stream)
