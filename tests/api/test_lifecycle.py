"""The gateway process: start-up validation and auth modes, kernel port ranges, culling, SIGTERM, logs."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import websocket

from tests.api.helpers import (
    alive,
    assert_error,
    clean_env,
    concurrently,
    connection_info,
    kernel_ids,
    kernel_pid,
    listen_ports,
    pgrep_f,
    post_kernel,
    sleeper_spec,
    write_spec,
)
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import GatewayServer, free_port, start_gateway, wait_until

IPYKERNEL_QUIET_ARGV = ["python", "-m", "ipykernel_launcher", "-f", "{connection_file}",
                        "--IPKernelApp.log_level=CRITICAL"]


def gateway_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "kernel_gateway", "--ip=127.0.0.1", *args]


def run_failing_start(args: list[str], *, cwd: Path, env: dict | None = None) -> tuple[int | None, str, float]:
    """Run a gateway that must refuse to start; return (exit code, stderr+stdout, seconds).

    If it starts serving instead, it is stopped and the exit code returned is None.
    """
    started = time.monotonic()
    out_path = cwd / f"failing-start-{os.getpid()}-{time.monotonic_ns()}.txt"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(gateway_argv(*args), stdout=out, stderr=subprocess.STDOUT, env=env or clean_env(),
                                cwd=cwd)
    try:
        wait_until(lambda: proc.poll() is not None or "listening on" in out_path.read_text(errors="replace"), 30,
                   what="gateway to exit or start")
        code = proc.poll()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    output = out_path.read_text(errors="replace")
    out_path.unlink()
    return code, output, time.monotonic() - started


class Launched:
    """A gateway process started by hand (stdout and stderr kept apart)."""

    def __init__(self, tmp: Path, args: list[str], env: dict):
        self.port = free_port()
        self.out_path = tmp / f"stdout-{self.port}.txt"
        self.err_path = tmp / f"stderr-{self.port}.txt"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(gateway_argv(f"--port={self.port}", *args), stdout=out, stderr=err,
                                         env=env, cwd=tmp)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def server(self, token: str) -> GatewayServer:
        return GatewayServer(port=self.port, token=token, proc=self.proc, log_path=self.err_path)

    def wait_ready(self, timeout: float = 30) -> None:
        def ready():
            assert self.proc.poll() is None, f"gateway exited {self.proc.returncode}: {self.stderr()}"
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(ready, timeout, what="gateway port")
        wait_until(lambda: call(self.server(""), "GET", "/readyz", auth=False)[0] == 200, timeout, what="/readyz")


@pytest.fixture
def launch(tmp_path):
    launched: list[Launched] = []

    def start(*args: str, env: dict | None = None) -> Launched:
        item = Launched(tmp_path, list(args), env or clean_env(JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime")))
        launched.append(item)
        return item

    yield start
    for item in launched:
        item.server("").stop()


# -- start-up and auth modes ---------------------------------------------------------------------
def test_generated_token_is_printed_and_required(launch):
    gw = launch()
    gw.wait_ready()
    match = wait_until(lambda: re.search(r"token: (\S+)", gw.stdout()), 10, what="token on stdout")
    token = match.group(1)
    assert len(token) >= 32
    server = gw.server(token)
    assert_error(call(server, "GET", "/api/kernels", auth=False), 401)
    assert_error(call(server, "GET", "/api/kernels", headers={"Authorization": "token wrong"}, auth=False), 401)
    assert call(server, "GET", "/api/kernels")[:2] == (200, [])
    # printed for the operator, never logged
    assert token not in gw.stderr()


def test_no_auth_serves_without_token_and_warns(start_gw):
    gw = start_gw(token="")
    assert call(gw, "GET", "/api/kernels", auth=False)[:2] == (200, [])
    # jupyter_server always sends an (empty) token header
    assert call(gw, "GET", "/api/kernelspecs", headers={"Authorization": "token "}, auth=False)[0] == 200
    assert call(gw, "GET", "/api/kernelspecs", headers={"Authorization": "token anything"}, auth=False)[0] == 200
    warnings = [line for line in gw.log().splitlines() if line.startswith("[W ")]
    assert any("WITHOUT authentication" in line for line in warnings), gw.log()


def test_token_and_no_auth_together_refuse_to_start(tmp_path):
    code, output, elapsed = run_failing_start([f"--port={free_port()}", "--auth-token=abc", "--no-auth"], cwd=tmp_path)
    assert code not in (0, None)
    assert "auth_token" in output and "allow_unauthenticated_access" in output and "contradict" in output
    assert "Traceback" not in output
    assert elapsed < 20


def test_env_token_and_no_auth_together_refuse_to_start(tmp_path):
    code, output, _ = run_failing_start([f"--port={free_port()}", "--no-auth"], env=clean_env(GATEWAY_AUTH_TOKEN="abc"),
                                        cwd=tmp_path)
    assert code not in (0, None) and "contradict" in output


@pytest.mark.parametrize("value,problem", [
    ("abc", "must be written 'low..high'"),
    ("5..3", "between 1024 and 65535"),
    ("40005..40001", "low end is above the high end"),
    ("40000..40002", "has 3 ports; a kernel needs at least 5"),
    ("70000..70010", "between 1024 and 65535"),
    ("40000-40010", "must be written 'low..high'"),
])
def test_invalid_port_range_refuses_to_start(tmp_path, value, problem):
    code, output, elapsed = run_failing_start([f"--port={free_port()}", "--auth-token=t", f"--port-range={value}"],
                                              cwd=tmp_path)
    assert code not in (0, None)
    assert f"port range {value!r}" in output and problem in output, output
    assert "Traceback" not in output
    assert elapsed < 20


def test_invalid_port_range_from_environment_refuses_to_start(tmp_path):
    code, output, _ = run_failing_start([f"--port={free_port()}", "--auth-token=t"],
                                        env=clean_env(GATEWAY_PORT_RANGE="abc"), cwd=tmp_path)
    assert code not in (0, None) and "'abc'" in output and "GATEWAY_PORT_RANGE" in output, output
    assert "Traceback" not in output


@pytest.mark.parametrize("provisioner, words", [
    ({"provisioner_name": "local-port-range-provisioner", "config": {"port_range": "bad"}}, "'bad'"),
    ({"provisioner_name": "no-such-provisioner"}, "no-such-provisioner"),
    ({"provisioner_name": "local-port-range-provisioner", "config": {"port_rnage": "40000..40100"}}, "port_rnage"),
])
def test_kernelspec_with_bad_provisioner_settings_refuses_to_start(tmp_path, provisioner, words):
    jpath = tmp_path / "jupyter"
    write_spec(jpath, "ghost", IPYKERNEL_QUIET_ARGV, metadata={"kernel_provisioner": provisioner})
    code, output, elapsed = run_failing_start([f"--port={free_port()}", "--auth-token=t"],
                                              env=clean_env(JUPYTER_PATH=str(jpath)), cwd=tmp_path)
    assert code not in (0, None) and "kernelspec 'ghost'" in output and words in output, output
    assert "Traceback" not in output
    assert elapsed < 20


@pytest.mark.parametrize("value", ["notanumber", "99999", "0"])
def test_bad_gateway_port_env_refuses_to_start(tmp_path, value):
    code, output, elapsed = run_failing_start(["--auth-token=t"], env=clean_env(GATEWAY_PORT=value), cwd=tmp_path)
    assert code not in (0, None)
    assert "GATEWAY_PORT" in output and value in output, output
    assert "Traceback" not in output
    assert elapsed < 20


def test_port_in_use_refuses_to_start(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, output, _ = run_failing_start([f"--port={port}", "--auth-token=t"], cwd=tmp_path)
    assert code not in (0, None) and f"port {port}" in output and "already in use" in output, output


# -- port range ----------------------------------------------------------------------------------
def free_window(size: int) -> tuple[int, int]:
    """``size`` consecutive loopback ports, all free right now, away from the ephemeral range."""
    for _ in range(200):
        low = random.randrange(20000, 30000 - size)
        socks = []
        try:
            for port in range(low, low + size):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return low, low + size - 1
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free port window")


@pytest.fixture(scope="module")
def ranged(tmp_path_factory):
    """A gateway with a 20-port range and three kernels started concurrently."""
    tmp = tmp_path_factory.mktemp("ranged")
    low, high = free_window(20)
    gw = start_gateway(f"--port-range={low}..{high}", tmp_path=tmp,
                       env={"JUPYTER_RUNTIME_DIR": str(tmp / "runtime")})
    results = concurrently(lambda: post_kernel(gw), [()] * 3)
    assert [r[0] for r in results] == [201] * 3, [r[1] for r in results]
    ids = [r[1]["id"] for r in results]
    gw.extra.update(low=low, high=high, ids=ids, runtime=tmp / "runtime")
    yield gw
    for kid in kernel_ids(gw):
        call(gw, "DELETE", f"/api/kernels/{kid}")
    gw.stop()


def kernel_ports(gw) -> dict[str, tuple[set[int], set[int]]]:
    """kernel id -> (its connection-file ports, every port its process listens on)."""
    listening = listen_ports()
    result = {}
    for kid in gw.extra["ids"]:
        pid = kernel_pid(gw, kid)
        assert pid, f"no process for kernel {kid}"
        info = connection_info(gw.extra["runtime"], kid)
        conn = {info[name] for name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")}
        result[kid] = (conn, listening.get(pid, set()))
    return result


def assert_kernel_ports_in_range(gw) -> None:
    low, high = gw.extra["low"], gw.extra["high"]
    seen: set[int] = set()
    for kid, (conn, listening) in kernel_ports(gw).items():
        assert len(conn) == 5, conn
        assert conn <= listening, (kid, conn, listening)  # the kernel really listens on them
        assert all(low <= p <= high for p in conn), (kid, conn, (low, high))
        assert not conn & seen, (kid, conn, seen)
        seen |= conn


def test_kernel_ports_lie_in_the_range_and_are_not_shared(ranged):
    assert_kernel_ports_in_range(ranged)
    for kid in ranged.extra["ids"]:
        with KernelWS(ranged, kid) as ws:
            assert ws.run("print(6 * 7)")[0] == "42\n"


def test_every_listening_port_of_a_kernel_lies_in_the_range(ranged):
    low, high = ranged.extra["low"], ranged.extra["high"]
    for kid, (_, listening) in kernel_ports(ranged).items():
        assert listening and all(low <= p <= high for p in listening), (kid, sorted(listening), (low, high))


def test_range_exhaustion_is_an_error_not_a_port_outside_it(ranged):
    # 3 kernels hold 15 of the 20 ports; the 4th needs 5 more, fewer may be free -> either it fits
    # in the range or the start fails with the range in the message; it must never escape the range
    status, body, _ = post_kernel(ranged)
    if status == 201:
        ranged.extra["ids"].append(body["id"])
        assert_kernel_ports_in_range(ranged)
        status, body, _ = post_kernel(ranged)
    assert status in (502, 503), body
    assert_error((status, body, {"Content-Type": "application/json"}), status,
                 f"{ranged.extra['low']}..{ranged.extra['high']}")


def test_auto_restarted_kernel_keeps_its_ports_in_the_range(ranged):
    kid = ranged.extra["ids"][0]
    before = kernel_ports(ranged)[kid][0]
    pid = kernel_pid(ranged, kid)
    os.kill(pid, signal.SIGKILL)
    new_pid = wait_until(lambda: (p := kernel_pid(ranged, kid)) and p != pid and p, 60, what="automatic restart")
    wait_until(lambda: before <= listen_ports().get(new_pid, set()), 60, what="restarted kernel listening")
    assert_kernel_ports_in_range(ranged)
    # idle once the gateway has the new kernel's iopub: output sent before that could be missed
    wait_until(lambda: call(ranged, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "idle", 60,
               what="restarted kernel idle")
    with KernelWS(ranged, kid) as ws:
        assert ws.run("print('back')")[0] == "back\n"


def test_failed_launches_release_their_ports(start_gw, tmp_path):
    jpath = tmp_path / "jupyter"
    write_spec(jpath, "missingbin", ["/nonexistent/kgw-no-such-binary", "-f", "{connection_file}"])
    low, high = free_window(10)  # room for two kernels
    gw = start_gw(f"--port-range={low}..{high}", env={"JUPYTER_PATH": str(jpath)})
    for _ in range(3):
        assert_error(post_kernel(gw, "missingbin"), 502, "/nonexistent/kgw-no-such-binary")
    status, body, _ = post_kernel(gw, "python3")
    assert status == 201, body


# -- culling -------------------------------------------------------------------------------------
def test_idle_kernels_are_culled_but_connected_ones_stay(start_gw):
    gw = start_gw("--KernelCuller.cull_idle_timeout=2", "--KernelCuller.cull_interval=1")
    connected = start_kernel(gw)
    with KernelWS(gw, connected) as ws:
        witness = start_kernel(gw)
        witness_pid = kernel_pid(gw, witness)
        wait_until(lambda: witness not in kernel_ids(gw), 60, what="idle witness kernel to be culled")
        assert connected in kernel_ids(gw)
        assert call(gw, "GET", f"/api/kernels/{connected}")[1]["connections"] == 1
        assert ws.run("print('still here')")[0] == "still here\n"
    wait_until(lambda: not alive(witness_pid), 30, what="culled kernel process to exit")
    assert_error(call(gw, "GET", f"/api/kernels/{witness}"), 404)
    # once disconnected, the other kernel is culled too
    wait_until(lambda: connected not in kernel_ids(gw), 60, what="disconnected kernel to be culled")
    assert any(witness in line and "cull" in line for line in gw.log().splitlines()), gw.log()


# -- SIGTERM -------------------------------------------------------------------------------------
def test_sigterm_stops_kernels_and_exits_zero(start_gw, tmp_path):
    gw = start_gw(env={"JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")})
    kid = start_kernel(gw)
    pid = kernel_pid(gw, kid)
    assert pid and alive(pid)
    ws = KernelWS(gw, kid)
    try:
        assert ws.run("print(1)")[0] == "1\n"
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(20)
        assert time.monotonic() - started < 20
    finally:
        ws.ws.close(timeout=1)
    assert code == 0, gw.log()
    wait_until(lambda: not alive(pid), 30, what="kernel process to exit")
    assert not list((tmp_path / "runtime").glob("kernel-*.json"))


def test_sigterm_while_a_kernel_is_starting(start_gw, tmp_path):
    jpath = tmp_path / "jupyter"
    marker = sleeper_spec(jpath)
    gw = start_gw(env={"JUPYTER_PATH": str(jpath)})
    result: dict = {}

    def post():
        try:
            result["response"] = post_kernel(gw, "sleeper", {"KERNEL_LAUNCH_TIMEOUT": "60"})
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=post)
    thread.start()
    try:
        wait_until(lambda: pgrep_f(marker), 30, what="sleeper kernel process")
        gw.proc.send_signal(signal.SIGTERM)
        code = gw.proc.wait(25)
        thread.join(30)
        assert code == 0, gw.log()
        wait_until(lambda: not pgrep_f(marker), 5, what="starting kernel process to be killed")
        assert result.get("response", (None,))[0] == 503, result
    finally:
        for pid in pgrep_f(marker):  # never leave the sleeper behind, whatever the gateway did
            os.kill(pid, signal.SIGKILL)


# -- logs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A gateway (logging at debug level) that has served a kernel's whole life, token in query strings."""
    tmp = tmp_path_factory.mktemp("logs")
    gw = start_gateway("--debug", tmp_path=tmp, env={"JUPYTER_RUNTIME_DIR": str(tmp / "runtime")})
    q = f"token={gw.token}"
    status, model, _ = call(gw, "POST", f"/api/kernels?{q}", {"name": "python3"}, auth=False)
    assert status == 201, model
    kid = model["id"]
    key = connection_info(tmp / "runtime", kid)["key"]
    assert len(key) >= 16
    call(gw, "GET", f"/api/kernels?{q}", auth=False)
    call(gw, "GET", f"/api/kernels/{kid}?{q}&other=1", auth=False)
    call(gw, "GET", f"/api/nosuchroute?{q}", auth=False)
    call(gw, "GET", f"/api/kernels?token=wrong-{gw.token}", auth=False)
    call(gw, "GET", f"/api/kernels/00000000-0000-4000-8000-000000000000?{q}", auth=False)
    ws = websocket.create_connection(f"{gw.ws_url}/api/kernels/{kid}/channels?session_id=s1&{q}", timeout=10)
    ws.close()
    with KernelWS(gw, kid) as kws:
        assert kws.run("print('logged')")[0] == "logged\n"
    assert call(gw, "POST", f"/api/kernels/{kid}/interrupt?{q}", auth=False)[0] == 204
    assert call(gw, "POST", f"/api/kernels/{kid}/restart?{q}", auth=False)[0] == 200
    key2 = connection_info(tmp / "runtime", kid)["key"]
    assert call(gw, "DELETE", f"/api/kernels/{kid}?{q}", auth=False)[0] == 204
    wait_until(lambda: f"DELETE /api/kernels/{kid}" in gw.log(), 30, what="DELETE in access log")
    gw.extra.update(kid=kid, keys={key, key2})
    yield gw
    gw.stop()


