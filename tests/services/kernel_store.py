"""Steps of a gateway restart with kept kernels, shared by the end-to-end tests of the remote backends (issue 10).

A backend's test starts a gateway that keeps its kernels (``GATEWAY_KERNELS_ON_STOP=keep``), starts a kernel that
sets ``kept = 42`` and opens a websocket, then takes these steps; what only the backend can see (its launcher,
container or service) it checks itself. The REST and websocket helpers come from ``tests/api/test_reattach.py``
(local kernels), the model of these tests.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import time
from typing import Callable

import pytest

from kernel_gateway.store import KernelStoreOptions, open_store
from tests.services.client import KernelWS, call
from tests.services.gateway import GatewayServer, wait_until

__all__ = ["interrupt_and_restart", "interrupt_mode", "keep", "kernels", "no_traceback", "not_served", "records",
           "restarts_after_death", "run", "serve_again", "served_after_restart", "stop_keeping"]


@pytest.fixture
def keep(tmp_path):
    """Environment of a gateway that keeps its kernels in a SQLite store under ``tmp_path``."""
    key_file = tmp_path / "store.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o600)
    return {"GATEWAY_KERNELS_ON_STOP": "keep", "GATEWAY_KERNEL_STORE_KEY_FILE": str(key_file),
            "GATEWAY_KERNEL_STORE_PATH": str(tmp_path / "kernels.sqlite")}


def records(env: dict[str, str]) -> list:
    """The records in the store (read while no gateway holds it)."""
    options = KernelStoreOptions(key_file=env["GATEWAY_KERNEL_STORE_KEY_FILE"], sqlite_path=env["GATEWAY_KERNEL_STORE_PATH"])

    async def read():
        store = open_store(options)
        try:
            return await store.records()
        finally:
            await store.close()

    return asyncio.run(read())


def run(gw, kernel_id: str, code: str) -> str:
    with KernelWS(gw, kernel_id) as ws:
        out, msgs = ws.run(code)
    errors = [m["content"] for m in msgs if m["msg_type"] == "error"]
    assert not errors, errors
    return out


def kernels(gw) -> dict[str, dict]:
    status, body, _ = call(gw, "GET", "/api/kernels")
    assert status == 200, body
    return {k["id"]: k for k in body}




@pytest.fixture
def interrupt_mode() -> str:
    """The kernelspec's interrupt mode: 'message' (as installed specs have it) unless a test parametrizes 'signal'
    (which a later gateway sends through the launcher's control port with the stored key). Import it into a
    test module to use it."""
    return "message"


def stop_keeping(gw: GatewayServer, sig: int) -> float:
    """Stop ``gw`` with ``sig`` and return the seconds it took; after SIGTERM it must have exited cleanly within
    10 s, saying it left its kernel running."""
    stopping = time.monotonic()
    gw.stop(sig, timeout=30)
    seconds = time.monotonic() - stopping
    if sig == signal.SIGTERM:
        assert gw.proc.returncode == 0, gw.log()
        assert seconds < 10, f"a keeping gateway took {seconds:.1f}s to stop"
        assert "left 1 kernels running" in gw.log()
    return seconds


def serve_again(start: Callable[..., GatewayServer], first: GatewayServer, kernel_id: str,
                old_ws: KernelWS) -> tuple[GatewayServer, float, float]:
    """Start a gateway at ``first``'s address (``start(port=...)``) and check it serves the kernel as before: listed
    under the same id and idle; the old client's websocket ended with ``first`` and a new one to the same URL
    reads ``kept``. Returns the gateway and the seconds from its start until it was ready and until the kernel
    answered."""
    starting = time.monotonic()
    gw = start(port=first.port)
    ready = time.monotonic() - starting
    listed = kernels(gw)
    assert kernel_id in listed and listed[kernel_id]["execution_state"] == "idle", listed
    with pytest.raises(Exception):
        old_ws.recv(timeout=5)  # its connection ended with the first gateway
    assert run(gw, kernel_id, "print(kept)").strip() == "42"
    return gw, ready, time.monotonic() - starting


def interrupt_and_restart(gw: GatewayServer, kernel_id: str, user: str) -> None:
    """Interrupt a running cell and restart the kernel through ``gw``; the restarted kernel still has
    ``KERNEL_USERNAME`` ``user``."""
    with KernelWS(gw, kernel_id) as ws:
        ws.assert_interrupts(gw, kernel_id)
    status, body, _ = call(gw, "POST", f"/api/kernels/{kernel_id}/restart", timeout=120)
    assert status == 200, body
    assert run(gw, kernel_id, "import os; print(os.environ['KERNEL_USERNAME'])").strip() == user


def restarts_after_death(gw: GatewayServer, kernel_id: str, kill: Callable[[], None]) -> None:
    """``kill()`` ends the kernel behind ``gw``'s back while a client watches: the client is told it restarts, it
    comes back idle, and then sets ``again`` (for :func:`served_after_restart`)."""
    with KernelWS(gw, kernel_id, session_id="watcher") as ws:
        kill()
        ws.recv_until(lambda m: m["msg_type"] == "status" and m["content"]["execution_state"] == "restarting", 60)
    wait_until(lambda: kernels(gw)[kernel_id]["execution_state"] == "idle", 120, 0.2, what="the kernel back")
    run(gw, kernel_id, "again = 'restarted'")


def served_after_restart(start: Callable[..., GatewayServer], first: GatewayServer, kernel_id: str,
                         user: str) -> GatewayServer:
    """A gateway started at ``first``'s address (``start(port=...)``) serves the kernel a previous gateway restarted
    (see :func:`restarts_after_death`): the record names the new launch, and ``KERNEL_USERNAME`` is ``user``."""
    gw = start(port=first.port)
    assert kernel_id in kernels(gw)
    assert run(gw, kernel_id, "import os; print(again, os.environ['KERNEL_USERNAME'])").strip() == f"restarted {user}"
    return gw


def not_served(gw: GatewayServer, dead: str, alive: str) -> None:
    """``gw`` started after kernel ``dead`` ended behind its back: it serves ``alive`` only (which answers) and
    logged why not ``dead``."""
    listed = kernels(gw)
    assert dead not in listed and alive in listed, listed
    assert any(f"kernel={dead}" in line and "is not served again: its process" in line
               for line in gw.log().splitlines()), gw.log()
    assert call(gw, "GET", f"/api/kernels/{dead}")[0] == 404
    assert run(gw, alive, "print('still here')").strip() == "still here"


def no_traceback(*gateways: GatewayServer | None) -> None:
    """No gateway logged a traceback."""
    for gw in gateways:
        if gw is not None:
            assert "Traceback" not in gw.log(), gw.log()
