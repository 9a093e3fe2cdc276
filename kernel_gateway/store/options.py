"""Which kernel store the gateway uses, and its key: options, and the one function that opens the store."""

from __future__ import annotations

import socket
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir
from traitlets import CaselessStrEnum, Unicode

from provisioners.envconfig import EnvConfigurable, env_value

from .base import KernelStore, StoreUnavailable
from .crypto import RecordCipher

__all__ = ["KernelStoreOptions", "open_store"]


class KernelStoreOptions(EnvConfigurable):  # type: ignore[misc]
    """Where kernel records are kept and the key that seals them."""

    kind = CaselessStrEnum(
        ["sqlite", "postgresql", "kubernetes"], "sqlite", config=True,
        help="The kernel store: 'sqlite' (a file of this gateway's), 'postgresql' (shared by replicas) or "
        "'kubernetes' (a Secret per kernel in kubernetes_namespace, shared by replicas with the same instance name).",
    ).tag(env="GATEWAY_KERNEL_STORE")
    sqlite_path = Unicode(
        "", config=True,
        help="The SQLite store's file; empty: kernel_gateway/kernels.sqlite under the Jupyter data directory.",
    ).tag(env="GATEWAY_KERNEL_STORE_PATH")
    postgresql_url = Unicode(
        "", config=True,
        help="libpq connection string or URL of the PostgreSQL store, e.g. 'postgresql://gw@db/kernels'; keep the "
        "password out of it (PGPASSFILE or PGPASSWORD).",
    ).tag(env="GATEWAY_KERNEL_STORE_POSTGRESQL_URL")
    kubernetes_namespace = Unicode(
        "", config=True,
        help="Namespace of the Kubernetes store's Secrets; empty: the gateway's own (its pod's, from the service "
        "account, else the kubeconfig context's, else 'default'). The gateway needs get, list, create, update and "
        "delete on secrets there.",
    ).tag(env="GATEWAY_KERNEL_STORE_NAMESPACE")
    kubernetes_instance = Unicode(
        "", config=True,
        help="Value of the kernel_gateway.store label on the Kubernetes store's Secrets: gateways with the same "
        "value share records (give a Deployment's replicas one), others never see them. Empty: the value of "
        "GATEWAY_INSTANCE_NAME, else the host name.",
    ).tag(env="GATEWAY_KERNEL_STORE_INSTANCE")
    key = Unicode(
        "", config=True,
        help="The key that seals kernel records (they hold kernels' HMAC and control keys): 32 random bytes in "
        "base64. Prefer key_file. Without a key the store refuses to start.",
    ).tag(env="GATEWAY_KERNEL_STORE_KEY")
    key_file = Unicode(
        "", config=True, help="A file (readable by the gateway only) holding the store key in base64.",
    ).tag(env="GATEWAY_KERNEL_STORE_KEY_FILE")

    def cipher(self) -> RecordCipher:
        """The record cipher; :class:`StoreUnavailable` naming the option when there is no usable key."""
        key = self.key
        if self.key_file:
            try:
                key = Path(self.key_file).read_text()
            except OSError as exc:
                raise StoreUnavailable(f"cannot read the kernel store key file {self.key_file}: {exc.strerror}") from None
        if not key.strip():
            raise StoreUnavailable("the kernel store needs a key to seal kernel records (they hold kernels' keys): set "
                                   "KernelStoreOptions.key_file (GATEWAY_KERNEL_STORE_KEY_FILE) or .key "
                                   "(GATEWAY_KERNEL_STORE_KEY)")
        try:
            return RecordCipher(key)
        except ValueError as exc:
            raise StoreUnavailable(str(exc)) from None


def open_store(options: KernelStoreOptions) -> KernelStore:
    """The store ``options`` name (no I/O yet: the first call connects)."""
    cipher = options.cipher()
    if options.kind == "postgresql":
        from .postgres import PostgresKernelStore

        if not options.postgresql_url:
            raise StoreUnavailable("the PostgreSQL kernel store needs KernelStoreOptions.postgresql_url "
                                   "(GATEWAY_KERNEL_STORE_POSTGRESQL_URL)")
        return PostgresKernelStore(options.postgresql_url, cipher)
    if options.kind == "kubernetes":
        from .kubernetes import KubernetesKernelStore

        instance = options.kubernetes_instance or env_value("GATEWAY_INSTANCE_NAME") or socket.gethostname()
        return KubernetesKernelStore(cipher, instance, namespace=options.kubernetes_namespace)
    from .sqlite import SQLiteKernelStore

    return SQLiteKernelStore(options.sqlite_path or Path(jupyter_data_dir()) / "kernel_gateway" / "kernels.sqlite", cipher)
