"""A real single-node Kubernetes cluster for the tests: etcd, the control plane and one node on this machine.

* :func:`start_cluster` prepares what it runs (:mod:`tests.services.kubernetes_build`: Debian packages,
  binaries of Kubernetes v1.34 / etcd 3.6 / helm 3.21 built once into
  ``${KGW_CACHE_DIR:-/var/cache/kgw}/kubernetes-<version>``, the pause image and the project's kernel
  image as tarballs), makes fresh certificates (:mod:`tests.services.kubernetes_pki`), writes the
  configuration (``tests/services/kubernetes/conf``, ``@NAME@`` filled in) under a work directory and
  starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd (its own socket, state
  and runc root, so Docker never uses it), kubelet and kube-proxy; it imports the images into
  containerd's ``k8s.io`` namespace (the store, ``/var/lib/kgw-k8s/containerd``, keeps them for the next
  session) and returns when the node is Ready and the ``default`` service account exists.
* Addresses (:mod:`tests.services.kubernetes_host`): API server ``https://127.0.0.1:6443`` (advertised as
  the node IP 10.250.0.1, on ``lo``), etcd ``127.0.0.1:2379``, pods 10.244.0.0/24 on bridge
  ``kgw-k8s-br0``, services 10.96.0.0/24 (kube-proxy, iptables mode). No DNS add-on, no registry: pods
  use images already imported, with ``imagePullPolicy: Never``.
* :meth:`KubernetesCluster.stop` stops the node first, removes every pod through the CRI, stops the
  control plane, and removes what is left: processes, mounts, iptables chains and rules, the bridge, the
  node IP, the ``kubepods`` cgroups, containerd's run state.
* The addresses are fixed: an ``flock`` held while a cluster lives serialises the sessions on this
  machine, and a cluster left by a crashed session (recorded in ``/tmp/kgw-k8s.json``) is stopped
  before the next one starts.

Also a command line (``tests/services/kubernetes/start-k8s.sh`` and ``stop-k8s.sh`` wrap it)::

    python3 -m tests.services.kubernetes_cluster start [--workdir DIR]
    python3 -m tests.services.kubernetes_cluster stop
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .docker_engine import _file_lock
from .gateway import wait_until
from .kubernetes_build import SERVICE_DIR, build_binaries, install_packages, kernel_image, log, pause_image
from .kubernetes_host import (API_SERVICE_IP, BRIDGE, NODE_IP, POD_CIDR, SERVICE_CIDR, add_rules, pids_mentioning,
                              remove_cgroups, remove_network, unmount_under)
from .kubernetes_pki import write_pki
from .yarn_host import alive, send_signal

API_PORT, ETCD_PORT = 6443, 2379
NODE_NAME = "kgw-test-node"
CONTAINERD_ROOT = Path("/var/lib/kgw-k8s/containerd")  # the image store: kept between sessions
RUN_STATE = Path("/run/kgw-k8s")                      # containerd's state and runc's root: removed on stop
CONTAINERD_SOCK = RUN_STATE / "containerd" / "containerd.sock"
STATE_FILE = Path("/tmp/kgw-k8s.json")
HOST_DIRS = tuple(map(Path, ("/var/lib/kubelet/device-plugins", "/var/lib/kubelet", "/var/lib/cni/results",
                             "/var/lib/cni")))
LOCK = "kgw-k8s.lock"
#: stop order: the node (whose pods are then removed through containerd), containerd, the control plane
STOP_ORDER = (("kube-proxy", "kubelet"), ("containerd", "kube-scheduler", "kube-controller-manager"),
              ("kube-apiserver",), ("etcd",))


@dataclass
class KubernetesCluster:
    """A running cluster: where its API server is, the admin kubeconfig, the images, how to stop it."""

    workdir: Path
    bin_dir: Path
    kernel_image: str = ""
    pause_image: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _lock: contextlib.ExitStack | None = None

    api_url = f"https://127.0.0.1:{API_PORT}"
    node_ip = NODE_IP
    node_name = NODE_NAME

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    @property
    def kubeconfig(self) -> str:
        """The admin (``system:masters``) kubeconfig, for kubectl, helm and the ``kubernetes`` client."""
        return str(self.pki / "admin.kubeconfig")

    @property
    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": self.kubeconfig}

    def api(self, path: str, timeout: float = 10, raw: bool = False):
        """``GET <api_url><path>`` as admin: the parsed JSON (``raw``: the bytes); ``OSError`` on failure
        (``urllib.error.HTTPError`` for a status other than 2xx)."""
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        context.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        with urllib.request.urlopen(self.api_url + path, timeout=timeout, context=context) as resp:
            body = resp.read()
        return body if raw else json.loads(body)

    def crictl(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
        sock = f"unix://{CONTAINERD_SOCK}"
        return subprocess.run([str(self.bin_dir / "crictl"), "-r", sock, "-i", sock, "-t", "60s", *args],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def import_image(self, name: str, tarball: Path, timeout: float = 600.0) -> str:
        """Import image ``name`` from ``tarball`` (``docker save`` layout) into containerd's ``k8s.io``
        namespace unless it is there, removing the other tags of its repository; returns ``name``."""
        ctr = ["ctr", "-a", str(CONTAINERD_SOCK), "-n", "k8s.io", "images"]
        present = subprocess.run([*ctr, "ls", "-q"], capture_output=True, text=True, timeout=60,
                                 check=True).stdout.split()
        repository = name.rsplit(":", 1)[0]
        for old in present:
            if old != name and old.rsplit(":", 1)[0] == repository:  # earlier inputs: never used again
                subprocess.run([*ctr, "rm", old], capture_output=True, timeout=60)
        if name not in present:
            started = time.monotonic()
            proc = subprocess.run([*ctr, "import", str(tarball)], capture_output=True, text=True, timeout=timeout)
            if proc.returncode:
                raise RuntimeError(f"ctr images import {tarball} failed: {(proc.stdout + proc.stderr)[-2000:]}")
            log(f"imported {name} into containerd ({time.monotonic() - started:.0f}s)")
        return name

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.workdir / "log" / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is not None:
            return proc.poll() is None
        return name in self.pids and alive(self.pids[name])

    def stop(self, timeout: float = 30) -> None:
        """Stop the daemons (SIGTERM, SIGKILL after ``timeout``), remove the pods, mounts, rules and bridge."""
        started = time.monotonic()
        for group in STOP_ORDER:
            for name in group:
                if self.running(name):
                    send_signal(self.pids[name], signal.SIGTERM)
            for name in group:
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda n=name: not self.running(n), timeout, 0.2, what=f"{name} to exit")
                if self.running(name):
                    log(f"{name} ignored SIGTERM for {timeout}s: SIGKILL")
                    send_signal(self.pids[name], signal.SIGKILL)
                if name in self.procs:
                    self.procs[name].wait(10)  # reap
            if "kubelet" in group and self.running("containerd"):
                self._remove_pods()
        self._sweep()
        STATE_FILE.unlink(missing_ok=True)
        self.timings["stop"] = time.monotonic() - started
        log(f"cluster stopped in {self.timings['stop']:.1f}s")
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _remove_pods(self) -> None:
        """Pods outlive the kubelet: stop and remove every sandbox (CNI DEL frees its IP and veth)."""
        pods = self.crictl("pods", "-q").stdout.split()
        if pods:
            self.crictl("stopp", *pods)
            self.crictl("rmp", "-a", "-f")
            log(f"removed {len(pods)} pod sandbox(es)")

    def _sweep(self) -> None:
        """What a SIGKILL or a crash can leave: shims and pod processes, mounts, network, cgroups, run state."""
        for pid in pids_mentioning(str(self.workdir) + "/", str(CONTAINERD_SOCK)):
            send_signal(pid, signal.SIGKILL)  # daemons not recorded, containerd shims
        _kill_pod_processes()
        unmount_under(self.workdir, RUN_STATE, CONTAINERD_ROOT)
        remove_network(self.bin_dir / "kube-proxy")
        remove_cgroups()
        for link in Path("/var/log/containers").glob("*.log"):  # the kubelet's links to our pod logs
            with contextlib.suppress(OSError):
                if os.readlink(link).startswith(str(self.workdir) + "/"):
                    link.unlink()
        shutil.rmtree(RUN_STATE, ignore_errors=True)
        shutil.rmtree(self.workdir / "cni" / "ipam", ignore_errors=True)
        (HOST_DIRS[0] / "kubelet.sock").unlink(missing_ok=True)  # the device manager's, not under --root-dir
        for path in HOST_DIRS:  # made by the kubelet and libcni whatever their configuration says; if empty
            with contextlib.suppress(OSError):
                path.rmdir()


def _kill_pod_processes(timeout: float = 20) -> None:
    """SIGKILL every process in a ``kubepods`` cgroup (pods whose shim is gone) until none is left."""
    def gone() -> bool:
        pids: set[int] = set()
        for procs in [*Path("/sys/fs/cgroup").glob("*/kubepods/**/cgroup.procs"),  # v1: one tree per controller
                      *Path("/sys/fs/cgroup").glob("kubepods/**/cgroup.procs")]:  # v2
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
        for pid in pids:
            send_signal(pid, signal.SIGKILL)
        return not pids

    with contextlib.suppress(TimeoutError):
        wait_until(gone, timeout, 0.2, what="pod processes to exit")


def load_cluster() -> KubernetesCluster | None:
    """The cluster recorded in :data:`STATE_FILE` (by a session that may be gone), with the daemons still ours."""
    try:
        data = json.loads(STATE_FILE.read_text())
        workdir, bin_dir = Path(data["workdir"]), Path(data["bin_dir"])
        pids = {name: int(pid) for name, pid in data["pids"].items()}
    except (OSError, ValueError, KeyError):
        return None

    mine = set(pids_mentioning(f"{workdir}/"))  # started with this work directory: not a recycled pid
    return KubernetesCluster(workdir, bin_dir, pids={n: pid for n, pid in pids.items() if pid in mine and alive(pid)})


def cleanup_stale() -> None:
    """Remove a cluster that another session left (call with :data:`LOCK` held)."""
    stale = load_cluster()
    if stale is not None:
        log(f"removing the cluster an earlier session left in {stale.workdir}")
        stale.stop()
    STATE_FILE.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ start

def start_cluster(workdir: Path, timeout: float = 240) -> KubernetesCluster:
    """Build what is missing, start a cluster with its files under ``workdir``, return when it is ready.

    ``timeout`` bounds each wait (API server ready, node Ready); on any failure everything started is
    stopped. Building from nothing (binaries) takes ~12.5 minutes on 2 cores; with the cache, starting ~10 s.
    """
    if os.geteuid() != 0:
        raise PermissionError("the Kubernetes test cluster needs root (containerd, iptables, mounts, cgroups)")
    started = time.monotonic()
    install_packages()
    bin_dir = build_binaries()
    images = [pause_image(), kernel_image()]
    prepared = time.monotonic()
    lock = contextlib.ExitStack()
    lock.enter_context(_file_lock(LOCK, timeout=1800))  # another session's cluster
    waited = time.monotonic() - prepared
    try:
        cleanup_stale()
        cluster = KubernetesCluster(workdir, bin_dir, kernel_image=images[1][0], pause_image=images[0][0],
                                    _lock=lock)
    except BaseException:
        lock.close()
        raise
    cluster.timings["prepare"] = prepared - started
    try:
        _launch(cluster, images, timeout)
    except BaseException:
        cluster.stop()
        raise
    cluster.timings["start"] = time.monotonic() - prepared - waited
    if waited > 1:
        cluster.timings["waited for another session"] = waited
    log(f"cluster up in {cluster.timings['start']:.1f}s: {cluster.api_url}, KUBECONFIG={cluster.kubeconfig}")
    return cluster


def _write_conf(cluster: KubernetesCluster) -> dict[str, Path]:
    values = {"RUN_DIR": cluster.workdir, "NODE_IP": NODE_IP, "POD_CIDR": POD_CIDR, "BRIDGE": BRIDGE,
              "CONTAINERD_ROOT": CONTAINERD_ROOT, "CONTAINERD_STATE": CONTAINERD_SOCK.parent,
              "CONTAINERD_SOCK": CONTAINERD_SOCK, "RUNC_ROOT": RUN_STATE / "runc",
              "PAUSE_IMAGE": cluster.pause_image}
    targets = {"containerd.toml": cluster.workdir / "containerd.toml",
               "10-kgw-bridge.conflist": cluster.workdir / "cni" / "net.d" / "10-kgw-bridge.conflist",
               "kubelet-config.yaml": cluster.workdir / "kubelet" / "config.yaml",
               "kube-proxy-config.yaml": cluster.workdir / "kube-proxy-config.yaml"}
    for template, target in targets.items():
        text = (SERVICE_DIR / "conf" / template).read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", str(value))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    (cluster.workdir / "kubelet" / "resolv.conf").write_text("")  # no DNS add-on, no host resolver either
    return targets


def _launch(cluster: KubernetesCluster, images: list[tuple[str, Path]], timeout: float) -> None:
    run, pki, b = cluster.workdir, cluster.pki, cluster.bin_dir
    for sub in ("etcd", "cni", "pod-logs"):  # a reused work directory: a new cluster starts empty
        shutil.rmtree(run / sub, ignore_errors=True)
    for sub in ("log", "etcd", "cni/ipam", "kubelet-root", "pod-logs"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    write_pki(pki, NODE_NAME, NODE_IP, API_SERVICE_IP, API_PORT)
    conf = _write_conf(cluster)
    add_rules()

    def spawn(name: str, *args: str) -> None:
        with open(run / "log" / f"{name}.log", "wb") as out:
            proc = subprocess.Popen([str(b / name) if (b / name).is_file() else name, *args],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=run, start_new_session=True)
        cluster.procs[name], cluster.pids[name] = proc, proc.pid
        STATE_FILE.write_text(json.dumps(  # for cleanup after a crash
            {"workdir": str(run), "bin_dir": str(b), "pids": cluster.pids}))

    def ready(what: str, check, limit: float = timeout) -> None:
        def probe():
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}; end of "
                                       f"{run / 'log' / (name + '.log')}:\n{cluster.log_tail(name)}")
            with contextlib.suppress(OSError, ValueError, KeyError, subprocess.SubprocessError):
                return check()
            return False
        begin = time.monotonic()
        wait_until(probe, limit, 0.2, what=what)
        cluster.timings[what] = time.monotonic() - begin

    spawn("etcd", "--name", "kgw-test", "--data-dir", str(run / "etcd"),
          f"--listen-client-urls=http://127.0.0.1:{ETCD_PORT}", f"--advertise-client-urls=http://127.0.0.1:{ETCD_PORT}",
          "--listen-peer-urls=http://127.0.0.1:2380", "--initial-advertise-peer-urls=http://127.0.0.1:2380",
          "--initial-cluster=kgw-test=http://127.0.0.1:2380", "--listen-metrics-urls=http://127.0.0.1:2381",
          "--unsafe-no-fsync", "--quota-backend-bytes=2147483648", "--auto-compaction-retention=1",
          "--log-level=warn")  # (--unsafe-no-fsync: throwaway data, and the disk is shared with other runs)
    spawn("containerd", "--config", str(conf["containerd.toml"]))  # in parallel with the control plane
    ready("etcd", lambda: urllib.request.urlopen("http://127.0.0.1:2381/health", timeout=5).status == 200)
    spawn("kube-apiserver", f"--etcd-servers=http://127.0.0.1:{ETCD_PORT}", "--bind-address=0.0.0.0",
          f"--secure-port={API_PORT}", f"--advertise-address={NODE_IP}",
          f"--tls-cert-file={pki}/apiserver.crt", f"--tls-private-key-file={pki}/apiserver.key",
          f"--client-ca-file={pki}/ca.crt", "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
          f"--service-account-key-file={pki}/sa.pub", f"--service-account-signing-key-file={pki}/sa.key",
          f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
          "--enable-admission-plugins=NodeRestriction",
          f"--kubelet-client-certificate={pki}/apiserver-kubelet-client.crt",
          f"--kubelet-client-key={pki}/apiserver-kubelet-client.key",
          f"--kubelet-certificate-authority={pki}/ca.crt", "--kubelet-preferred-address-types=InternalIP",
          "--allow-privileged=true", "--profiling=false", "--event-ttl=1h", "--v=1")
    ready("kube-apiserver", lambda: cluster.api("/readyz", raw=True) == b"ok")
    for name, kubeconfig in (("kube-controller-manager", "controller-manager"), ("kube-scheduler", "scheduler")):
        extra = [f"--service-account-private-key-file={pki}/sa.key", f"--root-ca-file={pki}/ca.crt",
                 "--use-service-account-credentials=true", f"--cluster-signing-cert-file={pki}/ca.crt",
                 f"--cluster-signing-key-file={pki}/ca.key", f"--service-cluster-ip-range={SERVICE_CIDR}",
                 "--allocate-node-cidrs=true", f"--cluster-cidr={POD_CIDR}", "--node-cidr-mask-size=24",
                 ] if name == "kube-controller-manager" else []
        path = f"{pki}/{kubeconfig}.kubeconfig"
        spawn(name, f"--kubeconfig={path}", f"--authentication-kubeconfig={path}",
              f"--authorization-kubeconfig={path}", "--bind-address=127.0.0.1", "--leader-elect=false",
              "--profiling=false", "--v=1", *extra)
    ctr = ["ctr", "-a", str(CONTAINERD_SOCK), "-n", "k8s.io"]
    ready("containerd", lambda: subprocess.run([*ctr, "version"], capture_output=True, timeout=10).returncode == 0)
    begin = time.monotonic()
    for name, tarball in images:
        cluster.import_image(name, tarball)
    cluster.timings["images"] = time.monotonic() - begin
    spawn("kubelet", f"--config={conf['kubelet-config.yaml']}", f"--kubeconfig={pki}/kubelet.kubeconfig",
          f"--root-dir={run}/kubelet-root", f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1")
    spawn("kube-proxy", f"--config={conf['kube-proxy-config.yaml']}", f"--hostname-override={NODE_NAME}", "--v=1")
    ready("node Ready", lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                                    cluster.api(f"/api/v1/nodes/{NODE_NAME}")["status"]["conditions"]))
    ready("default service account", lambda: cluster.api("/api/v1/namespaces/default/serviceaccounts/default"))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Start or stop the Kubernetes test cluster (https://127.0.0.1:6443).")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kgw-k8s-cluster"))
    args = parser.parse_args(argv)
    if args.action == "stop":
        lock = contextlib.ExitStack()
        try:
            lock.enter_context(_file_lock(LOCK, timeout=0))
        except TimeoutError:
            raise SystemExit("a test session's cluster is running: that session stops it") from None
        with lock:
            cluster = load_cluster()
            if cluster is None:
                log("no cluster recorded")
            else:
                cluster.stop()
        return
    cluster = start_cluster(args.workdir)
    cluster._lock.close()  # the cluster outlives this command: a test session will remove it (cleanup_stale)
    cluster._lock = None
    exports = "".join(f"export {k}={v}\n" for k, v in cluster.env.items())
    exports += f"export KERNEL_IMAGE={cluster.kernel_image}\nexport PATH={cluster.bin_dir}:$PATH\n"
    (args.workdir / "env.sh").write_text(exports)
    print(exports, end="")


if __name__ == "__main__":
    main()
