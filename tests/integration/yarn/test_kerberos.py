"""Native YARN kernels against a ResourceManager whose web services require Kerberos (SPNEGO).

A real MIT KDC (:mod:`tests.services.kdc`) serves the realm KGW.TEST on loopback; this module's own Hadoop
cluster (RM web 127.0.0.1:18188, one NodeManager) runs Hadoop's ProxyUserAuthenticationFilter with the
kerberos handler on every web endpoint (RM REST and the NM's log pages), keyed by ``HTTP/127.0.0.1``, while
its RPC stays simple. The gateway's principal ``gateway`` may act for other users (``hadoop.proxyuser.gateway``);
``tester`` (this test's own REST calls) may not.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from pathlib import Path

import pytest

from launchers.yarn import AM_MAIN_CLASS
from tests.integration.yarn.test_yarn_kernels import write_spec
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import start_gateway, wait_until
from tests.services.yarn_cluster import log, start_cluster

gssapi = pytest.importorskip("gssapi", reason="requests-gssapi (the kerberos extra) is not installed")
from requests_gssapi import HTTPSPNEGOAuth  # noqa: E402

pytestmark = pytest.mark.cluster
REALM = "KGW.TEST"
PORTS = "44200..44299"
FINAL = ("FINISHED", "FAILED", "KILLED")
LIVE = "NEW,NEW_SAVING,SUBMITTED,ACCEPTED,RUNNING"
PRINCIPALS = {"HTTP/127.0.0.1": "http.keytab", "HTTP/localhost": "http.keytab", "gateway": "gateway.keytab",
              "tester": "tester.keytab", "renewer": "renewer.keytab"}
TICKET_LIFE = 20  # seconds, for 'renewer' (the others get the realm's 10 h)
COOKIE_LIFE = 5  # seconds of Hadoop's hadoop.auth cookie: then the next request is a new Kerberos exchange


def keytab_auth(kdc, name: str) -> HTTPSPNEGOAuth:
    """SPNEGO for this process as ``name``, from its keytab into a private memory cache."""
    creds = gssapi.Credentials(name=gssapi.Name(kdc.principal(name), gssapi.NameType.kerberos_principal),
                               usage="initiate", store={"client_keytab": str(kdc.keytabs[name]),
                                                        "ccache": f"MEMORY:kgw-test-{name}"})
    return HTTPSPNEGOAuth(creds=creds)


def spnego_conf(kdc, secret: Path) -> dict[str, dict[str, str]]:
    """core-site.xml properties: Kerberos on the web endpoints (doAs allowed for ``gateway``), RPC untouched."""
    return {"core-site.xml": {
        "hadoop.http.filter.initializers":
            "org.apache.hadoop.security.authentication.server.ProxyUserAuthenticationFilterInitializer",
        "hadoop.http.authentication.type": "kerberos",
        "hadoop.http.authentication.simple.anonymous.allowed": "false",
        "hadoop.http.authentication.kerberos.principal": "*",  # every HTTP/<host> in the keytab
        "hadoop.http.authentication.kerberos.keytab": str(kdc.keytabs["HTTP/127.0.0.1"]),
        "hadoop.http.authentication.signature.secret.file": str(secret),
        "hadoop.http.authentication.token.validity": str(COOKIE_LIFE),
        "hadoop.proxyuser.gateway.hosts": "*",
        "hadoop.proxyuser.gateway.groups": "*",
    }}


@pytest.fixture(scope="module")
def kdc(tmp_path_factory):
    from tests.services.kdc import start_kdc

    server = start_kdc(tmp_path_factory.mktemp("kdc"), PRINCIPALS, realm=REALM)
    server.kadmin(f'modprinc -maxlife "{TICKET_LIFE} seconds" {server.principal("renewer")}')
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)  # this process's own SPNEGO calls (libkrb5 reads KRB5_CONFIG)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="module")
def secured(kdc, tmp_path_factory):
    """The secured cluster; its own REST calls (``rest``) authenticate as ``tester``."""
    work = tmp_path_factory.mktemp("yarn-krb")
    secret = work / "http-signature-secret"
    secret.write_text(secrets.token_hex(32))
    cluster = start_cluster(work, nodes=1, netns=False, port_base=18130, web_port=18188,
                            extra_conf=spnego_conf(kdc, secret), java_opts=kdc.java_opts,
                            auth=keytab_auth(kdc, "tester"))
    yield cluster
    cluster.stop()
    log("secured cluster timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in cluster.timings.items())
        + f"; KDC start {kdc.timings['start']:.2f}s")


@pytest.fixture(scope="module")
def am_command(secured, yarn_am_jar: Path) -> str:
    return f"{{{{JAVA_HOME}}}}/bin/java -Xmx64m -cp '{yarn_am_jar}:{secured.hadoop_classpath}' {AM_MAIN_CLASS} --"


@pytest.fixture
def instance() -> str:
    return f"kgw-krb-{uuid.uuid4().hex[:8]}"


def apps(cluster, instance: str, states: str = LIVE) -> list[dict]:
    status, body = cluster.rest("GET", f"/apps?states={states}&applicationTags=kg-instance:{instance}")
    assert status == 200, (status, body)
    return ((body or {}).get("apps") or {}).get("app") or []


def krb_gateway(tmp_path, kdc, secured, am_command, instance, env=None, **config):
    base = {"rm_urls": [secured.rm_url], "am_command": am_command, "memory": "384m", "port_range": PORTS,
            "instance_name": instance, "poll_interval": 0.5, "launch_timeout": 90,
            "response_host": secured.gateway_address, "rm_auth": "kerberos"}
    base.update(config)
    write_spec(tmp_path / "data", "yarn", base)
    # no ticket unless a test gives one: never the machine's default cache
    gw_env = {"JUPYTER_PATH": str(tmp_path / "data"), "GATEWAY_KERNEL_LAUNCH_TIMEOUT": "120",
              "KRB5CCNAME": f"FILE:{tmp_path / 'no-ccache'}", **kdc.env, **(env or {})}
    return start_gateway(tmp_path=tmp_path, env=gw_env, timeout=60)


def run_kernel(gw, secured, instance, env=None) -> dict:
    """Start a kernel, run code in it, delete it; the application as the RM last showed it (final)."""
    started = time.monotonic()
    kid = start_kernel(gw, "yarn", env=env, timeout=150)
    startup = time.monotonic() - started
    [app] = [a for a in apps(secured, instance) if a["name"] == kid]
    assert app["state"] == "RUNNING", app
    with KernelWS(gw, kid) as ws:
        out, _ = ws.run("import os; print(6 * 7, os.environ['CONTAINER_ID'])")
    answer, container = out.split()
    assert answer == "42" and container.startswith("container_" + app["id"][len("application_"):]), out
    assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=120)[0] == 204
    status, body = secured.rest("GET", f"/apps/{app['id']}")
    assert status == 200 and body["app"]["state"] in ("KILLED", "FINISHED"), body
    assert not apps(secured, instance)
    print(f"\nkernel {kid}: started in {startup:.1f}s, application {app['id']} as {body['app']['user']}, "
          f"{body['app']['state']} after delete")
    return body["app"]


def test_rm_refuses_unauthenticated_requests(secured, kdc):
    import requests

    for url in (f"{secured.rm_url}/ws/v1/cluster/apps", f"http://{secured.nodes[0].web_address}/ws/v1/node/info"):
        anonymous = requests.get(url, timeout=15)
        assert anonymous.status_code == 401 and anonymous.headers.get("WWW-Authenticate") == "Negotiate", url
        assert requests.get(url, params={"user.name": "gateway"}, timeout=15).status_code == 401, url
        assert requests.get(url, auth=keytab_auth(kdc, "tester"), timeout=15).status_code == 200, url


@pytest.mark.parametrize("credentials", ["keytab", "ccache"])
def test_kernel_lifecycle_with_kerberos(tmp_path, kdc, secured, am_command, instance, credentials):
    if credentials == "keytab":
        gw = krb_gateway(tmp_path, kdc, secured, am_command, instance,
                         rm_keytab=str(kdc.keytabs["gateway"]), rm_principal=kdc.principal("gateway"))
    else:  # what an operator's kinit leaves; the provisioner reads KRB5CCNAME
        ccache = kdc.kinit("gateway", tmp_path / "gateway.ccache")
        gw = krb_gateway(tmp_path, kdc, secured, am_command, instance, env={"KRB5CCNAME": f"FILE:{ccache}"})
    try:
        app = run_kernel(gw, secured, instance, env={"KERNEL_USERNAME": "alice"})
        assert app["user"] == "gateway", app  # the principal's short name: no impersonation asked for
    finally:
        gw.stop()
    assert "Negotiate " not in gw.log() and "Traceback" not in gw.log()


@pytest.mark.parametrize("mode", ["simple", "no-ticket"])
def test_start_without_kerberos_fails_clearly(tmp_path, kdc, secured, am_command, instance, mode):
    config = {"rm_auth": "simple"} if mode == "simple" else {}  # no-ticket: kerberos with an empty cache
    gw = krb_gateway(tmp_path, kdc, secured, am_command, instance, **config)
    try:
        started = time.monotonic()
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "yarn"}, timeout=120)
        elapsed = time.monotonic() - started
        print(f"\n{mode}: {status} in {elapsed:.1f}s: {body.get('message')}")
        assert status == 502, body
        message = body["message"]
        assert "Kerberos (SPNEGO)" in message and "Traceback" not in message and "<html" not in message, message
        if mode == "simple":
            assert "rm_auth" in message and "GATEWAY_YARN_RM_AUTH" in message, message
        else:
            assert "credential cache" in message and "kinit" in message, message
        assert elapsed < 30, "an authentication failure should not wait for the launch timeout"
        assert call(gw, "GET", "/api/kernels")[1] == []
        assert not apps(secured, instance, states=LIVE + ",FINISHED,FAILED,KILLED")
    finally:
        gw.stop()


def test_launcher_failure_shows_the_node_managers_log_through_spnego(tmp_path, kdc, secured, am_command, instance):
    gw = krb_gateway(tmp_path, kdc, secured, am_command, instance,
                     rm_keytab=str(kdc.keytabs["gateway"]), rm_principal=kdc.principal("gateway"))
    write_spec(tmp_path / "data", "exits", json.loads((tmp_path / "data/kernels/yarn/kernel.json").read_text())
               ["metadata"]["kernel_provisioner"]["config"], argv=["/bin/sh", "-c", "echo launcher-boom >&2; exit 3"])
    try:
        status, body, _ = call(gw, "POST", "/api/kernels", {"name": "exits"}, timeout=150)
        # the stderr tail comes from the NodeManager's web service, which requires SPNEGO too
        assert status == 502 and "launcher-boom" in body["message"], body
    finally:
        gw.stop()


def test_keytab_tickets_are_renewed(tmp_path, kdc, secured, am_command, instance):
    """Tickets of 20 s, a cookie of 5 s, a kernel watched for over two ticket lifetimes: new tickets come from
    the keytab, and the kernel stays watched and a second one starts."""
    gw = krb_gateway(tmp_path, kdc, secured, am_command, instance,
                     rm_keytab=str(kdc.keytabs["renewer"]), rm_principal=kdc.principal("renewer"))
    try:
        first = start_kernel(gw, "yarn", timeout=150)
        started = time.monotonic()
        # the watcher's polls go on; each cookie expiry is a new exchange, which needs a valid ticket: wait until
        # the KDC has issued one two lifetimes after the first (the first start's ticket long expired)
        wait_until(lambda: (t := kdc.ticket_times("renewer")) and t[-1] - t[0] >= 2 * TICKET_LIFE, 6 * TICKET_LIFE,
                   1.0, what="a ticket from the keytab two ticket lifetimes after the first")
        watched = time.monotonic() - started
        with KernelWS(gw, first) as ws:
            assert ws.run("print(6 * 7)")[0].strip() == "42"
        second = start_kernel(gw, "yarn", timeout=150)
        [app] = [a for a in apps(secured, instance) if a["name"] == second]
        assert app["user"] == "renewer", app
        for kid in (first, second):
            assert call(gw, "DELETE", f"/api/kernels/{kid}", timeout=120)[0] == 204
        times = kdc.ticket_times("renewer")
        print(f"\nrenewal: {len(times)} tickets for renewer at +{[t - times[0] for t in times]}s, "
              f"{watched:.0f}s watched")
    finally:
        gw.stop()
    assert "poll failed" not in gw.log() and "Negotiate " not in gw.log(), gw.log()[-2000:]
    assert not apps(secured, instance)


def test_impersonation_with_doas(tmp_path, kdc, secured, am_command, instance):
    gw = krb_gateway(tmp_path, kdc, secured, am_command, instance, impersonate=True,
                     rm_keytab=str(kdc.keytabs["gateway"]), rm_principal=kdc.principal("gateway"))
    try:
        app = run_kernel(gw, secured, instance, env={"KERNEL_USERNAME": "alice"})
        assert app["user"] == "alice", app
    finally:
        gw.stop()
    # a principal that hadoop.proxyuser does not name cannot act for anyone
    import requests

    response = requests.post(f"{secured.rm_url}/ws/v1/cluster/apps/new-application", params={"doAs": "alice"},
                             auth=keytab_auth(kdc, "tester"), timeout=15)
    assert response.status_code in (401, 403), (response.status_code, response.text[:300])
