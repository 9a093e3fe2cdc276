"""The OpenAPI document served at /api/spec.yaml is valid and documents exactly our routes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from openapi_spec_validator import validate

from tests.api.routes import route_table

SPEC_PATH = Path(__file__).resolve().parents[2] / "kernel_gateway" / "web" / "api.yaml"

# Paths and methods the server routes, from its route table (kernel_gateway.web.ROUTES).
EXPECTED_ROUTES: dict[str, set[str]] = route_table()

PUBLIC_ROUTES = {"/api", "/api/spec.yaml", "/healthz", "/readyz"}

HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture(scope="module")
def spec() -> dict:
    with SPEC_PATH.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_document_is_valid_openapi_3_0(spec):
    assert spec["openapi"] == "3.0.3"
    validate(spec)


def test_documented_paths_are_exactly_the_routes(spec):
    assert set(spec["paths"]) == set(EXPECTED_ROUTES)


@pytest.mark.parametrize("path", sorted(EXPECTED_ROUTES))
def test_documented_methods_match_the_routes(spec, path):
    documented = {m for m in spec["paths"][path] if m in HTTP_METHODS}
    assert documented == EXPECTED_ROUTES[path]


def test_only_public_routes_skip_the_token(spec):
    assert spec.get("security"), "a global token requirement is expected"
    public = {
        path
        for path, item in spec["paths"].items()
        for method, op in item.items()
        if method in HTTP_METHODS and op.get("security") == []
    }
    assert public == PUBLIC_ROUTES


def test_every_error_response_uses_the_error_schema(spec):
    responses = spec["components"]["responses"]
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            for status, resp in op["responses"].items():
                if int(status) < 400:
                    continue
                ref = resp.get("$ref", "")
                assert ref.startswith("#/components/responses/"), (path, method, status)
                body = responses[ref.rsplit("/", 1)[1]]["content"]["application/json"]["schema"]
                assert body == {"$ref": "#/components/schemas/Error"}, (path, method, status)


def test_kernel_model_matches_the_client_contract(spec):
    kernel = spec["components"]["schemas"]["Kernel"]
    assert set(kernel["required"]) == {"id", "name", "last_activity", "execution_state", "connections"}
    assert kernel["properties"]["execution_state"]["enum"] == ["starting", "idle", "busy", "restarting", "dead"]
