"""Handlers for the operator page: ``/dashboard`` (the page and its login) and ``/dashboard/data`` (what it shows).

The page is ``dashboard.html``: a template with the first snapshot inlined as JSON, and a small script that
renders it (text only, never markup from data) and fetches ``/dashboard/data`` every :data:`REFRESH_SECONDS`.
Its buttons call the REST API (``/api/kernels/{id}/interrupt``, ``/restart``, ``DELETE /api/kernels/{id}``), so
the API's own checks apply. Login and the cookie are :mod:`.browser_login`'s; docs/operators/dashboard.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import socket
import time
from typing import Any
from urllib.parse import parse_qs

from tornado import template

from .. import __version__, errors, metrics
from ..kernels.location import describe_location, kernel_location
from ..kernels.managed import iso_utc
from . import browser_login
from .base import APIHandler, status_for

__all__ = ["DashboardDataHandler", "DashboardHandler", "default_handlers", "snapshot"]

log = logging.getLogger("kernel_gateway.web")

#: Seconds between the page's refreshes.
REFRESH_SECONDS = 2.0
_TEMPLATES = template.Loader(os.path.dirname(os.path.abspath(__file__)))
_LOGIN_NEEDED = "This page needs the gateway's token. Paste it below to log in."


# -- what the page shows ---------------------------------------------------------------------------------------
async def _kernel_row(kernel: Any, now: float, host: str, held: str) -> dict[str, Any]:
    provisioner = metrics.kernel_provisioner(kernel)
    return {
        "id": kernel.kernel_id, "kernelspec": kernel.name, "provisioner": provisioner,
        "where": await kernel_location(kernel.km, provisioner, host), "user": kernel.user,
        "state": kernel.execution_state, "started": iso_utc(kernel.created),
        "age_seconds": round(max(now - kernel.created, 0.0), 1),
        "idle_seconds": round(max(now - kernel.last_activity, 0.0), 1),
        "connections": kernel.connections, "held": held,
    }


def _peer_row(registry: Any, record: Any, now: float) -> dict[str, Any]:
    """A kernel another replica holds: what its record says (its state is not known here)."""
    try:
        provisioner = metrics.provisioner_name(registry.spec(record.kernel_name)[1])
    except errors.GatewayError:  # its kernelspec is gone here
        provisioner = "unknown"
    keeper_host = record.keeper.split(":", 1)[0] or "another replica"
    return {
        "id": record.kernel_id, "kernelspec": record.kernel_name, "provisioner": provisioner,
        "where": describe_location(record.provisioner_info, provisioner, keeper_host), "user": record.user,
        "state": "unknown", "started": iso_utc(record.created), "age_seconds": round(max(now - record.created, 0.0), 1),
        "idle_seconds": None, "connections": 0, "held": "another replica",
    }


def pool_rows(registry: Any) -> list[dict[str, Any]]:
    """The warm kernel pools (``KernelPools.models()``: kernelspec, size, ready, warming) with their hits and misses
    from the same counters as ``/metrics``; [] when the registry has no pools."""
    pools = getattr(registry, "pools", None)
    models = pools.models() if pools is not None else []
    if not models:
        return []
    served: dict[tuple[str, str], int] = {}
    for family in metrics.REGISTRY.collect():
        if family.name in ("kernel_gateway_pool_hits", "kernel_gateway_pool_misses"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (family.name.rsplit("_", 1)[1], sample.labels.get("kernelspec", ""))
                    served[key] = served.get(key, 0) + int(sample.value)
    return [{"kernelspec": m.get("kernelspec", ""), "size": m.get("size", 0), "ready": m.get("ready", 0),
             "warming": m.get("warming", 0), "hits": served.get(("hits", m.get("kernelspec", "")), 0),
             "misses": served.get(("misses", m.get("kernelspec", "")), 0)} for m in models]


def _start_durations() -> list[dict[str, Any]]:
    """``kernel_gateway_kernel_start_duration_seconds`` by provisioner and phase, with per-bucket counts."""
    series: dict[tuple[str, str], dict[str, Any]] = {}
    for family in metrics.START_SECONDS.collect():
        for sample in family.samples:
            key = (sample.labels["provisioner"], sample.labels["phase"])
            entry = series.setdefault(key, {"provisioner": key[0], "phase": key[1], "count": 0, "sum": 0.0,
                                            "cumulative": []})
            if sample.name.endswith("_bucket"):
                entry["cumulative"].append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_count"):
                entry["count"] = int(sample.value)
            elif sample.name.endswith("_sum"):
                entry["sum"] = round(sample.value, 3)
    result = []
    for key in sorted(series):
        entry = series[key]
        below = 0.0
        buckets = []
        for le, cumulative in sorted(entry.pop("cumulative")):
            buckets.append({"le": "+Inf" if le == float("inf") else f"{le:g}", "count": int(cumulative - below)})
            below = cumulative
        result.append({**entry, "buckets": buckets})
    return result


def _counter(counter: Any) -> list[tuple[dict[str, str], float]]:
    return [(s.labels, s.value) for family in counter.collect() for s in family.samples if s.name.endswith("_total")]


def _starts() -> list[dict[str, Any]]:
    """Starts and start failures (by reason) per provisioner, from the same counters as ``/metrics``."""
    rows: dict[str, dict[str, Any]] = {}
    for labels, value in _counter(metrics.STARTS):
        rows.setdefault(labels["provisioner"], {"succeeded": 0, "failed": {}})["succeeded"] = int(value)
    for labels, value in _counter(metrics.START_FAILURES):
        rows.setdefault(labels["provisioner"], {"succeeded": 0, "failed": {}})["failed"][labels["reason"]] = int(value)
    return [{"provisioner": name, **rows[name]} for name in sorted(rows)]


async def snapshot(registry: Any, phase: str) -> dict[str, Any]:
    """Everything the page shows, as JSON-safe values; no secret of a kernel (keys, control ports) is in it."""
    now, host = time.time(), socket.gethostname()
    held = [(k, "here") for k in registry.kernels.values()] + [(k, "starting") for k in registry.starting.values()]
    kernels = list(await asyncio.gather(*(_kernel_row(k, now, host, where) for k, where in held)))
    if registry.replicas is not None:
        kernels += [_peer_row(registry, r, now) for r in registry.replicas.peers.values()
                    if r.kernel_id not in registry.kernels]
    kernels.sort(key=lambda row: (row["started"], row["id"]))
    return {
        "gateway": {"version": __version__, "host": host, "phase": phase, "time": iso_utc(now),
                    "restoring": bool(registry.restoring)},
        "kernels": kernels,
        "pools": pool_rows(registry),
        "start_durations": _start_durations(),
        "starts": _starts(),
    }


def _script_json(value: Any) -> str:
    """JSON safe inside a ``<script type="application/json">`` element: no ``<``, ``>`` or ``&`` left as such."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


