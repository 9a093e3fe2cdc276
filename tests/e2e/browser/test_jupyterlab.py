"""JupyterLab in headless Chromium against our gateway, through jupyter_server in gateway mode.

Chain: Chromium (playwright-core) -> JupyterLab / jupyter_server ``--gateway-url`` -> our gateway -> ipykernel.
The browser steps live in ``jupyterlab.spec.mjs`` (open a notebook, run a cell, interrupt ``time.sleep(60)``,
restart the kernel from the Kernel menu, run a cell in the fresh kernel).

Needs Debian's chromium and ``node_modules`` here: run ``tests/services/install-browser.sh`` once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
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
