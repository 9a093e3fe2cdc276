"""20 pod kernels on the real cluster (``k8s_cluster``) cost the API server no more than one while they sit idle.

The gateway's kubeconfig points at :class:`ApiServerProxy`, a :class:`CountingProxy` in front of the API server,
so its requests are counted from outside the gateway (not by ``PodWatcher.api.requests``). One kernel sits idle
for a fixed window, then 19 more start at once and the 20 sit idle for the same window: with one watch for all
kernels (and no request per kernel while they idle) the second window has no more requests than the first, but
for a watch the server ended and the gateway resumed in it. ``benchmarks/bench_kubernetes.py`` reuses the proxy
and the measurement. A start the provisioner fails on the kubelet's transient secret-cache error (right after the
cluster starts, on a busy machine) is tried again: see :func:`start_pod_kernel`.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.integration.kubernetes.test_kubernetes_kernels import (  # noqa: F401 (fixtures)
    START,
    core,
    instance,
    k8s_gateway,
    nothing_left,
    pods_of,
)
from tests.services.client import KernelWS, call, make_msg
from tests.services.counting_proxy import CountingProxy, _Relay
from tests.services.gateway import wait_until
from tests.services.kubernetes_cluster import KubernetesCluster

KERNELS = 20
WINDOW = 30.0  # seconds each idle window lasts (the watch is renewed every 300 s, so this window sees it at most once)
WATCH_READ = 400  # seconds a relayed answer may stay silent: a watch lasts 300 s, with bookmarks in between
_HOP = {"host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "content-length", "te"}
_NAMED = re.compile(r"/(namespaces|pods|secrets|rolebindings|serviceaccounts)/[^/]+")


def _named(path: str) -> str:
    """``path`` with object names as ``{name}`` (one kind per request type, not per kernel)."""
    return _NAMED.sub(r"/\1/{name}", path)


class ApiServerProxy(CountingProxy):
    """A :class:`CountingProxy` in front of the test cluster's API server for a gateway whose kubeconfig is
    :meth:`write_kubeconfig`'s: plain HTTP in, HTTPS with the admin's client certificate out, each answer
    streamed back as it comes (a watch is one answer that lasts minutes). A watch is recorded as method WATCH."""

    def __init__(self, cluster: KubernetesCluster) -> None:
        super().__init__(cluster.api_url)
        # CountingProxy's relay reads whole answers, which would hold back a watch's events; nothing reaches this
        # server before ``url`` is handed out, so its handler can still be swapped here
        self.RequestHandlerClass = _StreamingRelay
        self.context = ssl.create_default_context(cafile=str(cluster.pki / "ca.crt"))
        self.context.load_cert_chain(str(cluster.pki / "admin.crt"), str(cluster.pki / "admin.key"))
        self.upstreams: set[http.client.HTTPSConnection] = set()

    def write_kubeconfig(self, path: Path) -> str:
        """A kubeconfig (JSON is YAML) whose server is this proxy, namespace ``default``; its path."""
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "proxy",
            "clusters": [{"name": "proxy", "cluster": {"server": self.url}}],
            "users": [{"name": "proxy", "user": {}}],  # the proxy authenticates upstream
            "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "proxy", "namespace": "default"}}]}))
        return str(path)

    def requests_between(self, start: float, end: float) -> Counter:
        """Requests made in [start, end) (monotonic), as ``"METHOD /path"`` with object names as ``{name}``."""
        return Counter(f"{m} {_named(p)}" for t, m, p in list(self.seen) if start <= t < end)

    def close(self) -> None:
        """Stop serving and end the relays still waiting on the API server (an open watch)."""
        self.shutdown()
        self.server_close()
        for conn in list(self.upstreams):
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked reading it; close() would not
                except OSError:
                    pass


class _StreamingRelay(_Relay):
    """Relays one request (keep-alive) to the API server over TLS and streams the answer back, chunked when the
    server's is."""

    protocol_version = "HTTP/1.1"

    def _relay(self) -> None:
        server: ApiServerProxy = self.server  # type: ignore[assignment]
        path, _, query = self.path.partition("?")
        server.seen.append((time.monotonic(), "WATCH" if "watch=true" in query.lower() else self.command, path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        conn = http.client.HTTPSConnection(server.target.hostname, server.target.port, context=server.context,
                                           timeout=WATCH_READ)
        server.upstreams.add(conn)
        try:
            conn.request(self.command, self.path, body=body or None,
                         headers={k: v for k, v in self.headers.items() if k.lower() not in _HOP})
            response = conn.getresponse()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in _HOP:
                    self.send_header(key, value)
            if response.length is None:  # chunked (a watch, a list): pass each piece on as it arrives
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                while chunk := response.read1(65536):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.write(b"0\r\n\r\n")
            else:
                data = response.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
        except (OSError, http.client.HTTPException):  # the gateway hung up, or the proxy is closing
            self.close_connection = True
        finally:
            server.upstreams.discard(conn)
            conn.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _relay


def idle_window(proxy: ApiServerProxy, seconds: float) -> tuple[Counter, float]:
    """The requests made while nothing happens for ``seconds``, and the window's exact length."""
    start = time.monotonic()
    time.sleep(seconds)  # the measured window itself, not a synchronisation
    end = time.monotonic()
    return proxy.requests_between(start, end), end - start


def per_minute(counts: Counter, seconds: float) -> float:
    return sum(counts.values()) * 60.0 / seconds


def start_pod_kernel(gw) -> str:
    """Start a kernel of spec 'pod'; its id. (The kubelet's transient "failed to sync secret cache" just after a pod
    is created no longer fails a start: the watch waits for the kubelet's own retry.)"""
    # the gateway's own launch timeout (60 s) is short for 20 starts at once on 2 busy cores
    status, body, _ = call(gw, "POST", "/api/kernels", {"name": "pod", "env": {"KERNEL_LAUNCH_TIMEOUT": "170"}},
                           timeout=START)
    assert status == 201, (status, body)
    return body["id"]


def kernel_info(gw, kid: str) -> None:
    """The kernel answers kernel_info over its websocket (raises otherwise)."""
    with KernelWS(gw, kid, timeout=60) as ws:
        ws.collect(ws.send(make_msg("kernel_info_request", {})), timeout=60)


def test_twenty_idle_kernels_cost_the_api_server_no_more_than_one(tmp_path, k8s_cluster, core, instance):  # noqa: F811
    proxy = ApiServerProxy(k8s_cluster)
    gw = None
    kernels: list[str] = []
    try:
        gw = k8s_gateway(tmp_path, k8s_cluster, instance, kubeconfig=proxy.write_kubeconfig(tmp_path / "kubeconfig"))
        kernels.append(start_pod_kernel(gw))
        kernel_info(gw, kernels[0])
        one, one_s = idle_window(proxy, WINDOW)

        started = time.monotonic()
        with ThreadPoolExecutor(KERNELS - 1) as pool:
            kernels += pool.map(lambda _: start_pod_kernel(gw), range(KERNELS - 1))
        all_ready = time.monotonic() - started
        starts = proxy.requests_between(started, time.monotonic())
        for kid in kernels:
            kernel_info(gw, kid)
        assert len(set(kernels)) == KERNELS
        wait_until(lambda: len(pods_of(core, instance)) == KERNELS, 60, 0.5, what=f"{KERNELS} pods (none of a retry)")
        twenty, twenty_s = idle_window(proxy, WINDOW)

        print(f"{KERNELS - 1} kernels started at once, all ready after {all_ready:.1f}s; "
              f"API requests for those starts: {dict(starts)}")
        print(f"idle API requests/min (counted by a proxy in front of the API server, {WINDOW:g}s windows): "
              f"1 kernel {per_minute(one, one_s):.1f} {dict(one)}; "
              f"{KERNELS} kernels {per_minute(twenty, twenty_s):.1f} {dict(twenty)}")
        # the proxy saw the gateway's traffic: every pod created, and the one watch
        everything = proxy.requests_between(0, time.monotonic())
        assert everything["POST /api/v1/namespaces/{name}/pods"] == KERNELS, everything
        assert everything["WATCH /api/v1/namespaces/{name}/pods"] >= 1, everything
        # constant in the number of kernels: at most one watch renewal more (the server ends each after 300 s)
        assert sum(twenty.values()) <= sum(one.values()) + 1, (one, twenty)
        assert set(twenty) <= {"WATCH /api/v1/namespaces/{name}/pods"}, twenty  # nothing per kernel while idle
        assert "resuming" not in gw.log(), gw.log()[-3000:]  # the watch through the proxy never broke

        with ThreadPoolExecutor(KERNELS) as pool:
            statuses = list(pool.map(lambda kid: call(gw, "DELETE", f"/api/kernels/{kid}", timeout=START)[0],
                                     kernels))
        assert statuses == [204] * KERNELS, statuses
        kernels.clear()
        wait_until(lambda: nothing_left(core, instance), 120, 0.5, what="no kernel pod or secret left")
    finally:
        if gw is not None:
            gw.stop()
        proxy.close()
        for pod in pods_of(core, instance):  # after a failure only
            core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=0)
