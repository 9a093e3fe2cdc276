#!/usr/bin/env python3
"""Kernel launcher: runs beside a remote kernel (SSH host, container, pod, YARN container).

Binds the kernel's five ZMQ ports and its own control port inside the port range, starts ipykernel
in this process, and sends the connection info to the gateway's response address, encrypted to the
gateway's X25519 public key with AES-GCM and carrying the per-kernel launch token. It then serves
authenticated signal/shutdown requests on the control port until the kernel exits.

Wire format (version 1): on a TCP connection to the response address the launcher sends

    b"KGL1" | u32 big-endian length | JSON envelope
    envelope  = {"kernel_id", "ephemeral_public_key": b64, "nonce": b64, "ciphertext": b64}
    shared    = X25519(ephemeral, gateway)
    key       = HKDF-SHA256(shared, info=b"kernel-gateway launcher v1")
    plaintext = AES-256-GCM(key, nonce, aad=kernel_id) of JSON
                {"version": 1, "kernel_id", "launch_token", "connection_info": {...},
                 "control_port", "control_key": b64, "pid", "pgid", "hostname"}

``connection_info`` has the kernel's ports, HMAC ``key``, ``ip``, ``transport`` and ``signature_scheme``,
and with ``--curve`` also ``curve_publickey``: the Z85 CurveZMQ public key of the kernel, which then serves
every channel as a CurveZMQ server. The launcher makes the key pair (``zmq.curve_keypair()``) and hands it
to ipykernel in this process; the secret key is never reported, written, logged or put in an environment.

and reads the gateway's acknowledgement, sent only once the payload decrypted and its token matched:

    b"KGA1" | HMAC-SHA256(HKDF-SHA256(shared, info=b"kernel-gateway launcher v1 ack"), message)

Without a valid ack (refused, dropped, closed, wrong ack) it tries again on a new connection, waiting
0.1 s doubling to 2 s with jitter, until ``--connect-timeout`` passes; then it exits with status 3.

Control requests (version 1), one JSON line per TCP connection, answered with one JSON line:

    {"request": {"signum": N} | {"shutdown": true}, "nonce": hex, "time": unix seconds,
     "mac": hex HMAC-SHA256(control_key, nonce + time + canonical JSON of request)}

Each control connection has its own thread and 5 s from accept to deliver its line (64 KiB at most);
at most 32 are served at once and a further one is closed at once, so slow clients cannot hold up
the gateway's requests. A signal is sent after its reply.

The launch token comes on stdin (``--launch-token-stdin``) or in ``KERNEL_LAUNCH_TOKEN``; in the
latter case the launcher re-executes itself (same pid) without the variable and with the token on
stdin, so it is in no /proc/<pid>/environ. The launcher's own messages go to a copy of its original
stderr (the backend's log), which ipykernel's capture of fds 1 and 2 does not reach.

Warm start (pools, version 1): with ``--warm`` (or ``KERNEL_LAUNCHER_WARM=1``) the launcher binds only its
control port, imports the kernel's modules, reports ``{"version": 1, "kernel_id", "launch_token", "warm": true,
"ip", "control_port", "control_key", "pid", "pgid", "hostname"}`` (no connection info) the same way and
waits. The gateway hands the kernel out with one control request ``{"start": {"nonce": b64,
"ciphertext": b64}}``, AES-256-GCM under HKDF-SHA256(control_key, info=b"kernel-gateway launcher v1 start")
with aad ``b"start"``, of JSON ``{"launch_token", "env": {...}, "cwd"}``: the launcher applies the
environment and working directory, binds the kernel's ports, starts the kernel and reports its connection
info with that launch token as above. Only the first start request is honoured.

With ``--connection-file`` it is instead a local kernel runner: the gateway wrote the file with
ports from its range, and the launcher only keeps the ports ipykernel picks for itself (the iopub
pipe) inside the range, using ``--spare-ports`` first. No handshake, no control port. With ``--warm-local``
it imports the kernel's modules, says ``WARM_LOCAL_READY`` on stderr and waits for one JSON line on stdin, ``{"argv", "env", "cwd"}``, from the
gateway, which holds the other end of the pipe: it applies the environment and working directory and runs
as if started with ``argv``.

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
import traceback

MAGIC = b"KGL1"
HKDF_INFO = b"kernel-gateway launcher v1"
ACK_MAGIC = b"KGA1"
ACK_INFO = b"kernel-gateway launcher v1 ack"
START_INFO = b"kernel-gateway launcher v1 start"
WARM_LOCAL_READY = "warm: modules imported, waiting for the start line on stdin"
#: What a kernel start imports: a warm launcher imports it ahead, so a handed-out kernel starts in tens of ms.
WARM_MODULES = ("ipykernel.kernelapp", "ipykernel.ipkernel", "ipykernel.zmqshell", "ipykernel.debugger",
                "ipykernel.iostream", "ipykernel.heartbeat", "IPython.core.completerlib", "IPython.core.debugger",
                "IPython.core.oinspect", "IPython.extensions.storemagic", "jupyter_client.session", "sqlite3", "pdb",
                "psutil", "tornado.platform.asyncio", "cryptography.hazmat.primitives.ciphers.aead",
                "cryptography.hazmat.primitives.kdf.hkdf", "cryptography.hazmat.primitives.asymmetric.x25519")
RETRY_FIRST, RETRY_MAX = 0.1, 2.0  # seconds between report attempts: doubling from the first to the max, jittered
ATTEMPT_TIMEOUT = 10.0  # seconds one report attempt may take (connect, send, ack)
CONTROL_SKEW = 120  # seconds a control request stays valid
CONTROL_DEADLINE = 5.0  # seconds a control connection has, from accept, to deliver its request
CONTROL_MAX_REQUEST = 64 * 1024  # bytes of one request line
CONTROL_MAX_CONNECTIONS = 32  # control connections served at once; more are closed at once


_log_fd = 2  # where log() writes: stderr, or the private copy of it keep_log_stream() made


def log(message: str) -> None:
    """One line on the launcher's own stderr: the backend's log (the SSH host's kernel-<id>.log, the
    container's log), which the gateway reads into its log and error messages when a launch fails."""
    data = f"[launcher {time.strftime('%H:%M:%S')}] {message}\n".encode(errors="replace")
    try:
        while data:
            data = data[os.write(_log_fd, data):]
    except OSError:
        pass  # nowhere left to say it


def keep_log_stream() -> None:
    """Keep a private copy of stderr for log(): once ipykernel initializes it sends fds 1 and 2 (and
    sys.stderr) to the kernel's clients, and the launcher's own messages would reach no log at all."""
    global _log_fd
    _log_fd = os.dup(2)  # not inheritable: the kernel's children do not get it


def read_launch_token(from_stdin: bool, argv: list[str]) -> str:
    """The launch token: the first line of stdin, or ``KERNEL_LAUNCH_TOKEN``.

    A token from the environment would stay readable in /proc/<pid>/environ (the initial environment,
    which ``os.environ.pop`` does not change) for the kernel's whole life, so the launcher re-executes
    itself (same pid) without the variable and with the token on stdin instead.
    """
    if from_stdin:
        return sys.stdin.readline().strip()
    token = os.environ.pop("KERNEL_LAUNCH_TOKEN", "")
    if token:
        reexec_with_token_on_stdin(token, argv)
    return token


def reexec_with_token_on_stdin(token: str, argv: list[str]) -> None:
    """Replace this process by the launcher run with ``argv --launch-token-stdin``, stdin a pipe holding the token."""
    read_end, write_end = os.pipe()
    os.write(write_end, token.encode() + b"\n")  # a few dozen bytes: the pipe buffer holds them
    os.close(write_end)
    os.dup2(read_end, 0)
    os.close(read_end)
    orig_argv = getattr(sys, "orig_argv", [sys.executable, *sys.argv])  # Python >= 3.10 keeps interpreter options
    interpreter = orig_argv[: len(orig_argv) - len(sys.argv) + 1]  # python [options] script
    os.execve(sys.executable, [sys.executable, *interpreter[1:], "--launch-token-stdin", *argv], dict(os.environ))


def read_yarn_secret(name: str, path: str = "") -> str:
    """The launch token from secret ``name`` of this YARN container's credentials (``--launch-token-yarn-secret``).

    The secret (JSON ``{"token", "env"}``) reached the container in its ``container_tokens`` file (Hadoop's
    Writable credentials: "HDTS", version 0, tokens, then secrets), or in ``path``, a credentials file in the
    same format localized beside it (``--launch-secret-file``); the file is deleted once read, so kernel code
    sees neither the token nor the container's other tokens, and ``env`` is applied to this process.
    """
    def vint(b: bytes, i: int) -> tuple[int, int]:
        f = b[i] - 256 if b[i] > 127 else b[i]
        if f >= -112:
            return f, i + 1
        n = -(f + 120) if f < -120 else -(f + 112)
        return int.from_bytes(b[i + 1:i + 1 + n], "big"), i + 1 + n

    def field(b: bytes, i: int) -> tuple[bytes, int]:
        n, i = vint(b, i)
        return b[i:i + n], i + n

    path = path or os.environ.get("HADOOP_TOKEN_FILE_LOCATION", "")
    data = b""
    if path and os.path.exists(path):
        with open(path, "rb") as file:
            data = file.read()
    if data[:5] != b"HDTS\x00":
        raise SystemExit(f"launcher: no Hadoop credentials in the Writable format at {path!r}")
    count, i = vint(data, 5)
    for _ in range(count * 5):  # alias, identifier, password, kind, service
        _, i = field(data, i)
    count, i = vint(data, i)
    found = {}
    for _ in range(count):
        key, i = field(data, i)
        found[key.decode()], i = field(data, i)
    if name not in found:
        raise SystemExit(f"launcher: secret {name!r} is not in the container's credentials")
    try:
        os.unlink(path)
    except OSError:
        pass
    launch = json.loads(found[name])
    os.environ.update(launch.get("env", {}))
    return launch["token"]


def start_spark_session(app) -> None:
    """Create the SparkSession (``--spark-session``) and give it to the kernel as ``spark`` and ``sc``.

    In YARN cluster mode the ApplicationMaster waits for the driver's SparkContext, so it is made now,
    before the kernel reports ready; the executors it asks for run on the cluster.
    """
    from pyspark.sql import SparkSession

    spark = SparkSession.builder.getOrCreate()
    app.kernel.shell.user_ns.update(spark=spark, sc=spark.sparkContext)


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


def encrypt_payload(payload: dict, kernel_id: str, gateway_key_b64: str) -> tuple[bytes, bytes]:
    """The framed, encrypted report and the ack that answers it: ``KGA1`` + HMAC of the message under a key
    from the same X25519 exchange, which only the holder of the gateway's private key can compute too."""
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
    message = MAGIC + struct.pack(">I", len(envelope)) + envelope
    ack_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=ACK_INFO).derive(shared)
    return message, ACK_MAGIC + hmac.new(ack_key, message, hashlib.sha256).digest()


