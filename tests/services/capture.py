"""Packet captures with Debian's tcpdump (installed with apt when missing), and the checks the transport-encryption
tests of every backend share: what crosses the wire, whether a client without the kernel's server key is answered,
and where the kernel's secret key must not be."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import zmq

from kernel_gateway.bridge.frames import Signer
from tests.services.apt import install_missing
from tests.services.gateway import wait_until

__all__ = ["KERNEL_PORTS", "SECRET_CELL", "PacketCapture", "assert_plaintext_on_the_wire", "assert_remote_kernel_encrypted",
           "captured_run", "connection_file", "kernel_answers", "marker_cell", "proc_text"]

KERNEL_PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


class PacketCapture:
    """``tcpdump`` writing every TCP packet to or from ``ports`` on all interfaces (loopback, veth links, the
    docker bridge) to a file, while in a ``with``. :attr:`data` is the raw capture (whole packets: a plaintext
    frame's bytes appear in it as they were sent).

    On leaving, a sentinel is sent over loopback to a port of the capture's own and the capture is stopped once
    the sentinel is in the file: tcpdump reads packets in order, so everything sent before is in it too."""

    def __init__(self, path: Path, ports) -> None:
        install_missing(["tcpdump"])
        self.path = path
        self._sentinel = socket.create_server(("127.0.0.1", 0))
        ports = {*ports, self._sentinel.getsockname()[1]}
        self.filter = "tcp and (" + " or ".join(f"port {int(p)}" for p in sorted(ports)) + ")"
        self.proc: subprocess.Popen | None = None
        self.data = b""

    def __enter__(self) -> PacketCapture:
        log = self.path.with_suffix(".log")
        with open(log, "wb") as out:
            # -U: each packet written as it is seen; -s 0: whole packets
            self.proc = subprocess.Popen(["tcpdump", "-i", "any", "-s", "0", "-U", "-n", "-w", str(self.path),
                                          self.filter], stdout=out, stderr=subprocess.STDOUT)
        # it says "listening on" once the capture is open: traffic before that would be missed
        wait_until(lambda: "listening on" in log.read_text(errors="replace") or self.proc.poll() is not None, 30,
                   what="tcpdump to start")
        assert self.proc.poll() is None, log.read_text(errors="replace")
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        sentinel = f"kgw-capture-sentinel-{uuid.uuid4().hex}".encode()
        try:
            with socket.create_connection(self._sentinel.getsockname(), timeout=10) as conn:
                conn.sendall(sentinel)
                wait_until(lambda: sentinel in self.path.read_bytes(), 30, what="the capture to reach its sentinel")
        finally:
            self._sentinel.close()
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
        self.data = self.path.read_bytes()


def marker_cell() -> tuple[str, str]:
    """Code that prints a fresh marker, and the marker; the code itself does not contain the marker."""
    marker = f"kgw-wire-marker-{uuid.uuid4().hex}"
    return f"print({marker[::-1]!r}[::-1])", marker


def kernel_answers(info: dict, timeout: float, server_key: bytes | None = None) -> bool:
    """Whether the kernel of ``info`` replies to a signed ``kernel_info_request`` on its shell channel within
    ``timeout`` seconds, from a client with ``server_key`` (a CurveZMQ client with a key pair of its own) or
    without one (a plain ZMQ client)."""
    from kernel_gateway.bridge.frames import DELIMITER, make_message_parts

    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if server_key is not None:
            public, secret = zmq.curve_keypair()
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
        sock.connect(f"tcp://{info['ip']}:{info['shell_port']}")
        key = info["key"].encode() if isinstance(info["key"], str) else info["key"]
        parts = make_message_parts("kernel_info_request", {}, "wire-test")
        sock.send_multipart([DELIMITER, Signer(key, info.get("signature_scheme", "hmac-sha256")).sign(parts), *parts])
        if not sock.poll(timeout * 1000):
            return False
        frames = sock.recv_multipart()
        return any(b"kernel_info_reply" in frame for frame in frames)
    finally:
        sock.close(0)
        context.term()


def proc_text(pid: int) -> str:
    """The command line and initial environment of process ``pid``, as text."""
    data = b""
    for name in ("cmdline", "environ"):
        try:
            data += Path(f"/proc/{pid}/{name}").read_bytes() + b"\n"
        except OSError:
            pass
    return data.decode(errors="replace")


def connection_file(runtime: Path, kernel_id: str) -> dict:
    """The connection file the gateway's kernel manager wrote for the kernel."""
    return json.loads((runtime / f"kernel-{kernel_id}.json").read_text())


#: A cell that prints the kernel's CurveZMQ secret key as ipykernel holds it (the launcher's app is its instance).
SECRET_CELL = "from ipykernel.kernelapp import IPKernelApp; print(IPKernelApp.instance().curve_secretkey.decode())"


def captured_run(gw, runtime: Path, kernel_id: str, path: Path) -> tuple[bytes, str]:
    """Run a marker cell through ``gw`` while capturing the kernel's ports (from its connection file under
    ``runtime``); return the capture and the marker."""
    from tests.services.kernel_store import run

    code, marker = marker_cell()
    with PacketCapture(path, [connection_file(runtime, kernel_id)[name] for name in KERNEL_PORTS]) as capture:
        assert run(gw, kernel_id, code).strip() == marker
    return capture.data, marker


def assert_remote_kernel_encrypted(gw, runtime: Path, kernel_id: str, path: Path, pid_of, no_answer: float = 5.0) -> None:
    """A remote kernel started with encryption: nothing readable on the wire, no answer to a client without its
    server key (and an answer with it), and its secret key (read inside the kernel) nowhere but in the kernel:
    not in the gateway's connection file or log, nor in the command line or environment of the process
    ``pid_of(kernel_id)`` names."""
    from tests.services.kernel_store import run

    info = connection_file(runtime, kernel_id)
    assert len(info.get("curve_publickey", "")) == 40 and "curve_secretkey" not in info, sorted(info)
    data, marker = captured_run(gw, runtime, kernel_id, path)
    assert len(data) > 2000, "the capture saw no kernel traffic"
    assert marker.encode() not in data and b"execute_request" not in data and b"<IDS|MSG>" not in data
    assert not kernel_answers(info, no_answer), "the kernel answered a client without its server key"
    assert kernel_answers(info, 60, server_key=info["curve_publickey"].encode())
    secret = run(gw, kernel_id, SECRET_CELL).strip()
    assert len(secret) == 40, secret
    pid = pid_of(kernel_id)
    assert pid, f"no process found for kernel {kernel_id}"
    assert secret not in proc_text(pid), "the secret key is in the kernel's command line or environment"
    assert secret not in gw.log() and secret not in json.dumps(connection_file(runtime, kernel_id))


def assert_plaintext_on_the_wire(gw, runtime: Path, kernel_id: str, path: Path) -> None:
    """The same capture for a kernel without encryption shows the marker (the capture does see plaintext)."""
    info = connection_file(runtime, kernel_id)
    assert "curve_publickey" not in info, sorted(info)
    data, marker = captured_run(gw, runtime, kernel_id, path)
    assert marker.encode() in data
    assert kernel_answers(info, 60)
