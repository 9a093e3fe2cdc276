"""YARN Spark kernels: each kernel is the Python driver of a ``spark-submit --deploy-mode cluster`` application.

The kernelspec's argv runs ``spark-submit --master yarn --deploy-mode cluster --name {kernel_id}`` with our
launcher as the Python driver (the primary resource). The provisioner runs it on the gateway host with
``spark.yarn.submit.waitAppCompletion=false``, adds the queue, driver resources, priority, node label and the
application tags it owns, then finds the application by its kernel tag and watches it with the same shared
:class:`~provisioners.yarn_rm.ApplicationWatcher` as native kernels; kill goes through the RM.

The launch token and the kernel's ``KERNEL_*`` environment take the same path as in native mode, as a secret
of the application's credentials: the provisioner writes them to a private Hadoop credentials file (mode
0600) named by ``HADOOP_TOKEN_FILE_LOCATION`` in spark-submit's environment only; Hadoop's login user loads
it and Spark's YARN client ships the login user's credentials in the AM container's tokens (never in the
Spark conf, the command line, the RM's REST API, Spark's UI or event log). The launcher
(``--launch-token-yarn-secret``) reads it from ``container_tokens`` and deletes that file. The file on the
gateway host is removed as soon as spark-submit exits.

Impersonation (``impersonate``) adds ``--proxy-user <KERNEL_USERNAME>``. Spark gives a proxy user none of the
submitting user's credentials, so then the same credentials file is localized into the driver's container with
``--files`` instead (uploaded to the application's staging directory, which only the kernel's user can read) and
the launcher reads it there (``--launch-secret-file``) and deletes its link.

With a port range, the driver's RPC, block manager and UI ports (and the executors' block managers) start at its
low end and Spark's bind retries stay inside it (``spark.port.maxRetries``), unless the kernelspec sets them.

Enterprise Gateway's Spark kernelspecs (``bin/run.sh`` that runs ``eval exec spark-submit ${SPARK_OPTS} ...``)
work unchanged: our options are appended to ``SPARK_OPTS``, each quoted for that ``eval``, and the spec's ``env``
is substituted again with only values the gateway vouches for (the kernel id, a ``KERNEL_USERNAME`` that is a
plain user name), because jupyter_client substitutes client ``KERNEL_*`` text into it and ``eval`` would run it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import tempfile
import time
from string import Template
from typing import Any

from traitlets import Float, validate

from .errors import LaunchError, LaunchRequestError
from .ports import parse_port_range
from .remote import _timeout, impersonated_user, is_user_name
from .yarn import SECRET_KEY, YarnProvisioner, app_tag
from .yarn_rm import LIVE_STATES

__all__ = ["YarnSparkProvisioner", "hadoop_credentials", "spark_port_options"]

_APP_ID = re.compile(r"application_\d+_\d+")
SECRET_FILE = "kg-launch.creds"  # the launch secret's file name in the driver's container, with impersonation


def _vint(value: int) -> bytes:
    """Hadoop ``WritableUtils.writeVInt`` of a non-negative int."""
    if value <= 127:
        return bytes([value])
    data = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return bytes([256 - 112 - len(data)]) + data


def hadoop_credentials(secrets: dict[str, bytes]) -> bytes:
    """A Hadoop credentials file (Writable format, version 0) holding no tokens and these secret keys."""
    out = b"HDTS\x00" + _vint(0) + _vint(len(secrets))
    for key, value in secrets.items():
        name = key.encode()
        out += _vint(len(name)) + name + _vint(len(value)) + value
    return out


def spark_port_options(port_range: str, given: str, service: bool = False) -> list[str]:
    """``--conf`` options that keep Spark's driver RPC, block manager (driver's and executors') and UI ports inside
    ``port_range`` (none without one): each starts at the range's low end and Spark's bind retries stay inside it.
    ``service``: the driver's three start one apart (Kubernetes lists them as its Service's ports, which must
    differ). A setting already in ``given`` (the kernelspec's own options) wins."""
    ports = parse_port_range(port_range)
    if ports is None:
        return []
    step = 1 if service else 0
    defaults = {"spark.driver.port": ports.low, "spark.blockManager.port": ports.low,
                "spark.ui.port": ports.low + 2 * step,
                "spark.port.maxRetries": ports.size - 1 - 2 * step}  # Spark binds base, base+1, ... base+maxRetries
    if service:
        defaults["spark.driver.blockManager.port"] = ports.low + step
    return [arg for key, value in defaults.items() if f"{key}=" not in given for arg in ("--conf", f"{key}={value}")]


class YarnSparkProvisioner(YarnProvisioner):
    """Starts each kernel as the Python driver of a Spark application in YARN cluster mode (spark-submit)."""

    supports_warm = False  # spark-submit starts the launcher inside the driver: nothing to keep warm

    submit_timeout = Float(
        120.0, config=True,
        help="Seconds spark-submit may take to submit the application (it exits once YARN accepted it); the "
        "launch timeout still bounds the whole start.",
    ).tag(env="GATEWAY_YARN_SPARK_SUBMIT_TIMEOUT")

    @validate("am_command")
    def _am_command(self, proposal: dict[str, Any]) -> str:
        return proposal["value"]  # unused: Spark's own ApplicationMaster runs the driver

    diagnostic_logs = ("stderr", "stdout")  # the driver's Python (our launcher) writes to the AM's stdout
    _submit_env: dict[str, str] | None = None  # set by launch_kernel
    _submit: asyncio.subprocess.Process | None = None

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        """Keeps the gateway-side environment for spark-submit (a local process), then ``super()``."""
        # the client's KERNEL_* values travel in the launch secret; spark-submit does not need them
        self._submit_env = {k: v for k, v in kwargs.get("env", {}).items() if not k.startswith("KERNEL_")}
        return await super().launch_kernel(cmd, **kwargs)

    def spark_options(self, env: dict[str, str], given: str) -> list[str]:
        """Our spark-submit options: queue, driver resources, priority, tags, node label, proxy user and, with a
        port range, the ports (``given``: the kernelspec's own options, whose port settings win)."""
        resources = self.yarn_resources(env)
        options = ["--queue", resources["queue"], "--driver-memory", f"{resources['memory']}m",
                   "--driver-cores", str(resources["vcores"]),
                   "--conf", f"spark.yarn.priority={resources['priority']}",
                   "--conf", f"spark.yarn.tags={','.join(self.app_tags(env))}",
                   "--conf", "spark.yarn.submit.waitAppCompletion=false",
                   "--conf", "spark.yarn.maxAppAttempts=1"]
        if self.node_label:
            options += ["--conf", f"spark.yarn.am.nodeLabelExpression={self.node_label}"]
        if self.impersonate:
            options += ["--proxy-user", impersonated_user(env)]
        return options + spark_port_options(self.port_range, given)

    def submit_command(self, cmd: list[str], env: dict[str, str], secret_path: str) -> list[str]:
        """The kernelspec's spark-submit argv with our options inserted after the program (values are argv
        elements, never shell text; Spark escapes what reaches the AM command) and the launcher's secret flags.

        With impersonation the credentials file ``secret_path`` is also localized into the driver's container
        (``--files``): Spark gives a proxy user none of the submitting user's credentials."""
        if "--deploy-mode" not in cmd or "cluster" not in cmd:
            raise LaunchRequestError("a yarn-spark kernelspec runs spark-submit --master yarn --deploy-mode cluster")
        argv = [cmd[0], *self.spark_options(env, " ".join(cmd)), *cmd[1:]]
        if "--launch-token-yarn-secret" not in cmd:
            argv += ["--launch-token-yarn-secret", SECRET_KEY]
        if self.impersonate:
            files = f"{secret_path}#{SECRET_FILE}"
            if "--files" in argv:  # spark-submit keeps only the last --files: join the kernelspec's
                index = argv.index("--files") + 1
                argv[index] = f"{argv[index]},{files}"
            else:
                argv[1:1] = ["--files", files]
            argv += ["--launch-secret-file", SECRET_FILE]
        return argv

    def enterprise_gateway_env(self, env: dict[str, str], submit_env: dict[str, str]) -> dict[str, str]:
        """The environment of an Enterprise Gateway ``run.sh``: the spec's env substituted again from the gateway's
        environment, the kernel id and a plain-user-name ``KERNEL_USERNAME`` only, with our options appended to
        ``SPARK_OPTS`` quoted for run.sh's ``eval``. EG's own impersonation switch is dropped: ``impersonate`` rules."""
        vouched = {"KERNEL_ID": self.kernel_id}
        if is_user_name(env.get("KERNEL_USERNAME", "")):
            vouched["KERNEL_USERNAME"] = env["KERNEL_USERNAME"]
        values = {**submit_env, **vouched}
        spec_env = {key: Template(value).safe_substitute(values) for key, value in (self.kernel_spec.env or {}).items()}
        spark_opts = spec_env.get("SPARK_OPTS", "")
        if "--deploy-mode cluster" not in " ".join(spark_opts.split()):
            raise LaunchRequestError("an Enterprise Gateway YARN Spark kernelspec sets SPARK_OPTS with "
                                     "--master yarn --deploy-mode cluster")
        options = self.spark_options(env, spark_opts)
        spec_env["SPARK_OPTS"] = " ".join([spark_opts, *(shlex.quote(option) for option in options)])
        result = {**submit_env, **spec_env, **vouched}
        result.pop("EG_IMPERSONATION_ENABLED", None)
        return result

    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        self._started_at = time.monotonic()
        self.app_id, self._submit = None, None
        submit_env = dict(self._submit_env or {})
        await self.watcher.reap(set(self.watcher.apps))
        private = tempfile.mkdtemp(prefix="kg-spark-")  # mode 0700
        try:
            if self.runs_enterprise_gateway_launcher:  # EG's launcher reports without a token: no launch secret
                argv, submit_env = cmd, self.enterprise_gateway_env(env, submit_env)
            else:
                path = os.path.join(private, SECRET_FILE)
                argv = self.submit_command(cmd, env, path)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as file:
                    file.write(hadoop_credentials({SECRET_KEY: json.dumps({"token": token, "env": env}).encode()}))
                if not self.impersonate:  # the login user's credentials: Spark ships them in the AM's tokens
                    submit_env["HADOOP_TOKEN_FILE_LOCATION"] = path
            output = await self._run_submit(argv, submit_env)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        await self._find_app(output)
        if self.app_id is None:
            raise LaunchError(f"spark-submit ended without a YARN application for kernel {self.kernel_id}: "
                              f"{self._tail(output)}")
        self.log.info("kernel %s: Spark application %s submitted", self.kernel_id, self.app_id)
        await self._await_am_container(_timeout(env.get("KERNEL_LAUNCH_TIMEOUT"), self.launch_timeout) * self.queue_wait)

    async def _run_submit(self, argv: list[str], env: dict[str, str]) -> str:
        """Run spark-submit to its exit (bounded by ``submit_timeout``); its output, or LaunchError."""
        try:
            self._submit = await asyncio.create_subprocess_exec(
                *argv, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            raise LaunchError(f"cannot run {argv[0]!r} for kernel {self.kernel_id}: {exc}") from exc
        try:
            out, _ = await asyncio.wait_for(self._submit.communicate(), self.submit_timeout)
        except asyncio.TimeoutError:
            await self._stop_submit()
            await self._find_app("")
            raise LaunchError(f"spark-submit for kernel {self.kernel_id} did not finish in {self.submit_timeout:g}s") from None
        output = out.decode(errors="replace")
        if self._submit.returncode != 0:
            await self._find_app(output)
            raise LaunchError(f"spark-submit for kernel {self.kernel_id} exited with status {self._submit.returncode}: "
                              f"{self._tail(output)}")
        return output

    @staticmethod
    def _tail(output: str, lines: int = 15) -> str:
        return "\n".join(line[:300] for line in output.strip().splitlines()[-lines:])

    async def _stop_submit(self) -> None:
        """Kill a spark-submit still running (a cancelled or timed-out start)."""
        proc = self._submit
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            await proc.wait()

    async def _find_app(self, output: str) -> None:
        """Track this kernel's application: the id spark-submit printed, else the one carrying its kernel tag."""
        if self.app_id is not None:
            return
        found = _APP_ID.findall(output)
        app_id = found[-1] if found else None
        if app_id is None:
            data = await self.watcher.rm.acall("cluster_applications", states=LIVE_STATES,
                                               application_tags=[app_tag("kg-kernel:", self.kernel_id)])
            apps = (data.get("apps") or {}).get("app") or []
            app_id = max((a["id"] for a in apps), default=None)
        if app_id is not None:
            self.app_id = app_id
            self.watcher.track(app_id, self.kernel_id)

    async def kill_launcher(self) -> None:
        await self._stop_submit()
        if self.app_id is None and self._submit is not None:
            await self._find_app("")  # submitted before spark-submit was stopped: still killed through the RM
        await super().kill_launcher()

    async def cleanup(self, restart: bool = False) -> None:
        """Calls ``super()`` (kills the application), then forgets this launch's spark-submit."""
        await super().cleanup(restart)
        self._submit = None
