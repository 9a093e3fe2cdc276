"""jupyter_server 2.x in gateway mode (``--gateway-url``) driving our gateway, exercised over jupyter_server's API."""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime

import pytest

from tests.services.gateway import wait_until

from .conftest import gateway_kernel_ids, http
from .kernel_ws import KernelWebSocket, msg_parent_id

pytestmark = pytest.mark.e2e

UUID_RE = re.compile(r"^\w+-\w+-\w+-\w+-\w+$")
ACTIVITY_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # what jupyter_server's gateway client parses with strptime


def gated_cell(flag, then: str = "print('released')") -> str:
    """Code that keeps the kernel busy until the test creates ``flag`` (no timing guesses)."""
    return f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.02)\n{then}\n"


def gateway_model(gateway, kernel_id) -> dict:
    resp = http("GET", f"{gateway.url}/api/kernels/{kernel_id}", gateway.headers)
    assert resp.status == 200, (resp.status, resp.body)
    return resp.json()


def server_kernel_model(jupyter_server, kernel_id) -> dict | None:
    """The kernel as listed by jupyter_server's GET /api/kernels (refreshed from the gateway's list)."""
    resp = jupyter_server.request("GET", "/api/kernels")
    assert resp.status == 200, (resp.status, resp.body, jupyter_server.log()[-3000:])
    return next((k for k in resp.json() if k["id"] == kernel_id), None)


def open_ws(jupyter_server, kernel_id, session_id=None) -> KernelWebSocket:
    """A websocket through jupyter_server whose upstream link to the gateway is known to be up."""
    ws = KernelWebSocket(jupyter_server.ws_url, kernel_id, jupyter_server.headers,
                         session_id=session_id or uuid.uuid4().hex)
    try:
        reply = ws.kernel_info(timeout=30)
    except BaseException:
        ws.close()
        raise
    assert reply["content"]["status"] == "ok"
    return ws


@pytest.fixture
def session(jupyter_server, gateway, request):
    """A notebook session created through jupyter_server (so a kernel is started on the gateway)."""
    name = re.sub(r"\W", "_", request.node.name)[:50]
    (jupyter_server.root_dir / "e2e").mkdir(exist_ok=True)
    resp = jupyter_server.request("POST", "/api/sessions", {
        "path": f"e2e/{name}.ipynb", "name": f"{name}.ipynb", "type": "notebook", "kernel": {"name": "python3"},
    })
    assert resp.status == 201, (resp.status, resp.body, jupyter_server.log()[-3000:])
    model = resp.json()
    try:
        yield model
    finally:
        jupyter_server.request("DELETE", f"/api/sessions/{model['id']}")


def test_session_starts_gateway_kernel_and_executes(jupyter_server, gateway, session):
    kernel_id = session["kernel"]["id"]
    assert UUID_RE.match(kernel_id), kernel_id
    assert kernel_id in gateway_kernel_ids(gateway)

    with open_ws(jupyter_server, kernel_id) as ws:
        info = ws.kernel_info()
        assert info["channel"] == "shell"
        assert info["content"]["language_info"]["name"] == "python"
        assert {"msg_id", "msg_type", "header", "parent_header", "content"} <= set(info)

        ex = ws.run("print('hello-e2e')\n6 * 7")
        assert ex.reply["content"]["status"] == "ok", ex.summary()
        assert ex.reply["channel"] == "shell"
        assert ex.stdout == "hello-e2e\n"
        assert ex.result_text == ["42"]
        assert all(m["channel"] == "iopub" for m in ex.of_type("stream") + ex.of_type("status"))
        busy_idle = [m["content"]["execution_state"] for m in ex.of_type("status")]
        assert busy_idle == ["busy", "idle"], busy_idle


