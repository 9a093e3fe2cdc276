"""The response listener against real TCP connections: legitimate payloads in, every kind of abuse out."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import struct
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import load_der_public_key

from provisioners.handshake import ResponseListener

_spec = importlib.util.spec_from_file_location(
    "launch_ipykernel", Path(__file__).resolve().parents[2] / "launchers/python/launch_ipykernel.py")
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)

CONNECTION = {"ip": "127.0.0.1", "transport": "tcp", "shell_port": 1, "iopub_port": 2, "stdin_port": 3,
              "control_port": 4, "hb_port": 5, "key": "k", "signature_scheme": "hmac-sha256"}


def payload(kernel_id: str, token: str) -> dict:
    return {"version": 1, "kernel_id": kernel_id, "launch_token": token, "connection_info": dict(CONNECTION),
            "control_port": 6, "control_key": base64.b64encode(b"x" * 32).decode(), "pid": 42, "pgid": 42,
            "hostname": "h"}


async def send(port: int, data: bytes) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()


@pytest.fixture
async def listener():
    server = ResponseListener(response_ip="127.0.0.1", read_timeout=1.0, accept_enterprise_gateway=True)
    await server.start()
    yield server
    await server.stop()


async def test_legitimate_payload_is_accepted(listener):
    kid = str(uuid.uuid4())
    token = listener.register(kid)
    await send(listener.port, launcher.encrypt_payload(payload(kid, token), kid, listener.public_key))
    info = await asyncio.wait_for(listener.wait(kid), 5)
    assert info.connection_info["shell_port"] == 1 and info.control_key == b"x" * 32 and info.pid == 42


async def test_abuse_is_dropped_and_launches_still_succeed(listener, caplog):
    victim = str(uuid.uuid4())
    token = listener.register(victim)
    good = launcher.encrypt_payload(payload(victim, token), victim, listener.public_key)
    stranger_key = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    attacks = [
        os.urandom(300),                                                   # random bytes
        good[:40],                                                         # truncated
        good[:-5],                                                         # length mismatch
        launcher.encrypt_payload(payload(victim, token), victim, stranger_key),   # wrong key
        launcher.encrypt_payload(payload(victim, "wrong-token"), victim, listener.public_key),  # wrong token
        b"KGL1" + struct.pack(">I", 10) + b"{not json}",                  # malformed envelope
        b"KGL1" + b"\xff" * (70 * 1024),                                  # over the size limit
    ]
    # a flood of junk connections alongside
    await asyncio.gather(*(send(listener.port, data) for data in attacks * 5))
    assert not listener._pending[victim].future.done(), "an attack completed the launch"
    # an idle connection that never sends is cut off by the read timeout, not kept forever
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", listener.port)
    others = [str(uuid.uuid4()) for _ in range(5)]
    tokens = {k: listener.register(k) for k in others}
    await asyncio.gather(send(listener.port, good), *(
        send(listener.port, launcher.encrypt_payload(payload(k, tokens[k]), k, listener.public_key)) for k in others))
    results = await asyncio.wait_for(asyncio.gather(*(listener.wait(k) for k in [victim, *others])), 5)
    assert [r.pid for r in results] == [42] * 6
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed by the listener
    idle_writer.close()
    log = caplog.text
    assert "does not decrypt" in log and "wrong launch token" in log and token not in log


async def test_replayed_payload_is_dropped(listener, caplog):
    kid = str(uuid.uuid4())
    token = listener.register(kid)
    data = launcher.encrypt_payload(payload(kid, token), kid, listener.public_key)
    await send(listener.port, data)
    await asyncio.wait_for(listener.wait(kid), 5)
    listener.register(kid)  # a restart of the same kernel: new token
    await send(listener.port, data)
    await asyncio.sleep(0)  # let the listener read
    for _ in range(50):
        if "wrong launch token" in caplog.text:
            break
        await asyncio.sleep(0.05)
    assert "wrong launch token" in caplog.text
    assert not listener._pending[kid].future.done()


def eg_payload(public_key_b64: str, info: dict) -> bytes:
    """Enterprise Gateway's version-1 format as documented: RSA PKCS#1 v1.5 key wrap, AES-ECB with PKCS7."""
    aes_key = os.urandom(16)
    padder = sym_padding.PKCS7(128).padder()
    padded = padder.update(json.dumps(info).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
    conn_info = encryptor.update(padded) + encryptor.finalize()
    rsa_key = load_der_public_key(base64.b64decode(public_key_b64))
    envelope = {"version": 1, "key": base64.b64encode(rsa_key.encrypt(aes_key, padding.PKCS1v15())).decode(),
                "conn_info": base64.b64encode(conn_info).decode()}
    return base64.b64encode(json.dumps(envelope).encode())


async def test_enterprise_gateway_payload_accepted_only_when_enabled(listener):
    kid = str(uuid.uuid4())
    listener.register(kid)
    info = dict(CONNECTION, kernel_id=kid, pid=7, pgid=7, comm_port=9)
    await send(listener.port, eg_payload(listener.eg_public_key, info))
    got = await asyncio.wait_for(listener.wait(kid), 5)
    assert got.legacy and got.control_port == 9 and got.connection_info["hb_port"] == 5

    strict = ResponseListener(response_ip="127.0.0.1", read_timeout=1.0)
    await strict.start()
    try:
        kid2 = str(uuid.uuid4())
        strict.register(kid2)
        await send(strict.port, eg_payload(listener.eg_public_key, dict(info, kernel_id=kid2)))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(strict.wait(kid2), 1)
    finally:
        await strict.stop()
