"""What the Kubernetes test cluster runs, prepared once per version: Debian packages, binaries, images.

* :func:`install_packages`: Debian's containerd, runc, CNI plugins, iptables, conntrack and gcc (for the
  pause binary), with apt when one is missing.
* :func:`build_binaries`: kube-apiserver, -controller-manager, -scheduler, kubelet, kube-proxy and kubectl
  from the ``k8s.io/kubernetes`` module (``tests/services/kubernetes/go/kubernetes/go.mod`` replaces its
  staging modules by the published ``k8s.io/* v0.<minor>.<patch>``), etcd from its module (``go/etcd``),
  crictl and helm with ``go install``, into ``${KGW_CACHE_DIR:-/var/cache/kgw}/kubernetes-<version>/bin``.
  A binary there is reused; the Go module and build caches sit beside (``go/mod``, ``go/build``). From
  nothing ~12.5 minutes on 2 cores: the API server ~5 (with the module downloads), helm ~3, crictl ~1.
* :func:`pause_image` and :func:`kernel_image`: image tarballs in ``docker save`` layout under
  ``.../kubernetes-<version>/images``, named by what they are built from. The pause image is a static C
  binary; the kernel image is the project's own (``launchers/images/python/Dockerfile``, built by
  :func:`tests.services.docker_engine.build_images`), saved from Docker under a fully qualified,
  non-``latest`` name (``localhost/kgw/kernel-python:<inputs hash>``) that containerd cannot mistake for
  one to pull.
* :func:`spark_image`: the Spark kernel image (``launchers/images/spark/Dockerfile``: the kernel image plus
  Debian's Java 17 JRE and the pyspark the gateway's Python has, installed from the host's pip cache when
  its wheel is there), built only when a Spark test asks for it, saved as ``localhost/kgw/kernel-spark:<hash>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from .apt import install_missing
from .docker_engine import HASH_LABEL, REPO, _file_lock, build_image, build_images, ensure_docker, image_label, inputs_hash

K8S_VERSION = "1.34.4"
ETCD_VERSION = "3.6.4"  # the go.etcd.io/etcd/* that k8s.io/kubernetes v1.34.4 requires
CRICTL_VERSION = "1.34.0"
HELM_VERSION = "3.21.4"
SERVICE_DIR = Path(__file__).resolve().parent / "kubernetes"
K8S_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl")
APT_PACKAGES = ("containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "gcc", "libc6-dev")
PAUSE_IMAGE = "localhost/kgw/pause:3.10"
KERNEL_REPOSITORY = "localhost/kgw/kernel-python"
GATEWAY_REPOSITORY = "localhost/kgw/gateway"
SPARK_REPOSITORY = "localhost/kgw/kernel-spark"
SPARK_TAG = "kgw-kernel-spark:dev"
SPARK_INPUTS = ("launchers/images/spark/Dockerfile", "launchers/images/spark/spark-entrypoint.sh")


def log(message: str) -> None:
    print(f"[k8s {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    return Path(os.environ.get("KGW_CACHE_DIR") or "/var/cache/kgw")


def cache_dir() -> Path:
    return cache_root() / f"kubernetes-{K8S_VERSION}"


def bin_dir() -> Path:
    return cache_dir() / "bin"


def _run(cmd: list[str], timeout: float, what: str, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)
    if proc.returncode:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


# ------------------------------------------------------------------------------------------ packages

def install_packages(timeout: float = 900.0) -> None:
    """apt-get install what the node needs, when something is missing."""
    install_missing(APT_PACKAGES, timeout, log)


# ------------------------------------------------------------------------------------------ binaries

def _go_env() -> dict[str, str]:
    go = cache_root() / "go"
    return dict(os.environ, GOMODCACHE=str(go / "mod"), GOCACHE=str(go / "build"), CGO_ENABLED="0",
                GOFLAGS="-buildvcs=false", GOTOOLCHAIN="local")


def _version_ldflags() -> str:
    """The version stamps: without them every binary reports v0.0.0-master."""
    minor = K8S_VERSION.split(".")[1]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.{key}={value}" for key, value in (
            ("gitVersion", f"v{K8S_VERSION}"), ("gitMajor", "1"), ("gitMinor", minor),
            ("gitTreeState", "clean"), ("buildDate", "1970-01-01T00:00:00Z"))]
    return " ".join(flags)


def _go(name: str, argv: list[str], cwd: Path, timeout: float, gobin: Path | None = None) -> None:
    """Run ``go <argv>`` (it writes binary ``name`` into the staging directory) and log how long it took."""
    started = time.monotonic()
    env = _go_env()
    if gobin is not None:
        env["GOBIN"] = str(gobin)
    _run(["go", *argv], timeout, f"building {name}", cwd=cwd, env=env)
    log(f"built {name} in {time.monotonic() - started:.0f}s")


def build_binaries(timeout: float = 3600.0) -> Path:
    """The directory holding every binary of the cluster (and helm), building what is missing."""
    if shutil.which("go") is None:
        raise FileNotFoundError("building the Kubernetes test cluster needs the Go toolchain (go) on PATH")
    target = bin_dir()
    wanted = [*K8S_COMMANDS, "etcd", "crictl", "helm"]
    if all((target / b).is_file() for b in wanted):
        return target
    with _file_lock("kgw-k8s-build.lock", timeout=timeout):
        target.mkdir(parents=True, exist_ok=True)
        staging = target.with_name("bin.partial")
        staging.mkdir(exist_ok=True)
        started = time.monotonic()
        ld = _version_ldflags()
        for name in wanted:
            if (target / name).is_file():
                continue
            out = staging / name
            if name in K8S_COMMANDS:
                _go(name, ["build", "-trimpath", "-ldflags", ld, "-o", str(out), f"k8s.io/kubernetes/cmd/{name}"],
                    SERVICE_DIR / "go" / "kubernetes", timeout)
            elif name == "etcd":
                _go(name, ["build", "-trimpath", "-ldflags", "-s -w", "-o", str(out), "go.etcd.io/etcd/server/v3"],
                    SERVICE_DIR / "go" / "etcd", timeout)
            else:  # plain modules without replace directives: go install at a version
                pkg, version, stamp = {
                    "crictl": ("sigs.k8s.io/cri-tools/cmd/crictl", CRICTL_VERSION,
                               f"sigs.k8s.io/cri-tools/pkg/version.Version={CRICTL_VERSION}"),
                    "helm": ("helm.sh/helm/v3/cmd/helm", HELM_VERSION,
                             f"helm.sh/helm/v3/internal/version.version=v{HELM_VERSION}"),
                }[name]
                _go(name, ["install", "-trimpath", "-ldflags", f"-s -w -X {stamp}", f"{pkg}@v{version}"],
                    staging, timeout, gobin=staging)
            out.rename(target / name)  # only complete binaries ever appear in bin/
        shutil.rmtree(staging, ignore_errors=True)
        log(f"binaries ready in {target} ({time.monotonic() - started:.0f}s)")
    return target


# ------------------------------------------------------------------------------------------ images

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def pause_image(timeout: float = 300.0) -> tuple[str, Path]:
    """(name, tarball) of the pod sandbox image: a static ``pause`` (``kubernetes/pause.c``) alone."""
    source = SERVICE_DIR / "pause.c"
    key = hashlib.sha256(source.read_bytes() + PAUSE_IMAGE.encode()).hexdigest()[:12]
    tarball = cache_dir() / "images" / f"pause-{key}.tar"
    with _file_lock("kgw-k8s-images.lock", timeout=timeout):
        if tarball.is_file():
            return PAUSE_IMAGE, tarball
        tarball.parent.mkdir(parents=True, exist_ok=True)
        binary = tarball.with_suffix(".bin")
        _run(["gcc", "-Os", "-static", "-s", "-o", str(binary), str(source)], timeout, "compiling pause.c")
        layer = io.BytesIO()
        with tarfile.open(fileobj=layer, mode="w") as fs:
            fs.add(binary, arcname="pause", filter=lambda i: _owned_by_root(i, 0o755))
        binary.unlink()
        diff_id = hashlib.sha256(layer.getvalue()).hexdigest()
        config = json.dumps({"architecture": "amd64", "os": "linux", "created": "1970-01-01T00:00:00Z",
                             "config": {"Entrypoint": ["/pause"], "WorkingDir": "/"},
                             "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]}}).encode()
        config_name = hashlib.sha256(config).hexdigest() + ".json"
        manifest = [{"Config": config_name, "RepoTags": [PAUSE_IMAGE], "Layers": [f"{diff_id}/layer.tar"]}]
        partial = tarball.with_suffix(".partial")
        with tarfile.open(partial, "w") as tar:
            _add(tar, f"{diff_id}/layer.tar", layer.getvalue())
            _add(tar, config_name, config)
            _add(tar, "manifest.json", json.dumps(manifest).encode())
        partial.rename(tarball)
        log(f"pause image {PAUSE_IMAGE}: {tarball}")
    return PAUSE_IMAGE, tarball


def _owned_by_root(info: tarfile.TarInfo, mode: int) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mode, info.mtime = mode, 0
    return info


def kernel_image(timeout: float = 3600.0) -> tuple[str, Path]:
    """(name, tarball) of the project's Python kernel image, built with the Docker tests' builder (a no-op
    when Docker has it) and saved as ``localhost/kgw/kernel-python:<inputs hash>``."""
    return saved_image(build_images(ensure_docker())["kernel"], KERNEL_REPOSITORY, "kernel-python", timeout)


def gateway_image(timeout: float = 3600.0) -> tuple[str, Path]:
    """(name, tarball) of the project's gateway image (the root ``Dockerfile``), as :func:`kernel_image` does
    for the kernel image; for the Helm chart's tests."""
    return saved_image(build_images(ensure_docker())["gateway"], GATEWAY_REPOSITORY, "gateway", timeout)


