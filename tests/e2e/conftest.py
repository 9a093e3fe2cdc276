"""Fixtures for the end-to-end tests: our gateway, a jupyter_server pointed at it, and small HTTP helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services.gateway import GatewayServer, free_port, start_gateway, wait_until

SERVER_TOKEN = "srvtoken"


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict

    def json(self):
        return json.loads(self.body) if self.body else None


def http(method: str, url: str, headers: dict | None = None, body=None, timeout: float = 60) -> Response:
    """One HTTP request; returns the response for any status (errors are not raised)."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as err:
        return Response(err.code, err.read(), dict(err.headers))


def clean_env(tmp: Path, extra: dict | None = None) -> dict:
    """The test process env without Jupyter gateway settings, with private Jupyter dirs under ``tmp``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER_GATEWAY_", "KERNEL_"))}
    for name in ("runtime", "config", "data"):
        path = tmp / f"jupyter-{name}"
        path.mkdir(parents=True, exist_ok=True)
        env[f"JUPYTER_{name.upper()}_DIR"] = str(path)
    env.update(extra or {})
    return env


@dataclass
class JupyterServer:
    """A ``jupyter server --gateway-url=...`` subprocess."""

    port: int
    token: str
    root_dir: Path
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"token {self.token}"}

    def request(self, method: str, path: str, body=None, timeout: float = 60) -> Response:
        return http(method, self.url + path, self.headers, body, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_jupyter_server(gateway: GatewayServer, tmp: Path, timeout: float = 60) -> JupyterServer:
    port = free_port()
    root = tmp / "root"
    root.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "jupyter_server",
        "--ip=127.0.0.1", f"--port={port}", "--port-retries=0", "--no-browser", "--allow-root",
        f"--IdentityProvider.token={SERVER_TOKEN}", f"--ServerApp.root_dir={root}",
        f"--gateway-url={gateway.url}", f"--GatewayClient.auth_token={gateway.token}",
    ]
    log_path = tmp / f"jupyter-server-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=clean_env(tmp), cwd=tmp)
    server = JupyterServer(port=port, token=SERVER_TOKEN, root_dir=root, proc=proc, log_path=log_path)

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter server exited with {proc.returncode}:\n{server.log()}")
        try:
            return http("GET", f"{server.url}/api", timeout=2).status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        wait_until(ready, timeout, interval=0.1, what="jupyter server /api")
    except BaseException:
        server.stop()
        raise
    return server


def gateway_kernel_ids(gateway: GatewayServer) -> list[str]:
    resp = http("GET", f"{gateway.url}/api/kernels", gateway.headers)
    assert resp.status == 200, (resp.status, resp.body)
    return [k["id"] for k in resp.json()]


def _shutdown_gateway_kernels(gateway: GatewayServer):
    """Best effort: delete kernels a failed test left behind so the gateway stops quickly."""
    try:
        for kid in gateway_kernel_ids(gateway):
            http("DELETE", f"{gateway.url}/api/kernels/{kid}", gateway.headers, timeout=20)
    except Exception:
        pass


def running_gateway(tmp_path_factory, name: str, *args: str):
    """Yield our gateway (with a token, plus ``args``) for one module; its kernels are shut down after."""
    tmp = tmp_path_factory.mktemp(name)
    server = start_gateway(*args, tmp_path=tmp, env=clean_env(tmp))
    try:
        yield server
    finally:
        _shutdown_gateway_kernels(server)
        server.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """Our gateway with a token, shared by one test module."""
    yield from running_gateway(tmp_path_factory, "gateway")


@pytest.fixture(scope="module")
def jupyter_server(gateway, tmp_path_factory):
    """jupyter_server 2.x in gateway mode, pointed at ``gateway``."""
    tmp = tmp_path_factory.mktemp("jupyter-server")
    server = start_jupyter_server(gateway, tmp)
    try:
        yield server
    finally:
        server.stop()


def start_gateway_kernel(gateway: GatewayServer) -> str:
    resp = http("POST", f"{gateway.url}/api/kernels", gateway.headers, {"name": "python3"})
    assert resp.status == 201, (resp.status, resp.body, gateway.log()[-3000:])
    return resp.json()["id"]


@pytest.fixture
def gateway_kernel(gateway):
    """A kernel started directly on ``gateway`` over its REST API; deleted afterwards."""
    kernel_id = start_gateway_kernel(gateway)
    try:
        yield kernel_id
    finally:
        http("DELETE", f"{gateway.url}/api/kernels/{kernel_id}", gateway.headers, timeout=20)
