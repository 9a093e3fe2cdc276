"""The response listener against real TCP connections: legitimate payloads in, every kind of abuse out."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import logging
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import load_der_public_key
from traitlets import TraitError

from provisioners.handshake import ResponseListener

LAUNCHER = Path(__file__).resolve().parents[2] / "launchers/python/launch_ipykernel.py"
_spec = importlib.util.spec_from_file_location("launch_ipykernel", LAUNCHER)
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)

CONNECTION = {"ip": "127.0.0.1", "transport": "tcp", "shell_port": 1, "iopub_port": 2, "stdin_port": 3,
              "control_port": 4, "hb_port": 5, "key": "k", "signature_scheme": "hmac-sha256"}


def payload(kernel_id: str, token: str) -> dict:
    return {"version": 1, "kernel_id": kernel_id, "launch_token": token, "connection_info": dict(CONNECTION),
            "control_port": 6, "control_key": base64.b64encode(b"x" * 32).decode(), "pid": 42, "pgid": 42,
            "hostname": "h"}


def message(listener: ResponseListener, kernel_id: str, token: str) -> bytes:
    return launcher.encrypt_payload(payload(kernel_id, token), kernel_id, listener.public_key)[0]


async def send(port: int, data: bytes) -> None:
    """Send and close without reading, as an attacker or an old launcher does."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.close()


async def exchange(port: int, data: bytes, eof: bool = False) -> bytes:
    """Send ``data`` (then EOF, as EG's launcher does, if ``eof``); return all the listener answers (the ack, or b"")."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    if eof:
        writer.write_eof()
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def report(listener: ResponseListener, kernel_id: str, token: str, timeout: float = 10.0) -> None:
    """The real launcher's send path (connect, encrypt, send, verify the ack, retry), in a thread as it runs."""
    await asyncio.to_thread(launcher.send_connection_info, f"127.0.0.1:{listener.port}", payload(kernel_id, token),
                            kernel_id, listener.public_key, timeout)


