"""The launcher for real: its control port (slow and idle clients never hold up the gateway's requests),
its own messages (they reach its stderr after ipykernel took stderr over) and its launch token (gone from /proc)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from provisioners.errors import BackendError
from provisioners.handshake import ResponseListener
from provisioners.remote import control_request

_spec = importlib.util.spec_from_file_location(
    "launch_ipykernel", Path(__file__).resolve().parents[2] / "launchers/python/launch_ipykernel.py")
launcher = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launcher)


@pytest.fixture
def start_server():
    """Start real ControlServers on loopback: ``start_server(**options)`` -> (port, key); closed afterwards."""
    sockets = []

    def start(**kwargs) -> tuple[int, bytes]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        key = secrets.token_bytes(32)
        launcher.ControlServer(sock, key, **kwargs).start()
        return sock.getsockname()[1], key

    yield start
    for sock in sockets:
        sock.close()  # its accept loop ends


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def read_until_closed(conn: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (the server's deadline ends the wait).

    b"reset" when the server closed with bytes of ours unread: the reset may overtake its reply.
    """
    conn.settimeout(timeout)
    data = b""
    try:
        while chunk := conn.recv(4096):
            data += chunk
    except ConnectionResetError:
        return b"reset"
    return data


@pytest.fixture
def usr1():
    """Set when SIGUSR1 reaches this process (the server signals its own process, as in the launcher)."""
    received = threading.Event()
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.set())
    yield received
    signal.signal(signal.SIGUSR1, previous)


async def test_slow_and_idle_clients_do_not_delay_requests(start_server, usr1):
    port, key = start_server()
    slow = [connect(port) for _ in range(6)]
    idle = [connect(port) for _ in range(4)]
    opened = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:  # the slow-loris attack itself: one byte a second, never a newline
        while not stop.is_set():
            for conn in slow:
                try:
                    conn.send(b" ")
                except OSError:
                    pass
            stop.wait(1.0)

    attacker = threading.Thread(target=trickle, daemon=True)
    attacker.start()
    try:
        await asyncio.sleep(1.5)  # let the attack run (not a synchronisation: the attack needs time to be one)
        started = time.monotonic()
        await control_request("127.0.0.1", port, key, {"signum": int(signal.SIGUSR1)}, timeout=5.0)
        await control_request("127.0.0.1", port, key, {"signum": 0}, timeout=5.0)
        elapsed = time.monotonic() - started
        assert elapsed < 2.0, f"two requests took {elapsed:.2f}s behind slow clients"
        assert await asyncio.to_thread(usr1.wait, 5), "the signal did not arrive"

        # the slow and idle connections are cut at the whole-connection deadline, not kept alive by trickling
        replies = await asyncio.gather(*(asyncio.to_thread(read_until_closed, c, 30) for c in slow + idle))
        cut = time.monotonic() - opened
        assert all(b"bad request: TimeoutError" in r or r == b"reset" for r in replies[:len(slow)]), replies
        assert all(b"bad request: TimeoutError" in r for r in replies[len(slow):]), replies
        assert launcher.CONTROL_DEADLINE - 0.5 < cut < launcher.CONTROL_DEADLINE + 5, f"cut after {cut:.1f}s"
    finally:
        stop.set()
        for conn in slow + idle:
            conn.close()


async def test_connections_over_the_bound_are_closed_at_once_and_size_is_capped(start_server):
    port, key = start_server(max_connections=4, max_request=1024)
    held = [connect(port) for _ in range(4)]
    try:
        # wait until the server has taken all four (accept runs in its own thread)
        deadline = time.monotonic() + 10
        while True:
            extra = connect(port)
            started = time.monotonic()
            if read_until_closed(extra, 10) == b"" and time.monotonic() - started < 1.0:
                extra.close()
                break  # closed at once, unanswered: over the bound
            extra.close()
            assert time.monotonic() < deadline, "a connection over the bound was served"
        with pytest.raises(BackendError):
            await control_request("127.0.0.1", port, key, {"signum": 0}, timeout=2.0)
    finally:
        for conn in held:
            conn.close()  # frees the slots at once: the server sees EOF
    await asyncio.sleep(0)
    for _ in range(100):  # the slots come back as the server notices the closed connections
        try:
            await control_request("127.0.0.1", port, key, {"signum": 0}, timeout=2.0)
            break
        except BackendError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the server did not serve again after the held connections closed")

    # a request line longer than the cap is refused as soon as the cap is passed, not at the deadline
    big = connect(port)
    started = time.monotonic()
    big.sendall(b"x" * 5000)
    reply = read_until_closed(big, 10)
    big.close()
    assert (reply == b"reset" or b"bad request: ValueError" in reply) and time.monotonic() - started < 2.0


