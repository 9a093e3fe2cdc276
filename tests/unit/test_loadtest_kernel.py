"""The load-test kernel (benchmarks/loadtest_kernel) for real: a process started on a connection file written
here, driven by jupyter_client's BlockingKernelClient over its ZMQ channels."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.connect import write_connection_file

from tests.services.gateway import wait_until

KERNEL_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "loadtest_kernel"
DEADLINE = 60  # generous: the machine is shared with other test runs


@pytest.fixture
def kernel(tmp_path):
    """A running load-test kernel and a BlockingKernelClient with its channels started."""
    path, _ = write_connection_file(str(tmp_path / "kernel.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode())
    spec = json.loads((KERNEL_DIR / "kernel.json").read_text())
    argv = [sys.executable if a == "python" else a.replace("{resource_dir}", str(KERNEL_DIR)).replace(
        "{connection_file}", path) for a in spec["argv"]]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    kc = BlockingKernelClient(connection_file=path)
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=DEADLINE)
        yield proc, kc
    finally:
        kc.stop_channels()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def iopub_until_idle(kc: BlockingKernelClient, msg_id: str) -> list[dict]:
    """Every iopub message parented to ``msg_id``, up to and including its idle status."""
    got = []
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=DEADLINE)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        got.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return got
    raise TimeoutError(f"no idle status for {msg_id}")


def shell_reply(kc: BlockingKernelClient, msg_id: str) -> dict:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        msg = kc.get_shell_msg(timeout=DEADLINE)
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg
    raise TimeoutError(f"no reply to {msg_id}")


def test_kernel_info(kernel):
    _, kc = kernel
    reply = kc.kernel_info(reply=True, timeout=DEADLINE)
    assert reply["msg_type"] == "kernel_info_reply"
    assert reply["content"]["protocol_version"] == "5.3"
    assert reply["content"]["language_info"]["name"] == "python"
    statuses = [m["content"]["execution_state"] for m in iopub_until_idle(kc, reply["parent_header"]["msg_id"])
                if m["msg_type"] == "status"]
    assert statuses == ["busy", "idle"]


def test_execute_echoes_the_code(kernel):
    _, kc = kernel
    msg_id = kc.execute("print('hello')")
    reply = shell_reply(kc, msg_id)
    assert reply["content"]["status"] == "ok"
    msgs = iopub_until_idle(kc, msg_id)
    types = [m["msg_type"] for m in msgs]
    assert types == ["status", "execute_input", "stream", "execute_result", "status"]
    assert msgs[2]["content"] == {"name": "stdout", "text": "print('hello')\n"}
    assert msgs[1]["content"]["execution_count"] == reply["content"]["execution_count"] == 1


@pytest.mark.parametrize("code", ["stream 500", "stream 20 every 0.01"])
def test_stream_n(kernel, code):
    _, kc = kernel
    msg_id = kc.execute(code)
    msgs = iopub_until_idle(kc, msg_id)
    texts = [m["content"]["text"] for m in msgs if m["msg_type"] == "stream"]
    count = int(code.split()[1])
    assert texts == [f"{i}\n" for i in range(count)]
    assert shell_reply(kc, msg_id)["content"]["status"] == "ok"


def test_heartbeat_echoes(kernel):
    _, kc = kernel
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.linger = 0
    sock.rcvtimeo = DEADLINE * 1000
    sock.connect(f"tcp://127.0.0.1:{kc.hb_port}")
    try:
        for payload in (b"ping", b"\x00" * 100):
            sock.send(payload)
            assert sock.recv() == payload
    finally:
        sock.close()


def test_sigint_interrupts_without_killing(kernel):
    """The gateway interrupts a 'signal' kernel with SIGINT: the running request ends, the kernel lives on."""
    proc, kc = kernel
    msg_id = kc.execute("stream 100000 every 0.01")
    wait_until(lambda: kc.get_iopub_msg(timeout=DEADLINE)["msg_type"] == "stream", DEADLINE, what="streaming")
    proc.send_signal(signal.SIGINT)
    reply = shell_reply(kc, msg_id)
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert proc.poll() is None
    assert kc.kernel_info(reply=True, timeout=DEADLINE)["content"]["status"] == "ok"


def test_interrupt_request_on_control(kernel):
    _, kc = kernel
    msg_id = kc.execute("stream 100000 every 0.01")
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:  # interrupt the cell once it runs (sent before, it would find nothing running)
        msg = kc.get_iopub_msg(timeout=DEADLINE)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    request = kc.session.msg("interrupt_request", {})
    kc.control_channel.send(request)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        msg = kc.get_control_msg(timeout=DEADLINE)
        if msg["parent_header"].get("msg_id") == request["header"]["msg_id"]:
            assert msg["msg_type"] == "interrupt_reply"
            break
    assert shell_reply(kc, msg_id)["content"]["ename"] == "KeyboardInterrupt"


def test_shutdown_exits(kernel):
    proc, kc = kernel
    msg_id = kc.shutdown()  # on the control channel
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        msg = kc.get_control_msg(timeout=DEADLINE)
        if msg["parent_header"].get("msg_id") == msg_id:
            assert msg["msg_type"] == "shutdown_reply" and msg["content"]["status"] == "ok"
            break
    assert proc.wait(DEADLINE) == 0


def test_stays_small(kernel):
    """Light enough for a thousand on one machine: the brief's target is under 15 MB resident; allow some slack
    for another interpreter build."""
    proc, _ = kernel
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    assert rss_kb < 20 * 1024, f"{rss_kb} KiB resident"
