"""An HTTP relay in front of a ResourceManager that records every request the gateway makes to it.

Point the gateway's RM URL at :attr:`CountingProxy.url`; each request is forwarded unchanged to the
target (one connection per request) and noted as ``(monotonic time, method, path without query)`` in
:attr:`CountingProxy.seen`, so a test or benchmark can count what watching kernels costs the RM.
Used by the YARN integration tests and ``benchmarks/bench_yarn.py``.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

__all__ = ["CountingProxy"]


class CountingProxy(ThreadingHTTPServer):
    """Relays HTTP requests to the RM on loopback and records (time, method, path) of each."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        self.target = urlparse(target)
        self.seen: list[tuple[float, str, str]] = []
        super().__init__(("127.0.0.1", 0), _Relay)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def count(self, since: float = 0.0) -> Counter:
        """Requests as ``"METHOD /path"`` -> number, made at monotonic time ``since`` or later."""
        return Counter(f"{m} {p}" for t, m, p in list(self.seen) if t >= since)


class _Relay(BaseHTTPRequestHandler):
    """Forwards one request to the proxy's target and copies the answer back (with its own Content-Length)."""

    def log_message(self, *args) -> None:
        pass

    def _relay(self) -> None:
        server: CountingProxy = self.server  # type: ignore[assignment]
        server.seen.append((time.monotonic(), self.command, self.path.split("?")[0]))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPConnection(server.target.hostname, server.target.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        response = conn.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

    do_GET = do_POST = do_PUT = do_DELETE = _relay
