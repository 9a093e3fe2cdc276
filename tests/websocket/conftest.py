"""Fixtures for the kernel websocket tests: a fresh real kernel per test on the module's gateway."""

from __future__ import annotations

import pytest

from tests.services.client import call, start_kernel


@pytest.fixture
def kernel(gateway) -> str:
    """A python3 kernel on the module's gateway, deleted after the test (if the test did not already)."""
    kernel_id = start_kernel(gateway)
    yield kernel_id
    call(gateway, "DELETE", f"/api/kernels/{kernel_id}")
