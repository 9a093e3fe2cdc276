"""Host plumbing of the Kubernetes test cluster: its addresses and iptables rules, and removing all it left.

Everything here is ours by name (the :data:`BRIDGE`, ``KUBE-*`` and ``CNI-*`` chains, the node IP on ``lo``,
mounts under the cluster's directories, the ``kubepods`` cgroups); Docker's chains and rules are never
touched. Docker sets the FORWARD policy to DROP, and with ``bridge-nf-call-iptables`` pod-to-pod frames on
our bridge traverse FORWARD: :func:`add_rules` accepts them explicitly, and drops anything from the bridge
that would leave it, so pods reach each other and this host, never the outside through it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

NODE_IP = "10.250.0.1"          # on lo as a /32: no dummy netdev here, and the advertise address may not be 127/8
POD_CIDR = "10.244.0.0/24"      # on the bridge; no masquerade
SERVICE_CIDR = "10.96.0.0/24"   # kube-proxy DNATs the known ones, the rest are rejected
API_SERVICE_IP = "10.96.0.1"
BRIDGE = "kgw-k8s-br0"

#: (table, chain, rule) we add; each is checked (-C) before it is inserted and removed (-D) at the end
RULES = (
    ("filter", "FORWARD", ["-i", BRIDGE, "!", "-o", BRIDGE, "-j", "DROP"]),
    ("filter", "FORWARD", ["-i", BRIDGE, "-o", BRIDGE, "-j", "ACCEPT"]),
    # a blackhole route would break host -> ClusterIP too (the route lookup happens before the DNAT)
    ("filter", "OUTPUT", ["-d", SERVICE_CIDR, "-j", "REJECT"]),
)


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def _iptables(*args: str) -> bool:
    # -w: wait for the xtables lock (dockerd, kube-proxy and other sessions change rules concurrently)
    return run("iptables", "-w", "30", *args, check=False).returncode == 0


def add_rules() -> None:
    """The node IP on ``lo``, forwarding and bridge netfilter on, our FORWARD/OUTPUT rules in place."""
    if f" {NODE_IP}/32 " not in run("ip", "-o", "addr", "show", "dev", "lo").stdout:
        run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    run("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.bridge.bridge-nf-call-iptables=1")
    for table, chain, rule in RULES:
        if not _iptables("-t", table, "-C", chain, *rule):
            position = ["1"] if chain == "FORWARD" else []  # before Docker's, which may DROP
            if not _iptables("-t", table, "-I", chain, *position, *rule):
                raise RuntimeError(f"iptables -t {table} -I {chain} {' '.join(rule)} failed")


def remove_network(kube_proxy: Path | None) -> None:
    """Remove kube-proxy's and CNI's chains and the jumps to them, our rules, the bridge and the node IP.
    ip_forward and bridge netfilter stay on: Docker needs them too."""
    if kube_proxy is not None and kube_proxy.is_file():
        subprocess.run([str(kube_proxy), "--cleanup"], capture_output=True, timeout=60, check=False)
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            _remove_chains(tool, table)
    for table, chain, rule in RULES:
        while _iptables("-t", table, "-D", chain, *rule):
            pass  # (inserted twice if two sessions raced before the lock existed: remove every copy)
    run("ip", "link", "del", BRIDGE, check=False)
    run("ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo", check=False)


def _remove_chains(tool: str, table: str) -> None:
    listing = run(tool, "-w", "30", "-t", table, "-S", check=False).stdout.splitlines()
    ours = [line.split()[1] for line in listing
            if line.startswith("-N ") and line.split()[1].startswith(("KUBE-", "CNI-"))]
    if not ours:
        return
    for line in listing:  # jumps from other chains (built-in or Docker's) into ours first
        parts = line.split()
        if parts[:1] == ["-A"] and parts[1] not in ours and "-j" in parts and parts[parts.index("-j") + 1] in ours:
            run(tool, "-w", "30", "-t", table, "-D", *parts[1:], check=False)
    for flag in ("-F", "-X"):
        for chain in ours:
            run(tool, "-w", "30", "-t", table, flag, chain, check=False)


def unmount_under(*roots: Path) -> None:
    """Lazily unmount everything mounted under ``roots`` (volumes, rootfs, shm, netns), deepest first."""
    prefixes = tuple(str(root).rstrip("/") + "/" for root in roots)
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    for point in sorted({p for p in points if p.startswith(prefixes)}, key=len, reverse=True):
        run("umount", "-l", point, check=False)


def remove_cgroups() -> None:
    """Remove the kubelet's (empty) ``kubepods`` cgroup trees, children first, in every hierarchy."""
    root = Path("/sys/fs/cgroup")
    tops = [d / "kubepods" for d in root.iterdir() if (d / "kubepods").is_dir()] if root.is_dir() else []
    if (root / "kubepods").is_dir():  # cgroup v2: one hierarchy
        tops.append(root / "kubepods")
    for top in tops:
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda entry: len(entry[0]), reverse=True):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)


def pids_mentioning(*needles: str) -> list[int]:
    """Processes (not this one) whose command line contains one of ``needles`` (our paths)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if any(needle in cmdline for needle in needles):
                    found.append(int(entry.name))
    return found
