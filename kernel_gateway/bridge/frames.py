"""Wire formats: kernel ZMQ multipart messages <-> websocket frames (legacy JSON/binary and v1).

Kernel -> client messages are re-framed without re-encoding their JSON parts: the raw header,
parent header, metadata and content bytes are spliced into the websocket frame, so the only
parse per message is the (small) header. Client -> kernel messages are parsed, checked and
signed with the kernel's key here, so clients never need the HMAC key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import struct
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "CHANNELS",
    "DELIMITER",
    "FrameError",
    "KernelMessage",
    "Signer",
    "V1_SUBPROTOCOL",
    "client_message_to_parts",
    "kernel_message_from_zmq",
    "make_message_parts",
    "to_legacy_frame",
    "to_v1_frame",
    "ws_frame",
    "ws_header",
]

DELIMITER = b"<IDS|MSG>"
V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
CHANNELS = ("shell", "control", "stdin", "iopub")
_CLIENT_CHANNELS = frozenset(("shell", "control", "stdin"))


class FrameError(ValueError):
    """A websocket frame or ZMQ message is malformed; the text says how."""


class Signer:
    """HMAC signatures over the four JSON parts, as the kernel's connection info prescribes."""

    def __init__(self, key: bytes, scheme: str = "hmac-sha256") -> None:
        if key:
            algorithm = scheme.split("-", 1)[-1]
            self._mac: hmac.HMAC | None = hmac.new(key, digestmod=getattr(hashlib, algorithm))
        else:
            self._mac = None

    def sign(self, parts: list[bytes]) -> bytes:
        if self._mac is None:
            return b""
        mac = self._mac.copy()
        for part in parts[:4]:
            mac.update(part)
        return mac.hexdigest().encode()

    def verify(self, signature: bytes, parts: list[bytes]) -> bool:
        if self._mac is None:
            return True
        return hmac.compare_digest(signature, self.sign(parts))


@dataclass(slots=True)
class KernelMessage:
    """A message from the kernel: channel name, the raw JSON parts and buffers, the parsed header."""

    channel: str
    parts: list[bytes]  # header, parent_header, metadata, content, *buffers
    header: dict[str, Any]
    _legacy: bytes | None = field(default=None, repr=False)

    @property
    def msg_type(self) -> str:
        return self.header.get("msg_type", "")


