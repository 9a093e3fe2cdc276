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
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from typing import Any

from traitlets import Float, validate

from .errors import LaunchError, LaunchRequestError
from .remote import _timeout
from .yarn import _USERNAME, SECRET_KEY, TAG, YarnProvisioner, _tag
from .yarn_rm import LIVE_STATES

__all__ = ["YarnSparkProvisioner", "hadoop_credentials"]

_APP_ID = re.compile(r"application_\d+_\d+")


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


class YarnSparkProvisioner(YarnProvisioner):
    """Starts each kernel as the Python driver of a Spark application in YARN cluster mode (spark-submit)."""

    submit_timeout = Float(
        120.0, config=True,
        help="Seconds spark-submit may take to submit the application (it exits once YARN accepted it); the "
        "launch timeout still bounds the whole start.",
    ).tag(env="GATEWAY_YARN_SPARK_SUBMIT_TIMEOUT")

    @validate("am_command")
    def _am_command(self, proposal: dict[str, Any]) -> str:
        return proposal["value"]  # unused: Spark's own ApplicationMaster runs the driver

    _submit_env: dict[str, str] | None = None  # set by launch_kernel
    _submit: asyncio.subprocess.Process | None = None

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> dict[str, Any]:
        """Keeps the gateway-side environment for spark-submit (a local process), then ``super()``."""
        # the client's KERNEL_* values travel in the launch secret; spark-submit does not need them
        self._submit_env = {k: v for k, v in kwargs.get("env", {}).items() if not k.startswith("KERNEL_")}
        return await super().launch_kernel(cmd, **kwargs)

    def submit_command(self, cmd: list[str], env: dict[str, str]) -> list[str]:
        """The kernelspec's spark-submit argv with our options inserted after the program (values are argv
        elements, never shell text; Spark escapes what reaches the AM command) and the launcher's secret flag."""
        if "--deploy-mode" not in cmd or "cluster" not in cmd:
            raise LaunchRequestError("a yarn-spark kernelspec runs spark-submit --master yarn --deploy-mode cluster")
        resources = self.yarn_resources(env)
        user = env.get("KERNEL_USERNAME", "")
        tags = [TAG, self.watcher.tag, _tag("kg-kernel:", self.kernel_id)] + ([_tag("kg-user:", user)] if user else [])
        options = ["--queue", resources["queue"], "--driver-memory", f"{resources['memory']}m",
                   "--driver-cores", str(resources["vcores"]),
                   "--conf", f"spark.yarn.priority={resources['priority']}",
                   "--conf", f"spark.yarn.tags={','.join(tags)}",
                   "--conf", "spark.yarn.submit.waitAppCompletion=false",
                   "--conf", "spark.yarn.maxAppAttempts=1"]
        if self.node_label:
            options += ["--conf", f"spark.yarn.am.nodeLabelExpression={self.node_label}"]
        if self.impersonate:
            if not _USERNAME.match(user):
                raise LaunchRequestError(f"KERNEL_USERNAME {user!r} is not a valid user name for impersonation")
            options += ["--proxy-user", user]
        tail = [] if "--launch-token-yarn-secret" in cmd else ["--launch-token-yarn-secret", SECRET_KEY]
        return [cmd[0], *options, *cmd[1:], *tail]

    async def start_launcher(self, cmd: list[str], env: dict[str, str], token: str) -> None:
        self._started_at = time.monotonic()
        self.app_id, self._submit = None, None
        argv = self.submit_command(cmd, env)
        await self.watcher.reap(set(self.watcher.apps))
        private = tempfile.mkdtemp(prefix="kg-spark-")  # mode 0700
        try:
            path = os.path.join(private, "launch.creds")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as file:
                file.write(hadoop_credentials({SECRET_KEY: json.dumps({"token": token, "env": env}).encode()}))
            submit_env = {**(self._submit_env or {}), "HADOOP_TOKEN_FILE_LOCATION": path}
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
                                               application_tags=[_tag("kg-kernel:", self.kernel_id)])
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
