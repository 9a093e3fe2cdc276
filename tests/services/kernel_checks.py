"""Checks run inside a kernel through the gateway, shared by the remote-kernel suites (Docker, YARN)."""

from __future__ import annotations

from .client import call
from .gateway import wait_until

__all__ = ["LISTENING_PORTS", "LISTENING_PORTS_WITH_PARENT", "interrupt_busy_loop"]

# the TCP ports the processes PIDS listen on beyond loopback (which no network policy has to open, e.g. the
# py4j port between a Spark driver's JVM and Python): their socket inodes matched against the LISTEN rows
_LISTENING = """
import os, re
inodes = set()
for pid in PIDS:
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:  # a process that ended meanwhile, or not ours to read
        continue
    for fd in fds:
        try:
            match = re.match(r"socket:\\[(\\d+)\\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
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
        address, port = fields[1].rsplit(":", 1)
        loopback = address.endswith("7F") and (len(address) == 8 or address.startswith("0" * 16 + "FFFF0000")) \\
            or address == "0" * 24 + "01000000"  # 127/8, ::ffff:127/104, ::1
        if fields[3] == "0A" and fields[9] in inodes and not loopback:
            ports.add(int(port, 16))
print(sorted(ports))
"""
#: the ports this kernel process listens on
LISTENING_PORTS = _LISTENING.replace("PIDS", "[os.getpid()]")
#: the ports this kernel and its parent listen on (a Spark kernel's parent is the driver's JVM)
LISTENING_PORTS_WITH_PARENT = _LISTENING.replace("PIDS", "[os.getpid(), os.getppid()]")


def interrupt_busy_loop(gw, ws, kid):
    msg_id = ws.execute("while True:\n    pass")
    wait_until(lambda: call(gw, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "busy", 60, what="busy")
    assert call(gw, "POST", f"/api/kernels/{kid}/interrupt")[0] == 204
    assert any(m["msg_type"] == "error" and m["content"]["ename"] == "KeyboardInterrupt"
               for m in ws.collect(msg_id, timeout=20))
