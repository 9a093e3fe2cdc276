"""A real MIT Kerberos KDC for the tests: a realm in a work directory, served by ``krb5kdc`` on a loopback port.

* Debian's krb5-kdc, krb5-admin-server and krb5-user are installed by ``tests/services/install-krb5.sh`` when
  missing (the Makefile runs it too: pip builds ``gssapi`` against libkrb5-dev).
* :func:`start_kdc` writes ``kdc.conf`` and ``krb5.conf`` under the work directory, creates the database with a
  random master password (``kdb5_util create -s``), adds the principals with random keys (``kadmin.local``),
  writes one keytab per principal and runs ``krb5kdc -n`` in the foreground as a child process, on a port
  that was free on 127.0.0.1 (TCP only: clients get ``udp_preference_limit = 1``).
* Nothing system-wide changes: the tools get ``KRB5_CONFIG`` / ``KRB5_KDC_PROFILE`` (:attr:`KDC.env`); Java
  gets ``-Djava.security.krb5.conf`` (:attr:`KDC.java_opts`). :meth:`KDC.stop` ends the KDC.
* Host names are taken as written (``dns_canonicalize_hostname = false``, ``rdns = false``): a client of
  ``http://127.0.0.1:8088`` asks for ``HTTP/127.0.0.1@REALM``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .gateway import REPO, free_port, wait_until
from .yarn_host import log

SBIN = ("/usr/sbin", "/sbin", "/usr/bin")


def _find(name: str) -> str | None:
    """A Kerberos tool on PATH or in an sbin directory (not on a non-root user's PATH)."""
    return shutil.which(name) or next((f"{d}/{name}" for d in SBIN if os.path.exists(f"{d}/{name}")), None)


def _tool(name: str) -> str:
    found = _find(name)
    if found is None:
        raise FileNotFoundError(f"{name} is missing after tests/services/install-krb5.sh")
    return found


def ensure_installed(timeout: float = 600) -> None:
    """Install Debian's KDC and client tools unless krb5kdc, kadmin.local and kinit are there."""
    if all(_find(t) for t in ("krb5kdc", "kdb5_util", "kadmin.local", "kinit")):
        return
    proc = subprocess.run(["bash", str(REPO / "tests" / "services" / "install-krb5.sh")], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode:
        raise RuntimeError(f"install-krb5.sh failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


@dataclass
class KDC:
    """A running KDC: its realm, port, configuration files and the keytab of each principal it was given."""

    realm: str
    port: int
    workdir: Path
    keytabs: dict[str, Path] = field(default_factory=dict)  # principal (without realm) -> keytab
    proc: subprocess.Popen | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def krb5_conf(self) -> Path:
        return self.workdir / "krb5.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Kerberos clients and tools: this realm's configuration, not /etc/krb5.conf."""
        return {"KRB5_CONFIG": str(self.krb5_conf), "KRB5_KDC_PROFILE": str(self.workdir / "kdc.conf")}

    @property
    def java_opts(self) -> list[str]:
        return [f"-Djava.security.krb5.conf={self.krb5_conf}"]

    def principal(self, name: str) -> str:
        """``name@REALM`` (``name`` as given to :func:`start_kdc`)."""
        return f"{name}@{self.realm}"

    def kadmin(self, query: str) -> str:
        """Run one ``kadmin.local`` query against this realm's database; its output."""
        proc = subprocess.run([_tool("kadmin.local"), "-r", self.realm, "-q", query], capture_output=True,
                              text=True, timeout=60, env=dict(os.environ, **self.env), stdin=subprocess.DEVNULL)
        if proc.returncode or "error" in proc.stderr.lower():
            raise RuntimeError(f"kadmin.local -q {query.split()[0]} failed: {proc.stderr.strip()[-1000:]}")
        return proc.stdout

    def kinit(self, name: str, ccache: Path) -> Path:
        """Get a TGT for ``name`` from its keytab into the file credential cache ``ccache`` (what an operator's
        ``kinit`` leaves for the gateway in ``KRB5CCNAME``)."""
        proc = subprocess.run([_tool("kinit"), "-k", "-t", str(self.keytabs[name]), "-c", f"FILE:{ccache}",
                               self.principal(name)], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, **self.env), stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise RuntimeError(f"kinit {self.principal(name)} failed: {proc.stderr.strip()}")
        return ccache

    def ticket_times(self, name: str) -> list[int]:
        """When the KDC issued TGTs to ``name`` (distinct auth times in its log, epoch seconds, in order)."""
        pattern = re.compile(rf"ISSUE: authtime (\d+),.*, {re.escape(self.principal(name))} for krbtgt/")
        try:
            return sorted({int(t) for t in pattern.findall((self.workdir / "kdc.log").read_text(errors="replace"))})
        except OSError:
            return []

    def stop(self, timeout: float = 15) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _write_conf(kdc: KDC) -> None:
    data = kdc.workdir / "db"
    data.mkdir(parents=True, exist_ok=True)
    (data / "kadm5.acl").write_text("")
    (kdc.workdir / "kdc.conf").write_text(f"""[kdcdefaults]
    kdc_listen = 127.0.0.1:{kdc.port}
    kdc_tcp_listen = 127.0.0.1:{kdc.port}

[realms]
    {kdc.realm} = {{
        database_name = {data}/principal
        key_stash_file = {data}/stash
        acl_file = {data}/kadm5.acl
        kdc_listen = 127.0.0.1:{kdc.port}
        kdc_tcp_listen = 127.0.0.1:{kdc.port}
        max_life = 10h 0m 0s
        max_renewable_life = 7d 0h 0m 0s
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
    }}

[logging]
    kdc = FILE:{kdc.workdir}/kdc.log
    admin_server = FILE:{kdc.workdir}/kadmin.log
    default = FILE:{kdc.workdir}/krb5lib.log
""")
    kdc.krb5_conf.write_text(f"""[libdefaults]
    default_realm = {kdc.realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    ticket_lifetime = 10h
    renew_lifetime = 7d
    forwardable = true

[realms]
    {kdc.realm} = {{
        kdc = 127.0.0.1:{kdc.port}
    }}

[domain_realm]
    127.0.0.1 = {kdc.realm}
    localhost = {kdc.realm}
""")


def start_kdc(workdir: Path, principals: dict[str, str | None], realm: str = "KGW.TEST",
              timeout: float = 60) -> KDC:
    """Create ``realm`` under ``workdir`` with ``principals`` and start its KDC; return once it accepts connections.

    ``principals`` maps each principal name (without the realm) to the keytab file name it is exported to
    (principals sharing a name share the keytab, e.g. every ``HTTP/<host>`` in ``http.keytab``); None: no keytab.
    """
    ensure_installed()
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    kdc = KDC(realm, free_port(), workdir)  # TCP only; the KDC binds it a moment later
    _write_conf(kdc)
    env = dict(os.environ, **kdc.env)
    # the master password only encrypts the database; the stash file (-s) lets krb5kdc open it unattended
    create = subprocess.run([_tool("kdb5_util"), "create", "-s", "-r", realm, "-P", secrets.token_urlsafe(24)],
                            capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    if create.returncode:
        raise RuntimeError(f"kdb5_util create failed: {create.stderr.strip()[-1000:]}")
    for name, keytab in principals.items():
        kdc.kadmin(f"addprinc -randkey {kdc.principal(name)}")
        if keytab:
            kdc.keytabs[name] = workdir / keytab
            kdc.kadmin(f"ktadd -k {workdir / keytab} {kdc.principal(name)}")
    kdc.timings["realm"] = time.monotonic() - started
    with open(workdir / "krb5kdc.out", "wb") as out:
        kdc.proc = subprocess.Popen([_tool("krb5kdc"), "-n", "-r", realm], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)

    def listening() -> bool:
        if kdc.proc.poll() is not None:
            raise RuntimeError(f"krb5kdc exited with {kdc.proc.returncode}: "
                               + (workdir / "krb5kdc.out").read_text(errors="replace")[-2000:])
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", kdc.port)) == 0

    try:
        wait_until(listening, timeout, 0.05, what="krb5kdc to listen")
    except BaseException:
        kdc.stop()
        raise
    kdc.timings["start"] = time.monotonic() - started
    log(f"KDC for {realm} on 127.0.0.1:{kdc.port} in {kdc.timings['start']:.2f}s "
        f"({len(principals)} principals, realm created in {kdc.timings['realm']:.2f}s)")
    return kdc
