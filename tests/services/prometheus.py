"""A real Prometheus for the tests: Debian's package, scraping one gateway every second on a loopback port.

:func:`start_prometheus` installs ``prometheus`` with apt when missing, writes a scrape config for the gateway
(with its token, if it has one), starts the server with its storage in a directory of the test's, and waits
until it is ready. :meth:`PrometheusServer.query` asks its HTTP query API (``/api/v1/query``);
:meth:`PrometheusServer.stop` ends it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from .apt import install_missing
from .gateway import GatewayServer, free_port, wait_until

__all__ = ["PrometheusServer", "start_prometheus"]


def log(message: str) -> None:
    print(f"[prometheus {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class PrometheusServer:
    """One running server: its work directory, port and process."""

    workdir: Path
    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _get(self, path: str, timeout: float = 10) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return 0, b""

    def query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        """The instant vector ``promql`` evaluates to now: ``(labels, value)`` for each series."""
        status, body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if status != 200:
            raise RuntimeError(f"query {promql!r} answered {status}: {body[:500]!r}")
        data = json.loads(body)["data"]
        assert data["resultType"] == "vector", data
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def value(self, promql: str) -> float | None:
        """The value of a query that yields one series (e.g. a ``sum``); None while it yields none."""
        result = self.query(promql)
        assert len(result) <= 1, result
        return result[0][1] if result else None

    def wait_value(self, promql: str, expected: float, timeout: float = 60) -> float:
        """Wait until ``promql`` evaluates to ``expected`` (scrapes come every second); return it."""
        seen: list[float | None] = []

        def matches() -> bool:
            seen.append(self.value(promql))
            return seen[-1] == expected

        try:
            wait_until(matches, timeout, 0.5, what=f"{promql} == {expected}")
        except TimeoutError:
            raise TimeoutError(f"{promql} never became {expected}; last values {seen[-5:]}") from None
        return expected

    def scrape_health(self) -> list[dict]:
        """The active targets as Prometheus reports them (health, lastError)."""
        status, body = self._get("/api/v1/targets")
        return json.loads(body)["data"]["activeTargets"] if status == 200 else []

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        install_missing(["prometheus"], log=log)
        found = shutil.which("prometheus")
    if found is None:
        raise RuntimeError("the prometheus package is installed but no prometheus binary is on PATH")
    return found


def start_prometheus(workdir: Path, gateway: GatewayServer, timeout: float = 60) -> PrometheusServer:
    """Prometheus scraping ``gateway``'s ``/metrics`` every second (with its token, if it has one)."""
    binary = _binary()
    workdir.mkdir(parents=True, exist_ok=True)
    job: dict = {"job_name": "kernel-gateway", "metrics_path": "/metrics",
                 "static_configs": [{"targets": [f"{gateway.host}:{gateway.port}"]}]}
    if gateway.token:
        job["authorization"] = {"type": "Bearer", "credentials": gateway.token}
    config = {"global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
              "scrape_configs": [job]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"]
    with open(workdir / "prometheus.log", "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=workdir, start_new_session=True)
    server = PrometheusServer(workdir, port, proc)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited ({proc.returncode}):\n{server.log()[-3000:]}")
        return server._get("/-/ready", timeout=2)[0] == 200

    try:
        wait_until(ready, timeout, 0.2, what="prometheus /-/ready")
    except BaseException:
        server.stop()
        raise
    log(f"Prometheus on {server.url} scraping {gateway.url}/metrics")
    return server
