"""Keyed surrogates: HMAC-SHA256 pseudonyms, per-patient date offsets and DICOM UIDs.

Everything here is a pure function of (key, domain, value), so a surrogate is stable for one key
version and changes completely under another. The same functions exist twice: in Python (for
text surrogates and tests) and as DuckDB SQL expressions (for structured tables, where the HMAC
is computed in the database from the inner/outer pad blobs passed as statement parameters, never
spliced into SQL text). A test checks both give the same answer.

Domain separation: the message is ``domain || 0x1f || value``, so a patient id and an MRN with
the same characters get different surrogates.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

SEP = "\x1f"
DATE_SHIFT_DOMAIN = "date-shift"
UID_ROOT = "2.25."
# Offsets are drawn from [-MAX_SHIFT_DAYS, -1]: always into the past, never zero.
MAX_SHIFT_DAYS = 365


def hmac_hex(key: bytes, domain: str, value: str) -> str:
    """Hex HMAC-SHA256 of ``domain || 0x1f || value``."""
    return hmac.digest(key, f"{domain}{SEP}{value}".encode(), "sha256").hex()


def pseudonym(key: bytes, domain: str, value: str, length: int = 24) -> str:
    """A stable opaque surrogate (hex prefix of the HMAC)."""
    return hmac_hex(key, domain, value)[:length]


def day_offset(key: bytes, patient_id: str, max_days: int = MAX_SHIFT_DAYS) -> int:
    """One offset per patient in ``[-max_days, -1]`` days, derived from the key."""
    h = hmac_hex(key, DATE_SHIFT_DOMAIN, patient_id)
    return -(1 + int(h[:15], 16) % max_days)


def dicom_uid(key: bytes, uid: str) -> str:
    """A DICOM UID under the 2.25 root (ISO/IEC 9834-8 UUID-derived), at most 64 characters."""
    h = hmac_hex(key, "dicom-uid", uid)
    return UID_ROOT + str(int(h[:32], 16))


class Hmac:
    """HMAC-SHA256 of many values under one key: the key's pads and the domain prefix are
    hashed once (hashlib midstates, copied per value), so each value costs two short SHA-256
    finishes in OpenSSL. Same results as :func:`hmac_hex`; used to build the per-column maps of
    distinct values that structured de-identification joins."""

    def __init__(self, key: bytes):
        pads = SqlKey.from_key(key)
        self._inner = hashlib.sha256(pads.ipad)
        self._outer = hashlib.sha256(pads.opad)

    def hex_many(self, domain: str, values: Iterable[str], length: int = 64) -> list[str]:
        """Hex HMACs (first ``length`` digits) of ``domain || 0x1f || value`` for each value."""
        inner = self._inner.copy()
        inner.update(f"{domain}{SEP}".encode())
        icopy, ocopy = inner.copy, self._outer.copy  # bound once: this loop is the hot path
        out: list[str] = []
        append = out.append
        for v in values:
            i = icopy()
            i.update(v.encode())
            o = ocopy()
            o.update(i.digest())
            append(o.hexdigest()[:length])
        return out

    def pseudonyms(self, domain: str, values: Iterable[str], length: int = 24) -> list[str]:
        return self.hex_many(domain, values, length)

    def day_offsets(self, patients: Iterable[str], max_days: int = MAX_SHIFT_DAYS) -> list[int]:
        return [
            -(1 + int(h[:15], 16) % max_days) for h in self.hex_many(DATE_SHIFT_DOMAIN, patients)
        ]

    def dicom_uids(self, uids: Iterable[str]) -> list[str]:
        return [UID_ROOT + str(int(h[:32], 16)) for h in self.hex_many("dicom-uid", uids)]


@dataclass(frozen=True)
class SqlKey:
    """HMAC pads for use as DuckDB statement parameters (``$ipad``/``$opad``).

    ``HMAC(K, m) = SHA256((K' ^ opad) || SHA256((K' ^ ipad) || m))`` with ``K'`` the key padded
    to the 64-byte block. The pads are as secret as the key: pass them as parameters only.
    """

    ipad: bytes
    opad: bytes

    @classmethod
    def from_key(cls, key: bytes) -> SqlKey:
        k = key if len(key) <= 64 else hashlib.sha256(key).digest()
        k = k.ljust(64, b"\0")
        return cls(bytes(b ^ 0x36 for b in k), bytes(b ^ 0x5C for b in k))

    def params(self) -> dict[str, bytes]:
        return {"ipad": self.ipad, "opad": self.opad}


def sql_hmac_hex(value_sql: str, domain: str) -> str:
    """SQL expression: hex HMAC of ``domain || 0x1f || CAST(value AS VARCHAR)``; NULL stays NULL."""
    dom = domain.replace("'", "''")
    msg = f"encode('{dom}' || chr(31) || CAST({value_sql} AS VARCHAR))"
    return f"sha256($opad || unhex(sha256($ipad || {msg})))"


def sql_pseudonym(value_sql: str, domain: str, length: int = 24) -> str:
    return f"left({sql_hmac_hex(value_sql, domain)}, {int(length)})"


def sql_day_offset(patient_sql: str, max_days: int = MAX_SHIFT_DAYS) -> str:
    """SQL expression: the patient's day offset (INTEGER), same as :func:`day_offset`."""
    h = sql_hmac_hex(patient_sql, DATE_SHIFT_DOMAIN)
    return f"CAST(-(1 + (CAST(('0x' || left({h}, 15)) AS BIGINT) % {int(max_days)})) AS INTEGER)"


def sql_uid_from_hex(h: str) -> str:
    """SQL expression: ``2.25.<integer of the first 32 hex digits of h>``."""
    hi = f"CAST(CAST(('0x' || substr({h}, 1, 16)) AS UBIGINT) AS UHUGEINT)"
    lo = f"CAST(CAST(('0x' || substr({h}, 17, 16)) AS UBIGINT) AS UHUGEINT)"
    return f"'{UID_ROOT}' || CAST({hi} * CAST(18446744073709551616 AS UHUGEINT) + {lo} AS VARCHAR)"


def sql_dicom_uid(value_sql: str) -> str:
    """SQL expression: the 2.25 UID of a DICOM UID, same as :func:`dicom_uid` (the HMAC is
    spelled twice; :func:`sql_uid_from_hex` over a computed column avoids that)."""
    return sql_uid_from_hex(sql_hmac_hex(value_sql, "dicom-uid"))
