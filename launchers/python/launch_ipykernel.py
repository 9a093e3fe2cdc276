#!/usr/bin/env python3
"""Kernel launcher: runs beside a remote kernel (SSH host, container, pod, YARN container).

Binds the kernel's five ZMQ ports and its own control port inside the port range, starts ipykernel
in this process, and sends the connection info to the gateway's response address, encrypted to the
gateway's X25519 public key with AES-GCM and carrying the per-kernel launch token. It then serves
authenticated signal/shutdown requests on the control port until the kernel exits.

Wire format (version 1), one TCP connection to the response address, closed after sending:

    b"KGL1" | u32 big-endian length | JSON envelope
    envelope  = {"kernel_id", "ephemeral_public_key": b64, "nonce": b64, "ciphertext": b64}
    key       = HKDF-SHA256(X25519(ephemeral, gateway), info=b"kernel-gateway launcher v1")
    plaintext = AES-256-GCM(key, nonce, aad=kernel_id) of JSON
                {"version": 1, "kernel_id", "launch_token", "connection_info": {...},
                 "control_port", "control_key": b64, "pid", "pgid", "hostname"}

Control requests (version 1), one JSON line per TCP connection, answered with one JSON line:

    {"request": {"signum": N} | {"shutdown": true}, "nonce": hex, "time": unix seconds,
     "mac": hex HMAC-SHA256(control_key, nonce + time + canonical JSON of request)}

With ``--connection-file`` it is instead a local kernel runner: the gateway wrote the file with
ports from its range, and the launcher only keeps the ports ipykernel picks for itself (the iopub
pipe) inside the range, using ``--spare-ports`` first. No handshake, no control port.

Dependencies: the standard library, pyzmq, ipykernel and cryptography. Plain synchronous Python.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time

MAGIC = b"KGL1"
HKDF_INFO = b"kernel-gateway launcher v1"
CONTROL_SKEW = 120  # seconds a control request stays valid


def log(message: str) -> None:
    print(f"[launcher {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_range(text: str) -> tuple[int, int] | None:
    text = (text or "").strip()
    if not text or text in ("0..0", "0"):  # EG's "no range"
        return None
    low, sep, high = text.partition("..")
    if not sep or not low.isdigit() or not high.isdigit() or int(low) > int(high):
        raise SystemExit(f"launcher: invalid port range {text!r}; expected 'low..high'")
    return int(low), int(high)


def bind_in_range(sock: socket.socket, ip: str, port_range: tuple[int, int] | None) -> int:
    """Bind ``sock`` to a free port inside the range (the kernel keeps it: no close-and-rebind race)."""
    if port_range is None:
        sock.bind((ip, 0))
        return sock.getsockname()[1]
    low, high = port_range
    candidates = list(range(low, high + 1))
    secrets.SystemRandom().shuffle(candidates)
    for port in candidates:
        try:
            sock.bind((ip, port))
            return port
        except OSError:
            continue
    raise SystemExit(f"launcher: no free port in range {low}..{high}")


def encrypt_payload(payload: dict, kernel_id: str, gateway_key_b64: str) -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    gateway_key = X25519PublicKey.from_public_bytes(base64.b64decode(gateway_key_b64))
    ephemeral = X25519PrivateKey.generate()
    shared = ephemeral.exchange(gateway_key)
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(shared)
    nonce = os.urandom(12)
    ciphertext = AESGCM(key).encrypt(nonce, json.dumps(payload).encode(), kernel_id.encode())
    public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    envelope = json.dumps({
        "kernel_id": kernel_id,
        "ephemeral_public_key": base64.b64encode(public).decode(),
        "nonce": base64.b64encode(nonce).decode(),
        "ciphertext": base64.b64encode(ciphertext).decode(),
    }).encode()
    return MAGIC + struct.pack(">I", len(envelope)) + envelope


def control_mac(key: bytes, nonce: str, stamp: int, request: dict) -> str:
    body = f"{nonce}{stamp}".encode() + json.dumps(request, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


class ControlServer(threading.Thread):
    """Serves authenticated signal and shutdown requests for the kernel in this process."""

    def __init__(self, sock: socket.socket, key: bytes) -> None:
        super().__init__(name="launcher-control", daemon=True)
        self.sock = sock
        self.key = key
        self.seen: dict[str, float] = {}

    def run(self) -> None:
        self.sock.listen(16)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    reply = self.handle(conn.makefile("rb").readline(65536))
                except Exception as exc:  # any malformed request is refused; the server keeps serving
                    reply = {"ok": False, "error": f"bad request: {type(exc).__name__}"}
                try:
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass

    def handle(self, line: bytes) -> dict:
        message = json.loads(line)
        request, nonce, stamp = message["request"], str(message["nonce"]), int(message["time"])
        if not isinstance(request, dict):
            raise ValueError("request must be an object")
        expected = control_mac(self.key, nonce, stamp, request)
        if not hmac.compare_digest(expected, str(message.get("mac", ""))):
            return {"ok": False, "error": "authentication failed"}
        now = time.time()
        if abs(now - stamp) > CONTROL_SKEW or nonce in self.seen:
            return {"ok": False, "error": "stale or replayed request"}
        self.seen = {n: t for n, t in self.seen.items() if now - t < 2 * CONTROL_SKEW}
        self.seen[nonce] = now
        if "signum" in request:
            signum = int(request["signum"])
            if signum:
                os.kill(os.getpid(), signum)
            return {"ok": True}
        if request.get("shutdown"):
            log("shutdown requested through the control port")
            os.kill(os.getpid(), signal.SIGTERM)
            return {"ok": True}
        return {"ok": False, "error": "unknown request"}


def send_connection_info(address: str, payload: dict, kernel_id: str, public_key: str, timeout: float) -> None:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as conn:
        local_ip = conn.getsockname()[0]
        if payload["connection_info"]["ip"] in ("0.0.0.0", "::", ""):
            payload["connection_info"]["ip"] = local_ip  # the address the gateway can reach us on
        conn.sendall(encrypt_payload(payload, kernel_id, public_key))


def confine_random_ports(port_range: tuple[int, int] | None, spare: list[int]) -> None:
    """Make every random-port bind in this process (kernel channels, the iopub pipe) stay in the range."""
    if port_range is None:
        return
    import zmq

    bind_random = zmq.Socket.bind_to_random_port

    def bind_in_port_range(sock, addr, min_port=0, max_port=0, max_tries=0):
        while spare:
            port = spare.pop(0)
            try:
                sock.bind(f"{addr}:{port}")
                return port
            except zmq.ZMQError:
                continue
        return bind_random(sock, addr, port_range[0], port_range[1] + 1, max_tries=500)

    zmq.Socket.bind_to_random_port = bind_in_port_range


def reporting_app_class():
    """ipykernel's app, writing no connection file: the info travels encrypted to the gateway."""
    from ipykernel.kernelapp import IPKernelApp

    class LaunchedKernelApp(IPKernelApp):
        def write_connection_file(self, **kwargs):
            pass

    return LaunchedKernelApp