async def test_gateway_side_deadline_bounds_the_whole_exchange():
    """A control port that accepts and then trickles its reply cannot hold the gateway past its timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    stop = threading.Event()

    def trickling_peer() -> None:
        conn, _ = server.accept()
        with conn:
            while not stop.is_set():
                conn.send(b" ")  # never a full line
                stop.wait(0.3)

    threading.Thread(target=trickling_peer, daemon=True).start()
    started = time.monotonic()
    try:
        with pytest.raises(BackendError, match="within 1s"):
            await control_request("127.0.0.1", port, b"k" * 32, {"signum": 0}, timeout=1.0)
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        server.close()


# -- the launcher process itself ---------------------------------------------------------------------

LAUNCHER = Path(launcher.__file__)


@pytest.fixture
async def listener():
    server = ResponseListener(response_ip="127.0.0.1")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def spawn(listener: ResponseListener):
    """``spawn(kernel_id, env, *extra)``: a launcher reporting to ``listener``; killed after the test if it still runs."""
    started: list[subprocess.Popen] = []

    def start(kernel_id: str, env: dict[str, str], *extra: str) -> subprocess.Popen:
        argv = [sys.executable, str(LAUNCHER), "--kernel-id", kernel_id,
                "--response-address", f"127.0.0.1:{listener.port}", "--public-key", listener.public_key,
                "--ip", "127.0.0.1", *extra]
        started.append(subprocess.Popen(argv, env=dict(os.environ, **env), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def shut_down(proc: subprocess.Popen, port: int, key: bytes) -> str:
    """Ask the launcher to shut down over its control port; return its stderr once it has ended."""
    await control_request("127.0.0.1", port, key, {"shutdown": True}, timeout=10)
    return (await asyncio.to_thread(proc.communicate, timeout=60))[1].decode(errors="replace")


async def test_token_from_the_environment_is_gone_from_proc_and_messages_reach_stderr(listener, spawn):
    kernel_id = str(uuid.uuid4())
    token = listener.register(kernel_id)
    proc = spawn(kernel_id, {"KERNEL_LAUNCH_TOKEN": token})
    info = await asyncio.wait_for(listener.wait(kernel_id), 90)
    assert info.pid == proc.pid, "the launcher re-executes itself in place: the pid the gateway knows stays"
    for name in ("environ", "cmdline"):
        assert token.encode() not in Path(f"/proc/{proc.pid}/{name}").read_bytes(), f"token in /proc/pid/{name}"
    stderr = await shut_down(proc, info.control_port, info.control_key)
    # said after ipykernel took over sys.stderr and fd 2: it still reaches the launcher's own stderr
    assert "[launcher" in stderr and "shutdown requested through the control port" in stderr, stderr
    assert token not in stderr


async def test_launcher_that_cannot_report_says_why_on_stderr(listener):
    kernel_id = str(uuid.uuid4())
    token = listener.register(kernel_id)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    argv_address = f"127.0.0.1:{closed.getsockname()[1]}"
    proc = subprocess.Popen(
        [sys.executable, str(LAUNCHER), "--kernel-id", kernel_id, "--response-address", argv_address,
         "--public-key", listener.public_key, "--ip", "127.0.0.1", "--connect-timeout", "2", "--launch-token-stdin"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, stderr = await asyncio.to_thread(proc.communicate, (token + "\n").encode(), 90)
    finally:
        closed.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stderr.decode(errors="replace")
    assert proc.returncode == 3, text
    assert f"cannot report to the gateway at {argv_address}" in text, text


# -- warm start (pools) --------------------------------------------------------------------------------

def test_the_local_ready_line_is_the_one_the_gateway_waits_for():
    from launchers import WARM_LOCAL_READY

    assert launcher.WARM_LOCAL_READY == WARM_LOCAL_READY  # the script is copied into images: it cannot import it


async def test_a_warm_launcher_reports_waits_and_starts_once_with_the_sealed_environment(listener, spawn):
    from provisioners._payloads import seal_start_request

    kernel_id = str(uuid.uuid4())
    token = listener.register(kernel_id)
    proc = spawn(kernel_id, {"KERNEL_LAUNCH_TOKEN": token, "KERNEL_LAUNCHER_WARM": "1"})
    warm = await asyncio.wait_for(listener.wait(kernel_id), 90)
    assert warm.warm and warm.pid == proc.pid and warm.connection_info == {"ip": "127.0.0.1"}
    ip, port, key = "127.0.0.1", warm.control_port, warm.control_key
    # sealed with another key: refused, and the launcher still waits
    forged = seal_start_request(secrets.token_bytes(32), {"launch_token": "x", "env": {}})
    with pytest.raises(BackendError, match="bad request: InvalidTag"):
        await control_request(ip, port, key, {"start": forged})

    second = listener.register(kernel_id)  # the hand-out: a new launch, reported with the new token
    secret = f"teal-{uuid.uuid4().hex}"
    await control_request(ip, port, key, {"start": seal_start_request(key, {"launch_token": second,
                                                                             "env": {"KERNEL_COLOR": secret}})})
    with pytest.raises(BackendError, match="the kernel was started already"):
        await control_request(ip, port, key, {"start": seal_start_request(key, {"launch_token": second, "env": {}})})
    info = await asyncio.wait_for(listener.wait(kernel_id), 90)
    assert not info.warm and info.pid == proc.pid and info.control_port == port
    assert info.connection_info["shell_port"] > 0
    environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
    assert secret.encode() not in environ and b"KERNEL_LAUNCHER_WARM" in environ  # only the start-up environment
    stderr = await shut_down(proc, port, key)
    assert "warm: control" in stderr and "handed out: starting it" in stderr, stderr
    assert secret not in stderr and token not in stderr
