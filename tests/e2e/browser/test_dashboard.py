"""The operator page (``/dashboard``) in headless Chromium against a real gateway.

The browser steps live in ``dashboard.spec.mjs``: log in with the token, see a kernel started over the REST API
(its user, a hostile string, shown as text), see the page refresh itself, click the kernel's "Shut down" button.
Here the kernel must then be gone from ``GET /api/kernels`` too. Screenshots (``dashboard.png`` with the kernels,
``dashboard-after-shutdown.png``) are kept under the test's tmp path, as the JupyterLab test keeps its own, or under
``$TEST_ARTIFACTS_DIR/dashboard`` when that is set (pytest keeps only its last three tmp roots); their directory is
printed.

Needs Debian's chromium and ``node_modules`` here: run ``tests/services/install-browser.sh`` once.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.browser.test_jupyterlab import (
    CHROMIUM,
    HERE,
    _gateway_kernel_ids,
    _isolated_env,
    _require_browser_tooling,
)
from tests.e2e.conftest import http
from tests.services.gateway import start_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

SPEC = HERE / "dashboard.spec.mjs"
HOSTILE_USER = '<img src=x onerror=alert(1)><script>alert("owned")</script>'


def _start_kernel(gateway, user: str) -> str:
    body = {"name": "python3", "env": {"KERNEL_USERNAME": user}}
    resp = http("POST", f"{gateway.url}/api/kernels", gateway.headers, body)
    assert resp.status == 201, (resp.status, resp.body, gateway.log()[-3000:])
    return resp.json()["id"]


@pytest.mark.timeout(240)
def test_dashboard_shows_a_kernel_and_shuts_it_down(tmp_path, capsys):
    node = _require_browser_tooling()
    gw_tmp = tmp_path / "gateway"
    gw_tmp.mkdir()
    gateway = start_gateway(tmp_path=gw_tmp, env=_isolated_env(gw_tmp))
    artifacts = os.environ.get("TEST_ARTIFACTS_DIR")
    screenshots = Path(artifacts) / "dashboard" if artifacts else tmp_path / "screenshots"
    try:
        doomed, kept = _start_kernel(gateway, HOSTILE_USER), _start_kernel(gateway, "alice")
        env = dict(os.environ, GATEWAY_URL=gateway.url, GATEWAY_TOKEN=gateway.token, KERNEL_ID=doomed,
                   KEEP_KERNEL_ID=kept, KERNEL_USER=HOSTILE_USER, SCREENSHOT_DIR=str(screenshots),
                   CHROMIUM_PATH=CHROMIUM, TMPDIR=str(tmp_path))
        try:
            result = subprocess.run([node, str(SPEC)], cwd=HERE, env=env, capture_output=True, text=True, timeout=180,
                                    check=False)
        except subprocess.TimeoutExpired as err:
            pytest.fail(f"dashboard.spec.mjs did not finish in {err.timeout}s\nstdout:\n{err.stdout}\nstderr:\n"
                        f"{err.stderr}\n--- gateway log ---\n{gateway.log()[-4000:]}")
        with capsys.disabled():
            print(f"\n{result.stdout}screenshots: {screenshots}")
        assert result.returncode == 0, (
            f"dashboard browser e2e failed (exit {result.returncode}); screenshots in {screenshots}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}\n--- gateway log (tail) ---\n{gateway.log()[-4000:]}")
        assert _gateway_kernel_ids(gateway) == [kept]
        log = gateway.log()  # the page's buttons went through the REST API
        assert f"204 DELETE /api/kernels/{doomed}" in log and f"204 POST /api/kernels/{kept}/interrupt" in log
        assert f"200 POST /api/kernels/{kept}/restart" in log
        for name in ("dashboard.png", "dashboard-after-shutdown.png"):
            assert (screenshots / name).stat().st_size > 10_000, name
        assert gateway.token not in gateway.log()
    finally:
        gateway.stop()
