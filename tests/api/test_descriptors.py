"""Descriptor exhaustion: a gateway under a 1,024 open-file limit survives connection floods.

A real gateway subprocess runs with RLIMIT_NOFILE set in the child; this test process opens real
loopback TCP connections and websockets to it (from several 127.0.0.x source addresses, to
exercise the global cap as well as the per-address one) and checks that ``/healthz`` keeps
answering from a fresh connection, that idle connections are closed after the idle timeout, that
the log stays small and free of tracebacks, and that a failing accept does not spin a core.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websocket

from tests.services.client import KernelWS, start_kernel
from tests.services.gateway import GatewayServer, wait_until

FLOOD = 1100
#: Source addresses of the flood (all of 127/8 is loopback on Linux); /healthz comes from 127.0.0.1.
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 7)]
IDLE_TIMEOUT = 2.0
LOG_LIMIT = 100 * 1024


@pytest.fixture(scope="module", autouse=True)
def own_descriptors():
    """This process holds the flood's sockets itself: raise its soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4 * FLOOD
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the test process needs an open-file hard limit of {want}, has {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def nofile(soft: int, hard: int):
    """A ``preexec_fn`` giving the gateway child these open-file limits."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def healthz_seconds(gw: GatewayServer, timeout: float = 10) -> float:
    """Seconds ``GET /healthz`` takes on a fresh connection from 127.0.0.1; fails if it does not answer 200."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=timeout) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    return time.monotonic() - started


def open_idle(gw: GatewayServer, count: int, sources: list[str]) -> list[socket.socket]:
    """Start ``count`` connections that never send a byte (non-blocking: a full backlog cannot stall us)."""
    socks = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((sources[i % len(sources)], 0))
        code = sock.connect_ex(("127.0.0.1", gw.port))
        assert code in (0, errno.EINPROGRESS), os.strerror(code)
        socks.append(sock)
    return socks


def accept_queue(port: int) -> int:
    """Connections waiting in the kernel's accept queue of the loopback listener on ``port``."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN; rx_queue: the backlog
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"no listener on port {port}")


def flood(gw: GatewayServer, count: int, sources: list[str], between=lambda: None) -> list[socket.socket]:
    """Open ``count`` idle connections in batches the listen backlog (128) can hold, calling ``between``
    once the gateway has taken each batch off its accept queue (or failed to: ``between`` may wait on that)."""
    socks: list[socket.socket] = []
    while len(socks) < count:
        socks += open_idle(gw, min(100, count - len(socks)), sources)
        wait_until(lambda: accept_queue(gw.port) == 0 or "Too many open files" in gw.log(), 30, interval=0.02,
                   what="the gateway to accept a batch")
        between()
    return socks


def closed_by_server(sock: socket.socket) -> bool:
    """True once the gateway closed ``sock`` (EOF or reset; a 503 before the EOF is read past)."""
    try:
        while True:
            if not sock.recv(4096):
                return True
    except BlockingIOError:
        return False
    except OSError:  # reset, or the connect itself failed: either way the gateway holds nothing
        return True


def wait_all_closed(socks: list[socket.socket], timeout: float) -> None:
    open_ = list(socks)

    def done():
        open_[:] = [s for s in open_ if not closed_by_server(s)]
        return not open_

    try:
        wait_until(done, timeout, interval=0.2, what=f"the gateway to close idle connections ({len(open_)} open)")
    finally:
        for sock in socks:
            sock.close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_quiet_log(gw: GatewayServer) -> str:
    text = gw.log()
    assert len(text.encode()) < LOG_LIMIT, f"log grew to {len(text)} bytes:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-5000:]
    return text


def test_idle_flood_keeps_healthz_answering_and_is_closed_after_idle_timeout(start_gw):
    gw = start_gw(f"--GatewayApp.idle_connection_timeout={IDLE_TIMEOUT}", preexec_fn=nofile(1024, 1024))
    times: list[float] = []
    # 1,100 idle connections, more than the descriptor limit, and /healthz after every hundred
    idle = flood(gw, FLOOD, FLOOD_SOURCES, between=lambda: times.append(healthz_seconds(gw)))
    assert len(times) == FLOOD // 100 and max(times) < 3, f"/healthz took {max(times):.1f}s during the flood"
    wait_all_closed(idle, IDLE_TIMEOUT + 30)

    # connections below every cap are closed by the idle timeout, not before it
    opened = time.monotonic()
    late = open_idle(gw, 20, FLOOD_SOURCES)
    time.sleep(IDLE_TIMEOUT / 2)  # a point inside the timeout at which none may be closed yet
    assert not any(closed_by_server(s) for s in late), "idle connections closed before the idle timeout"
    wait_all_closed(late, IDLE_TIMEOUT + 30)
    assert time.monotonic() - opened >= IDLE_TIMEOUT
    assert healthz_seconds(gw) < 3

    text = assert_quiet_log(gw)
    assert "open-file limit: soft 1024 (was 1024), hard 1024" in text
    assert "waiting for a request to make room" in text  # the global cap (768) was reached and made room


def test_slow_headers_are_cut_at_the_idle_timeout(start_gw):
    gw = start_gw(f"--GatewayApp.idle_connection_timeout={IDLE_TIMEOUT}")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        sock.setblocking(False)
        for _ in range(40):  # one header byte every 0.25 s: never idle for long, never finished
            time.sleep(0.25)  # the pace of the slow client, not synchronisation
            if closed_by_server(sock):
                break
            try:
                sock.send(b"a")
            except OSError:  # reset: the gateway closed it
                break
        else:
            pytest.fail("a client trickling header bytes kept its connection for 10 s")
        assert IDLE_TIMEOUT <= time.monotonic() - started < IDLE_TIMEOUT + 5


def test_per_peer_cap_refuses_with_503_when_nothing_waits(start_gw):
    gw = start_gw("--GatewayApp.max_connections_per_peer=3", preexec_fn=nofile(1024, 1024))
    kernel_id = start_kernel(gw)
    sockets = [KernelWS(gw, kernel_id) for _ in range(3)]  # busy connections: none can be closed for room
    try:
        try:
            KernelWS(gw, kernel_id).ws.close()
        except websocket.WebSocketBadStatusException as exc:
            assert exc.status_code == 503 and b"connection limit" in exc.resp_body, exc
        else:
            pytest.fail(f"a 4th connection from one address was admitted; gateway log:\n{gw.log()[-4000:]}")
    finally:
        for ws in sockets:
            ws.ws.close()
    # closing the websockets gave their places back
    wait_until(lambda: _connects(gw, kernel_id), 15, interval=0.2, what="a websocket to be admitted again")
    assert_quiet_log(gw)


def _connects(gw: GatewayServer, kernel_id: str) -> bool:
    try:
        KernelWS(gw, kernel_id).ws.close()
        return True
    except websocket.WebSocketBadStatusException:
        return False


@pytest.mark.parametrize("hard", [1024, 4096])
def test_websocket_flood_keeps_healthz_answering(start_gw, hard):
    gw = start_gw(preexec_fn=nofile(1024, hard))
    assert f"open-file limit: soft {hard} (was 1024), hard {hard}" in gw.log()
    kernel_id = start_kernel(gw)
    opened, refused = [], 0
    try:
        for _ in range(144):  # 144 websockets hold ~1,000 descriptors, the whole 1,024 limit
            try:
                opened.append(KernelWS(gw, kernel_id))
            except websocket.WebSocketBadStatusException as exc:
                assert exc.status_code == 503
                refused += 1
        assert healthz_seconds(gw) < 3
        if hard == 1024:  # (1024 - 256 - 48) / 7 websockets fit; the rest were refused cleanly
            assert len(opened) == 102 and refused == 42, (len(opened), refused)
        else:
            assert refused == 0
        # the admitted ones work
        reply = opened[-1]
        msg_id = reply.execute("1 + 1")
        assert any(m["msg_type"] == "execute_result" for m in reply.collect(msg_id))
    finally:
        for ws in opened:
            ws.ws.close()
    wait_until(lambda: _connects(gw, kernel_id), 15, interval=0.2, what="a websocket to be admitted again")
    assert healthz_seconds(gw) < 3
    assert_quiet_log(gw)


def test_failing_accept_pauses_and_logs_once(start_gw):
    # a cap at the descriptor limit itself: the gateway's own descriptors make accept fail with EMFILE first
    gw = start_gw("--GatewayApp.idle_connection_timeout=8", "--GatewayApp.max_connections=1024",
                  "--GatewayApp.max_connections_per_peer=0", preexec_fn=nofile(1024, 1024))
    idle = flood(gw, FLOOD, FLOOD_SOURCES)
    try:
        assert "Too many open files" in gw.log()
        before = cpu_seconds(gw.proc.pid)
        time.sleep(3)  # a window in which accepts keep failing: measure the CPU the gateway burns in it
        burned = cpu_seconds(gw.proc.pid) - before
        assert burned < 0.6, f"the gateway used {burned:.2f}s of CPU in 3s while accept failed"
    finally:
        for sock in idle:
            sock.close()
    wait_until(lambda: _healthy(gw), 30, interval=0.2, what="/healthz once the flood went away")
    text = assert_quiet_log(gw)
    assert text.count("accept failed") <= 2, text[-3000:]


def _healthy(gw: GatewayServer) -> bool:
    try:
        return healthz_seconds(gw, timeout=2) < 2
    except (OSError, AssertionError):
        return False


@pytest.mark.parametrize("env, words", [
    ({"GATEWAY_IDLE_CONNECTION_TIMEOUT": "0"}, "idle_connection_timeout must be more than 0 seconds, not 0.0"),
    ({"GATEWAY_MAX_CONNECTIONS": "2000"}, "hard open-file limit 1024, not 2000"),
    ({"GATEWAY_MAX_CONNECTIONS": "10"}, "between 32 and"),
    ({"GATEWAY_MAX_CONNECTIONS_PER_PEER": "-5"}, "max_connections_per_peer must be 0 (no cap) or more, not -5"),
])
def test_bad_connection_options_refuse_to_start(tmp_path, env, words):
    argv = [sys.executable, "-m", "kernel_gateway", "--ip=127.0.0.1", "--port=1", "--auth-token=t"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), **env},
                          preexec_fn=nofile(1024, 1024))
    assert done.returncode == 2, done
    assert "configuration error" in done.stderr and words in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
