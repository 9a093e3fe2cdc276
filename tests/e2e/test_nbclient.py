"""nbclient executing a notebook on our gateway through jupyter_server's ``GatewayKernelManager``.

``GatewayKernelClient`` sends no credentials on its websocket, so this needs ``--allow-unauthenticated-channels``;
without that option the websocket must stay closed to anonymous clients.
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import nbformat
import pytest
import websocket
from nbformat.v4 import new_code_cell, new_notebook

from tests.services.gateway import wait_until

from .conftest import clean_env, gateway_kernel_ids, http, running_gateway, start_gateway_kernel
from .kernel_ws import KernelWebSocket

pytestmark = pytest.mark.e2e

RUNNER = """
import sys
import nbformat
from nbclient import NotebookClient
from jupyter_server.gateway.managers import GatewayKernelManager

nb = nbformat.read(sys.argv[1], as_version=4)
NotebookClient(nb, kernel_manager_class=GatewayKernelManager, timeout=60, startup_timeout=60).execute()
nbformat.write(nb, sys.argv[2])
"""


@pytest.fixture(scope="module")
def open_channels_gateway(tmp_path_factory):
    """Our gateway with a token for REST but anonymous kernel websockets allowed."""
    yield from running_gateway(tmp_path_factory, "gateway-open-channels", "--allow-unauthenticated-channels")


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory):
    """Our gateway with a token and default options."""
    yield from running_gateway(tmp_path_factory, "gateway-default")


def test_nbclient_executes_notebook_on_gateway(open_channels_gateway, tmp_path):
    gateway = open_channels_gateway
    assert gateway.token, "the point is a gateway that still requires a token for REST"
    flag = tmp_path / "go"
    nb = new_notebook(cells=[
        new_code_cell("print('hello from nbclient')"),
        new_code_cell("x = 21\nx * 2"),
        new_code_cell("import sys\nprint('to-stderr', file=sys.stderr)"),
        # Keeps the kernel busy until the test has seen it running on the gateway.
        new_code_cell(f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.02)\n"
                      "print('released')"),
        new_code_cell("from IPython.display import display\ndisplay({'text/plain': 'shown'}, raw=True)"),
    ])
    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    env = clean_env(tmp_path, {"JUPYTER_GATEWAY_URL": gateway.url, "JUPYTER_GATEWAY_AUTH_TOKEN": gateway.token})
    log_path = tmp_path / "nbclient.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(src), str(out)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        def running_kernel():
            if proc.poll() is not None:
                raise AssertionError(f"nbclient exited early ({proc.returncode}):\n{log_path.read_text()}")
            resp = http("GET", f"{gateway.url}/api/kernels", gateway.headers)
            return [k for k in resp.json() if k["execution_state"] == "busy"]
        (kernel,) = wait_until(running_kernel, 60, what="nbclient's kernel busy on the gateway")
        assert kernel["connections"] == 1
        flag.touch()
        assert proc.wait(60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    cells = nbformat.read(out, as_version=4).cells
    assert [c.execution_count for c in cells] == [1, 2, 3, 4, 5]
    assert [(o.output_type, o.name, o.text) for o in cells[0].outputs] == [("stream", "stdout", "hello from nbclient\n")]
    assert [(o.output_type, o.data["text/plain"]) for o in cells[1].outputs] == [("execute_result", "42")]
    assert [(o.name, o.text) for o in cells[2].outputs] == [("stderr", "to-stderr\n")]
    assert [o.text for o in cells[3].outputs] == ["released\n"]
    assert [(o.output_type, o.data["text/plain"]) for o in cells[4].outputs] == [("display_data", "shown")]
    # nbclient shuts its kernel down (DELETE) when done.
    wait_until(lambda: kernel["id"] not in gateway_kernel_ids(gateway), 30, what="nbclient's kernel deleted")


def test_open_channels_still_require_token_for_rest(open_channels_gateway):
    gateway = open_channels_gateway
    kernel_id = start_gateway_kernel(gateway)
    try:
        for method, path in [("GET", "/api/kernels"), ("GET", f"/api/kernels/{kernel_id}"),
                             ("POST", f"/api/kernels/{kernel_id}/interrupt")]:
            resp = http(method, gateway.url + path, body={} if method == "POST" else None)
            assert resp.status in (401, 403), (method, path, resp.status)
        with KernelWebSocket(gateway.ws_url, kernel_id, headers={}, session_id=uuid.uuid4().hex) as ws:
            assert ws.kernel_info()["content"]["status"] == "ok"
    finally:
        http("DELETE", f"{gateway.url}/api/kernels/{kernel_id}", gateway.headers)


def test_websocket_without_token_refused_by_default(default_gateway):
    gateway = default_gateway
    kernel_id = start_gateway_kernel(gateway)
    try:
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            KernelWebSocket(gateway.ws_url, kernel_id, headers={}).close()
        assert refused.value.status_code in (401, 403)
        # Same socket with the token works, so the refusal above was about credentials.
        with KernelWebSocket(gateway.ws_url, kernel_id, gateway.headers) as ws:
            assert ws.kernel_info()["content"]["status"] == "ok"
    finally:
        http("DELETE", f"{gateway.url}/api/kernels/{kernel_id}", gateway.headers)
