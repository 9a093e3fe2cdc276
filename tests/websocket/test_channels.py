"""The kernel websocket (legacy protocol) against real ipykernel kernels: channels, stdin, lifecycle, sessions.

Every test drives a real gateway process and real kernels; synchronisation is by blocking receives with
timeouts and by polling the REST API, never by sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import psutil
import pytest

from tests.services.client import (
    KernelWS,
    call,
    decode_legacy_binary,
    encode_legacy_binary,
    kernel_model,
    make_msg,
    recv_close,
)
from tests.services.gateway import wait_until
from tests.websocket.wire import V1KernelWS

LEGACY_KEYS = {"channel", "msg_id", "msg_type", "header", "parent_header", "metadata", "content", "buffers"}


def parent_is(msg_id: str):
    return lambda m: m.get("parent_header", {}).get("msg_id") == msg_id


def is_status(state: str, msg_id: str | None = None):
    def pred(m: dict) -> bool:
        if m.get("msg_type") != "status" or m["content"].get("execution_state") != state:
            return False
        return msg_id is None or m.get("parent_header", {}).get("msg_id") == msg_id
    return pred


def collect_everything(ws: KernelWS, msg_id: str, timeout: float = 30) -> list[dict]:
    """Every message received (whatever its parent) until ``msg_id`` has both its reply and its idle status."""
    seen: list[dict] = []
    got_reply = got_idle = False
    while not (got_reply and got_idle):
        msg, more = ws.recv_until(lambda m: parent_is(msg_id)(m) and (
            m["msg_type"].endswith("_reply") or is_status("idle")(m)), timeout)
        seen += more
        got_reply = got_reply or msg["msg_type"].endswith("_reply")
        got_idle = got_idle or msg["msg_type"] == "status"
    return seen


def kernel_process(gw, kernel_id: str) -> psutil.Process:
    """The kernel's process: the gateway child whose command line names the kernel's connection file."""
    for child in psutil.Process(gw.proc.pid).children(recursive=True):
        try:
            if any(f"kernel-{kernel_id}.json" in arg for arg in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no child process of the gateway runs kernel {kernel_id}")


# -- messages ------------------------------------------------------------------------------------------


def test_execute_round_trip_legacy_text_frames(gateway, kernel):
    with KernelWS(gateway, kernel) as ws:
        msg_id = ws.execute("print('hello from the kernel')\n6 * 7")
        frames, reply, idle = [], None, None
        deadline = time.monotonic() + 30
        while reply is None or idle is None:
            ws.ws.settimeout(max(deadline - time.monotonic(), 0.01))
            raw = ws.ws.recv()
            assert isinstance(raw, str), "messages without buffers must arrive as text frames"
            msg = json.loads(raw)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            frames.append(msg)
            if msg["msg_type"] == "execute_reply":
                reply = msg
            if is_status("idle")(msg):
                idle = msg

    for msg in frames:
        assert LEGACY_KEYS <= set(msg), sorted(msg)
        assert msg["msg_id"] == msg["header"]["msg_id"]
        assert msg["msg_type"] == msg["header"]["msg_type"]
        assert msg["buffers"] == []
        assert isinstance(msg["metadata"], dict) and isinstance(msg["content"], dict)
        for key in ("msg_id", "msg_type", "session", "username", "version", "date"):
            assert isinstance(msg["header"][key], str), (key, msg["header"])
    by_type = {m["msg_type"]: m for m in frames}
    # busy opens the request's iopub messages; the shell reply may come before it (channels are not ordered
    # against each other: a busy machine showed execute_reply first)
    first_iopub = next(m for m in frames if m["channel"] == "iopub")
    assert first_iopub["msg_type"] == "status" and first_iopub["content"]["execution_state"] == "busy"
    assert by_type["stream"]["channel"] == "iopub"
    assert by_type["stream"]["content"] == {"name": "stdout", "text": "hello from the kernel\n"}
    assert by_type["execute_result"]["channel"] == "iopub"
    assert by_type["execute_result"]["content"]["data"]["text/plain"] == "42"
    assert reply["channel"] == "shell"
    assert reply["content"]["status"] == "ok"
    assert reply["content"]["execution_count"] == by_type["execute_result"]["content"]["execution_count"]
    assert idle["channel"] == "iopub"
    iopub = [m["msg_type"] for m in frames if m["channel"] == "iopub"]
    assert iopub[-1] == "status", "idle is the last iopub message of the request"
    assert iopub.index("stream") < len(iopub) - 1 and iopub.index("execute_result") < len(iopub) - 1


def test_message_without_channel_goes_to_shell(gateway, kernel):
    with KernelWS(gateway, kernel) as ws:
        no_channel = make_msg("kernel_info_request", {}, channel=None)
        assert "channel" not in no_channel
        msg_id = ws.send(no_channel)
        reply, _ = ws.recv_until(lambda m: parent_is(msg_id)(m) and m["msg_type"] == "kernel_info_reply")
        assert reply["channel"] == "shell"
        # the same request naming control is answered on control: the channel really is honoured
        control = make_msg("kernel_info_request", {}, channel="control")
        msg_id = ws.send(control)
        reply, _ = ws.recv_until(lambda m: parent_is(msg_id)(m) and m["msg_type"] == "kernel_info_reply")
        assert reply["channel"] == "control"
        # and an execute_request without channel runs
        request = make_msg("execute_request", {"code": "print('no channel')", "silent": False, "store_history": False,
                                               "user_expressions": {}, "allow_stdin": False}, channel=None)
        msgs = ws.collect(ws.send(request))
        assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == ["no channel\n"]
        assert [m["channel"] for m in msgs if m["msg_type"] == "execute_reply"] == ["shell"]


def test_float_epoch_date_and_buffers_object_tolerated(gateway, kernel):
    """nbclient via GatewayKernelManager: float ``header.date``, ``"buffers": {}``, top-level msg_id/msg_type, no channel."""
    with KernelWS(gateway, kernel) as ws:
        msg = make_msg("execute_request", {"code": "print('dated')", "silent": False, "store_history": False,
                                           "user_expressions": {}, "allow_stdin": False}, channel=None)
        msg["header"]["date"] = time.time()
        msg["buffers"] = {}
        msg["msg_id"] = msg["header"]["msg_id"]
        msg["msg_type"] = msg["header"]["msg_type"]
        msgs = ws.collect(ws.send(msg))
    assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == ["dated\n"]
    reply = next(m for m in msgs if m["msg_type"] == "execute_reply")
    assert reply["content"]["status"] == "ok"
    assert reply["parent_header"]["msg_id"] == msg["header"]["msg_id"]


# -- buffers (legacy binary frames) ------------------------------------------------------------------------


def test_comm_message_with_buffers_arrives_as_legacy_binary_frame(gateway, kernel):
    code = ("from ipykernel.comm import Comm\n"
            "c = Comm(target_name='t')\n"
            "c.send(data={'k': 1}, buffers=[b'\\xff\\x00abc', b'second'])\n")
    with KernelWS(gateway, kernel) as ws:
        msg_id = ws.execute(code)
        binary, deadline = [], time.monotonic() + 30
        while True:
            ws.ws.settimeout(max(deadline - time.monotonic(), 0.01))
            raw = ws.ws.recv()
            if isinstance(raw, bytes):
                binary.append(raw)
                continue
            msg = json.loads(raw)
            if is_status("idle", msg_id)(msg):
                break
    assert len(binary) == 1, f"expected one binary frame, got {len(binary)}"
    raw = binary[0]
    count = int.from_bytes(raw[:4], "big")
    first = int.from_bytes(raw[4:8], "big")
    assert count == 3 and first == 4 * (count + 1), (count, first)
    msg = decode_legacy_binary(raw)
    assert msg["msg_type"] == "comm_msg" == msg["header"]["msg_type"]
    assert msg["msg_id"] == msg["header"]["msg_id"]
    assert msg["channel"] == "iopub"
    assert msg["parent_header"]["msg_id"] == msg_id
    assert msg["content"]["data"] == {"k": 1}
    assert msg["buffers"] == [b"\xff\x00abc", b"second"]


ECHO_TARGET = """
from comm import get_comm_manager
def _echo_target(comm, open_msg):
    def _on_msg(msg):
        comm.send(data={'n': len(msg['buffers'])}, buffers=[bytes(b)[::-1] for b in msg['buffers']])
    comm.on_msg(_on_msg)