def test_kernel_list_reflects_gateway_activity(jupyter_server, gateway, session, tmp_path):
    kernel_id = session["kernel"]["id"]
    with open_ws(jupyter_server, kernel_id) as ws:
        # Connections, state and activity come from the gateway: jupyter_server in gateway mode tracks none.
        model = wait_until(lambda: (m := server_kernel_model(jupyter_server, kernel_id)) and m["connections"] == 1
                           and m["execution_state"] == "idle" and m, 15, what="1 connection, idle")
        assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}
        assert model["name"] == "python3"
        before = datetime.strptime(model["last_activity"], ACTIVITY_FORMAT)
        assert gateway_model(gateway, kernel_id)["connections"] == 1
        status = jupyter_server.request("GET", "/api/status")  # also lists the gateway's kernels
        assert status.status == 200 and status.json()["kernels"] >= 1, (status.status, status.body)

        flag = tmp_path / "go"
        msg_id = ws.execute(gated_cell(flag))
        wait_until(lambda: (server_kernel_model(jupyter_server, kernel_id) or {}).get("execution_state") == "busy", 15,
                   what="execution_state busy in jupyter_server's kernel list")
        flag.touch()
        assert ws.collect(msg_id).stdout == "released\n"
        model = wait_until(lambda: (m := server_kernel_model(jupyter_server, kernel_id))
                           and m["execution_state"] == "idle" and m, 15, what="execution_state idle again")
        after = datetime.strptime(model["last_activity"], ACTIVITY_FORMAT)
        assert after > before, (before, after)

    wait_until(lambda: (server_kernel_model(jupyter_server, kernel_id) or {}).get("connections") == 0, 15,
               what="connections back to 0 after the websocket closed")


def test_interrupt_stops_running_cell(jupyter_server, session):
    kernel_id = session["kernel"]["id"]
    with open_ws(jupyter_server, kernel_id) as ws:
        msg_id = ws.execute("import time\ntime.sleep(30)\nprint('not interrupted')")
        ws.wait_for(lambda m: msg_parent_id(m) == msg_id and m["msg_type"] == "execute_input", 15,
                    what="execute_input of the sleeping cell")
        started = time.monotonic()
        resp = jupyter_server.request("POST", f"/api/kernels/{kernel_id}/interrupt", {})
        assert resp.status == 204, (resp.status, resp.body)
        ex = ws.collect(msg_id, timeout=10)
        assert time.monotonic() - started < 10
        assert [e["ename"] for e in ex.errors] == ["KeyboardInterrupt"], ex.summary()
        assert ex.reply["content"]["status"] == "error"
        assert "not interrupted" not in ex.stdout
        assert ws.run("print('still alive')").stdout == "still alive\n"


def test_restart_keeps_kernel_id_and_websocket(jupyter_server, gateway, session):
    kernel_id = session["kernel"]["id"]
    with open_ws(jupyter_server, kernel_id) as ws:
        old_pid = int(ws.run("import os\nmarker = 1\nprint(os.getpid())").stdout)

        resp = jupyter_server.request("POST", f"/api/kernels/{kernel_id}/restart", {})
        assert resp.status == 200, (resp.status, resp.body, jupyter_server.log()[-3000:])
        assert resp.json()["id"] == kernel_id
        assert kernel_id in gateway_kernel_ids(gateway)

        ex = ws.run("import os\nprint('marker' in globals(), os.getpid())", timeout=60)
        assert ex.reply["content"]["status"] == "ok", ex.summary()
        seen, new_pid = ex.stdout.split()
        assert seen == "False", "kernel state survived the restart"
        assert int(new_pid) != old_pid
        assert ex.reply["content"]["execution_count"] == 1
        # The gateway kept the socket open: jupyter_server would otherwise have had to reconnect upstream.
        assert f"Lost connection to Gateway: {kernel_id}" not in jupyter_server.log()


