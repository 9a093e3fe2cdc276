"""A real Hadoop YARN cluster for the tests: one ResourceManager and one or two NodeManagers (java processes).

* Jars (Hadoop :data:`HADOOP_VERSION`, ``tests/services/yarn/pom.xml``) are resolved once with Maven into
  ``${KGW_CACHE_DIR:-/var/cache/kgw}/yarn-<version>/lib`` (downloads cached in ``~/.m2``); a changed pom
  resolves again.
* :func:`start_cluster` writes the configuration (``tests/services/yarn/conf``, ``@NAME@`` filled in) and
  logs under a work directory, starts the RM, waits until it is ``STARTED``/``ACTIVE``, starts the NMs
  and waits until that many are ``RUNNING``. With two nodes the second runs in the network namespace
  :data:`NETNS` (10.198.7.2; the RM and node 1 then bind the host side of its link, 10.198.7.1) when
  that works here, else on loopback with its own ports.
* :meth:`YarnCluster.stop` kills live applications through the RM, stops the daemons, SIGKILLs every
  process left under the work directory (container process groups included) and deletes the namespace.
* Ports default to the recipe's (RM 18030-18033 and web 18088, node i 18030+10i..+2): an ``flock`` held
  while a cluster lives serialises the sessions that use the same ports, and a cluster left by a
  crashed session (recorded in ``/tmp/kgw-yarn-<web port>.json``) is removed before the next one
  starts. The namespace has its own lock: a second cluster on other ports keeps node 2 on loopback.

Also a command line (``tests/services/yarn/start-yarn.sh`` and ``stop-yarn.sh`` wrap it)::

    python3 -m tests.services.yarn_cluster start [--nodes 2] [--no-netns] [--workdir DIR] [--web-port 18088]
    python3 -m tests.services.yarn_cluster stop [--web-port 18088] [--graceful]
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from .docker_engine import _file_lock
from .gateway import wait_until
from .yarn_host import (
    HOST_IP,
    NETNS,
    NS_IP,
    alive,
    check_ports,
    claim_netns,
    delete_free_netns,
    log,
    process_cwds,
    send_signal,
    sweep,
)

HADOOP_VERSION = "3.4.1"
SERVICE_DIR = Path(__file__).resolve().parent / "yarn"
RM_CLASS = "org.apache.hadoop.yarn.server.resourcemanager.ResourceManager"
NM_CLASS = "org.apache.hadoop.yarn.server.nodemanager.NodeManager"
# Java 17: the RM and NM web apps (Guice/cglib) need java.lang opened, nothing else.
JAVA_OPTS = ["--add-opens", "java.base/java.lang=ALL-UNNAMED", "-Djava.net.preferIPv4Stack=true",
             "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Xss512k"]
LIVE_STATES = "NEW,NEW_SAVING,SUBMITTED,ACCEPTED,RUNNING"
FINAL_STATES = ("FINISHED", "FAILED", "KILLED")


def cache_dir() -> Path:
    return Path(os.environ.get("KGW_CACHE_DIR") or "/var/cache/kgw") / f"yarn-{HADOOP_VERSION}"


def resolve_jars(timeout: float = 900.0) -> Path:
    """The directory of the cluster's jars, resolved with Maven unless already there for this pom."""
    lib = cache_dir() / "lib"
    pom = SERVICE_DIR / "pom.xml"
    stamp = lib / ".pom.xml"
    with _file_lock("kgw-yarn-resolve.lock", timeout=timeout):
        if stamp.is_file() and stamp.read_bytes() == pom.read_bytes():
            return lib
        started = time.monotonic()
        log(f"resolving Hadoop {HADOOP_VERSION} jars into {lib}")
        staging = lib.with_name("lib.partial")
        shutil.rmtree(staging, ignore_errors=True)
        proc = subprocess.run(["mvn", "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
                               f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
                              check=False, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode:
            raise RuntimeError(f"mvn dependency:copy-dependencies failed ({proc.returncode}):\n"
                               + (proc.stdout + proc.stderr)[-4000:])
        shutil.copyfile(pom, staging / ".pom.xml")
        shutil.rmtree(lib, ignore_errors=True)
        staging.rename(lib)
        log(f"{len(list(lib.glob('*.jar')))} jars in {time.monotonic() - started:.1f}s")
    return lib


@dataclass
class NodeManager:
    """One NodeManager: its bind address, ports (localizer, rpc, web) and network namespace, if any."""

    index: int
    host: str
    base_port: int
    netns: str | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.base_port + 1}"

    @property
    def web_address(self) -> str:
        return f"{self.host}:{self.base_port + 2}"


@dataclass
class YarnCluster:
    """A running cluster: where the RM is, the client configuration, the nodes, and how to stop it all."""

    rm_host: str
    rm_web_port: int
    workdir: Path
    lib_dir: Path
    nodes: list[NodeManager]
    netns: str | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    auth: Any = None  # a `requests` auth for :meth:`rest` when the web endpoints require SPNEGO
    _lock: contextlib.ExitStack | None = None

    @property
    def rm_url(self) -> str:
        return f"http://{self.rm_host}:{self.rm_web_port}"

    @property
    def conf_dir(self) -> Path:
        """``HADOOP_CONF_DIR``/``YARN_CONF_DIR`` for clients (yarn-api-client reads yarn-site.xml here)."""
        return self.workdir / "conf"

    @property
    def run_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def gateway_address(self) -> str:
        """An address of this machine that containers on every node can reach (for response listeners)."""
        return self.rm_host

    @property
    def hadoop_classpath(self) -> str:
        """What ``hadoop classpath`` prints on a real node: the configuration and the Hadoop jars."""
        return f"{self.conf_dir}:{self.lib_dir}/*"

    @property
    def env(self) -> dict[str, str]:
        return {"HADOOP_CONF_DIR": str(self.conf_dir), "YARN_CONF_DIR": str(self.conf_dir),
                "YARN_RM_URL": self.rm_url}

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 15) -> tuple[int, Any]:
        """One call to ``<rm_url>/ws/v1/cluster<path>``: ``(status, parsed JSON or None)`` for any status."""
        if self.auth is not None:  # SPNEGO: urllib cannot negotiate; requests (with the gateway's deps) can
            import requests

            resp = requests.request(method, f"{self.rm_url}/ws/v1/cluster{path}", json=body, auth=self.auth,
                                    headers={"Accept": "application/json"}, timeout=timeout)
            try:
                return resp.status_code, resp.json() if resp.content else None
            except ValueError:
                return resp.status_code, resp.text
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.rm_url}/ws/v1/cluster{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read()
        try:
            return status, json.loads(payload) if payload else None
        except ValueError:
            return status, payload.decode(errors="replace")

    def app(self, app_id: str) -> dict:
        status, body = self.rest("GET", f"/apps/{app_id}")
        if status != 200:
            raise RuntimeError(f"GET /apps/{app_id}: {status} {body}")
        return body["app"]

    def live_apps(self) -> list[dict]:
        status, body = self.rest("GET", f"/apps?states={LIVE_STATES}")
        return ((body or {}).get("apps") or {}).get("app") or [] if status == 200 else []

    def running_nodes(self) -> list[dict]:
        status, body = self.rest("GET", "/nodes?states=RUNNING")
        return ((body or {}).get("nodes") or {}).get("node") or [] if status == 200 else []

    def container_pids(self) -> list[int]:
        """Live processes started by the NodeManagers (their working directory is under the node dirs)."""
        roots = [str(self.run_dir / f"nm{n.index}") + "/" for n in self.nodes]
        return [pid for pid, cwd in process_cwds() if any(cwd.startswith(r) for r in roots)]

    def log_tail(self, name: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.run_dir / "logs" / f"{name}.out").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, graceful: bool = False, timeout: float = 30) -> None:
        """Kill live applications, stop the daemons (SIGTERM when ``graceful``: an NM takes ~20 s, else
        SIGKILL), SIGKILL what is left under the work directory, delete the namespace, release the ports."""
        started = time.monotonic()
        if self._daemon_running("rm"):
            with contextlib.suppress(OSError):  # an RM that stopped answering: the sweep below does it all
                _kill_apps(self, timeout)
        sig = signal.SIGTERM if graceful else signal.SIGKILL
        for names in ([n for n in self.pids if n.startswith("nm")], ["rm"]):
            for name in names:
                send_signal(self.pids[name], sig)
            for name in names:
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda n=name: not self._daemon_running(n), timeout, 0.2, what=f"{name} to exit")
                send_signal(self.pids[name], signal.SIGKILL)
                if name in self.procs:
                    self.procs[name].wait(10)  # reap
        sweep(self.run_dir, self.netns if self._lock is not None else None)  # netns: only while we hold its lock
        _state_file(self.rm_web_port).unlink(missing_ok=True)
        self.timings["stop"] = time.monotonic() - started
        log(f"cluster stopped in {self.timings['stop']:.1f}s")
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def _daemon_running(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is not None:
            return proc.poll() is None
        return name in self.pids and alive(self.pids[name])


def _kill_apps(cluster: YarnCluster, timeout: float) -> None:
    """Kill live applications through the RM, so that the NMs stop their containers the normal way."""
    apps = [a["id"] for a in cluster.live_apps()]
    for app_id in apps:
        cluster.rest("PUT", f"/apps/{app_id}/state", {"state": "KILLED"})
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not cluster.live_apps(), timeout, 0.2, what="applications to end")
    if apps:
        log(f"killed {len(apps)} live application(s)")


