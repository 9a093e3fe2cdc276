"""Local kernels outlive a gateway with ``on_stop=keep``: the next gateway on the same kernel store serves them
again under the same id, with their variables; kernels that died meanwhile are cleaned, and a store that cannot be
used is reported. Real gateway processes, real ipykernel kernels, a real SQLite store."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.api.helpers import pgrep_f
from tests.services.client import KernelWS, call, start_kernel
from tests.services import kernel_store
from tests.services.gateway import GatewayServer, free_port, wait_until
from tests.services.kernel_store import kernels, records, run

keep = kernel_store.keep  # the fixture: a store key and a SQLite store under tmp_path


def answers(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def kernel_pids(kernel_id: str) -> list[int]:
    """The kernel's processes: its connection file (``kernel-<id>.json``) is on their command line."""
    return pgrep_f(f"kernel-{kernel_id}.json")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_kernel_outlives_the_gateway_and_is_served_again(start_gw, keep, sig):
    first = start_gw(env=keep)
    kid = start_kernel(first, env={"KERNEL_USERNAME": "alice"})
    run(first, kid, "kept = 41 + 1")
    pids = kernel_pids(kid)
    assert pids, "the kernel's process was not found"
    old_ws = KernelWS(first, kid)

    stopping = time.monotonic()
    first.stop(sig, timeout=30)
    stop_seconds = time.monotonic() - stopping
    assert first.proc.returncode is not None
    if sig == signal.SIGTERM:
        assert stop_seconds < 10, f"a keeping gateway took {stop_seconds:.1f}s to stop"
        assert "left 1 kernels running" in first.log()
    assert all(Path(f"/proc/{pid}").exists() for pid in pids), "the kernel ended with the gateway"

    second = start_gw(port=first.port, env=keep)  # the same address, as after a rolling restart
    try:
        listed = kernels(second)
        assert kid in listed and listed[kid]["execution_state"] == "idle", listed
        # the old client reconnects to the same URL and finds its variable
        with pytest.raises(Exception):
            old_ws.recv(timeout=5)  # its connection ended with the first gateway
        assert run(second, kid, "print(kept)").strip() == "42"
        # it is managed as before: interrupt (a signal to a process we did not start), restart, shutdown
        with KernelWS(second, kid) as ws:
            ws.assert_interrupts(second, kid)
        assert call(second, "POST", f"/api/kernels/{kid}/restart", timeout=90)[0] == 200
        assert run(second, kid, "import os; print(os.environ['KERNEL_USERNAME'])").strip() == "alice"
        assert call(second, "DELETE", f"/api/kernels/{kid}")[0] == 204
        wait_until(lambda: not kernel_pids(kid), 30, 0.2, what="the kernel's processes gone")
    finally:
        second.stop()
    assert records(keep) == []
    assert "Traceback" not in second.log()


def test_a_busy_kernel_is_served_again_and_becomes_idle_after_its_cell(start_gw, keep):
    first = start_gw(env=keep)
    kid = start_kernel(first)
    with KernelWS(first, kid) as ws:
        ws.execute("import time; time.sleep(8); done = True")
        wait_until(lambda: kernels(first)[kid]["execution_state"] == "busy", 30, 0.1, what="busy")
    first.stop()
    second = start_gw(port=first.port, env=keep)
    assert kid in kernels(second)  # its heartbeat answered though its shell was busy
    wait_until(lambda: kernels(second)[kid]["execution_state"] == "idle", 60, 0.2, what="idle after the cell")
    assert run(second, kid, "print(done)").strip() == "True"
    second.stop()  # keeps it again
    third = start_gw(port=first.port, env={**keep, "GATEWAY_KERNELS_ON_STOP": "shutdown"})
    assert kid in kernels(third)
    third.stop()  # 'shutdown': the kernel ends and its record goes
    wait_until(lambda: not kernel_pids(kid), 30, 0.2, what="the kernel's processes gone")
    assert records(keep) == []


def test_a_kernel_that_died_while_no_gateway_ran_is_cleaned(start_gw, keep):
    first = start_gw(env=keep)
    dead, alive = start_kernel(first), start_kernel(first)
    first.stop()
    for pid in kernel_pids(dead):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not kernel_pids(dead), 30, 0.1, what="the killed kernel gone")
    second = start_gw(env=keep)
    listed = kernels(second)
    assert dead not in listed and alive in listed
    assert any(f"kernel={dead}" in line and "is not served again: its process" in line
               for line in second.log().splitlines()), second.log()
    assert call(second, "DELETE", f"/api/kernels/{alive}")[0] == 204
    second.stop()
    assert records(keep) == []


def test_keep_without_a_store_key_refuses_to_start(tmp_path):
    from tests.services.gateway import start_gateway

    with pytest.raises(RuntimeError) as failed:
        start_gateway(tmp_path=tmp_path, env={"GATEWAY_KERNELS_ON_STOP": "keep"}, timeout=30)
    message = str(failed.value)
    assert "exited with 2" in message and "GATEWAY_KERNELS_ON_STOP" in message and "key_file" in message
    assert "Traceback" not in message


def test_a_store_that_cannot_be_used_is_reported_with_503(tmp_path, keep):
    """The gateway runs (/healthz) but is not ready (/readyz 503): it cannot know its kept kernels, so a kernel id
    is answered 503 (not 404: a client would forget its kernel), the list too, and a start is undone."""
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store's directory should be")
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), **keep,
           "GATEWAY_KERNEL_STORE_PATH": str(blocked / "kernels.sqlite")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kernel_gateway", "--ip=127.0.0.1", f"--port={port}",
                             "--auth-token=t0ken"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    gw = GatewayServer(port=port, token="t0ken", proc=proc, log_path=tmp_path / "unused")
    try:
        wait_until(lambda: call(gw, "GET", "/healthz", auth=False)[0] == 200 if answers(port) else False, 30, 0.1,
                   what="the gateway to answer /healthz")
        status, body, _ = call(gw, "GET", "/readyz", auth=False)
        assert status == 503 and body["status"] == "re-attaching kept kernels", body
        status, body, headers = call(gw, "GET", f"/api/kernels/{uuid.uuid4()}")
        assert status == 503 and "re-attaching" in body["message"] and headers.get("Retry-After") == "5", body
        assert call(gw, "GET", "/api/kernels")[0] == 503
        before = set(pgrep_f("ipykernel"))
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "python3"})
        assert status == 503, body
        assert "record could not be kept" in body["message"] and "kernels.sqlite" in body["message"]
        wait_until(lambda: set(pgrep_f("ipykernel")) <= before, 30, 0.2, what="the unrecorded kernel stopped")
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert "kept kernels are not served yet" in output and "Traceback" not in output