def pyspark_wheel(wanted: str) -> Path | None:
    """pyspark ``wanted``'s wheel in this host's pip cache (where pip keeps the wheels it built), if there."""
    cache = Path(os.environ.get("PIP_CACHE_DIR") or Path.home() / ".cache" / "pip") / "wheels"
    return next(iter(sorted(cache.glob(f"**/pyspark-{wanted}-*.whl"))), None)


def spark_image(timeout: float = 3600.0) -> tuple[str, Path]:
    """(name, tarball) of the Spark kernel image: ``launchers/images/spark/Dockerfile`` FROM :func:`kernel_image`'s
    Docker image with the pyspark version installed here, built (once per inputs hash) from a context holding
    pyspark's wheel from the pip cache when it is there, and saved as ``localhost/kgw/kernel-spark:<hash>``."""
    client = ensure_docker()
    kernel = build_images(client)["kernel"]
    pyspark = version("pyspark")
    digest = inputs_hash(SPARK_INPUTS, extra=f"{client.images.get(kernel).id} pyspark=={pyspark}")
    with _file_lock("kgw-docker-build.lock", timeout=timeout):
        if image_label(client, SPARK_TAG) != digest:
            with tempfile.TemporaryDirectory(prefix="kgw-spark-image-") as tmp:
                context = Path(tmp)
                (context / "wheels").mkdir()
                for rel in SPARK_INPUTS:
                    shutil.copy2(REPO / rel, context)
                wheel = pyspark_wheel(pyspark)
                if wheel is not None:  # a hard link when it can be: the wheel is ~460 MB
                    try:
                        os.link(wheel, context / "wheels" / wheel.name)
                    except OSError:
                        shutil.copy2(wheel, context / "wheels")
                log(f"building {SPARK_TAG} (pyspark {pyspark} from {wheel or 'PyPI'})")
                build_image(client, SPARK_TAG, context, "Dockerfile", digest, timeout=timeout,
                            buildargs={"KERNEL_IMAGE": kernel, "PYSPARK_VERSION": pyspark})
    return saved_image(SPARK_TAG, SPARK_REPOSITORY, "kernel-spark", timeout)