get_comm_manager().register_target('echo', _echo_target)
"""


def test_client_binary_frame_with_buffers_is_accepted(gateway, kernel):
    with KernelWS(gateway, kernel) as ws:
        _, msgs = ws.run(ECHO_TARGET)
        assert next(m for m in msgs if m["msg_type"] == "execute_reply")["content"]["status"] == "ok"
        comm_id = uuid.uuid4().hex
        ws.send(make_msg("comm_open", {"comm_id": comm_id, "target_name": "echo", "data": {}}))
        request = make_msg("comm_msg", {"comm_id": comm_id, "data": {}})
        ws.ws.send_binary(encode_legacy_binary(request, [b"\x00\x01\x02xyz", b"\xfe" * 1000]))
        echo, _ = ws.recv_until(lambda m: m["msg_type"] == "comm_msg" and parent_is(request["header"]["msg_id"])(m))
    assert echo["content"]["comm_id"] == comm_id
    assert echo["content"]["data"] == {"n": 2}
    assert echo["buffers"] == [b"zyx\x02\x01\x00", b"\xfe" * 1000]


# -- stdin --------------------------------------------------------------------------------------------------


def test_input_request_reaches_only_the_asking_session(gateway, kernel):
    with KernelWS(gateway, kernel, session_id=uuid.uuid4().hex) as asking, \
            KernelWS(gateway, kernel, session_id=uuid.uuid4().hex) as other:
        msg_id = asking.execute("answer = input('q?')\nprint('got', answer)", allow_stdin=True)
        request, _ = asking.recv_until(lambda m: m["msg_type"] == "input_request", 30)
        assert request["channel"] == "stdin"
        assert request["content"]["prompt"] == "q?"
        assert request["parent_header"]["msg_id"] == msg_id
        reply = make_msg("input_reply", {"value": "forty-two"}, channel="stdin")
        reply["parent_header"] = request["header"]
        asking.send(reply)
        msgs = asking.collect(msg_id, 30)
        assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == ["got forty-two\n"]
        assert next(m for m in msgs if m["msg_type"] == "execute_reply")["content"]["status"] == "ok"
        # the other session sees the request's iopub traffic (so it was listening) but not its stdin or shell
        _, seen = other.recv_until(is_status("idle", msg_id), 30)
    mine = [m for m in seen if m["parent_header"].get("msg_id") in (msg_id, request["header"]["msg_id"])]
    assert any(m["msg_type"] == "stream" and m["content"]["text"] == "got forty-two\n" for m in mine)
    assert all(m["channel"] == "iopub" for m in mine), [(m["channel"], m["msg_type"]) for m in mine]
    assert "input_request" not in [m["msg_type"] for m in seen]


def test_input_request_right_after_connecting_is_not_lost(gateway, kernel):
    """A fresh session's first request asks for input: the kernel's stdin must already know the session (its
    ROUTER drops messages for unknown peers), so the gateway holds shell requests until stdin is connected.
    Without that, 9 of 40 such cells waited for ever on a busy machine."""
    for _ in range(30):
        with KernelWS(gateway, kernel, session_id=uuid.uuid4().hex) as ws:
            msg_id = ws.execute("print('got', input('q?'))", allow_stdin=True)
            request, _ = ws.recv_until(lambda m: m["msg_type"] == "input_request", 30)
            reply = make_msg("input_reply", {"value": "yes"}, channel="stdin")
            reply["parent_header"] = request["header"]
            ws.send(reply)
            msgs = ws.collect(msg_id, 30)
            assert "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream") == "got yes\n"


# -- lifecycle ------------------------------------------------------------------------------------------------


def test_interrupt_stops_a_busy_loop(gateway, kernel):
    with KernelWS(gateway, kernel) as ws:
        msg_id = ws.execute("print('spinning', flush=True)\nwhile True:\n    pass\n")
        ws.recv_until(lambda m: m["msg_type"] == "stream" and m["content"]["text"] == "spinning\n", 30)
        started = time.monotonic()
        status, body, _ = call(gateway, "POST", f"/api/kernels/{kernel}/interrupt")
        assert status == 204, (status, body)
        msgs = ws.collect(msg_id, 10)
        elapsed = time.monotonic() - started
        errors = [m for m in msgs if m["msg_type"] == "error"]
        assert [e["content"]["ename"] for e in errors] == ["KeyboardInterrupt"]
        reply = next(m for m in msgs if m["msg_type"] == "execute_reply")
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert elapsed < 5, f"interrupt took {elapsed:.1f}s"
        out, _ = ws.run("print('still alive')")
        assert out == "still alive\n"


def test_rest_restart_is_seen_on_the_open_websocket(gateway, kernel):
    """A requested restart reaches the open socket as the kernel tells it (the old kernel's shutdown_reply with
    restart), without the synthetic ``restarting`` status that clients take for a crash; the socket keeps working.

    The new kernel's ``starting`` status is not waited for: it is published before anyone can be subscribed to
    the new kernel's iopub (ZMQ PUB drops what no subscriber was connected for). The restart answers 200 once
    the gateway has the new kernel's iopub (kernel_info round trip), so what follows it cannot be missed."""
    with KernelWS(gateway, kernel) as ws:
        out, _ = ws.run("import os\nmarker = 1\nprint(os.getpid())")
        old_pid = int(out)
        status, body, _ = call(gateway, "POST", f"/api/kernels/{kernel}/restart")
        assert status == 200, (status, body)
        assert body["id"] == kernel
        # the old kernel said it before it exited, to a subscription that was up: it has arrived already
        shutdown, seen = ws.recv_until(lambda m: m["msg_type"] == "shutdown_reply" and m["channel"] == "iopub", 30)
        assert shutdown["content"].get("restart") is True
        out, msgs = ws.run("import os\nprint('marker' in globals(), os.getpid())", 60)
    fresh, pid = out.split()
    assert fresh == "False", "the restarted kernel still has the old namespace"
    assert int(pid) != old_pid
    assert not [m for m in seen + msgs if is_status("restarting")(m)]
    assert kernel_model(gateway, kernel)["execution_state"] == "idle"


