"""The operator page over HTTP: login (form, ``?token=``, cookie + XSRF header), what it shows, escaping, no secrets.

One gateway with local ipykernels serves the module; the browser test is ``tests/e2e/browser/test_dashboard.py``.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from urllib.parse import urlencode

import pytest
import websocket
from prometheus_client.parser import text_string_to_metric_families

from kernel_gateway.kernels.location import describe_location
from kernel_gateway.web import browser_login
from tests.api.helpers import (
    IPYKERNEL_ARGV,
    assert_error,
    connection_info,
    delete_all_kernels,
    kernel_ids,
    kernel_pid,
    write_spec,
)
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import start_gateway, wait_until

HOSTILE_USER = '<script>alert("owned")</script><img src=x onerror=alert(1)>&amp;'
HTML = {"Accept": "text/html,application/xhtml+xml"}
LOCAL = "local-port-range-provisioner"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dashboard")
    write_spec(tmp / "jupyter", "python3", IPYKERNEL_ARGV)
    write_spec(tmp / "jupyter", "missingbin", ["/nonexistent/kgw-no-such-binary", "-f", "{connection_file}"])
    server = start_gateway(tmp_path=tmp, env={"JUPYTER_PATH": str(tmp / "jupyter"),
                                              "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")})
    server.extra["runtime"] = tmp / "runtime"
    yield server
    delete_all_kernels(server)
    server.stop()


@pytest.fixture
def kernel(gw):
    kid = start_kernel(gw, env={"KERNEL_USERNAME": HOSTILE_USER})
    yield kid
    call(gw, "DELETE", f"/api/kernels/{kid}")


def raw(gw, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """One request without following redirects: ``(status, headers as a list of pairs, body text)``."""
    conn = http.client.HTTPConnection(gw.host, gw.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read().decode()
    finally:
        conn.close()


def header(headers: list, name: str) -> str:
    return next((v for k, v in headers if k.lower() == name.lower()), "")


def log_in(gw) -> tuple[str, str]:
    """Post the login form; return the cookie header value and the page's XSRF value."""
    form = urlencode({"token": gw.token}).encode()
    status, headers, _ = raw(gw, "POST", "/dashboard", {"Content-Type": "application/x-www-form-urlencoded"}, form)
    assert status == 303 and header(headers, "Location") == "/dashboard", (status, headers)
    set_cookie = header(headers, "Set-Cookie")
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/" in set_cookie, set_cookie
    assert gw.token not in set_cookie
    cookie = set_cookie.split(";", 1)[0]
    status, _, page = raw(gw, "GET", "/dashboard", {"Cookie": cookie})
    assert status == 200, page
    return cookie, page_config(page)["xsrf"]


def json_island(page: str, element_id: str) -> dict:
    """The JSON inside the page's ``<script type="application/json" id=...>``."""
    found = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.DOTALL)
    return json.loads(found.group(1))


def page_config(page: str) -> dict:
    return json_island(page, "page-config")


# -- where a kernel runs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("info,provisioner,expected", [
    ({"pid": 4242, "pgid": 4242, "ip": "127.0.0.1", "connection_info": {"key": b"k"}}, LOCAL, "pid 4242 on gwhost"),
    ({"host": "node7", "remote_pid": 99, "pid": 98, "hostname": "node7.lan", "control_key": "s3cret"},
     "ssh-provisioner", "pid 99 on node7"),
    ({"object_id": "0123456789abcdef0123", "pid": 1, "hostname": "abc"}, "docker-provisioner",
     "container 0123456789ab"),
    ({"object_id": "zq3v8c1nb0h7w2k5m4x6p9r1t", "pid": 1}, "docker-swarm-provisioner", "service zq3v8c1nb0h7"),
    ({"pod_name": "kernel-1f2e", "pod_namespace": "alice", "pid": 7, "hostname": "kernel-1f2e"},
     "kubernetes-provisioner", "pod alice/kernel-1f2e"),
    ({"app_id": "application_1733_0007", "am_host": "nm2", "pid": 7}, "yarn-provisioner",
     "YARN application_1733_0007 on nm2"),
    ({"hostname": "worker3", "pid": 51}, "some-remote-provisioner", "pid 51 on worker3"),
    ({"connection_info": {}}, LOCAL, "unknown"),
])
def test_describe_location(info, provisioner, expected):
    where = describe_location(info, provisioner, gateway_host="gwhost")
    assert where == expected
    assert "s3cret" not in where


def test_describe_location_defaults_to_this_host():
    assert describe_location({"pid": 12}) == f"pid 12 on {socket.gethostname()}"


