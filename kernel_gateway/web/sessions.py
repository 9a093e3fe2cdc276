"""Handlers for ``/api/sessions``: notebook paths bound to kernels."""

from __future__ import annotations

from typing import Any

from ..errors import BadRequestError, UnknownKernelError
from ..policy import check_text
from .base import APIHandler

SESSION_ID = r"(?P<session_id>\w+-\w+-\w+-\w+-\w+)"


def _string(body: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = body.get(key, default)
    if value is not None and not isinstance(value, str):
        raise BadRequestError(f"'{key}' must be a string")
    return value if value is None else check_text(value, f"'{key}'")


def _kernel_request(body: dict[str, Any]) -> dict[str, Any]:
    kernel = body.get("kernel", {})
    if kernel is None:
        kernel = {}
    if not isinstance(kernel, dict):
        raise BadRequestError("'kernel' must be an object with 'name' or 'id'")
    for key in ("name", "id"):
        if kernel.get(key) is not None and not isinstance(kernel[key], str):
            raise BadRequestError(f"'kernel.{key}' must be a string")
        if kernel.get(key) is not None:
            check_text(kernel[key], f"'kernel.{key}'")
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
        notebook = body.get("notebook")  # the legacy form {"notebook": {"path": ...}}
        if notebook is not None and not isinstance(notebook, dict):
            raise BadRequestError("'notebook' must be an object with a 'path'")
        path = _string(body, "path") or _string(notebook or {}, "path")
        type_ = _string(body, "type") or ("notebook" if notebook else None)
        name = _string(body, "name", "")
        if not path:
            raise BadRequestError("a session needs a 'path' string")
        if not type_:
            raise BadRequestError("a session needs a 'type' string, e.g. 'notebook'")
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
        for key in ("path", "name", "type"):
            _string(body, key)
        # everything that can fail is checked before the session changes
        new_kernel = session.kernel_id
        if kernel.get("id"):
            try:
                new_kernel = self.registry.get(kernel["id"]).kernel_id
            except UnknownKernelError as exc:
                raise BadRequestError(str(exc)) from None
        elif kernel.get("name") is not None:
            new_kernel = await self.kernel_for({"name": kernel["name"]})
        self.sessions.update(session, body)
        old_kernel, session.kernel_id = session.kernel_id, new_kernel
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
