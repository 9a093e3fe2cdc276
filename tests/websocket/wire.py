"""An independent ``v1.kernel.websocket.jupyter.org`` encoder/decoder and a v1 client, for the websocket tests.

Written from the protocol description (jupyter_server ``websocket-protocols.rst``), not from the gateway's code:
``u64 LE offset_number``, ``offset_number × u64 LE offsets`` (start of the channel, then the end of every part),
then ``channel``, ``header``, ``parent_header``, ``metadata``, ``content``, ``buffers...``.
"""

from __future__ import annotations

import json
from typing import Any

from tests.services.client import KernelWS, recv_frame

V1 = "v1.kernel.websocket.jupyter.org"


def v1_encode(channel: str, header: Any, parent_header: Any = None, metadata: Any = None, content: Any = None,
              buffers: list[bytes] = (), raw_parts: list[bytes] | None = None) -> bytes:
    """Encode one v1 frame; ``raw_parts`` replaces the four JSON parts verbatim (for malformed frames)."""
    if raw_parts is None:
        raw_parts = [json.dumps(p if p is not None else {}).encode() for p in (header, parent_header, metadata, content)]
    pieces = [channel.encode(), *raw_parts, *buffers]
    table = bytearray()
    position = 8 * (len(pieces) + 2)  # the count, then one offset per piece plus the end offset
    table += position.to_bytes(8, "little")
    for piece in pieces:
        position += len(piece)
        table += position.to_bytes(8, "little")
    return (len(pieces) + 1).to_bytes(8, "little") + bytes(table) + b"".join(pieces)


def v1_decode(frame: bytes) -> dict:
    """Decode one v1 frame into a legacy-shaped dict (``channel``, the four parts, ``buffers``, ``msg_id``, ``msg_type``)."""
    assert isinstance(frame, bytes), f"v1 frames are binary, got {type(frame).__name__}"
    count = int.from_bytes(frame[:8], "little")
    offsets = [int.from_bytes(frame[8 * (i + 1): 8 * (i + 2)], "little") for i in range(count)]
    assert offsets[0] == 8 * (count + 1), offsets
    assert offsets[-1] == len(frame), (offsets, len(frame))
    assert offsets == sorted(offsets), offsets
    pieces = [frame[offsets[i]:offsets[i + 1]] for i in range(count - 1)]
    assert len(pieces) >= 5, f"a v1 frame has channel + 4 JSON parts, got {len(pieces)} pieces"
    header, parent, metadata, content = (json.loads(p) for p in pieces[1:5])
    return {
        "channel": pieces[0].decode(),
        "header": header,
        "parent_header": parent,
        "metadata": metadata,
        "content": content,
        "buffers": pieces[5:],
        "msg_id": header.get("msg_id"),
        "msg_type": header.get("msg_type"),
    }


class V1KernelWS(KernelWS):
    """``KernelWS`` speaking the v1 protocol: same ``send/execute/recv/collect/run``, v1 frames on the wire."""

    def __init__(self, gw, kernel_id: str, session_id: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("subprotocols", [V1])
        super().__init__(gw, kernel_id, session_id, **kwargs)
        self.raw_frames = 0

    def send(self, msg: dict, buffers: list[bytes] = ()) -> str:
        self.ws.send_binary(v1_encode(msg.get("channel", "shell"), msg["header"], msg.get("parent_header"),
                                      msg.get("metadata"), msg.get("content"), buffers))
        return msg["header"]["msg_id"]

    def recv(self, timeout: float = 30) -> dict:
        frame = recv_frame(self.ws, timeout)
        self.raw_frames += 1
        return v1_decode(frame)
