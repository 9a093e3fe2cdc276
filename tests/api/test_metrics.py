"""``GET /metrics``: token protection, the option that opens it, and the series a kernel's life leaves behind.

Each test starts its own gateway, so the counters start at 0. The Prometheus server's view of the same series
is tested in ``tests/integration/metrics`` (marked ``cluster``).
"""

from __future__ import annotations

import re

from tests.api.helpers import IPYKERNEL_ARGV, assert_error, post_kernel, write_spec
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import wait_until
from tests.services.scrape import samples, scrape, value

USER = "metrics-user-7f3a"
LOCAL = "local-port-range-provisioner"


def test_metrics_need_the_token_by_default(start_gw):
    gw = start_gw()
    assert_error(call(gw, "GET", "/metrics", auth=False), 401)
    assert_error(call(gw, "GET", "/metrics", headers={"Authorization": "token wrong"}, auth=False), 401)
    assert "kernel_gateway_build_info" in scrape(gw)


def test_the_option_opens_metrics_and_nothing_else(start_gw):
    gw = start_gw("--allow-unauthenticated-metrics")
    assert "kernel_gateway_kernels" in scrape(gw, auth=False)
    assert_error(call(gw, "GET", "/api/kernels", auth=False), 401)


def test_a_kernel_life_in_the_series_without_ids_or_user_names(start_gw, tmp_path):
    jpath = tmp_path / "jupyter"
    write_spec(jpath, "python3", IPYKERNEL_ARGV)
    write_spec(jpath, "missingbin", ["/nonexistent/kgw-no-such-binary", "-f", "{connection_file}"])
    gw = start_gw(env={"JUPYTER_PATH": str(jpath)})
    kid = start_kernel(gw, env={"KERNEL_USERNAME": USER})
    found = samples(scrape(gw))
    assert value(found, "kernel_gateway_kernels", kernelspec="python3", provisioner=LOCAL) == 1
    with KernelWS(gw, kid) as ws:
        assert ws.run("print('hello')")[0] == "hello\n"
        assert value(samples(scrape(gw)), "kernel_gateway_websocket_connections") == 1
    assert call(gw, "POST", f"/api/kernels/{kid}/restart")[0] == 200
    assert post_kernel(gw, "missingbin", env={"KERNEL_USERNAME": USER})[0] == 502
    assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    text = scrape(gw)
    found = samples(text)
    assert value(found, "kernel_gateway_kernel_starts_total", provisioner=LOCAL) == 1
    assert value(found, "kernel_gateway_kernel_start_failures_total", provisioner=LOCAL, reason="launch") == 1
    assert value(found, "kernel_gateway_kernel_start_duration_seconds_count", provisioner=LOCAL, phase="ready") == 1
    assert value(found, "kernel_gateway_kernel_start_duration_seconds_count", phase="launch") == 1
    assert value(found, "kernel_gateway_kernel_restarts_total", provisioner=LOCAL, kind="requested") == 1
    assert value(found, "kernel_gateway_kernel_shutdowns_total", provisioner=LOCAL) == 1
    assert value(found, "kernel_gateway_kernels") == 0  # the label sets seen stay, at 0
    assert value(found, "kernel_gateway_websocket_connections") == 0
    assert value(found, "kernel_gateway_websocket_connections_opened_total") == 1
    for channel, direction in (("iopub", "kernel_to_client"), ("shell", "kernel_to_client"),
                               ("shell", "client_to_kernel")):
        assert value(found, "kernel_gateway_relayed_messages_total", channel=channel, direction=direction) > 0
        assert value(found, "kernel_gateway_relayed_bytes_total", channel=channel, direction=direction) > 100
    assert kid not in text and USER not in text
    assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}", text), "something like a kernel id is exposed"


def test_culled_kernels_are_counted(start_gw):
    gw = start_gw("--KernelCuller.cull_idle_timeout=1", "--KernelCuller.cull_interval=1")
    start_kernel(gw)
    wait_until(lambda: value(samples(scrape(gw)), "kernel_gateway_kernel_culls_total") == 1, 60, 0.5,
               what="the idle kernel to be culled")
    found = samples(scrape(gw))
    assert value(found, "kernel_gateway_kernel_shutdowns_total") == 1
    assert value(found, "kernel_gateway_kernels") == 0