def test_killed_kernel_is_restarted_and_clients_are_told(gateway, kernel):
    with KernelWS(gateway, kernel, session_id=uuid.uuid4().hex) as ws1, KernelWS(gateway, kernel) as ws2:
        out, _ = ws1.run("import os\nprint(os.getpid())")
        old_pid = int(out)
        assert kernel_process(gateway, kernel).pid == old_pid
        ws2.run("1")
        os.kill(old_pid, signal.SIGKILL)
        killed = time.monotonic()
        ws1.recv_until(is_status("restarting"), 20)
        ws2.recv_until(is_status("restarting"), 20)
        noticed = time.monotonic() - killed
        assert noticed < 10, f"clients heard of the restart only after {noticed:.1f}s"
        # idle again once the gateway has the new kernel's iopub; output sent before that could be missed
        wait_until(lambda: kernel_model(gateway, kernel)["execution_state"] == "idle", 60, what="idle after auto-restart")
        out, _ = ws1.run("import os\nprint(os.getpid())", 60)
        new_pid = int(out)
        assert new_pid != old_pid
        assert kernel_process(gateway, kernel).pid == new_pid
        out, _ = ws2.run("print('second client works')", 30)
        assert out == "second client works\n"
    wait_until(lambda: kernel_model(gateway, kernel)["execution_state"] == "idle", 30, what="idle after the runs")


