"""A real Prometheus (Debian's package) scrapes a gateway every second; its query API shows the kernels' life.

Kernels are started, used over a websocket, restarted and shut down over the REST API; then Prometheus's own
``/api/v1/query`` must return what happened. Marked ``cluster``: it needs the Prometheus service.
"""

from __future__ import annotations

import pytest

from tests.api.helpers import IPYKERNEL_ARGV, post_kernel, write_spec
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import start_gateway
from tests.services.prometheus import start_prometheus

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

LOCAL = 'provisioner="local-port-range-provisioner"'
KERNELS = 3


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    jpath = tmp / "jupyter"
    write_spec(jpath, "python3", IPYKERNEL_ARGV)
    write_spec(jpath, "missingbin", ["/nonexistent/kgw-no-such-binary", "-f", "{connection_file}"])
    server = start_gateway(tmp_path=tmp, env={"JUPYTER_PATH": str(jpath)})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prom(gw, tmp_path_factory):
    server = start_prometheus(tmp_path_factory.mktemp("prometheus"), gw)
    yield server
    server.stop()


def test_prometheus_scrapes_the_gateway_with_its_token(prom):
    prom.wait_value('up{job="kernel-gateway"}', 1)
    targets = prom.scrape_health()
    assert [t["health"] for t in targets] == ["up"], targets
    prom.wait_value('kernel_gateway_build_info{job="kernel-gateway"}', 1)


def test_kernel_lifecycle_as_prometheus_sees_it(gw, prom):
    prom.wait_value('up{job="kernel-gateway"}', 1)
    ids = [start_kernel(gw, env={"KERNEL_USERNAME": "metrics-user"}) for _ in range(KERNELS)]
    prom.wait_value(f'sum(kernel_gateway_kernels{{kernelspec="python3",{LOCAL}}})', KERNELS)
    with KernelWS(gw, ids[0]) as ws:
        assert ws.run("for i in range(10): print(i, flush=True)")[0] == "".join(f"{i}\n" for i in range(10))
        prom.wait_value("kernel_gateway_websocket_connections", 1)
    assert call(gw, "POST", f"/api/kernels/{ids[1]}/restart")[0] == 200
    assert post_kernel(gw, "missingbin")[0] == 502
    for kid in ids:
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204

    prom.wait_value(f"kernel_gateway_kernel_starts_total{{{LOCAL}}}", KERNELS)
    prom.wait_value("sum(kernel_gateway_kernels)", 0)
    prom.wait_value("kernel_gateway_websocket_connections", 0)
    prom.wait_value(f'kernel_gateway_kernel_start_duration_seconds_count{{{LOCAL},phase="ready"}}', KERNELS)
    prom.wait_value(f'kernel_gateway_kernel_start_duration_seconds_count{{{LOCAL},phase="launch"}}', KERNELS)
    prom.wait_value(f'kernel_gateway_kernel_start_failures_total{{{LOCAL},reason="launch"}}', 1)
    prom.wait_value(f'kernel_gateway_kernel_restarts_total{{{LOCAL},kind="requested"}}', 1)
    prom.wait_value(f"kernel_gateway_kernel_shutdowns_total{{{LOCAL}}}", KERNELS)
    prom.wait_value("sum(kernel_gateway_websocket_connections_opened_total)", 1)
    iopub = prom.value('kernel_gateway_relayed_messages_total{channel="iopub",direction="kernel_to_client"}')
    # the starts' kernel_info statuses, then the cell's busy, execute_input, output (maybe joined) and idle
    assert iopub is not None and iopub >= 12, iopub
    sent = prom.value('kernel_gateway_relayed_messages_total{channel="shell",direction="client_to_kernel"}')
    assert sent is not None and sent >= 1, sent
    received = prom.value('kernel_gateway_relayed_bytes_total{channel="shell",direction="kernel_to_client"}')
    assert received is not None and received > 500, received
    # a start answers kernel_info in well under the histogram's largest bucket
    assert prom.value('histogram_quantile(0.99, sum by (le) (kernel_gateway_kernel_start_duration_seconds_bucket'
                      '{phase="ready"}))') < 300
    lag_samples = prom.value("kernel_gateway_event_loop_lag_seconds_count")
    assert lag_samples is not None and lag_samples > 0, lag_samples
    # what Prometheus stored carries no kernel id and no user name, in any label of any series
    for labels, _ in prom.query('{job="kernel-gateway"}'):
        assert not any(kid in v for kid in ids for v in labels.values()), labels
        assert "metrics-user" not in "".join(labels.values()), labels
