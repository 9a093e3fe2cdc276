"""YARN ResourceManager access for the YARN provisioner: an HA-aware REST client and the shared app watcher.

:class:`ResourceManagerClient` wraps yarn-api-client's ``ResourceManager`` for a list of RM web
endpoints and follows the active one: a refused connection, a timeout or a standby's non-JSON page
moves it to the next endpoint, and it stays there. It counts its requests (``requests``), so tests
and operators can see what the gateway costs the RM. It authenticates as its
:class:`~provisioners.yarn_auth.RMAuth` says (simple, or Kerberos SPNEGO); a request the RM does not
authenticate raises :class:`YarnAuthError` with what to check, not the RM's page.

:class:`ApplicationWatcher` is the one poller per RM endpoint list and gateway instance: each
interval it asks the RM ONE question, the live applications carrying the instance tag, for all YARN
kernels at once; an application that leaves that list is looked up once by id for its final state
and diagnostics. Provisioners read its shared :class:`AppState` and never query the RM to poll.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import requests
from yarn_api_client.base import BaseYarnAPI, Response
from yarn_api_client.errors import APIError
from yarn_api_client.resource_manager import ResourceManager

from ._blocking import run_blocking
from .api_requests import count_request
from .errors import BackendError
from .kept import is_kept
from .yarn_auth import RMAuth

__all__ = ["FINAL_STATES", "LIVE_STATES", "AppState", "ApplicationWatcher", "ResourceManagerClient", "YarnAPIError",
           "YarnAuthError"]

log = logging.getLogger("provisioners.yarn")

LIVE_STATES = ["NEW", "NEW_SAVING", "SUBMITTED", "ACCEPTED", "RUNNING"]
FINAL_STATES = {"FINISHED", "FAILED", "KILLED"}
UNSEEN_GRACE = 60.0  # seconds a submitted application may stay unknown to the RM before it counts as gone
_STATUS = re.compile(r"status: (\d+)")


class YarnAPIError(BackendError):
    """The active ResourceManager answered a request with an error status (``status``, its text)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class YarnAuthError(YarnAPIError):
    """The ResourceManager did not authenticate the gateway (HTTP 401, or the SPNEGO exchange failed)."""


class _Endpoint(ResourceManager):
    """yarn-api-client's RM client for ONE endpoint, without its constructor's network check."""

    def __init__(self, url: str, timeout: float, auth: Any, verify: bool | str, count: Any) -> None:
        BaseYarnAPI.__init__(self, url, timeout, auth, verify)  # no I/O here; failover is ours
        self._count = count

    def request(self, api_path: str, method: str = "GET", **kwargs: Any) -> Response:
        self._count(method, api_path)
        return super().request(api_path, method, **kwargs)


