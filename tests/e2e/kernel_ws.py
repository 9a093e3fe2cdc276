"""A small synchronous kernel websocket client (legacy JSON protocol) for the end-to-end tests.

It speaks what a browser or jupyter_server sends: text frames carrying ``channel``, no subprotocol, and
collects every frame it receives on a reader thread so a test can wait on messages by parent ``msg_id``.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import quote

import websocket


def msg_parent_id(msg: dict) -> str | None:
    return (msg.get("parent_header") or {}).get("msg_id")


def _decode_legacy_binary(data: bytes) -> dict:
    """Decode a legacy binary frame: nbufs, offsets, JSON, buffers (jupyter_server ``deserialize_binary_message``)."""
    nbufs = struct.unpack("!I", data[:4])[0]
    offsets = list(struct.unpack(f"!{nbufs}I", data[4 : 4 + 4 * nbufs]))
    offsets.append(len(data))
    msg = json.loads(data[offsets[0] : offsets[1]].decode("utf8"))
    msg["buffers"] = [data[a:b] for a, b in zip(offsets[1:-1], offsets[2:])]
    return msg


@dataclass
class Execution:
    """Everything a kernel sent in reply to one ``execute_request``."""

    msg_id: str
    messages: list[dict] = field(default_factory=list)

    def of_type(self, msg_type: str) -> list[dict]:
        return [m for m in self.messages if m["msg_type"] == msg_type]

    @property
    def reply(self) -> dict:
        (reply,) = self.of_type("execute_reply")
        return reply

    @property
    def stdout(self) -> str:
        return "".join(m["content"]["text"] for m in self.of_type("stream") if m["content"]["name"] == "stdout")

    @property
    def errors(self) -> list[dict]:
        return [m["content"] for m in self.of_type("error")]

    @property
    def result_text(self) -> list[str]:
        return [m["content"]["data"].get("text/plain") for m in self.of_type("execute_result")]

    def summary(self) -> list[tuple]:
        return [
            (m.get("channel"), m["msg_type"], m["content"].get("execution_state") or m["content"].get("text"))
            for m in self.messages
        ]


class KernelWebSocket:
    """One websocket to ``{base}/api/kernels/{id}/channels``; received messages accumulate in ``messages``."""

    def __init__(self, ws_base: str, kernel_id: str, headers: dict | None = None,
                 session_id: str | None = None, timeout: float = 30):
        self.kernel_id = kernel_id
        self.session_id = session_id
        url = f"{ws_base}/api/kernels/{kernel_id}/channels"
        if session_id:
            url += f"?session_id={quote(session_id)}"
        self.url = url
        self.messages: list[dict] = []
        self.closed = False
        self.close_code: int | None = None
        self._cond = threading.Condition()
        header = [f"{k}: {v}" for k, v in (headers or {}).items()]
        self._ws = websocket.create_connection(url, header=header, timeout=timeout, enable_multithread=True)
        self._ws.settimeout(None)
        self._reader = threading.Thread(target=self._read_loop, name=f"ws-reader-{kernel_id[:8]}", daemon=True)
        self._reader.start()

    # -- plumbing ---------------------------------------------------------------------------------------

    def _read_loop(self):
        try:
            while True:
                opcode, data = self._ws.recv_data(control_frame=False)
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    if len(data) >= 2:
                        self.close_code = struct.unpack("!H", data[:2])[0]
                    break
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    msg = json.loads(data.decode("utf8"))
                elif opcode == websocket.ABNF.OPCODE_BINARY:
                    msg = _decode_legacy_binary(data)
                else:
                    continue
                with self._cond:
                    self.messages.append(msg)
                    self._cond.notify_all()
        except Exception:  # connection dropped or closed by us: either way the socket is finished
            pass
        finally:
            with self._cond:
                self.closed = True
                self._cond.notify_all()

    def close(self):
        try:
            self._ws.close(timeout=3)
        except Exception:
            pass
        self._reader.join(5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- sending ----------------------------------------------------------------------------------------

    def send(self, msg_type: str, content: dict | None = None, channel: str = "shell") -> str:
        msg_id = uuid.uuid4().hex
        msg = {
            "header": {
                "msg_id": msg_id,
                "msg_type": msg_type,
                "username": "e2e",
                "session": self.session_id or "",
                "date": datetime.now(timezone.utc).isoformat(),
                "version": "5.3",
            },
            "parent_header": {},
            "metadata": {},
            "content": content or {},
            "channel": channel,
            "buffers": [],
        }
        self._ws.send(json.dumps(msg))
        return msg_id

    def execute(self, code: str) -> str:
        return self.send("execute_request", {
            "code": code, "silent": False, "store_history": True,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True,
        })

    # -- waiting ----------------------------------------------------------------------------------------

    def wait_for(self, predicate, timeout: float, what: str = "message"):
        """Return the first received message (old or new) matching ``predicate``; raise on timeout/close."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages:
                    if predicate(msg):
                        return msg
                if self.closed:
                    raise ConnectionError(f"websocket closed while waiting for {what}; got {self._brief()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; got {self._brief()}")
                self._cond.wait(left)

    def wait_closed(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.closed, timeout)

    def replies_to(self, msg_id: str) -> list[dict]:
        with self._cond:
            return [m for m in self.messages if msg_parent_id(m) == msg_id]

    def wait_reply(self, msg_id: str, msg_type: str, timeout: float = 30) -> dict:
        return self.wait_for(lambda m: msg_parent_id(m) == msg_id and m["msg_type"] == msg_type,
                             timeout, what=f"{msg_type} to {msg_id}")

    def collect(self, msg_id: str, timeout: float = 30) -> Execution:
        """Wait until both ``execute_reply`` and iopub ``status: idle`` for ``msg_id`` arrived."""
        def done(_m=None):
            got = self.replies_to(msg_id)
            return (any(m["msg_type"] == "execute_reply" for m in got)
                    and any(m["msg_type"] == "status" and m["content"]["execution_state"] == "idle" for m in got))

        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                if self.closed:
                    raise ConnectionError(f"websocket closed before execution {msg_id} finished; "
                                          f"got {Execution(msg_id, self.replies_to(msg_id)).summary()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"execution {msg_id} not finished after {timeout}s; "
                                       f"got {Execution(msg_id, self.replies_to(msg_id)).summary()}")
                self._cond.wait(left)
        return Execution(msg_id, self.replies_to(msg_id))

    def run(self, code: str, timeout: float = 30) -> Execution:
        return self.collect(self.execute(code), timeout)

    def kernel_info(self, timeout: float = 30) -> dict:
        return self.wait_reply(self.send("kernel_info_request"), "kernel_info_reply", timeout)

    def _brief(self) -> list:
        return [(m.get("channel"), m.get("msg_type"), msg_parent_id(m)) for m in self.messages[-12:]]