async def until(predicate, timeout: float, what: str) -> None:
    """Wait for ``predicate()`` with a deadline, without blocking the loop the listener runs on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def errors_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.fixture
async def listener():
    server = ResponseListener(response_ip="127.0.0.1", read_timeout=1.0, accept_enterprise_gateway=True)
    await server.start()
    yield server
    await server.stop()


async def test_legitimate_payload_is_accepted_and_acknowledged(listener):
    kid = str(uuid.uuid4())
    token = listener.register(kid)
    await report(listener, kid, token)  # returns only once the ack verified
    info = await asyncio.wait_for(listener.wait(kid), 5)
    assert info.connection_info["shell_port"] == 1 and info.control_key == b"x" * 32 and info.pid == 42


async def test_abuse_is_dropped_and_launches_still_succeed(listener, caplog):
    victim = str(uuid.uuid4())
    token = listener.register(victim)
    good = message(listener, victim, token)
    stranger_key = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    attacks = [
        os.urandom(300),                                                   # random bytes
        good[:40],                                                         # truncated
        good[:-5],                                                         # length mismatch
        launcher.encrypt_payload(payload(victim, token), victim, stranger_key)[0],   # wrong key
        message(listener, victim, "wrong-token"),                          # wrong token
        b"KGL1" + struct.pack(">I", 10) + b"{not json}",                  # malformed envelope
        b"KGL1" + b"\xff" * (70 * 1024),                                  # over the size limit
    ]
    # a flood of junk connections alongside
    await asyncio.gather(*(send(listener.port, data) for data in attacks * 5))
    await until(lambda: not listener._serving, 10, "the flood handled")
    # every attack was read and dropped without an ack
    assert await asyncio.gather(*(exchange(listener.port, data) for data in attacks)) == [b""] * len(attacks)
    assert not listener._launches[victim].future.done(), "an attack completed the launch"
    # an idle connection that never sends is cut off by the read timeout, not kept forever
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", listener.port)
    others = [str(uuid.uuid4()) for _ in range(5)]
    tokens = {k: listener.register(k) for k in others}
    await asyncio.gather(report(listener, victim, token), *(report(listener, k, tokens[k]) for k in others))
    results = await asyncio.wait_for(asyncio.gather(*(listener.wait(k) for k in [victim, *others])), 5)
    assert [r.pid for r in results] == [42] * 6
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # closed by the listener
    idle_writer.close()
    log = caplog.text
    assert "does not decrypt" in log and "wrong launch token" in log and token not in log
    assert not errors_logged(caplog)


async def test_a_retry_is_acknowledged_again_but_a_replay_completes_no_other_launch(listener, caplog):
    kid = str(uuid.uuid4())
    token = listener.register(kid)
    data, ack = launcher.encrypt_payload(payload(kid, token), kid, listener.public_key)
    assert await exchange(listener.port, data) == ack
    first = await asyncio.wait_for(listener.wait(kid), 5)
    # the ack was lost: the launcher sends again (the same bytes, or a new encryption) and is acked again
    assert await exchange(listener.port, data) == ack
    again, again_ack = launcher.encrypt_payload(dict(payload(kid, token), pid=99), kid, listener.public_key)
    assert await exchange(listener.port, again) == again_ack
    assert (await listener.wait(kid)) is first and first.pid == 42  # nothing changed
    # a restart of the same kernel: new token; the old report is refused and completes nothing
    new_token = listener.register(kid)
    assert await exchange(listener.port, data) == b""
    assert "wrong launch token" in caplog.text and not listener._launches[kid].future.done()
    # nor does it complete any other kernel's launch: the kernel id is bound into the ciphertext
    other = str(uuid.uuid4())
    listener.register(other)
    moved = json.loads(data[8:])
    moved["kernel_id"] = other
    moved = json.dumps(moved).encode()
    assert await exchange(listener.port, b"KGL1" + struct.pack(">I", len(moved)) + moved) == b""
    assert not listener._launches[other].future.done()
    await report(listener, kid, new_token)
    assert (await listener.wait(kid)).pid == 42


async def test_junk_is_dropped_at_its_first_bytes_not_at_the_deadline(caplog):
    slow = ResponseListener(response_ip="127.0.0.1", read_timeout=60.0, accept_enterprise_gateway=True)
    await slow.start()
    try:
        for junk in (b"\x00" + os.urandom(20), b"GET / HTTP/1.1\r\n", b"KGL2"):
            reader, writer = await asyncio.open_connection("127.0.0.1", slow.port)
            writer.write(junk)  # and keep the connection open
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # long before the 60 s deadline
            writer.close()
        assert "not a launcher payload" in caplog.text
    finally:
        await slow.stop()


async def test_per_peer_and_total_limits_close_extra_connections_at_once(caplog):
    limited = ResponseListener(response_ip="127.0.0.1", read_timeout=60.0, max_connections_per_peer=4,
                               max_connections=6)
    await limited.start()
    held = []
    try:
        async def hold(source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            conn = await asyncio.open_connection("127.0.0.1", limited.port, local_addr=(source, 0))
            held.append(conn[1])
            return conn

        first = [await hold("127.0.0.2") for _ in range(4)]
        await until(lambda: len(limited._serving) == 4, 10, "4 connections held")
        extra_reader, _ = await hold("127.0.0.2")  # a fifth from the same peer
        assert await asyncio.wait_for(extra_reader.read(), 5) == b""
        assert "it already holds 4 connections" in caplog.text
        for _ in range(2):
            await hold("127.0.0.3")
        await until(lambda: len(limited._serving) == 6, 10, "6 connections held")
        over_reader, _ = await hold("127.0.0.4")  # within its peer limit, over the total
        assert await asyncio.wait_for(over_reader.read(), 5) == b""
        assert "6 connections open" in caplog.text
        assert all(not reader.at_eof() for reader, _ in first)  # the held ones are still open
        # one closes: a launcher gets in (its first attempt may be refused; it retries)
        held[0].close()
        kid = str(uuid.uuid4())
        await report(limited, kid, limited.register(kid))
        assert (await limited.wait(kid)).pid == 42
    finally:
        for writer in held:
            writer.close()
        await limited.stop()


async def test_drops_are_logged_once_per_reason_and_then_counted(listener, caplog):
    for data in [b"\x00junk"] * 200 + [b"KGL1\xff\xff\xff\xff"] * 50:
        assert await exchange(listener.port, data) == b""
    warnings = [r.getMessage() for r in caplog.records if r.name == "provisioners.handshake" and r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # one per reason, however many connections
    listener._drops.flush()  # what the interval timer does
    summary = caplog.records[-1].getMessage()
    assert "also dropped 248 connections" in summary and "199 not a payload" in summary and "49 malformed" in summary


def seal(listener: ResponseListener, kernel_id: str, plaintext: bytes, ephemeral_public: bytes | None = None) -> bytes:
    """Our framing around an arbitrary plaintext, encrypted as the launcher does (or with a given ephemeral key)."""
    ephemeral = X25519PrivateKey.generate()
    gateway = X25519PublicKey.from_public_bytes(base64.b64decode(listener.public_key))
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=launcher.HKDF_INFO).derive(ephemeral.exchange(gateway))
    nonce = os.urandom(12)
    envelope = json.dumps({
        "kernel_id": kernel_id,
        "ephemeral_public_key": base64.b64encode(ephemeral_public or ephemeral.public_key().public_bytes_raw()).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(AESGCM(key).encrypt(nonce, plaintext, kernel_id.encode())).decode(),
    }).encode()
    return b"KGL1" + struct.pack(">I", len(envelope)) + envelope


def _shape(kid: str, token: str, info: dict | None = None, **change) -> bytes:
    """A report with ``change`` in its top level and ``info`` in its connection_info."""
    changed = dict(payload(kid, token), **change)
    if info:
        changed["connection_info"].update(info)
    return json.dumps(changed).encode()


DEPTH = 20_000  # beyond any recursion limit of json, within the 64 KiB payload limit
MALFORMED = {
    "all-zero ephemeral key": (lambda kid, token: None, "unusable ephemeral key"),
    "nested plaintext": (lambda kid, token: b"[" * DEPTH + b"]" * DEPTH, "is not JSON"),
    "plaintext is a list": (lambda kid, token: json.dumps([payload(kid, token)]).encode(), "wrong version"),
    "connection_info is a list": (lambda kid, token: _shape(kid, token, connection_info=[1, 2]), "not an object"),
    "port is a string": (lambda kid, token: _shape(kid, token, info={"shell_port": "1"}), "shell_port is not a port"),
    "port is a bool": (lambda kid, token: _shape(kid, token, info={"hb_port": True}), "hb_port is not a port"),
    "port out of range": (lambda kid, token: _shape(kid, token, info={"iopub_port": 70000}), "iopub_port is not a port"),
    "key is a number": (lambda kid, token: _shape(kid, token, info={"key": 5}), "key is not a non-empty string"),
    "control port is a dict": (lambda kid, token: _shape(kid, token, control_port={}), "control port is not"),
    "pid is a string": (lambda kid, token: _shape(kid, token, pid="42"), "pid is not a number"),
    "control key not base64": (lambda kid, token: _shape(kid, token, control_key="***"), "not base64"),
    "token is a number": (lambda kid, token: _shape(kid, token, launch_token=7), "no launch token"),
    "warm without a control key": (lambda kid, token: _shape(kid, token, warm=True, ip="127.0.0.1", control_key=None),
                                   "warm payload for kernel"),
    "warm without an address": (lambda kid, token: _shape(kid, token, warm=True), "needs ip, control_port and control_key"),
    "missing connection_info": (lambda kid, token: _shape(kid, token, connection_info=None), "not an object"),
    "curve key too short": (lambda kid, token: _shape(kid, token, info={"curve_publickey": "abc"}), "not a Z85 CurveZMQ"),
    "curve secret key reported": (lambda kid, token: _shape(kid, token, info={"curve_publickey": "a" * 40,
                                                                              "curve_secretkey": "b" * 40}),
                                  "carries curve_secretkey"),
}


@pytest.mark.parametrize("case", [*MALFORMED, "nested envelope"])
async def test_malformed_payloads_are_dropped_not_crashed_on(listener, caplog, case):
    kid = str(uuid.uuid4())
    token = listener.register(kid)
    if case == "nested envelope":
        envelope = b"[" * DEPTH + b"]" * DEPTH
        data, expected = b"KGL1" + struct.pack(">I", len(envelope)) + envelope, "malformed envelope (RecursionError)"
    else:
        make, expected = MALFORMED[case]
        plaintext = make(kid, token)
        data = seal(listener, kid, plaintext or _shape(kid, token), None if plaintext else bytes(32))
    assert await exchange(listener.port, data) == b""
    assert expected in caplog.text and not errors_logged(caplog)
    assert not listener._launches[kid].future.done()
    await report(listener, kid, token)  # the listener serves on, and the launch still completes
    assert (await listener.wait(kid)).pid == 42


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
    listener.register(kid, enterprise_gateway=True)
    info = dict(CONNECTION, kernel_id=kid, pid=7, pgid=7, comm_port=9)
    await send(listener.port, eg_payload(listener.eg_public_key, info))
    got = await asyncio.wait_for(listener.wait(kid), 5)
    assert got.legacy and got.control_port == 9 and got.connection_info["hb_port"] == 5

    strict = ResponseListener(response_ip="127.0.0.1", read_timeout=1.0)
    await strict.start()
    try:
        kid2 = str(uuid.uuid4())
        strict.register(kid2, enterprise_gateway=True)
        assert await exchange(strict.port, eg_payload(listener.eg_public_key, dict(info, kernel_id=kid2)), eof=True) == b""
        assert not strict._launches[kid2].future.done()
    finally:
        await strict.stop()


async def test_enterprise_gateway_payload_completes_only_launches_registered_for_it(listener, caplog):
    ours, eg = str(uuid.uuid4()), str(uuid.uuid4())
    ours_token = listener.register(ours)
    eg_token = listener.register(eg, enterprise_gateway=True)
    info = dict(CONNECTION, pid=7, pgid=7, comm_port=9)
    # a tokenless EG payload, built from the public RSA key, for a launch of our launcher: refused
    assert await exchange(listener.port, eg_payload(listener.eg_public_key, dict(info, kernel_id=ours)), eof=True) == b""
    assert "which was launched for ours" in caplog.text and not listener._launches[ours].future.done()
    await report(listener, ours, ours_token)
    assert not (await listener.wait(ours)).legacy
    # our format, with its token, for an EG-registered launch: fine (ours is stronger)
    await report(listener, eg, eg_token)
    assert (await listener.wait(eg)).pid == 42
    # and an EG payload after it is a replay
    assert await exchange(listener.port, eg_payload(listener.eg_public_key, dict(info, kernel_id=eg)), eof=True) == b""
    assert "has already reported" in caplog.text and (await listener.wait(eg)).pid == 42


async def test_a_forged_ack_is_not_taken_for_one(listener):
    """Only the holder of the gateway's private key can produce the ack; anything else makes the launcher retry."""
    kid = str(uuid.uuid4())
    token = listener.register(kid)
    genuine = launcher.encrypt_payload(payload(kid, token), kid, listener.public_key)
    assert await exchange(listener.port, genuine[0]) == genuine[1]
    for forged in (b"KGA1" + os.urandom(32), genuine[1]):  # random, and a real ack replayed from another report
        attempts: list[bytes] = []

        async def fake_gateway(reader, writer, forged=forged):
            attempts.append(await reader.read(65536))
            writer.write(forged)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(fake_gateway, "127.0.0.1", 0)
        try:
            address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
            with pytest.raises(TimeoutError, match="did not verify"):
                await asyncio.to_thread(launcher.send_connection_info, address, payload(kid, token), kid,
                                        listener.public_key, 1.5)
            assert len(attempts) >= 3 and all(a.startswith(b"KGL1") for a in attempts)  # it retried
        finally:
            server.close()


