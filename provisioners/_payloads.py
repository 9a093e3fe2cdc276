"""Launcher report formats for the response listener: decrypt, check the shape, compute the ack.

Ours (version 1, docs/operators/launcher-protocol.md): ``KGL1`` | u32 length | JSON envelope whose
ciphertext is AES-256-GCM under HKDF(X25519(launcher's ephemeral key, ours)); the ack is ``KGA1``
+ HMAC-SHA256 of the whole message under a second key from the same exchange, so only a holder of
our private key can produce it. Enterprise Gateway's version 1: base64 JSON with an RSA-wrapped
AES-ECB key; no token, no ack. Every malformed input raises :class:`Rejected`, never anything else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["ACK_MAGIC", "MAGIC", "MAX_PAYLOAD", "Envelope", "LaunchInfo", "Rejected", "decode_eg", "open_envelope",
           "parse_envelope", "seal_start_request"]

MAGIC = b"KGL1"
HKDF_INFO = b"kernel-gateway launcher v1"
ACK_MAGIC = b"KGA1"
ACK_INFO = b"kernel-gateway launcher v1 ack"
START_INFO = b"kernel-gateway launcher v1 start"
MAX_PAYLOAD = 64 * 1024
_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
_EG_KEYS = (*_PORTS, "ip", "key", "transport", "signature_scheme", "kernel_name")


@dataclass
class LaunchInfo:
    """What a launcher reported: connection info for jupyter_client, and how to reach its control port."""

    connection_info: dict[str, Any]
    control_port: int | None = None
    control_key: bytes | None = None
    pid: int | None = None
    pgid: int | None = None
    hostname: str = ""
    legacy: bool = False
    warm: bool = False  # a warm launcher's report: no kernel yet, ``connection_info`` holds only its ``ip``


class Rejected(Exception):
    """A payload that is dropped: ``reason`` is a fixed category, the text says why (never what it contained)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Envelope:
    """Our message, parsed but not yet decrypted."""

    message: bytes
    kernel_id: str
    peer_key: X25519PublicKey
    nonce: bytes
    ciphertext: bytes


def parse_envelope(message: bytes) -> Envelope:
    """The envelope of a framed message (``MAGIC`` | length | JSON); cheap, so it runs before any decryption."""
    try:
        envelope = json.loads(message[8:])
        kernel_id = envelope["kernel_id"]
        if not isinstance(kernel_id, str):
            raise TypeError("kernel_id")
        return Envelope(message, kernel_id,
                        X25519PublicKey.from_public_bytes(base64.b64decode(envelope["ephemeral_public_key"], validate=True)),
                        base64.b64decode(envelope["nonce"], validate=True),
                        base64.b64decode(envelope["ciphertext"], validate=True))
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise Rejected("malformed", f"malformed envelope ({type(exc).__name__})") from None


def open_envelope(envelope: Envelope, private: X25519PrivateKey) -> tuple[LaunchInfo, str, bytes]:
    """Decrypt and check ``envelope``: the report, its launch token, and the ack that answers it."""
    kernel_id = envelope.kernel_id
    try:
        shared = private.exchange(envelope.peer_key)
    except ValueError:  # a low-order (e.g. all-zero) key: no shared secret
        raise Rejected("malformed", f"payload for kernel {kernel_id} has an unusable ephemeral key") from None
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(shared)
    try:
        plaintext = AESGCM(key).decrypt(envelope.nonce, envelope.ciphertext, kernel_id.encode())
    except (InvalidTag, ValueError):  # ValueError: a nonce of the wrong size
        raise Rejected("undecryptable", f"payload for kernel {kernel_id} does not decrypt with our key") from None
    try:
        plain = json.loads(plaintext)
    except (ValueError, RecursionError):
        raise Rejected("wrong shape", f"payload for kernel {kernel_id} is not JSON") from None
    if not isinstance(plain, dict) or plain.get("version") != 1 or plain.get("kernel_id") != kernel_id:
        raise Rejected("wrong shape", f"payload for kernel {kernel_id} has the wrong version or kernel id")
    if not isinstance(plain.get("launch_token"), str):
        raise Rejected("wrong shape", f"payload for kernel {kernel_id} has no launch token")
    if plain.get("warm") is True:
        info = _warm_info(kernel_id, plain)
    else:
        info = _launch_info(kernel_id, plain, plain.get("connection_info"), plain.get("control_port"))
    ack_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=ACK_INFO).derive(shared)
    return info, plain["launch_token"], ACK_MAGIC + hmac.new(ack_key, envelope.message, hashlib.sha256).digest()


