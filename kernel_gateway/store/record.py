"""What the gateway keeps of one kernel to serve it again after a restart."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["KernelRecord"]


@dataclass(frozen=True)
class KernelRecord:
    """One running kernel: who started what and when, and what a gateway needs to reach it again.

    ``provisioner_info`` is the provisioner's own state (``get_provisioner_info()``; restored with
    ``load_provisioner_info()``), with a remote launcher's control port and key; ``connection_info`` holds the
    kernel's ports and its HMAC key; ``launch`` the environment and working directory its restarts start with.
    With replicas, ``keeper`` is the replica that restarts the kernel when it dies, and ``restarting_since`` marks a
    restart in flight (no other replica takes the kernel for dead meanwhile). The whole record is sealed in the store.
    """

    kernel_id: str
    kernel_name: str
    user: str
    created: float  # unix time the kernel first started
    provisioner_info: dict[str, Any] = field(default_factory=dict)
    connection_info: dict[str, Any] = field(default_factory=dict)
    launch: dict[str, Any] = field(default_factory=dict)
    keeper: str = ""
    restarting_since: float = 0.0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> KernelRecord:
        """Parse a record; ``ValueError`` when the JSON is not one."""
        fields = json.loads(data)
        if not isinstance(fields, dict) or not isinstance(fields.get("kernel_id"), str):
            raise ValueError("not a kernel record")
        try:
            return cls(**fields)
        except TypeError as exc:
            raise ValueError(f"not a kernel record: {exc}") from None