async def test_launcher_retries_after_a_dropped_connection_and_a_listener_not_up(caplog):
    server = ResponseListener(response_ip="127.0.0.1", read_timeout=1.0)
    await server.start()
    port, kid = server.port, str(uuid.uuid4())
    token = server.register(kid)
    await server.stop()  # not listening now; the launcher's attempts are refused
    server.response_port = port  # it comes back on the same port
    plain = socket.socket()
    plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    plain.bind(("127.0.0.1", port))
    plain.listen()
    plain.setblocking(False)
    sending = asyncio.ensure_future(report(server, kid, token, timeout=30))
    try:
        loop = asyncio.get_running_loop()
        conn, _ = await asyncio.wait_for(loop.sock_accept(plain), 10)
        first = await asyncio.wait_for(loop.sock_recv(conn, 65536), 10)
        assert first.startswith(b"KGL1")
        conn.close()  # dropped without an ack
        plain.close()  # and nobody listens for a while
        assert not sending.done()
        await server.start()  # same port, same key
        await asyncio.wait_for(sending, 30)
        assert (await server.wait(kid)).pid == 42
    finally:
        sending.cancel()
        plain.close()
        await server.stop()


def test_launcher_exits_3_with_a_message_when_never_acknowledged(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key = base64.b64encode(X25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(LAUNCHER), "--kernel-id", str(uuid.uuid4()), "--response-address", f"127.0.0.1:{port}",
         "--public-key", key, "--ip", "127.0.0.1", "--launch-token-stdin", "--connect-timeout", "2"],
        input=secrets.token_urlsafe(32) + "\n", capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    assert "did not acknowledge the connection info within 2s" in done.stderr and "status 3" in done.stderr
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("option, value", [("read_timeout", 0.0), ("max_connections_per_peer", -1),
                                           ("max_connections", 0)])
def test_limit_options_are_validated(option, value):
    with pytest.raises(TraitError, match=option):
        ResponseListener(**{option: value})