# -- login -----------------------------------------------------------------------------------------------------
def test_without_a_token_the_page_is_401(gw):
    assert_error(call(gw, "GET", "/dashboard", auth=False), 401)
    assert_error(call(gw, "GET", "/dashboard/data", auth=False), 401)
    status, headers, body = raw(gw, "GET", "/dashboard", HTML)
    assert status == 401 and header(headers, "Content-Type").startswith("text/html"), (status, headers)
    assert "needs the gateway&#x27;s token" in body and '<form method="post" action="/dashboard">' in body
    assert 'name="token"' in body and header(headers, "WWW-Authenticate")
    status, _, body = raw(gw, "GET", "/dashboard?token=wrong-token", HTML)
    assert status == 401 and "That token is not valid for this gateway." in body
    assert "wrong-token" not in body


def test_the_login_form(gw):
    form = {"Content-Type": "application/x-www-form-urlencoded", **HTML}
    status, headers, body = raw(gw, "POST", "/dashboard", form, b"token=not-the-token")
    assert status == 401 and "That token is not valid" in body and not header(headers, "Set-Cookie")
    status, _, body = raw(gw, "POST", "/dashboard", form, b"token=")
    assert status == 400 and "Paste the gateway" in body
    assert_error(call(gw, "POST", "/dashboard", {"token": gw.token}, auth=False), 400, "x-www-form-urlencoded")
    cookie, xsrf = log_in(gw)
    assert re.fullmatch(r"[0-9a-f]{64}", xsrf)
    assert gw.token not in gw.log()
    # a forged or tampered cookie opens nothing
    name, _, value = cookie.partition("=")
    assert_error(call(gw, "GET", "/dashboard", headers={"Cookie": f"{name}={value[:-3]}abc"}, auth=False), 401)
    status, headers, _ = raw(gw, "POST", "/dashboard", {"Content-Type": "application/x-www-form-urlencoded",
                                                        "Cookie": cookie}, b"action=logout")
    assert status == 303 and f"{name}=;" in header(headers, "Set-Cookie").replace('""', ""), headers


def test_a_login_expires(gw):
    old = browser_login.issue(gw.token, now=time.time() - browser_login.LOGIN_SECONDS - 60)
    status, _, body = raw(gw, "GET", "/dashboard", {"Cookie": f"{browser_login.COOKIE}={old}", **HTML})
    assert status == 401 and "Your login has expired" in body
    recent = browser_login.issue(gw.token, now=time.time() - 60)
    assert raw(gw, "GET", "/dashboard", {"Cookie": f"{browser_login.COOKIE}={recent}"})[0] == 200
    # a cookie signed for another token opens nothing
    other = browser_login.issue("another-token")
    assert raw(gw, "GET", "/dashboard", {"Cookie": f"{browser_login.COOKIE}={other}"})[0] == 401


def test_a_token_in_the_url_is_traded_for_the_cookie_once(gw):
    status, headers, body = raw(gw, "GET", f"/dashboard?token={gw.token}")
    assert status == 303 and header(headers, "Location") == "/dashboard", (status, headers)
    assert "kernel_gateway_login=" in header(headers, "Set-Cookie") and gw.token not in body
    assert header(headers, "Referrer-Policy") == "no-referrer"
    assert f"token={gw.token}" not in gw.log()


def test_the_cookie_needs_the_xsrf_header_beyond_the_page(gw, kernel):
    cookie, xsrf = log_in(gw)
    assert_error(call(gw, "GET", "/dashboard/data", headers={"Cookie": cookie}, auth=False), 401)
    assert_error(call(gw, "GET", "/api/kernels", headers={"Cookie": cookie, "X-XSRFToken": "0" * 64}, auth=False), 401)
    both = {"Cookie": cookie, "X-XSRFToken": xsrf}
    assert call(gw, "GET", "/dashboard/data", headers=both, auth=False)[0] == 200
    assert_error(call(gw, "DELETE", f"/api/kernels/{kernel}", headers={"Cookie": cookie}, auth=False), 401)
    assert kernel in kernel_ids(gw)
    # a websocket cannot carry the header: the cookie never opens a kernel's channels
    with pytest.raises(websocket.WebSocketBadStatusException) as err:
        websocket.create_connection(f"{gw.ws_url}/api/kernels/{kernel}/channels", cookie=cookie, timeout=30)
    assert err.value.status_code == 401
    assert call(gw, "POST", f"/api/kernels/{kernel}/interrupt", headers=both, auth=False)[0] == 204
    assert call(gw, "DELETE", f"/api/kernels/{kernel}", headers=both, auth=False)[0] == 204
    assert kernel not in kernel_ids(gw)