def run_local(args: argparse.Namespace, kernel_args: list[str]) -> None:
    """Run ipykernel from the gateway's connection file (local kernels)."""
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance(connection_file=args.connection_file, kernel_class=args.kernel_class_name)
    app.initialize(kernel_args)
    app.start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel-id", help="required unless --connection-file")
    parser.add_argument("--response-address", help="host:port of the gateway's listener")
    parser.add_argument("--public-key", help="the gateway's X25519 public key, base64")
    parser.add_argument("--connection-file", help="run a local kernel from this file instead of reporting back")
    parser.add_argument("--spare-ports", default="", help="comma-separated ports to use first for extra sockets")
    parser.add_argument("--port-range", default="", help="low..high; empty for any port")
    parser.add_argument("--kernel-class-name", default="ipykernel.ipkernel.IPythonKernel")
    parser.add_argument("--ip", default="0.0.0.0", help="address the kernel binds")
    parser.add_argument("--launch-token-stdin", action="store_true", help="read the launch token from stdin")
    parser.add_argument("--connect-timeout", type=float, default=30.0)
    args, kernel_args = parser.parse_known_args(argv)
    if kernel_args and not args.connection_file:
        parser.error(f"unrecognized arguments: {' '.join(kernel_args)}")

    port_range = parse_range(args.port_range)
    confine_random_ports(port_range, [int(p) for p in args.spare_ports.split(",") if p.strip()])
    if args.connection_file:
        run_local(args, kernel_args)
        return
    if not (args.kernel_id and args.response_address and args.public_key):
        raise SystemExit("launcher: --kernel-id, --response-address and --public-key are required")
    token = sys.stdin.readline().strip() if args.launch_token_stdin else os.environ.pop("KERNEL_LAUNCH_TOKEN", "")
    if not token:
        raise SystemExit("launcher: no launch token (KERNEL_LAUNCH_TOKEN or --launch-token-stdin)")

    control_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    control_port = bind_in_range(control_sock, args.ip, port_range)
    control_key = secrets.token_bytes(32)

    from traitlets.config import Config

    hb_probe = socket.socket()
    hb_port = bind_in_range(hb_probe, args.ip, port_range)
    hb_probe.close()  # the heartbeat thread binds it itself a moment later

    config = Config()
    config.Session.key = secrets.token_hex(32).encode()
    config.IPKernelApp.ip = args.ip
    config.IPKernelApp.hb_port = hb_port
    config.IPKernelApp.kernel_class = args.kernel_class_name
    app = reporting_app_class().instance(config=config)
    app.initialize([])

    payload = {
        "version": 1,
        "kernel_id": args.kernel_id,
        "launch_token": token,
        "connection_info": {
            "ip": args.ip,
            "transport": "tcp",
            "shell_port": app.shell_port,
            "iopub_port": app.iopub_port,
            "stdin_port": app.stdin_port,
            "control_port": app.control_port,
            "hb_port": app.hb_port,
            "key": config.Session.key.decode(),
            "signature_scheme": "hmac-sha256",
            "kernel_name": "",
        },
        "control_port": control_port,
        "control_key": base64.b64encode(control_key).decode(),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "hostname": socket.gethostname(),
    }
    try:
        send_connection_info(args.response_address, payload, args.kernel_id, args.public_key, args.connect_timeout)
    except OSError as exc:
        log(f"cannot reach the gateway at {args.response_address}: {exc}; exiting")
        os._exit(3)
    log(f"kernel {args.kernel_id} ready: ports {app.shell_port},{app.iopub_port},{app.stdin_port},"
        f"{app.control_port},{app.hb_port}, control {control_port}, pid {os.getpid()}")
    ControlServer(control_sock, control_key).start()
    app.start()


if __name__ == "__main__":
    main()
