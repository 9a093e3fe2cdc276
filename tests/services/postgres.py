"""A real PostgreSQL server for the tests: Debian's package, one throw-away cluster on a loopback port.

:func:`start_postgres` installs ``postgresql`` with apt when missing, runs ``initdb`` in a work directory
(trust authentication: it listens on 127.0.0.1 only and lives as long as the test session), starts
``postgres`` as the ``postgres`` user when we are root (it refuses to run as root), and waits until it
accepts connections. :meth:`PostgresServer.stop` shuts it down (fast mode) and :meth:`PostgresServer.start`
brings it back on the same port and data, for tests of a store that goes away and comes back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .apt import install_missing
from .gateway import free_port, wait_until

__all__ = ["PostgresServer", "start_postgres"]


def log(message: str) -> None:
    print(f"[postgres {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _bin_dir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        install_missing(["postgresql"], log=log)
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent


@dataclass
class PostgresServer:
    """One running server: its data directory, port and process."""

    workdir: Path
    port: int
    bin_dir: Path
    proc: subprocess.Popen | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"postgresql://kgw@127.0.0.1:{self.port}/kgw"

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv

    def answers(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def start(self, timeout: float = 60) -> None:
        started = time.monotonic()
        self.proc = subprocess.Popen(
            self._as_owner([str(self.bin_dir / "postgres"), "-D", str(self.workdir / "data"), "-p", str(self.port),
                            "-h", "127.0.0.1", "-k", str(self.workdir / "run")]),
            stdout=open(self.workdir / "postgres.log", "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        wait_until(lambda: self.proc.poll() is not None or self.answers(), timeout, 0.1, what="postgres to listen")
        if self.proc.poll() is not None:
            raise RuntimeError(f"postgres exited ({self.proc.returncode}):\n"
                               + (self.workdir / "postgres.log").read_text(errors="replace")[-3000:])
        self.timings["start"] = time.monotonic() - started

    def stop(self, timeout: float = 30) -> None:
        """Fast shutdown (SIGINT: no waiting for clients), then SIGKILL of the group if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def remove(self) -> None:
        """Stop the server and delete its files."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_postgres() -> PostgresServer:
    """A new cluster with a database and superuser ``kgw``, listening on 127.0.0.1, in a directory of its own
    under /tmp (the ``postgres`` user cannot enter pytest's root-only temp directories); ``remove()`` ends it."""
    started = time.monotonic()
    bin_dir = _bin_dir()
    workdir = Path(tempfile.mkdtemp(prefix="kgw-postgres-"))
    server = PostgresServer(workdir, free_port(), bin_dir)
    for sub in ("data", "run"):
        (workdir / sub).mkdir(mode=0o700)
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres")
        for sub in ("data", "run"):
            shutil.chown(workdir / sub, "postgres")
    subprocess.run(server._as_owner([str(bin_dir / "initdb"), "-D", str(workdir / "data"), "-U", "kgw",
                                     "--auth=trust", "-E", "UTF8", "--no-instructions"]),
                   check=True, capture_output=True, timeout=120)
    server.start()
    subprocess.run(server._as_owner([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "kgw",
                                     "kgw"]), check=True, capture_output=True, timeout=60)
    server.timings["setup"] = time.monotonic() - started
    log(f"PostgreSQL {bin_dir.parent.name} on 127.0.0.1:{server.port} in {server.timings['setup']:.1f}s")
    return server
