"""Small synchronous clients for the gateway's REST API and kernel websocket, used by the tests."""

from __future__ import annotations

import json
import struct
import time
import uuid
import urllib.error
import urllib.request
from typing import Any

import websocket  # websocket-client

from .gateway import GatewayServer


def call(
    gw: GatewayServer,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    auth: bool = True,
    raw: bytes | None = None,
    timeout: float = 60,
) -> tuple[int, Any, dict[str, str]]:
    """Send one request; return ``(status, parsed JSON body or raw bytes, headers)`` for any status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = dict(gw.headers if auth else {})
    if data is not None and raw is None:
        hdrs["Content-Type"] = "application/json"
    hdrs.update(headers or {})
    req = urllib.request.Request(gw.url + path, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, payload, rh = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, payload, rh = err.code, err.read(), dict(err.headers)
    if rh.get("Content-Type", "").startswith("application/json") and payload:
        return status, json.loads(payload), rh
    return status, payload, rh


def start_kernel(gw: GatewayServer, name: str | None = None, env: dict | None = None, timeout: float = 60) -> str:
    """Start a kernel and return its id; fail the test with the gateway's message otherwise."""
    status, body, _ = call(gw, "POST", "/api/kernels", {"name": name, "env": env or {}}, timeout=timeout)
    assert status == 201, (status, body)
    return body["id"]


def decode_legacy_binary(frame: bytes) -> dict:
    """Decode a legacy binary frame (u32 BE count, offsets, JSON, buffers) written independently of the server."""
    count = struct.unpack_from(">I", frame)[0]
    offsets = list(struct.unpack_from(f">{count}I", frame, 4)) + [len(frame)]
    msg = json.loads(frame[offsets[0]:offsets[1]])
    msg["buffers"] = [frame[offsets[i]:offsets[i + 1]] for i in range(1, count)]
    return msg


def make_msg(msg_type: str, content: dict, channel: str | None = "shell", session: str = "test") -> dict:
    msg = {
        "header": {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "test", "session": session,
                   "version": "5.3", "date": ""},
        "parent_header": {},
        "metadata": {},
        "content": content,
        "buffers": [],
    }
    if channel:
        msg["channel"] = channel
    return msg


