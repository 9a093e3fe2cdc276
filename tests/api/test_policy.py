"""GatewayPolicy against real kernels: environment filtering, env validation, launch timeouts,
failing kernel commands, kernel limits, authorized users and the trusted identity header."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.api.helpers import (
    IPYKERNEL_ARGV,
    assert_error,
    concurrently,
    kernel_ids,
    pgrep_f,
    post_kernel,
    sleeper_spec,
    write_spec,
)
from tests.services.client import KernelWS, call
from tests.services.gateway import start_gateway, wait_until

#: Variables ipykernel / jupyter_client set inside every kernel process themselves.
KERNEL_ADDED = {
    "CLICOLOR", "CLICOLOR_FORCE", "FORCE_COLOR", "GIT_PAGER", "JPY_PARENT_PID", "LC_CTYPE", "MPLBACKEND",
    "PAGER", "PYDEVD_USE_FRAME_EVAL", "TERM",
}
TOKEN = "policy-token-0123456789abcdef"


def kernel_environ(gw, kernel_id: str) -> dict[str, str]:
    with KernelWS(gw, kernel_id) as ws:
        out, _ = ws.run("import json, os; print(json.dumps(dict(os.environ)))")
    return json.loads(out)


@pytest.fixture(scope="module")
def policy_gw(tmp_path_factory):
    """Env filtering configured; extra kernelspecs: sleeper, missingbin, restricted (carol only)."""
    tmp = tmp_path_factory.mktemp("policy")
    jpath = tmp / "jupyter"
    marker = sleeper_spec(jpath)
    write_spec(jpath, "missingbin", ["/nonexistent/kgw-no-such-binary", "-f", "{connection_file}"])
    write_spec(jpath, "restricted", IPYKERNEL_ARGV, metadata={"authorized_users": ["carol"]})
    write_spec(jpath, "norootish", IPYKERNEL_ARGV, metadata={"unauthorized_users": ["mallory"]})
    env = {
        "INHERITME": "yes", "SECRETVAR": "no", "GATEWAY_AUTH_TOKEN": TOKEN,
        "JUPYTER_PATH": str(jpath), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
    }
    server = start_gateway("--GatewayPolicy.inherited_envs=INHERITME", "--GatewayPolicy.client_envs=ALLOWED",
                           tmp_path=tmp, token=TOKEN, env=env)
    server.extra.update(marker=marker, env=env)
    yield server
    for kid in kernel_ids(server):
        call(server, "DELETE", f"/api/kernels/{kid}")
    server.stop()


# -- environment ---------------------------------------------------------------------------------
def test_kernel_environment_is_filtered(policy_gw):
    gw = policy_gw
    request_env = {
        "KERNEL_FOO": "kernel-foo", "FOO": "plain-foo", "ALLOWED": "allowed-value",
        "GATEWAY_AUTH_TOKEN": "client-sent-token", "SECRETVAR": "client-secret", "KERNEL_BIG": "b" * 4096,
        "KERNEL_USERNAME": "alice",
    }
    status, model, _ = post_kernel(gw, "python3", request_env)
    assert status == 201, model
    kid = model["id"]
    try:
        env = kernel_environ(gw, kid)
    finally:
        call(gw, "DELETE", f"/api/kernels/{kid}")
    expected = {
        "PATH", "INHERITME", "KERNEL_FOO", "ALLOWED", "KERNEL_BIG", "KERNEL_USERNAME",
        "KERNEL_ID", "KERNEL_GATEWAY", "KERNEL_LAUNCH_TIMEOUT",  # set by the gateway for every kernel
    }
    assert set(env) - KERNEL_ADDED == expected, sorted(env)
    for name in ("FOO", "SECRETVAR", "GATEWAY_AUTH_TOKEN", "JUPYTER_PATH", "JUPYTER_RUNTIME_DIR", "HOME"):
        assert name not in env, name
    assert TOKEN not in json.dumps(env)
    assert env["INHERITME"] == "yes"
    assert env["KERNEL_FOO"] == "kernel-foo"
    assert env["ALLOWED"] == "allowed-value"
    assert env["KERNEL_BIG"] == "b" * 4096
    assert env["KERNEL_ID"] == kid
    assert env["KERNEL_USERNAME"] == "alice"
    assert float(env["KERNEL_LAUNCH_TIMEOUT"]) == 60  # the effective (default) launch timeout
    assert env["PATH"]


@pytest.mark.parametrize("value,fragment", [
    (5, "must be a string"),
    (True, "must be a string"),
    ({"nested": "x"}, "must be a string"),
    ("x" * 4097, "4097"),
    ("line1\nline2", "newline"),
    ("cr\rhere", "newline"),
    ("nul\0here", "NUL"),
])
@pytest.mark.parametrize("name", ["KERNEL_BAD_VALUE", "ALLOWED"])
def test_bad_env_value_is_400_naming_the_variable(policy_gw, name, value, fragment):
    before = kernel_ids(policy_gw)
    result = post_kernel(policy_gw, "python3", {"KERNEL_OK": "fine", name: value})
    assert_error(result, 400, name, fragment)
    assert kernel_ids(policy_gw) == before


# -- launch failures -----------------------------------------------------------------------------
def post_in_background(gw, name, env):
    result: dict = {}

    def run():
        started = time.monotonic()
        result["response"] = post_kernel(gw, name, env)
        result["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def check_launch_timeout(gw, marker: str, env: dict, seconds: int) -> None:
    before = kernel_ids(gw)
    thread, result = post_in_background(gw, "sleeper", env)
    # the kernel process really was started ...
    wait_until(lambda: pgrep_f(marker), 30, what="sleeper kernel process")
    thread.join(60)
    assert not thread.is_alive()
    body = assert_error(result["response"], 504, "sleeper", f"{seconds}s")
    assert body["reason"] == "Gateway Timeout"
    assert seconds - 0.5 <= result["elapsed"] < seconds + 10, result["elapsed"]
    # ... and is gone after the timeout, leaving nothing registered
    wait_until(lambda: not pgrep_f(marker), 30, what="sleeper process to be killed")
    assert kernel_ids(gw) == before


def test_kernel_launch_timeout_is_504_and_kills_the_kernel(policy_gw):
    check_launch_timeout(policy_gw, policy_gw.extra["marker"], {"KERNEL_LAUNCH_TIMEOUT": "2"}, 2)


def test_max_launch_timeout_caps_the_client(start_gw, tmp_path):
    jpath = tmp_path / "jupyter"
    marker = sleeper_spec(jpath)
    gw = start_gw("--GatewayPolicy.max_launch_timeout=2", env={"JUPYTER_PATH": str(jpath)})
    check_launch_timeout(gw, marker, {"KERNEL_LAUNCH_TIMEOUT": "100"}, 2)


def test_missing_kernel_binary_is_502(policy_gw):
    before = kernel_ids(policy_gw)
    body = assert_error(post_kernel(policy_gw, "missingbin"), 502, "missingbin", "/nonexistent/kgw-no-such-binary")
    assert body["reason"] == "Bad Gateway"
    assert kernel_ids(policy_gw) == before
    # the gateway is still healthy and can start kernels of other specs
    assert call(policy_gw, "GET", "/readyz", auth=False)[0] == 200


# -- users ---------------------------------------------------------------------------------------
def test_root_is_unauthorized_by_default(policy_gw):
    before = kernel_ids(policy_gw)
    body = assert_error(post_kernel(policy_gw, "python3", {"KERNEL_USERNAME": "root"}), 403, "'root'")
    assert body["reason"] == "Forbidden"
    assert kernel_ids(policy_gw) == before


def test_kernelspec_authorized_users(policy_gw):
    gw = policy_gw
    assert_error(post_kernel(gw, "restricted", {"KERNEL_USERNAME": "dave"}), 403, "'dave'", "restricted")
    assert_error(post_kernel(gw, "restricted"), 403, "restricted")  # anonymous is not carol either
    assert_error(post_kernel(gw, "norootish", {"KERNEL_USERNAME": "mallory"}), 403, "'mallory'")
    # the listing hides specs the user may not start
    assert "restricted" not in call(gw, "GET", "/api/kernelspecs?user=dave")[1]["kernelspecs"]
    assert "restricted" in call(gw, "GET", "/api/kernelspecs?user=carol")[1]["kernelspecs"]
    status, model, _ = post_kernel(gw, "restricted", {"KERNEL_USERNAME": "carol"})
    assert status == 201, model
    call(gw, "DELETE", f"/api/kernels/{model['id']}")
    assert model["name"] == "restricted"


def test_gateway_authorized_users_and_identity_header(start_gw):
    gw = start_gw("--GatewayPolicy.identity_header=X-Remote-User",
                  "--GatewayPolicy.authorized_users=alice", "--GatewayPolicy.authorized_users=erin")
    # not on the list, whatever KERNEL_USERNAME claims
    assert_error(post_kernel(gw, None, {"KERNEL_USERNAME": "bob"}), 403, "'bob'")
    assert_error(post_kernel(gw, None), 403)
    # the trusted header wins over KERNEL_USERNAME, for authorization ...
    assert_error(post_kernel(gw, None, {"KERNEL_USERNAME": "alice"}, headers={"X-Remote-User": "mallory"}),
                 403, "'mallory'")
    # ... and for the identity the kernel gets
    status, model, _ = post_kernel(gw, None, {"KERNEL_USERNAME": "root"}, headers={"X-Remote-User": "alice"})
    assert status == 201, model
    env = kernel_environ(gw, model["id"])
    call(gw, "DELETE", f"/api/kernels/{model['id']}")
    assert env["KERNEL_USERNAME"] == "alice"


# -- limits --------------------------------------------------------------------------------------
def statuses(results) -> list[int]:
    return sorted(r[0] for r in results)


def test_max_kernels(start_gw):
    gw = start_gw("--GatewayPolicy.max_kernels=2")
    results = concurrently(lambda i: post_kernel(gw, None, {"KERNEL_USERNAME": f"user{i}"}), [(i,) for i in range(4)])
    assert statuses(results) == [201, 201, 429, 429], [(r[0], r[1]) for r in results]
    for status, body, headers in results:
        if status == 429:
            assert_error((status, body, headers), 429)
            assert body["reason"] == "Too Many Requests"
            assert re.search(r"\b2\b", body["message"]) and "limit" in body["message"], body
    started = {r[1]["id"] for r in results if r[0] == 201}
    assert kernel_ids(gw) == started
    # a freed slot can be used again
    call(gw, "DELETE", f"/api/kernels/{started.pop()}")
    status, model, _ = post_kernel(gw)
    assert status == 201, model


def test_max_kernels_per_user(start_gw):
    gw = start_gw("--GatewayPolicy.max_kernels_per_user=2")
    results = concurrently(lambda: post_kernel(gw, None, {"KERNEL_USERNAME": "alice"}), [()] * 4)
    assert statuses(results) == [201, 201, 429, 429], [(r[0], r[1]) for r in results]
    for status, body, headers in results:
        if status == 429:
            assert_error((status, body, headers), 429, "'alice'")
            assert re.search(r"\b2\b", body["message"]), body
    # another user is not affected
    status, model, _ = post_kernel(gw, None, {"KERNEL_USERNAME": "bob"})
    assert status == 201, model
    assert len(kernel_ids(gw)) == 3
