"""How the YARN provisioner authenticates to the ResourceManager's REST API (and the NodeManagers' web pages).

``simple``: no authentication; with impersonation the RM takes the user from the ``user.name`` parameter.

``kerberos``: SPNEGO (HTTP ``Negotiate``) through requests-gssapi. Every exchange is mutually authenticated: the
reply to a request that carried a Negotiate token must carry the server's token, proving it holds the
``HTTP/<host>`` key, or the request fails. Hadoop then answers on its own signed ``hadoop.auth`` cookie (kept in
the session) until the cookie expires, without a new exchange; those replies carry no token. Credentials come from

* the process's credential cache (``KRB5CCNAME``, or the default cache), filled by the operator's ``kinit``
  (and renewed by the operator: a cache whose ticket expired fails the next request with a clear error); or
* a client keytab (``rm_keytab`` with ``rm_principal``): GSSAPI gets the ticket from the keytab into a private
  in-memory cache, with no ``kinit`` at all. Credentials are acquired again at each exchange: that is when
  MIT GSSAPI gets a new ticket from the keytab when the cached one nears its end (its refresh time); a
  credential handle kept across exchanges fails with "Ticket expired" instead (tried).

With impersonation the user travels as ``doAs=<user>``: the RM's authentication filter checks that the
gateway's principal (its short name) may act for that user (``hadoop.proxyuser.<short name>.hosts/groups``).
Nothing here logs a ticket or a token: requests-gssapi's own log (its DEBUG lines print the ``Authorization``
header, its ERROR lines are tracebacks of the failures we report) is kept quiet; failures are raised as
:class:`SPNEGOError` with Kerberos' own reason.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import requests

__all__ = ["INSTALL_HINT", "AuthenticationRequired", "RMAuth", "SPNEGOError", "check_setting"]

INSTALL_HINT = "pip install 'kernel-gateway-server[kerberos]'"


class SPNEGOError(requests.RequestException):
    """The gateway could not take part in a SPNEGO exchange (no ticket, KDC unreachable, server not verified)."""


class AuthenticationRequired(requests.RequestException):
    """With simple authentication, a server answered 401; the message is its ``WWW-Authenticate`` challenge."""


class _SimpleAuth(requests.auth.AuthBase):
    """No credentials; a 401 raises :class:`AuthenticationRequired` carrying the scheme the server asked for."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.register_hook("response", self._challenge)
        return request

    @staticmethod
    def _challenge(response: requests.Response, **kwargs: Any) -> requests.Response:
        if response.status_code == 401:
            raise AuthenticationRequired(response.headers.get("WWW-Authenticate", "").split(" ")[0])
        return response


def check_setting(name: str, value: str) -> None:
    """Raise ``ValueError`` for a value of ``rm_auth``, ``rm_keytab`` or ``rm_ca_bundle`` that cannot work (called
    by the provisioner's trait validation, so a bad kernelspec stops the gateway at start-up)."""
    if name == "rm_auth":
        if value == "kerberos" and importlib.util.find_spec("requests_gssapi") is None:
            raise ValueError(f"rm_auth 'kerberos' needs requests-gssapi, which is not installed: {INSTALL_HINT}")
    elif value and not os.access(value, os.R_OK):
        raise ValueError(f"{name}: {value!r} is not a readable file")