class KernelWS:
    """A legacy-protocol websocket to one kernel: send requests, collect replies by parent msg_id."""

    def __init__(self, gw: GatewayServer, kernel_id: str, session_id: str | None = None, *, auth: bool = True,
                 timeout: float = 30, **kwargs: Any) -> None:
        query = f"?session_id={session_id}" if session_id else ""
        header = [f"{k}: {v}" for k, v in (gw.headers if auth else {}).items()]
        self.ws = websocket.create_connection(
            f"{gw.ws_url}/api/kernels/{kernel_id}/channels{query}", header=header, timeout=timeout, **kwargs
        )
        self.pending: list[dict] = []

    def send(self, msg: dict) -> str:
        self.ws.send(json.dumps(msg))
        return msg["header"]["msg_id"]

    def execute(self, code: str, **content: Any) -> str:
        return self.send(make_msg("execute_request", {"code": code, "silent": False, "store_history": False,
                                                      "user_expressions": {}, "allow_stdin": False, **content}))

    def recv(self, timeout: float = 30) -> dict:
        frame = recv_frame(self.ws, timeout)
        if isinstance(frame, bytes):
            return decode_legacy_binary(frame)
        return json.loads(frame)

    def collect(self, msg_id: str, timeout: float = 60) -> list[dict]:
        """Messages whose parent is ``msg_id``, until both its reply and its idle status arrived."""
        deadline = time.monotonic() + timeout
        got, reply, idle = [], False, False
        while not (reply and idle):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no reply and idle for {msg_id}; got {[m['msg_type'] for m in got]}")
            msg = self.recv(remaining)
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            got.append(msg)
            reply = reply or msg["msg_type"].endswith("_reply")
            idle = idle or (msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle")
        return got

    def recv_until(self, predicate, timeout: float = 30) -> tuple[dict, list[dict]]:
        """Receive until ``predicate(msg)`` is true; return that message and every message seen (it included)."""
        deadline = time.monotonic() + timeout
        seen: list[dict] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no matching message within {timeout}s; got {[m.get('msg_type') for m in seen]}")
            msg = self.recv(remaining)
            seen.append(msg)
            if predicate(msg):
                return msg, seen

    def wait_iopub(self, timeout: float = 30) -> None:
        """Ask kernel_info until its iopub status comes too, as clients do after a restart: output published before
        the gateway's subscription to a restarted kernel took is lost (ZMQ's slow joiner), the reply is not."""
        deadline = time.monotonic() + timeout
        while True:
            msg_id = self.send(make_msg("kernel_info_request", {}))
            try:
                self.collect(msg_id, timeout=min(2.0, max(deadline - time.monotonic(), 0.1)))
                return
            except (TimeoutError, websocket.WebSocketTimeoutException):
                if time.monotonic() >= deadline:
                    raise

    def run(self, code: str, timeout: float = 60) -> tuple[str, list[dict]]:
        """Execute ``code``; return its stdout text and all its messages."""
        msgs = self.collect(self.execute(code), timeout)
        out = "".join(m["content"]["text"] for m in msgs if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        return out, msgs

    def assert_interrupts(self, gw: GatewayServer, kernel_id: str) -> None:
        """Start a long cell, interrupt the kernel over REST once the cell runs, and check it ended that way."""
        # its output says the cell runs: ipykernel ignores SIGINT until then, 'busy' is sent a little earlier
        msg_id = self.execute("import time; print('sleeping', flush=True); time.sleep(60)")
        self.recv_until(lambda m: m["msg_type"] == "stream" and m["parent_header"].get("msg_id") == msg_id, timeout=30)
        status, body, _ = call(gw, "POST", f"/api/kernels/{kernel_id}/interrupt")
        assert status == 204, body
        reply = [m for m in self.collect(msg_id, timeout=30) if m["msg_type"] == "execute_reply"][0]
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]

    def close(self) -> None:
        self.ws.close()

    def __enter__(self) -> KernelWS:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- additions for the websocket tests ---------------------------------------------------------------


def encode_legacy_binary(msg: dict, buffers: list[bytes]) -> bytes:
    """Encode a client message with buffers as a legacy binary frame (u32 BE count, offsets, JSON, buffers)."""
    body = {k: v for k, v in msg.items() if k != "buffers"}
    chunks = [json.dumps(body).encode(), *buffers]
    offsets, pos = [], 4 * (len(chunks) + 1)
    for chunk in chunks:
        offsets.append(pos)
        pos += len(chunk)
    return struct.pack(">I", len(chunks)) + b"".join(struct.pack(">I", o) for o in offsets) + b"".join(chunks)


def recv_frame(ws: websocket.WebSocket, timeout: float) -> str | bytes:
    """The next text (str) or binary (bytes) message within ``timeout`` seconds, the whole wait.

    ``ws.recv()`` answers pings itself and starts its socket timeout afresh after each, so a server that
    pings more often than the timeout would keep it waiting for ever. A close frame raises
    ``WebSocketConnectionClosedException`` with its code and reason.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise websocket.WebSocketTimeoutException(f"no message within {timeout:g}s")
        ws.settimeout(remaining)
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return frame.data.decode("utf-8")
        if opcode == websocket.ABNF.OPCODE_BINARY:
            return frame.data
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else None
            raise websocket.WebSocketConnectionClosedException(
                f"the gateway closed the websocket: {code} {frame.data[2:].decode('utf-8', 'replace')}")


def recv_close(ws: websocket.WebSocket, timeout: float = 15) -> tuple[int | None, str]:
    """Read (and discard) frames until the server closes; return ``(close code, reason)``.

    ``(None, "")`` means the connection ended without a close frame (an abort, 1006).
    Raises ``TimeoutError`` if the server keeps the connection open for ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the server did not close the websocket within {timeout}s")
        ws.settimeout(remaining)
        try:
            opcode, frame = ws.recv_data_frame(control_frame=True)
        except websocket.WebSocketTimeoutException:
            continue
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return None, ""
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            data = frame.data
            ws.shutdown()
            ws.connected = False
            if len(data) < 2:
                return None, ""
            return struct.unpack("!H", data[:2])[0], data[2:].decode("utf-8", "replace")


def kernel_model(gw: GatewayServer, kernel_id: str) -> dict:
    """``GET /api/kernels/{id}``; fails the test unless it answers 200."""
    status, body, _ = call(gw, "GET", f"/api/kernels/{kernel_id}")
    assert status == 200, (status, body)
    return body