def kernel_message_from_zmq(channel: str, frames: list[bytes], signer: Signer) -> KernelMessage:
    """Split a ZMQ multipart message, check its signature and parse its header."""
    try:
        index = frames.index(DELIMITER)
    except ValueError:
        raise FrameError("kernel message has no <IDS|MSG> delimiter") from None
    if len(frames) < index + 6:
        raise FrameError("kernel message has fewer than four JSON parts")
    parts = frames[index + 2 :]
    if not signer.verify(frames[index + 1], parts):
        raise FrameError("kernel message has a bad signature")
    try:
        header = json.loads(parts[0])
    except ValueError as exc:
        raise FrameError(f"kernel message header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("kernel message header is not an object")
    return KernelMessage(channel, parts, header)


def to_legacy_frame(msg: KernelMessage, binary_buffers: bool = True) -> tuple[bytes, bool]:
    """Frame ``msg`` for the legacy protocol; return ``(payload, is_binary)``.

    Without buffers: one JSON text frame with ``channel``, ``msg_id``, ``msg_type`` added.
    With buffers: ``u32 n, n × u32 offsets, JSON, buffers...`` (big-endian), as clients expect;
    or, when ``binary_buffers`` is False, a text frame whose ``buffers`` are base64 strings.
    """
    header, parent, metadata, content = msg.parts[:4]
    buffers = msg.parts[4:]
    tail = b',"channel":"%s","msg_id":%s,"msg_type":%s' % (
        msg.channel.encode(),
        json.dumps(msg.header.get("msg_id", "")).encode(),
        json.dumps(msg.header.get("msg_type", "")).encode(),
    )
    body = b'{"header":%s,"parent_header":%s,"metadata":%s,"content":%s%s' % (header, parent, metadata, content, tail)
    if not buffers:
        if msg._legacy is None:
            msg._legacy = body + b',"buffers":[]}'
        return msg._legacy, False
    if not binary_buffers:
        encoded = json.dumps([base64.b64encode(bytes(b)).decode() for b in buffers]).encode()
        return body + b',"buffers":' + encoded + b"}", False
    json_part = body + b"}"
    count = 1 + len(buffers)
    offsets = [4 * (count + 1)]
    for chunk in (json_part, *buffers[:-1]):
        offsets.append(offsets[-1] + len(chunk))
    head = struct.pack(f">{count + 1}I", count, *offsets)
    return b"".join((head, json_part, *buffers)), True


def to_v1_frame(msg: KernelMessage) -> bytes:
    """Frame ``msg`` for ``v1.kernel.websocket.jupyter.org``: u64 LE offsets, channel, parts."""
    pieces = [msg.channel.encode(), *msg.parts]
    count = len(pieces) + 1
    offsets = [8 * (count + 1)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return b"".join((struct.pack(f"<{count + 1}Q", count, *offsets), *pieces))


def ws_header(size: int, binary: bool) -> bytes:
    """The header of one unmasked, final websocket frame (server to client, no compression) of ``size`` bytes."""
    first = 0x82 if binary else 0x81
    if size < 126:
        return struct.pack("!BB", first, size)
    if size <= 0xFFFF:
        return struct.pack("!BBH", first, 126, size)
    return struct.pack("!BBQ", first, 127, size)


def ws_frame(payload: bytes, binary: bool) -> bytes:
    """One unmasked, final websocket frame around ``payload``."""
    return ws_header(len(payload), binary) + payload


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, default=str).encode("utf-8", "surrogateescape")


def _parts_from_dict(msg: Any, buffers: list[bytes]) -> tuple[str, list[bytes]]:
    if not isinstance(msg, dict):
        raise FrameError("message must be a JSON object")
    channel = msg.get("channel") or "shell"
    if channel not in _CLIENT_CHANNELS:
        raise FrameError(f"channel {channel!r} is not one of shell, control, stdin")
    header = msg.get("header")
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise FrameError("message needs a 'header' object with a string 'msg_type'")
    header.setdefault("msg_id", uuid.uuid4().hex)
    parts = []
    for key in ("parent_header", "metadata", "content"):
        value = msg.get(key)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise FrameError(f"'{key}' must be an object")
        parts.append(value)
    return channel, [_dumps(header), *(_dumps(p) for p in parts), *buffers]


def client_message_to_parts(frame: str | bytes, protocol: str) -> tuple[str, list[bytes]]:
    """Parse a websocket frame from a client; return ``(channel, parts)`` ready to sign and send.

    Any malformed frame raises :class:`FrameError`, whatever part of the parse it broke.
    """
    try:
        return _client_message_to_parts(frame, protocol)
    except FrameError:
        raise
    except (TypeError, ValueError, UnicodeError, RecursionError) as exc:
        raise FrameError(f"malformed message ({type(exc).__name__})") from None


def _client_message_to_parts(frame: str | bytes, protocol: str) -> tuple[str, list[bytes]]:
    if protocol == V1_SUBPROTOCOL:
        if isinstance(frame, str):
            raise FrameError("the v1 protocol sends binary frames only")
        return _parse_v1(frame)
    if isinstance(frame, str):
        try:
            msg = json.loads(frame)
        except ValueError as exc:
            raise FrameError(f"text frame is not JSON: {exc}") from None
        buffers = msg.get("buffers") if isinstance(msg, dict) else None
        if buffers and isinstance(buffers, list):
            raise FrameError("buffers cannot travel in a text frame; send a binary frame")
        return _parts_from_dict(msg, [])
    return _parse_legacy_binary(frame)


def _read_offsets(frame: bytes, fmt: str, width: int) -> list[int]:
    if len(frame) < width:
        raise FrameError("binary frame is too short")
    (count,) = struct.unpack_from(fmt + ("I" if width == 4 else "Q"), frame)
    if count < 1 or (count + 1) * width > len(frame):
        raise FrameError("binary frame offset table does not fit the frame")
    offsets = list(struct.unpack_from(f"{fmt}{count}{'I' if width == 4 else 'Q'}", frame, width))
    if offsets != sorted(offsets) or offsets[0] < (count + 1) * width or offsets[-1] > len(frame):
        raise FrameError("binary frame offsets are out of order or out of range")
    return offsets


def _parse_legacy_binary(frame: bytes) -> tuple[str, list[bytes]]:
    offsets = _read_offsets(frame, ">", 4) + [len(frame)]
    chunks = [frame[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    try:
        msg = json.loads(chunks[0])
    except ValueError as exc:
        raise FrameError(f"binary frame JSON part is not JSON: {exc}") from None
    return _parts_from_dict(msg, chunks[1:])


def _parse_v1(frame: bytes) -> tuple[str, list[bytes]]:
    offsets = _read_offsets(frame, "<", 8)
    if len(offsets) < 6:
        raise FrameError("v1 frame needs channel, header, parent_header, metadata and content")
    chunks = [frame[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]
    channel = chunks[0].decode("utf-8", "replace") or "shell"
    if channel not in _CLIENT_CHANNELS:
        raise FrameError(f"channel {channel!r} is not one of shell, control, stdin")
    try:
        header = json.loads(chunks[1])
        for chunk in chunks[2:5]:
            json.loads(chunk)
    except ValueError as exc:
        raise FrameError(f"v1 frame part is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("msg_type"), str):
        raise FrameError("message needs a 'header' object with a string 'msg_type'")
    return channel, chunks[1:]


def make_message_parts(msg_type: str, content: dict[str, Any], session: str, parent: dict | None = None) -> list[bytes]:
    """Build the four JSON parts of a message the gateway itself originates (requests, synthetic status)."""
    header = {
        "msg_id": uuid.uuid4().hex,
        "msg_type": msg_type,
        "username": "gateway",
        "session": session,
        "date": datetime.now(timezone.utc).isoformat(),
        "version": "5.3",
    }
    return [_dumps(header), _dumps(parent or {}), b"{}", _dumps(content)]
