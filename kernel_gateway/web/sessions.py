"""Handlers for ``/api/sessions``: notebook paths bound to kernels."""

from __future__ import annotations

from typing import Any

from ..errors import BadRequestError, UnknownKernelError
from .base import APIHandler

SESSION_ID = r"(?P<session_id>\w+-\w+-\w+-\w+-\w+)"


def _kernel_request(body: dict[str, Any]) -> dict[str, Any]:
    kernel = body.get("kernel") or {}
    if not isinstance(kernel, dict):
        raise BadRequestError("'kernel' must be an object with 'name' or 'id'")
    for key in ("name", "id"):
        if kernel.get(key) is not None and not isinstance(kernel[key], str):
            raise BadRequestError(f"'kernel.{key}' must be a string")
    return kernel


class SessionBase(APIHandler):
    @property
    def sessions(self):
        return self.settings["sessions"]

    async def kernel_for(self, kernel: dict[str, Any]) -> str:
        """An existing kernel's id (``kernel.id``), or a new kernel of ``kernel.name``."""
        if kernel.get("id"):
            return self.registry.get(kernel["id"]).kernel_id
        user = self.policy.identify(self.request.headers, {})
        started = await self.registry.start_kernel(kernel.get("name"), {}, user)
        return started.kernel_id


class SessionsHandler(SessionBase):
    """``/api/sessions``: list and create."""

    def get(self) -> None:
        self.write_json([self.sessions.model(s) for s in self.sessions.list()])

    async def post(self) -> None:
        body = self.json_body(required=True)
        path = body.get("path") or (body.get("notebook") or {}).get("path")
        type_ = body.get("type") or ("notebook" if body.get("notebook") else None)
        name = body.get("name") or ""
        if not isinstance(path, str) or not path:
            raise BadRequestError("a session needs a 'path' string")
        if not isinstance(type_, str) or not type_:
            raise BadRequestError("a session needs a 'type' string, e.g. 'notebook'")
        if not isinstance(name, str):
            raise BadRequestError("'name' must be a string")
        kernel = _kernel_request(body)
        session = self.sessions.find_by_path(path)
        if session is None:
            kernel_id = await self.kernel_for(kernel)
            session = self.sessions.create(path, name, type_, kernel_id)
        self.set_header("Location", f"{self.settings['base_url']}api/sessions/{session.id}")
        self.write_json(self.sessions.model(session), 201)


class SessionHandler(SessionBase):
    """``/api/sessions/{id}``: get, rename or move, switch kernel, delete."""

    def get(self, session_id: str) -> None:
        self.write_json(self.sessions.model(self.sessions.get(session_id)))

    async def patch(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        body = self.json_body(required=True)
        kernel = _kernel_request(body)
        self.sessions.update(session, body)
        old_kernel = session.kernel_id
        if kernel.get("id"):
            try:
                session.kernel_id = self.registry.get(kernel["id"]).kernel_id
            except UnknownKernelError as exc:
                raise BadRequestError(str(exc)) from None
        elif kernel.get("name") is not None:
            session.kernel_id = await self.kernel_for({"name": kernel["name"]})
        if session.kernel_id != old_kernel and old_kernel in self.registry.kernels:
            in_use = any(s.kernel_id == old_kernel for s in self.sessions.list())
            if not in_use and kernel.get("name") is not None:
                await self.registry.shutdown(old_kernel)
        self.write_json(self.sessions.model(session))

    async def delete(self, session_id: str) -> None:
        session = self.sessions.delete(session_id)
        if session.kernel_id in self.registry.kernels:
            await self.registry.shutdown(session.kernel_id)
        self.set_status(204)
        self.finish()


default_handlers = [
    (r"/api/sessions/?", SessionsHandler),
    (rf"/api/sessions/{SESSION_ID}/?", SessionHandler),
]
