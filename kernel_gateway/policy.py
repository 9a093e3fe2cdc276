"""Who may start what: identity, authorized users, the kernel environment, launch timeouts, limits."""

from __future__ import annotations

import math
import os
from typing import Any

from traitlets import Float, Integer, List, TraitError, Unicode, validate

from provisioners.envconfig import EnvConfigurable

from .errors import BadRequestError, ForbiddenError, LimitError
from .logs import CONTROL_CHARS, escape_controls

__all__ = ["GatewayPolicy", "check_text"]

MAX_ENV_VALUE = 4096
#: Always passed from the gateway's own environment, so kernels can find their interpreter.
BASE_INHERITED = ("PATH",)


def check_text(value: str, what: str) -> str:
    """Return ``value`` unless it holds a control character (tab aside) or a lone surrogate.

    Such text cannot reach a process environment, a file name or a log line safely (a lone surrogate
    is not even encodable as UTF-8); raise :class:`BadRequestError` naming ``what``.
    """
    found = CONTROL_CHARS.search(value)
    if found:
        raise BadRequestError(f"{what} must not contain control characters or lone surrogates; found "
                              f"'{escape_controls(found.group())}' at position {found.start()}")
    return value


class GatewayPolicy(EnvConfigurable):
    """Decides, per request, the user, whether they may start a kernel, and what it receives."""

    identity_header = Unicode(
        "",
        config=True,
        help="HTTP header set by a trusted auth proxy that names the user (e.g. X-Forwarded-User); "
        "when set it wins over KERNEL_USERNAME from the request. Empty: identity comes from "
        "KERNEL_USERNAME.",
    ).tag(env="GATEWAY_IDENTITY_HEADER")

    authorized_users = List(
        Unicode(),
        config=True,
        help="Users allowed to start kernels; empty allows everyone not in unauthorized_users. A kernelspec "
        "can narrow it with metadata.authorized_users.",
    ).tag(env="GATEWAY_AUTHORIZED_USERS")

    unauthorized_users = List(
        Unicode(),
        ["root"],
        config=True,
        help="Users never allowed to start kernels; a kernelspec can add more with "
        "metadata.unauthorized_users. Default: root.",
    ).tag(env="GATEWAY_UNAUTHORIZED_USERS")

    client_envs = List(
        Unicode(),
        config=True,
        help="Request env variables passed to kernels besides KERNEL_*; empty passes only KERNEL_*.",
    ).tag(env="GATEWAY_CLIENT_ENVS")

    inherited_envs = List(
        Unicode(),
        config=True,
        help="Variables of the gateway's own environment passed to every kernel, besides PATH; "
        "empty passes only PATH.",
    ).tag(env="GATEWAY_INHERITED_ENVS")

    launch_timeout = Float(
        60.0,
        config=True,
        help="Seconds a kernel may take to start and answer kernel_info; the client may ask for another "
        "value with KERNEL_LAUNCH_TIMEOUT, up to max_launch_timeout.",
    ).tag(env="GATEWAY_KERNEL_LAUNCH_TIMEOUT")

    max_launch_timeout = Float(
        300.0,
        config=True,
        help="Upper bound, in seconds, on a client's KERNEL_LAUNCH_TIMEOUT.",
    ).tag(env="GATEWAY_MAX_LAUNCH_TIMEOUT")

    min_launch_timeout = Float(
        2.0,
        config=True,
        help="Lower bound, in seconds, on a client's KERNEL_LAUNCH_TIMEOUT: a smaller value is raised to it, "
        "so a kernel always gets a real chance to start. max_launch_timeout wins if it is smaller.",
    ).tag(env="GATEWAY_MIN_LAUNCH_TIMEOUT")

    max_kernels = Integer(
        0,
        config=True,
        help="Most kernels running or starting at once; 0 means no limit.",
    ).tag(env="GATEWAY_MAX_KERNELS")

    max_kernels_per_user = Integer(
        0,
        config=True,
        help="Most kernels one user may have running or starting; 0 means no limit.",
    ).tag(env="GATEWAY_MAX_KERNELS_PER_USER")

    @validate("launch_timeout", "max_launch_timeout", "min_launch_timeout")
    def _positive_timeout(self, proposal: dict[str, Any]) -> float:
        if not (math.isfinite(proposal["value"]) and proposal["value"] > 0):
            raise TraitError(f"{proposal['trait'].name} must be a positive number of seconds, not {proposal['value']}")
        return proposal["value"]

    @validate("max_kernels", "max_kernels_per_user")
    def _non_negative(self, proposal: dict[str, Any]) -> int:
        if proposal["value"] < 0:
            raise TraitError(f"{proposal['trait'].name} must be 0 (no limit) or more, not {proposal['value']}")
        return proposal["value"]

    def identify(self, headers: Any, request_env: dict[str, str]) -> str:
        """Return the user a request acts for: the trusted header, else KERNEL_USERNAME, else ''."""
        if self.identity_header:
            user = headers.get(self.identity_header, "")
            if user:
                return check_text(user, f"the user name in {self.identity_header}")
        return check_text(request_env.get("KERNEL_USERNAME", ""), "KERNEL_USERNAME")

    def check_user(self, user: str, spec_metadata: dict[str, Any], spec_name: str) -> None:
        """Raise :class:`ForbiddenError` unless ``user`` may start kernels of ``spec_name``."""
        denied = set(self.unauthorized_users) | set(spec_metadata.get("unauthorized_users", []))
        if user and user in denied:
            raise ForbiddenError(f"user {user!r} is not authorized to start kernels of {spec_name!r}")
        for allowed in (self.authorized_users, spec_metadata.get("authorized_users", [])):
            if allowed and user not in allowed:
                raise ForbiddenError(f"user {user!r} is not authorized to start kernels of {spec_name!r}")

    def check_limits(self, total: int, user: str, user_total: int) -> None:
        """Raise :class:`LimitError` if one more kernel would exceed a limit (counts include starts in flight)."""
        if self.max_kernels and total >= self.max_kernels:
            raise LimitError(f"the gateway already runs {total} kernels; the limit is {self.max_kernels}")
        if self.max_kernels_per_user and user_total >= self.max_kernels_per_user:
            raise LimitError(
                f"user {user!r} already runs {user_total} kernels; the limit per user is {self.max_kernels_per_user}"
            )

    @staticmethod
    def validate_env(request_env: Any) -> dict[str, str]:
        """Check the request's ``env``: an object of short single-line strings; raise :class:`BadRequestError`."""
        if request_env is None:
            return {}
        if not isinstance(request_env, dict):
            raise BadRequestError("'env' must be an object mapping variable names to strings")
        for name, value in request_env.items():
            if not name or not name.isascii() or not name.replace("_", "a").isalnum() or name[0].isdigit():
                raise BadRequestError(f"env variable name '{escape_controls(name)}' must be ASCII letters, digits "
                                      "and underscores, not starting with a digit")
            if not isinstance(value, str):
                raise BadRequestError(f"env variable {name} must be a string, not {type(value).__name__}")
            if len(value) > MAX_ENV_VALUE:
                raise BadRequestError(f"env variable {name} is {len(value)} characters; the limit is {MAX_ENV_VALUE}")
            if any(ch in value for ch in "\0\n\r"):
                raise BadRequestError(f"env variable {name} must not contain NUL or newline characters")
            check_text(value, f"env variable {name}")
        return dict(request_env)

    def kernel_env(self, request_env: dict[str, str], user: str, kernel_id: str, launch_timeout: float) -> dict[str, str]:
        """Build a kernel's whole environment: inherited gateway variables plus allowed request variables.

        This is the one place that reads the gateway's environment on a kernel's behalf.
        """
        env = {name: os.environ[name] for name in (*BASE_INHERITED, *self.inherited_envs) if name in os.environ}
        allowed = set(self.client_envs)
        env.update({k: v for k, v in request_env.items() if k.startswith("KERNEL_") or k in allowed})
        if user:
            env["KERNEL_USERNAME"] = user
        env["KERNEL_ID"] = kernel_id
        env["KERNEL_GATEWAY"] = "1"
        env["KERNEL_LAUNCH_TIMEOUT"] = f"{launch_timeout:g}"  # the capped value, for the provisioner
        return env

    def launch_timeout_for(self, request_env: dict[str, str]) -> float:
        """The launch timeout for a request: KERNEL_LAUNCH_TIMEOUT if valid, raised to ``min_launch_timeout``
        and capped at ``max_launch_timeout``."""
        raw = request_env.get("KERNEL_LAUNCH_TIMEOUT")
        if raw is None:
            return min(self.launch_timeout, self.max_launch_timeout)
        try:
            value = float(raw)
        except ValueError:
            raise BadRequestError(f"KERNEL_LAUNCH_TIMEOUT must be a number of seconds, not {raw!r}") from None
        if not math.isfinite(value):
            raise BadRequestError(f"KERNEL_LAUNCH_TIMEOUT must be a finite number of seconds, not {raw!r}")
        if not value > 0:
            raise BadRequestError(f"KERNEL_LAUNCH_TIMEOUT must be positive, not {raw!r}")
        return min(max(value, self.min_launch_timeout), self.max_launch_timeout)
