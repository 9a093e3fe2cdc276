"""YARN kernels: each kernel's launcher runs in the ApplicationMaster container of its own YARN application.

The provisioner submits the application through the ResourceManager REST API (new-application, then
submit). Its AM command runs the operator's registering ApplicationMaster (``am_command``), which runs
a small Python bootstrap, which execs our launcher. Nothing the client sends reaches that command:

* the NodeManager runs the command as ``bash -c "<command>"`` without escaping and expands ``<LOG_DIR>``,
  ``<CPS>`` and ``{{VAR}}`` in it, so it holds only operator values (kernelspec argv, ``am_command``),
  each shell-quoted, the whole escaped for the double-quoted level, and refused if it has those markers;
* the launch token and the kernel's environment (``KERNEL_*`` values) travel as a *secret* in the
  application's credentials: YARN hands it to the NodeManager over RPC and writes it only into the
  container's private ``container_tokens`` file; the RM's REST API never shows it (unlike the launch
  context's environment). The bootstrap reads it, deletes that file, sets the environment and execs the
  launcher with the token on stdin.

State comes from the shared :class:`~provisioners.yarn_rm.ApplicationWatcher` (one batched query per
interval for all kernels); kill goes through the RM (state KILLED) and waits until the app is final.
"""

from __future__ import annotations

import ast
import base64
import json
import re
import shlex
import time
from typing import Any
from urllib.parse import urlparse

from traitlets import Bool, CaselessStrEnum, Float, Integer, List, TraitError, Unicode, validate

from launchers import PYTHON_LAUNCHER

from ._blocking import run_blocking
from ._payloads import LaunchInfo
from .container import _number, parse_memory
from .errors import BackendError, CapacityError, LaunchError, LaunchRequestError
from .remote import RemoteProvisioner, _timeout, impersonated_user, route_address
from .yarn_auth import RMAuth, check_setting
from .yarn_rm import ApplicationWatcher, AppState, YarnAPIError

__all__ = ["YarnCapacityError", "YarnProvisioner", "app_tag"]

SECRET_KEY = "kernel_gateway.launch"
TAG = "kernel_gateway"
_NM_MARKERS = re.compile(r"\{\{|\}\}|<LOG_DIR>|<CPS>")
_TAG_UNSAFE = re.compile(r"[^a-z0-9._@-]")


def _launcher_function(name: str) -> str:
    """The source of one function of our launcher script, to run it verbatim where the launcher may not be."""
    source = PYTHON_LAUNCHER.read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(source, node) or ""


# Runs under the kernel's Python in the AM container: the launcher's own reader of the launch secret (from
# container_tokens, which it deletes; it applies the kernel's environment), then exec argv with the token on
# stdin, so any kernelspec argv, not only our launcher, gets its environment without the token in it.
_BOOTSTRAP = "from __future__ import annotations\nimport json, os, sys\n" + _launcher_function("read_yarn_secret") + f"""
token = read_yarn_secret({SECRET_KEY!r})
r, w = os.pipe()
os.write(w, token.encode() + b'\\n')
os.close(w)
os.dup2(r, 0)
os.close(r)
os.execvp(sys.argv[1], sys.argv[1:])
"""
_BOOTSTRAP_ARG = f"import base64;exec(base64.b64decode('{base64.b64encode(_BOOTSTRAP.encode()).decode()}'))"


class YarnCapacityError(CapacityError):
    """YARN could not schedule the kernel's ApplicationMaster in time (queue or AM resource limit); its numbers attached."""


def escape_for_nm(command: str) -> str:
    """``command`` escaped so that the NodeManager's ``bash -c "<command>"`` hands bash exactly ``command``."""
    for char in ("\\", '"', "$", "`"):
        command = command.replace(char, "\\" + char)
    return command


def app_tag(prefix: str, value: str) -> str:
    """A YARN application tag (ASCII, lower case, <= 100 chars, no commas: the query separator)."""
    return (prefix + _TAG_UNSAFE.sub("_", value.lower()))[:100]