def saved_image(tag: str, repository: str, prefix: str, timeout: float = 600.0) -> tuple[str, Path]:
    """(name, tarball) of Docker image ``tag`` saved as ``<repository>:<inputs hash[:12]>`` (from its
    :data:`HASH_LABEL`); the tarball is ``<cache>/images/<prefix>-<hash>.tar``, written once per hash."""
    client = ensure_docker()
    digest = client.images.get(tag).labels[HASH_LABEL][:12]  # build_images labels every image it builds
    name = f"{repository}:{digest}"
    tarball = cache_dir() / "images" / f"{prefix}-{digest}.tar"
    with _file_lock("kgw-k8s-images.lock", timeout=timeout):
        if tarball.is_file():
            return name, tarball
        tarball.parent.mkdir(parents=True, exist_ok=True)
        for old in tarball.parent.glob(f"{prefix}-*.tar"):  # earlier inputs: never used again
            old.unlink()
        started = time.monotonic()
        partial = tarball.with_suffix(".partial")
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        try:
            _rename_saved(save.stdout, partial, name)
        finally:
            save.stdout.close()
            if save.wait(timeout) != 0:
                partial.unlink(missing_ok=True)
                raise RuntimeError(f"docker save {tag} failed ({save.returncode})")
        partial.rename(tarball)
        log(f"image {name} saved from {tag} in {time.monotonic() - started:.0f}s "
            f"({tarball.stat().st_size / 1e6:.0f} MB)")
    return name, tarball


def _rename_saved(stream, out: Path, name: str) -> None:
    """Copy a ``docker save`` stream to ``out`` with ``name`` as the image's only tag."""
    with tarfile.open(fileobj=stream, mode="r|") as src, tarfile.open(out, "w") as dst:
        for member in src:
            if member.name == "manifest.json":
                manifest = json.load(src.extractfile(member))
                manifest[0]["RepoTags"] = [name]
                _add(dst, "manifest.json", json.dumps(manifest).encode())
            elif member.name == "repositories":
                continue  # the legacy name index: the manifest's RepoTags are what containerd reads
            else:
                dst.addfile(member, src.extractfile(member) if member.isfile() else None)
