"""Sessions: notebook paths bound to kernels, kept in memory (jupyter_server's sessions API)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from .errors import UnknownSessionError
from .kernels import KernelRegistry

__all__ = ["Session", "SessionStore"]


@dataclass
class Session:
    """A session record."""

    id: str
    path: str
    name: str
    type: str
    kernel_id: str


class SessionStore:
    """Creates, finds, updates and deletes sessions; kernels come from the registry."""

    def __init__(self, registry: KernelRegistry) -> None:
        self.registry = registry
        self.sessions: dict[str, Session] = {}

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise UnknownSessionError(f"Session not found: {session_id}")
        return session

    def model(self, session: Session) -> dict[str, Any]:
        kernel = self.registry.kernels.get(session.kernel_id)
        model: dict[str, Any] = {
            "id": session.id,
            "path": session.path,
            "name": session.name,
            "type": session.type,
            "kernel": kernel.model() if kernel else None,
        }
        if session.type == "notebook":
            model["notebook"] = {"path": session.path, "name": session.name}
        return model

    def list(self) -> list[Session]:
        # a session whose kernel is gone (culled, shut down) is gone too
        for sid in [sid for sid, s in self.sessions.items() if s.kernel_id not in self.registry.kernels]:
            del self.sessions[sid]
        return list(self.sessions.values())

    def find_by_path(self, path: str) -> Session | None:
        return next((s for s in self.list() if s.path == path), None)

    def create(self, path: str, name: str, type_: str, kernel_id: str) -> Session:
        session = Session(str(uuid.uuid4()), path, name, type_, kernel_id)
        self.sessions[session.id] = session
        return session

    def update(self, session: Session, changes: dict[str, Any]) -> None:
        """Apply already-validated ``path``/``name``/``type`` changes."""
        for key in ("path", "name", "type"):
            if key in changes:
                setattr(session, key, changes[key])

    def delete(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self.sessions[session_id]
        return session
