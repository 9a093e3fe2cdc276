"""Checks run inside a kernel through the gateway, shared by the remote-kernel suites (Docker, YARN)."""

from __future__ import annotations

from .client import call
from .gateway import wait_until

__all__ = ["LISTENING_PORTS", "interrupt_busy_loop"]

# the TCP ports this kernel process listens on: its socket inodes matched against the LISTEN rows
LISTENING_PORTS = """
import os, re
inodes = set()
for fd in os.listdir("/proc/self/fd"):
    try:
        match = re.match(r"socket:\\[(\\d+)\\]", os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        continue
    if match:
        inodes.add(match.group(1))
ports = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        rows = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for row in rows:
        fields = row.split()
        if fields[3] == "0A" and fields[9] in inodes:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
print(sorted(ports))
"""


def interrupt_busy_loop(gw, ws, kid):
    msg_id = ws.execute("while True:\n    pass")
    wait_until(lambda: call(gw, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "busy", 60, what="busy")
    assert call(gw, "POST", f"/api/kernels/{kid}/interrupt")[0] == 204
    assert any(m["msg_type"] == "error" and m["content"]["ename"] == "KeyboardInterrupt"
               for m in ws.collect(msg_id, timeout=20))
