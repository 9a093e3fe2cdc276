"""Gateway memory under an output flood with many clients that stop reading.

Every kernel's output is kept once, in a backlog bounded per kernel and in total, however many
clients are connected; a client that falls too far behind is closed (1013) with a reason, and its
session resumes with a notice of what it lost.
"""

from __future__ import annotations

import base64
import os
import socket
import threading
import time

import pytest

from tests.services.client import KernelWS, call, make_msg, start_kernel
from tests.services.gateway import wait_until

STALLED = 50
LINES = 40_000
OUTPUT = LINES * 1000  # 40 MB of stdout
# ipykernel sends what was written in one go as one message (40 MB here); flushing every 100 lines gives
# 400 messages of 100 kB instead. Both run with the default bounds (64 MiB per kernel): the reading clients
# can never fall that far behind a 40 MB flood, however slowly the machine lets them read, and the stalled
# clients are let go by the stall timeout, or by the backlog bound if it is reached first;
# test_slow_client_is_let_go_at_the_backlog_bound covers the bound on its own.
FLOOD_CODE = {
    "one-message": f"import sys\nline = 'x' * 999 + '\\n'\nfor _ in range({LINES}):\n    sys.stdout.write(line)\n",
    "many-messages": f"import sys\nline = 'x' * 999 + '\\n'\nfor i in range({LINES}):\n    sys.stdout.write(line)\n"
                     "    if i % 100 == 99:\n        sys.stdout.flush()\n",
}
RSS_GROWTH_LIMIT = 200 * 2**20
CLOSE_REASON = "this client read too slowly; reconnect with the same session_id to resume"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stalled_client(gw, kernel_id: str, session_id: str) -> socket.socket:
    """A websocket that completes its handshake and then reads nothing, with a tiny receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(15)
    sock.connect((gw.host, gw.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /api/kernels/{kernel_id}/channels?session_id={session_id} HTTP/1.1\r\n"
        f"Host: {gw.host}:{gw.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: token {gw.token}\r\n\r\n".encode()
    )
    response = b""
    while not response.endswith(b"\r\n\r\n"):  # byte by byte: nothing past the headers is taken
        byte = sock.recv(1)
        assert byte, f"connection closed during the handshake: {response!r}"
        response += byte
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


class Reader(threading.Thread):
    """Reads everything; counts the stdout bytes of one request and notes its idle status."""

    def __init__(self, ws: KernelWS, msg_id: str) -> None:
        super().__init__(daemon=True)
        self.ws, self.msg_id = ws, msg_id
        self.stdout = 0
        self.idle = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.idle:
                msg = self.ws.recv(120)
                if msg.get("parent_header", {}).get("msg_id") != self.msg_id:
                    continue
                if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                    self.stdout += len(msg["content"]["text"])
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    self.idle = True
        except BaseException as exc:  # reported by the test
            self.error = exc


def drained_to_the_end(sock: socket.socket, deadline: float) -> bool:
    """Read what the server sent until it closed the connection; False if it is still open at ``deadline``."""
    while time.monotonic() < deadline:
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.1))
            if not sock.recv(1 << 20):
                return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
    return False


@pytest.mark.parametrize("shape", list(FLOOD_CODE))
def test_stalled_clients_cost_bounded_memory_and_readers_get_everything(start_gw, shape):
    gw = start_gw()
    kernel_id = start_kernel(gw)
    stalled: list[socket.socket] = []
    try:
        readers = [KernelWS(gw, kernel_id, skip_utf8_validation=True) for _ in range(2)]
        readers[0].run("1", 30)
        stalled = [stalled_client(gw, kernel_id, f"stalled-{i}") for i in range(STALLED)]
        wait_until(lambda: call(gw, "GET", f"/api/kernels/{kernel_id}")[1]["connections"] == STALLED + 2, 30,
                   what="all clients attached")
        baseline = rss(gw.proc.pid)

        request = make_msg("execute_request", {"code": FLOOD_CODE[shape], "silent": False, "store_history": False,
                                               "user_expressions": {}, "allow_stdin": False})
        threads = [Reader(ws, request["header"]["msg_id"]) for ws in readers]
        for thread in threads:
            thread.start()
        readers[0].send(request)
        peak = baseline
        deadline = time.monotonic() + 180
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            peak = max(peak, rss(gw.proc.pid))
            time.sleep(0.05)
        for thread in threads:
            assert thread.error is None, f"a reading client failed: {thread.error!r}"
            assert thread.idle, "a reading client did not see the final idle status in time"
            assert thread.stdout == OUTPUT, f"a reading client got {thread.stdout} of {OUTPUT} bytes of stdout"
        growth = peak - baseline
        print(f"gateway RSS: baseline {baseline / 2**20:.0f} MiB, peak {peak / 2**20:.0f} MiB, "
              f"growth {growth / 2**20:.0f} MiB with {STALLED} stalled clients")
        assert growth < RSS_GROWTH_LIMIT, f"gateway RSS grew by {growth / 2**20:.0f} MiB"

        if shape == "one-message":
            # the 40 MB message sits half-sent in every stalled socket: the stall timeout lets each go with the
            # reason, and its connection ends
            wait_until(lambda: gw.log().count(CLOSE_REASON) >= STALLED, 60, what="every stalled client closed")
            end = time.monotonic() + 90
            still_open = [i for i, sock in enumerate(stalled) if not drained_to_the_end(sock, end)]
            assert not still_open, f"stalled clients {still_open} were never disconnected"
        # else 40 MB of 100 kB messages fits the kernel's 64 MiB backlog: the stalled clients may stay, holding it

        # a stalled session resumes (told what it lost, if it was let go), replays to the end and runs code
        with KernelWS(gw, kernel_id, session_id="stalled-7", skip_utf8_validation=True) as back:
            flood_id = request["header"]["msg_id"]
            _, seen = back.recv_until(lambda m: m.get("parent_header", {}).get("msg_id") == flood_id
                                      and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle", 60)
            if shape == "one-message":
                assert seen[0]["msg_type"] == "stream" and seen[0]["content"]["name"] == "stderr", seen[0]
                assert "messages were dropped while this client was disconnected or reading too slowly" \
                    in seen[0]["content"]["text"], seen[0]["content"]["text"]
            out, _ = back.run("print('resumed')", 60)
            assert out.endswith("resumed\n")
        for ws in readers:
            ws.close()
    finally:
        for sock in stalled:
            sock.close()
        call(gw, "DELETE", f"/api/kernels/{kernel_id}")


def test_slow_client_is_let_go_at_the_backlog_bound(start_gw):
    """A named client that stops reading is closed once the kernel's backlog passes its bound (long before the
    stall timeout), and on its return is told how many messages it lost."""
    gw = start_gw("--KernelRegistry.buffer_max_bytes_per_kernel=4194304")
    kernel_id = start_kernel(gw)
    sock = None
    try:
        sock = stalled_client(gw, kernel_id, "slow")
        # 20 MB in 200 messages, asked for by a client that leaves at once (its unnamed session is dropped, so
        # the stalled client is the only one the backlog keeps output for): its socket buffers take a few MB,
        # the backlog the rest, until the bound
        flood = FLOOD_CODE["many-messages"].replace(str(LINES), "20000")
        with KernelWS(gw, kernel_id) as driver:
            flood_id = driver.execute(flood)
        assert drained_to_the_end(sock, time.monotonic() + 120), "the stalled client was never disconnected"
        wait_until(lambda: "the kernel's output buffer is full: " + CLOSE_REASON in gw.log(), 60,
                   what="the close reason in the log")
        with KernelWS(gw, kernel_id, session_id="slow", skip_utf8_validation=True) as back:
            _, seen = back.recv_until(lambda m: m.get("parent_header", {}).get("msg_id") == flood_id
                                      and m["msg_type"] == "status" and m["content"]["execution_state"] == "idle", 60)
            assert seen[0]["msg_type"] == "stream" and seen[0]["content"]["name"] == "stderr", seen[0]
            assert "messages were dropped" in seen[0]["content"]["text"], seen[0]["content"]["text"]
    finally:
        if sock is not None:
            sock.close()
        call(gw, "DELETE", f"/api/kernels/{kernel_id}")
