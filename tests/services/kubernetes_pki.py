"""Certificates and kubeconfigs of the Kubernetes test cluster, made fresh for each cluster.

One CA signs the API server's serving certificate, a client certificate per component (the names and
groups the API server's Node and RBAC authorizers expect) and the kubelet's serving certificate; the
service-account tokens are signed with their own RSA key. Each component gets a kubeconfig with its
certificate embedded; ``admin.kubeconfig`` (``system:masters``) is the one tests use.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: kubeconfig name -> (common name, organization) of its client certificate
CLIENTS = {
    "admin": ("kgw-test-admin", "system:masters"),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
    "controller-manager": ("system:kube-controller-manager", None),
    "scheduler": ("system:kube-scheduler", None),
    "kube-proxy": ("system:kube-proxy", None),
}
VALIDITY = datetime.timedelta(days=30)


def _name(common_name: str, organization: str | None = None) -> x509.Name:
    parts = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)] if organization else []
    return x509.Name(parts + [x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _alt_names(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


class _CA:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name("kgw-test-kubernetes-ca")
        self.cert = self._builder(self.name, self.key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True).sign(self.key, hashes.SHA256())

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY))

    def issue(self, subject: x509.Name, server: bool, alt_names: list[str] | None = None):
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = self._builder(subject, key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False)
        if alt_names:
            builder = builder.add_extension(_alt_names(alt_names), critical=False)
        return key, builder.sign(self.key, hashes.SHA256())


def write_pki(pki: Path, node_name: str, node_ip: str, api_service_ip: str, api_port: int) -> None:
    """Write ``ca.crt``/``.key``, ``<name>.crt``/``.key`` and ``<name>.kubeconfig`` files into ``pki``."""
    pki.mkdir(parents=True, exist_ok=True)
    ca = _CA()
    pem = serialization.Encoding.PEM
    ca_pem = ca.cert.public_bytes(pem)

    def save(name: str, key, cert) -> tuple[bytes, bytes]:
        key_pem, cert_pem = _pem_key(key), cert.public_bytes(pem)
        (pki / f"{name}.key").write_bytes(key_pem)
        (pki / f"{name}.key").chmod(0o600)
        (pki / f"{name}.crt").write_bytes(cert_pem)
        return key_pem, cert_pem

    save("ca", ca.key, ca.cert)
    save("apiserver", *ca.issue(_name("kube-apiserver"), server=True, alt_names=[
        "kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local",
        "localhost", "127.0.0.1", api_service_ip, node_ip]))
    save("kubelet-serving", *ca.issue(_name(f"system:node:{node_name}", "system:nodes"), server=True,
                                      alt_names=[node_name, "localhost", node_ip, "127.0.0.1"]))
    clients = dict(CLIENTS, kubelet=(f"system:node:{node_name}", "system:nodes"))
    for name, (common_name, organization) in clients.items():
        key_pem, cert_pem = save(name, *ca.issue(_name(common_name, organization), server=False))
        kubeconfig = {  # JSON is YAML: every client (kubectl, client-go, the Python client) reads it
            "apiVersion": "v1", "kind": "Config", "current-context": "default",
            "clusters": [{"name": "kgw-test", "cluster": {
                "server": f"https://127.0.0.1:{api_port}",
                "certificate-authority-data": base64.b64encode(ca_pem).decode()}}],
            "users": [{"name": name, "user": {"client-certificate-data": base64.b64encode(cert_pem).decode(),
                                              "client-key-data": base64.b64encode(key_pem).decode()}}],
            "contexts": [{"name": "default", "context": {"cluster": "kgw-test", "user": name}}]}
        (pki / f"{name}.kubeconfig").write_text(json.dumps(kubeconfig, indent=1))
        (pki / f"{name}.kubeconfig").chmod(0o600)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "sa.key").write_bytes(_pem_key(sa_key))
    (pki / "sa.key").chmod(0o600)
    (pki / "sa.pub").write_bytes(sa_key.public_key().public_bytes(
        pem, serialization.PublicFormat.SubjectPublicKeyInfo))
