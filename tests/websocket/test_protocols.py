"""Websocket subprotocol negotiation and the v1 wire format, checked with an independent v1 codec (``wire.py``)."""

from __future__ import annotations

import base64
import json
import uuid

import websocket

from tests.services.client import KernelWS, make_msg
from tests.websocket.test_channels import ECHO_TARGET, is_status, parent_is
from tests.websocket.wire import V1, V1KernelWS, v1_decode, v1_encode


def response_headers(ws) -> dict[str, str]:
    return {k.lower(): v for k, v in (ws.ws.getheaders() or {}).items()}


def test_v1_is_selected_when_offered(gateway, kernel):
    with V1KernelWS(gateway, kernel) as ws:
        assert ws.ws.getsubprotocol() == V1
        assert response_headers(ws)["sec-websocket-protocol"] == V1
        msg_id = ws.execute("print('over v1')\n6 * 7")
        frames = []
        while not (any(m["msg_type"] == "execute_reply" for m in frames) and any(is_status("idle")(m) for m in frames)):
            ws.ws.settimeout(30)
            raw = ws.ws.recv()
            assert isinstance(raw, bytes), "every v1 frame is binary"
            msg = v1_decode(raw)
            if msg["parent_header"].get("msg_id") == msg_id:
                frames.append(msg)
    by_type = {m["msg_type"]: m for m in frames}
    assert by_type["stream"]["channel"] == "iopub"
    assert by_type["stream"]["content"] == {"name": "stdout", "text": "over v1\n"}
    assert by_type["execute_result"]["content"]["data"]["text/plain"] == "42"
    assert by_type["execute_reply"]["channel"] == "shell"
    assert by_type["execute_reply"]["content"]["status"] == "ok"
    for msg in frames:
        assert msg["buffers"] == []
        for key in ("msg_id", "msg_type", "session", "username", "version"):
            assert isinstance(msg["header"][key], str)


def test_v1_is_selected_among_other_offers(gateway, kernel):
    with V1KernelWS(gateway, kernel, subprotocols=["something.else", V1]) as ws:
        assert ws.ws.getsubprotocol() == V1
        out, _ = ws.run("print('chosen')")
    assert out == "chosen\n"


def test_no_subprotocol_offered_means_legacy_and_no_header(gateway, kernel):
    with KernelWS(gateway, kernel) as ws:
        assert "sec-websocket-protocol" not in response_headers(ws)
        assert ws.ws.getsubprotocol() is None
        msg_id = ws.execute("print('legacy')")
        msgs = []
        while not any(is_status("idle", msg_id)(m) for m in msgs):
            ws.ws.settimeout(30)
            raw = ws.ws.recv()
            assert isinstance(raw, str), "legacy messages without buffers are text frames"
            msgs.append(json.loads(raw))
        assert all("channel" in m and "msg_id" in m and "msg_type" in m for m in msgs)
    assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == ["legacy\n"]


def test_v1_control_and_stdin_channels(gateway, kernel):
    with V1KernelWS(gateway, kernel, session_id=uuid.uuid4().hex) as ws:
        info = make_msg("kernel_info_request", {}, channel="control")
        ws.send(info)
        reply, _ = ws.recv_until(lambda m: m["msg_type"] == "kernel_info_reply" and parent_is(info["header"]["msg_id"])(m))
        assert reply["channel"] == "control"
        assert reply["content"]["status"] == "ok"

        msg_id = ws.execute("print('v1 got', input('v1?'))", allow_stdin=True)
        request, _ = ws.recv_until(lambda m: m["msg_type"] == "input_request", 30)
        assert request["channel"] == "stdin" and request["content"]["prompt"] == "v1?"
        answer = make_msg("input_reply", {"value": "yes"}, channel="stdin")
        answer["parent_header"] = request["header"]
        ws.send(answer)
        msgs = ws.collect(msg_id, 30)
    assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == ["v1 got yes\n"]