def warm_imports() -> None:
    """Import what starting the kernel imports, so that a warm launcher starts its kernel at once."""
    import importlib

    for name in WARM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # optional for the kernel too (psutil, debugpy): it starts without them


def start_key(control_key: bytes) -> bytes:
    """The key that seals a warm launcher's start request (it carries the client's environment)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=START_INFO).derive(control_key)


def open_start_request(control_key: bytes, sealed: dict) -> dict:
    """The plaintext of a start request: ``{"launch_token", "env", "cwd"}``; ValueError if it is not one."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    plain = json.loads(AESGCM(start_key(control_key)).decrypt(
        base64.b64decode(sealed["nonce"]), base64.b64decode(sealed["ciphertext"]), b"start"))
    if not isinstance(plain, dict) or not isinstance(plain.get("launch_token"), str) \
            or not isinstance(plain.get("env", {}), dict):
        raise ValueError("start request of the wrong shape")
    return plain


def apply_start(env: dict, cwd: str | None, replace: bool = False) -> None:
    """Give this process the kernel's environment (all of it when ``replace``, keeping jupyter_client's JPY_*
    variables) and working directory, as a cold start would have had them."""
    if replace:
        kept = {k: v for k, v in os.environ.items() if k.startswith("JPY_")}
        os.environ.clear()
        os.environ.update(kept)
    os.environ.update({str(k): str(v) for k, v in env.items()})
    if cwd:
        try:
            os.chdir(cwd)
        except OSError as exc:
            log(f"cannot change to the working directory {cwd!r}: {exc}; staying in {os.getcwd()}")