class YarnProvisioner(RemoteProvisioner):
    """Starts each kernel's launcher as the ApplicationMaster of its own YARN application (native mode)."""

    @property
    def cold_start_envs(self) -> tuple[str, ...]:  # type: ignore[override]
        """Request variables a warm launcher cannot honour: its host or queue is chosen, and it runs as the gateway's user."""
        return ("KERNEL_QUEUE", "KERNEL_MEMORY", "KERNEL_CPUS", "KERNEL_PRIORITY") + (("KERNEL_USERNAME",) if self.impersonate else ())

    rm_urls = List(
        Unicode(), config=True,
        help="ResourceManager web addresses, e.g. http://rm1:8088,http://rm2:8088; with RM HA, all of them: the "
        "active one is followed. Required.",
    ).tag(env="GATEWAY_YARN_RM_URLS")
    rm_timeout = Float(10.0, config=True, help="Seconds one ResourceManager request may take.").tag(env="GATEWAY_YARN_RM_TIMEOUT")
    poll_interval = Float(
        1.0, config=True,
        help="Seconds between the batched applications queries that watch all YARN kernels (one query per interval, "
        "whatever the number of kernels); the first YARN kernelspec used sets it for the process.",
    ).tag(env="GATEWAY_YARN_POLL_INTERVAL")
    am_command = Unicode(
        "", config=True,
        help="Shell command that runs a registering ApplicationMaster which runs the command appended to it, e.g. "
        "\"java -cp '/etc/hadoop/conf:/opt/kg/yarn-am.jar' YarnAmWrapper\". Operator-trusted shell text. Required.",
    ).tag(env="GATEWAY_YARN_AM_COMMAND")
    bootstrap_python = Unicode(
        "python3", config=True,
        help="Python 3 on the NodeManagers that runs the launch bootstrap (standard library only) before it execs "
        "the kernelspec's argv.",
    ).tag(env="GATEWAY_YARN_BOOTSTRAP_PYTHON")
    queue = Unicode("default", config=True, help="YARN queue of the kernels' applications.").tag(env="GATEWAY_YARN_QUEUE")
    allowed_queues = List(
        Unicode(), config=True,
        help="Queues a client may pick with KERNEL_QUEUE besides 'queue'; empty allows only 'queue'.",
    ).tag(env="GATEWAY_YARN_ALLOWED_QUEUES")
    memory = Unicode("1g", config=True, help="Memory of the kernel's container, e.g. '1g' (YARN rounds up).").tag(env="GATEWAY_YARN_MEMORY")
    max_memory = Unicode(
        "", config=True, help="Most memory a client may ask for with KERNEL_MEMORY; empty: no more than 'memory'.",
    ).tag(env="GATEWAY_YARN_MAX_MEMORY")
    vcores = Integer(1, config=True, help="Virtual cores of the kernel's container.").tag(env="GATEWAY_YARN_VCORES")
    max_vcores = Integer(
        0, config=True, help="Most vcores a client may ask for with KERNEL_CPUS; 0: no more than 'vcores'.",
    ).tag(env="GATEWAY_YARN_MAX_VCORES")
    priority = Integer(0, config=True, help="YARN application priority.").tag(env="GATEWAY_YARN_PRIORITY")
    max_priority = Integer(
        0, config=True, help="Highest priority a client may ask for with KERNEL_PRIORITY; 0: no more than 'priority'.",
    ).tag(env="GATEWAY_YARN_MAX_PRIORITY")
    node_label = Unicode(
        "", config=True, help="Node label expression for the kernel's container; empty: the queue's default.",
    ).tag(env="GATEWAY_YARN_NODE_LABEL")
    queue_wait = Float(
        0.5, config=True,
        help="Part of the launch timeout (0..1) an application may wait for its ApplicationMaster container while "
        "YARN reports the queue's AM resource limit exceeded; then it is killed and the start answered 503.",
    ).tag(env="GATEWAY_YARN_QUEUE_WAIT")
    kill_timeout = Float(
        30.0, config=True, help="Seconds to wait for a killed application to reach a final state.",
    ).tag(env="GATEWAY_YARN_KILL_TIMEOUT")
    impersonate = Bool(
        False, config=True,
        help="Submit each kernel's application as its KERNEL_USERNAME (the RM's 'user.name' with simple "
        "authentication); off: as the user the RM assigns to the gateway's requests.",
    ).tag(env="GATEWAY_YARN_IMPERSONATE")
    rm_auth = CaselessStrEnum(
        ["simple", "kerberos"], "simple", config=True,
        help="How the gateway authenticates to the ResourceManager's REST API (and the NodeManagers' log pages): "
        "'simple': none (impersonation sends user.name=<user>); 'kerberos': SPNEGO with mutual authentication, "
        "credentials from rm_keytab, else from the process's credential cache (kinit; KRB5CCNAME); impersonation "
        "sends doAs=<user>, which the RM allows when hadoop.proxyuser.<gateway principal's short name>.* permit it. "
        "Needs the 'kerberos' extra (requests-gssapi).",
    ).tag(env="GATEWAY_YARN_RM_AUTH")
    rm_principal = Unicode(
        "", config=True,
        help="With rm_auth 'kerberos': the gateway's client principal, e.g. jupyter@EXAMPLE.COM; required with "
        "rm_keytab; without it, the credential cache's default principal.",
    ).tag(env="GATEWAY_YARN_RM_PRINCIPAL")
    rm_keytab = Unicode(
        "", config=True,
        help="With rm_auth 'kerberos': a client keytab; tickets for rm_principal are got from it (and got again "
        "before they expire) into a private in-memory cache. Empty: the process's credential cache, kept valid "
        "by the operator (kinit, k5start).",
    ).tag(env="GATEWAY_YARN_RM_KEYTAB")
    rm_ca_bundle = Unicode(
        "", config=True,
        help="For https ResourceManager (and NodeManager) addresses: the CA bundle (PEM file) that verifies their "
        "certificates; empty: the system's CAs.",
    ).tag(env="GATEWAY_YARN_RM_CA_BUNDLE")

    @validate("rm_auth", "rm_keytab", "rm_ca_bundle")
    def _rm_auth_setting(self, proposal: dict[str, Any]) -> str:
        try:
            check_setting(proposal["trait"].name, proposal["value"])
        except ValueError as exc:
            raise TraitError(str(exc)) from None
        return proposal["value"]

    #: AM container logs whose tail a failed start's message quotes
    diagnostic_logs: tuple[str, ...] = ("stderr",)
    app_id: str | None = None
    _started_at = 0.0  # monotonic time the current start began

    @validate("rm_urls")
    def _urls(self, proposal: dict[str, Any]) -> list[str]:
        urls = [u.strip().rstrip("/") for u in proposal["value"] if u.strip()]
        if not urls:
            raise TraitError("rm_urls is empty: name the ResourceManager web address(es) (GATEWAY_YARN_RM_URLS)")
        for url in urls:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise TraitError(f"rm_urls: {url!r} is not an http(s)://host:port address")
        return urls

    @validate("am_command")
    def _am_command(self, proposal: dict[str, Any]) -> str:
        if not proposal["value"].strip():
            raise TraitError("am_command is empty: give the command that runs the registering ApplicationMaster")
        return proposal["value"].strip()

    @validate("memory", "max_memory")
    def _memory_size(self, proposal: dict[str, Any]) -> str:
        if proposal["value"] or proposal["trait"].name == "memory":
            try:
                parse_memory(proposal["value"])
            except ValueError as exc:
                raise TraitError(f"{proposal['trait'].name}: {exc}") from None
        return proposal["value"]

    @validate("queue_wait")
    def _fraction(self, proposal: dict[str, Any]) -> float:
        if not 0 < proposal["value"] <= 1:
            raise TraitError(f"queue_wait must be above 0 and at most 1, not {proposal['value']}")
        return proposal["value"]

    @property
    def watcher(self) -> ApplicationWatcher:
        auth = RMAuth(self.rm_auth.lower(), self.rm_principal, self.rm_keytab, self.rm_ca_bundle)
        return ApplicationWatcher.instance(self.rm_urls, app_tag("kg-instance:", self.instance_label),
                                           self.poll_interval, self.rm_timeout, auth)

    def app_tags(self, env: dict[str, str]) -> list[str]:
        """The application's tags: ours, this gateway's instance, the kernel id and the client's user name."""
        user = env.get("KERNEL_USERNAME", "")
        return [TAG, self.watcher.tag, app_tag("kg-kernel:", self.kernel_id)] + ([app_tag("kg-user:", user)] if user else [])

    @property
    def app(self) -> AppState | None:
        return self.watcher.apps.get(self.app_id) if self.app_id else None

    # -- what the client may ask for ---------------------------------------------------------------
    def yarn_resources(self, env: dict[str, str]) -> dict[str, Any]:
        """Queue, memory (MB), vcores and priority: the kernelspec's, or the client's KERNEL_* within the maxima."""
        queue = env.get("KERNEL_QUEUE") or self.queue
        if queue != self.queue and queue not in self.allowed_queues:
            raise LaunchRequestError(f"KERNEL_QUEUE {queue!r} is not allowed; allowed: {', '.join([self.queue, *self.allowed_queues])}")
        memory = parse_memory(self.memory)
        if env.get("KERNEL_MEMORY"):
            try:
                memory = parse_memory(env["KERNEL_MEMORY"])
            except ValueError as exc:
                raise LaunchRequestError(f"KERNEL_MEMORY: {exc}") from None
            limit = self.max_memory or self.memory
            if memory > max(parse_memory(limit), parse_memory(self.memory)):
                raise LaunchRequestError(f"KERNEL_MEMORY={env['KERNEL_MEMORY']} is above the limit of {limit}")
        vcores = _number(env, "KERNEL_CPUS", int, self.vcores)
        if not 0 < vcores <= max(self.max_vcores, self.vcores):
            raise LaunchRequestError(f"KERNEL_CPUS={vcores} must be between 1 and {max(self.max_vcores, self.vcores)}")
        priority = _number(env, "KERNEL_PRIORITY", int, self.priority)
        if not 0 <= priority <= max(self.max_priority, self.priority):
            raise LaunchRequestError(f"KERNEL_PRIORITY={priority} must be between 0 and {max(self.max_priority, self.priority)}")
        return {"queue": queue, "memory": max(1, memory // 1024**2), "vcores": vcores, "priority": priority}

    def am_command_line(self, cmd: list[str]) -> str:
        """The AM command for the RM: ``am_command``, then the bootstrap that execs ``cmd``, output to the log dir."""
        for arg in cmd:
            if _NM_MARKERS.search(arg):
                raise LaunchRequestError(f"kernelspec argument {arg!r} holds a NodeManager expansion marker "
                                         "({{, }}, <LOG_DIR>, <CPS>)")
        inner = " ".join([self.am_command, *(shlex.quote(a) for a in [self.bootstrap_python, "-c", _BOOTSTRAP_ARG, *cmd])])
        return f"{escape_for_nm(inner)} 1><LOG_DIR>/stdout 2><LOG_DIR>/stderr"

    # -- RemoteProvisioner hooks ------------------------------------------------------------------------
    async def advertised_host(self) -> str:
        """Our address on the route to the ResourceManager (the cluster's network), unless response_host says."""
        if self.response_host:
            return self.response_host
        url = urlparse(self.rm_urls[self.watcher.rm.active])
        try:
            return await run_blocking(route_address, url.hostname, url.port or 80)
        except OSError:
            return "127.0.0.1"

    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        self._started_at = time.monotonic()
        resources = self.yarn_resources(env)
        command = self.am_command_line(cmd)
        secret = base64.b64encode(json.dumps({"token": token, "env": env}).encode()).decode()
        watcher = self.watcher
        rm = watcher.rm
        as_user = rm.as_user(impersonated_user(env)) if self.impersonate else {}  # user.name, or doAs (Kerberos)
        await watcher.reap(set(watcher.apps))
        try:
            new = await rm.acall("request", "/ws/v1/cluster/apps/new-application", "POST", **as_user)
        except BackendError as exc:
            raise LaunchError(f"YARN refused a new application: {exc}") from exc
        app_id = new["application-id"]
        most = new.get("maximum-resource-capability", {})
        if resources["memory"] > most.get("memory", resources["memory"]) or resources["vcores"] > most.get("vCores", resources["vcores"]):
            raise LaunchRequestError(f"the kernel asks for {resources['memory']} MB and {resources['vcores']} vcores; "
                                     f"YARN's largest container is {most.get('memory')} MB and {most.get('vCores')} vcores")
        body: dict[str, Any] = {
            "application-id": app_id, "application-name": self.kernel_id, "application-type": "JUPYTER",
            "queue": resources["queue"], "priority": resources["priority"], "max-app-attempts": 1,
            "resource": {"memory": resources["memory"], "vCores": resources["vcores"]},
            "application-tags": {"tag": self.app_tags(env)},
            "am-container-spec": {
                "commands": {"command": command},
                "credentials": {"secrets": {"entry": [{"key": SECRET_KEY, "value": secret}]}},
            },
        }
        if self.node_label:
            body["am-container-node-label-expression"] = self.node_label
        self.app_id = app_id
        state = watcher.track(app_id, self.kernel_id)  # before submitting: a failed start still kills it
        try:
            await rm.acall("request", "/ws/v1/cluster/apps", "POST", json=body, **as_user)
        except BackendError as exc:
            raise LaunchError(f"YARN refused application {app_id}: {exc}") from exc
        state.tracked_at = time.monotonic()  # a poll that started before the RM had it must not end it
        self.log.info("kernel %s: YARN application %s submitted to queue %s (%s MB, %s vcores)", self.kernel_id,
                      app_id, resources["queue"], resources["memory"], resources["vcores"])
        await self._await_am_container(_timeout(env.get("KERNEL_LAUNCH_TIMEOUT"), self.launch_timeout) * self.queue_wait)

    async def _await_am_container(self, wait: float) -> None:
        """Return once the AM container is allocated (or the app ended); raise :class:`YarnCapacityError` when
        the queue's AM resource limit kept it waiting for ``wait`` seconds (the app is killed by the caller)."""
        loop_deadline = time.monotonic() + wait
        while (app := self.app) is not None and not app.final and not app.am_host_http and app.state != "RUNNING":
            remaining = loop_deadline - time.monotonic()
            if remaining <= 0:
                if "resource limit exceeded" in app.diagnostics.lower():
                    raise YarnCapacityError(f"YARN queue cannot take kernel {self.kernel_id} now: application "
                                            f"{app.app_id} waited {wait:.0f}s for its ApplicationMaster container; "
                                            f"YARN says: {app.diagnostics.strip()}", kernel_id=self.kernel_id)
                return  # waiting for another reason: the handshake's timeout and diagnostics apply
            await self.watcher.next_round(remaining)

    async def _await_handshake(self, timeout: float) -> LaunchInfo:
        # the launch timeout covers the whole start: the time submitting and queueing took is not left
        return await super()._await_handshake(max(timeout - (time.monotonic() - self._started_at), 1.0))

    def launcher_exit_status(self) -> int | None:
        app = self.app
        if app is None:  # none submitted yet: starting, unless the gateway ended the launch before it got one
            return None if self.app_id is None and not self._stop_requested else -1
        if not app.final:
            return None
        return 0 if app.final_status == "SUCCEEDED" else (-9 if app.state == "KILLED" else 1)

    async def kill_launcher(self) -> None:
        app = self.app
        if app is None or app.final:
            return
        try:
            await self.watcher.rm.acall("cluster_application_kill", app.app_id)
        except YarnAPIError as exc:
            if exc.status not in (400, 404):  # 400: already in a final state; 404: unknown to the RM
                raise BackendError(f"could not kill YARN application {app.app_id} of kernel {self.kernel_id}: {exc}") from exc
        if await self.watcher.wait_final(app.app_id, self.kill_timeout) is None:
            raise BackendError(f"YARN application {app.app_id} of kernel {self.kernel_id} was not final "
                               f"{self.kill_timeout:g}s after the kill request")

    async def launch_diagnostics(self) -> str:
        app = self.app
        if app is None:
            return ""
        text = f"YARN application {app.app_id} is {app.state}" + (f"/{app.final_status}" if app.final_status else "")
        if app.diagnostics.strip():
            text += f"; YARN says: {app.diagnostics.strip()}"
        container = app.am_container_logs.rstrip("/").split("/")[-2] if app.am_container_logs.count("/") > 3 else ""
        for name in self.diagnostic_logs:
            if not app.am_host_http or not container.startswith("container_") or f"of {name}" in app.diagnostics:
                continue  # YARN's diagnostics quote "Last 4096 bytes of stderr" when the container failed
            url = f"http://{app.am_host_http}/ws/v1/node/containerlogs/{container}/{name}?size=-2048"
            page = await run_blocking(self.watcher.rm.get_text, url, self.rm_timeout)
            tail = page.partition("LogContents:")[2].partition("End of LogType")[0].strip() or page.strip()
            if tail and tail not in app.diagnostics:
                text += f"; last lines of the AM container's {name}:\n{tail}"
        # an AM may echo its whole command (the bootstrap's base64 included): keep each line short
        return "\n".join(line if len(line) <= 300 else line[:300] + "..." for line in text.splitlines())

    @property
    def has_process(self) -> bool:
        return super().has_process or self.app_id is not None

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart)
        if self.app_id:
            try:
                await self.kill_launcher()
            finally:
                self.watcher.forget(self.app_id)
                self.app_id = None

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Calls ``super()`` first; adds the application id and the AM's host (re-attach by a later gateway)."""
        info = await super().get_provisioner_info()
        app = self.app
        info.update(app_id=self.app_id, am_host=(app.am_host_http.rsplit(":", 1)[0] if app else "")
                    or info.get("hostname", ""))
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Calls ``super()`` first (which restores the launch, control key included, so signals work as for a kernel
        this gateway started); watches the stored application again in the shared RM watch."""
        await super().load_provisioner_info(provisioner_info)
        self.app_id = provisioner_info.get("app_id")
        if self.app_id:
            self.watcher.track(self.app_id, self.kernel_id)
