"""The response listener: one asyncio TCP server receiving every remote kernel's connection info.

Launchers connect once, send an envelope encrypted to this process's X25519 key (format in
``launchers/python/launch_ipykernel.py`` and docs/operators/launcher-protocol.md) and close.
The listener accepts a payload only if it decrypts, fits :data:`MAX_PAYLOAD`, names a pending
kernel and carries that kernel's launch token; a kernel id is then no longer pending, so a
replay is dropped too. Anything else is logged without secrets and dropped; other launches go
on. With ``accept_enterprise_gateway`` on, Enterprise Gateway's version-1 payload (RSA + AES,
no launch token) is accepted as well, so EG kernel images work unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from traitlets import Bool, Float, Integer, Unicode

from .envconfig import EnvConfigurable
from .errors import LaunchError, PortRangeError
from .ports import PortAllocator, parse_port_range

__all__ = ["LaunchInfo", "ResponseListener"]

log = logging.getLogger("provisioners.handshake")

MAGIC = b"KGL1"
HKDF_INFO = b"kernel-gateway launcher v1"
MAX_PAYLOAD = 64 * 1024
MAX_CONNECTIONS = 64


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


@dataclass
class _Pending:
    token: str
    future: asyncio.Future = field(repr=False)


class _Rejected(Exception):
    """A payload that is dropped; the text says why (never what it contained)."""


class ResponseListener(EnvConfigurable):
    """Receives launchers' connection info for every remote kernel in this process (one per process)."""

    response_ip = Unicode(
        "0.0.0.0",
        config=True,
        help="Address the response listener binds.",
    ).tag(env="GATEWAY_RESPONSE_IP")
    response_port = Integer(
        0,
        config=True,
        help="Port of the response listener; 0 picks a free one, inside response_port_range when that is set.",
    ).tag(env="GATEWAY_RESPONSE_PORT")
    response_port_range = Unicode(
        "",
        config=True,
        help="Range ('low..high') the listener's port is picked from when response_port is 0; usually the "
        "kernels' port range. Empty: any free port.",
    ).tag(env="GATEWAY_PORT_RANGE")
    accept_enterprise_gateway = Bool(
        False,
        config=True,
        help="Also accept Enterprise Gateway's version-1 launcher payload (RSA-2048 + AES, no launch token) so EG "
        "kernel images work unchanged. Weaker than our format: enable only while migrating. The gateway's "
        "--accept-enterprise-gateway flag sets this and CompatKernelSpecManager.accept_enterprise_gateway together.",
    ).tag(env="GATEWAY_ACCEPT_ENTERPRISE_GATEWAY")
    read_timeout = Float(
        10.0,
        config=True,
        help="Seconds a launcher connection may take to deliver its whole payload.",
    ).tag(env="GATEWAY_RESPONSE_READ_TIMEOUT")

    _instance: ResponseListener | None = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.base_events.Server | None = None
        self._private: X25519PrivateKey | None = None
        self._rsa: rsa.RSAPrivateKey | None = None
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._start_lock = asyncio.Lock()
        self.port = 0

    @classmethod
    def instance(cls, **kwargs: Any) -> ResponseListener:
        """The process's listener; created (without I/O) on first use."""
        if cls._instance is None:
            cls._instance = cls(**kwargs)
        return cls._instance

    async def start(self) -> None:
        """Generate keys and bind the server; idempotent. Called by the first remote launch, or by the app."""
        async with self._start_lock:
            if self._server is not None:
                return
            self._private = X25519PrivateKey.generate()
            if self.accept_enterprise_gateway:
                self._rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self._server = await self._bind()
            self.port = self._server.sockets[0].getsockname()[1]
            log.info("response listener on %s:%d", self.response_ip, self.port)

    async def _bind(self) -> asyncio.base_events.Server:
        if self.response_port:
            return await asyncio.start_server(self._serve, self.response_ip, self.response_port)
        port_range = parse_port_range(self.response_port_range, minimum_size=1)
        if port_range is None:
            return await asyncio.start_server(self._serve, self.response_ip, 0)
        for port in range(port_range.low, port_range.high + 1):
            if port in PortAllocator.instance().reserved:
                continue
            try:
                server = await asyncio.start_server(self._serve, self.response_ip, port)
            except OSError:
                continue
            PortAllocator.instance().reserve(port)
            return server
        raise PortRangeError(f"no free port for the response listener in {port_range}")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    @property
    def public_key(self) -> str:
        """Our X25519 public key, base64, for ``--public-key``."""
        assert self._private is not None, "start() first"
        raw = self._private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return base64.b64encode(raw).decode()

    @property
    def eg_public_key(self) -> str:
        """The RSA public key in Enterprise Gateway's form (base64 DER), for EG launchers."""
        if self._rsa is None:
            raise LaunchError("Enterprise Gateway launchers need accept_enterprise_gateway enabled")
        der = self._rsa.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()

    def register(self, kernel_id: str) -> str:
        """Expect a launcher for ``kernel_id``; return its one-time launch token."""
        token = secrets.token_urlsafe(32)
        self._pending[kernel_id] = _Pending(token, asyncio.get_running_loop().create_future())
        return token

    def unregister(self, kernel_id: str) -> None:
        pending = self._pending.pop(kernel_id, None)
        if pending is not None and not pending.future.done():
            pending.future.cancel()

    async def wait(self, kernel_id: str) -> LaunchInfo:
        """The launcher's report for ``kernel_id``; the caller bounds the wait."""
        return await asyncio.shield(self._pending[kernel_id].future)

    # -- the server ------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        if self._slots.locked():
            log.warning("response listener busy: dropped a connection from %s", peer)
            writer.close()
            return
        async with self._slots:
            try:
                data = await asyncio.wait_for(self._read_payload(reader), self.read_timeout)
                self._accept(data, peer[0] if peer else "")
            except asyncio.TimeoutError:
                log.warning("dropped a launcher connection from %s: no complete payload within %gs", peer, self.read_timeout)
            except _Rejected as exc:
                log.warning("dropped a launcher payload from %s: %s", peer, exc)
            except (ConnectionError, OSError) as exc:
                log.warning("launcher connection from %s failed: %s", peer, exc)
            finally:
                writer.close()

    @staticmethod
    async def _read_payload(reader: asyncio.StreamReader) -> bytes:
        """Everything the launcher sends until it closes, or a byte more than the limit."""
        data = b""
        while len(data) <= MAX_PAYLOAD:
            more = await reader.read(MAX_PAYLOAD + 1 - len(data))
            if not more:
                break
            data += more
        return data

    def _accept(self, data: bytes, peer: str = "") -> None:
        if len(data) > MAX_PAYLOAD:
            raise _Rejected(f"payload over {MAX_PAYLOAD} bytes")
        if data.startswith(MAGIC):
            kernel_id, info, token = self._decode_v1(data)
        elif self.accept_enterprise_gateway:
            kernel_id, info, token = self._decode_eg(data)
            if info.connection_info.get("ip") in (None, "", "0.0.0.0", "::"):
                info.connection_info["ip"] = peer  # EG launchers report the unspecified address
        else:
            raise _Rejected("not a version-1 launcher payload")
        pending = self._pending.get(kernel_id)
        if pending is None or pending.future.done():
            raise _Rejected(f"no launch pending for kernel {kernel_id}")
        if token is not None and not hmac.compare_digest(token.encode(), pending.token.encode()):
            raise _Rejected(f"wrong launch token for kernel {kernel_id}")
        del self._pending[kernel_id]
        pending.future.set_result(info)
        log.info("connection info received from %s", info.hostname or info.connection_info.get("ip"),
                 extra={"kernel_id": kernel_id})

    def _decode_v1(self, data: bytes) -> tuple[str, LaunchInfo, str]:
        if len(data) < 8:
            raise _Rejected("truncated payload")
        (length,) = struct.unpack(">I", data[4:8])
        if length != len(data) - 8:
            raise _Rejected("payload length does not match its header")
        try:
            envelope = json.loads(data[8:])
            kernel_id = str(envelope["kernel_id"])
            peer_key = X25519PublicKey.from_public_bytes(base64.b64decode(envelope["ephemeral_public_key"]))
            nonce = base64.b64decode(envelope["nonce"])
            ciphertext = base64.b64decode(envelope["ciphertext"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _Rejected(f"malformed envelope ({type(exc).__name__})") from None
        if kernel_id not in self._pending:
            raise _Rejected(f"no launch pending for kernel {kernel_id}")
        assert self._private is not None
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(self._private.exchange(peer_key))
        try:
            plain = json.loads(AESGCM(key).decrypt(nonce, ciphertext, kernel_id.encode()))
        except Exception:  # cryptography raises InvalidTag, ValueError for bad nonces: both mean "not for us"
            raise _Rejected(f"payload for kernel {kernel_id} does not decrypt with our key") from None
        if plain.get("version") != 1 or plain.get("kernel_id") != kernel_id:
            raise _Rejected(f"payload for kernel {kernel_id} has the wrong version or kernel id")
        info = _launch_info(plain, plain.get("connection_info") or {}, plain.get("control_port"))
        return kernel_id, info, str(plain.get("launch_token", ""))

    def _decode_eg(self, data: bytes) -> tuple[str, LaunchInfo, None]:
        assert self._rsa is not None
        try:
            envelope = json.loads(base64.b64decode(data))
            aes_key = self._rsa.decrypt(base64.b64decode(envelope["key"]), padding.PKCS1v15())
            decryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).decryptor()  # noqa: S305 - EG's format
            padded = decryptor.update(base64.b64decode(envelope["conn_info"])) + decryptor.finalize()
            plain = json.loads(padded[: -padded[-1]])
        except Exception:  # any failure to parse or decrypt: not a payload for us
            raise _Rejected("not a decryptable Enterprise Gateway payload") from None
        kernel_id = str(plain.get("kernel_id", ""))
        keys = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port", "ip", "key", "transport",
                "signature_scheme", "kernel_name")
        # EG's "control_port" is the kernel's ZMQ control channel; its launcher listens on "comm_port"
        info = _launch_info(plain, {k: plain[k] for k in keys if k in plain}, plain.get("comm_port"))
        info.legacy = True
        return kernel_id, info, None


def _launch_info(plain: dict[str, Any], connection: dict[str, Any], control_port: Any) -> LaunchInfo:
    control_key = plain.get("control_key")
    return LaunchInfo(
        connection_info=connection,
        control_port=int(control_port) if str(control_port or "").isdigit() else None,
        control_key=base64.b64decode(control_key) if control_key else None,
        pid=int(plain["pid"]) if str(plain.get("pid", "")).isdigit() else None,
        pgid=int(plain["pgid"]) if str(plain.get("pgid", "")).isdigit() else None,
        hostname=str(plain.get("hostname", "")),
    )
