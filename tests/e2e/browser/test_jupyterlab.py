"""JupyterLab in headless Chromium against our gateway, through jupyter_server in gateway mode.

Chain: Chromium (playwright-core) -> JupyterLab / jupyter_server ``--gateway-url`` -> our gateway -> ipykernel.
The browser steps live in ``jupyterlab.spec.mjs``: scenario ``run-interrupt-restart`` (open a notebook, run a cell,
interrupt ``time.sleep(60)``, restart the kernel from the Kernel menu, run a cell in the fresh kernel) and scenario
``gateway-restart`` (set a variable, the test restarts the gateway with its kernels kept, print the variable in
the same page; no JupyterLab dialog may appear). The spec and the test talk over stdin/stdout lines for the latter.

Needs Debian's chromium and ``node_modules`` here: run ``tests/services/install-browser.sh`` once.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.services.gateway import GatewayServer, free_port, start_gateway, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

HERE = Path(__file__).resolve().parent
SPEC = HERE / "jupyterlab.spec.mjs"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
INSTALL_HINT = "run `tests/services/install-browser.sh` (as root: apt-get installs chromium, npm ci in tests/e2e/browser)"
NOTEBOOK = "e2e.ipynb"
EMPTY_NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "e2e-cell-0", "metadata": {}, "outputs": [], "source": []}],
    "metadata": {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    },
    "nbformat": 4,
    "nbformat_minor": 5,
}
# JupyterLab user settings: no news/update fetches (the machine has no internet) and no "news?" toast.
LAB_SETTINGS = {"@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False}}


def _require_browser_tooling() -> str:
    problems = []
    if not Path(CHROMIUM).exists():
        problems.append(f"{CHROMIUM} is missing")
    node = shutil.which("node")
    if not node:
        problems.append("node is not on PATH")
    if not (HERE / "node_modules" / "playwright-core" / "package.json").exists():
        problems.append(f"{HERE / 'node_modules'} has no playwright-core")
    if importlib.util.find_spec("jupyterlab") is None:
        problems.append(f"jupyterlab is not installed in {sys.prefix} (pip install 'jupyterlab>=4')")
    if problems:
        pytest.fail("browser e2e prerequisites missing: " + "; ".join(problems) + f". To fix, {INSTALL_HINT}.", pytrace=False)
    return node


def _isolated_env(base: Path, extra: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "KERNEL_"))}
    for name in ("config", "data", "runtime"):
        path = base / f"jupyter-{name}"
        path.mkdir(parents=True, exist_ok=True)
        env[f"JUPYTER_{name.upper()}_DIR"] = str(path)
    env.update(extra or {})
    return env


def _get(url: str, token: str, timeout: float = 5) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _start_lab_server(gateway: GatewayServer, tmp: Path) -> tuple[subprocess.Popen, str, str, Path, Path]:
    """jupyter_server (with the JupyterLab extension) in gateway mode; returns (proc, url, token, root, log)."""
    root = tmp / "root"
    root.mkdir()
    (root / NOTEBOOK).write_text(json.dumps(EMPTY_NOTEBOOK, indent=1))
    settings = tmp / "lab-user-settings"
    for rel, content in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(content))
    env = _isolated_env(tmp / "lab", {
        "JUPYTERLAB_SETTINGS_DIR": str(settings),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp / "lab-workspaces"),
    })
    port, token = free_port(), secrets.token_hex(16)
    argv = [
        sys.executable, "-m", "jupyter_server",
        "--ip=127.0.0.1", f"--port={port}", "--port-retries=0", "--no-browser", "--allow-root",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        f"--gateway-url={gateway.url}", f"--GatewayClient.auth_token={gateway.token}",
    ]
    log_path = tmp / f"jupyter-server-{port}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=tmp)
    url = f"http://127.0.0.1:{port}"

    def ready():
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        try:
            status, body = _get(f"{url}/api/kernelspecs", token, timeout=2)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False
        # /api/kernelspecs is proxied to the gateway: this also proves jupyter_server can reach it.
        return status == 200 and "python3" in json.loads(body).get("kernelspecs", {})

    try:
        wait_until(ready, 60, interval=0.1, what="jupyter server /api/kernelspecs listing python3 from the gateway")
    except BaseException:
        _stop(proc)
        raise
    return proc, url, token, root, log_path


def _stop(proc: subprocess.Popen, timeout: float = 20) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as err:
        return f"({err})"


def run_lab_e2e(gateway: GatewayServer, tmp: Path, node: str) -> None:
    """Start jupyter_server against ``gateway`` and drive JupyterLab with the Node spec; assert it passes."""
    proc, url, token, _root, lab_log = _start_lab_server(gateway, tmp)
    try:
        screenshot = tmp / "jupyterlab-failure.png"
        env = dict(os.environ, LAB_URL=url, LAB_TOKEN=token, NOTEBOOK=NOTEBOOK, SCREENSHOT=str(screenshot),
                   CHROMIUM_PATH=CHROMIUM, TMPDIR=str(tmp))
        try:
            result = subprocess.run([node, str(SPEC)], cwd=HERE, env=env, capture_output=True, text=True, timeout=200)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"jupyterlab.spec.mjs did not finish in {err.timeout}s\nstdout:\n{err.stdout}\nstderr:\n{err.stderr}\n"
                        f"--- jupyter server log ---\n{_tail(lab_log)}\n--- gateway log ---\n{gateway.log()[-4000:]}")
        print(result.stdout)
        assert result.returncode == 0, (
            f"JupyterLab browser e2e failed (exit {result.returncode}); screenshot (if any): {screenshot}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n"
            f"--- jupyter server log (tail) ---\n{_tail(lab_log)}\n--- gateway log (tail) ---\n{gateway.log()[-4000:]}"
        )
    finally:
        _stop(proc)


class SpecProcess:
    """``jupyterlab.spec.mjs`` running as a child whose stdout is read line by line (control lines start with
    ``@@``) and whose stdin takes the test's answers."""

    def __init__(self, node: str, env: dict, tmp: Path):
        self.stderr_path = tmp / "spec-stderr.log"
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen([node, str(SPEC)], cwd=HERE, env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
        self.lines: list[str] = []
        self._control: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("@@ "):
                self._control.put(line[3:])
        self._control.put("")  # end of output

    def expect(self, word: str, timeout: float) -> str:
        """Wait for the control line ``@@ <word> ...`` and return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._control.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise TimeoutError(f"timed out after {timeout}s waiting for the spec's {word} line") from None
            if line.startswith(word):
                return line[len(word):].strip()
            if not line:
                raise RuntimeError(f"the spec ended (exit {self.proc.wait(10)}) before its {word} line")

    def send(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float) -> int:
        try:
            self.proc.stdin.close()
        except OSError:
            pass  # the spec already exited
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def output(self) -> str:
        self._reader.join(10)
        return "stdout:\n" + "\n".join(self.lines) + "\nstderr:\n" + _tail(self.stderr_path, 8000)


def _keep_env(base: Path) -> dict[str, str]:
    """A gateway that keeps its kernels across its restart, in a SQLite store under ``base``."""
    key_file = base / "store.key"
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o600)
    return {"GATEWAY_KERNELS_ON_STOP": "keep", "GATEWAY_KERNEL_STORE_KEY_FILE": str(key_file),
            "GATEWAY_KERNEL_STORE_PATH": str(base / "kernels.sqlite")}


def _dropped_by_jupyter_server(lab_log: Path) -> int:
    """Messages from the page that jupyter_server dropped because its websocket to the gateway was down: written to
    the closed one (before its first reconnect attempt) or sent after a failed attempt (during its back-off)."""
    text = _tail(lab_log, 10**7)
    return text.count("Exception writing message to websocket") + text.count("Ignoring message on failed connection")


def _gateway_kernel_ids(gateway: GatewayServer) -> list[str]:
    status, body = _get(f"{gateway.url}/api/kernels", gateway.token)
    assert status == 200, body
    return [k["id"] for k in json.loads(body)]


@pytest.mark.timeout(280)
def test_jupyterlab_notebook_run_interrupt_restart(tmp_path):
    node = _require_browser_tooling()
    gw_tmp = tmp_path / "gateway"
    gw_tmp.mkdir()
    gateway = start_gateway(tmp_path=gw_tmp, env=_isolated_env(gw_tmp))
    try:
        run_lab_e2e(gateway, tmp_path, node)
    finally:
        gateway.stop()


@pytest.mark.timeout(400)
def test_jupyterlab_keeps_its_kernel_across_a_gateway_restart(tmp_path):
    """A notebook open in JupyterLab sets a variable; the gateway is stopped (SIGTERM, kernels kept) and started
    again at the same address on the same store; the same page prints the variable, and no dialog ever showed."""
    node = _require_browser_tooling()
    gw_tmp = tmp_path / "gateway"
    gw_tmp.mkdir()
    gw_env = _isolated_env(gw_tmp, _keep_env(gw_tmp))
    first = start_gateway(tmp_path=gw_tmp, env=gw_env)
    gateways = [first]
    proc, url, token, _root, lab_log = _start_lab_server(first, tmp_path)
    screenshot, final = tmp_path / "jupyterlab-failure.png", tmp_path / "jupyterlab-gateway-restart.png"
    env = dict(os.environ, LAB_URL=url, LAB_TOKEN=token, NOTEBOOK=NOTEBOOK, SCREENSHOT=str(screenshot),
               FINAL_SCREENSHOT=str(final), SCENARIO="gateway-restart", CHROMIUM_PATH=CHROMIUM, TMPDIR=str(tmp_path),
               TOTAL_TIMEOUT_MS="330000", RESTART_TIMEOUT_MS="120000")
    spec = SpecProcess(node, env, tmp_path)

    def report(what: str) -> str:
        return (f"{what}; screenshot (if any): {screenshot}\n{spec.output()}\n--- jupyter server log (tail) ---\n"
                f"{_tail(lab_log)}\n" + "\n".join(f"--- gateway {i + 1} log (tail) ---\n{_tail(g.log_path)}"
                                                    for i, g in enumerate(gateways)))

    try:
        try:
            kernel_id = spec.expect("READY_FOR_GATEWAY_RESTART", 150)
        except (TimeoutError, RuntimeError) as err:
            pytest.fail(report(f"the notebook did not get ready for the gateway restart: {err}"), pytrace=False)
        assert _gateway_kernel_ids(first) == [kernel_id]

        retry_line = "Attempting to re-establish the connection to Gateway"
        retries_before = _tail(lab_log, 10**7).count(retry_line)  # jupyter_server's first connect can retry too
        dropped_before = _dropped_by_jupyter_server(lab_log)
        stopping = time.monotonic()
        first.stop(signal.SIGTERM, timeout=30)
        stop_seconds = time.monotonic() - stopping
        assert "left 1 kernels running" in first.log(), report("the first gateway did not keep the kernel")
        assert stop_seconds < 10, report(f"a keeping gateway took {stop_seconds:.1f}s to stop")
        second_tmp = gw_tmp / "second"  # its own log file (start_gateway names logs by port: the first's stays)
        second_tmp.mkdir()
        second = start_gateway(tmp_path=second_tmp, token=first.token, env=gw_env, port=first.port, timeout=60)
        ready_at = time.time()  # /readyz has just answered 200 (start_gateway polls it every 50 ms)
        gateways.append(second)
        down_seconds = time.monotonic() - stopping
        assert _gateway_kernel_ids(second) == [kernel_id], report("the new gateway does not serve the kernel")
        spec.send(f"GATEWAY_RESTARTED {ready_at * 1000:.0f}")
        # jupyter_server's websocket to the kernel comes back (after its own back-off): the gateway logs it
        wait_until(lambda: "client connected" in second.log(), 60, what="jupyter_server reconnecting to the gateway")
        reconnected_after = time.time() - ready_at

        try:
            after_readyz_ms, runs = spec.expect("CELL_AFTER_READYZ_MS", 150).split(" RUNS ")
        except (TimeoutError, RuntimeError) as err:
            pytest.fail(report(f"the cell after the gateway restart did not succeed: {err}"), pytrace=False)
        code = spec.finish(60)
        assert code == 0, report(f"JupyterLab gateway-restart scenario failed (exit {code})")
        reconnects = _tail(lab_log, 10**7).count(retry_line) - retries_before
        dropped_messages = _dropped_by_jupyter_server(lab_log) - dropped_before
        print("\n".join(spec.lines))
        print(f"gateway restart: SIGTERM returned in {stop_seconds:.2f}s; gateway down (SIGTERM to new /readyz) "
              f"{down_seconds:.2f}s; jupyter_server reconnected to the gateway {reconnected_after:.2f}s after /readyz "
              f"({reconnects} attempts); the notebook's cell succeeded {int(after_readyz_ms) / 1000:.2f}s after /readyz "
              f"on run #{runs} (the spec runs it again when the kernel has not taken it within 2 s); jupyter_server "
              f"dropped {dropped_messages} message(s) from the page while its websocket to the gateway was down "
              f"(a dropped execute_request leaves the cell at [*] for good); screenshot: {final}")
        assert final.exists()
    finally:
        spec.finish(10)
        _stop(proc)  # jupyter_server shuts its kernels down through the gateway, if one is up
        for gateway in reversed(gateways):
            gateway.stop()
        # a gateway on the same store that ends its kernels when it stops: nothing kept outlives the test
        cleanup_tmp = gw_tmp / "cleanup"
        cleanup_tmp.mkdir()
        start_gateway(tmp_path=cleanup_tmp, env={**gw_env, "GATEWAY_KERNELS_ON_STOP": "shutdown"}, timeout=60).stop()
