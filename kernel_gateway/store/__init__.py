"""The kernel store: one record per running kernel, so a restarted gateway, or another replica, re-attaches.

Records are sealed whole with the operator's key (:mod:`.crypto`): they hold ZMQ and launcher control keys,
and a record changed in the store is refused, never trusted. Stores are real engines, chosen by one option
(:class:`~.options.KernelStoreOptions`): SQLite (embedded, the default), PostgreSQL (for replicas) and
Kubernetes Secrets (:mod:`.kubernetes`: for a gateway, or its replicas, running in a cluster).
"""

from .base import KernelStore, StoreUnavailable
from .crypto import RecordCipher, TamperedRecord
from .options import KernelStoreOptions, open_store
from .record import KernelRecord

__all__ = ["KernelRecord", "KernelStore", "KernelStoreOptions", "RecordCipher", "StoreUnavailable", "TamperedRecord",
           "open_store"]
