"""Kernel pod rendering for the kubernetes-provisioner: pure functions, no cluster.

:func:`render_pod` renders a Jinja2 pod template (the packaged ``templates/kernel-pod.yaml.j2`` or an
operator's) in a sandbox where every ``{{ }}`` value is written as JSON, which is YAML: whatever a
client sent (quotes, newlines, ``: ``, ``- ``, ``{{ }}``) stays one scalar, and values are data, never
template source. :func:`dns_label` makes label values, :func:`parse_toleration` reads the operator's
tolerations.
"""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from typing import Any

import jinja2
import jinja2.sandbox
import yaml

__all__ = ["compile_template", "dns_label", "load_template", "parse_toleration", "render_pod"]

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_TOLERATION = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_./]*)(?:=([-A-Za-z0-9_.]*))?"
                         r"(?::(NoSchedule|PreferNoSchedule|NoExecute))?$")
_TEMPLATES: dict[str, jinja2.Template] = {}
_BEFORE = re.compile(r"(?:(?:^|\n)[ \t]*(?:-[ \t]+)*|:[ \t]+|[\[{,][ \t]*)$")
_WHOLE = "a value must be a whole YAML value (key: {{ v }}, - {{ v }}, [{{ v }}]), not part of a string"
_AFTER = re.compile(r"^(?:[ \t]*(?:\n|,|\]|\})|[ \t]+#)")


class _JSON(str):
    """Text already written as JSON by the ``json`` filter."""


def _json(value: Any) -> _JSON:
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined: raises UndefinedError naming the value
    # ensure_ascii: YAML reads U+2028, U+2029 and U+0085 as line breaks, JSON does not
    return _JSON(json.dumps(value, ensure_ascii=True, sort_keys=True))


def _finalize(value: Any) -> Any:
    """Every ``{{ }}`` output is JSON, whether or not the template applied the filter."""
    return value if isinstance(value, _JSON) else _json(value)


def compile_template(text: str) -> jinja2.Template:
    """A pod template's text compiled in a sandbox; raises ``jinja2.TemplateError``."""
    env = jinja2.sandbox.SandboxedEnvironment(undefined=jinja2.StrictUndefined, finalize=_finalize, autoescape=False,
                                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["json"] = _json
    _check_whole_values(env, text)
    return env.from_string(text)


def _check_whole_values(env: jinja2.Environment, text: str) -> None:
    """Refuse a ``{{ }}`` that is part of a YAML scalar (``x-{{ v }}``, ``"{{ v }}"``): JSON is only safe as a whole
    value (after ``key: ``, ``- ``, ``[``, ``,`` or ``{``, before the line's end, ``,``, ``]`` or ``}``)."""
    between, line = "", 0  # the template text since the last value; the line of the last value (0: none yet)
    for lineno, kind, value in env.lex(text):
        if kind == "data":
            between += value
        elif kind == "variable_begin":
            if (line and not _AFTER.match(between)) or not _BEFORE.search(between):
                raise jinja2.TemplateSyntaxError(_WHOLE, line if line and not _AFTER.match(between) else lineno)
            line = lineno
        elif kind == "variable_end":
            between = ""
    if line and between.strip(" \t") and not _AFTER.match(between):  # (the end of the template is fine)
        raise jinja2.TemplateSyntaxError(_WHOLE, line)


def load_template(path: str) -> jinja2.Template:
    """The compiled template at ``path`` ('' for the packaged kernel-pod.yaml.j2), cached; raises OSError or
    ``jinja2.TemplateError``."""
    if path not in _TEMPLATES:
        if path:
            with open(path, encoding="utf-8") as file:
                text = file.read()
        else:
            text = (resources.files("provisioners") / "templates" / "kernel-pod.yaml.j2").read_text(encoding="utf-8")
        _TEMPLATES[path] = compile_template(text)
    return _TEMPLATES[path]


def render_pod(template: jinja2.Template, values: dict[str, Any]) -> dict[str, Any]:
    """The pod ``template`` renders with ``values``, with our name, namespace, kernel labels and restart policy.

    Raises ``ValueError`` when the template does not render to a Pod."""
    try:
        pod = yaml.safe_load(template.render(**values))
    except (jinja2.TemplateError, yaml.YAMLError, TypeError) as exc:
        raise ValueError(f"the pod template did not render: {exc}") from None
    if not isinstance(pod, dict) or pod.get("kind") != "Pod" or not isinstance(pod.get("spec"), dict):
        raise ValueError("the pod template did not render to a mapping with kind: Pod and a spec")
    metadata = pod.setdefault("metadata", None) or {}
    pod["metadata"] = metadata
    metadata.update(name=values["pod_name"], namespace=values["namespace"])
    metadata["labels"] = {**(metadata.get("labels") or {}), **values["labels"]}  # the watch and the reaper need them
    pod["spec"]["restartPolicy"] = "Never"  # a launcher that ends is the kernel's end; the gateway restarts kernels
    return pod


def dns_label(value: str) -> str:
    """``value`` as a label value (63 characters of ``[A-Za-z0-9_.-]``, alphanumeric at both ends).

    A value that had to change gets a short hash of the original, so different values stay different."""
    if _LABEL_VALUE.match(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:8]
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", value)[:54].strip("-_.")
    return f"{safe}-{digest}" if safe else digest


def parse_toleration(text: str) -> dict[str, str]:
    """A toleration from 'key[=value][:Effect]' (kubectl taint syntax); 'key' alone tolerates any value."""
    match = _TOLERATION.match(text.strip())
    if not match:
        raise ValueError(f"toleration {text!r} is not 'key[=value][:NoSchedule|PreferNoSchedule|NoExecute]'")
    key, value, effect = match.groups()
    toleration = {"key": key, "operator": "Equal" if value is not None else "Exists"}
    if value is not None:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration
