"""Helpers for the API tests: kernelspecs on disk, kernel processes, raw HTTP, error-body checks."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.services.client import call
from tests.services.gateway import GatewayServer

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
EXECUTION_STATES = {"starting", "idle", "busy", "restarting", "dead"}
#: argv of a normal ipykernel; jupyter_client swaps "python" for the gateway's interpreter.
IPYKERNEL_ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]


# -- kernelspecs ---------------------------------------------------------------------------------
def write_spec(jupyter_path: Path, name: str, argv: list[str], *, metadata: dict | None = None,
               files: dict[str, bytes] | None = None, **extra: Any) -> Path:
    """Write ``<jupyter_path>/kernels/<name>/kernel.json`` (plus ``files``); return the spec directory."""
    spec_dir = jupyter_path / "kernels" / name
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": argv, "display_name": f"test {name}", "language": "python", "metadata": metadata or {}, **extra}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    for filename, content in (files or {}).items():
        (spec_dir / filename).write_bytes(content)
    return spec_dir


def sleeper_spec(jupyter_path: Path, name: str = "sleeper") -> str:
    """A kernelspec whose process never answers; returns the unique marker on its command line."""
    marker = f"kgw-sleeper-marker-{uuid.uuid4().hex}"
    write_spec(jupyter_path, name, [sys.executable, "-c", "import time; time.sleep(600)", marker])
    return marker


def pgrep_f(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# -- processes -----------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kernel_pid(gw: GatewayServer, kernel_id: str) -> int | None:
    """The pid of the gateway child whose command line names the kernel's connection file."""
    for pid in children(gw.proc.pid):
        if alive(pid) and any(f"kernel-{kernel_id}.json" in arg for arg in cmdline(pid)):
            return pid
    return None


def listen_ports() -> dict[int, set[int]]:
    """pid -> TCP ports it listens on, from ``ss -ltnpH``."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    ports: dict[int, set[int]] = {}
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        port = int(fields[3].rsplit(":", 1)[1])
        for pid in re.findall(r"pid=(\d+)", line):
            ports.setdefault(int(pid), set()).add(port)
    return ports


def connection_info(runtime_dir: Path, kernel_id: str) -> dict:
    return json.loads((runtime_dir / f"kernel-{kernel_id}.json").read_text())


# -- HTTP ----------------------------------------------------------------------------------------
def assert_error(status_body_headers: tuple, status: int, *fragments: str) -> dict:
    """Check a response is the JSON error ``{reason, message}`` with ``status`` and no traceback."""
    got_status, body, headers = status_body_headers
    assert got_status == status, (got_status, body)
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    assert isinstance(body, dict) and set(body) == {"reason", "message"}, body
    assert isinstance(body["reason"], str) and body["reason"], body
    assert isinstance(body["message"], str), body
    assert "Traceback" not in json.dumps(body) and 'File "' not in body["message"], body
    for fragment in fragments:
        assert fragment in body["message"], (fragment, body)
    return body


def send_raw(gw: GatewayServer, head: bytes, chunks: list[bytes] = (), timeout: float = 10) -> tuple[int, dict, bytes]:
    """Send a hand-made HTTP/1.1 request; return ``(status, headers, body)`` even if the server stops reading."""
    with socket.create_connection((gw.host, gw.port), timeout=timeout) as sock:
        sock.sendall(head)
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:  # the server answered and closed while we were still sending
                break
        data = b""
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
        header_blob, _, body = data.partition(b"\r\n\r\n")
        lines = header_blob.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            part = sock.recv(65536)
            if not part:
                break
            body += part
    return status, headers, body


def concurrently(fn, args_list: list) -> list:
    """Run ``fn(*args)`` for every args tuple at once in threads; return the results in order."""
    with ThreadPoolExecutor(len(args_list)) as pool:
        return list(pool.map(lambda args: fn(*args), args_list))


def post_kernel(gw: GatewayServer, name: str | None = None, env: dict | None = None,
                headers: dict | None = None) -> tuple[int, Any, dict]:
    return call(gw, "POST", "/api/kernels", {"name": name, "env": env or {}}, headers=headers)


def kernel_ids(gw: GatewayServer) -> set[str]:
    status, body, _ = call(gw, "GET", "/api/kernels")
    assert status == 200, body
    return {k["id"] for k in body}


def delete_all_kernels(gw: GatewayServer) -> None:
    for kid in kernel_ids(gw):
        call(gw, "DELETE", f"/api/kernels/{kid}")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process environment without any GATEWAY_*/EG_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "EG_"))}
    env.update(extra)
    return env