def seal_start_request(control_key: bytes, plain: dict[str, Any]) -> dict[str, str]:
    """A warm launcher's start request body: ``plain`` (launch token and environment) sealed with AES-256-GCM under
    a key derived from the launcher's control key, so the client's environment never crosses the network readable."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=START_INFO).derive(control_key)
    nonce = secrets.token_bytes(12)
    ciphertext = AESGCM(key).encrypt(nonce, json.dumps(plain).encode(), b"start")
    return {"nonce": base64.b64encode(nonce).decode(), "ciphertext": base64.b64encode(ciphertext).decode()}


def decode_eg(data: bytes, private: rsa.RSAPrivateKey, peer: str) -> tuple[str, LaunchInfo]:
    """Enterprise Gateway's version-1 payload: the kernel id it names and its report."""
    try:
        envelope = json.loads(base64.b64decode(data))
        aes_key = private.decrypt(base64.b64decode(envelope["key"]), padding.PKCS1v15())
        decryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).decryptor()  # noqa: S305 - EG's format
        padded = decryptor.update(base64.b64decode(envelope["conn_info"])) + decryptor.finalize()
        plain = json.loads(padded[: -padded[-1]])
    except Exception:  # any failure to parse or decrypt (RecursionError included): not a payload for us
        raise Rejected("undecryptable", "not a decryptable Enterprise Gateway payload") from None
    if not isinstance(plain, dict) or not isinstance(plain.get("kernel_id"), str):
        raise Rejected("wrong shape", "an Enterprise Gateway payload without a kernel id")
    kernel_id = plain["kernel_id"]
    connection = {k: plain[k] for k in _EG_KEYS if k in plain}
    if connection.get("ip") in (None, "", "0.0.0.0", "::"):
        connection["ip"] = peer  # EG launchers report the unspecified address
    # EG's "control_port" is the kernel's ZMQ control channel; its launcher listens on "comm_port"
    info = _launch_info(kernel_id, plain, connection, plain.get("comm_port"))
    info.legacy = True
    return kernel_id, info


def _is_port(value: Any) -> bool:
    return type(value) is int and 0 < value < 65536


def _warm_info(kernel_id: str, plain: dict[str, Any]) -> LaunchInfo:
    """A warm launcher's report (its control port, key and address) as a :class:`LaunchInfo`, or :class:`Rejected`."""
    ip = plain.get("ip")
    if not isinstance(ip, str) or not ip or not _is_port(plain.get("control_port")) or not plain.get("control_key"):
        raise Rejected("wrong shape", f"warm payload for kernel {kernel_id}: needs ip, control_port and control_key")
    info = _launch_info(kernel_id, plain, None, plain["control_port"], warm=True)
    info.connection_info, info.warm = {"ip": ip}, True
    return info


def _launch_info(kernel_id: str, plain: dict[str, Any], connection: Any, control_port: Any,
                 warm: bool = False) -> LaunchInfo:
    """The report as a :class:`LaunchInfo`, or :class:`Rejected` naming the first field of the wrong shape.
    A ``warm`` report has no connection info."""
    def wrong(what: str) -> Rejected:
        return Rejected("wrong shape", f"payload for kernel {kernel_id}: {what}")

    if not warm:
        _check_connection(connection, wrong)
    if control_port is not None and not _is_port(control_port):
        raise wrong("the launcher's control port is not a port number")
    for name in ("pid", "pgid"):
        if plain.get(name) is not None and type(plain[name]) is not int:
            raise wrong(f"{name} is not a number")
    hostname = plain.get("hostname") or ""
    if not isinstance(hostname, str):
        raise wrong("hostname is not a string")
    control_key = plain.get("control_key")
    try:
        key = base64.b64decode(control_key, validate=True) if control_key is not None else None
    except (ValueError, TypeError):
        raise wrong("control_key is not base64") from None
    return LaunchInfo(connection_info=dict(connection or {}), control_port=control_port, control_key=key or None,
                      pid=plain.get("pid"), pgid=plain.get("pgid"), hostname=hostname)


def _check_connection(connection: Any, wrong: Any) -> None:
    if not isinstance(connection, dict):
        raise wrong("connection_info is not an object")
    for name in _PORTS:
        if not _is_port(connection.get(name)):
            raise wrong(f"{name} is not a port number")
    for name in ("ip", "key"):
        if not isinstance(connection.get(name), str) or not connection[name]:
            raise wrong(f"{name} is not a non-empty string")
    for name in ("transport", "signature_scheme", "kernel_name"):
        if not isinstance(connection.get(name, ""), str):
            raise wrong(f"{name} is not a string")
    curve = connection.get("curve_publickey")
    if curve is not None and not (isinstance(curve, str) and len(curve) == 40):
        raise wrong("curve_publickey is not a Z85 CurveZMQ public key (40 characters)")
    if "curve_secretkey" in connection:  # the kernel's secret never leaves its launcher
        raise wrong("it carries curve_secretkey; a launcher reports the public key only")
