"""Start-up checks: every option and every kernelspec is checked once, before the gateway listens.

A mistake found here stops the gateway with one line naming the option or kernelspec, rather than
failing the first request that meets it. This includes ``transport_encryption='required'`` without CurveZMQ in
pyzmq (the option's own check); a kernelspec that 'required' will refuse is only warned about.
"""

from __future__ import annotations

import logging
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.provisioning import KernelProvisionerFactory
from traitlets import TraitError

from provisioners.envconfig import env_name, env_source, env_value

from .kernels import KernelRegistry
from .logs import CONTROL_CHARS, escape_controls

__all__ = ["validate_all", "validate_kernelspecs"]

log = logging.getLogger("kernel_gateway")


def validate_all(configurable: Any) -> None:
    """Check every option now (defaults read from the environment included), not mid-request."""
    for name in configurable.trait_names(config=True):
        value = getattr(configurable, name)
        try:
            setattr(configurable, name, value)  # assignment runs the @validate checks a default skips
        except TraitError as exc:
            env = env_name(configurable.traits()[name])
            source = f" (from {env_source(env)})" if env and env_value(env) is not None else ""
            raise TraitError(f"{type(configurable).__name__}.{name}{source}: {exc}") from None


def validate_kernelspecs(kernel_spec_manager: KernelSpecManager, registry: KernelRegistry) -> None:
    """Every kernelspec's provisioner must exist and accept its config; the default spec must exist."""
    specs = kernel_spec_manager.find_kernel_specs()
    unsafe = sorted(specs[name] for name in specs if CONTROL_CHARS.search(name))
    if unsafe:  # such a name would forge log lines and could not be requested anyway
        raise TraitError("kernelspec directory names must not contain control characters; rename or remove "
                         f"{', '.join(escape_controls(path) for path in unsafe)}")
    if registry.default_kernel_name not in specs:
        raise TraitError(
            f"default kernel {registry.default_kernel_name!r} is not installed; installed: {sorted(specs) or 'none'}"
        )
    factory = KernelProvisionerFactory.instance(parent=registry)
    for name in sorted(specs):
        try:
            spec = kernel_spec_manager.get_kernel_spec(name)
        except NoSuchKernel:
            # jupyter_client hides a spec whose provisioner is not installed
            raise TraitError(f"kernelspec {name!r} names a provisioner that is not installed; installed: "
                             f"{', '.join(e.name for e in KernelProvisionerFactory._get_all_provisioners())}") from None
        provisioner = (spec.metadata or {}).get("kernel_provisioner", {}).get("provisioner_name") or (
            factory.default_provisioner_name
        )
        if not factory.is_provisioner_available(spec):
            raise TraitError(f"kernelspec {name!r} names provisioner {provisioner!r}, which is not installed")
        try:
            instance = factory.create_provisioner_instance("config-check", spec, registry)
            validate_all(instance)
        except TraitError as exc:
            raise TraitError(f"kernelspec {name!r} ({provisioner}): {exc}") from None
        if getattr(instance, "transport_encryption", "") == "required" and not instance.kernel_supports_curve():
            log.warning("kernelspec %r: transport_encryption is 'required' but the spec does not declare 'curve' in "
                        "metadata.supported_encryption (or runs an Enterprise Gateway launcher): its starts will be "
                        "refused (400)", name)
        config = (spec.metadata or {}).get("kernel_provisioner", {}).get("config", {})
        unknown = sorted(set(config) - set(instance.trait_names(config=True)))
        if unknown:  # traitlets would ignore a misspelt option without a word
            raise TraitError(f"kernelspec {name!r} ({provisioner}): unknown option(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(instance.trait_names(config=True)))}")
