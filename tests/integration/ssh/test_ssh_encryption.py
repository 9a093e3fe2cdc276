"""CurveZMQ transport encryption of kernels on real SSH hosts (issue 12): the launcher makes the key pair and reports
the public key; the gateway's sockets are CurveZMQ clients. Packets captured with tcpdump on the hosts' links."""

from __future__ import annotations

import json
import signal

import pytest

from tests.api.helpers import assert_error, post_kernel
from tests.services import kernel_store
from tests.services.capture import (SECRET_CELL, assert_plaintext_on_the_wire, assert_remote_kernel_encrypted,
                                    connection_file)
from tests.services.client import KernelWS, call, start_kernel
from tests.services.kernel_store import records, run, stop_keeping
from tests.services.gateway import start_gateway

from .conftest import PORT_RANGE, write_ssh_spec

pytestmark = pytest.mark.cluster

keep = kernel_store.keep  # the fixture: a store key and a SQLite store under tmp_path

CURVE = {"supported_encryption": ["curve"]}


@pytest.fixture(scope="module")
def gw(ssh_cluster, tmp_path_factory):
    """A gateway (transport_encryption 'auto') with SSH specs: 'ssh-curve' (declares curve), 'ssh-plain' (declares
    it, turned off in its config), 'ssh-nocurve' (does not declare it), 'ssh-required' (does not, but requires it)."""
    tmp = tmp_path_factory.mktemp("sshcurve")
    data = tmp / "data"
    write_ssh_spec(data, "ssh-curve", ssh_cluster, metadata=CURVE)
    write_ssh_spec(data, "ssh-plain", ssh_cluster, metadata=CURVE, transport_encryption="disabled")
    write_ssh_spec(data, "ssh-nocurve", ssh_cluster)
    write_ssh_spec(data, "ssh-required", ssh_cluster, transport_encryption="required")
    server = start_gateway("--debug", f"--ResponseListener.response_port_range={PORT_RANGE}", tmp_path=tmp,
                           env={"JUPYTER_PATH": str(data)})
    server.extra["runtime"] = tmp / "runtime"
    yield server
    server.stop()


def launcher_pid(cluster):
    """The pid (in this machine's pid namespace) of the launcher running a kernel, by its ``--kernel-id``."""
    def find(kernel_id: str) -> int | None:
        for host in cluster.hosts:
            for pid in cluster.launcher_pids(host):
                with open(f"/proc/{pid}/cmdline", "rb") as handle:
                    if kernel_id.encode() in handle.read():
                        return pid
        return None
    return find


def test_encrypted_ssh_kernel_and_a_plain_one(gw, ssh_cluster, tmp_path):
    encrypted = start_kernel(gw, "ssh-curve", timeout=120)
    plain = start_kernel(gw, "ssh-plain", timeout=120)
    try:
        assert_remote_kernel_encrypted(gw, gw.extra["runtime"], encrypted, tmp_path / "ssh-curve.pcap",
                                       launcher_pid(ssh_cluster))
        assert_plaintext_on_the_wire(gw, gw.extra["runtime"], plain, tmp_path / "ssh-plain.pcap")
    finally:
        call(gw, "DELETE", f"/api/kernels/{encrypted}")
        call(gw, "DELETE", f"/api/kernels/{plain}")


def test_restart_keeps_encryption_with_a_new_key(gw, ssh_cluster, tmp_path):
    kid = start_kernel(gw, "ssh-curve", timeout=120)
    try:
        before = connection_file(gw.extra["runtime"], kid)["curve_publickey"]
        with KernelWS(gw, kid) as ws:
            ws.assert_interrupts(gw, kid)  # message mode: the gateway's own (encrypted) control socket
        status, body, _ = call(gw, "POST", f"/api/kernels/{kid}/restart", timeout=180)
        assert status == 200, body
        assert connection_file(gw.extra["runtime"], kid)["curve_publickey"] != before  # a new launcher, a new pair
        assert_remote_kernel_encrypted(gw, gw.extra["runtime"], kid, tmp_path / "ssh-restarted.pcap",
                                       launcher_pid(ssh_cluster))
    finally:
        assert call(gw, "DELETE", f"/api/kernels/{kid}")[0] == 204


def test_a_kernelspec_without_support_runs_unencrypted_or_is_refused(gw):
    kid = start_kernel(gw, "ssh-nocurve", timeout=120)
    try:
        assert "curve_publickey" not in connection_file(gw.extra["runtime"], kid)
        assert "'ssh-nocurve' run without transport encryption" in gw.log()
    finally:
        call(gw, "DELETE", f"/api/kernels/{kid}")
    assert_error(post_kernel(gw, "ssh-required"), 400, "'ssh-required'", "transport encryption")


def test_a_kept_encrypted_kernel_is_served_again_and_its_record_has_no_secret(start_gw, keep, ssh_cluster, tmp_path):
    data = tmp_path / "data"
    write_ssh_spec(data, "ssh-curve", ssh_cluster, metadata=CURVE)
    env = {**keep, "JUPYTER_PATH": str(data)}
    runtime = tmp_path / "runtime"

    def start(port=None):
        return start_gw(f"--ResponseListener.response_port_range={PORT_RANGE}", env=env, port=port, timeout=60)

    first = start()
    kid = start_kernel(first, "ssh-curve", timeout=120)
    run(first, kid, "kept = 42")
    secret = run(first, kid, SECRET_CELL).strip()
    public = connection_file(runtime, kid)["curve_publickey"]
    stop_keeping(first, signal.SIGTERM)
    [record] = records(keep)
    assert record.connection_info["curve_publickey"] == public
    assert secret not in json.dumps([record.connection_info, record.provisioner_info, record.launch])

    second = start(first.port)  # another gateway process: another client key pair, the same server key
    assert run(second, kid, "print(kept)").strip() == "42"
    assert_remote_kernel_encrypted(second, runtime, kid, tmp_path / "ssh-kept.pcap", launcher_pid(ssh_cluster))
    assert call(second, "DELETE", f"/api/kernels/{kid}")[0] == 204
