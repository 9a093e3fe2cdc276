"""The response listener: one asyncio TCP server receiving every remote kernel's connection info.

A launcher sends one framed envelope encrypted to this process's X25519 key (format in
docs/operators/launcher-protocol.md and ``launchers/python/launch_ipykernel.py``) and waits for
an acknowledgement. The listener accepts a payload only if it decrypts, fits :data:`MAX_PAYLOAD`,
names a registered kernel and carries that kernel's launch token; it then answers ``KGA1`` + an
HMAC of the message under a key only the two ends can derive, so a forged ack cannot stop a
launcher from retrying. The same report again (a retry after a lost ack) is acked again and
changes nothing; a replay after a restart fails the new launch token. With
``accept_enterprise_gateway`` on, Enterprise Gateway's version-1 payload (RSA + AES, no launch
token, no ack) is accepted too, but only for kernels registered as EG launches.

Nobody who merely reaches the port can delay a genuine launcher: each connection has a few
seconds for its whole payload, junk is dropped at its first bytes, each peer address (IPv6: /64)
holds at most ``max_connections_per_peer`` connections and all peers ``max_connections``; a
connection over a limit is closed at once. Drops are logged without contents, rate-limited.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import logging
import resource
import secrets
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from traitlets import Bool, Float, Integer, TraitError, Unicode, validate

from ._payloads import MAGIC, MAX_PAYLOAD, LaunchInfo, Rejected, decode_eg, open_envelope, parse_envelope
from .envconfig import EnvConfigurable
from .errors import LaunchError, PortRangeError
from .ports import PortAllocator, parse_port_range

__all__ = ["LaunchInfo", "ResponseListener"]

log = logging.getLogger("provisioners.handshake")

BACKLOG = 1024  # a burst of junk connections must not fill the accept queue before the loop drains it
DROP_LOG_INTERVAL = 10.0  # seconds between summaries of dropped connections
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"


@dataclass
class _Launch:
    token: str
    enterprise_gateway: bool
    future: asyncio.Future = field(repr=False)


class _DropLog:
    """Warnings about dropped connections: the first of each reason per interval in full, the rest as one count."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.logged: set[str] = set()
        self.suppressed: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()  # every drop since start, by reason (never reset: metrics)
        self._timer: asyncio.TimerHandle | None = None

    def note(self, reason: str, peer: str, detail: str) -> None:
        self.counts[reason] += 1
        if reason in self.logged:
            self.suppressed[reason] += 1
            return
        self.logged.add(reason)
        log.warning("dropped a launcher connection from %s: %s", peer or "?", detail)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self.flush)

    def flush(self) -> None:
        """Log the counts held back in this interval, and start a new one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.suppressed:
            counts = ", ".join(f"{n} {reason}" for reason, n in self.suppressed.most_common())
            log.warning("response listener also dropped %d connections in the last %gs: %s",
                        sum(self.suppressed.values()), self.interval, counts)
        self.logged.clear()
        self.suppressed.clear()


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
        help="Also accept Enterprise Gateway's version-1 launcher payload (RSA-2048 + AES, no launch token) for "
        "kernels whose kernelspec runs an EG launcher, so EG kernel images work unchanged. Weaker than our format: "
        "enable only while migrating. The gateway's --accept-enterprise-gateway flag sets this and "
        "CompatKernelSpecManager.accept_enterprise_gateway together.",
    ).tag(env="GATEWAY_ACCEPT_ENTERPRISE_GATEWAY")
    read_timeout = Float(
        5.0,
        config=True,
        help="Seconds a launcher connection may take to deliver its whole payload (default 5); then it is closed "
        "and the launcher retries. Must be above 0.",
    ).tag(env="GATEWAY_RESPONSE_READ_TIMEOUT")
    max_connections_per_peer = Integer(
        16,
        config=True,
        help="Connections one peer address (IPv6: one /64) may hold open on the response listener at once "
        "(default 16); more are closed at once and their launchers retry. 0: no per-peer limit (e.g. when all "
        "launchers reach the gateway through one NAT address).",
    ).tag(env="GATEWAY_RESPONSE_MAX_CONNECTIONS_PER_PEER")
    max_connections = Integer(
        4096,
        config=True,
        help="Connections all peers together may hold open on the response listener (default 4096); more are "
        "closed at once. Capped at half the process's open-file limit (ulimit -n). At least 1.",
    ).tag(env="GATEWAY_RESPONSE_MAX_CONNECTIONS")

    _instance: ResponseListener | None = None

    @validate("read_timeout")
    def _positive_timeout(self, proposal: dict[str, Any]) -> float:
        if not proposal["value"] > 0:
            raise TraitError(f"read_timeout must be above 0 seconds, not {proposal['value']}")
        return proposal["value"]

    @validate("max_connections_per_peer", "max_connections")
    def _connection_limit(self, proposal: dict[str, Any]) -> int:
        name, value = proposal["trait"].name, proposal["value"]
        minimum = 0 if name == "max_connections_per_peer" else 1  # a total bound must exist; 0 per peer: none
        if value < minimum:
            raise TraitError(f"{name} must be at least {minimum}, not {value}")
        return value

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._launches: dict[str, _Launch] = {}
        self._server: asyncio.base_events.Server | None = None
        self._private: X25519PrivateKey | None = None
        self._rsa: rsa.RSAPrivateKey | None = None
        self._start_lock = asyncio.Lock()
        self._drops = _DropLog(DROP_LOG_INTERVAL)
        self._serving: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._open_per_peer: Counter[str] = Counter()
        self._open_limit = 0
        self.port = 0

    @classmethod
    def instance(cls, **kwargs: Any) -> ResponseListener:
        """The process's listener; created (without I/O) on first use."""
        if cls._instance is None:
            cls._instance = cls(**kwargs)
        return cls._instance

    async def start(self) -> None:
        """Generate keys (once) and bind the server; idempotent. Called by the first remote launch, or by the app."""
        async with self._start_lock:
            if self._server is not None:
                return
            if self._private is None:  # kept across stop/start: launchers already hold the public key
                self._private = X25519PrivateKey.generate()
            if self.accept_enterprise_gateway and self._rsa is None:
                self._rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            # the listener never takes more than half the descriptors: the kernels' sockets need the rest
            self._open_limit = self.max_connections if soft == resource.RLIM_INFINITY else \
                max(1, min(self.max_connections, soft // 2))
            self._server = await self._bind()
            self.port = self._server.sockets[0].getsockname()[1]
            log.info("response listener on %s:%d (at most %d connections, %s per peer)", self.response_ip,
                     self.port, self._open_limit, self.max_connections_per_peer or "no limit")

    async def _bind(self) -> asyncio.base_events.Server:
        if self.response_port:
            return await asyncio.start_server(self._serve, self.response_ip, self.response_port, backlog=BACKLOG)
        port_range = parse_port_range(self.response_port_range, minimum_size=1)
        if port_range is None:
            return await asyncio.start_server(self._serve, self.response_ip, 0, backlog=BACKLOG)
        for port in range(port_range.low, port_range.high + 1):
            if port in PortAllocator.instance().reserved:
                continue
            try:
                server = await asyncio.start_server(self._serve, self.response_ip, port, backlog=BACKLOG)
            except OSError:
                continue
            PortAllocator.instance().reserve(port)
            return server
        raise PortRangeError(f"no free port for the response listener in {port_range}")

    async def stop(self) -> None:
        """Stop listening and end the connections being served. Called by the app at shutdown."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in self._serving.values():
            writer.transport.abort()  # their handlers then end as on a dropped connection
        await asyncio.gather(*self._serving, return_exceptions=True)
        self._drops.flush()

    @property
    def rejections(self) -> Counter[str]:
        """Launcher connections dropped since start, by reason (a fixed set: :class:`Rejected` reasons, limits,
        deadline, connection error)."""
        return self._drops.counts

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

    def register(self, kernel_id: str, *, enterprise_gateway: bool = False) -> str:
        """Expect a launcher for ``kernel_id``; return its one-time launch token.

        ``enterprise_gateway``: the launch runs an Enterprise Gateway launcher, so EG's tokenless payload
        may complete it; otherwise only our format with the token does. A new registration (a restart)
        replaces the previous one. Called by ``RemoteProvisioner.pre_launch``; ``unregister`` ends it.
        """
        self.unregister(kernel_id)
        token = secrets.token_urlsafe(32)
        self._launches[kernel_id] = _Launch(token, enterprise_gateway, asyncio.get_running_loop().create_future())
        return token

    def unregister(self, kernel_id: str) -> None:
        launch = self._launches.pop(kernel_id, None)
        if launch is not None and not launch.future.done():
            launch.future.cancel()

    async def wait(self, kernel_id: str) -> LaunchInfo:
        """The launcher's report for ``kernel_id``; the caller bounds the wait."""
        return await asyncio.shield(self._launches[kernel_id].future)

    # -- the server ------------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        bucket = _peer_bucket(address)
        if len(self._serving) >= self._open_limit:
            self._drops.note("over the total connection limit", address, f"{self._open_limit} connections open")
            writer.close()
            return
        if self.max_connections_per_peer and self._open_per_peer[bucket] >= self.max_connections_per_peer:
            self._drops.note("over the per-peer limit", address,
                             f"it already holds {self.max_connections_per_peer} connections")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._serving[task] = writer
        self._open_per_peer[bucket] += 1
        try:
            message = await asyncio.wait_for(self._read_message(reader), self.read_timeout)
            ack = self._accept(message, address)
            if ack:
                writer.write(ack)
                try:
                    await writer.drain()
                except ConnectionError:
                    pass  # the launcher already closed (an older one that reads no ack): the launch stands
        except asyncio.TimeoutError:
            self._drops.note("over the deadline", address, f"no complete payload within {self.read_timeout:g}s")
        except Rejected as exc:
            self._drops.note(exc.reason, address, str(exc))
        except OSError as exc:
            self._drops.note("connection error", address, f"connection failed: {exc}")
        finally:
            del self._serving[task]
            self._open_per_peer[bucket] -= 1
            if not self._open_per_peer[bucket]:
                del self._open_per_peer[bucket]
            writer.close()

    async def _read_message(self, reader: asyncio.StreamReader) -> bytes:
        """Our framed message (read to its length; the launcher then waits for the ack) or EG's (read to EOF).

        Anything that is neither is refused as soon as its first bytes show it.
        """
        data = b""
        while True:
            chunk = await reader.read(MAX_PAYLOAD + 1 - len(data))
            data += chunk
            if MAGIC.startswith(data[:4]):
                if len(data) >= 8:
                    (length,) = struct.unpack(">I", data[4:8])
                    if not 0 < length <= MAX_PAYLOAD - 8:
                        raise Rejected("malformed", f"declared length {length} is 0 or over {MAX_PAYLOAD} bytes")
                    if len(data) < 8 + length:
                        try:
                            data += await reader.readexactly(8 + length - len(data))
                        except asyncio.IncompleteReadError:
                            raise Rejected("truncated", "the connection closed before the whole payload") from None
                    return data[:8 + length]
            elif not (self.accept_enterprise_gateway and _could_be_eg(data)):
                raise Rejected("not a payload", "not a launcher payload (neither our magic nor base64)")
            elif len(data) > MAX_PAYLOAD:
                raise Rejected("malformed", f"payload over {MAX_PAYLOAD} bytes")
            elif not chunk:
                return data  # Enterprise Gateway's launcher sends base64 and closes
            if not chunk:
                raise Rejected("truncated", "the connection closed before the whole payload")

    def _accept(self, message: bytes, peer: str = "") -> bytes | None:
        """Complete the launch ``message`` reports; return the ack to send (None for EG's format)."""
        if message.startswith(MAGIC):
            envelope = parse_envelope(message)
            kernel_id = envelope.kernel_id
            launch = self._launches.get(kernel_id)
            if launch is None:  # checked before any decryption
                raise Rejected("unknown kernel", "no launch pending for the kernel it names")
            assert self._private is not None
            info, token, ack = open_envelope(envelope, self._private)
            if not hmac.compare_digest(token.encode(), launch.token.encode()):
                raise Rejected("wrong launch token", f"wrong launch token for kernel {kernel_id}")
        else:
            assert self._rsa is not None
            kernel_id, info = decode_eg(message, self._rsa, peer)
            launch = self._launches.get(kernel_id)
            if launch is None:
                raise Rejected("unknown kernel", "no launch pending for the kernel it names")
            if not launch.enterprise_gateway:
                raise Rejected("not an EG launch",
                               f"an Enterprise Gateway payload for kernel {kernel_id}, which was launched for ours")
            ack = None
        if launch.future.done():
            if ack is None:
                raise Rejected("replayed", f"kernel {kernel_id} has already reported")
            log.info("acknowledged a repeated report (an earlier ack was lost)", extra={"kernel_id": kernel_id})
            return ack
        launch.future.set_result(info)
        log.info("connection info received from %s", info.hostname or info.connection_info.get("ip"),
                 extra={"kernel_id": kernel_id})
        return ack


def _could_be_eg(data: bytes) -> bool:
    """Whether ``data`` can start an EG payload: base64 of a JSON object, so its first character is 'e'."""
    return data.startswith(b"e") and not data.translate(None, _BASE64)


def _peer_bucket(address: str) -> str:
    """Addresses that count as one peer: an IPv4 address, or an IPv6 /64 (one host may own a whole /64)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
