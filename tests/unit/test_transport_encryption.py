"""Which kernels get CurveZMQ transport encryption (issue 12): the option's values and precedence, the kernelspec's
declaration, Enterprise Gateway launchers, and kernel managers that cannot connect with a public key alone.
Real provisioner and kernel manager instances; nothing is started."""

from __future__ import annotations

import logging

import pytest
import zmq
from jupyter_client.kernelspec import KernelSpec
from jupyter_client.manager import AsyncKernelManager
from traitlets import TraitError
from traitlets.config import Config

from kernel_gateway.kernels.manager import GatewayKernelManager
from provisioners import encryption
from provisioners.encryption import check_policy, declares_curve
from provisioners.errors import LaunchRequestError
from provisioners.local import PortRangeLocalProvisioner, curve_pair
from provisioners.specs import launcher_argv
from provisioners.ssh import SSHProvisioner

CURVE = {"supported_encryption": ["curve"]}


def provisioner(cls, metadata: dict, manager=GatewayKernelManager, argv=None, config=None, name="spec-under-test",
                **options):
    spec = KernelSpec(argv=argv or launcher_argv("python3", "/opt/launch_ipykernel.py"), display_name="t",
                      language="python", metadata=metadata)
    km = manager(kernel_name=name, config=config or Config())
    return cls(kernel_id="k1", kernel_spec=spec, parent=km, **options)


@pytest.mark.parametrize("declared, expected", [
    (["curve"], True), ("curve", True), (["CURVE "], True), (["other"], False), ("", False), (None, False), (7, False)])
def test_a_kernelspec_declares_curve(declared, expected):
    assert declares_curve({"supported_encryption": declared} if declared is not None else {}) is expected


@pytest.mark.parametrize("cls", [PortRangeLocalProvisioner, SSHProvisioner])
def test_auto_encrypts_what_declares_curve(cls, monkeypatch):
    monkeypatch.delenv("GATEWAY_TRANSPORT_ENCRYPTION", raising=False)
    assert provisioner(cls, CURVE).transport_encryption == "auto"
    assert provisioner(cls, CURVE).encrypts()
    assert not provisioner(cls, {}).encrypts()
    assert not provisioner(cls, CURVE, transport_encryption="disabled").encrypts()


def test_precedence_kernelspec_over_config_over_environment(monkeypatch):
    monkeypatch.setenv("GATEWAY_TRANSPORT_ENCRYPTION", "disabled")
    assert not provisioner(SSHProvisioner, CURVE).encrypts()
    config = Config({"TransportEncryption": {"transport_encryption": "auto"}})
    assert provisioner(SSHProvisioner, CURVE, config=config).encrypts()
    config.RemoteProvisioner.transport_encryption = "disabled"  # a provisioner class's own section wins
    assert not provisioner(SSHProvisioner, CURVE, config=config).encrypts()
    assert provisioner(SSHProvisioner, CURVE, config=config, transport_encryption="required").encrypts()


def test_required_refuses_a_kernelspec_that_cannot_and_names_it():
    with pytest.raises(LaunchRequestError, match="kernelspec 'spec-under-test'.*'required'"):
        provisioner(SSHProvisioner, {}, transport_encryption="required").encrypts()
    eg_argv = ["python", "launch_ipykernel.py", "--RemoteProcessProxy.kernel-id", "{kernel_id}"]
    with pytest.raises(LaunchRequestError, match="spec-under-test"):
        provisioner(SSHProvisioner, CURVE, argv=eg_argv, transport_encryption="required").encrypts()


def test_a_remote_kernel_under_a_manager_that_needs_the_secret_key_is_not_encrypted(caplog):
    # jupyter_client's own manager (a jupyter_server host) connects with the kernel's key pair, which a launcher
    # never reports: 'auto' leaves such kernels unencrypted, 'required' refuses them; local ones are encrypted
    with caplog.at_level(logging.WARNING, "kernel_gateway.encryption"):
        # a name of its own: the note is logged once per kernelspec and process
        assert not provisioner(SSHProvisioner, CURVE, manager=AsyncKernelManager, name="in-a-host").encrypts()
    assert "'in-a-host'" in caplog.text and "needs the kernel's secret key" in caplog.text
    with pytest.raises(LaunchRequestError, match="secret key"):
        provisioner(SSHProvisioner, CURVE, manager=AsyncKernelManager, transport_encryption="required").encrypts()
    assert provisioner(PortRangeLocalProvisioner, CURVE, manager=AsyncKernelManager).encrypts()


def test_the_manager_takes_a_public_key_alone_and_reports_it_back():
    km = GatewayKernelManager()
    km.load_connection_info({"ip": "127.0.0.1", "key": "k", "shell_port": 1, "curve_publickey": "a" * 40})
    assert km.curve_publickey == b"a" * 40 and km.curve_secretkey is None
    assert km.get_connection_info()["curve_publickey"] == "a" * 40
    km.load_connection_info({"ip": "127.0.0.1", "key": "k"})  # a restart without encryption leaves no stale key
    assert km.curve_publickey is None and "curve_publickey" not in km.get_connection_info()


def test_a_local_kernels_key_pair_follows_from_its_session_key():
    # whoever restarts the kernel (a re-attached gateway, another replica) makes the same pair from the record's
    # session key, and the record needs no secret key of its own
    public, secret = curve_pair(b"session-key")
    assert (public, secret) == curve_pair(b"session-key") and public != curve_pair(b"other-key")[0]
    assert len(public) == len(secret) == 40 and zmq.curve_public(secret) == public


def test_without_curvezmq_required_is_a_startup_error_and_auto_runs_unencrypted(monkeypatch, caplog):
    # a pyzmq without CurveZMQ cannot be installed here (every wheel has it): the check is made to answer False
    monkeypatch.setattr(encryption, "curve_available", lambda: False)
    with pytest.raises(TraitError, match=r"'required' but this pyzmq has no CurveZMQ support"):
        check_policy("required")
    with pytest.raises(TraitError, match="no CurveZMQ"):
        provisioner(SSHProvisioner, CURVE, transport_encryption="required")
    with caplog.at_level(logging.WARNING, "kernel_gateway.encryption"):
        assert not provisioner(SSHProvisioner, CURVE, name="no-curve-here").encrypts()
    assert "'no-curve-here'" in caplog.text and "no CurveZMQ support" in caplog.text
