"""Host plumbing for the YARN test cluster: the namespace of node 2, port checks and process sweeps.

Linux only, run as root for the namespace (``ip netns``); processes are found through ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .docker_engine import _file_lock
from .gateway import wait_until

NETNS, VETH_HOST, VETH_NS = "kgw-yarn", "kgwyh", "kgwyn"
NETNS_LOCK = "kgw-yarn-netns.lock"  # held by the cluster using the namespace, for its lifetime
HOST_IP, NS_IP = "10.198.7.1", "10.198.7.2"  # not the recipe's 10.199.7.0/24: both may run


def log(message: str) -> None:
    print(f"[yarn {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (``kill(pid, 0)`` succeeds on zombies)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def send_signal(pid: int, sig: int, group: bool = False) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig) if group else os.kill(pid, sig)


def process_cwds() -> list[tuple[int, str]]:
    """(pid, working directory + "/") of every process we may inspect, except this one."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                found.append((int(entry.name), os.readlink(entry / "cwd") + "/"))
    return found


def sweep(run_dir: Path, netns: str | None, timeout: float = 20) -> None:
    """SIGKILL every process left under ``run_dir``: container groups (their leaders' pids are in
    ``nmPrivate/<app>/<container>/<container>.pid``; a SIGKILLed NM leaves them running) and anything
    else whose working directory is there, e.g. a child that left its group. Then delete ``netns``."""
    root = str(run_dir) + "/"

    def leftovers() -> list[int]:
        return [pid for pid, cwd in process_cwds() if cwd.startswith(root)]

    for pid_file in run_dir.glob("nm*/local/nmPrivate/*/*/*.pid"):
        with contextlib.suppress(OSError, ValueError):
            send_signal(int(pid_file.read_text().strip()), signal.SIGKILL, group=True)

    def gone() -> bool:
        pids = [p for p in leftovers() if alive(p)]
        for pid in pids:
            send_signal(pid, signal.SIGKILL)
        return not pids

    try:
        wait_until(gone, timeout, 0.2, what=f"processes under {run_dir} to exit")
    except TimeoutError:
        log(f"processes still running under {run_dir}: {leftovers()}")
    if netns:
        delete_netns(netns)


def delete_netns(name: str) -> None:
    """SIGKILL what runs in namespace ``name``, delete it and our veth pair (either may be missing)."""
    run("ip", "link", "del", VETH_HOST, check=False)
    if name not in run("ip", "netns", "list", check=False).stdout.split():
        return
    for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
        send_signal(int(pid), signal.SIGKILL)
    run("ip", "netns", "del", name, check=False)


def claim_netns(stack: contextlib.ExitStack, required: bool) -> bool:
    """Take the namespace for node 2: hold its lock in ``stack`` (another running cluster may have it),
    replace a namespace left by a crashed session, set it up. False: use loopback (or raise, if ``required``)."""
    try:
        stack.enter_context(_file_lock(NETNS_LOCK, timeout=0))
    except TimeoutError:
        if required:
            raise RuntimeError(f"the network namespace {NETNS} belongs to another running test cluster") from None
        log(f"{NETNS} belongs to another running cluster: both NodeManagers on loopback")
        return False
    delete_netns(NETNS)
    return setup_netns(required)


def delete_free_netns() -> None:
    """Delete the namespace unless a running cluster holds it (after stopping a cluster this process did not start)."""
    with contextlib.suppress(TimeoutError), _file_lock(NETNS_LOCK, timeout=0):
        delete_netns(NETNS)


def setup_netns(required: bool) -> bool:
    """A namespace for node 2, linked to this one by a veth pair; False (or raise, if ``required``) when
    namespaces do not work here."""
    steps = [("ip", "netns", "add", NETNS),
             ("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS),
             ("ip", "link", "set", VETH_NS, "netns", NETNS),
             ("ip", "addr", "add", f"{HOST_IP}/24", "dev", VETH_HOST),
             ("ip", "link", "set", VETH_HOST, "up"),
             ("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NS_IP}/24", "dev", VETH_NS),
             ("ip", "netns", "exec", NETNS, "ip", "link", "set", VETH_NS, "up"),
             ("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")]
    try:
        for step in steps:
            run(*step)
        return True
    except (OSError, subprocess.SubprocessError) as exc:
        delete_netns(NETNS)
        reason = getattr(exc, "stderr", None) or exc
        if required:
            raise RuntimeError(f"cannot create the network namespace {NETNS}: {reason}") from exc
        log(f"no network namespace for node 2 ({str(reason).strip()}): both NodeManagers on loopback")
        return False


def check_ports(host: str, ports: list[int]) -> None:
    """Raise ``RuntimeError`` naming the holder when one of ``ports`` cannot be bound on ``host``."""
    for port in ports:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons do
            try:
                sock.bind((host, port))
            except OSError as exc:
                holder = run("ss", "-ltnpH", f"sport = :{port}", check=False).stdout.strip()
                raise RuntimeError(f"port {host}:{port} of the YARN test cluster is taken ({exc}): {holder}") from None


