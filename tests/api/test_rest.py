"""Every REST route, the models it returns, every error it can give, and token authentication.

One gateway (with a token and a few extra kernelspecs) serves the whole module; each test cleans
up the kernels and sessions it creates.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone

import jupyter_server
import pytest
import websocket
import yaml

import kernel_gateway

from tests.api.helpers import (
    EXECUTION_STATES,
    IPYKERNEL_ARGV,
    UUID_RE,
    assert_error,
    kernel_ids,
    send_raw,
    write_spec,
)
from tests.api.routes import route_table
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import start_gateway, wait_until

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
PUBLIC = ["/api", "/api/spec.yaml", "/healthz", "/readyz"]
MISSING_KERNEL = "00000000-0000-4000-8000-000000000000"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rest")
    jpath = tmp / "jupyter"
    spec_dir = write_spec(jpath, "files", IPYKERNEL_ARGV,
                          files={"kernel.js": b"// kernel js\n", "logo-64x64.png": PNG, "notes.txt": b"hello"})
    os.symlink("/etc/passwd", spec_dir / "evil.txt")
    write_spec(jpath, "files2", IPYKERNEL_ARGV, files={"secret.txt": b"sibling secret"})
    write_spec(jpath, "missingbin", ["/nonexistent/kgw-no-such-binary", "-f", "{connection_file}"])
    server = start_gateway(tmp_path=tmp, env={"JUPYTER_PATH": str(jpath),
                                              "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")})
    yield server
    for kid in kernel_ids(server):
        call(server, "DELETE", f"/api/kernels/{kid}")
    server.stop()


@pytest.fixture
def kernel(gw):
    kid = start_kernel(gw)
    yield kid
    call(gw, "DELETE", f"/api/kernels/{kid}")


def check_kernel_model(model: dict, kernel_id: str | None = None, name: str = "python3") -> None:
    assert set(model) >= {"id", "name", "last_activity", "execution_state", "connections"}, model
    assert UUID_RE.match(model["id"]), model
    if kernel_id:
        assert model["id"] == kernel_id
    assert model["name"] == name
    stamp = datetime.strptime(model["last_activity"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs((datetime.now(timezone.utc).replace(tzinfo=None) - stamp).total_seconds()) < 600, model
    assert type(model["connections"]) is int and model["connections"] >= 0, model
    assert model["execution_state"] in EXECUTION_STATES, model


# -- server routes -------------------------------------------------------------------------------
def test_api_version(gw):
    status, body, headers = call(gw, "GET", "/api", auth=False)
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body == {"version": jupyter_server.__version__, "gateway_version": kernel_gateway.__version__}


def test_spec_yaml_documents_exactly_the_route_table(gw):
    status, raw, headers = call(gw, "GET", "/api/spec.yaml", auth=False)
    assert status == 200
    assert "yaml" in headers["Content-Type"]
    spec = yaml.safe_load(raw)
    assert spec["openapi"].startswith("3.")
    routes = route_table()
    assert set(spec["paths"]) == set(routes)
    for path, methods in routes.items():
        documented = {m for m in spec["paths"][path] if m in ("get", "post", "put", "patch", "delete")}
        assert documented == methods, path


def test_health_and_ready(gw):
    assert call(gw, "GET", "/healthz", auth=False)[:2] == (200, {"status": "ok"})
    status, body, _ = call(gw, "GET", "/readyz", auth=False)
    assert status == 200 and body["status"] == "ready" and isinstance(body["kernels"], int)


# -- kernelspecs ---------------------------------------------------------------------------------
def test_kernelspecs_list(gw):
    status, body, _ = call(gw, "GET", "/api/kernelspecs")
    assert status == 200
    assert body["default"] == "python3"
    assert {"python3", "files", "files2", "missingbin"} <= set(body["kernelspecs"])
    files = body["kernelspecs"]["files"]
    assert files["name"] == "files"
    assert files["spec"]["argv"] == IPYKERNEL_ARGV
    assert files["spec"]["display_name"] == "test files"
    assert files["resources"] == {"kernel.js": "/kernelspecs/files/kernel.js",
                                  "logo-64x64": "/kernelspecs/files/logo-64x64.png"}


def test_kernelspec_by_name(gw):
    status, body, _ = call(gw, "GET", "/api/kernelspecs/python3")
    assert status == 200
    assert body["name"] == "python3"
    assert body["spec"]["language"] == "python"
    assert "logo-64x64" in body["resources"]
    assert call(gw, "GET", "/api/kernelspecs/python3/")[0] == 200


def test_kernelspec_resources_are_served(gw):
    _, spec, _ = call(gw, "GET", "/api/kernelspecs/files")
    status, body, headers = call(gw, "GET", spec["resources"]["logo-64x64"])
    assert status == 200 and body == PNG and headers["Content-Type"] == "image/png"
    status, body, _ = call(gw, "GET", spec["resources"]["kernel.js"])
    assert status == 200 and body == b"// kernel js\n"
    status, body, _ = call(gw, "GET", "/kernelspecs/files/notes.txt")
    assert status == 200 and body == b"hello"
    # the python3 spec's own logos
    _, py, _ = call(gw, "GET", "/api/kernelspecs/python3")
    status, body, _ = call(gw, "GET", py["resources"]["logo-64x64"])
    assert status == 200 and body.startswith(b"\x89PNG")


@pytest.mark.parametrize("path", [
    "/kernelspecs/files/../../../../../../../../etc/passwd",
    "/kernelspecs/files/../files2/secret.txt",
    "/kernelspecs/files/evil.txt",  # a symlink inside the spec dir pointing outside it
    "/kernelspecs/files/%2e%2e/files2/secret.txt",
    "/kernelspecs/files/..%2f..%2f..%2fetc%2fpasswd",
    "/kernelspecs/..%2ffiles2/secret.txt",
    "/kernelspecs/files/",
    "/kernelspecs/files/nosuchfile.txt",
    "/kernelspecs/nosuchspec/kernel.js",
])
def test_kernelspec_resource_path_traversal_is_404(gw, path):
    result = call(gw, "GET", path)
    assert_error(result, 404)
    assert b"root:" not in json.dumps(result[1]).encode() and "sibling secret" not in json.dumps(result[1])


def test_unknown_kernelspec_is_404(gw):
    assert_error(call(gw, "GET", "/api/kernelspecs/nosuchspec"), 404, "nosuchspec")
    assert_error(call(gw, "GET", "/api/kernelspecs/.."), 404)
    assert_error(call(gw, "POST", "/api/kernels", {"name": "nosuchspec"}), 404, "nosuchspec")


# -- kernels -------------------------------------------------------------------------------------
def test_kernel_lifecycle_create_get_list_delete(gw):
    status, model, headers = call(gw, "POST", "/api/kernels", {"name": "python3"})
    assert status == 201, model
    check_kernel_model(model)
    kid = model["id"]
    assert model["execution_state"] == "idle"
    assert headers["Location"] == f"/api/kernels/{kid}"
    try:
        status, got, _ = call(gw, "GET", headers["Location"])
        assert status == 200
        check_kernel_model(got, kid)
        status, listing, _ = call(gw, "GET", "/api/kernels")
        assert status == 200 and isinstance(listing, list)
        for item in listing:
            check_kernel_model(item, name=item["name"])
        assert kid in {k["id"] for k in listing}
    finally:
        status, body, _ = call(gw, "DELETE", f"/api/kernels/{kid}")
    assert (status, body) == (204, b"")
    assert_error(call(gw, "GET", f"/api/kernels/{kid}"), 404, kid)
    assert_error(call(gw, "DELETE", f"/api/kernels/{kid}"), 404, kid)
    assert kid not in kernel_ids(gw)


def test_post_kernels_without_body_starts_default(gw):
    status, model, _ = call(gw, "POST", "/api/kernels")
    assert status == 201, model
    call(gw, "DELETE", f"/api/kernels/{model['id']}")
    assert model["name"] == "python3"


def test_kernel_model_tracks_connections_and_activity(gw, kernel):
    _, before, _ = call(gw, "GET", f"/api/kernels/{kernel}")
    assert before["connections"] == 0
    with KernelWS(gw, kernel) as ws:
        wait_until(lambda: call(gw, "GET", f"/api/kernels/{kernel}")[1]["connections"] == 1, 30,
                   what="connections == 1")
        out, _ = ws.run("print('hi')")
        assert out == "hi\n"
        _, during, _ = call(gw, "GET", f"/api/kernels/{kernel}")
    check_kernel_model(during, kernel)
    assert during["execution_state"] == "idle"
    assert during["last_activity"] > before["last_activity"]
    wait_until(lambda: call(gw, "GET", f"/api/kernels/{kernel}")[1]["connections"] == 0, 30,
               what="connections back to 0")


def test_interrupt(gw, kernel):
    with KernelWS(gw, kernel) as ws:
        msg_id = ws.execute("import time; time.sleep(120)")
        wait_until(lambda: call(gw, "GET", f"/api/kernels/{kernel}")[1]["execution_state"] == "busy", 30,
                   what="kernel busy")
        started = time.monotonic()
        status, body, _ = call(gw, "POST", f"/api/kernels/{kernel}/interrupt")
        assert (status, body) == (204, b"")
        msgs = ws.collect(msg_id, timeout=20)
    assert time.monotonic() - started < 20
    reply = next(m for m in msgs if m["msg_type"] == "execute_reply")
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    wait_until(lambda: call(gw, "GET", f"/api/kernels/{kernel}")[1]["execution_state"] == "idle", 30,
               what="kernel idle after interrupt")


def test_restart_keeps_id_and_resets_state(gw, kernel):
    with KernelWS(gw, kernel) as ws:
        assert ws.run("marker_variable = 42; print(marker_variable)")[0] == "42\n"
    status, model, _ = call(gw, "POST", f"/api/kernels/{kernel}/restart")
    assert status == 200, model
    check_kernel_model(model, kernel)
    assert model["execution_state"] == "idle"
    assert kernel in kernel_ids(gw)
    with KernelWS(gw, kernel) as ws:
        assert ws.run("print('marker_variable' in globals())")[0] == "False\n"


@pytest.mark.parametrize("method,suffix", [
    ("GET", ""), ("DELETE", ""), ("POST", "/interrupt"), ("POST", "/restart"),
])
def test_unknown_kernel_is_404(gw, method, suffix):
    assert_error(call(gw, method, f"/api/kernels/{MISSING_KERNEL}{suffix}"), 404, MISSING_KERNEL)


@pytest.mark.parametrize("path", [
    "/api/kernels/notakernelid", "/api/kernels/not-a-kernel-id/restart", "/api/kernels/..%2f..%2fapi",
    "/api/kernels/123/interrupt", "/api/kernels/a-b-c-d-e-f-g",
])
def test_malformed_kernel_id_is_404(gw, path):
    assert_error(call(gw, "GET", path), 404)
    assert_error(call(gw, "POST", path, {}), 404)


def test_unknown_kernel_channels_is_404(gw):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        KernelWS(gw, MISSING_KERNEL)
    assert info.value.status_code == 404


# -- request errors ------------------------------------------------------------------------------
BAD_KERNEL_BODIES = [
    (b"{not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'["python3"]', "JSON object"),
    (b'"python3"', "JSON object"),
    (b"42", "JSON object"),
    (b'{"name": 5}', "name"),
    (b'{"name": ""}', "name"),
    (b'{"name": ["python3"]}', "name"),
    (b'{"env": []}', "env"),
    (b'{"env": "KERNEL_X=1"}', "env"),
    (b'{"env": {"KERNEL_X": 1}}', "KERNEL_X"),
    (b'{"env": {"KERNEL_X": null}}', "KERNEL_X"),
    (b'{"env": {"1BAD": "x"}}', "1BAD"),
    (b'{"env": {"BAD-NAME": "x"}}', "BAD-NAME"),
    (b'{"env": {"KERNEL_LAUNCH_TIMEOUT": "soon"}}', "KERNEL_LAUNCH_TIMEOUT"),
    (b'{"env": {"KERNEL_LAUNCH_TIMEOUT": "-5"}}', "KERNEL_LAUNCH_TIMEOUT"),
]


@pytest.mark.parametrize("raw,fragment", BAD_KERNEL_BODIES)
def test_bad_kernel_request_body_is_400(gw, raw, fragment):
    before = kernel_ids(gw)
    result = call(gw, "POST", "/api/kernels", raw=raw, headers={"Content-Type": "application/json"})
    assert_error(result, 400, fragment)
    assert kernel_ids(gw) == before


BAD_SESSION_BODIES = [
    (b"", "JSON body"),
    (b"{oops", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'{"type": "notebook"}', "path"),
    (b'{"path": 5, "type": "notebook"}', "path"),
    (b'{"path": "a.ipynb"}', "type"),
    (b'{"path": "a.ipynb", "type": 7}', "type"),
    (b'{"path": "a.ipynb", "type": "notebook", "name": 7}', "name"),
    (b'{"path": "a.ipynb", "type": "notebook", "kernel": "python3"}', "kernel"),
    (b'{"path": "a.ipynb", "type": "notebook", "kernel": {"name": 3}}', "kernel.name"),
    (b'{"path": "a.ipynb", "type": "notebook", "kernel": {"id": 3}}', "kernel.id"),
]


@pytest.mark.parametrize("raw,fragment", BAD_SESSION_BODIES)
def test_bad_session_request_body_is_400(gw, raw, fragment):
    before = kernel_ids(gw)
    result = call(gw, "POST", "/api/sessions", raw=raw, headers={"Content-Type": "application/json"})
    assert_error(result, 400, fragment)
    assert kernel_ids(gw) == before
    assert call(gw, "GET", "/api/sessions")[1] == []


def test_session_notebook_of_wrong_type_is_400(gw):
    result = call(gw, "POST", "/api/sessions", {"notebook": "a.ipynb", "type": "notebook"})
    assert_error(result, 400, "notebook")


def test_huge_body_is_413(gw):
    size = 2 * 1024 * 1024
    head = (f"POST /api/kernels HTTP/1.1\r\nHost: {gw.host}:{gw.port}\r\nAuthorization: token {gw.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()
    body = b'{"name": "python3", "pad": "' + b"x" * (size - 30) + b'"}'
    body = body[:size]
    status, headers, raw = send_raw(gw, head, [body[i:i + 65536] for i in range(0, size, 65536)])
    assert status == 413
    assert headers["content-type"].startswith("application/json")
    err = json.loads(raw)
    assert set(err) == {"reason", "message"} and "1048576" in err["message"]


def test_body_just_under_limit_is_accepted_by_size(gw):
    # 1 MiB - a bit, but not a JSON object: reaches JSON validation (400), not the size check (413)
    raw = b"[" + b"0," * 500_000 + b"0]"
    assert len(raw) < 1024 * 1024
    assert_error(call(gw, "POST", "/api/kernels", raw=raw, headers={"Content-Type": "application/json"}),
                 400, "JSON object")


def test_huge_chunked_body_is_413(gw):
    head = (f"POST /api/kernels HTTP/1.1\r\nHost: {gw.host}:{gw.port}\r\nAuthorization: token {gw.token}\r\n"
            f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
    status, headers, raw = send_raw(gw, head, [chunk] * 40 + [b"0\r\n\r\n"])
    assert status == 413
    assert set(json.loads(raw)) == {"reason", "message"}


@pytest.mark.parametrize("method,path", [
    ("GET", "/nope"), ("GET", "/api/nope"), ("POST", "/api/kernels/x/y/z"), ("DELETE", "/api/kernelspecs/a/b/c"),
    ("GET", "/api/sessions/not-a-session"),
])
def test_unknown_route_is_json_404(gw, method, path):
    assert_error(call(gw, method, path, auth=False), 404)
    assert_error(call(gw, method, path), 404)


@pytest.mark.parametrize("method,path", [
    ("PUT", "/api/kernels"), ("PATCH", "/api/kernels"), ("DELETE", "/api/kernelspecs"),
    ("POST", "/api/kernelspecs/python3"), ("PUT", "/api/sessions"), ("DELETE", "/healthz"),
])
def test_wrong_method_is_json_405(gw, method, path):
    assert_error(call(gw, method, path, {}), 405)


# -- sessions ------------------------------------------------------------------------------------
def create_session(gw, path: str, **body) -> dict:
    status, model, headers = call(gw, "POST", "/api/sessions", {"path": path, "type": "notebook", **body})
    assert status == 201, model
    assert headers["Location"] == f"/api/sessions/{model['id']}"
    return model


def test_session_lifecycle(gw):
    model = create_session(gw, "work/a.ipynb", name="a.ipynb", kernel={"name": "python3"})
    sid, kid = model["id"], model["kernel"]["id"]
    try:
        assert UUID_RE.match(sid)
        assert model["path"] == "work/a.ipynb" and model["name"] == "a.ipynb" and model["type"] == "notebook"
        assert model["notebook"] == {"path": "work/a.ipynb", "name": "a.ipynb"}
        check_kernel_model(model["kernel"])
        assert kid in kernel_ids(gw)

        # the same path gives the same session and kernel; no second kernel is started
        kernels_before = kernel_ids(gw)
        again = create_session(gw, "work/a.ipynb", kernel={"name": "python3"})
        assert again["id"] == sid and again["kernel"]["id"] == kid
        assert kernel_ids(gw) == kernels_before

        status, listing, _ = call(gw, "GET", "/api/sessions")
        assert status == 200 and [s["id"] for s in listing] == [sid]
        status, got, _ = call(gw, "GET", f"/api/sessions/{sid}")
        assert status == 200 and got["id"] == sid and got["kernel"]["id"] == kid

        # rename / move
        status, patched, _ = call(gw, "PATCH", f"/api/sessions/{sid}", {"path": "work/b.ipynb", "name": "b.ipynb"})
        assert status == 200, patched
        assert patched["path"] == "work/b.ipynb" and patched["name"] == "b.ipynb"
        assert patched["kernel"]["id"] == kid
        assert call(gw, "GET", f"/api/sessions/{sid}")[1]["path"] == "work/b.ipynb"
    finally:
        status, body, _ = call(gw, "DELETE", f"/api/sessions/{sid}")
    assert (status, body) == (204, b"")
    assert_error(call(gw, "GET", f"/api/sessions/{sid}"), 404, sid)
    assert_error(call(gw, "GET", f"/api/kernels/{kid}"), 404)
    assert call(gw, "GET", "/api/sessions")[1] == []


def test_session_patch_kernel_name_replaces_kernel(gw):
    model = create_session(gw, "switch.ipynb", kernel={"name": "python3"})
    sid, old = model["id"], model["kernel"]["id"]
    status, patched, _ = call(gw, "PATCH", f"/api/sessions/{sid}", {"kernel": {"name": "python3"}})
    try:
        assert status == 200, patched
        new = patched["kernel"]["id"]
        assert new != old
        check_kernel_model(patched["kernel"], new)
        assert_error(call(gw, "GET", f"/api/kernels/{old}"), 404)
        assert old not in kernel_ids(gw) and new in kernel_ids(gw)
        assert call(gw, "GET", f"/api/sessions/{sid}")[1]["kernel"]["id"] == new
    finally:
        call(gw, "DELETE", f"/api/sessions/{sid}")


def test_session_patch_kernel_id_switches_to_existing_kernel(gw, kernel):
    model = create_session(gw, "attach.ipynb", kernel={"name": "python3"})
    sid, old = model["id"], model["kernel"]["id"]
    try:
        status, patched, _ = call(gw, "PATCH", f"/api/sessions/{sid}", {"kernel": {"id": kernel}})
        assert status == 200, patched
        assert patched["kernel"]["id"] == kernel
    finally:
        call(gw, "DELETE", f"/api/sessions/{sid}")
        call(gw, "DELETE", f"/api/kernels/{old}")
    # deleting the session shut the attached kernel down
    assert kernel not in kernel_ids(gw)


def test_session_post_with_existing_kernel_id(gw, kernel):
    model = create_session(gw, "existing.ipynb", kernel={"id": kernel})
    try:
        assert model["kernel"]["id"] == kernel
    finally:
        call(gw, "DELETE", f"/api/sessions/{model['id']}")


def test_session_errors(gw):
    assert_error(call(gw, "POST", "/api/sessions", {"path": "x.ipynb", "type": "notebook",
                                                     "kernel": {"id": MISSING_KERNEL}}), 404, MISSING_KERNEL)
    assert_error(call(gw, "POST", "/api/sessions", {"path": "x.ipynb", "type": "notebook",
                                                     "kernel": {"name": "nosuchspec"}}), 404, "nosuchspec")
    assert call(gw, "GET", "/api/sessions")[1] == []
    missing = "11111111-2222-4333-8444-555555555555"
    for method, body in (("GET", None), ("PATCH", {"path": "y"}), ("DELETE", None)):
        assert_error(call(gw, method, f"/api/sessions/{missing}", body), 404, missing)


def test_session_patch_unknown_kernel_id_is_400(gw):
    model = create_session(gw, "keep.ipynb", kernel={"name": "python3"})
    sid, kid = model["id"], model["kernel"]["id"]
    try:
        assert_error(call(gw, "PATCH", f"/api/sessions/{sid}", {"kernel": {"id": MISSING_KERNEL}}), 400, MISSING_KERNEL)
        for raw in (b"[]", b"{bad", b'{"path": 5}', b'{"kernel": {"name": 5}}', b'{"kernel": [1]}'):
            assert_error(call(gw, "PATCH", f"/api/sessions/{sid}", raw=raw,
                              headers={"Content-Type": "application/json"}), 400)
        got = call(gw, "GET", f"/api/sessions/{sid}")[1]
        assert got["kernel"]["id"] == kid and got["path"] == "keep.ipynb"
    finally:
        call(gw, "DELETE", f"/api/sessions/{sid}")


@pytest.mark.parametrize("body", [
    {"path": "falsy.ipynb", "type": "notebook", "kernel": []},
    {"path": "falsy.ipynb", "type": "notebook", "name": 0, "kernel": {"name": "nosuchspec"}},
])
def test_session_post_falsy_wrong_types_are_400(gw, body):
    result = call(gw, "POST", "/api/sessions", body)
    if result[0] == 201:
        call(gw, "DELETE", f"/api/sessions/{result[1]['id']}")
    assert_error(result, 400)


def test_session_patch_falsy_kernel_is_400(gw, kernel):
    model = create_session(gw, "falsy-patch.ipynb", kernel={"id": kernel})
    try:
        for body in ({"kernel": []}, {"kernel": 0}):
            assert_error(call(gw, "PATCH", f"/api/sessions/{model['id']}", body), 400)
    finally:
        call(gw, "DELETE", f"/api/sessions/{model['id']}")


def test_failed_session_patch_changes_nothing(gw):
    model = create_session(gw, "stay.ipynb", kernel={"name": "python3"})
    sid = model["id"]
    try:
        assert_error(call(gw, "PATCH", f"/api/sessions/{sid}",
                          {"path": "moved.ipynb", "kernel": {"id": MISSING_KERNEL}}), 400)
        assert call(gw, "GET", f"/api/sessions/{sid}")[1]["path"] == "stay.ipynb"
    finally:
        call(gw, "DELETE", f"/api/sessions/{sid}")


# -- authentication ------------------------------------------------------------------------------
PROTECTED = [
    ("GET", "/api/kernels"), ("POST", "/api/kernels"), ("GET", f"/api/kernels/{MISSING_KERNEL}"),
    ("DELETE", f"/api/kernels/{MISSING_KERNEL}"), ("POST", f"/api/kernels/{MISSING_KERNEL}/interrupt"),
    ("POST", f"/api/kernels/{MISSING_KERNEL}/restart"), ("GET", "/api/kernelspecs"),
    ("GET", "/api/kernelspecs/python3"), ("GET", "/kernelspecs/files/kernel.js"), ("GET", "/api/sessions"),
    ("POST", "/api/sessions"), ("GET", f"/api/sessions/{MISSING_KERNEL}"),
    ("PATCH", f"/api/sessions/{MISSING_KERNEL}"), ("DELETE", f"/api/sessions/{MISSING_KERNEL}"),
]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_no_token_is_401(gw, method, path):
    before = kernel_ids(gw)
    body = {"path": "p", "type": "notebook"} if method in ("POST", "PATCH") else None
    result = call(gw, method, path, body, auth=False)
    assert_error(result, 401)
    headers = {k.lower(): v for k, v in result[2].items()}
    assert "token" in headers.get("www-authenticate", "")
    assert kernel_ids(gw) == before


@pytest.mark.parametrize("header", [
    "token wrong", "Bearer wrong", "token", "Bearer ", "Basic dXNlcjpwYXNz", "wrong",
])
def test_wrong_token_is_401(gw, header):
    assert_error(call(gw, "GET", "/api/kernels", headers={"Authorization": header}, auth=False), 401)


def test_wrong_token_variants_are_401(gw):
    assert_error(call(gw, "GET", f"/api/kernels?token={gw.token}x", auth=False), 401)
    assert_error(call(gw, "GET", f"/api/kernels?token={gw.token[:-1]}", auth=False), 401)
    assert_error(call(gw, "GET", "/api/kernels?token=", auth=False), 401)
    assert_error(call(gw, "GET", "/api/kernels", headers={"Authorization": f"token {gw.token.upper()}x"},
                      auth=False), 401)


@pytest.mark.parametrize("scheme", ["token", "Token", "TOKEN", "Bearer", "bearer", "BEARER", "bEaReR"])
def test_token_schemes_are_accepted(gw, scheme):
    status, body, _ = call(gw, "GET", "/api/kernels", headers={"Authorization": f"{scheme} {gw.token}"}, auth=False)
    assert status == 200 and isinstance(body, list)


def test_query_token_is_accepted(gw):
    status, body, _ = call(gw, "GET", f"/api/kernelspecs?token={gw.token}", auth=False)
    assert status == 200 and "python3" in body["kernelspecs"]


@pytest.mark.parametrize("path", PUBLIC)
def test_public_routes_need_no_token(gw, path):
    assert call(gw, "GET", path, auth=False)[0] == 200
    assert call(gw, "GET", path, headers={"Authorization": "token wrong"}, auth=False)[0] == 200


def test_websocket_needs_token(gw, kernel):
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        KernelWS(gw, kernel, auth=False)
    assert info.value.status_code == 401
    # the query-string token works for websockets too (browsers cannot set headers)
    ws = websocket.create_connection(f"{gw.ws_url}/api/kernels/{kernel}/channels?token={gw.token}", timeout=10)
    ws.close()
