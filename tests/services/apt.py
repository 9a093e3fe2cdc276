"""Debian packages the test services need, installed with apt when missing (never started as system services)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence

__all__ = ["install_missing", "missing_packages"]


def missing_packages(packages: Sequence[str]) -> list[str]:
    """The packages of ``packages`` dpkg does not list as installed."""
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${db:Status-Status}\n", *packages],
                          capture_output=True, text=True, timeout=60)
    installed = {line.split()[0] for line in proc.stdout.splitlines() if line.endswith(" installed")}
    return [p for p in packages if p not in installed]


def install_missing(packages: Sequence[str], timeout: float = 900.0, log=print) -> None:
    """``apt-get install`` whichever of ``packages`` is missing; apt's own lock serialises concurrent sessions."""
    missing = missing_packages(packages)
    if not missing:
        return
    log(f"installing {' '.join(missing)} with apt")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    wait = ["-o", f"DPkg::Lock::Timeout={int(timeout)}"]  # another test session may be running apt
    for cmd in (["apt-get", *wait, "update", "-qq"],
                ["apt-get", *wait, "install", "-y", "-qq", "--no-install-recommends", *missing]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, env=env)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
