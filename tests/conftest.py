"""Fixtures shared by every test: a real gateway process, started per module or per test."""

from __future__ import annotations

import pytest

from tests.services.gateway import GatewayServer, start_gateway


@pytest.fixture(scope="module")
def gateway(tmp_path_factory) -> GatewayServer:
    """One gateway with a token and local kernels, shared by a test module."""
    server = start_gateway(tmp_path=tmp_path_factory.mktemp("gateway"))
    yield server
    server.stop()


@pytest.fixture
def start_gw(tmp_path):
    """Start gateways with specific options; every one is stopped after the test."""
    started: list[GatewayServer] = []

    def start(*args: str, **kwargs) -> GatewayServer:
        server = start_gateway(*args, tmp_path=tmp_path, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
