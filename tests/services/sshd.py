"""Real SSH hosts for the tests: network namespaces, each with a veth link and Debian's sshd.

Each host ``kgw-hN`` gets address 10.231.N.2, with the host side of its link at 10.231.N.1 (where
the gateway's response listener is reachable). Keys, configs and logs live in a temporary
directory; teardown kills everything started inside the namespaces and deletes them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .gateway import wait_until

PREFIX = "kgw-h"


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def ensure_openssh() -> None:
    """Install Debian's openssh-server if it is missing (CI machines start without it)."""
    if shutil.which("sshd") or os.path.exists("/usr/sbin/sshd"):
        return
    _run("apt-get", "update", "-qq")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-qq", "openssh-server"], check=True, env=env, capture_output=True)


@dataclass
class SSHHost:
    """One namespace running sshd."""

    name: str
    address: str
    gateway_side: str
    sshd: subprocess.Popen | None = None

    def exec(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a command inside this host's namespace."""
        return _run("ip", "netns", "exec", self.name, *cmd, check=check)

    def listening_ports(self) -> dict[int, str]:
        """TCP ports listening in the namespace -> the process holding each."""
        out = self.exec("ss", "-ltnpH").stdout
        ports: dict[int, str] = {}
        for line in out.splitlines():
            fields = line.split()
            port = int(fields[3].rsplit(":", 1)[1])
            ports[port] = fields[-1] if len(fields) > 5 else ""
        return ports

    def pids(self) -> list[int]:
        out = _run("ip", "netns", "pids", self.name, check=False).stdout
        return [int(p) for p in out.split()]


@dataclass
class SSHCluster:
    """The hosts, the client key and the known_hosts file the gateway needs."""

    hosts: list[SSHHost]
    key_file: Path
    known_hosts: Path
    workdir: Path
    extra: dict = field(default_factory=dict)

    def launcher_pids(self, host: SSHHost) -> list[int]:
        """Pids in ``host`` whose command line runs our launcher."""
        found = []
        for pid in host.pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"launch_ipykernel.py" in cmdline:
                found.append(pid)
        return found

    def stop(self) -> None:
        for host in self.hosts:
            for pid in host.pids():
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
            _run("ip", "netns", "del", host.name, check=False)
        group = self.extra.get("cgroup")
        if group is not None:
            try:
                group.rmdir()
            except OSError:
                pass


def cleanup_stale() -> None:
    for line in _run("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            for pid in _run("ip", "netns", "pids", name, check=False).stdout.split():
                subprocess.run(["kill", "-9", pid], capture_output=True)
            _run("ip", "netns", "del", name, check=False)


def limit_cpu(name: str, cpus: float, pids: list[int]) -> Path | None:
    """Put ``pids`` (and their future children) in a cgroup allowed ``cpus`` CPUs; None where cgroups are unavailable."""
    v1 = Path("/sys/fs/cgroup/cpu")
    group = (v1 if v1.is_dir() else Path("/sys/fs/cgroup")) / name
    try:
        group.mkdir(exist_ok=True)
        if v1.is_dir():
            (group / "cpu.cfs_period_us").write_text("100000")
            (group / "cpu.cfs_quota_us").write_text(str(int(cpus * 100000)))
        else:
            (group / "cpu.max").write_text(f"{int(cpus * 100000)} 100000")
        for pid in pids:
            (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        print(f"sshd: cannot limit the hosts' CPU ({exc}); they share every core with the gateway")
        return None
    return group


def start_cluster(workdir: Path, count: int = 2, niceness: int = 0, cpus: float = 0.0) -> SSHCluster:
    """Create ``count`` namespaces with sshd on port 22 and return how to reach them.

    ``niceness`` and ``cpus`` (a CPU quota for all hosts together) constrain sshd and every kernel it
    starts: benchmarks use them so that the "other hosts", which share this machine's CPUs, leave the
    gateway the CPU that real other machines would.
    """
    ensure_openssh()
    cleanup_stale()
    workdir.mkdir(parents=True, exist_ok=True)
    os.makedirs("/run/sshd", exist_ok=True)
    key_file = workdir / "client_key"
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file))
    authorized = workdir / "authorized_keys"
    authorized.write_text((workdir / "client_key.pub").read_text())
    authorized.chmod(0o600)
    known_hosts = workdir / "known_hosts"
    hosts: list[SSHHost] = []
    lines = []
    cluster = SSHCluster(hosts, key_file, known_hosts, workdir)
    try:
        for index in range(1, count + 1):
            name = f"{PREFIX}{index}"
            host = SSHHost(name, f"10.231.{index}.2", f"10.231.{index}.1")
            hosts.append(host)
            outer, inner = f"kgwv{index}h", f"kgwv{index}n"
            _run("ip", "netns", "add", name)
            _run("ip", "link", "del", outer, check=False)
            _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            _run("ip", "link", "set", inner, "netns", name)
            _run("ip", "addr", "add", f"{host.gateway_side}/24", "dev", outer)
            _run("ip", "link", "set", outer, "up")
            host.exec("ip", "addr", "add", f"{host.address}/24", "dev", inner)
            host.exec("ip", "link", "set", inner, "up")
            host.exec("ip", "link", "set", "lo", "up")
            host.exec("ip", "route", "add", "default", "via", host.gateway_side)
            host_key = workdir / f"{name}_host_key"
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
            config = workdir / f"{name}_sshd_config"
            config.write_text(
                f"Port 22\nListenAddress {host.address}\nHostKey {host_key}\n"
                f"AuthorizedKeysFile {authorized}\nPidFile {workdir / (name + '.pid')}\n"
                "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\nStrictModes no\nMaxSessions 100\nMaxStartups 100:30:200\nLogLevel VERBOSE\n"
            )
            log = open(workdir / f"{name}_sshd.log", "wb")
            host.sshd = subprocess.Popen(
                ["nice", "-n", str(niceness), "ip", "netns", "exec", name, "/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                stdout=log, stderr=subprocess.STDOUT,
            )
            public = (workdir / f"{name}_host_key.pub").read_text().split()
            lines.append(f"{host.address} {public[0]} {public[1]}")
        known_hosts.write_text("\n".join(lines) + "\n")
        if cpus:
            cluster.extra["cgroup"] = limit_cpu(f"{PREFIX}hosts", cpus, [h.sshd.pid for h in hosts if h.sshd])
        for host in hosts:
            wait_until(lambda h=host: 22 in h.listening_ports(), 20, what=f"sshd in {host.name}")
    except Exception:
        cluster.stop()
        raise
    return cluster