def test_reconnect_with_same_session_replays_missed_output(jupyter_server, gateway, session, tmp_path):
    kernel_id = session["kernel"]["id"]
    session_id = uuid.uuid4().hex
    flag = tmp_path / "go"
    with open_ws(jupyter_server, kernel_id, session_id) as ws:
        msg_id = ws.execute(gated_cell(flag, "print('late-output')"))
        ws.wait_for(lambda m: msg_parent_id(m) == msg_id and m["msg_type"] == "execute_input", 15,
                    what="execute_input of the gated cell")
    assert not any(m["msg_type"] == "stream" for m in ws.replies_to(msg_id))

    # The output is produced only once the gateway has no client left, and fully before we come back.
    wait_until(lambda: gateway_model(gateway, kernel_id)["connections"] == 0, 15, what="gateway sees 0 connections")
    flag.touch()
    wait_until(lambda: gateway_model(gateway, kernel_id)["execution_state"] == "idle", 15,
               what="gated cell finished while disconnected")

    with KernelWebSocket(jupyter_server.ws_url, kernel_id, jupyter_server.headers, session_id=session_id) as ws2:
        ex = ws2.collect(msg_id, timeout=15)
        assert ex.stdout == "late-output\n", ex.summary()
        assert ex.reply["content"]["status"] == "ok"
        assert ws2.run("print('after-replay')").stdout == "after-replay\n"


def test_binary_buffers_do_not_wedge_jupyter_server_proxy(jupyter_server, session):
    """Comm messages with binary buffers (ipywidgets FileUpload, ...) must not kill jupyter_server's relay.

    jupyter_server's gateway proxy utf8-decodes every frame it gets from the gateway; one legacy binary frame
    kills its reader task and the browser socket then stays open but silent (client contract, section 1.8).
    """
    kernel_id = session["kernel"]["id"]
    with open_ws(jupyter_server, kernel_id) as ws:
        ex = ws.run("from comm import create_comm\n"
                    "c = create_comm(target_name='e2e-nowhere', data={'a': 1}, buffers=[b'\\xff\\x86\\x00'])\n"
                    "c.send({'b': 2}, buffers=[b'\\xfe\\xff'])\n"
                    "print('sent')", timeout=15)
        assert ex.stdout == "sent\n", ex.summary()
        assert ws.run("print('still relayed')", timeout=15).stdout == "still relayed\n"


def test_delete_session_shuts_down_gateway_kernel(jupyter_server, gateway, session):
    kernel_id = session["kernel"]["id"]
    assert kernel_id in gateway_kernel_ids(gateway)
    resp = jupyter_server.request("DELETE", f"/api/sessions/{session['id']}")
    assert resp.status == 204, (resp.status, resp.body)
    wait_until(lambda: kernel_id not in gateway_kernel_ids(gateway), 30, what="kernel gone from gateway list")
    assert http("GET", f"{gateway.url}/api/kernels/{kernel_id}", gateway.headers).status == 404
    sessions = jupyter_server.request("GET", "/api/sessions").json()
    assert session["id"] not in [s["id"] for s in sessions]


def test_same_session_id_takes_over_open_websocket(gateway, gateway_kernel):
    """A second socket with the same session_id replaces the first one, which the gateway closes.

    Checked on the gateway's own websocket: jupyter_server's gateway proxy never closes the browser's old
    socket itself (``GatewayWebSocketConnection`` has no stale-session logic), so through jupyter_server two
    sockets with one session_id just keep reconnecting upstream and displacing each other.
    """
    session_id = uuid.uuid4().hex
    headers = gateway.headers
    with KernelWebSocket(gateway.ws_url, gateway_kernel, headers, session_id=session_id) as old:
        old.kernel_info()
        with KernelWebSocket(gateway.ws_url, gateway_kernel, headers, session_id=session_id) as new:
            assert old.wait_closed(15), "old websocket was not closed by the takeover"
            ex = new.run("print('to-the-new-one')")
            assert ex.stdout == "to-the-new-one\n"
            assert not any(msg_parent_id(m) == ex.msg_id for m in old.messages)
            wait_until(lambda: gateway_model(gateway, gateway_kernel)["connections"] == 1, 15,
                       what="gateway counts only the new connection")
