"""Handlers for ``/api/kernelspecs`` and ``/kernelspecs/{name}/{resource}`` (logos, kernel.js)."""

from __future__ import annotations

import mimetypes
import os
from typing import Any

from tornado import web

from ..errors import ForbiddenError, UnknownKernelSpecError
from ..logs import CONTROL_CHARS
from ..policy import check_text
from .base import APIHandler

NAME = r"(?P<name>[\w.\-%]+)"
RESOURCE_FILES = ("kernel.js", "kernel.css")


def spec_model(name: str, spec: Any, base_url: str) -> dict[str, Any]:
    """A kernelspec as clients expect it: name, the kernel.json dict, resource URLs."""
    resources = {}
    resource_dir = spec.resource_dir
    try:
        files = sorted(os.listdir(resource_dir))
    except OSError:
        files = []
    for filename in files:
        stem = os.path.splitext(filename)[0]
        if filename in RESOURCE_FILES or stem.startswith("logo-"):
            key = filename if filename in RESOURCE_FILES else stem
            resources[key] = f"{base_url}kernelspecs/{name}/{filename}"
    return {"name": name, "spec": spec.to_dict(), "resources": resources}


class KernelSpecsHandler(APIHandler):
    """``/api/kernelspecs``: every spec the requesting user may start."""

    def get(self) -> None:
        registry = self.registry
        user = self.policy.identify(self.request.headers, {"KERNEL_USERNAME": self.get_query_argument("user", "")})
        specs = {}
        for name in sorted(registry.kernel_spec_manager.find_kernel_specs()):
            if CONTROL_CHARS.search(name):  # a directory made after start-up checked them all
                continue
            try:
                _, spec = registry.spec(name)
                self.policy.check_user(user, spec.metadata or {}, name)
            except (UnknownKernelSpecError, ForbiddenError):
                continue
            specs[name] = spec_model(name, spec, self.settings["base_url"])
        self.write_json({"default": registry.default_kernel_name, "kernelspecs": specs})


class KernelSpecHandler(APIHandler):
    """``/api/kernelspecs/{name}``: one spec."""

    def get(self, name: str) -> None:
        name, spec = self.registry.spec(check_text(name, "a kernelspec name"))
        self.write_json(spec_model(name, spec, self.settings["base_url"]))


class KernelSpecResourceHandler(APIHandler):
    """``/kernelspecs/{name}/{resource}``: a file from the spec's directory, nothing outside it."""

    def get(self, name: str, resource: str) -> None:
        name, spec = self.registry.spec(check_text(name, "a kernelspec name"))
        check_text(resource, "a kernelspec resource path")
        root = os.path.realpath(spec.resource_dir)
        path = os.path.realpath(os.path.join(root, resource))
        if not path.startswith(root + os.sep) or not os.path.isfile(path):
            raise web.HTTPError(404, "kernelspec %s has no resource %s", name, resource, reason="Not Found")
        self.set_header("Content-Type", mimetypes.guess_type(path)[0] or "application/octet-stream")
        self.set_header("Cache-Control", "max-age=3600")
        with open(path, "rb") as handle:
            self.finish(handle.read())

    head = get


default_handlers = [
    (r"/api/kernelspecs/?", KernelSpecsHandler),
    (rf"/api/kernelspecs/{NAME}/?", KernelSpecHandler),
    (rf"/kernelspecs/{NAME}/(?P<resource>[^/][\w.\-/]*)", KernelSpecResourceHandler),
]
