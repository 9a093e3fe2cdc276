"""A real Docker engine for the tests and our images, built without any image registry.

* :func:`ensure_docker` installs Debian's ``docker.io`` when ``dockerd`` is missing, starts ``dockerd``
  in the background when ``/var/run/docker.sock`` does not answer (log: ``/tmp/kgw-dockerd.log``),
  waits with a deadline until ``docker info`` works, and returns a docker SDK client. Idempotent;
  several pytest processes may call it at once (an exclusive ``flock`` serialises the start).
* :func:`ensure_swarm` makes this engine a single-node Swarm manager (``--advertise-addr 127.0.0.1``).
* :func:`build_images` builds, once, the base image (``tests/services/base_image.sh``: debootstrap,
  no registry), the Python kernel image (``launchers/images/python/Dockerfile``) and the gateway image
  (``Dockerfile``). The Dockerfiles default to the official ``python:3.11-slim-bookworm``; the tests
  pass the local base instead (``--build-arg BASE=kgw-base:bookworm``), which offers what that image
  offers. Each image carries the label :data:`HASH_LABEL`, a hash of its inputs; an image
  whose label matches is not rebuilt. Builds use the host network (``--network host``), so the
  containers' ``pip`` reaches PyPI exactly as the host does.

Run directly to prepare everything and print the tags::

    .venv/bin/python -m tests.services.docker_engine [--swarm] [--force]
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOCKET = "/var/run/docker.sock"
DOCKERD_LOG = Path("/tmp/kgw-dockerd.log")
LOCK_DIR = Path("/tmp")
BASE_SCRIPT = REPO / "tests" / "services" / "base_image.sh"

BASE_TAG = "kgw-base:bookworm"
KERNEL_TAG = "kgw-kernel-python:dev"
GATEWAY_TAG = "kgw-gateway:dev"
#: Label on every image we build: sha256 of the inputs it was built from.
HASH_LABEL = "kernel_gateway.inputs-hash"
#: Label on every container the tests start, so a crashed run's leftovers can be found and removed.
TEST_LABEL = "kernel_gateway.test"

#: What the gateway wheel is built from (the Dockerfile's COPY lines); hashed to decide rebuilds.
GATEWAY_INPUTS = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md",
                  "kernel_gateway", "provisioners", "launchers")
KERNEL_INPUTS = ("launchers/images/python/Dockerfile", "launchers/python/launch_ipykernel.py",
                 "launchers/bootstrap-kernel.sh")


def log(message: str) -> None:
    print(f"[docker {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- engine

@contextlib.contextmanager
def _file_lock(name: str, timeout: float):
    """An exclusive flock on /tmp/<name>, shared by every process on this machine."""
    path = LOCK_DIR / name
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {timeout}s waiting for the lock {path}") from None
                time.sleep(0.2)  # polling a lock another process holds; the deadline bounds it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def socket_answers(path: str = SOCKET, timeout: float = 2.0) -> bool:
    """True when the engine's socket answers ``GET /_ping`` with 200."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return sock.recv(64).split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]
    except (OSError, IndexError):
        return False


def _docker_info_works() -> bool:
    try:
        return subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _dockerd_path() -> str | None:
    return shutil.which("dockerd") or next(
        (p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if os.path.exists(p)), None)


def _install_docker_io(timeout: float) -> None:
    log("dockerd is missing: installing Debian's docker.io")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "docker.io"]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode:
            output = proc.stdout[-2000:] + proc.stderr[-2000:]
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output}")


