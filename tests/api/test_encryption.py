"""CurveZMQ transport encryption of local kernels (issue 12): what crosses the loopback between the gateway and
the kernel, who the kernel answers, where its secret key is not, and the 'auto' / 'required' / per-kernelspec
options. Real gateway processes, real ipykernel kernels, packets captured with tcpdump."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.api.helpers import IPYKERNEL_ARGV, assert_error, kernel_pid, post_kernel, write_spec
from tests.services import kernel_store
from tests.services.capture import captured_run, connection_file, kernel_answers, proc_text
from tests.services.client import KernelWS, call, start_kernel
from tests.services.gateway import start_gateway
from tests.services.kernel_store import records, run, stop_keeping

keep = kernel_store.keep  # the fixture: a store key and a SQLite store under tmp_path

CURVE = {"supported_encryption": ["curve"]}
NO_ANSWER = 5.0  # seconds a client without the server key waits for a reply that must not come
UNENCRYPTED_NOTE = "run without transport encryption"


def local_config(**config) -> dict:
    return {"kernel_provisioner": {"provisioner_name": "local-port-range-provisioner", "config": config}}


def write_specs(jpath) -> None:
    write_spec(jpath, "curve", IPYKERNEL_ARGV, metadata=CURVE)
    write_spec(jpath, "curve-off", IPYKERNEL_ARGV, metadata={**CURVE, **local_config(transport_encryption="disabled")})
    write_spec(jpath, "nocurve", IPYKERNEL_ARGV)
    write_spec(jpath, "nocurve-required", IPYKERNEL_ARGV, metadata=local_config(transport_encryption="required"))


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    """A gateway with the default transport_encryption ('auto') and debug logging, and the specs above."""
    tmp = tmp_path_factory.mktemp("encryption")
    write_specs(tmp / "data")
    server = start_gateway("--debug", tmp_path=tmp, env={"JUPYTER_PATH": str(tmp / "data")})
    server.extra.update(runtime=tmp / "runtime", tmp=tmp)
    yield server
    server.stop()


def test_encrypted_kernel_sends_no_plaintext_and_unencrypted_one_does(gw, tmp_path):
    encrypted = start_kernel(gw, "curve")
    plain = start_kernel(gw, "curve-off")  # the per-kernelspec override turns it off
    try:
        info = connection_file(gw.extra["runtime"], encrypted)
        assert len(info.get("curve_publickey", "")) == 40 and info.get("curve_secretkey"), sorted(info)
        assert "curve_publickey" not in connection_file(gw.extra["runtime"], plain)

        data, marker = captured_run(gw, gw.extra["runtime"], encrypted, tmp_path / "encrypted.pcap")
        assert len(data) > 2000, "the capture saw no kernel traffic"
        assert marker.encode() not in data and b"execute_request" not in data and b"<IDS|MSG>" not in data

        data, marker = captured_run(gw, gw.extra["runtime"], plain, tmp_path / "plain.pcap")
        assert marker.encode() in data and b"execute_request" in data
    finally:
        call(gw, "DELETE", f"/api/kernels/{encrypted}")
        call(gw, "DELETE", f"/api/kernels/{plain}")


def test_a_client_without_the_server_key_gets_no_answer(gw):
    encrypted = start_kernel(gw, "curve")
    plain = start_kernel(gw, "curve-off")
    try:
        info = connection_file(gw.extra["runtime"], encrypted)
        assert not kernel_answers(info, NO_ANSWER), "the encrypted kernel answered a client without its server key"
        assert kernel_answers(info, 60, server_key=info["curve_publickey"].encode())  # any client key pair will do
        assert kernel_answers(connection_file(gw.extra["runtime"], plain), 60)  # the same check, no encryption
    finally:
        call(gw, "DELETE", f"/api/kernels/{encrypted}")
        call(gw, "DELETE", f"/api/kernels/{plain}")


def test_restart_keeps_encryption_and_interrupt_and_shutdown_work(gw, tmp_path):
    kid = start_kernel(gw, "curve")
    try:
        before = connection_file(gw.extra["runtime"], kid)
        with KernelWS(gw, kid) as ws:
            ws.assert_interrupts(gw, kid)  # a message-mode interrupt: the gateway's own control socket
        status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=120)
        assert status == 200, body
        after = connection_file(gw.extra["runtime"], kid)
        assert after["curve_publickey"] == before["curve_publickey"]
        data, marker = captured_run(gw, gw.extra["runtime"], kid, tmp_path / "restarted.pcap")
        assert marker.encode() not in data
        assert not kernel_answers(after, NO_ANSWER)
    finally:
        started = time.monotonic()
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204
    # shutdown_request reached the kernel over the encrypted control channel: no wait for the kill
    assert time.monotonic() - started < 8


def test_the_secret_key_is_in_no_log_argv_or_environment(gw):
    kid = start_kernel(gw, "curve")
    try:
        run(gw, kid, "x = 1")
        secret = connection_file(gw.extra["runtime"], kid)["curve_secretkey"]
        pid = kernel_pid(gw, kid)
        assert pid, "the kernel's process was not found"
        assert secret not in proc_text(pid)
        assert secret not in gw.log()
        # ipykernel's own start-up warning about plaintext TCP is not among the kernel's output lines
        assert not [line for line in gw.log().splitlines() if kid in line and "without encryption" in line]
    finally:
        call(gw, "DELETE", f"/api/kernels/{kid}")


def test_auto_runs_a_kernelspec_without_support_unencrypted_and_says_so_once(gw):
    ids = [start_kernel(gw, "nocurve") for _ in range(2)]
    try:
        for kid in ids:
            assert "curve_publickey" not in connection_file(gw.extra["runtime"], kid)
            assert run(gw, kid, "print(6 * 7)").strip() == "42"
        notes = [line for line in gw.log().splitlines() if UNENCRYPTED_NOTE in line and "'nocurve'" in line]
        assert len(notes) == 1, notes
    finally:
        for kid in ids:
            call(gw, "DELETE", f"/api/kernels/{kid}")


def test_required_in_a_kernelspec_refuses_it_when_it_cannot(gw):
    assert_error(post_kernel(gw, "nocurve-required"), 400, "'nocurve-required'", "transport encryption", "required")


@pytest.mark.parametrize("how", ["env", "option"])
def test_required_for_the_gateway_refuses_kernelspecs_that_cannot(tmp_path, how):
    write_specs(tmp_path / "data")
    env = {"JUPYTER_PATH": str(tmp_path / "data")}
    args = ["--transport-encryption=required"] if how == "option" else []
    if how == "env":
        env["GATEWAY_TRANSPORT_ENCRYPTION"] = "required"
    server = start_gateway(*args, tmp_path=tmp_path, env=env)
    try:
        assert "kernelspec 'nocurve': transport_encryption is 'required'" in server.log()  # said at start-up
        assert_error(post_kernel(server, "nocurve"), 400, "'nocurve'", "supported_encryption")
        assert not [line for line in server.log().splitlines() if "Traceback" in line]
        kid = start_kernel(server, "curve")
        assert "curve_publickey" in connection_file(tmp_path / "runtime", kid)
        assert run(server, kid, "print('ok')").strip() == "ok"
        kid = start_kernel(server, "curve-off")  # a kernelspec's own setting wins over the gateway's
        assert "curve_publickey" not in connection_file(tmp_path / "runtime", kid)
    finally:
        server.stop()


def test_a_kept_kernel_is_served_again_encrypted_and_its_record_has_no_secret(start_gw, keep, tmp_path):
    write_specs(tmp_path / "data")
    env = {**keep, "JUPYTER_PATH": str(tmp_path / "data")}
    first = start_gw(env=env)
    kid = start_kernel(first, "curve")
    run(first, kid, "kept = 42")
    info = connection_file(tmp_path / "runtime", kid)
    stop_keeping(first, signal.SIGTERM)
    [record] = records(keep)
    assert record.connection_info["curve_publickey"] == info["curve_publickey"]
    assert info["curve_secretkey"] not in json.dumps([record.connection_info, record.provisioner_info, record.launch])

    second = start_gw(port=first.port, env=env)
    assert run(second, kid, "print(kept)").strip() == "42"
    assert not kernel_answers(info, NO_ANSWER)
    # restarted by a gateway whose record has no secret key: the same pair (derived from the session key)
    status, body, _ = call(second, "POST", f"/api/kernels/{kid}/restart", timeout=120)
    assert status == 200, body
    after = connection_file(tmp_path / "runtime", kid)
    assert (after["curve_publickey"], after["curve_secretkey"]) == (info["curve_publickey"], info["curve_secretkey"])
    data, marker = captured_run(second, tmp_path / "runtime", kid, tmp_path / "kept.pcap")
    assert marker.encode() not in data
    assert call(second, "DELETE", f"/api/kernels/{kid}")[0] == 204