def test_deleted_kernel_closes_its_websockets(gateway, kernel):
    with KernelWS(gateway, kernel) as ws:
        ws.run("1")
        status, body, _ = call(gateway, "DELETE", f"/api/kernels/{kernel}")
        assert status == 204, (status, body)
        code, reason = recv_close(ws.ws, 60)
    assert code == 1000, (code, reason)
    assert "shut down" in reason
    assert call(gateway, "GET", f"/api/kernels/{kernel}")[0] == 404


# -- sessions: replay, takeover, first frame --------------------------------------------------------------------


def gated(flag, then: str) -> str:
    """Code that keeps the kernel busy until the test creates ``flag``, then runs ``then`` (no timing guesses)."""
    return f"import os, time\nwhile not os.path.exists({str(flag)!r}):\n    time.sleep(0.02)\n{then}\n"


def test_disconnect_buffers_and_reconnect_replays(gateway, kernel, tmp_path):
    session_id = uuid.uuid4().hex
    flag = tmp_path / "go"
    ws = KernelWS(gateway, kernel, session_id=session_id)
    try:
        wait_until(lambda: kernel_model(gateway, kernel)["connections"] == 1, 30, what="connections == 1")
        msg_id = ws.execute(gated(flag, "print('late-output')"))
        ws.recv_until(is_status("busy", msg_id), 30)
    finally:
        ws.close()
    # the output is produced only once the gateway has no client left
    wait_until(lambda: kernel_model(gateway, kernel)["connections"] == 0, 30, what="connections == 0")
    flag.touch()
    wait_until(lambda: kernel_model(gateway, kernel)["execution_state"] == "idle", 30, what="kernel idle again")
    with KernelWS(gateway, kernel, session_id=session_id) as ws:
        msgs = ws.collect(msg_id, 15)
        assert kernel_model(gateway, kernel)["connections"] == 1
    assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == ["late-output\n"]
    reply = next(m for m in msgs if m["msg_type"] == "execute_reply")
    assert reply["channel"] == "shell" and reply["content"]["status"] == "ok"
    assert msgs[-1]["msg_type"] in ("status", "execute_reply")
    assert any(is_status("idle", msg_id)(m) for m in msgs)


