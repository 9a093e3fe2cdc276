"""Shared handler machinery: token auth, JSON error bodies, CORS, request bodies.

The only place exception classes become HTTP statuses (:data:`STATUS_FOR`); 500 means a bug in
the gateway and its body never carries a traceback.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from tornado import httputil, web

from provisioners.errors import CapacityError, LaunchRequestError, LaunchTimeoutError, ProvisionerError

from .. import errors
from ..logs import redact
from . import browser_login

__all__ = ["APIHandler", "GatewayHandlerMixin", "STATUS_FOR"]

log = logging.getLogger("kernel_gateway.web")

#: Exception class -> HTTP status; the first matching class (in MRO order of the error) wins.
STATUS_FOR: dict[type[BaseException], int] = {
    errors.BadRequestError: 400,
    errors.AuthenticationError: 401,
    errors.ForbiddenError: 403,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.PayloadTooLargeError: 413,
    errors.LimitError: 429,
    errors.NotReadyError: 503,
    LaunchRequestError: 400,
    LaunchTimeoutError: 504,
    CapacityError: 503,
    ProvisionerError: 502,
}


def status_for(exc: BaseException) -> int | None:
    for cls in type(exc).__mro__:
        if cls in STATUS_FOR:
            return STATUS_FOR[cls]
    return None


class GatewayHandlerMixin:
    """Auth and error shaping shared by the REST handlers and the websocket handler."""

    #: Routes anyone may call (version, health, the API document).
    public = False
    #: A page a browser opens: the operator page's login cookie opens it without the XSRF header (browser_login).
    login_page = False

    request: httputil.HTTPServerRequest
    settings: dict[str, Any]

    def request_token(self) -> str:
        header = self.request.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() in ("token", "bearer") and value.strip():
            return value.strip()
        return self.get_query_argument("token", "")  # type: ignore[attr-defined]

    def authenticate(self) -> None:
        """Raise :class:`AuthenticationError` unless the request carries the gateway token."""
        expected: str = self.settings["auth_token"]
        if not expected or self.public:
            return
        given = self.request_token()
        if not given and browser_login.accepts(self.request, expected, page=self.login_page):
            return
        if not given:
            raise errors.AuthenticationError("this gateway needs a token: send 'Authorization: token <token>'")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise errors.AuthenticationError("the token is not valid for this gateway")

    def set_cors_headers(self) -> None:
        """CORS headers for ``allow_origin``: '*' as is; from a list, the request's origin if listed."""
        allowed = self.settings.get("allow_origin", "")
        if not allowed:
            return
        origin = allowed
        if allowed != "*":
            self.set_header("Vary", "Origin")  # type: ignore[attr-defined]
            origin = self.request.headers.get("Origin", "")
            if origin not in [o.strip() for o in allowed.split(",") if o.strip()]:
                return
        if origin:
            self.set_header("Access-Control-Allow-Origin", origin)  # type: ignore[attr-defined]
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, X-XSRFToken")  # type: ignore[attr-defined]
            self.set_header("Access-Control-Allow-Methods", "GET, POST, PATCH, DELETE, OPTIONS")  # type: ignore[attr-defined]

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Write ``{"reason", "message"}`` for the exception being handled (tornado calls this)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        reason = httputil.responses.get(status_code, "Unknown")
        message = ""
        if isinstance(exc, web.HTTPError):
            message = exc.log_message % exc.args if exc.log_message and exc.args else (exc.log_message or "")
            reason = exc.reason or reason
        elif exc is not None:
            mapped = status_for(exc)
            if mapped is None:
                message = "an unexpected error occurred in the gateway; its log has the details"
            else:
                status_code = mapped
                reason = httputil.responses.get(mapped, reason)
                message = str(exc)
        self.set_status(status_code)  # type: ignore[attr-defined]
        if status_code == 401:
            self.set_header("WWW-Authenticate", 'token realm="kernel-gateway"')  # type: ignore[attr-defined]
        elif status_code == 503:
            self.set_header("Retry-After", "5")  # type: ignore[attr-defined]  # starting, stopping, store away
        self.set_header("Content-Type", "application/json")  # type: ignore[attr-defined]
        self.finish(json.dumps({"reason": reason, "message": message}))  # type: ignore[attr-defined]

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Our own errors are one warning line; anything else is a bug and is logged with its traceback."""
        kernel_id = getattr(value, "kernel_id", None)
        extra = {"kernel_id": kernel_id} if kernel_id else {}
        summary = redact(f"{self.request.method} {self.request.uri}")
        if isinstance(value, web.HTTPError) or status_for(value) is not None:
            log.warning("%s: %s", summary, value, extra=extra)
        else:
            log.error("%s failed", summary, exc_info=(typ, value, tb), extra=extra)


@web.stream_request_body
class APIHandler(GatewayHandlerMixin, web.RequestHandler):
    """Base of the JSON handlers: auth and size checks in :meth:`prepare`, JSON bodies in and out."""

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.set_cors_headers()

    async def prepare(self) -> None:
        self._chunks: list[bytes] = []
        self._received = 0
        limit: int = self.settings["max_body_size"]
        length = self.request.headers.get("Content-Length")
        if length is not None:
            if not length.isdigit():
                raise errors.BadRequestError("Content-Length must be a whole number")
            if int(length) > limit:
                raise errors.PayloadTooLargeError(f"the request body is {length} bytes; the limit is {limit}")
        if self.request.method != "OPTIONS":
            self.authenticate()

    def data_received(self, chunk: bytes) -> None:
        # a chunked body has no Content-Length: keep counting, stop keeping, answer 413 once it has ended
        self._received += len(chunk)
        if self._received <= self.settings["max_body_size"]:
            self._chunks.append(chunk)

    def json_body(self, required: bool = False) -> dict[str, Any]:
        """The request body as a JSON object; an empty body is ``{}`` unless ``required``."""
        limit = self.settings["max_body_size"]
        if self._received > limit:
            raise errors.PayloadTooLargeError(f"the request body is over {limit} bytes; the limit is {limit}")
        raw = b"".join(self._chunks)
        if not raw.strip():
            if required:
                raise errors.BadRequestError("this request needs a JSON body")
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise errors.BadRequestError(f"the request body is not valid JSON: {exc}") from None
        except RecursionError:  # the decoder recurses once per nested array or object
            raise errors.BadRequestError("the request body nests arrays or objects too deeply") from None
        if not isinstance(body, dict):
            raise errors.BadRequestError("the request body must be a JSON object")
        return body

    def write_json(self, value: Any, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(value))

    def options(self, *args: Any, **kwargs: Any) -> None:
        """CORS preflight: answered without a token (tornado passes a route's named groups as kwargs)."""
        self.set_status(204)
        self.finish()

    def check_xsrf_cookie(self) -> None:
        """Token-authenticated API: no cookies, so no XSRF."""

    @property
    def registry(self):
        return self.settings["registry"]

    @property
    def policy(self):
        return self.settings["policy"]


class NotFoundHandler(APIHandler):
    """JSON 404 for every unknown route."""

    public = True

    def prepare(self) -> None:  # type: ignore[override]
        raise web.HTTPError(404, "no such endpoint: %s", redact(self.request.path), reason="Not Found")
