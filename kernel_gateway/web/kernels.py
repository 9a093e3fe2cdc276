"""Handlers for ``/api/kernels``: list, start, get, shut down, interrupt, restart."""

from __future__ import annotations

from ..errors import BadRequestError
from ..policy import check_text
from .base import APIHandler

KERNEL_ID = r"(?P<kernel_id>\w+-\w+-\w+-\w+-\w+)"


def _name(body: dict) -> str | None:
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise BadRequestError("'name' must be a kernelspec name or null")
    return name if name is None else check_text(name, "'name'")


class KernelsHandler(APIHandler):
    """``/api/kernels``: the collection."""

    def get(self) -> None:
        self.write_json(self.registry.models())

    async def post(self) -> None:
        body = self.json_body()
        name = _name(body)
        env = self.policy.validate_env(body.get("env"))
        user = self.policy.identify(self.request.headers, env)
        kernel = await self.registry.start_kernel(name, env, user)
        self.set_header("Location", f"{self.settings['base_url']}api/kernels/{kernel.kernel_id}")
        self.write_json(kernel.model(), 201)


class KernelHandler(APIHandler):
    """``/api/kernels/{id}``: one kernel."""

    async def get(self, kernel_id: str) -> None:
        self.write_json((await self.registry.find(kernel_id)).model())

    async def delete(self, kernel_id: str) -> None:
        await self.registry.shutdown(kernel_id)
        self.set_status(204)
        self.finish()


class InterruptHandler(APIHandler):
    """``/api/kernels/{id}/interrupt``."""

    async def post(self, kernel_id: str) -> None:
        await self.registry.interrupt(kernel_id)
        self.set_status(204)
        self.finish()


class RestartHandler(APIHandler):
    """``/api/kernels/{id}/restart``: same id, new process; answers with the model once ready."""

    async def post(self, kernel_id: str) -> None:
        kernel = await self.registry.restart(kernel_id)
        self.write_json(kernel.model())


default_handlers = [
    (r"/api/kernels/?", KernelsHandler),
    (rf"/api/kernels/{KERNEL_ID}/?", KernelHandler),
    (rf"/api/kernels/{KERNEL_ID}/interrupt/?", InterruptHandler),
    (rf"/api/kernels/{KERNEL_ID}/restart/?", RestartHandler),
]