# -- what it shows ---------------------------------------------------------------------------------------------
def test_page_and_data_show_the_kernel_escaped_and_without_secrets(gw, kernel):
    status, headers, page = raw(gw, "GET", "/dashboard", gw.headers)
    assert status == 200 and header(headers, "Content-Type").startswith("text/html")
    csp = header(headers, "Content-Security-Policy")
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp).group(1)
    # every script on the page is ours (the nonce) or inert JSON
    for tag in re.findall(r"<script[^>]*>", page):
        assert f'nonce="{nonce}"' in tag or 'type="application/json"' in tag, tag
    assert "<script>alert" not in page and "<img src=x" not in page and "\\u003cscript\\u003ealert" in page
    assert gw.token not in page
    shown = json_island(page, "initial-data")
    status, data, headers = call(gw, "GET", "/dashboard/data")
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    for snapshot in (shown, data):
        (row,) = [k for k in snapshot["kernels"] if k["id"] == kernel]
        pid = kernel_pid(gw, kernel)
        assert row["where"] == f"pid {pid} on {socket.gethostname()}", (row, pid)
        assert row["user"] == HOSTILE_USER and row["state"] == "idle" and row["kernelspec"] == "python3"
        assert row["provisioner"] == LOCAL and row["connections"] == 0 and row["held"] == "here"
        assert 0 <= row["age_seconds"] < 300 and row["idle_seconds"] >= 0
        assert snapshot["pools"] == [] and snapshot["gateway"]["phase"] == "ready"
    text = json.dumps(data)
    key = connection_info(gw.extra["runtime"], kernel)["key"]
    assert key not in text and key not in page and gw.token not in text
    with KernelWS(gw, kernel) as ws:
        assert ws.run("print(6 * 7)")[0] == "42\n"
        row = next(k for k in call(gw, "GET", "/dashboard/data")[1]["kernels"] if k["id"] == kernel)
        assert row["connections"] == 1


def test_charts_use_the_numbers_of_metrics(gw, kernel):
    assert call(gw, "POST", "/api/kernels", {"name": "missingbin"})[0] == 502
    data = call(gw, "GET", "/dashboard/data")[1]
    scrape = call(gw, "GET", "/metrics")[1].decode()
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(scrape) for s in family.samples}
    (ready,) = [d for d in data["start_durations"] if d["provisioner"] == LOCAL and d["phase"] == "ready"]
    labels = (("phase", "ready"), ("provisioner", LOCAL))
    assert ready["count"] == found[("kernel_gateway_kernel_start_duration_seconds_count", labels)] >= 1
    assert sum(b["count"] for b in ready["buckets"]) == ready["count"]
    assert ready["buckets"][-1]["le"] == "+Inf"
    (starts,) = [s for s in data["starts"] if s["provisioner"] == LOCAL]
    assert starts["succeeded"] == found[("kernel_gateway_kernel_starts_total", (("provisioner", LOCAL),))]
    failed = found[("kernel_gateway_kernel_start_failures_total", (("provisioner", LOCAL), ("reason", "launch")))]
    assert starts["failed"] == {"launch": failed} and failed >= 1


def test_the_page_is_open_without_auth(start_gw):
    gw = start_gw(token="")
    status, _, page = raw(gw, "GET", "/dashboard")
    assert status == 200 and page_config(page)["xsrf"] == ""
    assert "Log out" not in page
    assert call(gw, "GET", "/dashboard/data", auth=False)[0] == 200


def test_pools_show_size_ready_and_hits(start_gw, tmp_path):
    jpath = tmp_path / "jp"
    write_spec(jpath, "pooled", IPYKERNEL_ARGV, metadata={"kernel_provisioner": {
        "provisioner_name": LOCAL, "config": {"pool_size": 1}}})
    gw = start_gw(env={"JUPYTER_PATH": str(jpath), "GATEWAY_POOL_CHECK_INTERVAL": "0.5"})

    def pool() -> dict:
        rows = call(gw, "GET", "/dashboard/data")[1]["pools"]
        return rows[0] if rows and rows[0]["ready"] == 1 else {}

    assert wait_until(pool, 90, 0.2, what="a ready warm kernel on the page") == {
        "kernelspec": "pooled", "size": 1, "ready": 1, "warming": 0, "hits": 0, "misses": 0}
    kid = start_kernel(gw, "pooled")
    row = wait_until(pool, 90, 0.2, what="the pool refilled")
    assert row["hits"] == 1 and row["misses"] == 0, row
    assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