def test_log_never_contains_the_token(logged):
    log = logged.log()
    assert "[redacted]" in log  # the requests with ?token= were logged ...
    assert logged.token not in log  # ... without it


def test_log_never_contains_the_kernel_key(logged):
    log = logged.log()
    for key in logged.extra["keys"]:
        assert key not in log
        assert key.replace("-", "") not in log


def test_log_lines_about_a_kernel_name_it(logged):
    kid = logged.extra["kid"]
    lines = [ln for ln in logged.log().splitlines() if re.match(r"\[[DIWEC] [\d:.]+ kernel_gateway\.", ln)]
    about = [ln for ln in lines if re.match(r"\[\w [\d:.]+ kernel_gateway\.(kernels|web\.channels|culling)\]", ln)]
    assert len(about) >= 5, lines  # started, connected, disconnected, interrupting, restarting, shutting down
    for line in about:
        assert f"kernel={kid}" in line, line
    for word in ("started", "connected", "interrupting", "restarting", "shutting down"):
        assert any(word in line and kid in line for line in about), word
    # errors about a kernel name it too
    missing = "00000000-0000-4000-8000-000000000000"
    assert any(line.startswith("[W") and f"kernel={missing}" in line for line in lines), lines


@pytest.fixture(scope="module")
def auto_restarted(tmp_path_factory):
    """A gateway whose kernel process was killed and restarted automatically by jupyter_client."""
    tmp = tmp_path_factory.mktemp("autorestart")
    gw = start_gateway(tmp_path=tmp, env={"JUPYTER_RUNTIME_DIR": str(tmp / "runtime")})
    kid = start_kernel(gw)
    pid = kernel_pid(gw, kid)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (p := kernel_pid(gw, kid)) and p != pid, 60, what="automatic restart")
    wait_until(lambda: "restarting kernel" in gw.log(), 30, what="restart logged")
    gw.extra["kid"] = kid
    yield gw
    call(gw, "DELETE", f"/api/kernels/{kid}")
    gw.stop()