def _state_file(web_port: int) -> Path:
    return Path(f"/tmp/kgw-yarn-{web_port}.json")


def load_cluster(web_port: int) -> YarnCluster | None:
    """The cluster recorded for ``web_port`` (by a session that may be gone), with the daemons still ours."""
    try:
        data = json.loads(_state_file(web_port).read_text())
        workdir = Path(data["workdir"])
        pids = {name: int(pid) for name, pid in data["pids"].items()}
    except (OSError, ValueError, KeyError):
        return None

    def ours(pid: int) -> bool:  # alive and started from this work directory (not a recycled pid)
        with contextlib.suppress(OSError):
            return alive(pid) and str(workdir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        return False

    return YarnCluster(data["rm_host"], web_port, workdir, Path(data["lib_dir"]), [], data.get("netns"),
                       pids={name: pid for name, pid in pids.items() if ours(pid)})


def cleanup_stale(web_port: int) -> None:
    """Remove a cluster that another session left on these ports (call with the ports' lock held)."""
    stale = load_cluster(web_port)
    if stale is not None:
        log(f"removing the cluster an earlier session left in {stale.workdir}")
        stale.stop()
    _state_file(web_port).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ start

def _write_conf(conf_dir: Path, values: dict[str, object], extra: dict[str, dict[str, str]] | None = None) -> None:
    conf_dir.mkdir(parents=True, exist_ok=True)
    for template in (SERVICE_DIR / "conf").iterdir():
        text = template.read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", str(value))
        added = "".join(f"  <property><name>{escape(k)}</name><value>{escape(v)}</value></property>\n"
                        for k, v in (extra or {}).get(template.name, {}).items())
        (conf_dir / template.name).write_text(text.replace("</configuration>", added + "</configuration>"))


def start_cluster(workdir: Path, nodes: int = 2, netns: bool | None = None, port_base: int = 18030,
                  web_port: int = 18088, nm_memory_mb: int = 4096, nm_vcores: int = 4,
                  am_expiry_ms: int = 3_600_000, am_max_attempts: int = 1, timeout: float = 180,
                  extra_conf: dict[str, dict[str, str]] | None = None, java_opts: list[str] | None = None,
                  auth: Any = None) -> YarnCluster:
    """Start an RM and ``nodes`` (1 or 2) NMs with their files under ``workdir``; return when all are ready.

    ``netns``: None puts node 2 in a network namespace when that works, True requires it, False never.
    ``timeout`` bounds each wait (RM active, NMs running); on any failure everything started is stopped.
    ``extra_conf`` adds properties to the configuration (file name -> {name: value}, e.g. SPNEGO on the web
    endpoints in ``core-site.xml``), ``java_opts`` options to every daemon's JVM (``-Djava.security.krb5.conf``),
    and ``auth`` is the `requests` auth the cluster's own REST calls use then (:attr:`YarnCluster.auth`).
    """
    if nodes not in (1, 2):
        raise ValueError(f"nodes must be 1 or 2, not {nodes}")
    java = shutil.which("java")
    if java is None:
        raise FileNotFoundError("the YARN test cluster needs java 11 or 17 on PATH")
    started = time.monotonic()
    lib = resolve_jars()
    lock, waiting = contextlib.ExitStack(), time.monotonic()
    lock.enter_context(_file_lock(f"kgw-yarn-{web_port}.lock", timeout=1800))  # another session's cluster
    waited = time.monotonic() - waiting
    try:
        cleanup_stale(web_port)
        in_netns = nodes == 2 and netns is not False and claim_netns(lock, required=bool(netns))
        host = HOST_IP if in_netns else "127.0.0.1"
        members = [NodeManager(1, host, port_base + 10)]
        if nodes == 2:
            members.append(NodeManager(2, NS_IP if in_netns else "127.0.0.1", port_base + 20,
                                       NETNS if in_netns else None))
        cluster = YarnCluster(host, web_port, workdir, lib, members, NETNS if in_netns else None, auth=auth,
                              _lock=lock)
    except BaseException:
        lock.close()
        raise
    try:
        check_ports(host, [port_base + i for i in range(4)] + [web_port])
        for node in members:
            if node.netns is None:
                check_ports(node.host, [node.base_port + i for i in range(3)])
        values = {"RM_HOST": host, "RM_SCHEDULER_PORT": port_base, "RM_TRACKER_PORT": port_base + 1,
                  "RM_PORT": port_base + 2, "RM_ADMIN_PORT": port_base + 3, "RM_WEB_PORT": web_port,
                  "NM_MEMORY_MB": nm_memory_mb, "NM_VCORES": nm_vcores, "AM_EXPIRY_MS": am_expiry_ms,
                  "AM_MAX_ATTEMPTS": am_max_attempts, "RUN_DIR": cluster.run_dir,
                  "USER": getpass.getuser()}
        _launch(cluster, java, values, timeout, extra_conf, java_opts)
    except BaseException:
        cluster.stop()
        raise
    cluster.timings["start"] = time.monotonic() - started - waited
    if waited > 1:
        cluster.timings["waited for another session"] = waited
    log(f"cluster up in {cluster.timings['start']:.1f}s: RM {cluster.rm_url}, nodes "
        + ", ".join(n.address + (f" (netns {n.netns})" if n.netns else "") for n in members))
    return cluster


def _launch(cluster: YarnCluster, java: str, values: dict[str, object], timeout: float,
            extra_conf: dict[str, dict[str, str]] | None = None, java_opts: list[str] | None = None) -> None:
    logs = cluster.run_dir / "logs"
    for path in [logs, cluster.run_dir / "tmp"] + [cluster.run_dir / f"nm{n.index}" / d
                                                   for n in cluster.nodes for d in ("local", "logs")]:
        path.mkdir(parents=True, exist_ok=True)
    _write_conf(cluster.conf_dir, values, extra_conf)
    # JAVA_HOME and HADOOP_CONF_DIR are on the NM's env whitelist: containers get them ({{JAVA_HOME}})
    env = dict(os.environ, JAVA_HOME=str(Path(java).resolve().parents[1]), HADOOP_CONF_DIR=str(cluster.conf_dir))
    common = [*JAVA_OPTS, *(java_opts or []), f"-Dhadoop.log.dir={logs}", f"-Dyarn.log.dir={logs}",
              "-cp", cluster.hadoop_classpath]

    def spawn(name: str, argv: list[str]) -> None:
        with open(logs / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=env, cwd=cluster.run_dir, start_new_session=True)
        cluster.procs[name], cluster.pids[name] = proc, proc.pid
        _state_file(cluster.rm_web_port).write_text(json.dumps(  # for cleanup after a crash
            {"workdir": str(cluster.workdir), "lib_dir": str(cluster.lib_dir), "rm_host": cluster.rm_host,
             "netns": cluster.netns, "pids": cluster.pids}))

    def ready(what: str, check) -> None:
        def probe():
            for name, proc in cluster.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"YARN {name} exited with {proc.returncode}; end of "
                                       f"{logs / (name + '.out')}:\n{cluster.log_tail(name)}")
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
                return check()
            return False
        begin = time.monotonic()
        wait_until(probe, timeout, 0.25, what=what)
        cluster.timings[what] = time.monotonic() - begin

    spawn("rm", [java, "-Xmx512m", *common, RM_CLASS])
    ready("resourcemanager", lambda: cluster.rest("GET", "/info")[1]["clusterInfo"]["haState"] == "ACTIVE")
    for node in cluster.nodes:  # only now: an NM that finds no RM retries every 10 s
        prefix = ["ip", "netns", "exec", node.netns] if node.netns else []  # execs java: same pid
        local = cluster.run_dir / f"nm{node.index}"
        spawn(f"nm{node.index}", prefix + [
            java, "-Xmx384m", *common, NM_CLASS,
            "-D", f"yarn.nodemanager.localizer.address={node.host}:{node.base_port}",
            "-D", f"yarn.nodemanager.address={node.address}",
            "-D", f"yarn.nodemanager.webapp.address={node.web_address}",
            "-D", f"yarn.nodemanager.local-dirs={local / 'local'}",
            "-D", f"yarn.nodemanager.log-dirs={local / 'logs'}"])
    ready("nodemanagers", lambda: len(cluster.running_nodes()) >= len(cluster.nodes))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Start or stop the YARN test cluster (RM :18088).")
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--nodes", type=int, default=2, choices=[1, 2])
    parser.add_argument("--no-netns", action="store_true", help="node 2 on loopback, not in a namespace")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/kgw-yarn-cluster"))
    parser.add_argument("--port-base", type=int, default=18030, help="RM ports; node i: base + 10 i")
    parser.add_argument("--web-port", type=int, default=18088, help="the RM's web/REST port")
    parser.add_argument("--graceful", action="store_true", help="stop: SIGTERM the daemons (~20 s)")
    args = parser.parse_args(argv)
    if args.action == "stop":
        cluster = load_cluster(args.web_port)
        if cluster is None:
            log("no cluster recorded")
        else:
            cluster.stop(graceful=args.graceful)
        delete_free_netns()
        return
    cluster = start_cluster(args.workdir, nodes=args.nodes, netns=False if args.no_netns else None,
                            port_base=args.port_base, web_port=args.web_port)
    exports = "".join(f"export {k}={v}\n" for k, v in cluster.env.items())
    (args.workdir / "env.sh").write_text(exports)
    print(exports, end="")


if __name__ == "__main__":
    main()
