"""The container provisioner contract: what a kernel container may be, decided before anything starts.

Image, CPU, memory, GPUs, user and group come from the kernelspec and the operator's options; a
client may ask for other values through ``KERNEL_IMAGE``, ``KERNEL_CPUS``, ``KERNEL_MEMORY``,
``KERNEL_GPUS``, ``KERNEL_UID`` and ``KERNEL_GID`` only within what the operator allows, else
the start is refused (400) before any container exists. Volumes come from operator configuration
only. Backends (Docker, Swarm, Kubernetes) turn the resulting :class:`ContainerRequest` into
their own objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from traitlets import Float, Integer, List, TraitError, Unicode, validate

from .errors import LaunchRequestError
from .remote import RemoteProvisioner

__all__ = ["ContainerProvisioner", "ContainerRequest", "parse_memory"]

LABEL = "kernel_gateway"
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_memory(text: str) -> int:
    """Bytes from '512m', '2g', '1.5G', '1073741824'; raise ValueError for anything else."""
    match = _MEMORY.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a memory size like '512m' or '2g'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass
class ContainerRequest:
    """Everything a backend needs to run one kernel container."""

    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    labels: dict[str, str]
    user: str
    cpus: float = 0.0
    memory: int = 0
    gpus: int = 0
    volumes: list[str] = field(default_factory=list)


class ContainerProvisioner(RemoteProvisioner):
    """Base of the provisioners whose kernels run in containers."""

    cold_start_envs = ("KERNEL_IMAGE", "KERNEL_CPUS", "KERNEL_MEMORY", "KERNEL_GPUS", "KERNEL_UID", "KERNEL_GID",
                       "KERNEL_VOLUMES")

    image = Unicode(
        "",
        config=True,
        help="Kernel image for this kernelspec, e.g. kernel-gateway/python-kernel:latest.",
    ).tag(env="GATEWAY_KERNEL_IMAGE")
    allowed_images = List(
        Unicode(),
        config=True,
        help="Images a client may request with KERNEL_IMAGE; empty allows only the kernelspec's image.",
    ).tag(env="GATEWAY_ALLOWED_IMAGES")
    max_cpus = Float(
        0.0, config=True, help="Most CPUs a client may request with KERNEL_CPUS; 0 means no limit."
    ).tag(env="GATEWAY_MAX_CPUS")
    max_memory = Unicode(
        "",
        config=True,
        help="Most memory a client may request with KERNEL_MEMORY, e.g. '8g'; empty means no limit.",
    ).tag(env="GATEWAY_MAX_MEMORY")
    max_gpus = Integer(
        0, config=True, help="Most GPUs a client may request with KERNEL_GPUS; 0 allows none."
    ).tag(env="GATEWAY_MAX_GPUS")
    default_uid = Integer(1000, config=True, help="User id kernels run as unless KERNEL_UID says otherwise.").tag(env="GATEWAY_KERNEL_UID")
    default_gid = Integer(100, config=True, help="Group id kernels run as unless KERNEL_GID says otherwise.").tag(env="GATEWAY_KERNEL_GID")
    prohibited_uids = List(
        Integer(), [0], config=True,
        help="User ids a client may not request with KERNEL_UID. Default: 0.",
    ).tag(env="GATEWAY_PROHIBITED_UIDS")
    prohibited_gids = List(
        Integer(), [0], config=True,
        help="Group ids a client may not request with KERNEL_GID. Default: 0.",
    ).tag(env="GATEWAY_PROHIBITED_GIDS")
    volumes = List(
        Unicode(),
        config=True,
        help="Volumes mounted into every kernel container, 'source:target[:ro]'; only from operator configuration.",
    ).tag(env="GATEWAY_KERNEL_VOLUMES")
    network = Unicode(
        "bridge",
        config=True,
        help="Docker network kernel containers join; the gateway must reach it.",
    ).tag(env="GATEWAY_DOCKER_NETWORK")

    @validate("max_memory")
    def _memory_size(self, proposal: dict[str, Any]) -> str:
        if proposal["value"]:
            try:
                parse_memory(proposal["value"])
            except ValueError as exc:
                raise TraitError(f"max_memory: {exc}") from None
        return proposal["value"]

    @validate("volumes")
    def _volume_specs(self, proposal: dict[str, Any]) -> list[str]:
        for volume in proposal["value"]:
            parts = volume.split(":")
            if len(parts) not in (2, 3) or not all(parts[:2]) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise TraitError(f"volume {volume!r} must be 'source:target' or 'source:target:ro'")
        return proposal["value"]

    def container_request(self, cmd: list[str], env: dict[str, str], token: str) -> ContainerRequest:
        """Check the client's requests against the operator's limits and build the container's description.

        Called from the backend's ``start_launcher``; raises :class:`LaunchRequestError` naming the problem.
        """
        image = env.get("KERNEL_IMAGE") or self.image
        if not image:
            raise LaunchRequestError(f"kernelspec for kernel {self.kernel_id} names no image (option 'image')")
        if image != self.image and image not in self.allowed_images:
            allowed = ", ".join([self.image, *self.allowed_images]) if self.image else ", ".join(self.allowed_images)
            raise LaunchRequestError(f"image {image!r} is not allowed; allowed: {allowed or 'none'}")
        cpus = _number(env, "KERNEL_CPUS", float, 0.0)
        if cpus < 0 or (self.max_cpus and cpus > self.max_cpus):
            raise LaunchRequestError(f"KERNEL_CPUS={cpus:g} is above the limit of {self.max_cpus:g}" if cpus > 0
                                     else "KERNEL_CPUS must not be negative")
        memory = 0
        if env.get("KERNEL_MEMORY"):
            try:
                memory = parse_memory(env["KERNEL_MEMORY"])
            except ValueError as exc:
                raise LaunchRequestError(f"KERNEL_MEMORY: {exc}") from None
            if self.max_memory and memory > parse_memory(self.max_memory):
                raise LaunchRequestError(f"KERNEL_MEMORY={env['KERNEL_MEMORY']} is above the limit of {self.max_memory}")
        gpus = _number(env, "KERNEL_GPUS", int, 0)
        if gpus < 0:
            raise LaunchRequestError("KERNEL_GPUS must not be negative")
        if gpus > self.max_gpus:
            raise LaunchRequestError(f"KERNEL_GPUS={gpus} is above the limit of {self.max_gpus}")
        uid = _number(env, "KERNEL_UID", int, self.default_uid)
        gid = _number(env, "KERNEL_GID", int, self.default_gid)
        if not 0 <= uid < 2**32 or uid in self.prohibited_uids:
            raise LaunchRequestError(f"KERNEL_UID={uid} is not allowed (prohibited: {self.prohibited_uids})")
        if not 0 <= gid < 2**32 or gid in self.prohibited_gids:
            raise LaunchRequestError(f"KERNEL_GID={gid} is not allowed (prohibited: {self.prohibited_gids})")
        container_env = dict(env)
        container_env.update(
            KERNEL_ID=self.kernel_id,
            RESPONSE_ADDRESS=self.launch_values["response_address"],
            PUBLIC_KEY=self.launch_values["public_key"],
            PORT_RANGE=self.port_range or "0..0",
            KERNEL_CLASS_NAME=self.kernel_class_name,
            KERNEL_LAUNCH_TOKEN=token,
        )
        if self.curve:  # for the image's entry point (bootstrap-kernel.sh); a spec's own command has --curve
            container_env["TRANSPORT_ENCRYPTION"] = "curve"
        labels = {
            f"{LABEL}.kernel_id": self.kernel_id,
            f"{LABEL}.user": env.get("KERNEL_USERNAME", ""),
            f"{LABEL}.instance": self.instance_label,
        }
        command = [arg for arg in cmd if arg] if _is_container_command(cmd) else []
        return ContainerRequest(
            name=f"kernel-{self.kernel_id}", image=image, command=command, env=container_env, labels=labels,
            user=f"{uid}:{gid}", cpus=cpus, memory=memory, gpus=gpus, volumes=list(self.volumes),
        )


def _number(env: dict[str, str], name: str, kind: type, default: Any) -> Any:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise LaunchRequestError(f"{name} must be a {'whole ' if kind is int else ''}number, not {raw!r}") from None


def _is_container_command(cmd: list[str]) -> bool:
    """A kernelspec argv that names a program inside the image (an absolute path), not a placeholder."""
    return bool(cmd) and cmd[0].startswith("/")
