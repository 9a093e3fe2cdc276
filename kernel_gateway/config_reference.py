"""Generates the configuration reference (Markdown) from the options themselves, so it cannot drift."""

from __future__ import annotations

import inspect

from traitlets.config import Application

__all__ = ["ConfigReferenceApp", "render"]


def _default_text(trait) -> str:
    value = trait.default_value
    if value in ("", None):
        return "(empty)"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "(empty)"
    if inspect.isclass(value):
        return f"{value.__module__}.{value.__name__}"
    return str(value)


def render(classes: list[type]) -> str:
    """A Markdown table per class: option, environment variable, default, help."""
    out = []
    for cls in classes:
        traits = {name: trait for name, trait in sorted(cls.class_traits(config=True).items())
                  if name in cls.class_own_traits(config=True) or cls.__module__.split(".")[0] in ("kernel_gateway", "provisioners")}
        traits = {n: t for n, t in traits.items() if getattr(cls, f"{n}_env", None) or n in cls.class_own_traits(config=True)}
        if not traits:
            continue
        doc = (inspect.getdoc(cls) or "").splitlines()[0]
        out.append(f"### `{cls.__name__}`\n\n{doc}\n\n| option | environment variable | default | meaning |\n|---|---|---|---|")
        for name, trait in traits.items():
            env = getattr(cls, f"{name}_env", None)
            help_text = " ".join((trait.help or "").split()).replace("|", "\\|")
            out.append(f"| `{cls.__name__}.{name}` | {f'`{env}`' if env else '—'} | `{_default_text(trait)}` | {help_text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


class ConfigReferenceApp(Application):
    """``kernel-gateway config-reference``: print the reference."""

    name = "kernel-gateway config-reference"

    def start(self) -> None:
        from .app import GatewayApp

        print(render(GatewayApp.instance().classes), end="")
