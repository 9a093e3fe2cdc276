"""Environment-backed option defaults: one precedence rule for every configurable class.

A class that mixes in :class:`EnvConfigurable` and tags a trait ``.tag(env="GATEWAY_X")`` gets a
dynamic default for it that reads that environment variable (or its Enterprise Gateway alias from
:data:`ALIASES`) when nothing else set the trait, and ``(env: GATEWAY_X)`` appended to its help, so
the name is written once and ``--help-all`` and the generated reference show it. Since traitlets consults a dynamic
default only when neither constructor kwargs (kernelspec ``kernel_provisioner.config``) nor the
config file / command line gave a value, precedence is always:

    kernelspec config > config file / CLI > environment > built-in default
"""

from __future__ import annotations

import os
from typing import Any

from traitlets import TraitError, TraitType
from traitlets.config import LoggingConfigurable

__all__ = ["ALIASES", "ENV_PREFIX", "EnvConfigurable", "env_name", "env_source", "env_value"]

#: The one prefix of our environment variables.
ENV_PREFIX = "GATEWAY_"

#: Enterprise Gateway names accepted when ours is not set, so an EG deployment moves across.
ALIASES: dict[str, str] = {
    "GATEWAY_IP": "EG_IP",
    "GATEWAY_PORT": "EG_PORT",
    "GATEWAY_AUTH_TOKEN": "EG_AUTH_TOKEN",
    "GATEWAY_BASE_URL": "EG_BASE_URL",
    "GATEWAY_ALLOW_ORIGIN": "EG_ALLOW_ORIGIN",
    "GATEWAY_DEFAULT_KERNEL_NAME": "EG_DEFAULT_KERNEL_NAME",
    "GATEWAY_MAX_KERNELS": "EG_MAX_KERNELS",
    "GATEWAY_MAX_KERNELS_PER_USER": "EG_MAX_KERNELS_PER_USER",
    "GATEWAY_CLIENT_ENVS": "EG_CLIENT_ENVS",
    "GATEWAY_INHERITED_ENVS": "EG_INHERITED_ENVS",
    "GATEWAY_AUTHORIZED_USERS": "EG_AUTHORIZED_USERS",
    "GATEWAY_UNAUTHORIZED_USERS": "EG_UNAUTHORIZED_USERS",
    "GATEWAY_CULL_IDLE_TIMEOUT": "EG_CULL_IDLE_TIMEOUT",
    "GATEWAY_CULL_INTERVAL": "EG_CULL_INTERVAL",
    "GATEWAY_CULL_CONNECTED": "EG_CULL_CONNECTED",
    "GATEWAY_PORT_RANGE": "EG_PORT_RANGE",
    "GATEWAY_KERNEL_LAUNCH_TIMEOUT": "EG_KERNEL_LAUNCH_TIMEOUT",
}


def env_value(name: str) -> str | None:
    """Return the value of ``name``, or of its Enterprise Gateway alias, or None when neither is set."""
    if name in os.environ:
        return os.environ[name]
    alias = ALIASES.get(name)
    if alias and alias in os.environ:
        return os.environ[alias]
    return None


def env_source(name: str) -> str:
    """The variable ``env_value(name)`` actually reads: ``name``, or its alias when only that is set."""
    alias = ALIASES.get(name)
    return alias if name not in os.environ and alias and alias in os.environ else name


def env_name(trait: TraitType) -> str | None:
    """The environment variable a trait reads (its ``env`` tag), or None."""
    return trait.metadata.get("env")


def _env_default(trait_name: str, env_name: str):
    def default(self: Any) -> Any:
        trait = self.traits()[trait_name]
        raw = env_value(env_name)
        if raw is None:
            return trait.default()
        try:
            if hasattr(trait, "from_string_list"):
                items = [item.strip() for item in raw.split(",") if item.strip()]
                return trait.validate(self, trait.from_string_list(items))
            return trait.validate(self, trait.from_string(raw))
        except (TraitError, ValueError) as exc:
            raise TraitError(f"environment variable {env_source(env_name)}={raw!r} is not valid for {trait_name}: {exc}") from exc

    default.__name__ = f"_{trait_name}_default"
    default.__doc__ = f"Read {env_name} when {trait_name} is not configured."
    return default


class EnvConfigurable(LoggingConfigurable):
    """A configurable whose traits tagged ``env="NAME"`` read that variable when nothing else sets them.

    Subclasses only tag the traits; the defaults are generated once per class here, so every
    option follows the same precedence and the same parsing (lists are comma-separated).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # runs before traitlets' setup_class, which then picks the generated _<name>_default up
        for name in dir(cls):
            trait = getattr(cls, name, None)
            if not isinstance(trait, TraitType) or (env := env_name(trait)) is None:
                continue
            if f"_{name}_default" not in cls.__dict__:
                setattr(cls, f"_{name}_default", _env_default(name, env))
            if "(env: " not in (trait.help or ""):  # a trait is shared with its base class: append once
                lists = ", comma-separated" if hasattr(trait, "from_string_list") else ""
                trait.help = f"{trait.help} (env: {env}{lists})".strip()