@dataclass(frozen=True)
class RMAuth:
    """The RM authentication settings: hashable (the shared watcher is keyed by them); builds the `requests` auth."""

    kind: str = "simple"  # "simple" | "kerberos"
    principal: str = ""  # kerberos: the client principal, e.g. gateway@EXAMPLE.COM (required with a keytab)
    keytab: str = ""  # kerberos: a client keytab; empty: the process's credential cache
    ca_bundle: str = ""  # https: the CA bundle that verifies the RM; empty: the system's

    @property
    def kerberos(self) -> bool:
        return self.kind == "kerberos"

    @property
    def verify(self) -> bool | str:
        """``requests``' ``verify``: the CA bundle, or True (the system's CAs)."""
        return self.ca_bundle or True

    def check(self) -> None:
        """Raise ``ValueError`` naming what to fix when the settings cannot work (before any request)."""
        if self.kerberos and self.keytab and not self.principal:
            raise ValueError("rm_keytab is set but rm_principal is empty: name the keytab's client principal "
                             "(GATEWAY_YARN_RM_PRINCIPAL)")
        check_setting("rm_keytab", self.keytab if self.kerberos else "")
        check_setting("rm_ca_bundle", self.ca_bundle)

    def requests_auth(self) -> Any:
        """The `requests` auth object: for simple, none beyond telling which scheme a 401 asks for; for kerberos, an
        ``HTTPSPNEGOAuth`` (requests-gssapi is imported here, so only a gateway that uses Kerberos needs it)."""
        if not self.kerberos:
            return _SimpleAuth()
        self.check()
        try:
            import gssapi
            from requests_gssapi import REQUIRED, HTTPSPNEGOAuth
            from requests_gssapi.exceptions import MutualAuthenticationError, SPNEGOExchangeError
        except ImportError as exc:
            raise ImportError(f"rm_auth 'kerberos' needs requests-gssapi ({exc}); install it with: {INSTALL_HINT}") from None

        class SPNEGOAuth(HTTPSPNEGOAuth):
            """Mutual authentication for the replies to a Negotiate exchange, not for those on Hadoop's cookie."""

            def generate_request_header(self, response: Any, host: str, is_preemptive: bool = False) -> str:
                try:
                    self.creds = acquire()  # see the module docstring; a failure says why, in Kerberos' words
                    return super().generate_request_header(response, host, is_preemptive)
                except (gssapi.exceptions.GSSError, SPNEGOExchangeError) as exc:
                    # Kerberos' own reason ("Minor ...: No Kerberos credentials available (default cache: ...)")
                    text = exc.gen_message() if isinstance(exc, gssapi.exceptions.GSSError) else str(exc)
                    raise SPNEGOError(re.sub(r"^.*Minor \(\d+\): ", "", text, flags=re.S).strip()) from None

            def handle_other(self, response: Any) -> Any:
                if "Authorization" not in response.request.headers:  # the hadoop.auth cookie: no exchange here
                    return response
                try:
                    return super().handle_other(response)
                except MutualAuthenticationError:
                    raise SPNEGOError(f"the reply from {response.url.split('?')[0]} did not prove the server's "
                                      "identity (mutual authentication failed)") from None

        # at each exchange: from the credential cache (a cache kinit'ed again is picked up), or from the keytab
        # through a private MEMORY cache (a new ticket when the cached one nears its end)
        store = {"client_keytab": self.keytab, "ccache": f"MEMORY:kgw-yarn-{os.getpid()}-{id(self)}"} if self.keytab else None
        name = gssapi.Name(self.principal, gssapi.NameType.kerberos_principal) if self.principal else None

        def acquire() -> Any:
            return gssapi.Credentials(name=name, usage="initiate", store=store)

        logging.getLogger("requests_gssapi").setLevel(logging.CRITICAL)  # see the module docstring
        return SPNEGOAuth(mutual_authentication=REQUIRED)

    def as_user(self, user: str) -> dict[str, str]:
        """Query parameters that make the RM act for ``user``: ``doAs`` under Kerberos, ``user.name`` otherwise."""
        return {"doAs": user} if self.kerberos else {"user.name": user}

    def describe(self) -> str:
        """Where the credentials come from, for error messages (file names only, never their contents)."""
        if not self.kerberos:
            return "simple authentication (rm_auth 'simple')"
        if self.keytab:
            return f"Kerberos (SPNEGO) as {self.principal} from the keytab {self.keytab}"
        return ("Kerberos (SPNEGO)" + (f" as {self.principal}" if self.principal else "")
                + f" with the credential cache {os.environ.get('KRB5CCNAME') or '(default)'}")

    def refused(self, url: str, detail: str = "") -> str:
        """The message for a request the RM did not authenticate (HTTP 401), or, with ``detail``, for a SPNEGO
        exchange the gateway could not complete (Kerberos' reason)."""
        if not self.kerberos:
            if detail and detail.lower() != "negotiate":
                return (f"{url} requires authentication (HTTP 401, WWW-Authenticate: {detail}) that the gateway "
                        "does not do; it does simple (rm_auth 'simple') and Kerberos (SPNEGO, rm_auth 'kerberos')")
            return (f"{url} requires Kerberos (SPNEGO) authentication (HTTP 401), and the gateway uses simple "
                    "authentication: set rm_auth to 'kerberos' (GATEWAY_YARN_RM_AUTH) with a credential cache "
                    "(kinit, KRB5CCNAME) or rm_keytab and rm_principal")
        what = (f"could not authenticate to {url} with {self.describe()}: {detail}" if detail
                else f"{url} refused the gateway's {self.describe()} (HTTP 401)")
        return (what + "; check that the ticket is valid (klist; kinit again), that the principal and keytab match "
                "(klist -k), that the KDC is reachable (KRB5_CONFIG) and that the RM's HTTP/<host> principal is in "
                "the RM's keytab")
