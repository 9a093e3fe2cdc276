"""The Host check of kernel websockets when unauthenticated channels are on (DNS rebinding)."""

from __future__ import annotations

import json

import pytest
import websocket

from tests.services.client import KernelWS, call, start_kernel


def refused(gw, kernel_id: str, host: str, origin: str) -> websocket.WebSocketBadStatusException:
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        ws = websocket.create_connection(f"{gw.ws_url}/api/kernels/{kernel_id}/channels", timeout=15,
                                         host=host, origin=origin)
        ws.close()
    return info.value


def accepted(gw, kernel_id: str, **kwargs) -> str:
    with KernelWS(gw, kernel_id, auth=False, **kwargs) as ws:
        out, _ = ws.run("print('host ok')", 30)
    return out


def test_foreign_host_and_origin_are_refused_when_channels_need_no_token(start_gw):
    gw = start_gw("--allow-unauthenticated-channels")
    kernel_id = start_kernel(gw)
    try:
        # what a page on a DNS-rebound name sends: its own name as Host and Origin, which agree
        error = refused(gw, kernel_id, f"evil.example:{gw.port}", f"http://evil.example:{gw.port}")
        assert error.status_code == 403
        body = json.loads(error.resp_body)
        assert "allowed_hosts" in body["message"], body
        assert refused(gw, kernel_id, "evil.example", "http://evil.example").status_code == 403
        # the gateway's own address, localhost and origin-less clients still get in
        assert accepted(gw, kernel_id) == "host ok\n"
        assert accepted(gw, kernel_id, host=f"localhost:{gw.port}", origin=f"http://localhost:{gw.port}") == "host ok\n"
        assert accepted(gw, kernel_id, host=f"127.0.0.1:{gw.port}", suppress_origin=True) == "host ok\n"
    finally:
        call(gw, "DELETE", f"/api/kernels/{kernel_id}")


def test_allowed_hosts_option_admits_a_name(start_gw):
    gw = start_gw("--allow-unauthenticated-channels", env={"GATEWAY_ALLOWED_HOSTS": "gateway.example.org"})
    kernel_id = start_kernel(gw)
    try:
        host = f"gateway.example.org:{gw.port}"
        assert accepted(gw, kernel_id, host=host, origin=f"http://{host}") == "host ok\n"
        assert refused(gw, kernel_id, f"evil.example:{gw.port}", f"http://evil.example:{gw.port}").status_code == 403
    finally:
        call(gw, "DELETE", f"/api/kernels/{kernel_id}")


def test_bad_allowed_hosts_stops_the_gateway(start_gw):
    with pytest.raises(RuntimeError, match="allowed_hosts takes bare host names"):
        start_gw("--allow-unauthenticated-channels", env={"GATEWAY_ALLOWED_HOSTS": "http://gateway.example.org"})
