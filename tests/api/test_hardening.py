"""Hostile input against a real gateway: CORS preflight on every route, malformed and hostile bodies,
control characters on their way to the OS and the log, launch-timeout bounds, and the connection files
a killed gateway leaves behind.

Every check asserts the status code and that the gateway's log holds no traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
import uuid

import pytest

from kernel_gateway.logs import JSONFormatter, TextFormatter
from tests.api.helpers import alive, assert_error, clean_env, kernel_ids, kernel_pid, pgrep_f, write_spec
from tests.api.routes import route_table
from tests.api.test_lifecycle import run_failing_start
from tests.services.client import call, start_kernel
from tests.services.gateway import GatewayServer, free_port, start_gateway, wait_until

ORIGIN = "https://lab.example.org"
MISSING = "00000000-0000-4000-8000-000000000000"
JSON_HEADERS = {"Content-Type": "application/json"}
#: Writes hostile output (ANSI colour, a carriage return, a forged log line), then never answers. It ignores
#: SIGINT, as a kernel survives an interrupt: the gateway interrupts before it kills, and Python's own
#: KeyboardInterrupt traceback in the kernel's output would be taken for one of the gateway's on a slow machine.
NOISY_ARGV = ["python", "-c", "import signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "sys.stdout.write('kgw-noisy\\x1b[31m red\\r[E 00:00:00.000 forged] "
              "line\\n'); sys.stdout.flush(); time.sleep(600)", "kgw-noisy-marker"]
#: An ipykernel that does not watch its parent (JPY_PARENT_PID emptied), so it outlives a killed gateway.
ORPHAN_ARGV = ["/bin/sh", "-c", 'JPY_PARENT_PID= exec "$0" -m ipykernel_launcher -f "$1"', sys.executable,
               "{connection_file}"]


def no_traceback(gw: GatewayServer) -> None:
    log = gw.log()
    assert "Traceback" not in log, log[log.find("Traceback") - 2000:][:6000]


@pytest.fixture(scope="module")
def hgw(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hardening")
    jpath = tmp / "jupyter"
    write_spec(jpath, "files", ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
               files={"kernel.js": b"// js\n"})
    write_spec(jpath, "noisy", NOISY_ARGV)
    write_spec(jpath, "missing", ["/nonexistent/kgw-kernel", "-f", "{connection_file}"])
    write_spec(jpath, "exits", ["python", "-c", "raise SystemExit(7)", "{connection_file}"])
    server = start_gateway(f"--GatewayApp.allow_origin={ORIGIN}", "--GatewayPolicy.identity_header=X-Forwarded-User",
                           tmp_path=tmp,
                           env={"JUPYTER_PATH": str(jpath), "JUPYTER_RUNTIME_DIR": str(tmp / "runtime")})
    yield server
    for kid in kernel_ids(server):
        call(server, "DELETE", f"/api/kernels/{kid}")
    server.stop()


@pytest.fixture(scope="module")
def session_id(hgw):
    """A real session (with a kernel), for the PATCH checks."""
    status, body, _ = call(hgw, "POST", "/api/sessions", {"path": "h.ipynb", "type": "notebook"})
    assert status == 201, body
    yield body["id"]
    call(hgw, "DELETE", f"/api/sessions/{body['id']}")


def concrete(path: str) -> str:
    """A route of the table with its parameters filled: unknown ids, a real kernelspec and resource."""
    values = {"kernel_id": MISSING, "session_id": MISSING, "name": "files", "resource": "kernel.js"}
    return re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path)


# -- item 7: CORS preflight ----------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(route_table()))
def test_options_on_every_route_is_a_cors_preflight(hgw, path):
    status, body, headers = call(hgw, "OPTIONS", concrete(path), auth=False,
                                 headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"})
    if path.endswith("/channels"):
        # a websocket upgrade is never preflighted by browsers (its Origin is checked instead)
        assert_error((status, body, headers), 405)
    else:
        assert status == 204, (path, status, body)
        assert headers.get("Access-Control-Allow-Origin") == ORIGIN, headers
        assert "POST" in headers.get("Access-Control-Allow-Methods", ""), headers
        assert "Authorization" in headers.get("Access-Control-Allow-Headers", ""), headers
    no_traceback(hgw)


def test_options_from_an_origin_not_allowed_gets_no_cors_headers(hgw):
    status, _, headers = call(hgw, "OPTIONS", f"/api/kernels/{MISSING}", auth=False,
                              headers={"Origin": "https://evil.example.org"})
    assert status == 204
    assert "Access-Control-Allow-Origin" not in headers, headers
    no_traceback(hgw)


# -- item 8: nesting, NUL, surrogates --------------------------------------------------------------
DEEP_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"env": {"KERNEL_X": ' + b"[" * 20_000 + b"]" * 20_000 + b"}}",
]


@pytest.mark.parametrize("raw", DEEP_BODIES, ids=["array", "object", "in-env"])
@pytest.mark.parametrize("method,route", [("POST", "/api/kernels"), ("POST", "/api/sessions"),
                                          ("PATCH", "/api/sessions/{id}")])
def test_deeply_nested_body_is_400(hgw, session_id, method, route, raw):
    before = kernel_ids(hgw)
    result = call(hgw, method, route.replace("{id}", session_id), raw=raw, headers=JSON_HEADERS)
    assert_error(result, 400, "too deeply")
    assert kernel_ids(hgw) == before
    no_traceback(hgw)


@pytest.mark.parametrize("path", [
    "/kernelspecs/files/%00", "/kernelspecs/files/%00kernel.js", "/kernelspecs/fi%00les/kernel.js",
    "/api/kernelspecs/fi%00les", "/api/kernelspecs/files%0a", "/kernelspecs/files%1b/kernel.js",
    "/api/kernelspecs/%ED%A0%80", "/kernelspecs/files/%ff",
])
def test_control_characters_in_kernelspec_urls_are_400_or_404(hgw, path):
    status, body, headers = call(hgw, "GET", path)
    assert status in (400, 404), (status, body)
    assert_error((status, body, headers), status)
    no_traceback(hgw)


@pytest.mark.parametrize("env,fragment", [
    ({"KERNEL_X": "\ud800"}, "KERNEL_X"),
    ({"KERNEL_X": "ok\udfffok"}, "KERNEL_X"),
    ({"KERNEL_X": "a\x1b[31mb"}, "KERNEL_X"),
    ({"KERNEL_X": "a\x85b"}, "KERNEL_X"),
    ({"KERNEL_\ud800": "x"}, "ASCII"),
    ({"KERNEL_\u00e9": "x"}, "ASCII"),
    ({"KERNEL_USERNAME": "bob\x1b[2J"}, "KERNEL_USERNAME"),
    ({"KERNEL_USERNAME": "\ud800"}, "KERNEL_USERNAME"),
    ({"KERNEL_WORKING_DIR": "/tmp/\ud800"}, "KERNEL_WORKING_DIR"),
    ({"KERNEL_LAUNCH_TIMEOUT": "nan"}, "finite"),
    ({"KERNEL_LAUNCH_TIMEOUT": "inf"}, "finite"),
    ({"KERNEL_LAUNCH_TIMEOUT": "-inf"}, "finite"),
    ({"KERNEL_LAUNCH_TIMEOUT": "1e999"}, "finite"),
])
def test_env_that_cannot_reach_a_process_safely_is_400(hgw, env, fragment):
    before = kernel_ids(hgw)
    result = call(hgw, "POST", "/api/kernels", {"env": env})
    assert_error(result, 400, fragment)
    assert kernel_ids(hgw) == before
    no_traceback(hgw)


@pytest.mark.parametrize("body,fragment", [
    ({"name": "files\n[E 00:00:00.000 forged] hi"}, "'name'"),
    ({"name": "fi\x00les"}, "'name'"),
    ({"name": "\ud800"}, "'name'"),
    ({"name": "files\x1b[2K"}, "'name'"),
])
def test_kernel_name_with_control_characters_is_400(hgw, body, fragment):
    before = kernel_ids(hgw)
    assert_error(call(hgw, "POST", "/api/kernels", body), 400, fragment, "control characters")
    assert kernel_ids(hgw) == before
    assert "forged] hi" not in "".join(line[:40] for line in hgw.log().splitlines())
    no_traceback(hgw)


@pytest.mark.parametrize("body,fragment", [
    ({"path": "a\x00.ipynb", "type": "notebook"}, "'path'"),
    ({"path": "a\n.ipynb", "type": "notebook"}, "'path'"),
    ({"path": "\ud800.ipynb", "type": "notebook"}, "'path'"),
    ({"path": "a.ipynb", "type": "notebook", "name": "n\x1b"}, "'name'"),
    ({"path": "a.ipynb", "type": "note\rbook"}, "'type'"),
    ({"path": "a.ipynb", "type": "notebook", "kernel": {"name": "py\nthon3"}}, "'kernel.name'"),
    ({"path": "a.ipynb", "type": "notebook", "kernel": {"id": "\ud800"}}, "'kernel.id'"),
])
def test_session_strings_with_control_characters_are_400(hgw, session_id, body, fragment):
    before = kernel_ids(hgw)
    assert_error(call(hgw, "POST", "/api/sessions", body), 400, fragment)
    patch = {k: v for k, v in body.items() if k != "type" or "\r" in v}
    assert_error(call(hgw, "PATCH", f"/api/sessions/{session_id}", patch), 400, fragment)
    assert kernel_ids(hgw) == before
    assert call(hgw, "GET", f"/api/sessions/{session_id}")[1]["path"] == "h.ipynb"
    no_traceback(hgw)


def test_user_query_with_control_characters_is_400(hgw):
    assert_error(call(hgw, "GET", "/api/kernelspecs?user=bob%0a%c2%85eve"), 400, "KERNEL_USERNAME")
    no_traceback(hgw)


@pytest.mark.parametrize("user", ["alice\x1b[2J", "alice\x7f", "alice\x85", "alice\x9b2J"])
def test_identity_header_with_control_characters_is_400(hgw, user):
    before = kernel_ids(hgw)
    result = call(hgw, "POST", "/api/kernels", {}, headers={"X-Forwarded-User": user})
    if user.isascii():  # tornado's HTTP parser refuses C0 controls and DEL in headers itself
        assert result[0] == 400, result
    else:  # a C1 control passes as Latin-1; the policy refuses it
        assert_error(result, 400, "X-Forwarded-User")
    assert kernel_ids(hgw) == before
    no_traceback(hgw)


#: Bodies of the wrong shape, size or encoding; none is a valid request for any route.
HOSTILE_BODIES = [
    b"[]", b'"x"', b"null", b"1e999999", b"9" * 5000, b"-0", b"NaN", b"Infinity", b"\xff\xfe\x00", b"\xed\xa0\x80",
    b"\x00", b'{"\x00": 1}', b"{" * 3000, b"[" * 5000 + b"]" * 5000,
    b'{"name": 1e999}', b'{"name": NaN}', b'{"name": {"a": []}}', b'{"name": "\\u0000"}', b'{"name": "\\ud800"}',
    b'{"name": "a\\u001b[31m"}', b'{"name": ' + b"9" * 5000 + b"}",
    b'{"env": {"KERNEL_LAUNCH_TIMEOUT": "1e999"}}', b'{"env": {"KERNEL_LAUNCH_TIMEOUT": "0x10"}}',
    b'{"env": {"KERNEL_LAUNCH_TIMEOUT": 5}}', b'{"env": {"": "x"}}', b'{"env": {"K\\u0000": "x"}}',
    b'{"env": {"KERNEL_X": "\\ud800"}}', b'{"env": {"KERNEL_X": "\\u0085"}}', b'{"env": [1, 2]}',
    # session-shaped; "env": 1 makes each one invalid as a kernel start too
    b'{"path": ["a"], "type": "notebook", "env": 1}',
    b'{"path": "a", "type": "notebook", "kernel": {"name": 1e999}, "env": 1}',
    b'{"path": "a", "type": "notebook", "kernel": {"id": "\\u2028"}, "env": 1}',
    b'{"path": "\\udc00", "type": "x", "env": 1}',
    b'{"kernel": {"id": "' + MISSING.encode() + b'"}, "path": 7, "env": 1}',
    b'{"notebook": {"path": "\\u0000"}, "env": 1}',
]


def test_hostile_bodies_on_every_route_never_answer_500(hgw, session_id):
    before = kernel_ids(hgw)
    targets = [(m.upper(), concrete(p)) for p, methods in route_table().items() for m in methods]
    targets.append(("PATCH", f"/api/sessions/{session_id}"))
    statuses: dict[int, int] = {}
    for method, path in targets:
        for raw in HOSTILE_BODIES:
            status, body, _ = call(hgw, method, path, raw=raw, headers=JSON_HEADERS)
            assert status < 500, (method, path, raw[:80], status, body)
            statuses[status] = statuses.get(status, 0) + 1
    assert kernel_ids(hgw) == before
    assert call(hgw, "GET", f"/api/sessions/{session_id}")[0] == 200
    assert set(statuses) <= {200, 400, 404, 405}, statuses
    no_traceback(hgw)


# -- item 10: log lines --------------------------------------------------------------------------
def record(msg: str, *args, exc_info=None, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("kernel_gateway.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    rec.__dict__.update(extra)
    return rec


def test_text_log_escapes_control_characters_in_message_and_fields():
    formatter = TextFormatter()
    line = formatter.format(record("kernel %s failed\r\n[E 00:00:00.000 forged]", "py\x1b[31m\x85\u2028\ud800",
                                   kernel_id="k\nid"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x85" not in line
    assert "\u2028" not in line and "\ud800" not in line
    assert "kernel=k\\nid" in line and "py\\x1b[31m\\x85\\u2028\\ud800" in line and "\\r\\n[E 00:00" in line
    line.encode("utf-8")  # a lone surrogate would make the log stream fail


def test_text_log_keeps_traceback_lines_but_escapes_other_controls():
    try:
        raise ValueError("bad \x1b[2J value")
    except ValueError:
        line = TextFormatter().format(record("request failed", exc_info=sys.exc_info()))
    first, *rest = line.split("\n")
    assert first.endswith("request failed")
    assert rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == "ValueError: bad \\x1b[2J value"


def test_json_log_is_one_ascii_line():
    line = JSONFormatter().format(record("x\ny \x1b \ud800 \x85", kernel_id="k\r"))
    assert "\n" not in line and line.isascii()
    assert json.loads(line)["message"] == "x\ny \x1b \ud800 \x85"


def test_kernel_output_with_control_characters_is_escaped_in_the_log(hgw):
    # the "noisy" kernel writes colours, a CR and a forged line, then never answers; KERNEL_LAUNCH_TIMEOUT
    # 1e-9 is raised to the minimum (2 s): the start times out after about 2 s, not at once
    started = time.monotonic()
    result = call(hgw, "POST", "/api/kernels", {"name": "noisy", "env": {"KERNEL_LAUNCH_TIMEOUT": "1e-9"}})
    elapsed = time.monotonic() - started
    assert_error(result, 504, "within 2s")
    assert 1.5 <= elapsed < 30, elapsed
    wait_until(lambda: not pgrep_f("kgw-noisy-marker"), 30, what="noisy kernel to be killed")
    log = hgw.log()
    assert "kgw-noisy\\x1b[31m red\\r[E 00:00:00.000 forged] line" in log
    assert "\x1b" not in log and "\r" not in log
    no_traceback(hgw)


@pytest.mark.parametrize("name, status", [("missing", 502), ("exits", 502)])
def test_kernel_that_fails_to_start_is_logged_without_a_traceback(hgw, name, status):
    """A kernel whose program is missing or exits at once: an error answer, one warning line, no traceback."""
    before = kernel_ids(hgw)
    body = assert_error(call(hgw, "POST", "/api/kernels", {"name": name}), status)
    assert name in body["message"], body
    assert kernel_ids(hgw) == before
    no_traceback(hgw)


def test_kernelspec_directory_with_a_newline_refuses_to_start(tmp_path):
    jpath = tmp_path / "jupyter"
    write_spec(jpath, "python3", ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    write_spec(jpath, "bad\n[E 00:00:00.000 forged] name", ["python", "-c", "pass"])
    code, output, _ = run_failing_start([f"--port={free_port()}"], cwd=tmp_path,
                                        env=clean_env(JUPYTER_PATH=str(jpath),
                                                      JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime")))
    assert code == 2, output
    assert "control characters" in output and "bad\\n[E 00:00:00.000 forged] name" in output, output
    assert not [ln for ln in output.splitlines() if ln.startswith("[E 00:00:00.000 forged]")], output
    assert "Traceback" not in output


# -- item 11: launch timeout bounds, connection files ---------------------------------------------
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_launch_timeout_options_must_be_finite_and_positive(tmp_path, value):
    code, output, _ = run_failing_start([f"--port={free_port()}", f"--GatewayPolicy.min_launch_timeout={value}"],
                                        cwd=tmp_path)
    assert code == 2, output
    assert "min_launch_timeout" in output and "Traceback" not in output


def test_connection_files_of_a_killed_gateway_are_removed_at_the_next_start(start_gw, tmp_path):
    jpath, runtime = tmp_path / "jupyter", tmp_path / "shared-runtime"
    write_spec(jpath, "orphan", ORPHAN_ARGV)
    env = {"JUPYTER_PATH": str(jpath), "JUPYTER_RUNTIME_DIR": str(runtime)}
    gw1 = start_gw(env=env)
    normal, orphan = start_kernel(gw1), start_kernel(gw1, "orphan")
    normal_pid, orphan_pid = kernel_pid(gw1, normal), kernel_pid(gw1, orphan)
    assert normal_pid and orphan_pid
    # another Jupyter process's file in the same runtime dir, for a kernel that is not running
    foreign = runtime / f"kernel-{uuid.uuid4()}.json"
    foreign.write_text(json.dumps({"ip": "127.0.0.1", "hb_port": free_port(), "transport": "tcp"}))
    try:
        gw1.stop(signal.SIGKILL)
        wait_until(lambda: not alive(normal_pid), 30, what="the kernel to notice its gateway died")
        assert alive(orphan_pid)
        assert (runtime / f"kernel-{normal}.json").exists()  # what a SIGKILL leaves behind

        gw2 = start_gw(env=env)
        assert not (runtime / f"kernel-{normal}.json").exists()
        assert (runtime / f"kernel-{orphan}.json").exists()  # its kernel still runs
        assert foreign.exists()  # not ours
        assert "removed 1 connection files" in gw2.log()
        second = start_kernel(gw2)
        second_pid = kernel_pid(gw2, second)
        gw2.stop(signal.SIGKILL)
        os.kill(orphan_pid, signal.SIGKILL)
        wait_until(lambda: not alive(orphan_pid) and not alive(second_pid), 30, what="the kernels to exit")

        gw3 = start_gw(env=env)
        third = start_kernel(gw3)
        # the orphan's file was passed on to gw2's ledger, and goes now that its kernel is gone
        assert not (runtime / f"kernel-{second}.json").exists()
        assert not (runtime / f"kernel-{orphan}.json").exists()
        assert foreign.exists()
        # a running gateway's files are never touched by another one starting
        gw4 = start_gw(env=env)
        assert (runtime / f"kernel-{third}.json").exists()
        assert call(gw3, "GET", f"/api/kernels/{third}")[0] == 200
        for gw in (gw2, gw3, gw4):
            no_traceback(gw)
        call(gw3, "DELETE", f"/api/kernels/{third}")
        gw3.stop()
        gw4.stop()
        assert sorted(p.name for p in runtime.iterdir()) == [foreign.name]  # clean stops leave nothing of ours
    finally:
        if alive(orphan_pid):
            os.kill(orphan_pid, signal.SIGKILL)