class ResourceManagerClient:
    """Blocking RM REST calls against the active endpoint of ``urls``; use :meth:`acall` from async code."""

    def __init__(self, urls: list[str], timeout: float, auth: RMAuth | None = None) -> None:
        self.urls = list(urls)
        self.auth = auth or RMAuth()
        self.requests: Counter[str] = Counter()  # "GET /ws/v1/cluster/apps" -> count
        self._lock = threading.Lock()
        try:
            session_auth = self.auth.requests_auth()
        except (ImportError, ValueError) as exc:  # requests-gssapi missing, or settings that cannot work
            raise BackendError(f"YARN ResourceManager authentication: {exc}") from None
        self._endpoints = [_Endpoint(url, timeout, session_auth, self.auth.verify, self._note) for url in self.urls]
        self.active = 0

    def as_user(self, user: str) -> dict[str, Any]:
        """Request keyword arguments that make the RM act for ``user`` (impersonation)."""
        return {"params": self.auth.as_user(user)}

    def _note(self, method: str, path: str) -> None:
        kind = re.sub(r"application_\d+_\d+", "{id}", path)
        with self._lock:
            self.requests[f"{method} {kind}"] += 1
        count_request("yarn")

    def call(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run ``ResourceManager.<name>`` on the active RM, failing over in order; return the JSON body."""
        failures = []
        first = self.active
        for offset in range(len(self._endpoints)):
            index = (first + offset) % len(self._endpoints)
            try:
                data = getattr(self._endpoints[index], name)(*args, **kwargs).data
            except (requests.ConnectionError, requests.Timeout) as exc:
                failures.append(f"{self.urls[index]}: {type(exc).__name__}")
                continue
            except ValueError:  # a standby RM's HTML page instead of JSON (requests' JSONDecodeError included)
                failures.append(f"{self.urls[index]}: not the active ResourceManager")
                continue
            except requests.RequestException as exc:  # a SPNEGO exchange failed, or a 401 to simple authentication
                raise YarnAuthError(self.auth.refused(f"ResourceManager {self.urls[index]}", str(exc)), 401) from None
            except APIError as exc:
                match = _STATUS.search(str(exc))
                status = int(match.group(1)) if match else 0
                if status == 401:  # the RM's text is an HTML page; say what to check instead
                    raise YarnAuthError(self.auth.refused(f"ResourceManager {self.urls[index]}"), status) from None
                raise YarnAPIError(f"ResourceManager {self.urls[index]}: {exc}", status) from exc
            if index != self.active:
                log.warning("YARN ResourceManager %s is active now (%s)", self.urls[index], "; ".join(failures))
                self.active = index
            return data
        raise BackendError(f"no YARN ResourceManager answered: {'; '.join(failures)}")

    async def acall(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """:meth:`call` in the shared thread pool."""
        return await run_blocking(self.call, name, *args, **kwargs)

    def get_text(self, url: str, timeout: float) -> str:
        """GET a NodeManager URL (container logs) with the same authentication; '' on any failure."""
        try:
            response = self._endpoints[0].session.get(url, timeout=timeout)
        except requests.RequestException:
            return ""
        return response.text if response.status_code == 200 else ""


@dataclass
class AppState:
    """What the watcher knows of one application."""

    app_id: str
    kernel_id: str
    state: str = "SUBMITTED"
    final_status: str = ""
    diagnostics: str = ""
    am_host_http: str = ""  # the AM's NodeManager web address, host:port
    am_container_logs: str = ""
    tracked_at: float = 0.0  # monotonic time it was tracked: polls started earlier cannot have seen it
    seen: bool = False  # the RM has shown it (a REST submit returns before the RM stores the app)

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    def update(self, app: dict[str, Any]) -> None:
        self.seen = True
        self.state = app.get("state", self.state)
        self.final_status = app.get("finalStatus", self.final_status) or ""
        self.diagnostics = app.get("diagnostics", self.diagnostics) or ""
        self.am_host_http = app.get("amHostHttpAddress", self.am_host_http) or ""
        self.am_container_logs = app.get("amContainerLogs", self.am_container_logs) or ""


class ApplicationWatcher:
    """One batched applications query per interval for every YARN kernel of this gateway instance."""

    _instances: ClassVar[dict[tuple[tuple[str, ...], str, RMAuth], ApplicationWatcher]] = {}

    def __init__(self, rm: ResourceManagerClient, tag: str, interval: float) -> None:
        self.rm = rm
        self.tag = tag
        self.interval = interval
        self.apps: dict[str, AppState] = {}
        self.polls = 0  # batched queries made
        self.reaped = False
        self._task: asyncio.Task | None = None
        self._round = asyncio.Event()

    @classmethod
    def instance(cls, urls: list[str], tag: str, interval: float, timeout: float,
                 auth: RMAuth | None = None) -> ApplicationWatcher:
        """The process's watcher for these RM endpoints, instance tag and authentication (created on first use)."""
        auth = auth or RMAuth()
        key = (tuple(urls), tag, auth)
        if key not in cls._instances:
            cls._instances[key] = cls(ResourceManagerClient(urls, timeout, auth), tag, interval)
        return cls._instances[key]

    def track(self, app_id: str, kernel_id: str) -> AppState:
        """Watch ``app_id`` from now on; the poller runs while anything is tracked."""
        state = self.apps[app_id] = AppState(app_id, kernel_id, tracked_at=time.monotonic())
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return state

    def forget(self, app_id: str) -> None:
        self.apps.pop(app_id, None)

    async def next_round(self, timeout: float) -> None:
        """Return after the next poll round (or ``timeout`` seconds)."""
        event = self._round
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def wait_final(self, app_id: str, timeout: float) -> AppState | None:
        """The app's state once final, or None if it is not final within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while (state := self.apps.get(app_id)) is not None and not state.final:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            await self.next_round(remaining)
        return state

    async def _run(self) -> None:
        while self.apps:
            try:
                await self._poll()
            except Exception:  # the top of a task loop: keep watching after any failure
                log.warning("YARN application poll failed", exc_info=True)
            event, self._round = self._round, asyncio.Event()
            event.set()
            await asyncio.sleep(self.interval)

    async def _poll(self) -> None:
        started = time.monotonic()
        try:
            data = await self.rm.acall("cluster_applications", states=LIVE_STATES, application_tags=[self.tag])
        except BackendError as exc:
            log.warning("YARN application poll failed: %s", exc)
            return
        self.polls += 1
        live = {app["id"]: app for app in ((data.get("apps") or {}).get("app") or [])}
        for app_id, state in list(self.apps.items()):
            if app_id in live:
                state.update(live[app_id])
            elif not state.final and state.tracked_at < started:
                await self._fetch(state)  # once per app that ended (or is not yet stored), not per poll

    async def _fetch(self, state: AppState) -> None:
        try:
            app = (await self.rm.acall("cluster_application", state.app_id)).get("app", {})
        except YarnAPIError as exc:
            # unknown to the RM: not stored yet (just submitted), or forgotten (an RM restart without a state store)
            if exc.status == 404 and (state.seen or time.monotonic() - state.tracked_at > UNSEEN_GRACE):
                state.state, state.diagnostics = "KILLED", "the ResourceManager no longer knows this application"
            return
        except BackendError:
            return
        state.update(app)

    async def reap(self, keep: set[str]) -> list[str]:
        """Once per process: kill live applications of this instance that no tracked kernel owns; return their ids."""
        if self.reaped:
            return []
        data = await self.rm.acall("cluster_applications", states=LIVE_STATES, application_tags=[self.tag])
        self.reaped = True  # only once the RM answered: an RM that was down is asked again by the next start
        killed = []
        for app in (data.get("apps") or {}).get("app") or []:
            started = app.get("startedTime")
            if app["id"] in keep or app["id"] in self.apps or \
                    is_kept(app.get("name", ""), started / 1000 if started and started > 0 else None):
                continue
            log.warning("killing YARN application %s (kernel %s) left by an earlier run of this gateway",
                        app["id"], app.get("name", "?"))
            try:
                await self.rm.acall("cluster_application_kill", app["id"])
                killed.append(app["id"])
            except YarnAPIError as exc:
                log.warning("could not kill YARN application %s: %s", app["id"], exc)
        return killed