def _uplink_mtu() -> int | None:
    """MTU of the interface of the default route (this machine's is 1400: the bridge must not exceed it)."""
    try:
        out = subprocess.run(["ip", "-o", "route", "show", "default"], capture_output=True, text=True,
                             timeout=5).stdout.split()
        dev = out[out.index("dev") + 1]
        return int(Path(f"/sys/class/net/{dev}/mtu").read_text())
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _start_dockerd(timeout: float) -> None:
    dockerd = _dockerd_path()
    cmd = [dockerd, "--host", f"unix://{SOCKET}"]
    mtu = _uplink_mtu()
    if mtu and mtu < 1500:
        cmd += ["--mtu", str(mtu)]
    log(f"starting {' '.join(cmd)} (log: {DOCKERD_LOG})")
    with open(DOCKERD_LOG, "ab") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while not socket_answers():
        if proc.poll() is not None:
            raise RuntimeError(f"dockerd exited with {proc.returncode}; last log lines:\n{_log_tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"dockerd did not answer on {SOCKET} within {timeout}s; log:\n{_log_tail()}")
        time.sleep(0.2)
    log(f"dockerd answers (pid {proc.pid})")


def _log_tail(lines: int = 30) -> str:
    try:
        return "\n".join(DOCKERD_LOG.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_docker(timeout: float = 120.0, install_timeout: float = 600.0):
    """A docker SDK client for a running engine on this machine: installed and started as needed."""
    with _file_lock("kgw-dockerd.lock", timeout=install_timeout + timeout):
        if not socket_answers() and not _dockerd_path():
            _install_docker_io(install_timeout)
        if not socket_answers():  # (checked again: an init system may start the engine it installs)
            if os.path.exists(SOCKET):
                os.unlink(SOCKET)  # left by a dockerd that is gone
            _start_dockerd(timeout)
        deadline = time.monotonic() + timeout
        while not _docker_info_works():
            if time.monotonic() > deadline:
                raise TimeoutError(f"'docker info' does not work after {timeout}s; dockerd log:\n{_log_tail()}")
            time.sleep(0.5)
    import docker

    return docker.DockerClient(base_url=f"unix://{SOCKET}", version="auto", timeout=900)


def ensure_swarm(client=None) -> dict:
    """Make the engine a Swarm manager (``docker swarm init --advertise-addr 127.0.0.1``); its Swarm info."""
    client = client or ensure_docker()
    with _file_lock("kgw-swarm.lock", timeout=120):
        swarm = client.info().get("Swarm", {})
        state = swarm.get("LocalNodeState")
        if state == "active" and swarm.get("ControlAvailable"):
            return swarm
        if state not in ("inactive", None, ""):
            raise RuntimeError(f"the engine is in Swarm state {state!r} but not a manager; "
                               "'docker swarm leave --force' first")
        log("docker swarm init --advertise-addr 127.0.0.1")
        proc = subprocess.run(["docker", "swarm", "init", "--advertise-addr", "127.0.0.1"],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"docker swarm init failed: {proc.stderr.strip() or proc.stdout.strip()}")
        deadline = time.monotonic() + 60
        while True:
            swarm = client.info().get("Swarm", {})
            if swarm.get("LocalNodeState") == "active" and swarm.get("ControlAvailable"):
                return swarm
            if time.monotonic() > deadline:
                raise TimeoutError(f"swarm not active 60s after init: {swarm}")
            time.sleep(0.5)


# --------------------------------------------------------------------------------------------- images

def inputs_hash(paths, root: Path = REPO, extra: str = "") -> str:
    """sha256 over the files under ``paths`` (relative to ``root``; caches skipped) and ``extra``."""
    digest = hashlib.sha256(extra.encode())
    files: list[Path] = []
    for rel in paths:
        path = root / rel
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and not p.name.endswith((".pyc", ".pyo"))]
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(path)
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(f"{path.stat().st_mode & 0o111:o}".encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def image_label(client, tag: str) -> str | None:
    """The inputs-hash label of image ``tag``; None when there is no such image."""
    import docker

    try:
        return (client.images.get(tag).labels or {}).get(HASH_LABEL)
    except docker.errors.ImageNotFound:
        return None


def build_image(client, tag: str, context: Path, dockerfile: str, digest: str, *, buildargs=None,
                timeout: float = 1500.0, force: bool = False) -> str:
    """``docker build`` of ``context`` unless ``tag`` already carries ``digest``; returns the tag."""
    if not force and image_label(client, tag) == digest:
        log(f"{tag} is up to date ({digest[:12]})")
        return tag
    log(f"building {tag} from {dockerfile} ({digest[:12]})")
    previous = _image_id(client, tag)
    started = time.monotonic()
    stream = client.api.build(path=str(context), dockerfile=dockerfile, tag=tag, buildargs=buildargs or {},
                              labels={HASH_LABEL: digest}, network_mode="host", rm=True, forcerm=True,
                              pull=False, decode=True)
    tail: list[str] = []
    try:
        for chunk in stream:
            if "error" in chunk:
                raise RuntimeError(f"building {tag} failed: {chunk['error'].strip()}\n" + "".join(tail[-40:]))
            text = chunk.get("stream", "")
            if text:
                tail.append(text)
                if text.startswith("Step "):
                    log(f"{tag}: {text.strip()} ({time.monotonic() - started:.0f}s)")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"building {tag} took more than {timeout}s")
    finally:
        with contextlib.suppress(Exception):
            stream.close()  # a cancelled build stops on the engine when its client goes away
    if image_label(client, tag) != digest:
        raise RuntimeError(f"building {tag} ended without an image carrying {digest[:12]}:\n" + "".join(tail[-40:]))
    log(f"built {tag} in {time.monotonic() - started:.0f}s")
    if previous and previous != _image_id(client, tag):
        with contextlib.suppress(Exception):  # still used by a container or a child image: keep it
            client.images.remove(previous)
    return tag


def _image_id(client, tag: str) -> str | None:
    import docker

    try:
        return client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None


def build_base_image(client, tag: str = BASE_TAG, force: bool = False, timeout: float = 1200.0) -> str:
    """Run base_image.sh (debootstrap, cached under /var/cache/kgw; skips when the label matches)."""
    cmd = ["bash", str(BASE_SCRIPT)] + (["--force"] if force else []) + [tag]
    started = time.monotonic()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        log(f"base: {line}")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with {proc.returncode}")
    log(f"{tag} ready in {time.monotonic() - started:.0f}s")
    return tag


def build_images(client=None, force: bool = False) -> dict[str, str]:
    """Build (once) the base, Python kernel and gateway images; ``{"base", "kernel", "gateway"}`` -> tag."""
    client = client or ensure_docker()
    with _file_lock("kgw-docker-build.lock", timeout=3600):
        base = build_base_image(client, force=force)
        base_id = client.images.get(base).id
        kernel = build_image(client, KERNEL_TAG, REPO, "launchers/images/python/Dockerfile",
                             inputs_hash(KERNEL_INPUTS, extra=base_id), buildargs={"BASE": base}, force=force)
        gateway = build_image(client, GATEWAY_TAG, REPO, "Dockerfile",
                              inputs_hash(GATEWAY_INPUTS, extra=base_id), buildargs={"BASE": base}, force=force)
    return {"base": base, "kernel": kernel, "gateway": gateway}


def remove_test_containers(client, value: str | None = None) -> None:
    """Force-remove containers carrying :data:`TEST_LABEL` (with ``value``, only those)."""
    label = TEST_LABEL if value is None else f"{TEST_LABEL}={value}"
    for container in client.containers.list(all=True, filters={"label": label}):
        with contextlib.suppress(Exception):
            container.remove(force=True)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Start Docker and build the kernel-gateway images.")
    parser.add_argument("--swarm", action="store_true", help="also make this engine a Swarm manager")
    parser.add_argument("--force", action="store_true", help="rebuild even when the images are up to date")
    args = parser.parse_args(argv)
    client = ensure_docker()
    if args.swarm:
        ensure_swarm(client)
    for role, tag in build_images(client, force=args.force).items():
        image = client.images.get(tag)
        print(f"{role}\t{tag}\t{image.short_id}\t{image.attrs['Size'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
