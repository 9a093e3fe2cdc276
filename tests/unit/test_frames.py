"""Unit tests of ``kernel_gateway.bridge.frames`` against an encoder/decoder written here from the protocol docs.

Legacy binary: ``u32 BE n``, ``n × u32 BE offsets`` (first = start of the JSON), JSON, buffers; no end offset.
v1: ``u64 LE n``, ``n × u64 LE offsets`` (start of the channel, then the end of every part), channel, header,
parent_header, metadata, content, buffers.
ZMQ: ``idents..., <IDS|MSG>, HMAC hex of the four JSON parts, header, parent, metadata, content, buffers...``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from datetime import datetime

import pytest

from kernel_gateway.bridge import frames as frames_module
from kernel_gateway.bridge.frames import (
    DELIMITER,
    V1_SUBPROTOCOL,
    FrameError,
    KernelMessage,
    Signer,
    client_message_to_parts,
    kernel_message_from_zmq,
    make_message_parts,
    to_legacy_frame,
    to_v1_frame,
)

KEY = b"5ecret-key-for-tests"


# -- the independent codec ---------------------------------------------------------------------------------------


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def hmac_hex(key: bytes, parts: list[bytes], digest=hashlib.sha256) -> bytes:
    return hmac.new(key, b"".join(parts[:4]), digest).hexdigest().encode()


def zmq_message(parts: list[bytes], key: bytes = KEY, idents: tuple[bytes, ...] = (b"ident-1",)) -> list[bytes]:
    return [*idents, b"<IDS|MSG>", hmac_hex(key, parts) if key else b"", *parts]


def kernel_parts(msg_type: str = "stream", content: dict | None = None, buffers: tuple[bytes, ...] = ()) -> list[bytes]:
    header = {"msg_id": uuid.uuid4().hex, "msg_type": msg_type, "username": "k", "session": "s",
              "date": "2024-05-06T07:08:09.123456Z", "version": "5.3"}
    parent = {"msg_id": "parent-1", "msg_type": "execute_request", "username": "u", "session": "c", "version": "5.3"}
    return [json.dumps(header).encode(), json.dumps(parent).encode(), b'{"m": 1}',
            json.dumps(content if content is not None else {"name": "stdout", "text": "hi\n"}).encode(), *buffers]


def encode_legacy_binary(msg: dict, buffers: list[bytes]) -> bytes:
    chunks = [json.dumps(msg).encode(), *buffers]
    out, position = [u32(len(chunks))], 4 * (len(chunks) + 1)
    for chunk in chunks:
        out.append(u32(position))
        position += len(chunk)
    return b"".join(out + chunks)


def decode_legacy_binary(frame: bytes) -> tuple[dict, list[bytes]]:
    n = int.from_bytes(frame[:4], "big")
    offsets = [int.from_bytes(frame[4 + 4 * i: 8 + 4 * i], "big") for i in range(n)]
    assert offsets[0] == 4 * (n + 1)
    bounds = offsets + [len(frame)]
    chunks = [frame[bounds[i]:bounds[i + 1]] for i in range(n)]
    return json.loads(chunks[0]), chunks[1:]


def encode_v1(channel: str, parts: list[bytes]) -> bytes:
    pieces = [channel.encode(), *parts]
    offsets, position = [], 8 * (len(pieces) + 2)
    offsets.append(position)
    for piece in pieces:
        position += len(piece)
        offsets.append(position)
    return u64(len(offsets)) + b"".join(u64(o) for o in offsets) + b"".join(pieces)


def decode_v1(frame: bytes) -> tuple[str, list[bytes]]:
    n = int.from_bytes(frame[:8], "little")
    offsets = [int.from_bytes(frame[8 + 8 * i: 16 + 8 * i], "little") for i in range(n)]
    assert offsets[0] == 8 * (n + 1) and offsets[-1] == len(frame)
    pieces = [frame[offsets[i]:offsets[i + 1]] for i in range(n - 1)]
    return pieces[0].decode(), pieces[1:]


def client_msg(**overrides) -> dict:
    msg = {"header": {"msg_id": "c-1", "msg_type": "execute_request", "username": "u", "session": "s",
                      "version": "5.3", "date": ""},
           "parent_header": {}, "metadata": {}, "content": {"code": "1"}}
    msg.update(overrides)
    return msg


# -- Signer -----------------------------------------------------------------------------------------------------


def test_signer_signs_the_four_json_parts_with_hmac_sha256():
    parts = kernel_parts(buffers=(b"buffer",))
    signer = Signer(KEY)
    assert signer.sign(parts) == hmac_hex(KEY, parts)
    assert signer.sign(parts) == signer.sign(parts[:4]), "buffers are not signed"
    assert signer.verify(hmac_hex(KEY, parts), parts)
    assert not signer.verify(hmac_hex(b"other key", parts), parts)
    assert not signer.verify(hmac_hex(KEY, parts), [parts[0], parts[1], parts[2], b'{"tampered": 1}'])


def test_signer_honours_the_scheme():
    parts = kernel_parts()
    assert Signer(KEY, "hmac-sha512").sign(parts) == hmac_hex(KEY, parts, hashlib.sha512)


def test_signer_without_key_signs_nothing_and_accepts_anything():
    signer = Signer(b"")
    assert signer.sign(kernel_parts()) == b""
    assert signer.verify(b"whatever", kernel_parts())


# -- kernel -> client ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("idents", [(), (b"a",), (b"a", b"b")])
def test_kernel_message_from_zmq(idents):
    parts = kernel_parts(buffers=(b"\x00buf",))
    msg = kernel_message_from_zmq("iopub", zmq_message(parts, idents=idents), Signer(KEY))
    assert msg.channel == "iopub"
    assert msg.parts == parts
    assert msg.header == json.loads(parts[0])
    assert msg.msg_type == "stream"


def test_kernel_message_without_key_needs_no_signature():
    parts = kernel_parts()
    msg = kernel_message_from_zmq("shell", zmq_message(parts, key=b""), Signer(b""))
    assert msg.parts == parts


def test_legacy_text_frame_round_trip():
    parts = kernel_parts(content={"name": "stdout", "text": "h\u00e9llo \u2603\n"})
    msg = kernel_message_from_zmq("iopub", zmq_message(parts), Signer(KEY))
    payload, binary = to_legacy_frame(msg)
    assert binary is False
    decoded = json.loads(payload)
    assert decoded == {
        "header": json.loads(parts[0]),
        "parent_header": json.loads(parts[1]),
        "metadata": json.loads(parts[2]),
        "content": json.loads(parts[3]),
        "channel": "iopub",
        "msg_id": json.loads(parts[0])["msg_id"],
        "msg_type": "stream",
        "buffers": [],
    }
    for part in parts:
        assert part in payload, "JSON parts are spliced in verbatim, not re-encoded"
    assert to_legacy_frame(msg)[0] is payload, "the legacy frame is cached per message for fan-out"


def test_legacy_binary_frame_round_trip():
    buffers = (b"\xff\x00abc", b"", b"x" * 70000)
    parts = kernel_parts("comm_msg", {"comm_id": "c", "data": {"k": 1}}, buffers)
    msg = kernel_message_from_zmq("iopub", zmq_message(parts), Signer(KEY))
    payload, binary = to_legacy_frame(msg)
    assert binary is True
    decoded, got_buffers = decode_legacy_binary(payload)
    assert got_buffers == list(buffers)
    assert decoded["channel"] == "iopub"
    assert decoded["msg_type"] == "comm_msg"
    assert decoded["msg_id"] == json.loads(parts[0])["msg_id"]
    assert decoded["header"] == json.loads(parts[0])
    assert decoded["parent_header"] == json.loads(parts[1])
    assert decoded["metadata"] == {"m": 1}
    assert decoded["content"] == {"comm_id": "c", "data": {"k": 1}}


def test_legacy_frame_with_base64_buffers_for_text_only_clients():
    buffers = (b"\xff\x00abc", b"", bytes(range(256)))
    parts = kernel_parts("comm_msg", {"comm_id": "c", "data": {}}, buffers)
    msg = kernel_message_from_zmq("iopub", zmq_message(parts), Signer(KEY))
    payload, binary = to_legacy_frame(msg, binary_buffers=False)
    assert binary is False
    decoded = json.loads(payload.decode("utf-8"))
    assert [base64.b64decode(b) for b in decoded["buffers"]] == list(buffers)
    assert decoded["channel"] == "iopub" and decoded["msg_type"] == "comm_msg"
    assert decoded["content"] == {"comm_id": "c", "data": {}}
    # without buffers the flag changes nothing
    plain = kernel_message_from_zmq("iopub", zmq_message(kernel_parts()), Signer(KEY))
    assert to_legacy_frame(plain, binary_buffers=False) == to_legacy_frame(plain)


def parse_ws_frame(data: bytes) -> tuple[bool, int, bytes, int]:
    """RFC 6455 section 5.2, server side (unmasked): return (fin, opcode, payload, bytes consumed)."""
    fin, opcode = bool(data[0] & 0x80), data[0] & 0x0F
    assert data[0] & 0x70 == 0, "no RSV bits (no compression)"
    assert data[1] & 0x80 == 0, "server frames are not masked"
    length, position = data[1] & 0x7F, 2
    if length == 126:
        length, position = int.from_bytes(data[2:4], "big"), 4
    elif length == 127:
        length, position = int.from_bytes(data[2:10], "big"), 10
    return fin, opcode, data[position:position + length], position + length


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 200_000])
@pytest.mark.parametrize("binary", [True, False])
def test_ws_frame(size, binary):
    payload = bytes(i % 251 for i in range(size))
    frame = frames_module.ws_frame(payload, binary)
    fin, opcode, got, consumed = parse_ws_frame(frame)
    assert fin is True
    assert opcode == (0x2 if binary else 0x1)
    assert got == payload
    assert consumed == len(frame)
    expected_header = 2 if size < 126 else 4 if size <= 0xFFFF else 10
    assert len(frame) == expected_header + size, "the shortest length encoding is used"


@pytest.mark.parametrize("buffers", [(), (b"one",), (b"", b"\x00\x01two")])
def test_v1_frame_round_trip(buffers):
    parts = kernel_parts("display_data", {"data": {}}, buffers)
    msg = kernel_message_from_zmq("shell", zmq_message(parts), Signer(KEY))
    channel, got = decode_v1(to_v1_frame(msg))
    assert channel == "shell"
    assert got == parts, "v1 carries the kernel's parts verbatim"


def test_kernel_message_header_fields_are_json_escaped_in_legacy_frames():
    header = json.dumps({"msg_id": 'quote"and\\backslash', "msg_type": "stream"}).encode()
    msg = KernelMessage("iopub", [header, b"{}", b"{}", b"{}"], json.loads(header))
    decoded = json.loads(to_legacy_frame(msg)[0])
    assert decoded["msg_id"] == 'quote"and\\backslash'


@pytest.mark.parametrize("frames,match", [
    ([b"ident", b"no delimiter", b"{}", b"{}", b"{}", b"{}"], "delimiter"),
    ([DELIMITER, b"sig", b"{}", b"{}", b"{}"], "fewer than four"),
], ids=["no-delimiter", "three-parts"])
def test_malformed_zmq_messages(frames, match):
    with pytest.raises(FrameError, match=match):
        kernel_message_from_zmq("iopub", frames, Signer(KEY))


def test_zmq_message_with_bad_signature_is_rejected():
    parts = kernel_parts()
    frames = zmq_message(parts)
    frames[-1] = b'{"name": "stdout", "text": "forged"}'
    with pytest.raises(FrameError, match="signature"):
        kernel_message_from_zmq("iopub", frames, Signer(KEY))
    with pytest.raises(FrameError, match="signature"):
        kernel_message_from_zmq("iopub", zmq_message(parts, key=b"other"), Signer(KEY))


@pytest.mark.parametrize("header,match", [(b"{not json", "not JSON"), (b"[1, 2]", "not an object")],
                         ids=["not-json", "not-object"])
def test_zmq_message_with_bad_header_is_rejected(header, match):
    parts = [header, b"{}", b"{}", b"{}"]
    with pytest.raises(FrameError, match=match):
        kernel_message_from_zmq("iopub", zmq_message(parts), Signer(KEY))


# -- client -> kernel ------------------------------------------------------------------------------------------------


def test_legacy_text_message_to_parts():
    msg = client_msg(channel="control")
    msg["content"] = {"code": "print('h\u00e9 \u2603')"}
    channel, parts = client_message_to_parts(json.dumps(msg), "legacy")
    assert channel == "control"
    assert len(parts) == 4
    assert [json.loads(p) for p in parts] == [msg["header"], {}, {}, msg["content"]]
    assert "h\u00e9 \u2603".encode() in parts[3], "content is sent to the kernel as UTF-8"


@pytest.mark.parametrize("channel", ["shell", "control", "stdin"])
def test_client_channels_are_honoured(channel):
    assert client_message_to_parts(json.dumps(client_msg(channel=channel)), "legacy")[0] == channel


@pytest.mark.parametrize("channel", [None, "", "missing"])
def test_message_without_channel_goes_to_shell(channel):
    msg = client_msg()
    if channel != "missing":
        msg["channel"] = channel
    assert client_message_to_parts(json.dumps(msg), "legacy")[0] == "shell"


def test_nbclient_style_message_is_tolerated():
    """Float ``date``, ``"buffers": {}``, top-level msg_id/msg_type, no channel (GatewayKernelManager)."""
    msg = client_msg(buffers={}, msg_id="c-1", msg_type="execute_request")
    msg["header"]["date"] = 1714979289.5
    channel, parts = client_message_to_parts(json.dumps(msg), "legacy")
    assert channel == "shell"
    assert json.loads(parts[0])["date"] == 1714979289.5
    assert len(parts) == 4
    assert client_message_to_parts(json.dumps(client_msg(buffers=[])), "legacy")[1][3] == b'{"code": "1"}'


def test_missing_parts_default_to_empty_objects_and_msg_id_is_filled_in():
    msg = {"header": {"msg_type": "kernel_info_request"}, "parent_header": None}
    _, parts = client_message_to_parts(json.dumps(msg), "legacy")
    header = json.loads(parts[0])
    assert header["msg_type"] == "kernel_info_request"
    assert isinstance(header["msg_id"], str) and header["msg_id"]
    assert parts[1:] == [b"{}", b"{}", b"{}"]
    _, again = client_message_to_parts(json.dumps(msg), "legacy")
    assert json.loads(again[0])["msg_id"] != header["msg_id"]


def test_legacy_binary_message_to_parts():
    msg = client_msg(channel="shell", header={"msg_id": "b-1", "msg_type": "comm_msg"},
                     content={"comm_id": "x", "data": {}})
    buffers = [b"\x00\xffraw", b"", b"z" * 100000]
    channel, parts = client_message_to_parts(encode_legacy_binary(msg, buffers), "legacy")
    assert channel == "shell"
    assert [json.loads(p) for p in parts[:4]] == [msg["header"], {}, {}, msg["content"]]
    assert parts[4:] == buffers


def test_legacy_binary_without_buffers():
    channel, parts = client_message_to_parts(encode_legacy_binary(client_msg(channel="stdin"), []), "legacy")
    assert channel == "stdin" and len(parts) == 4


@pytest.mark.parametrize("buffers", [[], [b"b0"], [b"", b"\x01\x02"]])
def test_v1_message_to_parts_is_verbatim(buffers):
    raw = [b'{"msg_id": "v-1",  "msg_type": "execute_request"}', b"{ }", b'{"x":1}', b'{"code": "1"}']
    channel, parts = client_message_to_parts(encode_v1("control", raw + buffers), V1_SUBPROTOCOL)
    assert channel == "control"
    assert parts == raw + buffers


def test_v1_empty_channel_means_shell():
    raw = [b'{"msg_type": "kernel_info_request"}', b"{}", b"{}", b"{}"]
    assert client_message_to_parts(encode_v1("", raw), V1_SUBPROTOCOL)[0] == "shell"


def test_client_to_kernel_to_client_round_trip_through_zmq():
    """A client message, signed as the bridge sends it, is accepted by the kernel-side parser unchanged."""
    msg = client_msg(channel="shell")
    _, parts = client_message_to_parts(encode_legacy_binary(msg, [b"buf"]), "legacy")
    signer = Signer(KEY)
    frames = [b"session", DELIMITER, signer.sign(parts), *parts]
    assert frames[2] == hmac_hex(KEY, parts)
    back = kernel_message_from_zmq("shell", frames, signer)
    assert back.header == msg["header"] and back.parts[4:] == [b"buf"]
    channel, v1_parts = decode_v1(to_v1_frame(back))
    assert channel == "shell" and v1_parts == parts


# -- every FrameError path of client_message_to_parts ------------------------------------------------------------------

HEADER = {"msg_id": "h", "msg_type": "kernel_info_request"}
GOOD = [json.dumps(HEADER).encode(), b"{}", b"{}", b"{}"]
GOOD_JSON = json.dumps({"header": HEADER}).encode()


def legacy_raw(count: int, offsets: list[int], payload: bytes) -> bytes:
    return u32(count) + b"".join(u32(o) for o in offsets) + payload


def v1_raw(count: int, offsets: list[int], payload: bytes) -> bytes:
    return u64(count) + b"".join(u64(o) for o in offsets) + payload


LEGACY_ERRORS = [
    ("text-not-json", "{nope", "not JSON"),
    ("text-empty", "", "not JSON"),
    ("text-array", "[1, 2]", "JSON object"),
    ("text-number", "42", "JSON object"),
    ("text-null", "null", "JSON object"),
    ("buffers-in-text", json.dumps({"header": HEADER, "buffers": ["AA=="]}), "binary frame"),
    ("channel-iopub", json.dumps({"header": HEADER, "channel": "iopub"}), "channel"),
    ("channel-unknown", json.dumps({"header": HEADER, "channel": "hb"}), "channel"),
    ("channel-number", json.dumps({"header": HEADER, "channel": 7}), "channel"),
    ("header-missing", json.dumps({"content": {}}), "header"),
    ("header-not-object", json.dumps({"header": "execute_request"}), "header"),
    ("header-without-msg-type", json.dumps({"header": {"msg_id": "x"}}), "msg_type"),
    ("msg-type-not-string", json.dumps({"header": {"msg_type": 5}}), "msg_type"),
    ("parent-not-object", json.dumps({"header": HEADER, "parent_header": []}), "parent_header"),
    ("metadata-not-object", json.dumps({"header": HEADER, "metadata": "m"}), "metadata"),
    ("content-not-object", json.dumps({"header": HEADER, "content": [1]}), "content"),
    ("binary-empty", b"", "too short"),
    ("binary-too-short", b"\x00\x00\x01", "too short"),
    ("binary-zero-count", legacy_raw(0, [], GOOD_JSON), "does not fit"),
    ("binary-table-past-end", legacy_raw(5, [24], b"{}"), "does not fit"),
    ("binary-huge-count", b"\xff\xff\xff\xff" + b"\x00" * 12, "does not fit"),
    ("binary-offset-inside-table", legacy_raw(1, [4], GOOD_JSON), "out of"),
    ("binary-offset-past-end", legacy_raw(2, [12, 12 + len(GOOD_JSON) + 50], GOOD_JSON), "out of"),
    ("binary-offsets-descending", legacy_raw(2, [12 + len(GOOD_JSON), 12], GOOD_JSON + b"buf"), "out of"),
    ("binary-json-not-json", legacy_raw(1, [8], b"{broken"), "not JSON"),
    ("binary-json-not-utf8", legacy_raw(1, [8], b'{"a": "\xff\xfe"}'), "not JSON"),
    ("binary-json-array", legacy_raw(1, [8], b"[]"), "JSON object"),
    ("binary-bad-channel", encode_legacy_binary({"header": HEADER, "channel": "iopub"}, [b"x"]), "channel"),
]

V1_ERRORS = [
    ("text-frame", "{}", "binary frames only"),
    ("empty", b"", "too short"),
    ("too-short", b"\x06\x00\x00", "too short"),
    ("table-past-end", v1_raw(6, [56], b"shell"), "does not fit"),
    ("zero-count", v1_raw(0, [], b""), "does not fit"),
    ("too-few-parts", encode_v1("shell", GOOD[:3]), "needs channel"),
    ("offset-past-end", encode_v1("shell", GOOD)[:-5], "out of"),
    ("offset-inside-table", v1_raw(6, [8, 8, 8, 8, 8, 8], b""), "out of"),
    ("offsets-descending", v1_raw(6, [56, 61, 60, 70, 80, 90], b"x" * 40), "out of"),
    ("channel-iopub", encode_v1("iopub", GOOD), "channel"),
    ("channel-unknown", encode_v1("heartbeat", GOOD), "channel"),
    ("header-not-json", encode_v1("shell", [b"{x", *GOOD[1:]]), "not JSON"),
    ("parent-not-json", encode_v1("shell", [GOOD[0], b"nope", *GOOD[2:]]), "not JSON"),
    ("metadata-not-json", encode_v1("shell", [*GOOD[:2], b"", GOOD[3]]), "not JSON"),
    ("content-not-json", encode_v1("shell", [*GOOD[:3], b"{"]), "not JSON"),
    ("header-not-object", encode_v1("shell", [b"[]", *GOOD[1:]]), "header"),
    ("header-without-msg-type", encode_v1("shell", [b'{"msg_id": "x"}', *GOOD[1:]]), "msg_type"),
]


@pytest.mark.parametrize("frame,match", [e[1:] for e in LEGACY_ERRORS], ids=[e[0] for e in LEGACY_ERRORS])
def test_legacy_frame_errors(frame, match):
    with pytest.raises(FrameError, match=match) as info:
        client_message_to_parts(frame, "legacy")
    assert str(info.value)


@pytest.mark.parametrize("frame,match", [e[1:] for e in V1_ERRORS], ids=[e[0] for e in V1_ERRORS])
def test_v1_frame_errors(frame, match):
    with pytest.raises(FrameError, match=match) as info:
        client_message_to_parts(frame, V1_SUBPROTOCOL)
    assert str(info.value)


def test_frame_error_is_a_value_error():
    assert issubclass(FrameError, ValueError)


# Frames that raise something other than FrameError: the websocket handler catches only FrameError, so these
# abort the connection (no 1007 close) and log a traceback. See tests/websocket/test_robustness.py.
@pytest.mark.parametrize("channel", [["shell"], {"name": "shell"}], ids=["list", "object"])
def test_unhashable_channel_is_a_frame_error(channel):
    with pytest.raises(FrameError):
        client_message_to_parts(json.dumps({"header": HEADER, "channel": channel}), "legacy")


def test_lone_surrogate_is_a_frame_error():
    with pytest.raises(FrameError):
        client_message_to_parts('{"header": {"msg_type": "\\ud800"}}', "legacy")


def test_deeply_nested_json_is_a_frame_error():
    with pytest.raises(FrameError):
        client_message_to_parts("[" * 100_000 + "]" * 100_000, "legacy")


# -- messages the gateway originates ---------------------------------------------------------------------------------


def test_make_message_parts():
    parent = {"msg_id": "p", "msg_type": "execute_request"}
    parts = make_message_parts("status", {"execution_state": "restarting"}, "gateway", parent)
    assert len(parts) == 4
    header = json.loads(parts[0])
    assert header["msg_type"] == "status" and header["session"] == "gateway"
    for key in ("msg_id", "username", "version", "date"):
        assert isinstance(header[key], str) and header[key]
    assert datetime.fromisoformat(header["date"]).tzinfo is not None
    assert json.loads(parts[1]) == parent
    assert json.loads(parts[2]) == {}
    assert json.loads(parts[3]) == {"execution_state": "restarting"}
    other = make_message_parts("status", {}, "gateway")
    assert json.loads(other[1]) == {}
    assert json.loads(other[0])["msg_id"] != header["msg_id"]
    # what the gateway originates frames like anything else
    msg = KernelMessage("iopub", parts, header)
    assert json.loads(to_legacy_frame(msg)[0])["content"] == {"execution_state": "restarting"}
    assert decode_v1(to_v1_frame(msg)) == ("iopub", parts)