# -- handlers --------------------------------------------------------------------------------------------------
class DashboardHandler(APIHandler):
    """``/dashboard``: GET the page (the token, once as ``?token=``, or the login cookie); POST its login form."""

    login_page = True

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.nonce = secrets.token_urlsafe(16)
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.set_header("Content-Security-Policy", (
            f"default-src 'none'; script-src 'nonce-{self.nonce}'; style-src 'nonce-{self.nonce}'; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"))
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Referrer-Policy", "no-referrer")

    def authenticate(self) -> None:
        if self.request.method != "POST":  # the login form's token is in the body: post() checks it
            super().authenticate()

    @property
    def page_url(self) -> str:
        return f"{self.settings['base_url']}dashboard"

    def _log_in(self) -> None:
        token = self.settings["auth_token"]
        self.set_cookie(browser_login.COOKIE, browser_login.issue(token), path=self.settings["base_url"],
                        expires_days=browser_login.LOGIN_SECONDS / 86400, httponly=True, samesite="Strict",
                        secure=self.request.protocol == "https")
        self.redirect(self.page_url, status=303)

    async def get(self) -> None:
        token = self.settings["auth_token"]
        if token and self.get_query_argument("token", ""):  # trade it for the cookie once; drop it from the URL
            self._log_in()
            return
        xsrf = browser_login.xsrf_value(token, browser_login.cookie_of(self.request)) if token else ""
        data = await snapshot(self.registry, self.settings["state"].phase)
        config = {"base_url": self.settings["base_url"], "xsrf": xsrf, "xsrf_header": browser_login.XSRF_HEADER,
                  "refresh_ms": int(REFRESH_SECONDS * 1000)}
        self.finish(_TEMPLATES.load("dashboard.html").generate(
            nonce=self.nonce, base_url=self.settings["base_url"], login=bool(token), config=_script_json(config),
            initial=_script_json(data)))

    async def post(self) -> None:
        if not self.request.headers.get("Content-Type", "").startswith("application/x-www-form-urlencoded"):
            raise errors.BadRequestError("the login form posts 'token' as application/x-www-form-urlencoded")
        limit = self.settings["max_body_size"]
        if self._received > limit:
            raise errors.PayloadTooLargeError(f"the request body is over {limit} bytes; the limit is {limit}")
        try:
            form = parse_qs(b"".join(self._chunks).decode(), max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            raise errors.BadRequestError("the login form's body is not a valid form") from None
        if form.get("action") == ["logout"]:
            self.clear_cookie(browser_login.COOKIE, path=self.settings["base_url"])
            self.redirect(self.page_url, status=303)
            return
        given, expected = (form.get("token") or [""])[0].strip(), self.settings["auth_token"]
        if expected and not given:
            raise errors.BadRequestError("Paste the gateway's token to log in.")
        if expected and not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("operator page: a login with a wrong token from %s", self.request.remote_ip)
            raise errors.AuthenticationError("That token is not valid for this gateway.")
        if expected:
            self._log_in()
        else:
            self.redirect(self.page_url, status=303)  # no auth: nothing to log in to

    def _auth_message(self) -> str:
        if self.request_token():
            return "That token is not valid for this gateway."
        if browser_login.cookie_of(self.request):
            return "Your login has expired or is no longer valid. Log in again."
        return _LOGIN_NEEDED

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """A browser (``Accept: text/html``) gets the login form for a missing or wrong token and a bad login form;
        other clients, and every other error, get the usual JSON."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        login_error = isinstance(exc, (errors.AuthenticationError, errors.BadRequestError))
        if not login_error or "text/html" not in self.request.headers.get("Accept", ""):
            super().write_error(status_code, **kwargs)
            return
        status = status_for(exc) or 400
        message = self._auth_message() if self.request.method != "POST" and status == 401 else str(exc)
        self.set_status(status)
        if status == 401:
            self.set_header("WWW-Authenticate", 'token realm="kernel-gateway"')
        self.finish(_TEMPLATES.load("dashboard_login.html").generate(nonce=self.nonce, action=self.page_url,
                                                                     message=message))


class DashboardDataHandler(APIHandler):
    """``GET /dashboard/data``: the page's snapshot as JSON (token, or login cookie with the XSRF header)."""

    async def get(self) -> None:
        self.set_header("X-Content-Type-Options", "nosniff")  # user-given text inside: never sniffed as HTML
        self.write_json(await snapshot(self.registry, self.settings["state"].phase))


default_handlers = [
    (r"/dashboard/?", DashboardHandler),
    (r"/dashboard/data", DashboardDataHandler),
]