def test_reconnect_with_another_session_id_gets_no_replay(gateway, kernel, tmp_path):
    session_id = uuid.uuid4().hex
    flag = tmp_path / "go"
    ws = KernelWS(gateway, kernel, session_id=session_id)
    try:
        msg_id = ws.execute(gated(flag, "print('for the first session only')"))
        ws.recv_until(is_status("busy", msg_id), 30)
    finally:
        ws.close()
    # the output is kept for the first session while nobody is connected
    wait_until(lambda: kernel_model(gateway, kernel)["connections"] == 0, 30, what="connections == 0")
    flag.touch()
    wait_until(lambda: kernel_model(gateway, kernel)["execution_state"] == "idle", 30, what="kernel idle again")
    with KernelWS(gateway, kernel, session_id=uuid.uuid4().hex) as other:
        marker = other.execute("print('marker')")
        _, seen = other.recv_until(is_status("idle", marker), 30)
    assert not [m for m in seen if m["parent_header"].get("msg_id") == msg_id]


def test_same_session_id_takes_over_the_old_socket(gateway, kernel):
    session_id = uuid.uuid4().hex
    with KernelWS(gateway, kernel, session_id=session_id) as ws1:
        ws1.run("1")
        with KernelWS(gateway, kernel, session_id=session_id) as ws2:
            code, reason = recv_close(ws1.ws, 15)
            assert code == 1000, (code, reason)
            assert "replaced" in reason
            first = ws2.execute("print('on ws2')")
            msgs = ws2.collect(first, 30)
            assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == ["on ws2\n"]
            assert [m["msg_type"] for m in msgs].count("execute_reply") == 1
            ids = [m["msg_id"] for m in msgs]
            assert len(ids) == len(set(ids)), "a message was delivered twice"
            # nothing of the first request arrives again before a second request completes
            second = ws2.execute("print('again')")
            seen = collect_everything(ws2, second)
            assert not [m for m in seen if parent_is(first)(m)], "messages of the first request were duplicated"
            assert kernel_model(gateway, kernel)["connections"] == 1


@pytest.mark.parametrize("client,named_session", [(KernelWS, True), (KernelWS, False), (V1KernelWS, False)],
                         ids=["legacy-session_id", "legacy-no_session_id", "v1-no_session_id"])
def test_request_sent_as_first_frame_is_answered(gateway, kernel, client, named_session):
    for attempt in range(5):
        session_id = uuid.uuid4().hex if named_session else None
        with client(gateway, kernel, session_id=session_id) as ws:
            msg_id = ws.execute(f"print('first frame {attempt}')")
            msgs = ws.collect(msg_id, 30)
        assert [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"] == [f"first frame {attempt}\n"]
