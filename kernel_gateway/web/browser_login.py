"""Browser login for the operator page: a signed cookie issued for the gateway token, and its XSRF value.

A browser cannot send ``Authorization: token`` on a page load, so the operator page trades the token (posted
once from its login form, or given once as ``?token=``) for a cookie. The cookie carries no token: it is a
random nonce signed with a key derived from the gateway token (so every replica with the same token accepts it,
and changing the token logs everybody out), ``HttpOnly`` and ``SameSite=Strict``, and it expires after
:data:`LOGIN_SECONDS`.

The cookie alone opens only the page itself (:func:`accepts` with ``page=True``). Every other request it
authenticates, the REST API included, must also carry :data:`XSRF_HEADER` with :func:`xsrf_value` of that
cookie: a value the page receives in its HTML and its script sends back. Another site can make a browser send
the cookie (it cannot: ``SameSite=Strict``) but never read that value or add the header (a cross-origin request
with a custom header needs a CORS preflight, which never allows credentials here). Websockets cannot send the
header at all, so the cookie never opens a kernel's channels.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Any

from tornado import httputil
from tornado.web import create_signed_value, decode_signed_value

__all__ = ["COOKIE", "LOGIN_SECONDS", "XSRF_HEADER", "accepts", "cookie_of", "issue", "xsrf_value"]

#: The login cookie's name.
COOKIE = "kernel_gateway_login"
#: The header the page's script sends with every request the cookie authenticates.
XSRF_HEADER = "X-XSRFToken"
#: How long a login lasts.
LOGIN_SECONDS = 12 * 3600


def _key(token: str) -> bytes:
    """The signing key: derived from the gateway token, never the token itself."""
    return hmac.new(token.encode(), b"kernel-gateway operator page login", hashlib.sha256).digest()


def issue(token: str, now: float | None = None) -> str:
    """A new cookie value for a browser that has just shown ``token`` (the gateway's); ``now``: the time it is
    issued at (default: now; tests give an earlier one)."""
    now = time.time() if now is None else now
    nonce = f"{int(now)}.{secrets.token_urlsafe(18)}"
    return create_signed_value(_key(token), COOKIE, nonce, clock=lambda: now).decode()


def _nonce(token: str, cookie: str) -> str | None:
    """The nonce of a cookie signed for ``token`` and not older than :data:`LOGIN_SECONDS`; None otherwise."""
    value = decode_signed_value(_key(token), COOKIE, cookie, max_age_days=LOGIN_SECONDS / 86400)
    if value is None:
        return None
    nonce = value.decode(errors="replace")
    issued, _, _ = nonce.partition(".")
    if not issued.isdigit() or time.time() - int(issued) > LOGIN_SECONDS:
        return None
    return nonce


def xsrf_value(token: str, cookie: str) -> str:
    """The value :data:`XSRF_HEADER` must carry alongside ``cookie``; empty when the cookie is not valid."""
    nonce = _nonce(token, cookie)
    if nonce is None:
        return ""
    return hmac.new(_key(token), b"xsrf\0" + nonce.encode(), hashlib.sha256).hexdigest()


def cookie_of(request: httputil.HTTPServerRequest) -> str:
    """The login cookie the request carries ('' for none)."""
    morsel: Any = request.cookies.get(COOKIE)
    return morsel.value if morsel is not None else ""


def accepts(request: httputil.HTTPServerRequest, token: str, page: bool = False) -> bool:
    """Whether ``request`` is authenticated by a login cookie for ``token``: with the XSRF header, or, for the
    page itself (``page``), without it."""
    cookie = cookie_of(request)
    if not token or not cookie:
        return False
    expected = xsrf_value(token, cookie)
    if not expected:
        return False
    if page:
        return True
    given = request.headers.get(XSRF_HEADER, "")
    return bool(given) and hmac.compare_digest(given.encode(), expected.encode())
