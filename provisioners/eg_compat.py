"""Enterprise Gateway kernelspecs (``metadata.process_proxy``) served by our provisioners.

:class:`CompatKernelSpecManager` rewrites an EG spec's ``process_proxy`` stanza into the
``kernel_provisioner`` stanza of the provisioner that does the same job, renaming config keys,
so an operator moves an EG deployment across without editing its kernelspecs. EG's launchers
(``--RemoteProcessProxy.*`` argv) keep working: the remote provisioners hand them EG's key
format, and while ``accept_enterprise_gateway`` is on the response listener accepts EG's tokenless
payload, but only for a launch whose spec runs such a launcher
(``RemoteProvisioner.runs_enterprise_gateway_launcher``): a translated spec that runs our launcher
gets our key and must report with its launch token like any other.
"""

from __future__ import annotations

from typing import Any

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from traitlets import Bool

from .envconfig import EnvConfigurable

__all__ = ["CLASS_MAP", "CompatKernelSpecManager", "EnterpriseGatewaySpecError", "translate_metadata"]

_PP = "enterprise_gateway.services.processproxies."

#: EG process-proxy class -> our provisioner (entry-point name).
CLASS_MAP = {
    _PP + "processproxy.LocalProcessProxy": "local-port-range-provisioner",
    _PP + "distributed.DistributedProcessProxy": "ssh-provisioner",
    _PP + "docker_swarm.DockerProcessProxy": "docker-provisioner",
    _PP + "docker_swarm.DockerSwarmProcessProxy": "docker-swarm-provisioner",
    _PP + "k8s.KubernetesProcessProxy": "kubernetes-provisioner",
    _PP + "yarn.YarnClusterProcessProxy": "yarn-spark-provisioner",  # EG runs spark-submit via bin/run.sh
}

#: EG process-proxy config key -> our provisioner trait (keys not listed pass through unchanged).
CONFIG_MAP = {
    "load_balancing_algorithm": "load_balancing",
    "image_name": "image",
}

#: EG config keys that are gateway policy, not provisioner config: they move to spec metadata.
POLICY_KEYS = ("authorized_users", "unauthorized_users")


class EnterpriseGatewaySpecError(ValueError):
    """An Enterprise Gateway kernelspec was found while compatibility is off, or names an unknown class."""


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return [str(item) for item in value or []]


def translate_metadata(name: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """Return ``metadata`` with ``process_proxy`` turned into ``kernel_provisioner``."""
    proxy = metadata.get("process_proxy") or {}
    class_name = proxy.get("class_name") or _PP + "processproxy.LocalProcessProxy"
    provisioner = CLASS_MAP.get(class_name)
    if provisioner is None:
        raise EnterpriseGatewaySpecError(
            f"kernelspec {name!r}: Enterprise Gateway process proxy {class_name!r} has no counterpart here; "
            f"supported: {', '.join(sorted(CLASS_MAP))}"
        )
    config: dict[str, Any] = {}
    translated = {k: v for k, v in metadata.items() if k != "process_proxy"}
    for key, value in (proxy.get("config") or {}).items():
        if key in POLICY_KEYS:
            translated[key] = _as_list(value)
        elif key == "remote_hosts":
            config["remote_hosts"] = _as_list(value)
        elif key in ("yarn_endpoint", "alt_yarn_endpoint"):  # EG's RM and its HA standby: one list, the RM first
            urls = config.get("rm_urls", [])
            config["rm_urls"] = [value, *urls] if key == "yarn_endpoint" else [*urls, value]
        else:
            config[CONFIG_MAP.get(key, key)] = value
    translated["kernel_provisioner"] = {"provisioner_name": provisioner, "config": config}
    return translated


class CompatKernelSpecManager(KernelSpecManager, EnvConfigurable):  # type: ignore[misc]
    """A kernelspec manager that understands Enterprise Gateway kernelspecs when allowed to."""

    accept_enterprise_gateway = Bool(
        False,
        config=True,
        help="Serve Enterprise Gateway kernelspecs (metadata.process_proxy) with our provisioners; off, such specs "
        "stop the gateway at start-up. EG launchers also need ResponseListener.accept_enterprise_gateway; the "
        "gateway's --accept-enterprise-gateway flag sets both.",
    ).tag(env="GATEWAY_ACCEPT_ENTERPRISE_GATEWAY")

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        spec = super().get_kernel_spec(kernel_name)
        metadata = spec.metadata or {}
        if "process_proxy" in metadata and "kernel_provisioner" not in metadata:
            if not self.accept_enterprise_gateway:
                raise EnterpriseGatewaySpecError(
                    f"kernelspec {kernel_name!r} is an Enterprise Gateway kernelspec (metadata.process_proxy); "
                    "set accept_enterprise_gateway (GATEWAY_ACCEPT_ENTERPRISE_GATEWAY=true) to serve it"
                )
            spec.metadata = translate_metadata(kernel_name, metadata)
        return spec