def test_automatic_restart_log_lines_name_the_kernel(auto_restarted):
    kid = auto_restarted.extra["kid"]
    lines = [ln for ln in auto_restarted.log().splitlines() if "restart" in ln.lower()]
    assert lines
    for line in lines:
        assert kid in line, line


def test_automatically_restarted_kernel_reports_idle(auto_restarted):
    kid = auto_restarted.extra["kid"]
    wait_until(lambda: call(auto_restarted, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "idle", 60,
               what="restarted kernel to report idle")


def test_automatically_restarted_kernel_still_works(auto_restarted):
    # runs after the xfail tests above: executing code makes the kernel report idle again
    kid = auto_restarted.extra["kid"]
    # idle once the gateway has the new kernel's iopub (also when this test runs alone)
    wait_until(lambda: call(auto_restarted, "GET", f"/api/kernels/{kid}")[1]["execution_state"] == "idle", 60,
               what="restarted kernel to report idle")
    with KernelWS(auto_restarted, kid) as ws:
        assert ws.run("print('alive again')")[0] == "alive again\n"
    assert kid in kernel_ids(auto_restarted)


def json_log_lines(text: str) -> list[dict]:
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line is not JSON: {line!r}") from None
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def exercise_json_gateway(launch, tmp_path, kernel_name: str) -> tuple[Launched, str]:
    jpath = tmp_path / "jupyter"
    write_spec(jpath, "quiet", IPYKERNEL_QUIET_ARGV)
    gw = launch("--auth-token=jsontoken", "--json-logs",
                env=clean_env(JUPYTER_PATH=str(jpath), JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime")))
    gw.wait_ready()
    server = gw.server("jsontoken")
    kid = start_kernel(server, kernel_name)
    with KernelWS(server, kid) as ws:
        assert ws.run("print('x')")[0] == "x\n"
    call(server, "GET", "/api/nosuchroute?token=jsontoken", auth=False)
    call(server, "GET", "/api/kernels", auth=False)
    call(server, "POST", "/api/kernels", raw=b"{bad", headers={"Content-Type": "application/json"})
    assert call(server, "POST", f"/api/kernels/{kid}/restart")[0] == 200
    assert call(server, "DELETE", f"/api/kernels/{kid}")[0] == 204
    assert server.stop() == 0
    return gw, kid


def test_json_logs_are_json_lines(launch, tmp_path):
    gw, kid = exercise_json_gateway(launch, tmp_path, "quiet")
    entries = json_log_lines(gw.stderr())
    assert len(entries) >= 10
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry
    about = [e for e in entries if e["logger"] in ("kernel_gateway.kernels", "kernel_gateway.web.channels")]
    assert about and all(e.get("kernel_id") == kid for e in about), about
    access = [e for e in entries if e["logger"] == "kernel_gateway.access"]
    assert {e["status"] for e in access} >= {201, 204, 400, 401, 404}, access
    assert "jsontoken" not in gw.stderr()


def test_json_logs_include_kernel_output_as_json(launch, tmp_path):
    gw, _ = exercise_json_gateway(launch, tmp_path, "python3")
    json_log_lines(gw.stderr())


def test_json_logs_at_debug_level_are_json_lines(launch, tmp_path):
    gw = launch("--auth-token=jsontoken", "--json-logs", "--debug",
                env=clean_env(JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime")))
    gw.wait_ready()
    assert gw.server("jsontoken").stop() == 0
    json_log_lines(gw.stderr())
