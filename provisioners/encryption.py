"""CurveZMQ transport encryption of a kernel's channels: the option, and whether a kernel gets it.

``transport_encryption`` takes jupyter_client's vocabulary (``KernelManager.transport_encryption``):
``disabled``, ``auto`` (ours defaults to it: encrypt when the kernelspec declares ``curve`` in
``metadata.supported_encryption``) and ``required`` (a kernelspec that does not declare it is refused).
Every provisioner that mixes in :class:`TransportEncryption` reads it from the kernelspec's
``kernel_provisioner.config``, the config file or ``GATEWAY_TRANSPORT_ENCRYPTION``, like its other options.

Keys: the kernel (ipykernel 7) is the CurveZMQ server and holds the secret key; whoever connects needs
only its public key and a key pair of its own. Local kernels get their key pair through the connection
file, as jupyter_client does it; remote launchers make it themselves and report the public key.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
from traitlets import CaselessStrEnum, TraitError, validate

from .envconfig import EnvConfigurable
from .errors import LaunchRequestError

__all__ = ["SERVER_KEY_ONLY", "TransportEncryption", "check_policy", "curve_available", "declares_curve", "transport_encryption_option"]

log = logging.getLogger("kernel_gateway.encryption")

#: Attribute a kernel manager class sets to True when it connects to an encrypted kernel knowing only its public key
#: (``curve_publickey`` in the connection info, no ``curve_secretkey``), as remote kernels report it.
SERVER_KEY_ONLY = "connects_with_curve_server_key"

#: kernelspecs already reported as running unencrypted under ``auto`` (said once per process and spec)
_reported: set[str] = set()


def curve_available() -> bool:
    """Whether this pyzmq's libzmq was built with CurveZMQ (libsodium)."""
    return bool(zmq.has("curve"))


def declares_curve(metadata: dict[str, Any] | None) -> bool:
    """Whether kernelspec ``metadata`` lists ``curve`` in ``supported_encryption`` (a string or a list)."""
    declared = (metadata or {}).get("supported_encryption")
    if isinstance(declared, str):
        declared = [declared]
    return isinstance(declared, (list, tuple)) and "curve" in {str(item).strip().lower() for item in declared}


ENV = "GATEWAY_TRANSPORT_ENCRYPTION"
HELP = ("CurveZMQ encryption of kernels' ZMQ channels: 'auto' encrypts kernels whose kernelspec lists 'curve' in "
        "metadata.supported_encryption and runs the others unencrypted (logged once per kernelspec); 'required' "
        "refuses to start a kernel whose kernelspec does not (400); 'disabled' never encrypts.")


def transport_encryption_option(help: str = HELP) -> CaselessStrEnum:
    """The option, as every class that has it declares it (jupyter_client's values; our default 'auto')."""
    return CaselessStrEnum(["disabled", "auto", "required"], "auto", config=True, help=help).tag(env=ENV)


def check_policy(value: str) -> str:
    """``value`` in lower case; :class:`TraitError` when it is 'required' and pyzmq has no CurveZMQ (a start-up
    error: every option runs its ``@validate`` checks before the gateway listens)."""
    value = str(value).lower()
    if value == "required" and not curve_available():
        raise TraitError("transport_encryption is 'required' but this pyzmq has no CurveZMQ support "
                         "(zmq.has('curve') is False); install a pyzmq wheel (its libzmq is built with "
                         "libsodium) or set transport_encryption to 'auto' or 'disabled'")
    return value


class TransportEncryption(EnvConfigurable):
    """Mixin of provisioners: the ``transport_encryption`` option and the decision for one kernel.

    Configure it for every provisioner at once as ``GatewayApp.transport_encryption`` (``--transport-encryption``,
    ``GATEWAY_TRANSPORT_ENCRYPTION``) or ``TransportEncryption.transport_encryption``; per provisioner class, or in a
    kernelspec's ``kernel_provisioner.config``, like any provisioner option.
    """

    transport_encryption = transport_encryption_option()

    @validate("transport_encryption")
    def _curve_built_in(self, proposal: dict[str, Any]) -> str:
        return check_policy(proposal["value"])

    def kernel_supports_curve(self) -> bool:
        """Whether this kernel can be encrypted: its kernelspec declares it. Override to say no for kernels our
        launcher does not run (e.g. Enterprise Gateway's launchers)."""
        return declares_curve(getattr(self.kernel_spec, "metadata", None))

    def manager_supports_curve(self) -> bool:
        """Whether the kernel manager (``self.parent``) can reach this kernel encrypted. True here: jupyter_client's
        own mechanism (the key pair in the connection file). Remote provisioners need more, see there."""
        return True

    def encrypts(self) -> bool:
        """Whether the kernel about to start gets CurveZMQ encryption; called from ``pre_launch``.

        Raises :class:`LaunchRequestError` (the client's request cannot be served: 400) when encryption is
        ``required`` and the kernelspec cannot have it.
        """
        if self.transport_encryption == "disabled":
            return False
        name = self.kernelspec_name
        if not self.kernel_supports_curve():
            if self.transport_encryption == "required":
                raise LaunchRequestError(
                    f"kernelspec {name!r} does not support transport encryption (its metadata.supported_encryption "
                    "does not list 'curve', or its launcher cannot apply it) and transport_encryption is 'required'",
                    kernel_id=self.kernel_id)
            self._report_once(name, "its kernelspec does not list 'curve' in metadata.supported_encryption")
            return False
        if not self.manager_supports_curve():
            why = (f"its kernel manager ({type(self.parent).__name__}) needs the kernel's secret key to connect; "
                   f"use one that sets {SERVER_KEY_ONLY} (the gateway's does)")
            if self.transport_encryption == "required":
                raise LaunchRequestError(f"kernelspec {name!r} cannot have transport encryption here: {why}",
                                         kernel_id=self.kernel_id)
            self._report_once(name, why)
            return False
        if not curve_available():  # 'auto' only: 'required' without curve stops the gateway at start-up
            self._report_once(name, "this pyzmq has no CurveZMQ support")
            return False
        return True

    @property
    def kernelspec_name(self) -> str:
        """The kernelspec's name for messages (the kernel manager knows it; the spec itself does not)."""
        return getattr(self.parent, "kernel_name", "") or getattr(self.kernel_spec, "display_name", "") or "?"

    @staticmethod
    def _report_once(name: str, why: str) -> None:
        if name not in _reported:
            _reported.add(name)
            log.warning("kernels of kernelspec %r run without transport encryption: %s (said once)", name, why)