def control_mac(key: bytes, nonce: str, stamp: int, request: dict) -> str:
    body = f"{nonce}{stamp}".encode() + json.dumps(request, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


class ControlServer(threading.Thread):
    """Serves authenticated signal and shutdown requests for the kernel in this process.

    Each connection is served by a thread of its own, so a slow or idle client never holds up the
    gateway's requests; it has ``deadline`` seconds from accept to deliver its request line of at most
    ``max_request`` bytes, and at most ``max_connections`` are served at once (one more is closed at once).
    """

    def __init__(self, sock: socket.socket, key: bytes, deadline: float = CONTROL_DEADLINE,
                 max_request: int = CONTROL_MAX_REQUEST, max_connections: int = CONTROL_MAX_CONNECTIONS) -> None:
        super().__init__(name="launcher-control", daemon=True)
        self.sock = sock
        self.key = key
        self.deadline = deadline
        self.max_request = max_request
        self.slots = threading.BoundedSemaphore(max_connections)
        self.seen: dict[str, float] = {}
        self.seen_lock = threading.Lock()  # connections are served concurrently
        self.start_request: dict | None = None  # a warm launcher's start request, once it came
        self.started = threading.Event()

    def start(self) -> None:
        self.sock.listen(64)  # before returning: a client may connect as soon as start() returns
        super().start()

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self.slots.acquire(blocking=False):
                conn.close()  # over the bound: descriptors and threads stay bounded
                continue
            try:
                threading.Thread(target=self.serve, args=(conn, time.monotonic() + self.deadline),
                                 name="launcher-control-connection", daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one, keep serving
                conn.close()
                self.slots.release()

    def serve(self, conn: socket.socket, deadline: float) -> None:
        """Read one request line by ``deadline``, answer it with one line, close."""
        try:
            with conn:
                signum = 0
                try:
                    reply, signum = self.handle(self.read_line(conn, deadline))
                except Exception as exc:  # any malformed or late request is refused; the server keeps serving
                    reply = {"ok": False, "error": f"bad request: {type(exc).__name__}"}
                try:
                    conn.settimeout(1.0)  # a one-line reply fits any socket buffer; never wait on a stalled reader
                    conn.sendall(json.dumps(reply).encode() + b"\n")
                except OSError:
                    pass
            if signum:  # after the reply: a SIGTERM may end this process before it could answer
                os.kill(os.getpid(), signum)
        finally:
            self.slots.release()

    def read_line(self, conn: socket.socket, deadline: float) -> bytes:
        """The bytes up to the first newline (or EOF); TimeoutError at ``deadline``, ValueError when too long."""
        data = b""
        while b"\n" not in data and len(data) <= self.max_request:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete request line before the deadline")
            conn.settimeout(remaining)
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        line = data.split(b"\n", 1)[0]
        if len(line) > self.max_request:
            raise ValueError("request line too long")
        return line

    def handle(self, line: bytes) -> tuple[dict, int]:
        """The reply to one request line, and the signal to send this process once it is answered (0: none)."""
        message = json.loads(line)
        request, nonce, stamp = message["request"], str(message["nonce"]), int(message["time"])
        if not isinstance(request, dict):
            raise ValueError("request must be an object")
        expected = control_mac(self.key, nonce, stamp, request)
        if not hmac.compare_digest(expected, str(message.get("mac", ""))):
            return {"ok": False, "error": "authentication failed"}, 0
        now = time.time()
        with self.seen_lock:
            if abs(now - stamp) > CONTROL_SKEW or nonce in self.seen:
                return {"ok": False, "error": "stale or replayed request"}, 0
            self.seen = {n: t for n, t in self.seen.items() if now - t < 2 * CONTROL_SKEW}
            self.seen[nonce] = now
        if "signum" in request:
            signum = int(request["signum"])
            if signum:
                signal.Signals(signum)  # ValueError for a number that is no signal here
            return {"ok": True}, signum
        if request.get("shutdown"):
            log("shutdown requested through the control port")
            return {"ok": True}, int(signal.SIGTERM)
        if "start" in request:
            start = open_start_request(self.key, request["start"])
            with self.seen_lock:
                if self.started.is_set():
                    return {"ok": False, "error": "the kernel was started already"}, 0
                self.start_request = start
                self.started.set()
            return {"ok": True}, 0
        return {"ok": False, "error": "unknown request"}, 0


def send_connection_info(address: str, payload: dict, kernel_id: str, public_key: str, timeout: float) -> None:
    """Report ``payload`` to the gateway until it acknowledges it; TimeoutError once ``timeout`` seconds pass.

    Each attempt is a new connection and a new encryption; a refused or dropped connection, a close
    without an ack or an ack that does not verify leads to another attempt after a wait that doubles
    from RETRY_FIRST to RETRY_MAX seconds, with jitter so that many launchers do not retry in step.
    """
    host, _, port = address.rpartition(":")
    target = (host.strip("[]"), int(port))
    deadline = time.monotonic() + timeout
    delay, attempts = RETRY_FIRST, 0
    while True:
        attempts += 1
        try:
            report_once(target, payload, kernel_id, public_key, min(ATTEMPT_TIMEOUT, max(deadline - time.monotonic(), 0.1)))
            return
        except OSError as exc:
            failure = str(exc) or type(exc).__name__
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the gateway did not acknowledge the connection info within {timeout:g}s "
                               f"({attempts} attempts; last: {failure})")
        time.sleep(min(remaining, secrets.SystemRandom().uniform(delay / 2, delay)))
        delay = min(delay * 2, RETRY_MAX)


def report_once(target: tuple[str, int], payload: dict, kernel_id: str, public_key: str, timeout: float) -> None:
    """One attempt: connect, send the encrypted report, verify the gateway's ack; OSError if any step fails."""
    with socket.create_connection(target, timeout=timeout) as conn:
        info = payload.get("connection_info")
        if info is None:  # a warm report: only the control port's address
            if payload["ip"] in ("0.0.0.0", "::", ""):
                payload = dict(payload, ip=conn.getsockname()[0])
        elif info["ip"] in ("0.0.0.0", "::", ""):  # the address the gateway can reach us on
            payload = dict(payload, connection_info=dict(info, ip=conn.getsockname()[0]))
        message, ack = encrypt_payload(payload, kernel_id, public_key)
        conn.sendall(message)
        reply = b""
        while len(reply) < len(ack) and (chunk := conn.recv(len(ack) - len(reply))):
            reply += chunk
    if not reply:
        raise ConnectionError("the gateway closed the connection without an acknowledgement")
    if not hmac.compare_digest(reply, ack):
        raise ConnectionError("the acknowledgement did not verify (not from the gateway that holds the key)")


def report(args: argparse.Namespace, payload: dict) -> None:
    """Report ``payload`` until the gateway acknowledges it; exit with status 3 if it never does."""
    try:
        send_connection_info(args.response_address, payload, args.kernel_id, args.public_key, args.connect_timeout)
    except OSError as exc:
        log(f"cannot report to the gateway at {args.response_address}: {exc}; exiting with status 3")
        os._exit(3)


#: Ports of the range promised to a socket that binds later (the heartbeat's): random binds skip them.
RESERVED_PORTS: set[int] = set()


def confine_random_ports(port_range: tuple[int, int] | None, spare: list[int]) -> None:
    """Make every random-port bind in this process (kernel channels, the iopub pipe) stay in the range."""
    if port_range is None:
        return
    import random

    import zmq

    def bind_in_port_range(sock, addr, min_port=0, max_port=0, max_tries=0):
        while spare:
            port = spare.pop(0)
            try:
                sock.bind(f"{addr}:{port}")
                return port
            except zmq.ZMQError:
                continue
        for _ in range(500):
            port = random.randint(port_range[0], port_range[1])
            if port in RESERVED_PORTS:
                continue
            try:
                sock.bind(f"{addr}:{port}")
                return port
            except zmq.ZMQError:
                continue
        raise zmq.ZMQBindError(f"no free port in {port_range[0]}..{port_range[1]} after 500 tries")

    zmq.Socket.bind_to_random_port = bind_in_port_range


def reporting_app_class():
    """ipykernel's app, writing no connection file: the info travels encrypted to the gateway."""
    from ipykernel.kernelapp import IPKernelApp

    class LaunchedKernelApp(IPKernelApp):
        def write_connection_file(self, **kwargs):
            pass

        def log_connection_info(self):
            pass  # its "--existing kernel-N.json" banner names a file we never write and crowds the log tail

    return LaunchedKernelApp


def curve_keys() -> dict:
    """A fresh CurveZMQ key pair for the kernel, as ipykernel's ``curve_publickey`` / ``curve_secretkey``."""
    import zmq

    if not zmq.has("curve"):
        raise SystemExit("launcher: --curve asks for CurveZMQ encryption but this pyzmq has none (zmq.has('curve') "
                         "is False); install a pyzmq wheel, or declare no supported_encryption in the kernelspec")
    public, secret = zmq.curve_keypair()
    return {"curve_publickey": public, "curve_secretkey": secret}


def run_local(args: argparse.Namespace, kernel_args: list[str]) -> None:
    """Run ipykernel from the gateway's connection file (local kernels)."""
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance(connection_file=args.connection_file, kernel_class=args.kernel_class_name)
    app.initialize(kernel_args)
    app.start()


def run_warm_local() -> None:
    """``--warm-local``: import ahead, then run as the gateway's start line on stdin says."""
    warm_imports()
    log(WARM_LOCAL_READY)  # the gateway reads the kernel's output: this line tells it the kernel is warm
    line = sys.stdin.readline()
    if not line.strip():
        raise SystemExit(0)  # the gateway let this warm kernel go without using it
    request = json.loads(line)
    apply_start(request.get("env") or {}, request.get("cwd"), replace=True)
    main(list(request["argv"]))


def wait_for_start(server: ControlServer, args: argparse.Namespace) -> str:
    """A warm launcher's wait for the gateway's start request; returns the launch token of the real start."""
    server.started.wait()
    start = server.start_request or {}
    apply_start(start.get("env") or {}, start.get("cwd"))
    log(f"kernel {args.kernel_id} handed out: starting it")
    return start["launch_token"]


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
    parser.add_argument("--launch-token-yarn-secret", default="", metavar="NAME",
                        help="read the launch token (and environment) from this secret of the YARN container's credentials")
    parser.add_argument("--launch-secret-file", default="", metavar="PATH",
                        help="with --launch-token-yarn-secret: read that secret from this Hadoop credentials file")
    parser.add_argument("--spark-session", action="store_true", help="create a SparkSession as `spark` before ready")
    parser.add_argument("--warm", action="store_true",
                        help="start warm: report, then wait for the gateway's start request (also KERNEL_LAUNCHER_WARM=1)")
    parser.add_argument("--warm-local", action="store_true",
                        help="import ahead, then run as the JSON line on stdin says (the gateway's local pools)")
    parser.add_argument("--curve", action="store_true",
                        help="encrypt the kernel's channels with CurveZMQ and report the public key")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds to keep reporting to the gateway until it acknowledges; then exit with status 3")
    args, kernel_args = parser.parse_known_args(argv)
    if kernel_args and not args.connection_file:
        parser.error(f"unrecognized arguments: {' '.join(kernel_args)}")

    if args.warm_local:
        run_warm_local()
        return
    port_range = parse_range(args.port_range)
    confine_random_ports(port_range, [int(p) for p in args.spare_ports.split(",") if p.strip()])
    if args.connection_file:
        run_local(args, kernel_args)
        return
    if not (args.kernel_id and args.response_address and args.public_key):
        raise SystemExit("launcher: --kernel-id, --response-address and --public-key are required")
    keep_log_stream()
    if args.launch_token_yarn_secret:
        token = read_yarn_secret(args.launch_token_yarn_secret, args.launch_secret_file)
    else:
        token = read_launch_token(args.launch_token_stdin, sys.argv[1:] if argv is None else argv)
    if not token:
        raise SystemExit("launcher: no launch token (KERNEL_LAUNCH_TOKEN or --launch-token-stdin)")
    # read only now: a re-execution (token on stdin) needs it too, and YARN's secret sets it in the environment
    args.warm = os.environ.pop("KERNEL_LAUNCHER_WARM", "") == "1" or args.warm

    control_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    control_port = bind_in_range(control_sock, args.ip, port_range)
    control_key = secrets.token_bytes(32)
    control = ControlServer(control_sock, control_key)
    if args.warm:
        control.start()
        warm_imports()  # before reporting: a kernel reported warm starts at once when it is handed out
        report(args, {"version": 1, "kernel_id": args.kernel_id, "launch_token": token, "warm": True, "ip": args.ip,
                      "control_port": control_port, "control_key": base64.b64encode(control_key).decode(),
                      "pid": os.getpid(), "pgid": os.getpgid(0), "hostname": socket.gethostname()})
        log(f"kernel {args.kernel_id} warm: control {control_port}, pid {os.getpid()}")
        token = wait_for_start(control, args)

    from traitlets.config import Config

    hb_probe = socket.socket()
    hb_port = bind_in_range(hb_probe, args.ip, port_range)
    hb_probe.close()  # the heartbeat thread binds it itself a moment later: until then no channel may take it
    RESERVED_PORTS.add(hb_port)

    config = Config()
    config.Session.key = secrets.token_hex(32).encode()
    config.IPKernelApp.ip = args.ip
    config.IPKernelApp.hb_port = hb_port
    config.IPKernelApp.kernel_class = args.kernel_class_name
    curve = curve_keys() if args.curve else {}
    app = reporting_app_class().instance(config=config, **curve)  # ipykernel 7 serves every channel with them
    app.initialize([])
    if args.spark_session:
        start_spark_session(app)
    if not args.warm:
        control.start()  # serving before the gateway can learn its port

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
            **({"curve_publickey": curve["curve_publickey"].decode()} if curve else {}),
        },
        "control_port": control_port,
        "control_key": base64.b64encode(control_key).decode(),
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "hostname": socket.gethostname(),
    }
    report(args, payload)
    log(f"kernel {args.kernel_id} ready: ports {app.shell_port},{app.iopub_port},{app.stdin_port},"
        f"{app.control_port},{app.hb_port}, control {control_port}, pid {os.getpid()}")
    app.start()


if __name__ == "__main__":
    try:
        main()
    except SystemExit as exc:  # its message would go to sys.stderr, which ipykernel may have taken over
        if isinstance(exc.code, str):
            log(exc.code)
            raise SystemExit(1) from None
        raise
    except BaseException:
        log("failed:\n" + traceback.format_exc().rstrip())
        raise SystemExit(1) from None
