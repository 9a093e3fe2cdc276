"""Records sealed with the operator's key: AES-256-GCM over the whole record, bound to its kernel id.

A record carries secrets (the kernel's HMAC key, the launcher's control key), so it is never written in
clear; and since everything a gateway reads back (addresses, ports, provisioner state) decides where it
connects and what it kills, the whole record is authenticated, with the kernel id as associated data: a
record edited in the store, or moved under another kernel's id, fails to open and is refused.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .record import KernelRecord

__all__ = ["RecordCipher", "TamperedRecord"]

VERSION = b"KGS1"
_NONCE = 12


class TamperedRecord(ValueError):
    """A stored record that does not open with the key: changed, truncated, or sealed with another key."""


class RecordCipher:
    """Seals and opens kernel records with one 256-bit key (``key`` given as 44 base64 characters)."""

    def __init__(self, key: str) -> None:
        try:
            raw = base64.b64decode(key.strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != 32:
            raise ValueError("the kernel store key must be 32 random bytes in base64 (44 characters), e.g. from "
                             "`python -c \"import base64, os; print(base64.b64encode(os.urandom(32)).decode())\"`")
        self._aead = AESGCM(raw)

    @staticmethod
    def _associated(kernel_id: str) -> bytes:
        return VERSION + b"|" + kernel_id.encode()

    def seal(self, record: KernelRecord) -> bytes:
        nonce = os.urandom(_NONCE)
        return VERSION + nonce + self._aead.encrypt(nonce, record.to_json(), self._associated(record.kernel_id))

    def open(self, kernel_id: str, blob: bytes) -> KernelRecord:
        """The record stored under ``kernel_id``; :class:`TamperedRecord` if it is not exactly what was sealed."""
        if blob[:4] != VERSION or len(blob) < 4 + _NONCE + 16:
            raise TamperedRecord(f"kernel {kernel_id}: the stored record is not a sealed record")
        try:
            data = self._aead.decrypt(blob[4:4 + _NONCE], blob[4 + _NONCE:], self._associated(kernel_id))
        except InvalidTag:
            raise TamperedRecord(f"kernel {kernel_id}: the stored record does not open with the store key "
                                 "(changed in the store, or sealed with another key)") from None
        record = KernelRecord.from_json(data)
        if record.kernel_id != kernel_id:  # unreachable with the id as associated data; checked all the same
            raise TamperedRecord(f"kernel {kernel_id}: the stored record names kernel {record.kernel_id}")
        return record