def test_v1_buffers_in_both_directions(gateway, kernel):
    with V1KernelWS(gateway, kernel) as ws:
        _, msgs = ws.run(ECHO_TARGET)
        assert next(m for m in msgs if m["msg_type"] == "execute_reply")["content"]["status"] == "ok"
        comm_id = uuid.uuid4().hex
        ws.send(make_msg("comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}}))
        request = make_msg("comm_msg", {"comm_id": comm_id, "data": {}})
        ws.send(request, buffers=[b"\x00v1-buffer\xff", b"", b"third"])
        echo, _ = ws.recv_until(lambda m: m["msg_type"] == "comm_msg" and parent_is(request["header"]["msg_id"])(m))
    assert echo["channel"] == "iopub"
    assert echo["content"]["comm_id"] == comm_id and echo["content"]["data"] == {"n": 3}
    assert echo["buffers"] == [b"\xffreffub-1v\x00", b"", b"driht"]


def test_v1_frame_with_raw_parts_is_passed_verbatim(gateway, kernel):
    """Parts the client encodes itself (non-default spacing, unicode) reach the kernel intact."""
    with V1KernelWS(gateway, kernel) as ws:
        msg_id = uuid.uuid4().hex
        header = {"msg_id": msg_id, "msg_type": "execute_request", "username": "t", "session": "s", "version": "5.3",
                  "date": "2024-01-01T00:00:00Z"}
        content = {"code": "print('h\u00e9llo \u2603')", "silent": False, "store_history": False,
                   "user_expressions": {}, "allow_stdin": False}
        raw = [json.dumps(header, indent=1).encode(), b"{ }", b"{}", json.dumps(content, ensure_ascii=False).encode()]
        ws.ws.send_binary(v1_encode("shell", None, raw_parts=raw))
        msgs = ws.collect(msg_id, 30)
    assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == ["h\u00e9llo \u2603\n"]


def test_legacy_and_v1_clients_share_a_kernel(gateway, kernel):
    with KernelWS(gateway, kernel) as legacy, V1KernelWS(gateway, kernel) as v1:
        msg_id = legacy.execute("print('to everyone')")
        legacy_msgs = legacy.collect(msg_id, 30)
        _, v1_msgs = v1.recv_until(is_status("idle", msg_id), 30)
    assert [m["content"]["text"] for m in legacy_msgs if m["msg_type"] == "stream"] == ["to everyone\n"]
    v1_streams = [m["content"]["text"] for m in v1_msgs if m["msg_type"] == "stream" and parent_is(msg_id)(m)]
    assert v1_streams == ["to everyone\n"]
    # the reply went to the session that asked, not to the v1 bystander
    assert not [m for m in v1_msgs if m["msg_type"] == "execute_reply"]


def test_jupyter_server_relay_gets_buffers_as_base64_text(gateway, kernel):
    """jupyter_server's gateway client (User-Agent Tornado/...) decodes every frame as UTF-8: buffers come as base64."""
    code = ("from ipykernel.comm import Comm\n"
            "c = Comm(target_name='t')\n"
            "c.send(data={'k': 2}, buffers=[b'\\xff\\x00abc', b'second'])\n")
    header = [*(f"{k}: {v}" for k, v in gateway.headers.items()), "User-Agent: Tornado/6.4"]
    ws = websocket.create_connection(f"{gateway.ws_url}/api/kernels/{kernel}/channels", header=header, timeout=30)
    try:
        request = make_msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                               "user_expressions": {}, "allow_stdin": False})
        ws.send(json.dumps(request))
        frames = []
        while not any(is_status("idle", request["header"]["msg_id"])(m) for _, m in frames):
            raw = ws.recv()
            frames.append((raw, json.loads(raw)))
    finally:
        ws.close()
    assert all(isinstance(raw, str) for raw, _ in frames), "a Tornado client must never get a binary frame"
    comm = [m for _, m in frames if m["msg_type"] == "comm_msg"]
    assert len(comm) == 1
    assert [base64.b64decode(b) for b in comm[0]["buffers"]] == [b"\xff\x00abc", b"second"]
    assert comm[0]["content"]["data"] == {"k": 2}
