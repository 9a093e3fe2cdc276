"""A real load balancer for the replica tests: Debian's haproxy, round robin over gateways on loopback.

:func:`start_haproxy` writes a configuration under the given directory and runs haproxy in the foreground
(``-db``) as a child of the test; ``stop()`` ends it. Servers that refuse connections are skipped at once
(``redispatch`` with retries) and marked down by the ``/readyz`` health check, so a killed gateway costs a
client one failed attempt at most; websockets are tunnelled (``timeout tunnel``).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .apt import install_missing
from .gateway import free_port, wait_until

__all__ = ["LoadBalancer", "start_haproxy"]

_CONFIG = """\
global
    maxconn 4096

defaults
    mode http
    option redispatch
    retries 3
    timeout connect 1s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
    timeout http-request 30s

frontend gateways
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 250ms fall 1 rise 1
{servers}
"""


@dataclass
class LoadBalancer:
    """haproxy in front of the gateways: ``url`` is the address clients use."""

    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_haproxy(backends: list[int], workdir: Path, timeout: float = 30) -> LoadBalancer:
    """haproxy on a free loopback port, balancing round robin over the gateways on ``backends`` (ports)."""
    install_missing(["haproxy"])
    port = free_port()
    servers = "\n".join(f"    server gw{i} 127.0.0.1:{p} check" for i, p in enumerate(backends))
    config = workdir / "haproxy.cfg"
    config.write_text(_CONFIG.format(port=port, servers=servers))
    check = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    if check.returncode:
        raise RuntimeError(f"haproxy refused its configuration:\n{check.stdout}{check.stderr}")
    log_path = workdir / "haproxy.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    balancer = LoadBalancer(port, proc, log_path)

    def listening() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"haproxy exited with {proc.returncode}:\n{balancer.log()}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    started = time.monotonic()
    wait_until(listening, timeout, 0.05, what="haproxy to listen")
    print(f"haproxy on 127.0.0.1:{port} in {time.monotonic() - started:.2f}s")
    return balancer
