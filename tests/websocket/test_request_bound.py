"""The bound on shell requests in flight per kernel: a flood of execute requests must not wedge the kernel.

ipykernel 7.4 wedges its shell for good under ~50,000 queued execute requests (both shell threads block
in a ZMQ send while heartbeat and control still answer); the gateway answers requests past the bound
with an error reply instead of sending them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

from tests.services.client import KernelWS, call, make_msg, start_kernel

FLOOD = 50_000


class ReplyCounter(threading.Thread):
    """Reads every message of a websocket and counts execute replies by outcome."""

    def __init__(self, ws: KernelWS) -> None:
        super().__init__(daemon=True)
        self.ws = ws
        self.ok = self.refused = self.other = 0
        self.refusal: dict | None = None
        self.refused_idle = 0
        self.refused_ids: set[str] = set()
        self.replies: dict[str, dict] = {}
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                msg = self.ws.recv(120)
                parent = msg.get("parent_header", {}).get("msg_id")
                if msg["msg_type"] == "execute_reply":
                    content = msg["content"]
                    if content["status"] == "ok":
                        self.ok += 1
                    elif content.get("ename") == "TooManyRequests":
                        self.refused += 1
                        self.refusal = content
                        self.refused_ids.add(parent)
                    else:
                        self.other += 1
                elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle" \
                        and parent in self.refused_ids:
                    self.refused_idle += 1
                elif msg["msg_type"].endswith("_reply"):
                    self.replies[parent] = msg
        except BaseException as exc:  # reported by the test
            self.error = exc

    @property
    def answered(self) -> int:
        return self.ok + self.refused + self.other


def wait_for(predicate, timeout: float, counter: ReplyCounter, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert counter.error is None, f"reading stopped: {counter.error!r}"
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def test_a_flood_of_execute_requests_leaves_the_kernel_responsive(start_gw):
    gw = start_gw()
    kernel_id = start_kernel(gw)
    try:
        with KernelWS(gw, kernel_id, skip_utf8_validation=True) as ws:
            counter = ReplyCounter(ws)
            counter.start()
            template = make_msg("execute_request", {"code": "1", "silent": False, "store_history": False,
                                                    "user_expressions": {}, "allow_stdin": False})
            started = time.monotonic()
            for _ in range(FLOOD):
                template["header"]["msg_id"] = uuid.uuid4().hex
                ws.ws.send(json.dumps(template))
            sent_in = time.monotonic() - started
            wait_for(lambda: counter.answered >= FLOOD, 300, counter, f"all {FLOOD} execute requests answered")
            print(f"{FLOOD} requests sent in {sent_in:.1f}s; {counter.ok} ran, {counter.refused} refused")
            assert counter.other == 0
            assert counter.refused > 0, "the bound was never reached"
            assert counter.ok >= 1000
            assert "TooManyRequests" in counter.refusal["traceback"][0]
            assert "1000 requests" in counter.refusal["evalue"]
            wait_for(lambda: counter.refused_idle == counter.refused, 60, counter, "an idle status per refusal")

            # the kernel still answers shell requests, promptly
            info = ws.send(make_msg("kernel_info_request", {}))
            wait_for(lambda: info in counter.replies, 30, counter, "kernel_info_reply after the flood")
            assert counter.replies[info]["content"]["status"] == "ok"
            ok_before = counter.ok
            ws.execute("print('still alive')")
            wait_for(lambda: counter.ok > ok_before, 30, counter, "an execute after the flood")
            counter.stop.set()
        assert "shell requests are waiting for replies; refusing more" in gw.log()
    finally:
        call(gw, "DELETE", f"/api/kernels/{kernel_id}")
