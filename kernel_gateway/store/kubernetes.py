"""The store for a gateway in Kubernetes: one Secret per kernel in the gateway's namespace, through the API server.

A record is the Secret ``kgw-kernel-<kernel id>``: its ``record`` data is the sealed blob, and its metadata says
only which kernel and which store it belongs to (labels ``kernel_gateway.kernel_id`` and ``kernel_gateway.store``
= the gateway instance, the exact kernel id as an annotation). The user name, addresses and keys are inside the
sealed blob only. Gateways with the same instance name (a Deployment's replicas) share records; another
instance's Secrets are neither listed, read, replaced nor deleted. The label is not ``kernel_gateway.instance``:
that one marks the kernel pods' own Secrets, which the provisioner reaps as leftovers.

Replicas share two more things (see :meth:`~.base.KernelStore.note_activity` and ``take_lease``), labelled the
same way: a ``coordination.k8s.io/v1`` Lease per lease name (``kgw-lease-<instance>-<name>``), and one ConfigMap per
writing store (``kgw-activity-<instance>-<writer id>``) with the latest activity that store reported.

The client is configured at the first call (in-cluster service account, else the kubeconfig), on the store's
thread; every request has a timeout and is not retried, so an API server that stops answering makes a call fail
with :class:`~.base.StoreUnavailable` within ``timeout`` seconds, and the next call tries again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import urllib3
from kubernetes import client
from kubernetes.client import rest
from kubernetes.client.rest import ApiException

from provisioners.errors import BackendError
from provisioners.kubernetes_pod import dns_label
from provisioners.kubernetes_watch import KERNEL_LABEL, api_reason, new_api_client, own_namespace

from .base import KernelStore, StoreUnavailable, log
from .crypto import RecordCipher

__all__ = ["KubernetesKernelStore", "STORE_LABEL"]

T = TypeVar("T")
STORE_LABEL = "kernel_gateway.store"  # value: the gateway instance whose record it is
ID_ANNOTATION = "kernel_gateway.kernel_id"  # the exact kernel id (the label value may be shortened)
LEASE_ANNOTATION = "kernel_gateway.lease"  # a Lease's exact lease name (its object name may be hashed)
ACTIVITY_KEY = "activity"  # the activity ConfigMap's one data key: JSON {kernel id: unix time} (ids need not be keys)
#: what the gateway's service account needs, by resource, for a 403's message
_NEEDS = {"secrets": "get, list, create, update and delete on secrets",
          "leases": "get, create and update on leases (API group coordination.k8s.io)",
          "configmaps": "list, create, update and delete on configmaps"}
#: a metadata-only list: the record Secrets' names and annotations without their sealed data
_METADATA_ONLY = {"Accept": "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,200}[a-z0-9])?$")


def object_name(prefix: str, value: str) -> str:
    """``<prefix>-<value>`` as an object name; a value that is not a DNS name gets a hash of itself instead."""
    if _NAME.match(value):
        return f"{prefix}-{value}"
    safe = re.sub(r"[^a-z0-9]+", "-", value.lower())[:60].strip("-")
    return "-".join(filter(None, (prefix, safe, hashlib.sha256(value.encode()).hexdigest()[:12])))


def secret_name(kernel_id: str) -> str:
    """The record's Secret name: ``kgw-kernel-<id>`` (see :func:`object_name`)."""
    return object_name("kgw-kernel", kernel_id)


