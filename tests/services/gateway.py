"""Starts a gateway server as a real subprocess on a free loopback port and waits until it is ready."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """Return a loopback TCP port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class GatewayServer:
    """A running ``kernel-gateway`` process; ``url``/``ws_url``/``token`` describe how to reach it."""

    port: int
    token: str
    proc: subprocess.Popen
    log_path: Path
    host: str = "127.0.0.1"
    extra: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_gateway(
    *args: str,
    tmp_path: Path,
    token: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 30,
    preexec_fn=None,
    port: int | None = None,
) -> GatewayServer:
    """Start ``python -m kernel_gateway`` with ``args`` and wait for ``/readyz``.

    ``token=None`` generates one; ``token=""`` starts without auth (``--no-auth``). ``preexec_fn`` runs in
    the child before it starts (e.g. to set its resource limits). ``port``: a given one (e.g. a stopped
    gateway's, to start it again at the same address); default a free one.
    """
    port = port or free_port()
    if token is None:
        token = secrets.token_hex(16)
    argv = [sys.executable, "-m", "kernel_gateway", "--ip=127.0.0.1", f"--port={port}"]
    argv += [f"--auth-token={token}"] if token else ["--no-auth"]
    argv += list(args)
    proc_env = dict(os.environ)
    proc_env.setdefault("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    proc_env.update(env or {})
    log_path = tmp_path / f"gateway-{port}.log"
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=proc_env, cwd=tmp_path,
                            preexec_fn=preexec_fn)
    log_file.close()
    server = GatewayServer(port=port, token=token, proc=proc, log_path=log_path)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{server.url}/readyz", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        wait_until(ready, timeout, what="gateway /readyz")
    except Exception:
        server.stop(signal.SIGKILL)
        raise
    return server