class KubernetesKernelStore(KernelStore):
    """Records as Secrets in ``namespace`` (empty: the gateway's own), labelled with ``instance``."""

    name = "kubernetes"
    shared = True

    def __init__(self, cipher: RecordCipher, instance: str, namespace: str = "", kubeconfig: str = "",
                 timeout: float = 10.0, page_size: int = 100) -> None:
        super().__init__(cipher)
        self.instance = dns_label(instance)
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.timeout = timeout
        self.page_size = page_size
        self._api: Any = None  # kubernetes.client.ApiClient, made by the first call
        self._host = ""
        # this store's activity ConfigMap: it is its only writer, so what it wrote last is known without a read
        self._writer = uuid.uuid4().hex[:12]
        self._noted: dict[str, float] = {}
        self._noted_written = False
        self._leases_seen: dict[str, tuple[str, float]] = {}  # lease object -> (resourceVersion, monotonic first seen)

    def describe(self) -> str:
        where = f"namespace {self.namespace}" if self.namespace else "the gateway's namespace"
        source = self._host or (f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster or default config")
        return f"Kubernetes Secrets labelled {STORE_LABEL}={self.instance} in {where} ({source})"

    # -- the client -----------------------------------------------------------------------------------
    def _core(self) -> client.CoreV1Api:
        if self._api is None:
            try:
                api = new_api_client(self.kubeconfig)
            except BackendError as exc:
                raise StoreUnavailable(f"kernel store ({self.describe()}): {exc}") from None
            # no urllib3 retries: a silent API server must fail the call within `timeout`, not 4 times that
            api.configuration.retries = False
            api.rest_client.pool_manager.clear()
            api.rest_client = rest.RESTClientObject(api.configuration)
            self.namespace = self.namespace or own_namespace(self.kubeconfig)
            self._api, self._host = api, api.configuration.host
        return client.CoreV1Api(self._api)

    def _coordination(self) -> client.CoordinationV1Api:
        self._core()
        return client.CoordinationV1Api(self._api)

    def _call(self, what: str, func: Callable[..., T], *args: Any, expected: tuple[int, ...] = (),
              resource: str = "secrets", **kwargs: Any) -> T | None:
        """``func(*args)`` with the store's timeout; None for a status in ``expected`` (404: none there); other API
        and network errors become :class:`StoreUnavailable` saying what failed and why (the server's message,
        never credentials; a 403 names the verbs ``resource`` needs)."""
        try:
            return func(*args, _request_timeout=(self.timeout, self.timeout), **kwargs)
        except ApiException as exc:
            if exc.status in expected:
                return None
            reason = api_reason(exc)
            if exc.status == 401:
                reason += ": the API server does not accept the gateway's credentials (kubeconfig or service account " \
                          "token)"
            elif exc.status == 403:
                reason += f": the gateway's service account needs {_NEEDS[resource]} in namespace {self.namespace}"
            raise StoreUnavailable(f"kernel store ({self.describe()}): cannot {what}: {exc.status} {reason}") from None
        except urllib3.exceptions.NewConnectionError as exc:  # a subclass of the timeout below: first
            raise StoreUnavailable(f"kernel store ({self.describe()}): cannot {what}: cannot connect to the API "
                                   f"server: {str(exc).rpartition(': ')[2]}") from None
        except urllib3.exceptions.TimeoutError:
            raise StoreUnavailable(f"kernel store ({self.describe()}): cannot {what}: the API server did not answer "
                                   f"within {self.timeout:g}s") from None
        except urllib3.exceptions.HTTPError as exc:
            raise StoreUnavailable(f"kernel store ({self.describe()}): cannot {what}: {type(exc).__name__}: "
                                   f"{exc}") from None

    def _ours(self, secret: Any) -> bool:
        return (secret.metadata.labels or {}).get(STORE_LABEL) == self.instance

    # -- the engine -----------------------------------------------------------------------------------
    def _put(self, kernel_id: str, blob: bytes) -> None:
        core, name = self._core(), secret_name(kernel_id)
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": name, "labels": {KERNEL_LABEL: dns_label(kernel_id),
                                                      STORE_LABEL: self.instance},
                             "annotations": {ID_ANNOTATION: kernel_id}},
                "data": {"record": base64.b64encode(blob).decode()}}
        what = f"write the record of kernel {kernel_id}"
        if self._call(what, core.create_namespaced_secret, self.namespace, body, expected=(409,)):
            return
        existing = self._call(what, core.read_namespaced_secret, name, self.namespace)  # 409: it exists, replace it
        if not self._ours(existing):
            owner = (existing.metadata.labels or {}).get(STORE_LABEL, "none")
            raise StoreUnavailable(f"kernel store ({self.describe()}): cannot {what}: Secret {name} exists and is "
                                   f"not this store's ({STORE_LABEL}: {owner})")
        self._call(what, core.replace_namespaced_secret, name, self.namespace, body)

    def _get(self, kernel_id: str) -> bytes | None:
        secret = self._call(f"read the record of kernel {kernel_id}", self._core().read_namespaced_secret,
                            secret_name(kernel_id), self.namespace, expected=(404,))
        if secret is None or not self._ours(secret):
            return None
        if (secret.metadata.annotations or {}).get(ID_ANNOTATION) != kernel_id:  # another id's hashed name
            return None
        return base64.b64decode((secret.data or {}).get("record", ""))

    def _delete(self, kernel_id: str) -> None:
        core, name = self._core(), secret_name(kernel_id)
        what = f"delete the record of kernel {kernel_id}"
        secret = self._call(what, core.read_namespaced_secret, name, self.namespace, expected=(404,))
        if secret is not None and self._ours(secret):  # the uid precondition: never a Secret made again meanwhile
            self._call(what, core.delete_namespaced_secret, name, self.namespace, expected=(404, 409),
                       body={"preconditions": {"uid": secret.metadata.uid}})

    def _list(self, what: str, func: Callable[..., Any], resource: str = "secrets", **kwargs: Any) -> list[Any]:
        """Every object ``func`` lists with this store's label, in pages of ``page_size``: a large store never
        arrives as one response."""
        found: list[Any] = []
        token, expired = None, 0
        while True:
            page = self._call(what, func, self.namespace, label_selector=f"{STORE_LABEL}={self.instance}",
                              limit=self.page_size, expected=(410,) if token and expired < 3 else (),
                              resource=resource, **({"_continue": token} if token else {}), **kwargs)
            if page is None:  # 410: the list took longer than the server keeps its snapshot; list afresh
                found, token, expired = [], None, expired + 1
                continue
            found.extend(page.items)
            token = page.metadata._continue
            if not token:
                return found

    def _all(self) -> list[tuple[str, bytes]]:
        found = self._list("list the records", self._core().list_namespaced_secret)
        found.sort(key=lambda s: (s.metadata.creation_timestamp, s.metadata.name))
        return [(s.metadata.annotations[ID_ANNOTATION], base64.b64decode((s.data or {}).get("record", "")))
                for s in found if ID_ANNOTATION in (s.metadata.annotations or {})]

    # -- activity: one ConfigMap per writing store --------------------------------------------------------
    def _activity_name(self) -> str:
        return object_name("kgw-activity", f"{self.instance}-{self._writer}")

    def _recorded(self) -> set[str]:
        """The ids of the kernels with a record now: one metadata-only list (names and annotations, no blobs)."""
        found = self._list("list the records", self._core().list_namespaced_secret, _headers=_METADATA_ONLY)
        return {s.metadata.annotations[ID_ANNOTATION] for s in found if ID_ANNOTATION in (s.metadata.annotations or {})}

    def _note_activity(self, activity: dict[str, float]) -> None:
        """Write this store's ConfigMap once: what it wrote before merged with ``activity`` (the latest time per
        kernel), limited to the kernels recorded now. So a removed kernel's entry goes at the next write, a batch's
        kernel without a record is ignored, and the ConfigMap holds at most one entry per recorded kernel (the
        price: a metadata-only list of the records before each write)."""
        recorded = self._recorded()
        merged = {kid: t for kid, t in self._noted.items() if kid in recorded}
        for kid, t in activity.items():
            if kid in recorded and t > merged.get(kid, float("-inf")):
                merged[kid] = t
        if merged == self._noted and self._noted_written:
            return
        core, name = self._core(), self._activity_name()
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "labels": {STORE_LABEL: self.instance}},
                "data": {ACTIVITY_KEY: json.dumps(merged, sort_keys=True)}}
        what = "write the kernels' activity"
        # one call: replace once it exists (no resourceVersion: nobody else writes this name), create the first time
        # or when someone deleted it
        if not self._noted_written or self._call(what, core.replace_namespaced_config_map, name, self.namespace,
                                                 body, expected=(404,), resource="configmaps") is None:
            self._call(what, core.create_namespaced_config_map, self.namespace, body, resource="configmaps")
        self._noted, self._noted_written = merged, True

    def _activity(self) -> dict[str, float]:
        """Every writer's ConfigMap of this instance in one (paginated) list; the latest time per kernel. Ids of
        kernels removed since their writer's last write may appear, and those of a writer that ended without
        closing the store (its ConfigMap stays until the namespace goes)."""
        latest: dict[str, float] = {}
        for config_map in self._list("read the kernels' activity", self._core().list_namespaced_config_map,
                                     resource="configmaps"):
            try:
                noted = json.loads((config_map.data or {}).get(ACTIVITY_KEY, "{}"))
            except ValueError:
                continue  # not one this store wrote (or edited by hand): it says nothing reliable
            for kid, t in noted.items() if isinstance(noted, dict) else ():
                if isinstance(t, (int, float)) and t > latest.get(kid, float("-inf")):
                    latest[kid] = float(t)
        return latest

    # -- leases: coordination.k8s.io Lease objects, taken with optimistic concurrency ---------------------
    def _take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Read the Lease; none: create it (a 409 means another replica created it first: False). Held by
        ``holder``, or run out: replace it with the read resourceVersion, so of two replicas replacing at once the
        API server accepts one and answers the other 409 (False). Reading first makes a renewal two calls.

        The lease lasts whole seconds (``leaseDurationSeconds`` is an integer): ``seconds`` rounded up."""
        api, lease_name = self._coordination(), object_name("kgw-lease", f"{self.instance}-{name}")
        what = f"take the lease {name}"
        now = datetime.now(timezone.utc)
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": lease_name, "labels": {STORE_LABEL: self.instance},
                         "annotations": {LEASE_ANNOTATION: name}},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": max(1, math.ceil(seconds)),
                     "acquireTime": _micro_time(now), "renewTime": _micro_time(now), "leaseTransitions": 0}}
        lease = self._call(what, api.read_namespaced_lease, lease_name, self.namespace, expected=(404,),
                           resource="leases")
        if lease is None:
            return self._call(what, api.create_namespaced_lease, self.namespace, body, expected=(409,),
                              resource="leases") is not None
        labels, annotations = lease.metadata.labels or {}, lease.metadata.annotations or {}
        if labels.get(STORE_LABEL) != self.instance or annotations.get(LEASE_ANNOTATION) != name:
            raise StoreUnavailable(f"kernel store ({self.describe()}): cannot {what}: Lease {lease_name} exists and "
                                   f"is not this store's ({STORE_LABEL}: {labels.get(STORE_LABEL, 'none')}, "
                                   f"{LEASE_ANNOTATION}: {annotations.get(LEASE_ANNOTATION, 'none')})")
        spec = lease.spec
        if spec.holder_identity == holder:  # a renewal: the same acquisition goes on
            body["spec"]["acquireTime"] = _micro_time(spec.acquire_time or now)
            body["spec"]["leaseTransitions"] = spec.lease_transitions or 0
        elif self._ran_out(lease_name, lease, now):
            body["spec"]["leaseTransitions"] = (spec.lease_transitions or 0) + 1
        else:
            return False
        body["metadata"]["resourceVersion"] = lease.metadata.resource_version
        return self._call(what, api.replace_namespaced_lease, lease_name, self.namespace, body, expected=(404, 409),
                          resource="leases") is not None

    def _ran_out(self, lease_name: str, lease: Any, now: datetime) -> bool:
        """Whether another holder's lease has run out. The Lease API has no clock of the server's: ``renewTime`` is
        the holder's clock, compared here with this replica's. Skew means this: a replica whose clock is d seconds
        ahead of the holder's sees the lease run out d seconds early (two holders for up to d seconds), one behind
        sees it d seconds late. Keep the nodes' clocks synchronised (NTP: milliseconds) and leases much longer than
        that. A holder whose clock is far ahead cannot keep a lease it stopped renewing, though: a lease this
        replica has seen unchanged (same resourceVersion) for its whole duration, timed by its own monotonic clock
        (no skew there), has run out whatever its ``renewTime`` says."""
        spec, version = lease.spec, lease.metadata.resource_version
        seen_version, first_seen = self._leases_seen.get(lease_name, ("", 0.0))
        if seen_version != version:
            self._leases_seen[lease_name] = (version, time.monotonic())
        elif time.monotonic() - first_seen >= (spec.lease_duration_seconds or 0):
            return True
        renewed = spec.renew_time or spec.acquire_time
        if renewed is None or spec.lease_duration_seconds is None:
            return True  # a Lease without a holder's time (made by hand): nothing holds it
        if renewed.tzinfo is None:
            renewed = renewed.replace(tzinfo=timezone.utc)
        return (now - renewed).total_seconds() >= spec.lease_duration_seconds

    def _close(self) -> None:
        if self._api is not None:
            try:
                if self._noted_written:  # the activity it wrote ends with it; other writers' stays
                    self._call("remove this replica's activity", self._core().delete_namespaced_config_map,
                               self._activity_name(), self.namespace, expected=(404,), resource="configmaps")
            except StoreUnavailable as exc:  # a gateway stopping while the API server is away still stops
                log.warning("%s (ConfigMap %s is left; readers take the latest time per kernel anyway)", exc,
                            self._activity_name())
            finally:
                self._api.close()
                self._api = None
                self._noted, self._noted_written = {}, False


def _micro_time(moment: datetime) -> str:
    """``moment`` as a MicroTime (UTC, always six fractional digits, as the API server parses it)."""
    if moment.tzinfo is None:  # the client reads times without a zone as UTC
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
